//! Pools of dedicated Redis connections: the ones a task holds for itself.
//!
//! The purchase path and every short command share one multiplexed
//! connection ([`RedisConn`], built by `stock::store::connect`). Two kinds of
//! task cannot share it: an order worker, whose `XREADGROUP … BLOCK` holds
//! its connection for up to the block (every command queued behind it would
//! wait), and the cache-invalidation listener, whose subscribed connection
//! can do nothing else. Each takes its connection from a pool sized to the
//! tasks that hold one, keeps it while it works, and hands it back broken
//! ([`Lease::discard`], [`ListenerPool::discard`]) when Redis fails it, so
//! the pool builds a fresh one: on a cluster, with a fresh slot map.
//!
//! - [`WorkerPool`]: in standalone mode a `deadpool_redis` pool of plain
//!   multiplexed connections; on a cluster a `deadpool` pool of the redis
//!   crate's cluster connections (`deadpool_redis::cluster`'s types), made by
//!   [`ClusterManager`] from a client with our retry, timeout and
//!   reconnection settings (`deadpool_redis::cluster::Manager` builds its
//!   client from URLs alone, with the library's defaults, under which a
//!   worker never learns that a dead primary's replica took over).
//! - [`ListenerPool`]: a `deadpool` pool of pub/sub connections, each to the
//!   first seed node that answers.
//!
//! A worker's connection names itself (`CLIENT SETNAME seckill-worker`, on
//! a cluster on every node), so `CLIENT LIST` shows an operator (and the
//! tests) what the pool holds; the listener's is the one with `sub=1` (a
//! RESP2 pub/sub connection takes no other command).
//!
//! Nothing here builds a command: the name and the `PING` with which a pool
//! checks a connection handed back before lending it again are
//! `stock::store`'s, like every other.

use std::time::Duration;

use anyhow::Context;
use deadpool::Runtime;
use deadpool::managed::{self, Hook, HookError, Metrics, Object, Pool, RecycleResult, Timeouts};
use deadpool_redis::cluster::{ClusterClient, ClusterConnection};
use redis::RedisError;
use redis::aio::PubSub;

use super::connection::{RedisConn, seeds};
use super::store::{
    ConnectOptions, cluster_client, connection_config, name_connection, ping, ping_subscription,
};

/// The name (`CLIENT SETNAME`) of the workers' connections.
pub const WORKER_NAME: &str = "seckill-worker";

/// Connections an order worker's pool holds beyond one per worker: a worker
/// whose connection failed takes a new one before it lets the old one go.
pub const SPARE_CONNECTIONS: usize = 1;

/// The order workers' connections: one per worker (and
/// [`SPARE_CONNECTIONS`]), each with a reply timeout longer than the
/// workers' block.
#[derive(Clone)]
pub struct WorkerPool(Kind);

#[derive(Clone)]
enum Kind {
    Single(deadpool_redis::Pool),
    Cluster(Pool<ClusterManager>),
}

/// A connection lent to one worker. It goes back to its pool when dropped,
/// or is thrown away by [`Lease::discard`].
pub struct Lease {
    conn: RedisConn,
    held: Held,
}

enum Held {
    Single(deadpool_redis::Connection),
    Cluster(Object<ClusterManager>),
}

impl WorkerPool {
    /// A pool for `workers` workers that block up to `block` on a read,
    /// against `url` (one URL: standalone; several: a cluster). No
    /// connection is opened before the first [`WorkerPool::lease`].
    pub fn new(url: &str, workers: usize, block: Duration) -> anyhow::Result<WorkerPool> {
        let options = ConnectOptions::blocking(block);
        let size = workers + SPARE_CONNECTIONS;
        let timeouts = timeouts(options);
        let nodes = seeds(url);
        let kind = if nodes.len() > 1 {
            let manager = ClusterManager {
                client: cluster_client(nodes, options)?,
            };
            Kind::Cluster(
                Pool::builder(manager)
                    .max_size(size)
                    .runtime(Runtime::Tokio1)
                    .timeouts(timeouts)
                    .build()
                    .context("failed to build the workers' redis cluster pool")?,
            )
        } else {
            let manager = deadpool_redis::Manager::new_with_config(url, connection_config(options))
                .context("invalid redis url")?;
            Kind::Single(
                deadpool_redis::Pool::builder(manager)
                    .post_create(Hook::async_fn(|conn, _| {
                        Box::pin(async move {
                            name_connection(conn, WORKER_NAME)
                                .await
                                .map_err(HookError::Backend)
                        })
                    }))
                    .max_size(size)
                    .runtime(Runtime::Tokio1)
                    .timeouts(timeouts)
                    .build()
                    .context("failed to build the workers' redis pool")?,
            )
        };
        Ok(WorkerPool(kind))
    }

    /// Lends a connection: an idle one that still answers `PING`, or a new
    /// one. Fails when Redis does not answer, or when every connection is
    /// lent and none comes back within the connection timeout.
    pub async fn lease(&self) -> anyhow::Result<Lease> {
        match &self.0 {
            Kind::Single(pool) => {
                let held = pool
                    .get()
                    .await
                    .context("no redis connection for the order worker")?;
                Ok(Lease {
                    conn: RedisConn::Multiplexed((*held).clone()),
                    held: Held::Single(held),
                })
            }
            Kind::Cluster(pool) => {
                let held = pool
                    .get()
                    .await
                    .context("no redis cluster connection for the order worker")?;
                Ok(Lease {
                    conn: RedisConn::Cluster((*held).clone()),
                    held: Held::Cluster(held),
                })
            }
        }
    }

