//! Correctness under concurrent operations: pay and cancel of an order
//! PostgreSQL does not have are answered at once, the order routes count
//! against the per-user limit, the workers keep a PostgreSQL pool the
//! requests cannot take, failed admin authentications are limited per
//! address, the CLI mints tokens that pass the configured JWT checks, and a
//! fresh process exports every metric the dashboard and alerts use.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use seckill::app::Role;
use serde_json::Value;

use crate::helpers::{
    ADMIN_TOKEN, JWT_SECRET, TestApp, code, read, spawn_app, spawn_app_with, test_settings,
    user_token,
};
use crate::procs::GatewayProc;

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

/// `POST /api/orders/{order_id}/{action}` as `user`.
async fn order_action(app: &TestApp, order_id: &str, action: &str, user: i64) -> Answer {
    send(
        app.client
            .post(app.url(&format!("/api/orders/{order_id}/{action}")))
            .bearer_auth(user_token(user)),
    )
    .await
}

/// `GET path` as `user`.
async fn get_as(app: &TestApp, path: &str, user: i64) -> Answer {
    send(app.client.get(app.url(path)).bearer_auth(user_token(user))).await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

// ------------------------------------------------- unknown and pending orders

/// Before: every unknown id held a pooled connection in a 2 s polling loop
/// (40 row-lock attempts), so 400 of them took at least 800 s of
/// request time. Now one look in PostgreSQL and one in Redis answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_hundred_unknown_order_ids_are_404_at_once_instead_of_after_a_two_second_wait() {
    const N: usize = 400;
    const CONCURRENCY: usize = 8;
    let mut app = spawn_app().await;
    // A live promotion in which the user has a real order, so the Redis
    // look has something to compare with.
    let id = app.active_promotion(5, 1).await;
    let real = app.buy(id, 1).await;

    let started = Instant::now();
    let answers: Vec<Answer> = futures_util::stream::iter(0..N)
        .map(|i| {
            let app = &app;
            async move {
                let action = if i % 2 == 0 { "pay" } else { "cancel" };
                order_action(app, &uuid::Uuid::now_v7().to_string(), action, 1).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let total = started.elapsed();

    let wrong: Vec<String> = answers
        .iter()
        .filter(|a| a.status != StatusCode::NOT_FOUND || code(&a.body) != "not_found")
        .map(|a| format!("{} {}", a.status, a.body))
        .collect();
    assert!(wrong.is_empty(), "not 404 not_found: {wrong:?}");
    let mut took: Vec<Duration> = answers.iter().map(|a| a.took).collect();
    took.sort();
    let (p50, p99, max) = (percentile(&took, 0.5), percentile(&took, 0.99), took[N - 1]);
    println!(
        "{N} unknown ids, {CONCURRENCY} at a time: total {total:.2?}, p50 {p50:.2?}, \
         p99 {p99:.2?}, max {max:.2?} (the old wait: 2 s each, {} s in all)",
        N * 2
    );
    // The old wait was a fixed 2 s poll for every one of them.
    assert!(p50 < Duration::from_secs(1), "p50 {p50:?}");
    assert!(
        total < Duration::from_secs(40),
        "total {total:?}: far below 400 × 2 s / 8 = 100 s"
    );
    // The real order is still the buyer's to pay.
    app.wait_for_rows(id, 1, Duration::from_secs(20)).await;
    let paid = order_action(&app, &real, "pay", 1).await;
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_still_in_the_stream_is_409_order_pending_at_once_with_retry_after() {
    // No workers: the order stays in the stream.
    let mut app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    let order = app.buy(id, 1).await;

    for action in ["pay", "cancel"] {
        let a = order_action(&app, &order, action, 1).await;
        println!(
            "{action} of an order in the stream: {} in {:.2?}",
            a.status, a.took
        );
        assert_eq!(
            (a.status, code(&a.body)),
            (StatusCode::CONFLICT, "order_pending"),
            "{action}"
        );
        assert_eq!(a.retry_after, Some(1), "{action}: Retry-After");
        // The old answer came after a fixed 2 s poll.
        assert!(
            a.took < Duration::from_secs(1),
            "{action} took {:?}",
            a.took
        );
    }
    // Another user's pending order is theirs alone to know about.
    let a = order_action(&app, &order, "pay", 2).await;
    assert_eq!(
        (a.status, code(&a.body)),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert!(a.took < Duration::from_secs(1), "took {:?}", a.took);
    assert_eq!(app.order_rows(id).await, 0);
    app.stop().await;
}

// ----------------------------------------------------------- per-user limit

/// At most `rate` a second with a burst of `rate`, over `elapsed`.
fn allowed(rate: u32, elapsed: Duration) -> usize {
    rate as usize + (f64::from(rate) * elapsed.as_secs_f64()).ceil() as usize
}

/// Checks that each answer is `expected` or a proper `429`, and that the
/// passes stay within the user limit; returns (passed, limited).
fn tally(answers: &[Answer], expected: StatusCode, rate: u32, elapsed: Duration) -> (usize, usize) {
    let mut passed = 0;
    let mut limited = 0;
    for a in answers {
        if a.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(code(&a.body), "rate_limited", "{}", a.body);
            assert!(
                a.retry_after.is_some_and(|s| s >= 1),
                "Retry-After on a 429"
            );
            limited += 1;
        } else {
            assert_eq!(a.status, expected, "{}", a.body);
            passed += 1;
        }
    }
    assert!(
        passed <= allowed(rate, elapsed),
        "{passed} passed in {elapsed:?} at {rate}/s"
    );
    (passed, limited)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_pay_requests_from_one_user_is_rate_limited_and_so_are_the_other_order_routes() {
    const RATE: u32 = 5;
    const STORM: usize = 60;
    let mut app = spawn_app_with(Role::Serve, |s| s.rate_user = RATE).await;
    let id = app.active_promotion(5, 1).await;

    let started = Instant::now();
    let storm =
        join_all((0..STORM).map(|_| async {
            order_action(&app, &uuid::Uuid::now_v7().to_string(), "pay", 1).await
        }))
        .await;
    let (passed, limited) = tally(&storm, StatusCode::NOT_FOUND, RATE, started.elapsed());
    println!("pay storm of {STORM} by one user at {RATE}/s: {passed} × 404, {limited} × 429");
    assert!(limited >= STORM - allowed(RATE, started.elapsed()));

    // Another user has a budget of their own.
    let other = order_action(&app, &uuid::Uuid::now_v7().to_string(), "pay", 99).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND, "{}", other.body);

    // Cancel, the order list and the purchase result, each by a user of its own.
    let routes: [(&str, i64, StatusCode); 3] = [
        ("cancel", 2, StatusCode::NOT_FOUND),
        ("/api/orders", 3, StatusCode::OK),
        ("result", 4, StatusCode::OK),
    ];
    let app_ref = &app;
    for (route, user, expected) in routes {
        let started = Instant::now();
        let answers = join_all((0..30).map(|_| async move {
            let app = app_ref;
            match route {
                "cancel" => {
                    order_action(app, &uuid::Uuid::now_v7().to_string(), "cancel", user).await
                }
                "result" => get_as(app, &format!("/api/promotions/{id}/result"), user).await,
                path => get_as(app, path, user).await,
            }
        }))
        .await;
        let (passed, limited) = tally(&answers, expected, RATE, started.elapsed());
        println!("{route}: 30 at once by one user: {passed} passed, {limited} × 429");
        assert!(limited > 0, "{route} is rate limited per user");
    }
    app.stop().await;
}

// ------------------------------------------------------ the workers' own pool

/// Waits until a backend of the app's database waits for a row lock.
async fn wait_for_a_lock_waiter(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&app.db)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pay request never reached the row lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The handlers' pool has one connection, and a payment blocked on a row
/// lock the test holds keeps it. Before, the workers shared that pool and
/// could not write a single order until the lock went; now they have their
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_workers_persist_orders_while_order_requests_hold_every_api_connection() {
    let mut app = spawn_app_with(Role::Serve, |s| s.db_max_connections = 1).await;
    let id = app.active_promotion(5, 1).await;
    let first = app.buy(id, 1).await;
    assert_eq!(app.wait_for_rows(id, 1, Duration::from_secs(20)).await, 1);

    let mut lock = app.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orders WHERE order_id = $1 FOR UPDATE")
        .bind(&first)
        .execute(&mut *lock)
        .await
        .unwrap();
    let pay = {
        let client = app.client.clone();
        let url = app.url(&format!("/api/orders/{first}/pay"));
        tokio::spawn(async move { send(client.post(url).bearer_auth(user_token(1))).await })
    };
    wait_for_a_lock_waiter(&app).await;

    // The handlers' pool is taken: another request waits for its
    // acquire timeout and is told to come back.
    let starved = get_as(&app, "/api/orders", 2).await;
    assert_eq!(
        (starved.status, code(&starved.body)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "the API pool is exhausted"
    );

    // Yet a new order reaches PostgreSQL through the workers' pool.
    let started = Instant::now();
    app.buy(id, 2).await;
    let rows = app.wait_for_rows(id, 2, Duration::from_secs(10)).await;
    println!(
        "with every API connection held: second order persisted in {:.2?}",
        started.elapsed()
    );
    assert_eq!(
        rows, 2,
        "the workers wrote the order while the API pool was held"
    );
    assert!(
        !pay.is_finished(),
        "the payment still waits for the row lock"
    );

    lock.commit().await.unwrap();
    let paid = pay.await.unwrap();
    assert_eq!(paid.status, StatusCode::OK, "{}", paid.body);
    assert_eq!(paid.body["status"], "paid");
    app.stop().await;
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

// ------------------------------------------------------------------ metrics

/// The metric names a text uses, as series names of the exposition.
fn metric_names_in(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("seckill_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out.sort();
    out.dedup();
    out
}

/// What the dashboard and the alerts use: the Grafana dashboards, the
/// Prometheus files, and the "What to alert on" list of the operations guide.
fn names_the_dashboard_and_alerts_use() -> Vec<String> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = String::new();
    for dir in ["deploy/grafana/dashboards", "deploy/prometheus"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
        }
    }
    let ops = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let alerts = ops
        .split_once("What to alert on:")
        .expect("docs/operations.md lists what to alert on")
        .1;
    let alerts = alerts.split("\n## ").next().unwrap();
    text.push_str(alerts);
    metric_names_in(&text)
}

/// A fresh process (the recorder is process-wide, so the in-process
/// gateways of other tests would hide a missing name): before any traffic,
/// `/metrics` already has a series of every name the dashboard and alerts use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_gateway_exports_every_metric_the_dashboard_and_alerts_use() {
    let settings = test_settings();
    let gateway = GatewayProc::start(&settings, &[]).await;
    let text = reqwest::get(format!("http://{}/metrics", gateway.addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .collect();
    let wanted = names_the_dashboard_and_alerts_use();
    assert!(wanted.len() >= 15, "{wanted:?}");
    // A histogram is exported as its `_bucket`, `_sum` and `_count` series.
    let is_exported = |name: &str| {
        ["", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| exported.contains(&format!("{name}{suffix}").as_str()))
    };
    let missing: Vec<&String> = wanted.iter().filter(|name| !is_exported(name)).collect();
    println!(
        "a fresh gateway exports {} series; the dashboard and alerts use {} names; missing: {missing:?}",
        exported.len(),
        wanted.len()
    );
    assert!(missing.is_empty(), "missing from /metrics: {missing:?}");
    // The dashboard's drift and 5xx queries have a value, 0, not "no data".
    assert!(text.contains("\nseckill_reconcile_drift 0\n"), "{text}");
    assert!(
        text.contains(r#"seckill_http_requests_total{route="purchase",status="503"} 0"#),
        "{text}"
    );
}
