//! Overlapping operations: recovery racing a cancel, two recoveries of one
//! promotion, a second order for a buyer's `seq`, several backlogged streams,
//! a replayed purchase call. Each interleaving is forced (a pause point the
//! test holds, or a state written by hand), never left to a sleep.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;
use seckill::checkpoint;
use seckill::orders::{Worker, WorkerConfig};
use seckill::recovery;
use seckill::stock::WorkerPool;
use seckill::stock::{Buyer, Outcome, Store};
use tokio_util::sync::CancellationToken;

use crate::helpers::{TestApp, code, spawn_app_with, spawn_with_settings, test_settings};
use crate::procs::{GatewayProc, RedisProc};

/// The test's view of Redis, through the program's own store.
fn store(app: &TestApp) -> Store {
    Store::new(app.redis.clone(), app.keys.clone())
}

/// Appends an order message to promotion `id`'s stream by hand, as the
/// purchase script would: `(order_id, promotion_id, user_id, seq)`.
async fn append_order(app: &TestApp, id: i64, order: &str, promotion: i64, user: i64, seq: i64) {
    let _: String = redis::cmd("XADD")
        .arg(app.keys.promotion(id).orders)
        .arg("*")
        .arg(&[
            ("order_id", order),
            ("promotion_id", &promotion.to_string()),
            ("user_id", &user.to_string()),
            ("seq", &seq.to_string()),
            ("price_cents", "100"),
            ("created_ms", "1700000000000"),
        ])
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
}

