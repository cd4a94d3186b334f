//! Accounts: register, log in, buy with the token the login issues; every
//! bad body a 400 naming its field; one answer for an unknown user and a
//! wrong password; failed logins limited without slowing the sale.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::helpers::{TestApp, code, read, seckill_command, spawn_app_with};

async fn post(app: &TestApp, path: &str, body: Value) -> (StatusCode, Value) {
    let res = app
        .client
        .post(app.url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    read(res).await
}

async fn register(app: &TestApp, username: &str, password: &str) -> (StatusCode, Value) {
    post(
        app,
        "/api/register",
        json!({"username": username, "password": password}),
    )
    .await
}

async fn login(app: &TestApp, username: &str, password: &str) -> (StatusCode, Value) {
    post(
        app,
        "/api/login",
        json!({"username": username, "password": password}),
    )
    .await
}

async fn users(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_buyer_registers_logs_in_and_buys_with_the_token_the_login_issues() {
    let app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(10, 1).await;
    let (status, body) = register(&app, "buyer.one", "correct horse").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let user_id = body["user_id"].as_i64().unwrap();
    assert!(user_id >= 1_000_000_000, "{body}");

    let (status, body) = login(&app, "buyer.one", "correct horse").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], user_id);
    assert!(body["expires_at"].as_str().is_some(), "{body}");
    let token = body["token"].as_str().unwrap().to_string();

    let res = app
        .client
        .post(app.url(&format!("/api/promotions/{id}/purchase")))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let (status, bought) = read(res).await;
    assert_eq!(status, StatusCode::OK, "{bought}");
    let res = app
        .client
        .get(app.url(&format!("/api/promotions/{id}/result")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (_, result) = read(res).await;
    assert_eq!(result["order_id"], bought["order_id"]);
}

#[tokio::test]
async fn a_taken_username_is_409_username_taken() {
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    assert_eq!(
        register(&app, "taken", "password-1").await.0,
        StatusCode::CREATED
    );
    let (status, body) = register(&app, "taken", "password-2").await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "username_taken")
    );
    assert_eq!(users(&app).await, 1);
}

#[tokio::test]
async fn every_invalid_account_body_is_400_naming_the_field_and_creates_nothing() {
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let cases = [
        (json!({"password": "long enough"}), "username"),
        (json!({"username": "someone"}), "password"),
        (
            json!({"username": "ab", "password": "long enough"}),
            "username",
        ),
        (
            json!({"username": "Capital", "password": "long enough"}),
            "username",
        ),
        (
            json!({"username": "with space", "password": "long enough"}),
            "username",
        ),
        (
            json!({"username": "x".repeat(65), "password": "long enough"}),
            "username",
        ),
        (
            json!({"username": "someone", "password": "short"}),
            "password",
        ),
        (
            json!({"username": "someone", "password": "p".repeat(129)}),
            "password",
        ),
        (
            json!({"username": "someone", "password": "long enough", "admin": true}),
            "admin",
        ),
        (
            json!({"username": 7, "password": "long enough"}),
            "username",
        ),
    ];
    for (body, field) in cases {
        let (status, answer) = post(&app, "/api/register", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        assert_eq!(code(&answer), "invalid_request");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{body}: {message}");
    }
    for body in [json!({"username": "someone"}), json!({"password": "x"})] {
        let (status, _) = post(&app, "/api/login", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    assert_eq!(users(&app).await, 0);
}

#[tokio::test]
async fn an_unknown_user_and_a_wrong_password_get_the_same_401_in_comparable_time() {
    let app = spawn_app_with(Role::GatewayOnly, |s| s.rate_login_failures = 0).await;
    register(&app, "known", "the right one").await;
    let timed = |user: &'static str| {
        let app = &app;
        async move {
            let started = Instant::now();
            let (status, body) = login(app, user, "a wrong one").await;
            (started.elapsed(), status, body)
        }
    };
    let mut wrong = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..5 {
        let (t, status, body) = timed("known").await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::UNAUTHORIZED, "invalid_credentials")
        );
        wrong.push(t);
        let (t, status, other) = timed("nobody").await;
        assert_eq!(
            (status, code(&other)),
            (StatusCode::UNAUTHORIZED, "invalid_credentials")
        );
        assert_eq!(other["error"], body["error"], "the same answer for both");
        unknown.push(t);
    }
    wrong.sort();
    unknown.sort();
    println!(
        "median login: wrong password {:?}, unknown user {:?}",
        wrong[2], unknown[2]
    );
    // An unknown user costs a hash too: not the few milliseconds of a lookup.
    assert!(
        unknown[2] * 4 >= wrong[2],
        "unknown {:?} vs wrong {:?}",
        unknown[2],
        wrong[2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_storm_is_limited_and_never_blocks_purchases() {
    // Two failures a minute: the budget refills only after the test is over.
    let app = spawn_app_with(Role::GatewayOnly, |s| s.rate_login_failures = 2).await;
    register(&app, "victim", "the right one").await;
    let id = app.active_promotion(1_000, 1).await;
    let storm = join_all((0..100).map(|_| login(&app, "victim", "guess")));
    let buyers = join_all((1..=50).map(|u| app.purchase(id, u)));
    let (storm, bought) = tokio::join!(storm, buyers);
    let limited = storm
        .iter()
        .filter(|(s, b)| *s == StatusCode::TOO_MANY_REQUESTS && code(b) == "rate_limited")
        .count();
    let refused = storm
        .iter()
        .filter(|(s, _)| *s == StatusCode::UNAUTHORIZED)
        .count();
    // Guesses within the budget wait for a hashing slot; one that waits too
    // long is told to come back (503 with Retry-After), never let through.
    let busy = storm
        .iter()
        .filter(|(s, b)| *s == StatusCode::SERVICE_UNAVAILABLE && code(b) == "unavailable")
        .count();
    println!("100 wrong logins: {refused} x 401, {limited} x 429, {busy} x 503");
    assert_eq!(limited + refused + busy, 100);
    assert!(refused <= 2, "{refused} guesses were checked");
    assert!(limited >= 95, "{limited}");
    assert!(bought.iter().all(|(s, _)| *s == StatusCode::OK));
    // Then even the right password waits.
    let (status, _) = login(&app, "victim", "the right one").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    // Another account from the same address is limited too (per address).
    register(&app, "bystander", "the right one").await;
    let (status, _) = login(&app, "bystander", "the right one").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn seckill_user_add_creates_an_account_that_logs_in() {
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let mut cmd = seckill_command(&app.settings);
    let mut child = cmd
        .args(["user", "add", "--username", "from.cli"])
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"typed at the prompt\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let id: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let (status, body) = login(&app, "from.cli", "typed at the prompt").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user_id"], id);
}
