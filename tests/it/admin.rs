//! The admin API (create, list, read, edit before start, delete), the public
//! promotion list, authentication of users and of the admin, and the sale
//! window. Every refusal is checked for its status, its error code and for
//! leaving PostgreSQL and Redis exactly as they were.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, JWT_SECRET, TestApp, active_body, assert_error, read, rfc3339, spawn_app,
    user_token,
};

// ---------------------------------------------------------------- helpers --

fn minutes(n: i64) -> chrono::Duration {
    chrono::Duration::minutes(n)
}

/// A creation body with an explicit window.
fn body_with_window(stock: i64, starts_at: DateTime<Utc>, ends_at: DateTime<Utc>) -> Value {
    json!({
        "name": "Window sale",
        "stock": stock,
        "per_user_limit": 1,
        "price_cents": 1250,
        "starts_at": rfc3339(starts_at),
        "ends_at": rfc3339(ends_at),
    })
}

/// A promotion that starts in an hour.
fn upcoming_body(stock: i64) -> Value {
    let now = Utc::now();
    body_with_window(stock, now + minutes(60), now + minutes(120))
}

/// A promotion whose window closed an hour ago.
fn ended_body(stock: i64) -> Value {
    let now = Utc::now();
    body_with_window(stock, now - minutes(120), now - minutes(60))
}

async fn create(app: &TestApp, body: Value) -> i64 {
    app.create_promotion(body).await["id"].as_i64().unwrap()
}

/// `GET /admin/promotions/{id}` (status and body).
async fn admin_get(app: &TestApp, id: i64) -> (StatusCode, Value) {
    app.admin(Method::GET, &format!("/admin/promotions/{id}"), None)
        .await
}

/// The promotion object without its live parts (`stats`, `status`), to
/// compare a promotion before and after a refused change.
async fn record(app: &TestApp, id: i64) -> Value {
    let (status, mut v) = admin_get(app, id).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let o = v.as_object_mut().unwrap();
    o.remove("stats");
    o.remove("status");
    v
}

/// The Redis `stock` string of a promotion, `None` when the key is absent.
async fn redis_stock(app: &TestApp, id: i64) -> Option<i64> {
    let mut conn = app.redis.clone();
    conn.get(app.keys.promotion(id).stock).await.unwrap()
}

/// How many of the promotion's Redis keys exist.
async fn redis_keys_of(app: &TestApp, id: i64) -> i64 {
    let k = app.keys.promotion(id);
    let mut conn = app.redis.clone();
    redis::cmd("EXISTS")
        .arg(&[k.meta, k.stock, k.buyers, k.orders, k.results, k.returned])
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Whether the workers' set of live promotions names `id`.
async fn is_live(app: &TestApp, id: i64) -> bool {
    let mut conn = app.redis.clone();
    conn.sismember(app.keys.live_promotions(), id)
        .await
        .unwrap()
}

/// Sends a request with an optional raw `Authorization` header value.
async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    authorization: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = app.client.request(method, app.url(path));
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    read(req.send().await.expect("request is answered")).await
}

fn parse_time(v: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v.as_str().expect("a time string"))
        .expect("RFC 3339")
        .with_timezone(&Utc)
}

/// An HS256 JWT over arbitrary claims.
fn jwt(secret: &str, claims: Value) -> String {
    jwt_with(jsonwebtoken::Algorithm::HS256, secret, claims)
}

