//! The core guarantees on a real Redis Cluster (three primaries, started by
//! `cluster_procs`): no oversell over two gateways, the per-user limit,
//! every `200` persisted, cancel returning its unit once across gateways,
//! recovery after a node lost a promotion's keys, reconcile with zero drift,
//! promotions on every primary, scripts surviving `SCRIPT FLUSH`, a
//! replayed purchase call taking nothing twice, the cache listeners
//! subscribing again elsewhere when their node dies, a sale going on
//! through a reshard of its slot, and, with replicas and `WAIT`, no `200`
//! lost when a primary is killed mid-sale.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;
use seckill::stock::{Buyer, Outcome, Store};

use crate::cluster_procs::ClusterProc;
use crate::helpers::{TestApp, code, order_ids, spawn_with_settings, test_settings};

/// Two gateways (each with its workers) of one deployment on `cluster`.
async fn two_gateways(cluster: &ClusterProc) -> (TestApp, TestApp) {
    let mut settings = test_settings();
    settings.redis_url = cluster.url();
    let a = spawn_with_settings(Role::Serve, settings.clone()).await;
    let b = spawn_with_settings(Role::Serve, settings).await;
    (a, b)
}

/// The port of the primary holding promotion `id`'s keys.
async fn primary_of_promotion(cluster: &ClusterProc, app: &TestApp, id: i64) -> u16 {
    let slot = cluster.slot(&app.keys.promotion(id).meta).await;
    cluster.primary_of(slot).await
}