/// Polls `stats(id)[field]` until it equals `want` or `timeout` passes;
/// returns the last value seen.
async fn wait_for_stat(app: &TestApp, id: i64, field: &str, want: i64, timeout: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let seen = app.stats(id).await[field].as_i64().unwrap();
        if seen == want || tokio::time::Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn drift(app: &TestApp, id: i64) -> i64 {
    let rows = recovery::reconcile(&app.db, &store(app), Some(id), true)
        .await
        .unwrap();
    rows[0].drift
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_committed_while_recovery_runs_returns_its_unit_and_leaves_no_drift() {
    let app = spawn_app_with(Role::Serve, |s| {
        s.sweep_interval = Duration::from_millis(100);
    })
    .await;
    let id = app.active_promotion(10, 1).await;
    for user in 1..=2 {
        app.buy(id, user).await;
    }
    let order = app.buy(id, 3).await;
    assert_eq!(app.wait_for_rows(id, 3, Duration::from_secs(20)).await, 3);
    app.lose_promotion(id).await;

    // Recovery reads both stores, then is held before it writes anything.
    let hold = checkpoint::arm(&app.settings.key_prefix, recovery::AFTER_READ);
    let (db, s) = (app.db.clone(), store(&app));
    let recovering = tokio::spawn(async move { recovery::recover(&db, &s, Some(id)).await });
    hold.reached().await;
    // The buyer cancels in between: PostgreSQL has it, Redis has no state
    // to give the unit back to, and the recovery counted the order as sold.
    let (status, body) = app.order_action(&order, "cancel", 3).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    hold.release();
    let rebuilt = recovering.await.unwrap().unwrap();
    assert!(rebuilt[0].rebuilt, "{rebuilt:?}");

    // The unit comes back (the sweeper finishes the restock the cancel could
    // not do), exactly once.
    let remaining = wait_for_stat(&app, id, "remaining", 8, Duration::from_secs(15)).await;
    assert_eq!(remaining, 8, "10 units, 3 sold, 1 returned");
    // The restock records the returned unit in PostgreSQL right after the
    // script gave it back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let restocked = loop {
        let restocked: bool =
            sqlx::query_scalar("SELECT restocked_at IS NOT NULL FROM orders WHERE order_id = $1")
                .bind(&order)
                .fetch_one(&app.db)
                .await
                .unwrap();
        if restocked || tokio::time::Instant::now() >= deadline {
            break restocked;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(restocked);
    assert_eq!(drift(&app, id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_that_lost_its_lock_cannot_overwrite_buyers_after_the_sale_reopened() {
    let app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 2).await;
    let first = app.buy(id, 7).await;
    assert_eq!(app.wait_for_rows(id, 1, Duration::from_secs(20)).await, 1);
    app.lose_promotion(id).await;

    // Recovery B takes the lock, reads (one order of buyer 7), and stalls.
    let hold = checkpoint::arm(&app.settings.key_prefix, recovery::AFTER_READ);
    let (db, s) = (app.db.clone(), store(&app));
    let b = tokio::spawn(async move { recovery::recover(&db, &s, Some(id)).await });
    hold.reached().await;
    // A second recovery waits its turn while B holds the lock.
    let busy = recovery::recover(&app.db, &store(&app), Some(id))
        .await
        .unwrap();
    assert!(busy[0].busy && !busy[0].rebuilt, "{busy:?}");

    // B stalls past its lock's lifetime; recovery A rebuilds, the sale
    // reopens and buyer 7 buys a second unit.
    let _: i64 = redis::cmd("DEL")
        .arg(app.keys.promotion(id).recovering)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let a = recovery::recover(&app.db, &store(&app), Some(id))
        .await
        .unwrap();
    assert!(a[0].rebuilt, "{a:?}");
    let mut second = None;
    for _ in 0..100 {
        // The gateway's cache may still hold "unknown" for a moment.
        let (status, body) = app.purchase(id, 7).await;
        if status == StatusCode::OK {
            second = Some(body["order_id"].as_str().unwrap().to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = second.expect("buyer 7 buys a second unit once the sale reopened");

    // B wakes up: its writes are refused, so buyer 7's count stays 2.
    hold.release();
    let late = b.await.unwrap().unwrap();
    assert!(late[0].busy && !late[0].rebuilt, "{late:?}");
    let (status, body) = app.purchase(id, 7).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_purchased"),
        "the per-user limit of 2 still holds: {body}"
    );

    // Both confirmed orders reach PostgreSQL.
    assert_eq!(app.wait_for_rows(id, 2, Duration::from_secs(20)).await, 2);
    for order in [&first, &second] {
        assert!(app.order_status(order).await.is_some(), "{order} persisted");
    }
    assert_eq!(drift(&app, id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_taking_a_buyers_seq_twice_goes_to_the_dead_letter_stream_not_skipped() {
    let app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    let real = app.buy(id, 5).await;
    assert_eq!(app.wait_for_rows(id, 1, Duration::from_secs(20)).await, 1);

    // A second order for buyer 5's first unit, under another order id (what a
    // state rebuilt wrongly would let the script write).
    append_order(&app, id, "00000000-0000-7000-8000-000000000001", id, 5, 1).await;
    let mut conn = app.redis.clone();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let dead: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(app.keys.dead_letters())
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        if !dead.is_empty() || tokio::time::Instant::now() >= deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(dead.len(), 1, "the conflicting order is kept for a person");
    let text = format!("{dead:?}");
    assert!(
        text.contains("00000000-0000-7000-8000-000000000001"),
        "{text}"
    );
    assert_eq!(app.order_rows(id).await, 1);
    assert!(app.order_status(&real).await.is_some());
    let len: i64 = redis::cmd("XLEN")
        .arg(app.keys.promotion(id).orders)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(len, 0, "the entry is acknowledged, not retried forever");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_reading_several_backlogged_streams_persists_every_entry_it_read() {
    // No workers: the orders of two sales wait in their streams.
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let a = app.active_promotion(1_000, 1).await;
    let b = app.active_promotion(1_000, 1).await;
    let buyers = 300;
    let answers = join_all(
        (1..=buyers)
            .flat_map(|u| [(a, u), (b, u)])
            .map(|(id, u)| app.purchase(id, u)),
    )
    .await;
    assert!(answers.iter().all(|(s, _)| *s == StatusCode::OK));

    let mut worker = Worker::connect(
        WorkerPool::new(&app.settings.redis_url, 1, Duration::from_millis(100)).unwrap(),
        app.db.clone(),
        app.keys.clone(),
        "fresh".into(),
        WorkerConfig {
            batch: 100,
            block: Duration::from_millis(100),
            claim_idle: Duration::from_secs(60),
            claim_every: Duration::from_secs(60),
            refresh_every: Duration::from_secs(60),
            drain: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    worker.refresh_streams().await.unwrap();
    let never = CancellationToken::new();
    // One turn reads a batch from each stream; everything it read is written
    // and acknowledged, none is left pending for the 30 s claim.
    worker.step(&never).await.unwrap();
    let s = store(&app);
    for id in [a, b] {
        let (len, pending) = s.stream_depth(id).await.unwrap();
        assert_eq!(pending, 0, "promotion {id}: entries read but not written");
        assert_eq!(app.order_rows(id).await, 100, "promotion {id}");
        assert_eq!(len, buyers - 100, "promotion {id}");
    }
    // Both drain at the same pace to the end.
    for _ in 0..2 {
        worker.step(&never).await.unwrap();
    }
    for id in [a, b] {
        assert_eq!(app.order_rows(id).await, buyers, "promotion {id}");
    }
}

#[tokio::test]
async fn a_replayed_purchase_call_answers_bought_again_and_takes_nothing_twice() {
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(10, 3).await;
    let s = store(&app);
    let buyers = [
        Buyer {
            user_id: 1,
            order_id: "0190a000-0000-7000-8000-00000000000a".into(),
        },
        Buyer {
            user_id: 2,
            order_id: "0190a000-0000-7000-8000-00000000000b".into(),
        },
    ];
    let first = s.purchase(id, &buyers).await.unwrap();
    // The reply was lost; the same call is sent again, twice.
    let again = s.purchase(id, &buyers).await.unwrap();
    let third = s.purchase(id, &buyers[..1]).await.unwrap();
    assert!(first.iter().all(|o| matches!(o, Outcome::Bought { .. })));
    assert_eq!(again, first);
    assert_eq!(third, first[..1]);
    let counters = s.counters(id).await.unwrap();
    assert_eq!(counters.remaining, Some(8), "two units taken, once each");
    assert_eq!(counters.sold, 2);
    assert_eq!(counters.in_stream, 2, "one order message each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_between_a_cancels_commit_and_its_restock_reports_no_drift() {
    let app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    let order = app.buy(id, 1).await;
    assert_eq!(app.wait_for_rows(id, 1, Duration::from_secs(20)).await, 1);

    // The cancel is committed in PostgreSQL; its unit is not back yet.
    let hold = checkpoint::arm(
        &app.settings.key_prefix,
        seckill::orders::lifecycle::AFTER_CANCEL_COMMIT,
    );
    let cancel = {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/orders/{order}/cancel")),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(crate::helpers::user_token(1))
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    hold.reached().await;
    assert_eq!(
        drift(&app, id).await,
        0,
        "a unit on its way back is not drift"
    );
    hold.release();
    assert_eq!(cancel.await.unwrap(), StatusCode::OK);
    assert_eq!(app.stats(id).await["remaining"], 10);
    assert_eq!(drift(&app, id).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconcile_run_in_a_loop_during_a_sale_with_cancels_and_expiries_always_reports_zero() {
    let app = spawn_app_with(Role::Serve, |s| {
        s.payment_timeout = Duration::from_millis(700);
        s.sweep_interval = Duration::from_millis(50);
        s.worker_block = Duration::from_millis(50);
    })
    .await;
    let id = app.active_promotion(5_000, 1).await;
    let stop = CancellationToken::new();
    let reconciling = {
        let (db, s, stop) = (app.db.clone(), store(&app), stop.clone());
        tokio::spawn(async move {
            let mut runs = Vec::new();
            while !stop.is_cancelled() {
                let r = recovery::reconcile(&db, &s, Some(id), true).await.unwrap();
                runs.push(r[0].clone());
            }
            runs
        })
    };
    let mut user = 0;
    for _wave in 0..8 {
        let users: Vec<i64> = (0..150)
            .map(|_| {
                user += 1;
                user
            })
            .collect();
        let orders: Vec<(i64, String)> = join_all(users.iter().map(|u| {
            let app = &app;
            async move { (*u, app.buy(id, *u).await) }
        }))
        .await;
        // Every fifth buyer cancels; the others never pay, so they expire.
        join_all(
            orders
                .iter()
                .filter(|(u, _)| u % 5 == 0)
                .map(|(u, o)| app.order_action(o, "cancel", *u)),
        )
        .await;
    }
    // Let every unpaid order expire and come back while reconcile runs.
    let sold = user;
    let remaining = wait_for_stat(&app, id, "remaining", 5_000, Duration::from_secs(30)).await;
    stop.cancel();
    let runs = reconciling.await.unwrap();
    let drifting: Vec<_> = runs.iter().filter(|r| r.drift != 0).collect();
    let in_flight = runs.iter().filter(|r| r.unpersisted > 0).count();
    println!(
        "{} reconciles during a sale of {sold} orders; {in_flight} saw orders in the stream; {} drifted",
        runs.len(),
        drifting.len()
    );
    assert!(
        runs.len() >= 5,
        "reconcile ran during the sale: {}",
        runs.len()
    );
    assert!(drifting.is_empty(), "{drifting:#?}");
    assert_eq!(remaining, 5_000, "every unit came back");
    assert_eq!(drift(&app, id).await, 0);
}

#[tokio::test]
async fn reconcile_still_reports_a_lost_order_and_a_unit_marked_returned_but_not_back() {
    let app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    let kept = app.buy(id, 1).await;
    let cancelled = app.buy(id, 2).await;
    assert_eq!(app.wait_for_rows(id, 2, Duration::from_secs(20)).await, 2);
    // The rows commit before the workers acknowledge and delete the stream
    // entries; an entry still in the stream counts as on its way, not lost.
    let stream = app.keys.promotion(id).orders;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left: i64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(&mut app.redis.clone())
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} entries still in the stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        app.order_action(&cancelled, "cancel", 2).await.0,
        StatusCode::OK
    );
    assert_eq!(drift(&app, id).await, 0);

    // PostgreSQL loses an acknowledged order.
    sqlx::query("DELETE FROM orders WHERE order_id = $1")
        .bind(&kept)
        .execute(&app.db)
        .await
        .unwrap();
    let r = recovery::reconcile(&app.db, &store(&app), Some(id), true)
        .await
        .unwrap();
    assert_eq!((r[0].lost, r[0].drift), (1, 1), "{r:?}");

    // Redis forgets that the cancelled order's unit came back.
    let _: i64 = redis::cmd("SREM")
        .arg(app.keys.promotion(id).returned)
        .arg(&cancelled)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let r = recovery::reconcile(&app.db, &store(&app), Some(id), true)
        .await
        .unwrap();
    assert!(
        r[0].drift >= 3,
        "lost, the returned counter, the stranded unit: {r:?}"
    );
}

/// A gateway on a Redis of its own (so the test may pause it), and a
/// connection of the test's to that Redis.
async fn app_on_private_redis(
    role: Role,
    aof: bool,
    tweak: impl FnOnce(&mut seckill::config::Settings),
) -> (TestApp, RedisProc, redis::aio::MultiplexedConnection) {
    let redis = RedisProc::start(aof).await;
    let mut settings = test_settings();
    settings.redis_url = redis.url();
    tweak(&mut settings);
    let app = spawn_with_settings(role, settings).await;
    let admin = private_connection(&redis).await;
    (app, redis, admin)
}

async fn private_connection(redis: &RedisProc) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `CLIENT PAUSE … WRITE`: Redis holds every write (scripts included) until
/// [`resume`].
async fn pause_writes(admin: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "20000", "WRITE"])
        .query_async(admin)
        .await
        .unwrap();
}

async fn resume(admin: &mut redis::aio::MultiplexedConnection) {
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(admin)
        .await
        .unwrap();
}

/// Waits until the gateway's own Redis connection answers again (`/ready`
/// goes through it, after every command queued on it).
async fn wait_ready(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ready = app.client.get(app.url("/ready")).send().await;
        if matches!(&ready, Ok(r) if r.status() == StatusCode::OK) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_whose_preheat_reply_is_lost_leaves_the_promotion_in_neither_store() {
    let (app, _redis, mut admin) = app_on_private_redis(Role::GatewayOnly, false, |s| {
        s.redis_timeout = Duration::from_millis(300);
    })
    .await;
    let first = app.active_promotion(10, 1).await;

    // Redis holds every write: the preheat runs only after the gateway gave
    // up waiting for its reply.
    pause_writes(&mut admin).await;
    let (status, body) = app
        .admin(
            reqwest::Method::POST,
            "/admin/promotions",
            Some(crate::helpers::active_body(10, 1)),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    resume(&mut admin).await;
    wait_ready(&app).await;

    let lost = first + 1;
    let in_postgres: i64 = sqlx::query_scalar("SELECT count(*) FROM promotions WHERE id = $1")
        .bind(lost)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let k = app.keys.promotion(lost);
    let (meta, stock, live): (bool, bool, bool) = redis::pipe()
        .exists(&k.meta)
        .exists(&k.stock)
        .sismember(app.keys.live_promotions(), lost)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(
        (in_postgres, meta, stock, live),
        (0, false, false, false),
        "the failed creation left nothing behind"
    );
    let (status, _) = app.purchase(lost, 1).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_whose_preheat_fails_keeps_the_old_values_in_both_stores() {
    let (app, mut redis, mut admin) = app_on_private_redis(Role::GatewayOnly, true, |_| {}).await;
    // Every write reaches the AOF before its reply: kill -9 loses nothing.
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "appendfsync", "always"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut body = crate::helpers::active_body(10, 1);
    let now = chrono::Utc::now();
    body["starts_at"] = crate::helpers::rfc3339(now + chrono::Duration::hours(1)).into();
    body["ends_at"] = crate::helpers::rfc3339(now + chrono::Duration::hours(2)).into();
    let id = app.create_promotion(body).await["id"].as_i64().unwrap();

    redis.kill9();
    let (status, body) = app
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/promotions/{id}"),
            Some(serde_json::json!({"stock": 20})),
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    redis.restart().await;
    wait_ready(&app).await;
    let mut admin = private_connection(&redis).await;

    let (status, body) = app
        .admin(
            reqwest::Method::GET,
            &format!("/admin/promotions/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["stock"], 10, "PostgreSQL keeps the old stock: {body}");
    let in_redis: i64 = redis::cmd("HGET")
        .arg(app.keys.promotion(id).meta)
        .arg("stock")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(in_redis, 10, "Redis sells the same stock");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_of_a_promotion_postgres_does_not_know_is_dead_lettered_not_retried_forever() {
    let app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    append_order(
        &app,
        id,
        "00000000-0000-7000-8000-0000000000ff",
        987654,
        5,
        1,
    )
    .await;
    let mut conn = app.redis.clone();
    // A good order behind it is not held up.
    let good = app.buy(id, 1).await;
    assert_eq!(app.wait_for_rows(id, 1, Duration::from_secs(20)).await, 1);
    assert!(app.order_status(&good).await.is_some());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let dead: String = format!(
            "{:?}",
            redis::cmd("XRANGE")
                .arg(app.keys.dead_letters())
                .arg("-")
                .arg("+")
                .query_async::<redis::Value>(&mut conn)
                .await
                .unwrap()
        );
        if dead.contains("0000000000ff") || tokio::time::Instant::now() >= deadline {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(dead.contains("the promotion does not exist"), "{dead}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_shutdown_the_workers_persist_every_purchase_answered_while_http_drained() {
    let (mut app, _redis, mut admin) = app_on_private_redis(Role::Serve, false, |s| {
        s.redis_timeout = Duration::from_secs(20);
        s.worker_block = Duration::from_millis(50);
    })
    .await;
    let id = app.active_promotion(1_000, 1).await;
    app.buy(id, 1).await;

    // Purchases are held in Redis, in flight, when the stop comes.
    pause_writes(&mut admin).await;
    let buying: Vec<_> = (2..=41)
        .map(|user| {
            let (client, url) = (
                app.client.clone(),
                app.url(&format!("/api/promotions/{id}/purchase")),
            );
            tokio::spawn(async move {
                client
                    .post(url)
                    .bearer_auth(crate::helpers::user_token(user))
                    .json(&serde_json::json!({}))
                    .send()
                    .await
                    .map(|r| r.status())
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut admin)
            .await
            .unwrap();
        if clients
            .lines()
            .any(|l| l.contains("flags=b") && l.contains("cmd=evalsha"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no purchase reached redis"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Stop: the gateway no longer accepts, and the held purchases complete.
    let addr = app.addr;
    let stopping = async {
        app.stop().await;
    };
    let release = async {
        while tokio::net::TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        resume(&mut admin).await;
    };
    tokio::join!(stopping, release);
    let mut answered = 1;
    for b in buying {
        if let Ok(Ok(status)) = b.await
            && status == StatusCode::OK
        {
            answered += 1;
        }
    }
    assert!(answered > 1, "purchases were answered during the drain");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE promotion_id = $1")
        .bind(id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(
        rows, answered,
        "every 200 is in PostgreSQL when the process returns"
    );
}

#[tokio::test]
async fn cancelling_an_older_order_still_on_its_way_is_order_pending_not_404() {
    // No workers: both orders stay in the stream.
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(10, 2).await;
    let older = app.buy(id, 4).await;
    let _latest = app.buy(id, 4).await;
    let (status, body) = app.order_action(&older, "cancel", 4).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "order_pending"),
        "{body}"
    );
    // Another buyer learns nothing about it.
    let (status, _) = app.order_action(&older, "cancel", 5).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_promotion_redis_lost_but_postgres_knows_is_503_with_retry_after_not_404() {
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    // Redis loses it before this gateway ever cached its meta.
    app.lose_promotion(id).await;
    let res = app
        .client
        .post(app.url(&format!("/api/promotions/{id}/purchase")))
        .bearer_auth(crate::helpers::user_token(1))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().contains_key("retry-after"));
    // A promotion nobody created is still 404.
    let (status, body) = app.purchase(id + 100, 1).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    // Once recovery rebuilt it, it sells.
    recovery::recover(&app.db, &store(&app), Some(id))
        .await
        .unwrap();
    let mut sold = false;
    for _ in 0..100 {
        if app.purchase(id, 1).await.0 == StatusCode::OK {
            sold = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sold);
}

#[tokio::test]
async fn ended_promotions_with_drained_streams_and_idle_consumers_are_pruned() {
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let drained = app.active_promotion(10, 1).await;
    let backlogged = app.active_promotion(10, 1).await;
    let running = app.active_promotion(10, 1).await;
    app.buy(backlogged, 1).await;
    let s = store(&app);
    let mut conn = app.redis.clone();
    // Two promotions end; one still has an order waiting in its stream.
    let ended = chrono::Utc::now() - chrono::Duration::minutes(5);
    for id in [drained, backlogged] {
        let _: i64 = redis::cmd("HSET")
            .arg(app.keys.promotion(id).meta)
            .arg("ends_ms")
            .arg(ended.timestamp_millis())
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    // A consumer of a process long gone, and one holding an entry.
    let running_stream = app.keys.promotion(running).orders;
    let _: i64 = redis::cmd("XGROUP")
        .arg(&[
            "CREATECONSUMER",
            &running_stream,
            app.keys.consumer_group(),
            "gone",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let backlogged_stream = app.keys.promotion(backlogged).orders;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg(&[
            "GROUP",
            app.keys.consumer_group(),
            "holder",
            "COUNT",
            "1",
            "STREAMS",
        ])
        .arg(&backlogged_stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();

    let removed = seckill::orders::worker::prune_once(&s, chrono::Utc::now(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(removed, vec![drained]);
    let live = s.live_promotions().await.unwrap();
    assert_eq!(live, vec![backlogged, running]);
    let consumers = |stream: String| {
        let mut conn = app.redis.clone();
        let group = app.keys.consumer_group();
        async move {
            let v: redis::Value = redis::cmd("XINFO")
                .arg(&["CONSUMERS", &stream, group])
                .query_async(&mut conn)
                .await
                .unwrap();
            format!("{v:?}")
        }
    };
    assert!(!consumers(running_stream).await.contains("gone"));
    assert!(
        consumers(backlogged_stream).await.contains("holder"),
        "a consumer holding an entry stays"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovery_of_tens_of_thousands_of_orders_rebuilds_exact_counts_chunk_by_chunk() {
    // No workers: the stream keeps what the test appends.
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(100_000, 2).await;
    // 30,000 orders in PostgreSQL: 15,000 buyers with two each, every tenth
    // order cancelled.
    sqlx::query(
        "INSERT INTO orders (order_id, promotion_id, user_id, seq, price_cents, created_at, status) \
         SELECT 'o-' || n, $1, (n + 1) / 2, 2 - (n % 2), 100, now(), \
                CASE WHEN n % 10 = 0 THEN 'cancelled' ELSE 'pending' END \
         FROM generate_series(1, 30000) AS n",
    )
    .bind(id)
    .execute(&app.db)
    .await
    .unwrap();
    // Redis loses the sale state; the stream it rebuilds from still holds one
    // order PostgreSQL has and two it does not (a new buyer's).
    app.lose_promotion(id).await;
    let mut conn = app.redis.clone();
    for (order, user, seq) in [("o-29999", 15000, 1), ("s-1", 20001, 1), ("s-2", 20001, 2)] {
        append_order(&app, id, order, id, user, seq).await;
    }
    let r = recovery::recover(&app.db, &store(&app), Some(id))
        .await
        .unwrap();
    assert!(r[0].rebuilt, "{r:?}");
    assert_eq!((r[0].sold, r[0].returned), (30_002, 3_000), "{r:?}");
    let c = store(&app).counters(id).await.unwrap();
    assert_eq!(c.remaining, Some(100_000 - 30_002 + 3_000));
    let buyers: i64 = redis::cmd("HLEN")
        .arg(app.keys.promotion(id).buyers)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(buyers, 15_001);
    let latest: String = redis::cmd("HGET")
        .arg(app.keys.promotion(id).results)
        .arg(20001)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(latest, "s-2");
    let restocked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE promotion_id = $1 AND restocked_at IS NOT NULL",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    assert_eq!(restocked, 3_000);
    assert_eq!(drift(&app, id).await, 0);
}

/// libfaketime, which scripts/test.sh installs: a process started with it
/// preloaded sees its wall clock shifted.
fn libfaketime() -> &'static str {
    const PATHS: [&str; 2] = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ];
    PATHS
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("libfaketime is installed (scripts/test.sh installs it)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_with_skewed_clocks_refuse_no_one_early_the_window_is_redis_s() {
    let settings = test_settings();
    let skewed = |shift: &'static str| {
        let settings = settings.clone();
        async move {
            GatewayProc::start(
                &settings,
                &[
                    ("LD_PRELOAD", libfaketime()),
                    ("FAKETIME", shift),
                    ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
                ],
            )
            .await
        }
    };
    // One gateway runs 30 s late, one 30 s early.
    let late = skewed("-30s").await;
    let early = skewed("+30s").await;
    let client = reqwest::Client::new();
    let now = chrono::Utc::now();
    let window = |from: i64, to: i64| {
        let mut body = crate::helpers::active_body(10, 1);
        body["starts_at"] = crate::helpers::rfc3339(now + chrono::Duration::seconds(from)).into();
        body["ends_at"] = crate::helpers::rfc3339(now + chrono::Duration::seconds(to)).into();
        body
    };
    let create = |gateway: &GatewayProc, body: serde_json::Value| {
        let req = client
            .post(format!("http://{}/admin/promotions", gateway.addr))
            .bearer_auth(crate::helpers::ADMIN_TOKEN)
            .json(&body);
        async move {
            let v: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            v["id"].as_i64().expect("created")
        }
    };
    let buy = |gateway: &GatewayProc, id: i64, user: i64| {
        let req = client
            .post(format!(
                "http://{}/api/promotions/{id}/purchase",
                gateway.addr
            ))
            .bearer_auth(crate::helpers::user_token(user))
            .json(&serde_json::json!({}));
        async move { req.send().await.unwrap().status() }
    };
    // Started 5 s ago: the late gateway's own clock says 25 s to go.
    let started = create(&late, window(-5, 3600)).await;
    assert_eq!(buy(&late, started, 1).await, StatusCode::OK);
    // Ends in 20 s: the early gateway's own clock says it ended 10 s ago.
    let open = create(&early, window(-60, 20)).await;
    assert_eq!(buy(&early, open, 2).await, StatusCode::OK);
    // And a sale not started by Redis's clock is refused by both.
    let later = create(&late, window(5, 3600)).await;
    for g in [&late, &early] {
        assert_eq!(buy(g, later, 3).await, StatusCode::FORBIDDEN);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buyer_answered_503_after_a_lost_reply_learns_the_truth_from_result() {
    let (app, _redis, mut admin) = app_on_private_redis(Role::Serve, false, |s| {
        s.redis_timeout = Duration::from_millis(300);
    })
    .await;
    let id = app.active_promotion(10, 1).await;
    app.buy(id, 1).await;
    // The script runs only after the gateway gave up waiting for its reply.
    pause_writes(&mut admin).await;
    let (status, body) = app.purchase(id, 2).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    resume(&mut admin).await;
    wait_ready(&app).await;

    // The unit was taken after all: /result says so, with the order id.
    let res = app
        .client
        .get(app.url(&format!("/api/promotions/{id}/result")))
        .bearer_auth(crate::helpers::user_token(2))
        .send()
        .await
        .unwrap();
    let (status, body) = crate::helpers::read(res).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_ne!(body["status"], "none", "{body}");
    let order = body["order_id"].as_str().expect("an order id").to_string();
    assert_eq!(app.wait_for_rows(id, 2, Duration::from_secs(20)).await, 2);
    assert!(app.order_status(&order).await.is_some());
    assert_eq!(app.stats(id).await["remaining"], 8);
}