    /// How many connections the pool holds, lent or idle, and its bound.
    pub fn status(&self) -> PoolStatus {
        let s = match &self.0 {
            Kind::Single(pool) => pool.status(),
            Kind::Cluster(pool) => pool.status(),
        };
        PoolStatus {
            open: s.size,
            idle: s.available,
            max: s.max_size,
        }
    }
}

impl Lease {
    /// The lent connection, for a `Store`. Its clones share the lease's
    /// socket: they must not outlive the lease.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Throws the connection away instead of handing it back: the pool
    /// opens a new one for the next lease.
    pub fn discard(self) {
        match self.held {
            Held::Single(c) => drop(deadpool_redis::Connection::take(c)),
            Held::Cluster(c) => drop(Object::take(c)),
        }
    }
}

/// A pool's size, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStatus {
    /// Connections open, lent or idle.
    pub open: usize,
    /// Open connections not lent.
    pub idle: usize,
    /// The most the pool opens.
    pub max: usize,
}

/// Makes the cluster connections of a [`WorkerPool`] from a client built
/// with our settings.
pub struct ClusterManager {
    client: ClusterClient,
}

impl managed::Manager for ClusterManager {
    type Type = ClusterConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<ClusterConnection, RedisError> {
        let mut conn = self.client.get_async_connection().await?;
        // The cluster client sends it to every primary.
        name_connection(&mut conn, WORKER_NAME).await?;
        Ok(conn)
    }

    async fn recycle(
        &self,
        conn: &mut ClusterConnection,
        _: &Metrics,
    ) -> RecycleResult<RedisError> {
        Ok(ping(conn).await?)
    }
}

/// The cache-invalidation listeners' pub/sub connections: one per listener.
#[derive(Clone)]
pub struct ListenerPool(Pool<PubSubManager>);

/// A pub/sub connection lent to a listener.
pub type Subscription = Object<PubSubManager>;

impl ListenerPool {
    /// A pool of `listeners` pub/sub connections to the seeds of `url`.
    pub fn new(url: &str, listeners: usize, options: ConnectOptions) -> anyhow::Result<Self> {
        let clients = seeds(url)
            .into_iter()
            .map(redis::Client::open)
            .collect::<Result<Vec<_>, _>>()
            .context("invalid redis url")?;
        let manager = PubSubManager {
            clients,
            connection_timeout: options.connection_timeout,
        };
        let pool = Pool::builder(manager)
            .max_size(listeners)
            .runtime(Runtime::Tokio1)
            .timeouts(timeouts(options))
            .build()
            .context("failed to build the listeners' redis pool")?;
        Ok(ListenerPool(pool))
    }

    /// Lends a pub/sub connection: an idle one that still answers `PING`,
    /// or a new one to the first seed that answers.
    pub async fn lease(&self) -> anyhow::Result<Subscription> {
        self.0
            .get()
            .await
            .context("no redis pub/sub connection for the listener")
    }

    /// Throws a connection away (it dropped, or its subscription is in an
    /// unknown state): the pool opens a new one for the next lease.
    pub fn discard(conn: Subscription) {
        drop(Object::take(conn));
    }

    /// How many connections the pool holds, lent or idle, and its bound.
    pub fn status(&self) -> PoolStatus {
        let s = self.0.status();
        PoolStatus {
            open: s.size,
            idle: s.available,
            max: s.max_size,
        }
    }
}

/// Makes the pub/sub connections of a [`ListenerPool`]: to the first seed
/// that answers, so a node that is down or gone is skipped.
pub struct PubSubManager {
    clients: Vec<redis::Client>,
    connection_timeout: Duration,
}

impl managed::Manager for PubSubManager {
    type Type = PubSub;
    type Error = RedisError;

    async fn create(&self) -> Result<PubSub, RedisError> {
        let mut last_error = None;
        for client in &self.clients {
            match tokio::time::timeout(self.connection_timeout, client.get_async_pubsub()).await {
                Ok(Ok(pubsub)) => return Ok(pubsub),
                Ok(Err(e)) => last_error = Some(e),
                Err(_) => {
                    last_error = Some(RedisError::from((
                        redis::ErrorKind::Io,
                        "timed out connecting to redis",
                    )))
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RedisError::from((redis::ErrorKind::InvalidClientConfig, "no redis url"))
        }))
    }

    async fn recycle(&self, conn: &mut PubSub, _: &Metrics) -> RecycleResult<RedisError> {
        Ok(ping_subscription(conn).await?)
    }
}

/// How long a lease waits: for an idle connection, for a new one, and for
/// the `PING` that checks one handed back.
fn timeouts(options: ConnectOptions) -> Timeouts {
    Timeouts {
        wait: Some(options.connection_timeout),
        create: Some(options.overall_timeout),
        recycle: Some(options.response_timeout),
    }
}