/// Creates promotions (through `app`) until every primary holds at least
/// one; returns them with their primary.
async fn promotions_on_every_primary(
    cluster: &ClusterProc,
    app: &TestApp,
    stock: i64,
    limit: i64,
) -> Vec<(i64, u16)> {
    let primaries: BTreeSet<u16> = cluster.primaries().await.into_iter().collect();
    let mut covered = BTreeSet::new();
    let mut out = Vec::new();
    for _ in 0..40 {
        let id = app.active_promotion(stock, limit).await;
        let port = primary_of_promotion(cluster, app, id).await;
        if covered.insert(port) {
            out.push((id, port));
        }
        if covered == primaries {
            return out;
        }
    }
    panic!("40 promotions did not cover the primaries {primaries:?}: {covered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_a_cluster_sell_exactly_the_stock_on_every_primary_and_persist_every_200() {
    let cluster = ClusterProc::start(3, 0).await;
    let (a, b) = two_gateways(&cluster).await;
    let promotions = promotions_on_every_primary(&cluster, &a, 20, 1).await;
    assert_eq!(promotions.len(), 3, "one promotion per primary");

    for &(id, port) in &promotions {
        // 60 buyers for 20 units, half through each gateway, all at once.
        let answers = join_all((1..=60).map(|user| {
            let gw = if user % 2 == 0 { &a } else { &b };
            gw.purchase(id, user)
        }))
        .await;
        let mut confirmed = HashSet::new();
        for (status, body) in &answers {
            match *status {
                StatusCode::OK => {
                    confirmed.insert(body["order_id"].as_str().unwrap().to_string());
                }
                StatusCode::GONE => assert_eq!(code(body), "sold_out"),
                other => panic!("unexpected answer {other}: {body}"),
            }
        }
        let rows = a.wait_for_rows(id, 20, Duration::from_secs(30)).await;
        let persisted: HashSet<String> = order_ids(&a.db, id).await.into_iter().collect();
        println!(
            "promotion {id} on primary {port}: 60 buyers over two gateways, {} x 200, {rows} rows",
            confirmed.len()
        );
        assert_eq!(confirmed.len(), 20, "exactly the stock is sold");
        assert_eq!(
            persisted, confirmed,
            "every 200 is in PostgreSQL, nothing else"
        );
        let stats = b.stats(id).await;
        assert_eq!(stats["remaining"], 0);
        assert_eq!(stats["sold"], 20);
        let (rc, out) = a.reconcile(id).await;
        assert_eq!(rc, 0, "reconcile finds no drift: {out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_per_user_limit_holds_over_two_gateways_on_a_cluster() {
    let cluster = ClusterProc::start(3, 0).await;
    let (a, b) = two_gateways(&cluster).await;
    let id = a.active_promotion(100, 2).await;

    // One buyer, 30 concurrent purchases split over both gateways.
    let answers = join_all((0..30).map(|n| {
        let gw = if n % 2 == 0 { &a } else { &b };
        gw.purchase(id, 7)
    }))
    .await;
    let won = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let refused = answers
        .iter()
        .filter(|(s, b)| *s == StatusCode::CONFLICT && code(b) == "already_purchased")
        .count();
    println!("one buyer, limit 2, 30 purchases over two gateways: {won} x 200, {refused} x 409");
    assert_eq!(won, 2);
    assert_eq!(refused, 28);
    assert_eq!(a.wait_for_rows(id, 2, Duration::from_secs(30)).await, 2);
    assert_eq!(b.stats(id).await["remaining"], 98);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_sent_to_two_gateways_at_once_returns_its_unit_once_on_a_cluster() {
    let cluster = ClusterProc::start(3, 0).await;
    let (a, b) = two_gateways(&cluster).await;
    let id = a.active_promotion(3, 1).await;
    let order = a.buy(id, 1).await;
    a.buy(id, 2).await;
    assert_eq!(a.wait_for_rows(id, 2, Duration::from_secs(30)).await, 2);

    let (x, y) = tokio::join!(
        a.order_action(&order, "cancel", 1),
        b.order_action(&order, "cancel", 1)
    );
    println!("two concurrent cancels: {} and {}", x.0, y.0);
    assert!(
        x.0 == StatusCode::OK || y.0 == StatusCode::OK,
        "one cancel succeeds: {x:?} {y:?}"
    );
    for (status, body) in [&x, &y] {
        assert!(
            *status == StatusCode::OK || *status == StatusCode::CONFLICT,
            "{status} {body}"
        );
    }
    assert_eq!(a.order_status(&order).await.as_deref(), Some("cancelled"));
    let stats = b.stats(id).await;
    assert_eq!(stats["remaining"], 2, "3 units, 2 sold, 1 returned once");
    assert_eq!(stats["cancelled"], 1);
    // The unit is sold again, once: two more buyers, one unit each way.
    let (s3, _) = b
        .purchase_until_not_sold_out(id, 3, Duration::from_secs(10))
        .await;
    let (s4, _) = a
        .purchase_until_not_sold_out(id, 4, Duration::from_secs(10))
        .await;
    let (s5, body5) = b.purchase(id, 5).await;
    assert_eq!((s3, s4), (StatusCode::OK, StatusCode::OK));
    assert_eq!((s5, code(&body5)), (StatusCode::GONE, "sold_out"));
    assert_eq!(a.wait_for_rows(id, 4, Duration::from_secs(30)).await, 4);
    let (rc, out) = a.reconcile(id).await;
    assert_eq!(rc, 0, "reconcile finds no drift: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_whose_node_lost_its_keys_is_recovered_and_reconciles_on_a_cluster() {
    let cluster = ClusterProc::start(3, 0).await;
    let (a, b) = two_gateways(&cluster).await;
    let id = a.active_promotion(10, 1).await;
    for user in 1..=4 {
        let gw = if user % 2 == 0 { &a } else { &b };
        gw.buy(id, user).await;
    }
    assert_eq!(a.wait_for_rows(id, 4, Duration::from_secs(30)).await, 4);

    // The node holding the promotion's slot loses its keys: deleted on
    // that node itself, not through the cluster client.
    let port = primary_of_promotion(&cluster, &a, id).await;
    let k = a.keys.promotion(id);
    let mut node = cluster
        .nodes
        .iter()
        .find(|n| n.port == port)
        .unwrap()
        .conn()
        .await;
    let deleted: i64 = redis::cmd("DEL")
        .arg(&[
            &k.meta,
            &k.stock,
            &k.buyers,
            &k.orders,
            &k.results,
            &k.returned,
            &k.won,
        ])
        .query_async(&mut node)
        .await
        .unwrap();
    assert!(
        deleted >= 4,
        "the node held the promotion's keys: {deleted}"
    );
    let (rc, out) = a.reconcile(id).await;
    assert_eq!(rc, 1, "reconcile sees the loss: {out}");

    let (rc, out) = a.cli(&["recover", "--promotion", &id.to_string()]).await;
    assert_eq!(rc, 0, "{out}");
    let stats = b.stats(id).await;
    assert_eq!(stats["remaining"], 6);
    assert_eq!(stats["sold"], 4);
    let (rc, out) = a.reconcile(id).await;
    assert_eq!(rc, 0, "no drift after recovery: {out}");
    // The rebuilt sale goes on, and the earlier buyers' limit held.
    let (status, body) = b
        .purchase_until_not_sold_out(id, 5, Duration::from_secs(10))
        .await;
    let (status, body) = if status == StatusCode::OK {
        (status, body)
    } else {
        // The gateway may cache the miss for its TTL.
        tokio::time::sleep(a.settings.cache_ttl + Duration::from_millis(100)).await;
        b.purchase(id, 5).await
    };
    assert_eq!(status, StatusCode::OK, "{body}");
    tokio::time::sleep(a.settings.cache_ttl + Duration::from_millis(100)).await;
    let (status, body) = a.purchase(id, 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_purchased")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scripts_load_on_every_primary_survive_script_flush_and_a_replayed_call_takes_nothing_twice()
 {
    let cluster = ClusterProc::start(3, 0).await;
    let (a, b) = two_gateways(&cluster).await;
    let promotions = promotions_on_every_primary(&cluster, &a, 10, 5).await;

    // `seckill scripts` loads every script on every primary.
    for n in &cluster.nodes {
        let mut c = n.conn().await;
        let _: String = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let (rc, out) = a.cli(&["scripts", "--load"]).await;
    assert_eq!(rc, 0, "{out}");
    let shas: Vec<String> = seckill::stock::lua::all()
        .iter()
        .map(|l| l.script.get_hash().to_string())
        .collect();
    for port in cluster.primaries().await {
        let mut c = cluster
            .nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap()
            .conn()
            .await;
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&shas)
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(exists.iter().all(|e| *e), "primary {port}: {exists:?}");
    }

    // Every node forgets its scripts (as after a restart or a failover):
    // purchases on every primary still succeed (EVALSHA, NOSCRIPT, load).
    for n in &cluster.nodes {
        let mut c = n.conn().await;
        let _: String = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    for &(id, port) in &promotions {
        let (status, body) = b.purchase(id, 1).await;
        assert_eq!(status, StatusCode::OK, "promotion on {port}: {body}");
    }

    // The cluster client may resend a call whose reply it lost: the same
    // buyers with the same order ids take nothing twice.
    let store = Store::new(a.redis.clone(), a.keys.clone());
    let (id, _) = promotions[0];
    let buyers = vec![
        Buyer {
            user_id: 20,
            order_id: uuid::Uuid::now_v7().to_string(),
        },
        Buyer {
            user_id: 21,
            order_id: uuid::Uuid::now_v7().to_string(),
        },
    ];
    let first = store.purchase(id, &buyers).await.unwrap();
    let again = store.purchase(id, &buyers).await.unwrap();
    assert!(matches!(first[0], Outcome::Bought { .. }), "{first:?}");
    assert_eq!(
        first, again,
        "a replay answers what the first call answered"
    );
    let counters = store.counters(id).await.unwrap();
    println!("replayed call: {first:?} then {again:?}; counters {counters:?}");
    assert_eq!(counters.sold, 3, "buyer 1, then 20 and 21 once each");
    assert_eq!(counters.remaining, Some(7));
    assert_eq!(a.wait_for_rows(id, 3, Duration::from_secs(30)).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_for_one_replica_every_200_survives_its_primary_killed_mid_sale() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    // Batches answered 503 (no replica yet after the failover) still took
    // their units: stock enough that the sale outlasts the failover.
    const STOCK: i64 = 2000;
    // Buyers are not what runs out: while the restarted node still believes
    // it owns the slot (before the cluster tells it otherwise) it answers
    // "not loaded" at once, and thousands of buyers pass in a second or two.
    // The sale goes on until told to stop.
    const BUYERS: i64 = 1_000_000;
    let mut cluster = ClusterProc::start(3, 1).await;
    let mut settings = test_settings();
    settings.redis_url = cluster.url();
    settings.redis_wait_replicas = 1;
    settings.redis_wait_timeout = Duration::from_millis(200);
    // A promotion the promoted replica lacks is rebuilt by the background.
    settings.recover_interval = Duration::from_millis(500);
    let app = Arc::new(spawn_with_settings(Role::Serve, settings).await);
    let id = app.active_promotion(STOCK, 1).await;
    let primary = primary_of_promotion(&cluster, &app, id).await;
    let replica = cluster.replica_of(primary).await;

    // The sale: waves of 20 buyers at once, each buyer once, until told to
    // stop or out of buyers.
    let confirmed_count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sale = {
        let (app, count, stop) = (
            Arc::clone(&app),
            Arc::clone(&confirmed_count),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            let mut confirmed = Vec::new();
            let mut unavailable = 0;
            for first in (1..=BUYERS).step_by(20) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                for (status, body) in
                    join_all((first..first + 20).map(|u| app.purchase(id, u))).await
                {
                    match status {
                        StatusCode::OK => {
                            confirmed.push(body["order_id"].as_str().unwrap().to_string());
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::SERVICE_UNAVAILABLE => unavailable += 1,
                        StatusCode::GONE => {}
                        other => panic!("unexpected answer {other}: {body}"),
                    }
                }
            }
            (confirmed, unavailable)
        })
    };
    // Mid-sale (once 60 buyers are confirmed, not after a guessed delay):
    // the promotion's primary dies and its replica takes over; the dead
    // primary comes back as the new primary's replica, so `WAIT 1` can be
    // met again.
    while confirmed_count.load(Ordering::SeqCst) < 60 {
        assert!(!sale.is_finished(), "the sale ended before the kill");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.node(primary).kill9();
    let at_kill = confirmed_count.load(Ordering::SeqCst);
    cluster.take_over(replica).await;
    cluster.node(primary).restart();
    cluster.wait_replicated(replica).await;
    // The sale goes on: 20 more buyers confirmed after the failover.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while confirmed_count.load(Ordering::SeqCst) < at_kill + 20 {
        if sale.is_finished() {
            let ended = sale.await.map(|(c, unavailable)| (c.len(), unavailable));
            panic!("the sale ended before going on after the failover: {ended:?}");
        }
        if tokio::time::Instant::now() >= deadline {
            // Where the promotion's state is: each node's role and keys.
            let meta = app.keys.promotion(id).meta;
            for n in cluster.nodes.iter().filter(|n| n.is_running()) {
                let mut c = n.conn().await;
                let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut c).await.unwrap();
                let size: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
                let there: Result<Vec<(String, String)>, _> =
                    redis::cmd("HGETALL").arg(&meta).query_async(&mut c).await;
                println!(
                    "node {}: role {:?}, dbsize {size}, meta {there:?}",
                    n.port,
                    role.first()
                );
            }
            println!(
                "killed {primary}, promoted {replica}, slot of the promotion on {}",
                cluster.primary_of(cluster.slot(&meta).await).await
            );
            panic!("the sale did not go on after the failover");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (confirmed, unavailable) = sale.await.unwrap();
    let after = confirmed.len() - at_kill;

    // PostgreSQL also gets orders answered 503 (their WAIT timed out while
    // the new primary had no replica): wait for the confirmed ids, not a count.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let persisted = loop {
        let persisted: HashSet<String> = order_ids(&app.db, id).await.into_iter().collect();
        if confirmed.iter().all(|o| persisted.contains(o))
            || tokio::time::Instant::now() >= deadline
        {
            break persisted;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let rows = persisted.len();
    let lost = confirmed.iter().filter(|o| !persisted.contains(*o)).count();
    println!(
        "failover with WAIT 1: confirmed {} ({at_kill} before the kill, {after} after), \
         503 {unavailable}, persisted {}, lost {lost}, rows {rows}",
        confirmed.len(),
        persisted.len()
    );
    if lost > 0 {
        // Where the missing orders are: still in Redis (accepted, in the
        // stream, pending) or gone with the dead primary.
        let k = app.keys.promotion(id);
        let mut conn = app.redis.clone();
        let mut in_won = 0;
        for o in confirmed.iter().filter(|o| !persisted.contains(*o)) {
            let there: bool = redis::cmd("HEXISTS")
                .arg(&k.won)
                .arg(o)
                .query_async(&mut conn)
                .await
                .unwrap();
            in_won += usize::from(there);
        }
        let len: i64 = redis::cmd("XLEN")
            .arg(&k.orders)
            .query_async(&mut conn)
            .await
            .unwrap();
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(&k.orders)
            .arg(app.keys.consumer_group())
            .query_async(&mut conn)
            .await
            .unwrap();
        println!(
            "missing orders: {in_won} of {lost} in the won hash; stream length {len}, pending {pending:?}"
        );
    }
    assert_eq!(lost, 0, "every 200 reaches PostgreSQL");
    assert!(
        persisted.len() as i64 <= STOCK,
        "no oversell: {}",
        persisted.len()
    );
    // No unit sold twice: every order in PostgreSQL is counted as sold by
    // the promoted replica, which never sold more than the stock.
    let stats = app.stats(id).await;
    let sold = stats["sold"].as_i64().unwrap();
    assert!(sold <= STOCK, "{stats}");
    assert!(
        persisted.len() as i64 <= sold,
        "PostgreSQL holds {} orders, Redis counts {sold} sold",
        persisted.len()
    );
}

/// How many clients of each running node are subscribed to `channel`
/// (`PUBSUB NUMSUB` counts a node's own subscribers only).
async fn subscribers(cluster: &ClusterProc, channel: &str) -> Vec<(u16, i64)> {
    let mut out = Vec::new();
    for n in cluster.nodes.iter().filter(|n| n.is_running()) {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(&mut n.conn().await)
            .await
            .unwrap();
        let here = counts.first().map_or(0, |(_, c)| *c);
        if here > 0 {
            out.push((n.port, here));
        }
    }
    out
}

/// Waits until `n` listeners are subscribed to `channel` somewhere.
async fn wait_for_subscribers(cluster: &ClusterProc, channel: &str, n: i64) -> Vec<(u16, i64)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let subs = subscribers(cluster, channel).await;
        if subs.iter().map(|(_, c)| c).sum::<i64>() == n {
            return subs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "wanted {n} subscribers, found {subs:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cache_listeners_subscribe_again_elsewhere_when_their_node_dies_on_a_cluster() {
    let mut cluster = ClusterProc::start(3, 1).await;
    let mut settings = test_settings();
    settings.redis_url = cluster.url();
    // Only an invalidation can clear a gateway's cached sold-out flag.
    settings.sold_out_ttl = Duration::from_secs(600);
    settings.cache_ttl = Duration::from_secs(600);
    let a = spawn_with_settings(Role::Serve, settings.clone()).await;
    let b = spawn_with_settings(Role::GatewayOnly, settings).await;
    let channel = a.keys.events();
    let before = wait_for_subscribers(&cluster, &channel, 2).await;

    let id = a.active_promotion(1, 1).await;
    let order = a.buy(id, 1).await;
    assert_eq!(a.wait_for_rows(id, 1, Duration::from_secs(30)).await, 1);
    let (status, _) = b.purchase(id, 2).await;
    assert_eq!(status, StatusCode::GONE, "b caches the sold-out flag");

    // The node the listeners hear from dies; a replica takes its place when
    // it was a primary (after it holds the promotion, if it is its node).
    let dead = before[0].0;
    if cluster.primaries().await.contains(&dead) {
        let replica = cluster.replica_of(dead).await;
        let meta = a.keys.promotion(id).meta;
        if cluster.primary_of(cluster.slot(&meta).await).await == dead {
            let sold = redis::cmd("HGET").arg(&meta).arg("sold").clone();
            cluster.wait_on_replica(replica, &sold, Some(1i64)).await;
        }
        cluster.node(dead).kill9();
        cluster.take_over(replica).await;
    } else {
        cluster.node(dead).kill9();
    }
    let after = wait_for_subscribers(&cluster, &channel, 2).await;
    println!("listeners subscribed on {before:?}; node {dead} killed; now on {after:?}");
    assert!(after.iter().all(|(port, _)| *port != dead));

    // A cancel through a: b sells the returned unit, which only the
    // invalidation published on the new subscription can tell it.
    let (status, body) = a.order_action(&order, "cancel", 1).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = b
        .purchase_until_not_sold_out(id, 2, Duration::from_secs(10))
        .await;
    assert_eq!(status, StatusCode::OK, "b heard the invalidation: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sale_goes_on_through_a_reshard_of_its_slot_and_sells_exactly_its_stock() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const STOCK: i64 = 200;
    let cluster = ClusterProc::start(3, 0).await;
    let mut settings = test_settings();
    settings.redis_url = cluster.url();
    // Only an invalidation can clear a gateway's cached sold-out flag.
    settings.sold_out_ttl = Duration::from_secs(600);
    let a = Arc::new(spawn_with_settings(Role::Serve, settings.clone()).await);
    let b = Arc::new(spawn_with_settings(Role::Serve, settings).await);
    let id = a.active_promotion(STOCK, 1).await;
    let slot = cluster.slot(&a.keys.promotion(id).meta).await;
    let from = cluster.primary_of(slot).await;
    let to = *cluster
        .primaries()
        .await
        .iter()
        .find(|p| **p != from)
        .unwrap();

    // Waves of 20 buyers over both gateways until a wave finds it sold out.
    let confirmed_count = Arc::new(AtomicUsize::new(0));
    let sale = {
        let (a, b, count) = (Arc::clone(&a), Arc::clone(&b), Arc::clone(&confirmed_count));
        tokio::spawn(async move {
            let (mut confirmed, mut unavailable) = (Vec::new(), 0);
            for first in (1..100_000i64).step_by(20) {
                let answers = join_all((first..first + 20).map(|u| {
                    let gw = if u % 2 == 0 { &a } else { &b };
                    async move { (u, gw.purchase(id, u).await) }
                }))
                .await;
                let mut sold_out = 0;
                for (user, (status, body)) in answers {
                    match status {
                        StatusCode::OK => {
                            let order = body["order_id"].as_str().unwrap().to_string();
                            confirmed.push((user, order));
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        StatusCode::SERVICE_UNAVAILABLE => unavailable += 1,
                        StatusCode::GONE => sold_out += 1,
                        other => panic!("unexpected answer {other}: {body}"),
                    }
                }
                if sold_out == 20 {
                    break;
                }
            }
            (confirmed, unavailable)
        })
    };
    // Mid-sale (60 confirmed, not a guessed delay) the slot moves.
    while confirmed_count.load(Ordering::SeqCst) < 60 {
        assert!(!sale.is_finished(), "the sale ended before the reshard");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let at_move = confirmed_count.load(Ordering::SeqCst);
    cluster.migrate_slot(slot, from, to).await;
    let after_move = confirmed_count.load(Ordering::SeqCst);
    let (confirmed, unavailable) = sale.await.unwrap();
    assert_eq!(cluster.primary_of(slot).await, to, "the slot moved");
    println!(
        "reshard of slot {slot} from {from} to {to} mid-sale: {at_move} confirmed before, \
         {} during, {} after; 503 {unavailable}",
        after_move - at_move,
        confirmed.len() - after_move
    );

    // Exactly the stock reaches PostgreSQL, every 200 among it.
    assert!(confirmed.len() as i64 <= STOCK, "no oversell");
    assert_eq!(
        a.wait_for_rows(id, STOCK, Duration::from_secs(60)).await,
        STOCK
    );
    let persisted: HashSet<String> = order_ids(&a.db, id).await.into_iter().collect();
    assert!(
        confirmed.iter().all(|(_, o)| persisted.contains(o)),
        "every 200 persisted"
    );
    let (rc, out) = a.reconcile(id).await;
    assert_eq!(rc, 0, "reconcile finds no drift: {out}");

    // A unit returned through a is sold through b, which had cached the
    // sale as sold out: the invalidation reached it after the reshard.
    let (user, order) = &confirmed[0];
    let (status, body) = a.order_action(order, "cancel", *user).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = b
        .purchase_until_not_sold_out(id, 200_001, Duration::from_secs(10))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
