//! The dedicated Redis connections (`stock::pool`): each order worker and the
//! cache listener hold one connection from a pool sized to them, seen from
//! Redis's side (`CLIENT LIST`, where each names its role); a connection
//! Redis drops is replaced from the pool and the work goes on; on a cluster
//! the workers' pool lends cluster connections that follow a failover.

use std::time::Duration;

use seckill::app::Role;
use seckill::stock::pool::WORKER_NAME;
use seckill::stock::{ListenerPool, WorkerPool};

use crate::cluster_procs::ClusterProc;
use crate::helpers::*;
use crate::procs::RedisProc;

/// One line of `CLIENT LIST`.
struct Client {
    id: String,
    name: String,
    sub: u32,
}

async fn clients(conn: &mut redis::aio::MultiplexedConnection) -> Vec<Client> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    list.lines()
        .map(|line| {
            let field = |name: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
                    .unwrap_or("")
                    .to_string()
            };
            Client {
                id: field("id"),
                name: field("name"),
                sub: field("sub").parse().unwrap_or(0),
            }
        })
        .collect()
}

/// Which connections a pool holds: the workers' (by name), or the
/// subscribed ones (the listener's).
#[derive(Debug, Clone, Copy)]
enum Holder {
    Worker,
    Listener,
}

impl Holder {
    fn holds(self, c: &Client) -> bool {
        match self {
            Holder::Worker => c.name == WORKER_NAME,
            Holder::Listener => c.sub > 0,
        }
    }
}

/// The ids of the connections of `role`.
async fn ids_of(conn: &mut redis::aio::MultiplexedConnection, role: Holder) -> Vec<String> {
    let mut ids: Vec<String> = clients(conn)
        .await
        .into_iter()
        .filter(|c| role.holds(c))
        .map(|c| c.id)
        .collect();
    ids.sort();
    ids
}

/// Waits until exactly `n` connections are `role`'s, none of them in
/// `gone`; returns their ids.
async fn wait_for_connections(
    conn: &mut redis::aio::MultiplexedConnection,
    role: Holder,
    n: usize,
    gone: &[String],
) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ids = ids_of(conn, role).await;
        if ids.len() == n && ids.iter().all(|id| !gone.contains(id)) {
            return ids;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{role:?}: wanted {n} connections, none of {gone:?}; Redis has {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kill_clients(conn: &mut redis::aio::MultiplexedConnection, ids: &[String]) {
    for id in ids {
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(conn)
            .await
            .unwrap();
        assert_eq!(killed, 1, "client {id} was there to kill");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_worker_and_the_listener_hold_one_pooled_connection_and_a_killed_one_is_replaced() {
    const WORKERS: usize = 3;
    // A Redis of its own: every connection on it is this gateway's.
    let redis = RedisProc::start(false).await;
    let mut settings = test_settings();
    settings.redis_url = redis.url();
    settings.workers = WORKERS;
    let mut app = spawn_with_settings(Role::Serve, settings).await;
    let id = app.active_promotion(100, 1).await;
    let mut admin = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    // One connection per worker and one for the listener, no more.
    let workers = wait_for_connections(&mut admin, Holder::Worker, WORKERS, &[]).await;
    let listener = wait_for_connections(&mut admin, Holder::Listener, 1, &[]).await;
    for user in 1..=10 {
        app.buy(id, user).await;
    }
    assert_eq!(app.wait_for_rows(id, 10, Duration::from_secs(20)).await, 10);
    println!("before: workers {workers:?}, listener {listener:?}");

    // Redis drops every one of them.
    kill_clients(&mut admin, &workers).await;
    kill_clients(&mut admin, &listener).await;

    // Each is replaced by a fresh one from its pool, never more than the
    // pools' bounds, and the work goes on on them.
    for user in 11..=20 {
        app.buy(id, user).await;
    }
    assert_eq!(
        app.wait_for_rows(id, 20, Duration::from_secs(30)).await,
        20,
        "the workers persist the orders after their connections were killed"
    );
    let workers_after = wait_for_connections(&mut admin, Holder::Worker, WORKERS, &workers).await;
    let listener_after = wait_for_connections(&mut admin, Holder::Listener, 1, &listener).await;
    println!("after: workers {workers_after:?}, listener {listener_after:?}");
    let numsub: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(app.keys.events())
        .query_async(&mut admin)
        .await
        .map(|v: Vec<(String, i64)>| v.into_iter().next().unwrap())
        .unwrap();
    assert_eq!(numsub.1, 1, "the listener subscribed again");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_lends_at_most_its_size_and_a_discarded_connection_is_opened_again() {
    let redis = RedisProc::start(false).await;
    let pool = WorkerPool::new(&redis.url(), 2, Duration::from_millis(100)).unwrap();
    // Two workers and the spare.
    let leases = [
        pool.lease().await.unwrap(),
        pool.lease().await.unwrap(),
        pool.lease().await.unwrap(),
    ];
    let status = pool.status();
    assert_eq!((status.open, status.idle, status.max), (3, 0, 3));
    // A fourth waits for one to come back, then fails: it never opens more.
    let refused = pool.lease().await;
    assert!(refused.is_err(), "a fourth connection is not opened");

    let [a, b, c] = leases;
    drop(a); // handed back: lent again
    b.discard(); // thrown away: the pool opens a new one when asked
    let status = pool.status();
    assert_eq!((status.open, status.idle), (2, 1));
    let again = pool.lease().await.unwrap();
    let fresh = pool.lease().await.unwrap();
    assert_eq!(pool.status().open, 3);
    for lease in [&again, &fresh, &c] {
        let pong: String = redis::cmd("PING")
            .query_async(&mut lease.conn())
            .await
            .unwrap();
        assert_eq!(pong, "PONG");
    }

    let listeners = ListenerPool::new(
        &redis.url(),
        1,
        seckill::stock::ConnectOptions::commands(Duration::from_millis(500)),
    )
    .unwrap();
    let held = listeners.lease().await.unwrap();
    assert!(
        listeners.lease().await.is_err(),
        "one listener, one connection"
    );
    ListenerPool::discard(held);
    assert_eq!(listeners.status().open, 0);
    let _again = listeners.lease().await.unwrap();
    assert_eq!(listeners.status().open, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_cluster_the_workers_pool_lends_cluster_connections_that_follow_a_failover() {
    let mut cluster = ClusterProc::start(3, 1).await;
    let pool = WorkerPool::new(&cluster.url(), 1, Duration::from_millis(100)).unwrap();
    let key = "{pool-test}:k";
    let lease = pool.lease().await.unwrap();
    let mut conn = lease.conn();
    assert!(conn.is_cluster());
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    // The replica has it before the primary dies.
    let primary = cluster.primary_of(cluster.slot(key).await).await;
    let replica = cluster.replica_of(primary).await;
    cluster
        .wait_on_replica(replica, redis::cmd("GET").arg(key), Some("v".to_string()))
        .await;

    // The key's primary dies and its replica takes over.
    cluster.node(primary).kill9();
    cluster.take_over(replica).await;

    // A fresh lease (what a worker takes when its connection failed)
    // learns the new slot map from the seeds.
    lease.discard();
    let lease = pool.lease().await.unwrap();
    let value: Option<String> = redis::cmd("GET")
        .arg(key)
        .query_async(&mut lease.conn())
        .await
        .unwrap();
    assert_eq!(
        value.as_deref(),
        Some("v"),
        "read from the promoted replica"
    );
    assert_eq!(pool.status().open, 1);
}
