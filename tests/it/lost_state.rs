//! A promotion on sale whose Redis state is lost, whole or in part (a
//! failover to a replica that missed the preheat leaves a meta hash holding
//! only counters), is never sold from what is left, and the background side
//! rebuilds it from PostgreSQL so the sale goes on by itself
//! (`recovery::recover_on_sale`, every `SECKILL_RECOVER_INTERVAL_MS`).

use std::time::Duration;

use reqwest::StatusCode;
use seckill::app::Role;

use crate::helpers::*;

/// Buys for users from `first` on, one each, until one is answered `200`;
/// every other answer must be the `503` of a state not loaded. Returns the
/// `503`s seen.
async fn buy_until_sold(app: &TestApp, id: i64, first: i64) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut unavailable = 0;
    for user in first.. {
        let (status, body) = app.purchase(id, user).await;
        match status {
            StatusCode::OK => return unavailable,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(code(&body), "unavailable", "{body}");
                unavailable += 1;
            }
            other => panic!("a lost state answers 503 or, rebuilt, 200; got {other}: {body}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the promotion was never rebuilt"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

/// Leaves promotion `id`'s meta hash as a replica that missed the preheat
/// but got the purchases holds it: `sold` alone (the other keys are there).
async fn leave_counters_only(app: &TestApp, id: i64, sold: i64) {
    let meta = app.keys.promotion(id).meta;
    let _: () = redis::pipe()
        .atomic()
        .del(&meta)
        .hset(&meta, "sold", sold)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_on_sale_whose_redis_state_is_lost_is_rebuilt_by_the_background_and_sells_exactly_its_stock()
 {
    let mut app = spawn_app_with(Role::Serve, |s| {
        s.recover_interval = Duration::from_millis(200);
        s.cache_ttl = Duration::from_millis(100);
    })
    .await;
    let id = app.active_promotion(10, 1).await;
    for user in 1..=4 {
        app.buy(id, user).await;
    }
    assert_eq!(app.wait_for_rows(id, 4, Duration::from_secs(20)).await, 4);

    app.lose_promotion(id).await;
    let unavailable = buy_until_sold(&app, id, 100).await;
    println!("lost state: {unavailable} purchases answered 503 before the rebuild");

    // The rebuilt state knows the 4 buyers before and the one after: the
    // promotion sells the 5 units left, and the earlier buyers stay refused.
    let (status, body) = app.purchase(id, 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_purchased")
    );
    let mut sold = 5;
    for user in 200..260 {
        let (status, _) = app.purchase(id, user).await;
        if status == StatusCode::OK {
            sold += 1;
        }
    }
    assert_eq!(sold, 10, "exactly the stock, never more");
    assert_eq!(app.wait_for_rows(id, 10, Duration::from_secs(20)).await, 10);
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meta_hash_holding_only_counters_is_not_loaded_and_is_rebuilt_whole() {
    let mut app = spawn_app_with(Role::Serve, |s| {
        s.recover_interval = Duration::from_millis(200);
        s.cache_ttl = Duration::from_millis(100);
    })
    .await;
    let id = app.active_promotion(10, 1).await;
    for user in 1..=3 {
        app.buy(id, user).await;
    }
    assert_eq!(app.wait_for_rows(id, 3, Duration::from_secs(20)).await, 3);

    leave_counters_only(&app, id, 3).await;

    let unavailable = buy_until_sold(&app, id, 100).await;
    println!("counters-only meta: {unavailable} purchases answered 503 before the rebuild");
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(app.keys.promotion(id).meta)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    for field in [
        "id",
        "starts_ms",
        "ends_ms",
        "limit",
        "stock",
        "sold",
        "returned",
    ] {
        assert!(names.contains(&field), "{field} rebuilt: {fields:?}");
    }
    let stats = app.stats(id).await;
    assert_eq!(stats["sold"], 4, "{stats}");
    assert_eq!(stats["remaining"], 6, "{stats}");
    assert_eq!(app.wait_for_rows(id, 4, Duration::from_secs(20)).await, 4);
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_counters_only_meta_answers_not_loaded_until_recover_rebuilds_it() {
    // No background rebuild here: what the purchase script and the CLI do.
    let mut app = spawn_app_with(Role::Serve, |s| {
        s.cache_ttl = Duration::from_millis(100);
    })
    .await;
    let id = app.active_promotion(5, 1).await;
    app.buy(id, 1).await;
    assert_eq!(app.wait_for_rows(id, 1, Duration::from_secs(20)).await, 1);
    leave_counters_only(&app, id, 1).await;
    tokio::time::sleep(app.settings.cache_ttl + Duration::from_millis(50)).await;
    let (status, body) = app.purchase(id, 2).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "not sold from a meta without its window: {body}"
    );
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 1, "reconcile sees the loss: {out}");
    let (rc, out) = app.cli(&["recover", "--promotion", &id.to_string()]).await;
    assert_eq!(rc, 0, "{out}");
    assert!(out.contains("yes"), "rebuilt: {out}");
    tokio::time::sleep(app.settings.cache_ttl + Duration::from_millis(50)).await;
    let (status, body) = app.purchase(id, 2).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(app.wait_for_rows(id, 2, Duration::from_secs(20)).await, 2);
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}
