//! The order lifecycle: pay, cancel and the payment timeout; no unit stays
//! unsold after a cancel, none is returned twice, and a payment racing its
//! expiry ends in exactly one outcome.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;

use crate::helpers::{code, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_unit_is_sold_to_the_next_buyer_and_the_canceller_cannot_rebuy() {
    // A long sold-out flag TTL: only the pub/sub invalidation can clear it in time.
    let mut app = spawn_app_with(Role::Serve, |s| s.sold_out_ttl = Duration::from_secs(120)).await;
    let id = app.active_promotion(1, 1).await;

    let order_a = app.buy(id, 1).await;
    let (status, body) = app.purchase(id, 2).await;
    assert_eq!((status, code(&body)), (StatusCode::GONE, "sold_out"));

    // Cancel answers `409 order_pending` at once until the row is written.
    app.wait_for_rows(id, 1, Duration::from_secs(20)).await;
    let (status, body) = app.order_action(&order_a, "cancel", 1).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(body["order_id"], order_a.as_str());

    let (status, body) = app
        .purchase_until_not_sold_out(id, 2, Duration::from_secs(5))
        .await;
    assert_eq!(status, StatusCode::OK, "B buys the returned unit: {body}");

    let (status, body) = app.purchase(id, 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_purchased")
    );
    app.wait_for_rows(id, 2, Duration::from_secs(20)).await;
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_expires_and_its_unit_is_sold_again() {
    let mut app = spawn_app_with(Role::Serve, |s| {
        s.payment_timeout = Duration::from_secs(1);
        s.sweep_interval = Duration::from_millis(100);
        s.sold_out_ttl = Duration::from_secs(120);
    })
    .await;
    let id = app.active_promotion(1, 1).await;

    let order_a = app.buy(id, 1).await;
    let (status, _) = app.purchase(id, 2).await;
    assert_eq!(status, StatusCode::GONE);

    let (status, body) = app
        .purchase_until_not_sold_out(id, 2, Duration::from_secs(10))
        .await;
    assert_eq!(status, StatusCode::OK, "B buys the expired unit: {body}");
    assert_eq!(
        app.order_status(&order_a).await.as_deref(),
        Some("cancelled")
    );

    let (status, body) = app.order_action(&order_a, "pay", 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "order_cancelled")
    );
    let (status, body) = app.purchase(id, 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_purchased")
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pay_racing_the_expiry_sweeper_ends_paid_xor_cancelled_with_stock_returned() {
    const N: i64 = 200;
    let timeout = Duration::from_secs(2);
    let mut app = spawn_app_with(Role::Serve, |s| {
        s.payment_timeout = timeout;
        s.sweep_interval = Duration::from_millis(5);
    })
    .await;
    let id = app.active_promotion(N, 1).await;
    let orders = join_all((1..=N).map(|u| app.buy(id, u))).await;
    assert_eq!(app.wait_for_rows(id, N, Duration::from_secs(20)).await, N);

    // Each payment lands at a different moment around its own deadline,
    // from 150 ms before to 150 ms after.
    let created: Vec<chrono::DateTime<chrono::Utc>> = {
        let mut v = Vec::new();
        for o in &orders {
            v.push(
                sqlx::query_scalar("SELECT created_at FROM orders WHERE order_id = $1")
                    .bind(o)
                    .fetch_one(&app.db)
                    .await
                    .unwrap(),
            );
        }
        v
    };
    let answers = join_all(
        orders
            .iter()
            .zip(&created)
            .enumerate()
            .map(|(i, (order, at))| {
                let app = &app;
                let offset_ms = (i as i64 * 300 / N) - 150;
                let due = *at
                    + chrono::Duration::from_std(timeout).unwrap()
                    + chrono::Duration::milliseconds(offset_ms);
                async move {
                    let wait = (due - chrono::Utc::now()).to_std().unwrap_or_default();
                    tokio::time::sleep(wait).await;
                    app.order_action(order, "pay", (i + 1) as i64).await
                }
            }),
    )
    .await;

    // Let the sweeper finish anything left.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut paid, mut cancelled) = (0, 0);
    for (order, (status, body)) in orders.iter().zip(&answers) {
        let stored = app.order_status(order).await.unwrap();
        match *status {
            StatusCode::OK => {
                assert_eq!(stored, "paid", "a 200 pay is paid in PostgreSQL");
                paid += 1;
            }
            StatusCode::CONFLICT => {
                assert_eq!(code(body), "order_cancelled");
                assert_eq!(stored, "cancelled", "a refused pay is cancelled");
                cancelled += 1;
            }
            other => panic!("unexpected pay answer {other}: {body}"),
        }
    }
    let restocked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM orders WHERE promotion_id = $1 AND status = 'cancelled' AND restocked_at IS NOT NULL",
    )
    .bind(id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    let stats = app.stats(id).await;
    println!(
        "pay vs expiry, {N} orders: {paid} paid, {cancelled} cancelled, remaining {}",
        stats["remaining"]
    );
    assert_eq!(paid + cancelled, N);
    assert_eq!(
        restocked, cancelled,
        "every cancelled order's unit came back"
    );
    assert_eq!(
        stats["remaining"], cancelled,
        "stock arithmetic: the returned units and no more"
    );
    assert_eq!(stats["paid"], paid);
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_one_order_ten_times_at_once_returns_its_unit_once() {
    let mut app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    let order = app.buy(id, 9).await;
    app.wait_for_rows(id, 1, Duration::from_secs(20)).await;

    let answers = join_all((0..10).map(|_| app.order_action(&order, "cancel", 9))).await;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "cancelled");
    }
    let stats = app.stats(id).await;
    assert_eq!(
        stats["remaining"], 5,
        "4 left after the sale, plus exactly one returned"
    );
    assert_eq!(stats["cancelled"], 1);
    let mut conn = app.redis.clone();
    let returned: i64 = redis::cmd("HGET")
        .arg(app.keys.promotion(id).meta)
        .arg("returned")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(returned, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_and_cancel_follow_the_order_rules() {
    let mut app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    let paid = app.buy(id, 1).await;
    let cancelled = app.buy(id, 2).await;
    app.wait_for_rows(id, 2, Duration::from_secs(20)).await;

    // Another user's order does not exist for you.
    let (status, body) = app.order_action(&paid, "pay", 2).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = app.order_action(&paid, "cancel", 2).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));

    let (status, body) = app.order_action(&paid, "pay", 1).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "paid");
    assert_eq!(body["price_cents"], 99900);
    let (status, body) = app.order_action(&paid, "pay", 1).await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &serde_json::json!("paid")),
        "paying twice is harmless"
    );
    let (status, body) = app.order_action(&paid, "cancel", 1).await;
    assert_eq!((status, code(&body)), (StatusCode::CONFLICT, "order_paid"));

    let (status, _) = app.order_action(&cancelled, "cancel", 2).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.order_action(&cancelled, "pay", 2).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "order_cancelled")
    );

    let (status, body) = app.order_action("no-such-order", "pay", 1).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let (status, body) = app.order_action("bad%20id", "pay", 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::BAD_REQUEST, "invalid_id")
    );

    let stats = app.stats(id).await;
    assert_eq!(
        (stats["paid"].as_i64(), stats["cancelled"].as_i64()),
        (Some(1), Some(1))
    );
    assert_eq!(stats["remaining"], 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_a_promotion_is_rebuilt_by_recover() {
    let mut app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    for user in 1..=4 {
        app.buy(id, user).await;
    }
    let cancelled = app.buy(id, 5).await;
    app.wait_for_rows(id, 5, Duration::from_secs(20)).await;
    assert_eq!(
        app.order_action(&cancelled, "cancel", 5).await.0,
        StatusCode::OK
    );

    // Redis loses every key of the promotion.
    app.lose_promotion(id).await;
    let (status, body) = app.purchase(id, 6).await;
    assert!(
        status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE,
        "{status} {body}"
    );
    assert_ne!(status, StatusCode::OK, "nothing is sold from a lost state");
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 1, "reconcile sees the loss: {out}");

    let (rc, out) = app.cli(&["recover", "--promotion", &id.to_string()]).await;
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("yes"), "{out}");
    let (rc, again) = app.cli(&["recover", "--promotion", &id.to_string()]).await;
    assert_eq!(rc, 0);
    assert!(
        again.contains(" no "),
        "a second run changes nothing: {again}"
    );

    let stats = app.stats(id).await;
    assert_eq!(stats["remaining"], 10 - 5 + 1);
    assert_eq!(stats["sold"], 5);

    // Give the local meta cache its TTL to forget the miss.
    tokio::time::sleep(app.settings.cache_ttl + Duration::from_millis(100)).await;
    for buyer in [1, 5] {
        let (status, body) = app.purchase(id, buyer).await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::CONFLICT, "already_purchased"),
            "buyer {buyer}"
        );
    }
    assert_eq!(app.purchase(id, 6).await.0, StatusCode::OK);
    app.wait_for_rows(id, 6, Duration::from_secs(20)).await;
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_drift_when_redis_stock_is_tampered_with() {
    let mut app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    app.buy(id, 1).await;
    app.wait_for_rows(id, 1, Duration::from_secs(20)).await;
    let (rc, out) = app.cli(&["reconcile"]).await;
    assert_eq!(rc, 0, "{out}");

    let mut conn = app.redis.clone();
    let _: i64 = redis::cmd("INCR")
        .arg(app.keys.promotion(id).stock)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (rc, out) = app.cli(&["reconcile"]).await;
    assert_eq!(rc, 1, "{out}");
    assert!(out.contains("drift found"), "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_an_order_still_in_the_stream_answers_409_order_pending() {
    // No workers: the order stays in the stream.
    let mut app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    let order = app.buy(id, 1).await;

    let (status, body) = app.order_action(&order, "pay", 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "order_pending")
    );
    let (status, body) = app.order_action(&order, "cancel", 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "order_pending")
    );
    // Someone else's pending order is not theirs to know about.
    let (status, body) = app.order_action(&order, "pay", 2).await;
    assert_eq!((status, code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    assert_eq!(app.order_rows(id).await, 0);
    app.stop().await;
}
