//! Correctness under concurrent operations: failed admin authentications
//! are limited per address, and the CLI mints tokens that pass the
//! configured JWT checks.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use seckill::app::Role;
use serde_json::Value;

use crate::helpers::{ADMIN_TOKEN, JWT_SECRET, TestApp, code, read, spawn_app_with, user_token};

/// A request's status, `Retry-After` (if any), body and how long it took.
struct Answer {
    status: StatusCode,
    retry_after: Option<u64>,
    body: Value,
    took: Duration,
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    let started = Instant::now();
    let res = req.send().await.expect("the request is answered");
    let retry_after = res
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let (status, body) = read(res).await;
    Answer {
        status,
        retry_after,
        body,
        took: started.elapsed(),
    }
}

// ------------------------------------------------------ admin authentication

/// `GET /admin/promotions` from client address `from` (the test's loopback
/// peer is a trusted proxy, so `X-Forwarded-For` names the client).
async fn admin_from(app: &TestApp, from: &str, token: Option<&str>) -> Answer {
    let mut req = app
        .client
        .get(app.url("/admin/promotions"))
        .header("x-forwarded-for", from);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    send(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_admin_tokens_from_one_address_are_limited_and_then_even_the_right_token_waits() {
    const PER_MINUTE: u32 = 5;
    const TRIES: usize = 200;
    let mut app = spawn_app_with(Role::GatewayOnly, |s| s.rate_admin_failures = PER_MINUTE).await;
    let attacker = "203.0.113.7";

    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 0..TRIES {
        answers.push(admin_from(&app, attacker, Some(&format!("guess-{i}"))).await);
    }
    let right_meanwhile = admin_from(&app, attacker, Some(ADMIN_TOKEN)).await;
    let elapsed = started.elapsed();
    // One failure comes back every 60 / 5 = 12 s: the test ends long before.
    assert!(elapsed < Duration::from_secs(12), "{elapsed:?}");

    let unauthorized = answers
        .iter()
        .filter(|a| a.status == StatusCode::UNAUTHORIZED)
        .count();
    let limited: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    let slowest = limited.iter().map(|a| a.took).max().unwrap_or_default();
    println!(
        "{TRIES} wrong admin tokens from one address in {elapsed:.2?}: \
         {unauthorized} × 401, {} × 429 (the slowest in {slowest:.2?})",
        limited.len()
    );
    assert!(
        answers[..PER_MINUTE as usize]
            .iter()
            .all(|a| a.status == StatusCode::UNAUTHORIZED),
        "the first {PER_MINUTE} are plain 401s"
    );
    assert_eq!(unauthorized, PER_MINUTE as usize);
    assert_eq!(unauthorized + limited.len(), TRIES);
    for a in &limited {
        assert_eq!(code(&a.body), "rate_limited");
        assert!(a.retry_after.is_some_and(|s| s >= 1), "Retry-After");
    }
    // While blocked, the right token is refused too, so a lucky guess cannot
    // be told from the others.
    assert_eq!(
        (right_meanwhile.status, code(&right_meanwhile.body)),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );

    // Another address is not affected, and its own wrong token is a 401.
    let admin = admin_from(&app, "198.51.100.20", Some(ADMIN_TOKEN)).await;
    assert_eq!(admin.status, StatusCode::OK, "{}", admin.body);
    let wrong = admin_from(&app, "198.51.100.20", Some("oops")).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);

    // A request without a token is not a guess: it costs nothing.
    let anonymous = "198.51.100.30";
    for _ in 0..50 {
        let a = admin_from(&app, anonymous, None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let admin = admin_from(&app, anonymous, Some(ADMIN_TOKEN)).await;
    assert_eq!(admin.status, StatusCode::OK, "{}", admin.body);
    app.stop().await;
}

// --------------------------------------------------------------- JWT checks

/// Runs `seckill ARGS…` with the JWT settings in its environment.
async fn seckill_with_jwt_checks(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
        .args(args)
        .env("SECKILL_JWT_SECRET", JWT_SECRET)
        .env("SECKILL_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SECKILL_JWT_ISSUER", "https://id.example")
        .env("SECKILL_JWT_AUDIENCE", "seckill")
        .env("SECKILL_JWT_MAX_LIFETIME_SECS", "600")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("the seckill binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_mints_tokens_that_pass_the_configured_issuer_audience_and_lifetime() {
    let mut app = spawn_app_with(Role::GatewayOnly, |s| {
        s.jwt_issuer = Some("https://id.example".into());
        s.jwt_audience = Some("seckill".into());
        s.jwt_max_lifetime = Some(Duration::from_secs(600));
    })
    .await;
    let orders = |token: String| {
        let app = &app;
        async move { send(app.client.get(app.url("/api/orders")).bearer_auth(token)).await }
    };

    let (ok, token, err) = seckill_with_jwt_checks(&["token", "--user", "7"]).await;
    assert!(ok, "{err}");
    let a = orders(token).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);

    let (ok, csv, err) = seckill_with_jwt_checks(&["tokens", "--users", "2", "--first", "8"]).await;
    assert!(ok, "{err}");
    for line in csv.lines() {
        let (_, token) = line.split_once(',').unwrap();
        let a = orders(token.to_string()).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }

    // Past the maximum lifetime, the command refuses to mint.
    let (ok, _, err) = seckill_with_jwt_checks(&["token", "--user", "7", "--ttl", "601"]).await;
    assert!(!ok, "a --ttl past the maximum is refused");
    assert!(err.contains("SECKILL_JWT_MAX_LIFETIME_SECS"), "{err}");

    // A token without iss and aud, as another issuer would mint it, is a 401.
    let a = orders(user_token(7)).await;
    assert_eq!(
        (a.status, code(&a.body)),
        (StatusCode::UNAUTHORIZED, "unauthorized")
    );
    app.stop().await;
}
