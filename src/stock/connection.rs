//! The one Redis connection type: a standalone server or a Redis Cluster.
//!
//! [`RedisConn`] is what the store holds. It forwards every command to a
//! multiplexed [`ConnectionManager`] (one URL: standalone) or to the redis
//! crate's async [`ClusterConnection`] (several comma-separated seed URLs:
//! cluster mode), which follows `MOVED`/`ASK`, refreshes its slot map and
//! reconnects by itself; or, for a task that holds a connection of its own
//! (an order worker), to a plain [`MultiplexedConnection`] or a cluster
//! connection lent by `stock::pool`. All are cheap to clone and share their
//! sockets.
//!
//! This module sends no command of its own: it only carries the commands
//! `stock::store` builds. The shared connection is built by
//! `stock::store::connect`; the dedicated ones are lent by `stock::pool`.

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to a standalone Redis or to a Redis Cluster.
#[derive(Clone)]
pub enum RedisConn {
    /// One server: a multiplexed connection that reconnects by itself.
    Single(ConnectionManager),
    /// One server, over a connection lent by a pool: it does not reconnect
    /// by itself; its holder asks the pool for another.
    Multiplexed(MultiplexedConnection),
    /// A cluster: commands go to the primary of their key's slot.
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Whether this is a cluster connection (no command may cross slots).
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisConn::Cluster(_))
    }
}

impl From<ConnectionManager> for RedisConn {
    fn from(conn: ConnectionManager) -> Self {
        RedisConn::Single(conn)
    }
}

impl From<ClusterConnection> for RedisConn {
    fn from(conn: ClusterConnection) -> Self {
        RedisConn::Cluster(conn)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Multiplexed(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Multiplexed(c) => c.get_db(),
            RedisConn::Cluster(c) => c.get_db(),
        }
    }
}

/// The seed URLs of a `SECKILL_REDIS_URL`: one for a standalone server,
/// several (comma-separated) for a cluster. Blanks around commas are ignored.
pub fn seeds(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Whether `url` selects cluster mode (more than one seed node).
pub fn is_cluster_url(url: &str) -> bool {
    seeds(url).len() > 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_is_standalone_several_are_a_cluster() {
        assert!(!is_cluster_url("redis://127.0.0.1:6379"));
        assert!(is_cluster_url("redis://a:7000, redis://b:7001"));
        assert_eq!(
            seeds("redis://a:7000, redis://b:7001,"),
            vec!["redis://a:7000", "redis://b:7001"]
        );
    }
}