fn jwt_with(alg: jsonwebtoken::Algorithm, secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn unix_now() -> i64 {
    Utc::now().timestamp()
}

/// The public list (no authentication), as a list of promotions.
async fn public_list(app: &TestApp) -> Vec<Value> {
    let (status, v) = send(app, Method::GET, "/api/promotions", None, None).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["promotions"]
        .as_array()
        .expect("promotions array")
        .clone()
}

fn ids(list: &[Value]) -> Vec<i64> {
    list.iter().map(|p| p["id"].as_i64().unwrap()).collect()
}

/// Polls the public list until `ok` holds for it (the list is cached for up
/// to `cache_ttl`); returns the last list seen.
async fn poll_public_list(app: &TestApp, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let list = public_list(app).await;
        if ok(&list) || tokio::time::Instant::now() >= deadline {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----------------------------------------------------------------- create --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_answers_201_with_the_promotion_and_preheats_redis_before_answering() {
    let mut app = spawn_app().await;
    let body = active_body(37, 2);
    let created = app.create_promotion(body.clone()).await;

    let id = created["id"].as_i64().expect("id is an integer");
    assert!(id > 0, "{created}");
    assert_eq!(created["name"], "Phone X flash sale");
    assert_eq!(created["stock"], 37);
    assert_eq!(created["per_user_limit"], 2);
    assert_eq!(created["price_cents"], 99900);
    assert_eq!(
        parse_time(&created["starts_at"]),
        parse_time(&body["starts_at"])
    );
    assert_eq!(
        parse_time(&created["ends_at"]),
        parse_time(&body["ends_at"])
    );
    assert_eq!(created["require_token"], false);
    assert_eq!(created["require_captcha"], false);
    assert_eq!(created["status"], "active");

    // Preheated before the 201: no waiting, no polling.
    assert_eq!(redis_stock(&app, id).await, Some(37));
    assert!(is_live(&app, id).await, "the workers know its stream");
    let stats = app.stats(id).await;
    assert_eq!(stats["remaining"], 37, "{stats}");
    assert_eq!(stats["sold"], 0, "{stats}");

    // And it sells at once.
    let (status, v) = app.purchase(id, 1).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(redis_stock(&app, id).await, Some(36));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_applies_defaults_and_reports_an_upcoming_status() {
    let mut app = spawn_app().await;
    let now = Utc::now();
    let created = app
        .create_promotion(json!({
            "name": "Defaults",
            "stock": 5,
            "starts_at": rfc3339(now + minutes(30)),
            "ends_at": rfc3339(now + minutes(90)),
        }))
        .await;
    assert_eq!(created["status"], "upcoming", "{created}");
    assert_eq!(created["per_user_limit"], 1, "{created}");
    assert_eq!(created["price_cents"], 0, "{created}");
    assert_eq!(created["require_token"], false, "{created}");
    assert_eq!(created["require_captcha"], false, "{created}");
    let id = created["id"].as_i64().unwrap();
    assert_eq!(redis_stock(&app, id).await, Some(5));
    assert_eq!(app.stats(id).await["remaining"], 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_require_captcha_also_requires_a_token() {
    let mut app = spawn_app().await;
    let mut body = upcoming_body(3);
    body["require_captcha"] = json!(true);
    let created = app.create_promotion(body).await;
    assert_eq!(created["require_captcha"], true, "{created}");
    assert_eq!(created["require_token"], true, "{created}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_with_no_stock_left_reports_sold_out_to_admin_and_public() {
    let mut app = spawn_app().await;
    let id = app.active_promotion(1, 1).await;
    let (status, v) = app.purchase(id, 1).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = app.purchase(id, 2).await;
    assert_error(status, &v, StatusCode::GONE, "sold_out", "second buyer");

    let (status, got) = admin_get(&app, id).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["status"], "sold_out", "{got}");
    assert_eq!(got["stats"]["remaining"], 0, "{got}");
    assert_eq!(got["stats"]["sold"], 1, "{got}");
    let list = poll_public_list(&app, |l| l.iter().any(|p| p["remaining"] == 0)).await;
    let p = list.iter().find(|p| p["id"] == id).expect("still listed");
    assert_eq!(p["remaining"], 0, "{p}");
    assert_eq!(p["status"], "sold_out", "{p}");
    app.stop().await;
}

// ------------------------------------------------------------- list / get --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_get_show_every_promotion_with_live_stats() {
    let mut app = spawn_app().await;
    assert!(app.admin_list().await.is_empty());

    let active = app.active_promotion(10, 1).await;
    let upcoming = create(&app, upcoming_body(4)).await;
    let ended = create(&app, ended_body(6)).await;

    let list = app.admin_list().await;
    assert_eq!(ids(&list), vec![active, upcoming, ended], "{list:?}");
    let status = |id: i64| {
        list.iter()
            .find(|p| p["id"] == id)
            .map(|p| p["status"].clone())
            .unwrap()
    };
    assert_eq!(status(active), "active");
    assert_eq!(status(upcoming), "upcoming");
    assert_eq!(status(ended), "ended");
    for p in &list {
        for field in [
            "id",
            "name",
            "stock",
            "per_user_limit",
            "price_cents",
            "starts_at",
            "ends_at",
            "require_token",
            "status",
        ] {
            assert!(p.get(field).is_some(), "`{field}` is listed: {p}");
        }
    }

    let (status, one) = admin_get(&app, upcoming).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["id"], upcoming);
    assert_eq!(one["stock"], 4);
    assert_eq!(one["status"], "upcoming");
    let stats = &one["stats"];
    for field in ["remaining", "sold", "persisted", "paid", "cancelled"] {
        assert!(stats[field].is_i64(), "stats.{field} is a number: {one}");
    }
    assert_eq!(stats["remaining"], 4);
    assert_eq!(stats["sold"], 0);

    // A sale shows in the stats at once (sold, remaining) and, once the
    // workers wrote it, in `persisted`.
    let (st, v) = app.purchase(active, 9).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    let stats = app.stats(active).await;
    assert_eq!(stats["remaining"], 9, "{stats}");
    assert_eq!(stats["sold"], 1, "{stats}");
    assert_eq!(
        app.wait_for_rows(active, 1, Duration::from_secs(20)).await,
        1
    );
    let stats = app.stats(active).await;
    assert_eq!(stats["persisted"], 1, "{stats}");
    assert_eq!(stats["paid"], 0, "{stats}");
    assert_eq!(stats["cancelled"], 0, "{stats}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_404_and_malformed_ids_are_400_on_every_admin_item_route() {
    let mut app = spawn_app().await;
    let id = create(&app, upcoming_body(3)).await;
    let before = record(&app, id).await;

    let edit = Some(json!({"stock": 9}));
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        let body = (method == Method::PUT).then(|| edit.clone().unwrap());
        let (status, v) = app
            .admin(method.clone(), "/admin/promotions/99999", body.clone())
            .await;
        assert_error(
            status,
            &v,
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("{method} 99999"),
        );
        for bad in ["abc", "0", "-1", "1.5", "1e3", "99999999999999999999"] {
            let (status, v) = app
                .admin(
                    method.clone(),
                    &format!("/admin/promotions/{bad}"),
                    body.clone(),
                )
                .await;
            assert_error(
                status,
                &v,
                StatusCode::BAD_REQUEST,
                "invalid_id",
                &format!("{method} {bad}"),
            );
        }
    }
    assert_eq!(record(&app, id).await, before);
    assert_eq!(ids(&app.admin_list().await), vec![id]);
    assert_eq!(redis_stock(&app, id).await, Some(3));
    app.stop().await;
}

// -------------------------------------------------------------------- PUT --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_before_start_changes_the_fields_and_redis_follows() {
    let mut app = spawn_app().await;
    let id = create(&app, upcoming_body(10)).await;
    let before = record(&app, id).await;
    let new_start = Utc::now() + minutes(45);

    let (status, v) = app
        .admin(
            Method::PUT,
            &format!("/admin/promotions/{id}"),
            Some(json!({
                "name": "Renamed sale",
                "stock": 25,
                "per_user_limit": 3,
                "starts_at": rfc3339(new_start),
            })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["id"], id);
    assert_eq!(v["name"], "Renamed sale");
    assert_eq!(v["stock"], 25);
    assert_eq!(v["per_user_limit"], 3);
    assert_eq!(
        parse_time(&v["starts_at"]),
        parse_time(&json!(rfc3339(new_start)))
    );
    assert_eq!(v["status"], "upcoming");
    // Fields not in the body are kept.
    assert_eq!(v["price_cents"], before["price_cents"]);
    assert_eq!(v["ends_at"], before["ends_at"]);
    assert_eq!(v["require_token"], before["require_token"]);

    let (status, got) = admin_get(&app, id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["name"], "Renamed sale");
    assert_eq!(got["stock"], 25);
    assert_eq!(got["stats"]["remaining"], 25, "{got}");
    assert_eq!(redis_stock(&app, id).await, Some(25));
    let mut conn = app.redis.clone();
    let (meta_stock, meta_limit, meta_starts): (i64, i64, i64) = redis::cmd("HMGET")
        .arg(app.keys.promotion(id).meta)
        .arg(&["stock", "limit", "starts_ms"])
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(meta_stock, 25);
    assert_eq!(meta_limit, 3);
    assert_eq!(
        meta_starts,
        parse_time(&got["starts_at"]).timestamp_millis()
    );

    // Lowering the stock is followed too.
    let (status, v) = app
        .admin(
            Method::PUT,
            &format!("/admin/promotions/{id}"),
            Some(json!({"stock": 2})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(app.stats(id).await["remaining"], 2);
    assert_eq!(redis_stock(&app, id).await, Some(2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_that_moves_the_start_into_the_past_makes_the_promotion_sell_at_once() {
    let mut app = spawn_app().await;
    let id = create(&app, upcoming_body(2)).await;
    let (status, v) = app.purchase(id, 1).await;
    assert_error(status, &v, StatusCode::FORBIDDEN, "not_started", "before");

    let (status, v) = app
        .admin(
            Method::PUT,
            &format!("/admin/promotions/{id}"),
            Some(json!({"starts_at": rfc3339(Utc::now() - minutes(1))})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "active", "{v}");
    // The edit invalidated the gateway's cached window.
    let (status, v) = app.purchase(id, 1).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(app.stats(id).await["remaining"], 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_once_started_is_409_promotion_started_and_changes_nothing() {
    let mut app = spawn_app().await;
    let active = app.active_promotion(10, 1).await;
    let ended = create(&app, ended_body(7)).await;
    let (st, v) = app.purchase(active, 1).await;
    assert_eq!(st, StatusCode::OK, "{v}");

    for id in [active, ended] {
        let before = record(&app, id).await;
        let stats_before = app.stats(id).await;
        for body in [
            json!({"stock": 500}),
            json!({"name": "Too late"}),
            json!({"starts_at": rfc3339(Utc::now() + minutes(10)),
                   "ends_at": rfc3339(Utc::now() + minutes(20))}),
            json!({}),
        ] {
            let (status, v) = app
                .admin(
                    Method::PUT,
                    &format!("/admin/promotions/{id}"),
                    Some(body.clone()),
                )
                .await;
            assert_error(
                status,
                &v,
                StatusCode::CONFLICT,
                "promotion_started",
                &format!("PUT {id} {body}"),
            );
        }
        assert_eq!(record(&app, id).await, before);
        let stats = app.stats(id).await;
        assert_eq!(stats["remaining"], stats_before["remaining"], "{stats}");
        assert_eq!(stats["sold"], stats_before["sold"], "{stats}");
    }
    assert_eq!(redis_stock(&app, active).await, Some(9));
    assert_eq!(redis_stock(&app, ended).await, Some(7));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_with_invalid_values_is_400_naming_the_field_and_changes_nothing() {
    let mut app = spawn_app().await;
    let id = create(&app, upcoming_body(10)).await;
    let before = record(&app, id).await;
    let starts_at = parse_time(&before["starts_at"]);

    let cases = [
        (json!({"stock": 0}), "stock"),
        (json!({"stock": -4}), "stock"),
        (json!({"stock": 100_000_001}), "stock"),
        (json!({"stock": "ten"}), "stock"),
        (json!({"name": ""}), "name"),
        (json!({"name": "   "}), "name"),
        (json!({"name": "x".repeat(201)}), "name"),
        (json!({"per_user_limit": 0}), "per_user_limit"),
        (json!({"price_cents": -1}), "price_cents"),
        (
            json!({"ends_at": rfc3339(starts_at - minutes(1))}),
            "ends_at",
        ),
        (json!({"ends_at": rfc3339(starts_at)}), "ends_at"),
        (json!({"starts_at": "tomorrow"}), "starts_at"),
        (json!({"stok": 5}), "stok"),
    ];
    for (body, field) in cases {
        let (status, v) = app
            .admin(
                Method::PUT,
                &format!("/admin/promotions/{id}"),
                Some(body.clone()),
            )
            .await;
        assert_error(
            status,
            &v,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("PUT {body}"),
        );
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: `{message}` names {field}");
    }
    assert_eq!(record(&app, id).await, before);
    assert_eq!(app.stats(id).await["remaining"], 10);
    assert_eq!(redis_stock(&app, id).await, Some(10));
    app.stop().await;
}

// ----------------------------------------------------------------- DELETE --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_an_upcoming_promotion_removes_it_and_its_redis_state() {
    let mut app = spawn_app().await;
    let keep = create(&app, upcoming_body(3)).await;
    let id = create(&app, upcoming_body(8)).await;
    assert_eq!(
        redis_keys_of(&app, id).await,
        3,
        "meta, stock and order stream are preheated"
    );
    assert!(is_live(&app, id).await);

    let (status, v) = app
        .admin(Method::DELETE, &format!("/admin/promotions/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(v, Value::Null, "204 has no body");

    let (status, v) = admin_get(&app, id).await;
    assert_error(
        status,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "GET after delete",
    );
    assert_eq!(redis_keys_of(&app, id).await, 0, "no Redis key is left");
    assert!(!is_live(&app, id).await);
    assert_eq!(ids(&app.admin_list().await), vec![keep]);
    let (status, v) = send(
        &app,
        Method::GET,
        &format!("/api/promotions/{id}"),
        None,
        None,
    )
    .await;
    assert_error(status, &v, StatusCode::NOT_FOUND, "not_found", "public GET");

    // The other promotion is untouched, and a second delete is a 404.
    assert_eq!(redis_stock(&app, keep).await, Some(3));
    let (status, v) = app
        .admin(Method::DELETE, &format!("/admin/promotions/{id}"), None)
        .await;
    assert_error(
        status,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "second delete",
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_an_active_promotion_is_409_promotion_started_and_it_keeps_selling() {
    let mut app = spawn_app().await;
    let id = app.active_promotion(5, 1).await;
    let before = record(&app, id).await;

    let (status, v) = app
        .admin(Method::DELETE, &format!("/admin/promotions/{id}"), None)
        .await;
    assert_error(
        status,
        &v,
        StatusCode::CONFLICT,
        "promotion_started",
        "DELETE active",
    );
    assert_eq!(record(&app, id).await, before);
    assert_eq!(redis_keys_of(&app, id).await, 3);
    assert!(is_live(&app, id).await);
    let (status, v) = app.purchase(id, 1).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(app.stats(id).await["remaining"], 4);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_an_ended_promotion_with_sales_is_409_promotion_has_orders() {
    let mut app = spawn_app().await;
    let now = Utc::now();
    let ends_at = now + chrono::Duration::seconds(3);
    let id = create(&app, body_with_window(5, now - minutes(1), ends_at)).await;
    let (status, v) = app.purchase(id, 1).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(app.wait_for_rows(id, 1, Duration::from_secs(20)).await, 1);

    // Wait until the window has closed.
    let left = (ends_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(200)).await;
    let (status, v) = app.purchase(id, 2).await;
    assert_error(
        status,
        &v,
        StatusCode::FORBIDDEN,
        "ended",
        "after the window",
    );
    let before = record(&app, id).await;

    let (status, v) = app
        .admin(Method::DELETE, &format!("/admin/promotions/{id}"), None)
        .await;
    assert_error(
        status,
        &v,
        StatusCode::CONFLICT,
        "promotion_has_orders",
        "DELETE ended with sales",
    );
    let (status, got) = admin_get(&app, id).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["status"], "ended");
    assert_eq!(got["stats"]["sold"], 1, "{got}");
    assert_eq!(got["stats"]["remaining"], 4, "{got}");
    assert_eq!(record(&app, id).await, before);
    assert_eq!(app.order_rows(id).await, 1);
    assert_eq!(redis_stock(&app, id).await, Some(4));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_an_ended_promotion_without_sales_is_allowed() {
    let mut app = spawn_app().await;
    let id = create(&app, ended_body(5)).await;
    let (status, v) = app
        .admin(Method::DELETE, &format!("/admin/promotions/{id}"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let (status, v) = admin_get(&app, id).await;
    assert_error(
        status,
        &v,
        StatusCode::NOT_FOUND,
        "not_found",
        "GET after delete",
    );
    assert_eq!(redis_keys_of(&app, id).await, 0);
    app.stop().await;
}

// ----------------------------------------------------------------- public --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_list_shows_upcoming_and_active_promotions_without_auth() {
    let mut app = spawn_app().await;
    let active = app.active_promotion(10, 1).await;
    let upcoming = create(&app, upcoming_body(4)).await;
    let ended = create(&app, ended_body(6)).await;

    let list = poll_public_list(&app, |l| l.len() == 2).await;
    let mut listed = ids(&list);
    listed.sort_unstable();
    assert_eq!(listed, vec![active, upcoming], "{list:?}");
    for p in &list {
        let stock = p["stock"].as_i64().unwrap();
        assert_eq!(p["remaining"], stock, "{p}");
        assert!(p.get("stats").is_none(), "no admin stats in public: {p}");
    }

    let (status, one) = send(
        &app,
        Method::GET,
        &format!("/api/promotions/{active}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["id"], active);
    assert_eq!(one["remaining"], 10);
    assert_eq!(one["status"], "active");
    let (status, one) = send(
        &app,
        Method::GET,
        &format!("/api/promotions/{upcoming}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["status"], "upcoming");

    for missing in [ended, 99999] {
        let (status, v) = send(
            &app,
            Method::GET,
            &format!("/api/promotions/{missing}"),
            None,
            None,
        )
        .await;
        assert_error(
            status,
            &v,
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("public {missing}"),
        );
    }
    for bad in ["abc", "0", "-1"] {
        let (status, v) = send(
            &app,
            Method::GET,
            &format!("/api/promotions/{bad}"),
            None,
            None,
        )
        .await;
        assert_error(
            status,
            &v,
            StatusCode::BAD_REQUEST,
            "invalid_id",
            &format!("public {bad}"),
        );
    }

    // `remaining` follows sales, within the cache's lifetime.
    let (status, v) = app.purchase(active, 1).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let list = poll_public_list(&app, |l| {
        l.iter().any(|p| p["id"] == active && p["remaining"] == 9)
    })
    .await;
    let p = list.iter().find(|p| p["id"] == active).unwrap();
    assert_eq!(p["remaining"], 9, "{list:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_list_follows_creation_deletion_and_the_end_of_a_window() {
    let mut app = spawn_app().await;
    assert!(public_list(&app).await.is_empty());
    let now = Utc::now();
    let ends_at = now + chrono::Duration::seconds(4);
    let short = create(&app, body_with_window(3, now - minutes(1), ends_at)).await;
    let upcoming = create(&app, upcoming_body(4)).await;

    let list = poll_public_list(&app, |l| l.len() == 2).await;
    let mut listed = ids(&list);
    listed.sort_unstable();
    assert_eq!(listed, vec![short, upcoming]);

    let (status, v) = app
        .admin(
            Method::DELETE,
            &format!("/admin/promotions/{upcoming}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    let left = (ends_at - Utc::now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(100)).await;
    let list = poll_public_list(&app, |l| l.is_empty()).await;
    assert!(
        list.is_empty(),
        "deleted and ended promotions leave: {list:?}"
    );
    app.stop().await;
}

// ------------------------------------------------------------------- auth --

/// Authorization header values a user route must refuse with 401.
fn bad_user_credentials() -> Vec<(&'static str, Option<String>)> {
    let now = unix_now();
    vec![
        ("no header", None),
        ("empty header", Some(String::new())),
        ("scheme only", Some("Bearer".into())),
        ("scheme and blanks", Some("Bearer    ".into())),
        ("garbage token", Some("Bearer not.a.jwt".into())),
        (
            "three garbage segments",
            Some("Bearer aaaa.bbbb.cccc".into()),
        ),
        ("basic auth", Some("Basic dXNlcjpwYXNz".into())),
        ("token without scheme", Some(user_token(1))),
        (
            "other secret",
            Some(format!(
                "Bearer {}",
                jwt("another-secret", json!({"sub": "1", "exp": now + 600}))
            )),
        ),
        (
            "expired",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": "1", "exp": now - 120}))
            )),
        ),
        (
            "no exp",
            Some(format!("Bearer {}", jwt(JWT_SECRET, json!({"sub": "1"})))),
        ),
        (
            "exp not a number",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": "1", "exp": "later"}))
            )),
        ),
        (
            "no sub",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"exp": now + 600}))
            )),
        ),
        (
            "sub not numeric",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": "alice", "exp": now + 600}))
            )),
        ),
        (
            "sub zero",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": 0, "exp": now + 600}))
            )),
        ),
        (
            "sub negative",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": -3, "exp": now + 600}))
            )),
        ),
        (
            "sub negative string",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": "-3", "exp": now + 600}))
            )),
        ),
        (
            "sub fractional",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": 1.5, "exp": now + 600}))
            )),
        ),
        (
            "sub too large",
            Some(format!(
                "Bearer {}",
                jwt(
                    JWT_SECRET,
                    json!({"sub": "99999999999999999999", "exp": now + 600})
                )
            )),
        ),
        (
            "sub boolean",
            Some(format!(
                "Bearer {}",
                jwt(JWT_SECRET, json!({"sub": true, "exp": now + 600}))
            )),
        ),
        (
            "HS384 with the right secret",
            Some(format!(
                "Bearer {}",
                jwt_with(
                    jsonwebtoken::Algorithm::HS384,
                    JWT_SECRET,
                    json!({"sub": "1", "exp": now + 600})
                )
            )),
        ),
        ("the admin token", Some(format!("Bearer {ADMIN_TOKEN}"))),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_routes_refuse_missing_malformed_forged_and_expired_tokens_with_401() {
    let mut app = spawn_app().await;
    let id = app.active_promotion(5, 1).await;
    let purchase = format!("/api/promotions/{id}/purchase");
    let result = format!("/api/promotions/{id}/result");

    for (what, auth) in bad_user_credentials() {
        for (method, path, body) in [
            (Method::POST, purchase.as_str(), Some(json!({}))),
            (Method::GET, "/api/orders", None),
            (Method::GET, result.as_str(), None),
        ] {
            let (status, v) = send(&app, method.clone(), path, auth.as_deref(), body).await;
            assert_error(
                status,
                &v,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &format!("{what}: {method} {path}"),
            );
        }
    }
    let stats = app.stats(id).await;
    assert_eq!(
        stats["sold"], 0,
        "no refused purchase sold anything: {stats}"
    );
    assert_eq!(stats["remaining"], 5, "{stats}");
    assert_eq!(redis_stock(&app, id).await, Some(5));

    // The same routes let a valid token in: `sub` as a string or a number,
    // and the scheme in any case.
    let numeric = jwt(JWT_SECRET, json!({"sub": 42, "exp": unix_now() + 600}));
    for auth in [
        format!("Bearer {}", user_token(41)),
        format!("bearer {numeric}"),
    ] {
        let (status, v) = send(&app, Method::GET, "/api/orders", Some(&auth), None).await;
        assert_eq!(status, StatusCode::OK, "{auth}: {v}");
        assert!(v["orders"].is_array(), "{v}");
        let (status, v) = send(&app, Method::POST, &purchase, Some(&auth), Some(json!({}))).await;
        assert_eq!(status, StatusCode::OK, "{auth}: {v}");
    }
    assert_eq!(app.stats(id).await["sold"], 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_refuse_missing_and_wrong_tokens_and_user_jwts_with_401() {
    let mut app = spawn_app().await;
    let id = create(&app, upcoming_body(6)).await;
    let before = record(&app, id).await;
    let item = format!("/admin/promotions/{id}");

    let wrong = [
        ("no header", None),
        ("empty bearer", Some("Bearer ".to_string())),
        (
            "wrong token",
            Some("Bearer not-the-admin-token".to_string()),
        ),
        (
            "admin token prefix",
            Some(format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])),
        ),
        ("admin token longer", Some(format!("Bearer {ADMIN_TOKEN}x"))),
        ("admin token without scheme", Some(ADMIN_TOKEN.to_string())),
        ("basic scheme", Some(format!("Basic {ADMIN_TOKEN}"))),
        (
            "a valid user JWT",
            Some(format!("Bearer {}", user_token(1))),
        ),
        (
            "a JWT signed with the admin token",
            Some(format!(
                "Bearer {}",
                jwt(ADMIN_TOKEN, json!({"sub": "1", "exp": unix_now() + 600}))
            )),
        ),
    ];
    for (what, auth) in &wrong {
        for (method, path, body) in [
            (Method::GET, "/admin/promotions", None),
            (Method::POST, "/admin/promotions", Some(active_body(5, 1))),
            (Method::GET, item.as_str(), None),
            (Method::PUT, item.as_str(), Some(json!({"stock": 99}))),
            (Method::DELETE, item.as_str(), None),
        ] {
            let (status, v) = send(&app, method.clone(), path, auth.as_deref(), body).await;
            assert_error(
                status,
                &v,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &format!("{what}: {method} {path}"),
            );
        }
    }
    assert_eq!(
        ids(&app.admin_list().await),
        vec![id],
        "nothing created or deleted"
    );
    assert_eq!(record(&app, id).await, before, "nothing edited");
    assert_eq!(redis_stock(&app, id).await, Some(6));
    app.stop().await;
}

// ----------------------------------------------------------------- window --

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_before_the_start_is_403_not_started_and_takes_no_stock() {
    let mut app = spawn_app().await;
    let id = create(&app, upcoming_body(5)).await;
    for user in 1..=3 {
        let (status, v) = app.purchase(id, user).await;
        assert_error(
            status,
            &v,
            StatusCode::FORBIDDEN,
            "not_started",
            "before start",
        );
    }
    let stats = app.stats(id).await;
    assert_eq!(stats["remaining"], 5, "{stats}");
    assert_eq!(stats["sold"], 0, "{stats}");
    assert_eq!(redis_stock(&app, id).await, Some(5));
    let mut conn = app.redis.clone();
    let buyers: i64 = conn.hlen(app.keys.promotion(id).buyers).await.unwrap();
    let messages: i64 = conn.xlen(app.keys.promotion(id).orders).await.unwrap();
    assert_eq!((buyers, messages), (0, 0));
    assert_eq!(app.order_rows(id).await, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_after_the_end_is_403_ended_and_takes_no_stock() {
    let mut app = spawn_app().await;
    let id = create(&app, ended_body(5)).await;
    for user in 1..=3 {
        let (status, v) = app.purchase(id, user).await;
        assert_error(status, &v, StatusCode::FORBIDDEN, "ended", "after end");
    }
    let stats = app.stats(id).await;
    assert_eq!(stats["remaining"], 5, "{stats}");
    assert_eq!(stats["sold"], 0, "{stats}");
    assert_eq!(redis_stock(&app, id).await, Some(5));
    let mut conn = app.redis.clone();
    let messages: i64 = conn.xlen(app.keys.promotion(id).orders).await.unwrap();
    assert_eq!(messages, 0);
    assert_eq!(app.order_rows(id).await, 0);
    app.stop().await;
}
