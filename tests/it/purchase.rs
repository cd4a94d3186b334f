//! The purchase path under concurrency: no oversell, the per-user limit
//! holds, every winner's order reaches PostgreSQL.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;

use crate::helpers::{code, spawn_app, spawn_with_settings, test_settings};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_buyers_race_for_fifty_units_and_exactly_fifty_win() {
    let mut app = spawn_app().await;
    let id = app.active_promotion(50, 1).await;

    let answers = join_all((1..=500).map(|user| app.purchase(id, user))).await;

    let mut order_ids = HashSet::new();
    let (mut won, mut sold_out) = (0, 0);
    for (status, body) in &answers {
        match *status {
            StatusCode::OK => {
                won += 1;
                assert_eq!(body["status"], "pending");
                order_ids.insert(body["order_id"].as_str().unwrap().to_string());
            }
            StatusCode::GONE => {
                assert_eq!(code(body), "sold_out");
                sold_out += 1;
            }
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
    println!(
        "500 buyers, 50 units: {won} x 200, {sold_out} x 410, {} distinct order ids",
        order_ids.len()
    );
    assert_eq!(won, 50);
    assert_eq!(sold_out, 450);
    assert_eq!(order_ids.len(), 50, "order ids are distinct");

    let rows = app.wait_for_rows(id, 50, Duration::from_secs(20)).await;
    assert_eq!(rows, 50, "every winner's order is persisted");
    let stats = app.stats(id).await;
    assert_eq!(stats["remaining"], 0);
    assert_eq!(stats["sold"], 50);
    assert_eq!(stats["persisted"], 50);

    let stored: Vec<String> =
        sqlx::query_scalar("SELECT order_id FROM orders WHERE promotion_id = $1")
            .bind(id)
            .fetch_all(&app.db)
            .await
            .unwrap();
    let stored: HashSet<String> = stored.into_iter().collect();
    assert_eq!(
        stored, order_ids,
        "PostgreSQL holds exactly the confirmed order ids"
    );
    app.stop().await;
}

async fn one_buyer_sends_sixty_concurrent_purchases(per_user_limit: i64) {
    let mut app = spawn_app().await;
    let id = app.active_promotion(100, per_user_limit).await;

    let answers = join_all((0..60).map(|_| app.purchase(id, 7))).await;
    let won = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let refused = answers
        .iter()
        .filter(|(s, b)| *s == StatusCode::CONFLICT && code(b) == "already_purchased")
        .count();
    println!(
        "one buyer, limit {per_user_limit}, 60 concurrent purchases: {won} x 200, {refused} x 409"
    );
    assert_eq!(won as i64, per_user_limit);
    assert_eq!(refused as i64, 60 - per_user_limit);

    let rows = app
        .wait_for_rows(id, per_user_limit, Duration::from_secs(20))
        .await;
    assert_eq!(rows, per_user_limit);
    let stats = app.stats(id).await;
    assert_eq!(
        stats["remaining"],
        100 - per_user_limit,
        "a refused repeat buyer burns no unit"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_user_limit_one_holds_under_sixty_concurrent_purchases() {
    one_buyer_sends_sixty_concurrent_purchases(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_user_limit_three_holds_under_sixty_concurrent_purchases() {
    one_buyer_sends_sixty_concurrent_purchases(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_on_one_redis_never_oversell() {
    let settings = test_settings();
    let mut a = spawn_with_settings(Role::Serve, settings.clone()).await;
    let mut b = spawn_with_settings(Role::GatewayOnly, settings).await;
    let id = a.active_promotion(30, 1).await;

    let answers = join_all((1..=300).map(|user| {
        let gw = if user % 2 == 0 { &a } else { &b };
        gw.purchase(id, user)
    }))
    .await;
    let won = answers.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    assert_eq!(won, 30);
    assert!(
        answers
            .iter()
            .all(|(s, _)| *s == StatusCode::OK || *s == StatusCode::GONE)
    );
    assert_eq!(a.wait_for_rows(id, 30, Duration::from_secs(20)).await, 30);
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_refused_for_sold_out_is_not_counted_as_a_buyer() {
    let mut app = spawn_app().await;
    let id = app.active_promotion(1, 1).await;
    assert_eq!(app.purchase(id, 1).await.0, StatusCode::OK);
    let (status, body) = app.purchase(id, 2).await;
    assert_eq!((status, code(&body)), (StatusCode::GONE, "sold_out"));

    let mut conn = app.redis.clone();
    let counted: Option<i64> = redis::cmd("HGET")
        .arg(app.keys.promotion(id).buyers)
        .arg(2)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counted, None, "buyer 2 took nothing and is not marked");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_moves_from_none_to_confirmed_and_orders_list_the_purchase() {
    let mut app = spawn_app().await;
    let id = app.active_promotion(5, 1).await;
    let token = crate::helpers::user_token(11);
    let result = |app: &crate::helpers::TestApp| {
        let req = app
            .client
            .get(app.url(&format!("/api/promotions/{id}/result")))
            .bearer_auth(&token);
        async move { crate::helpers::read(req.send().await.unwrap()).await }
    };

    let (status, body) = result(&app).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "none");
    assert!(body["order_id"].is_null());

    let (_, bought) = app.purchase(id, 11).await;
    let order_id = bought["order_id"].as_str().unwrap().to_string();
    let (_, body) = result(&app).await;
    assert!(
        body["status"] == "pending" || body["status"] == "confirmed",
        "{body}"
    );
    assert_eq!(body["order_id"], order_id.as_str());

    app.wait_for_rows(id, 1, Duration::from_secs(20)).await;
    let (_, body) = result(&app).await;
    assert_eq!(body["status"], "confirmed");
    assert_eq!(body["order_id"], order_id.as_str());

    let (status, list) = crate::helpers::read(
        app.client
            .get(app.url("/api/orders"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let orders = list["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["order_id"], order_id.as_str());
    assert_eq!(orders[0]["promotion_id"], id);
    assert_eq!(orders[0]["status"], "pending");
    assert_eq!(orders[0]["price_cents"], 99900);

    // Another user sees none of it.
    let (_, other) = crate::helpers::read(
        app.client
            .get(app.url("/api/orders"))
            .bearer_auth(crate::helpers::user_token(12))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(other["orders"].as_array().unwrap().len(), 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_listed_newest_first() {
    let mut app = spawn_app().await;
    let first = app.active_promotion(5, 1).await;
    let second = app.active_promotion(5, 1).await;
    assert_eq!(app.purchase(first, 3).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(app.purchase(second, 3).await.0, StatusCode::OK);
    app.wait_for_rows(first, 1, Duration::from_secs(20)).await;
    app.wait_for_rows(second, 1, Duration::from_secs(20)).await;

    let (_, list) = crate::helpers::read(
        app.client
            .get(app.url("/api/orders"))
            .bearer_auth(crate::helpers::user_token(3))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let promotions: Vec<i64> = list["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["promotion_id"].as_i64().unwrap())
        .collect();
    assert_eq!(promotions, vec![second, first]);
    app.stop().await;
}
