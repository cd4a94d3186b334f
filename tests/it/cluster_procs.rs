//! A private Redis Cluster for a test: `redis-server --cluster-enabled yes`
//! on spare loopback ports, joined by `redis-cli --cluster create`, ready
//! once every node reports `cluster_state:ok`. Dropping it kills the nodes
//! and deletes their directory (their `nodes-P.conf` included).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::procs::spare_port;

/// One node of the cluster.
pub struct Node {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Starts `redis-server` as cluster node `port`, its files in `dir`.
fn spawn_node(port: u16, dir: &std::path::Path) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--cluster-enabled", "yes"])
        .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
        .args(["--cluster-node-timeout", "1000"])
        // A replica may be promoted however far behind it is: the
        // failover test kills its primary on purpose.
        .args(["--cluster-replica-validity-factor", "0"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts (is it installed?)")
}

impl Node {
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A plain connection to this node alone (no redirects followed).
    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .expect("the node answers")
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts it again with its node file: a primary that was failed over
    /// rejoins as a replica of the node that took its place.
    pub fn restart(&mut self) {
        self.kill9();
        self.child = Some(spawn_node(self.port, &self.dir));
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running cluster.
pub struct ClusterProc {
    pub nodes: Vec<Node>,
    dir: PathBuf,
}

/// A port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = spare_port();
        if port < 55000 && std::net::TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
}

impl ClusterProc {
    /// Starts `primaries` primaries with `replicas` replicas each.
    pub async fn start(primaries: usize, replicas: usize) -> ClusterProc {
        let dir = std::env::temp_dir().join(format!(
            "seckill-it-cluster-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            let port = cluster_port();
            let child = spawn_node(port, &dir);
            nodes.push(Node {
                port,
                dir: dir.clone(),
                child: Some(child),
            });
        }
        let cluster = ClusterProc { nodes, dir };
        for n in &cluster.nodes {
            cluster.wait_ping(n.port).await;
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli runs (is it installed?)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok().await;
        if replicas > 0 {
            cluster.wait_replicating(replicas).await;
        }
        cluster
    }

    /// Waits until a new cluster's replicas hold what their primaries are
    /// written from now on. `cluster_state:ok` is not enough: while the
    /// nodes still exchange the slot map, a replica may apply a write of its
    /// primary, acknowledge its offset, then drop the key when a late
    /// configuration update reaches it (seen here under load with Redis 7.0:
    /// the replica reported the primary's offset and held no key). So: every
    /// node must report the same primaries, slots and replicas, and a probe
    /// key written on each primary must be readable on its replica, the
    /// probe rewritten until it is.
    async fn wait_replicating(&self, replicas: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // One view of the slot map, agreed by every node, with every replica.
        loop {
            let mut views = Vec::new();
            for n in &self.nodes {
                views.push(slot_map(&mut n.conn().await).await);
            }
            let agreed = views.windows(2).all(|w| w[0] == w[1]);
            let complete = views[0].iter().all(|(_, _, _, of)| of.len() == replicas);
            if agreed && complete && !views[0].is_empty() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the nodes never agreed on the slot map: {views:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // A probe per primary, read back from each of its replicas.
        let map = slot_map(&mut self.nodes[0].conn().await).await;
        for (lo, _, primary, of) in map {
            let mut on_primary = self.node_ref(primary).conn().await;
            let probe = self.key_in_slot_range(lo).await;
            for replica in of {
                let mut on_replica = self.reader(replica).await;
                let mut round = 0u32;
                loop {
                    round += 1;
                    let _: () = redis::cmd("SET")
                        .arg(&probe)
                        .arg(round)
                        .query_async(&mut on_primary)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let seen: Option<u32> = redis::cmd("GET")
                        .arg(&probe)
                        .query_async(&mut on_replica)
                        .await
                        .unwrap_or(None);
                    if seen == Some(round) {
                        break;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "replica {replica} never held what {primary} was written"
                    );
                }
            }
            let _: () = redis::cmd("DEL")
                .arg(&probe)
                .query_async(&mut on_primary)
                .await
                .unwrap();
        }
    }

    /// A connection to the replica on `port` that may serve reads
    /// (`READONLY`).
    pub async fn reader(&self, port: u16) -> redis::aio::MultiplexedConnection {
        let mut c = self.node_ref(port).conn().await;
        let _: () = redis::cmd("READONLY").query_async(&mut c).await.unwrap();
        c
    }

    /// Waits until `cmd`, asked of the replica on `port`, answers `want`.
    pub async fn wait_on_replica<T>(&self, port: u16, cmd: &redis::Cmd, want: T)
    where
        T: redis::FromRedisValue + PartialEq + std::fmt::Debug,
    {
        let mut c = self.reader(port).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let got: T = cmd.query_async(&mut c).await.unwrap();
            if got == want {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {port} never answered {want:?}: {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn node_ref(&self, port: u16) -> &Node {
        self.nodes.iter().find(|n| n.port == port).unwrap()
    }

    /// A key whose slot is `slot`'s primary's: the first `probe-N` in the
    /// range that starts at `slot` (one of every few N is).
    async fn key_in_slot_range(&self, lo: u16) -> String {
        let map = slot_map(&mut self.nodes[0].conn().await).await;
        let (_, hi, _, _) = map.iter().find(|(l, ..)| *l == lo).unwrap().clone();
        for n in 0.. {
            let key = format!("probe-{n}");
            let slot = self.slot(&key).await;
            if (lo..=hi).contains(&slot) {
                return key;
            }
        }
        unreachable!()
    }

    async fn wait_ping(&self, port: u16) {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
        for _ in 0..400 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("cluster node {port} never answered PING");
    }

    /// Waits until every running node reports `cluster_state:ok` and agrees
    /// on the primaries.
    pub async fn wait_ok(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut ok = true;
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                let info: String = match redis::Client::open(n.url())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                {
                    Ok(mut c) => redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut c)
                        .await
                        .unwrap_or_default(),
                    Err(_) => String::new(),
                };
                if !info.contains("cluster_state:ok") {
                    ok = false;
                    break;
                }
            }
            if ok {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the cluster never reached cluster_state:ok"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `SECKILL_REDIS_URL` for it: every node, comma-separated.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub async fn slot(&self, key: &str) -> u16 {
        let mut c = self.running().conn().await;
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    fn running(&self) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a node runs")
    }

    /// The port of the primary serving `slot` now (`CLUSTER SLOTS`, asked of
    /// a running node).
    pub async fn primary_of(&self, slot: u16) -> u16 {
        let mut c = self.running().conn().await;
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await
            .unwrap();
        for range in slots {
            let redis::Value::Array(items) = range else {
                continue;
            };
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                (items.first(), items.get(1))
            else {
                continue;
            };
            if (*lo..=*hi).contains(&(slot as i64))
                && let Some(redis::Value::Array(primary)) = items.get(2)
                && let Some(redis::Value::Int(port)) = primary.get(1)
            {
                return *port as u16;
            }
        }
        panic!("no primary serves slot {slot}");
    }

    /// The ports of the nodes that are primaries now.
    pub async fn primaries(&self) -> Vec<u16> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            let mut c = n.conn().await;
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await.unwrap();
            if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"master") {
                out.push(n.port);
            }
        }
        out.sort_unstable();
        out
    }

    /// The port of a replica of the primary on `primary` (`INFO
    /// replication` of every running node).
    pub async fn replica_of(&self, primary: u16) -> u16 {
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            let mut c = n.conn().await;
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap();
            if info.contains("role:slave") && info.contains(&format!("master_port:{primary}\r")) {
                return n.port;
            }
        }
        panic!("no replica of {primary}");
    }

    /// Promotes the replica on `port` at once (`CLUSTER FAILOVER
    /// TAKEOVER`: no agreement from the other primaries needed, as after
    /// its primary died) and waits until it is a primary and the cluster
    /// is ok again.
    pub async fn take_over(&self, port: u16) {
        let node = self.nodes.iter().find(|n| n.port == port).unwrap();
        let mut c = node.conn().await;
        let _: String = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .arg("TAKEOVER")
            .query_async(&mut c)
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.primaries().await.contains(&port) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica {port} was never promoted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_ok().await;
    }

    /// Waits until the primary on `port` has at least one replica online.
    pub async fn wait_replicated(&self, port: u16) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let node = self.nodes.iter().find(|n| n.port == port).unwrap();
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut node.conn().await)
                .await
                .unwrap_or_default();
            if info.contains("state=online") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{port} never got a replica online: {info}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn node(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("a node of this cluster")
    }
}

impl Drop for ClusterProc {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill9();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A node's view of the slot map (`CLUSTER SLOTS`): per range, its first and
/// last slot, its primary's port and its replicas' ports (sorted).
async fn slot_map(c: &mut redis::aio::MultiplexedConnection) -> Vec<(u16, u16, u16, Vec<u16>)> {
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(c)
        .await
        .unwrap_or_default();
    let port = |v: &redis::Value| match v {
        redis::Value::Array(node) => match node.get(1) {
            Some(redis::Value::Int(p)) => *p as u16,
            _ => 0,
        },
        _ => 0,
    };
    let mut out: Vec<(u16, u16, u16, Vec<u16>)> = slots
        .iter()
        .filter_map(|range| {
            let redis::Value::Array(items) = range else {
                return None;
            };
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                (items.first(), items.get(1))
            else {
                return None;
            };
            let primary = port(items.get(2)?);
            let mut replicas: Vec<u16> = items[3..].iter().map(port).collect();
            replicas.sort_unstable();
            Some((*lo as u16, *hi as u16, primary, replicas))
        })
        .collect();
    out.sort_unstable();
    out
}

impl ClusterProc {
    /// The cluster id of the node on `port` (`CLUSTER MYID`).
    pub async fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut self.node_ref(port).conn().await)
            .await
            .unwrap()
    }

    /// Moves `slot` and its keys from the primary on `from` to the primary
    /// on `to`, as `redis-cli --cluster reshard` does, one slot:
    /// `IMPORTING` on the target, `MIGRATING` on the source, `MIGRATE` of
    /// its keys in batches (clients meanwhile get `ASK` for the keys moved),
    /// then `SETSLOT … NODE` on both and every other primary.
    pub async fn migrate_slot(&self, slot: u16, from: u16, to: u16) {
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        let mut source = self.node_ref(from).conn().await;
        let mut target = self.node_ref(to).conn().await;
        let setslot = |state: &str, id: &str| {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(state)
                .arg(id)
                .clone()
        };
        let _: () = setslot("IMPORTING", &from_id)
            .query_async(&mut target)
            .await
            .unwrap();
        let _: () = setslot("MIGRATING", &to_id)
            .query_async(&mut source)
            .await
            .unwrap();
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(10)
                .query_async(&mut source)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut source)
                .await
                .unwrap();
        }
        let _: () = setslot("NODE", &to_id)
            .query_async(&mut target)
            .await
            .unwrap();
        let _: () = setslot("NODE", &to_id)
            .query_async(&mut source)
            .await
            .unwrap();
        for p in self.primaries().await {
            if p != from && p != to {
                let _: () = setslot("NODE", &to_id)
                    .query_async(&mut self.node_ref(p).conn().await)
                    .await
                    .unwrap();
            }
        }
    }
}
