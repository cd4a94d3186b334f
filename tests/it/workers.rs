//! The order workers: a crash between reading and acknowledging loses
//! nothing and doubles nothing; a malformed entry never blocks the stream.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;
use seckill::orders::{Worker, WorkerConfig};
use seckill::stock::WorkerPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, order_ids, spawn_app_with};

fn config(batch: usize, claim_idle: Duration) -> WorkerConfig {
    WorkerConfig {
        batch,
        block: Duration::from_millis(100),
        claim_idle,
        claim_every: Duration::from_millis(100),
        refresh_every: Duration::from_millis(100),
        drain: Duration::from_secs(5),
    }
}

async fn worker(app: &TestApp, name: &str, cfg: WorkerConfig) -> Worker {
    let mut w = Worker::connect(
        WorkerPool::new(&app.settings.redis_url, 1, cfg.block).unwrap(),
        app.db.clone(),
        app.keys.clone(),
        name.to_string(),
        cfg,
    )
    .await
    .unwrap();
    w.refresh_streams().await.unwrap();
    w
}

/// Buys `n` units for users 1..=n; returns the confirmed order ids.
async fn buy(app: &TestApp, id: i64, n: i64) -> HashSet<String> {
    let answers = join_all((1..=n).map(|u| app.purchase(id, u))).await;
    answers
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, StatusCode::OK, "{body}");
            body["order_id"].as_str().unwrap().to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_worker_killed_before_acknowledging_are_claimed_and_persisted_once() {
    // The gateway runs without workers: the test plays them by hand.
    let mut app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(40, 1).await;
    let confirmed = buy(&app, id, 40).await;
    let never = CancellationToken::new();

    // Worker A reads 20 entries and dies before writing them.
    let mut a = worker(&app, "doomed-a", config(20, Duration::from_millis(300))).await;
    let read_by_a = a.read_new().await.unwrap();
    assert_eq!(read_by_a.len(), 20);
    drop(a);

    // Worker B reads the other 20, commits them, and dies before the XACK.
    let mut b = worker(&app, "doomed-b", config(20, Duration::from_millis(300))).await;
    let read_by_b = b.read_new().await.unwrap();
    assert_eq!(read_by_b.len(), 20);
    assert_eq!(b.persist(&read_by_b, &never).await.unwrap().rows, 20);
    drop(b);

    assert_eq!(app.order_rows(id).await, 20);
    assert_eq!(
        app.pending_count(id).await,
        40,
        "all 40 entries are still unacknowledged"
    );

    // A healthy worker claims all 40 once they are idle long enough.
    let c = worker(&app, "survivor", config(500, Duration::from_millis(300))).await;
    let stop = CancellationToken::new();
    let running = tokio::spawn(c.run(stop.clone()));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.pending_count(id).await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.await.unwrap();

    let stored = order_ids(&app.db, id).await;
    let distinct: HashSet<String> = stored.iter().cloned().collect();
    println!(
        "worker crash: 40 confirmed, {} rows, {} distinct, {} pending",
        stored.len(),
        distinct.len(),
        app.pending_count(id).await
    );
    assert_eq!(stored.len(), 40, "no duplicate and none missing");
    assert_eq!(distinct, confirmed);
    assert_eq!(app.pending_count(id).await, 0);
    let stats = app.stats(id).await;
    assert_eq!(
        stats["in_stream"], 0,
        "acknowledged entries are deleted from the stream"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_order_is_skipped_not_inserted_twice() {
    let mut app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    buy(&app, id, 5).await;
    let never = CancellationToken::new();
    let mut w = worker(&app, "w", config(10, Duration::from_secs(60))).await;
    let entries = w.read_new().await.unwrap();
    assert_eq!(w.persist(&entries, &never).await.unwrap().rows, 5);
    // The same batch again, as after a crash before the XACK: nothing new,
    // and no error that would stall the stream.
    assert_eq!(w.persist(&entries, &never).await.unwrap().rows, 0);
    w.ack(&entries, &[], &never).await.unwrap();
    assert_eq!(app.order_rows(id).await, 5);
    assert_eq!(app.pending_count(id).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_mixing_written_and_new_orders_writes_only_the_new_ones() {
    let mut app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    buy(&app, id, 5).await;
    let never = CancellationToken::new();
    let mut w = worker(&app, "w", config(10, Duration::from_secs(60))).await;
    let entries = w.read_new().await.unwrap();
    assert_eq!(entries.len(), 5);
    // Two of them were written before a crash; the redelivered batch holds
    // them and three new ones: the binary COPY fails on the two, and the
    // retry that skips conflicts writes exactly the three.
    assert_eq!(w.persist(&entries[..2], &never).await.unwrap().rows, 2);
    assert_eq!(w.persist(&entries, &never).await.unwrap().rows, 3);
    w.ack(&entries, &[], &never).await.unwrap();
    assert_eq!(app.order_rows(id).await, 5);
    let stored: HashSet<String> = order_ids(&app.db, id).await.into_iter().collect();
    let sent: HashSet<String> = entries
        .iter()
        .map(|e| e.message.as_ref().unwrap().order_id.clone())
        .collect();
    assert_eq!(stored, sent);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_entry_goes_to_the_dead_letter_stream_and_the_rest_is_persisted() {
    let mut app =
        spawn_app_with(Role::Serve, |s| s.worker_block = Duration::from_millis(100)).await;
    let id = app.active_promotion(10, 1).await;
    let mut conn = app.redis.clone();
    let _: String = redis::cmd("XADD")
        .arg(app.keys.promotion(id).orders)
        .arg("*")
        .arg("order_id")
        .arg("garbage")
        .arg("user_id")
        .arg("not-a-number")
        .query_async(&mut conn)
        .await
        .unwrap();
    let confirmed = buy(&app, id, 3).await;

    assert_eq!(app.wait_for_rows(id, 3, Duration::from_secs(20)).await, 3);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while app.pending_count(id).await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        app.pending_count(id).await,
        0,
        "the bad entry does not stay pending"
    );
    let dead: i64 = redis::cmd("XLEN")
        .arg(app.keys.dead_letters())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead, 1);
    let stored: HashSet<String> = order_ids(&app.db, id).await.into_iter().collect();
    assert_eq!(stored, confirmed);
    app.stop().await;
}
