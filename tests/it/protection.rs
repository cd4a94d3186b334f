//! Edge protection: rate limits, the local sold-out flag, admission tokens,
//! captcha, the in-flight bound, slow clients and hostile input.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;
use seckill::stock::Buyer;
use seckill::stock::Outcome;
use seckill::stock::coalesce::{Coalescer, MAX_CALLS};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{
    TestApp, active_body, code, read, spawn_with_settings, test_settings, user_token,
};
use crate::procs::RedisProc;

/// A counter from `INFO commandstats` / `INFO stats` of a private Redis.
async fn redis_stat(url: &str, section: &str, field: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(&mut conn)
        .await
        .unwrap();
    for line in info.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            // `cmdstat_x:calls=N,...` or `field:N`
            let rest = rest.trim_start_matches(':');
            let value = rest.strip_prefix("calls=").unwrap_or(rest);
            return value.split(',').next().unwrap().trim().parse().unwrap();
        }
    }
    0
}

async fn commandstats(url: &str) -> std::collections::BTreeMap<String, i64> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_string(), calls))
        })
        .collect()
}

fn diff(
    before: &std::collections::BTreeMap<String, i64>,
    after: &std::collections::BTreeMap<String, i64>,
) -> String {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0 && k != "info").then(|| format!("{k}={d}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn app_on_private_redis(
    role: Role,
    tweak: impl FnOnce(&mut seckill::config::Settings),
) -> (TestApp, RedisProc) {
    let redis = RedisProc::start(false).await;
    let mut settings = test_settings();
    settings.redis_url = redis.url();
    tweak(&mut settings);
    (spawn_with_settings(role, settings).await, redis)
}

async fn post(
    app: &TestApp,
    path: impl AsRef<str>,
    user: i64,
    body: Value,
) -> (StatusCode, Value, Option<String>) {
    let res = app
        .client
        .post(app.url(path.as_ref()))
        .bearer_auth(user_token(user))
        .json(&body)
        .send()
        .await
        .unwrap();
    let retry = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let (status, body) = read(res).await;
    (status, body, retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_1000_purchases_by_one_user_reaches_redis_only_within_the_user_limit() {
    let (mut app, redis) = app_on_private_redis(Role::GatewayOnly, |s| s.rate_user = 10).await;
    let id = app.active_promotion(1000, 1000).await;
    // Another buyer's purchase loads the script into this fresh Redis (the
    // first EVALSHA meets NOSCRIPT), so the count below is of this burst only.
    app.buy(id, 8).await;
    let before = redis_stat(&redis.url(), "commandstats", "cmdstat_evalsha").await;

    let started = Instant::now();
    let answers = join_all(
        (0..1000).map(|_| post(&app, format!("/api/promotions/{id}/purchase"), 7, json!({}))),
    )
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let calls = redis_stat(&redis.url(), "commandstats", "cmdstat_evalsha").await - before;

    let bought = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::OK)
        .count() as i64;
    let limited: Vec<_> = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    // A burst of 10, then 10 per second for as long as the burst lasted.
    let allowed = 10 + (10.0 * elapsed).ceil() as i64;
    println!(
        "1000 purchases by one user in {elapsed:.2} s at 10/s: {bought} bought, {} x 429, {calls} script calls (allowed {allowed})",
        limited.len()
    );
    // Every purchase that passed the limiter reached the script and bought
    // (stock and per-user limit are 1000); concurrent ones may share a call.
    assert!(
        bought <= allowed,
        "{bought} purchases reached Redis > {allowed}"
    );
    assert!(
        (1..=bought).contains(&calls),
        "{calls} script calls for {bought} purchases"
    );
    let others: Vec<_> = answers
        .iter()
        .filter(|(s, _, _)| *s != StatusCode::OK && *s != StatusCode::TOO_MANY_REQUESTS)
        .map(|(s, b, _)| (s.as_u16(), b.clone()))
        .collect();
    assert!(others.is_empty(), "neither bought nor limited: {others:?}");
    assert_eq!(bought + limited.len() as i64, 1000);
    for (_, body, retry) in &limited {
        assert_eq!(code(body), "rate_limited");
        assert!(
            retry
                .as_deref()
                .is_some_and(|r| r.parse::<u64>().unwrap() >= 1)
        );
    }
    app.stop().await;
}

async fn list_from(app: &TestApp, forwarded_for: &str) -> StatusCode {
    app.client
        .get(app.url("/api/promotions"))
        .header("x-forwarded-for", forwarded_for)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_honoured_from_a_trusted_peer_and_ignored_from_others() {
    let mut trusted = spawn_with_settings(Role::GatewayOnly, {
        let mut s = test_settings();
        s.rate_ip = 2;
        s.trusted_proxies = seckill::config::parse_trusted("127.0.0.1").unwrap();
        s
    })
    .await;
    assert_eq!(list_from(&trusted, "203.0.113.1").await, StatusCode::OK);
    assert_eq!(list_from(&trusted, "203.0.113.1").await, StatusCode::OK);
    assert_eq!(
        list_from(&trusted, "203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same proxy has a budget of its own.
    assert_eq!(list_from(&trusted, "203.0.113.2").await, StatusCode::OK);
    trusted.stop().await;

    let mut untrusted = spawn_with_settings(Role::GatewayOnly, {
        let mut s = test_settings();
        s.rate_ip = 2;
        s.trusted_proxies = seckill::config::parse_trusted("10.0.0.0/8").unwrap();
        s
    })
    .await;
    assert_eq!(list_from(&untrusted, "203.0.113.1").await, StatusCode::OK);
    assert_eq!(list_from(&untrusted, "203.0.113.2").await, StatusCode::OK);
    assert_eq!(
        list_from(&untrusted, "203.0.113.3").await,
        StatusCode::TOO_MANY_REQUESTS,
        "a forged header from an untrusted peer buys no budget"
    );
    untrusted.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_sell_out_10000_purchases_are_refused_with_a_handful_of_redis_calls() {
    let (mut app, redis) = app_on_private_redis(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(1, 1).await;
    app.buy(id, 1).await;
    assert_eq!(app.purchase(id, 2).await.0, StatusCode::GONE);

    let before = commandstats(&redis.url()).await;
    let started = Instant::now();
    let app_ref = &app;
    let answers: Vec<StatusCode> = futures_util::stream::iter(3..10_003)
        .map(|u| async move { app_ref.purchase(id, u).await.0 })
        .buffer_unordered(200)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let after = commandstats(&redis.url()).await;
    let delta =
        |cmd: &str| after.get(cmd).copied().unwrap_or(0) - before.get(cmd).copied().unwrap_or(0);
    // Redis counts the commands a script runs too: each purchase script
    // runs one HMGET, so the gateway's own HMGETs (meta loads) are the rest.
    let scripts = delta("evalsha");
    let meta_loads = delta("hmget") - scripts;
    let round_trips = scripts + meta_loads;
    println!(
        "10000 purchases after the sell-out in {elapsed:.2} s: {} x 410; redis round trips: {scripts} purchase scripts + {meta_loads} meta loads = {round_trips} ({:.5} per request); all commands: {}",
        answers.iter().filter(|s| **s == StatusCode::GONE).count(),
        round_trips as f64 / 10_000.0,
        diff(&before, &after)
    );
    assert!(answers.iter().all(|s| *s == StatusCode::GONE));
    // One re-check of the aged flag and one meta reload per second (1 s TTLs).
    let per_ttl = elapsed.ceil() as i64 + 1;
    assert!(scripts <= per_ttl, "{scripts} purchase scripts > {per_ttl}");
    assert!(meta_loads <= per_ttl, "{meta_loads} meta loads > {per_ttl}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cancel_on_one_gateway_clears_the_sold_out_flag_of_another() {
    let mut settings = test_settings();
    settings.sold_out_ttl = Duration::from_secs(120);
    let mut a = spawn_with_settings(Role::Serve, settings.clone()).await;
    let mut b = spawn_with_settings(Role::GatewayOnly, settings).await;
    let id = a.active_promotion(1, 1).await;
    let order = a.buy(id, 1).await;
    assert_eq!(
        b.purchase(id, 2).await.0,
        StatusCode::GONE,
        "b flags the promotion sold out"
    );
    a.wait_for_rows(id, 1, Duration::from_secs(20)).await;

    assert_eq!(a.order_action(&order, "cancel", 1).await.0, StatusCode::OK);
    let (status, body) = b
        .purchase_until_not_sold_out(id, 2, Duration::from_secs(5))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "b sells the returned unit long before its flag's TTL: {body}"
    );
    b.stop().await;
    a.stop().await;
}

async fn token_promotion(app: &TestApp, stock: i64, captcha: bool) -> i64 {
    let mut body = active_body(stock, 1);
    body["require_token"] = json!(true);
    body["require_captcha"] = json!(captcha);
    app.create_promotion(body).await["id"].as_i64().unwrap()
}

async fn token_for(app: &TestApp, id: i64, user: i64) -> String {
    let (status, body, _) =
        post(app, &format!("/api/promotions/{id}/token"), user, json!({})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["expires_at"].is_string());
    body["token"].as_str().unwrap().to_string()
}

async fn buy_with(app: &TestApp, id: i64, user: i64, token: Option<&str>) -> (StatusCode, Value) {
    let body = match token {
        Some(t) => json!({"token": t}),
        None => json!({}),
    };
    let (status, body, _) = post(app, format!("/api/promotions/{id}/purchase"), user, body).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_tokens_are_bound_to_user_promotion_and_time() {
    let mut app = spawn_with_settings(Role::Serve, {
        let mut s = test_settings();
        s.token_ttl = Duration::from_secs(1);
        s
    })
    .await;
    let id = token_promotion(&app, 10, false).await;
    let other = token_promotion(&app, 10, false).await;

    for (user, token) in [
        (1, None),
        (1, Some("garbage".to_string())),
        (1, Some(format!("{id}.1.99999999999999.AAAA"))),
    ] {
        let (status, body) = buy_with(&app, id, user, token.as_deref()).await;
        assert_eq!(
            (status, code(&body)),
            (StatusCode::FORBIDDEN, "invalid_token"),
            "{token:?}"
        );
    }
    let token_a = token_for(&app, id, 1).await;
    let (status, body) = buy_with(&app, id, 2, Some(&token_a)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_token"),
        "A's token used by B"
    );
    let token_other = token_for(&app, other, 1).await;
    let (status, body) = buy_with(&app, id, 1, Some(&token_other)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_token"),
        "another promotion's token"
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = buy_with(&app, id, 1, Some(&token_a)).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_token"),
        "expired token"
    );
    assert_eq!(
        app.stats(id).await["sold"],
        0,
        "no refused token sold anything"
    );

    let fresh = token_for(&app, id, 1).await;
    let (status, body) = buy_with(&app, id, 1, Some(&fresh)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_issuance_stops_at_the_cap() {
    let mut app = spawn_with_settings(Role::Serve, {
        let mut s = test_settings();
        s.token_cap_multiple = 2;
        s
    })
    .await;
    let id = token_promotion(&app, 3, false).await;
    let answers =
        join_all((1..=20).map(|u| post(&app, format!("/api/promotions/{id}/token"), u, json!({}))))
            .await;
    let issued = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::OK)
        .count();
    let refused = answers
        .iter()
        .filter(|(s, b, _)| *s == StatusCode::GONE && code(b) == "sold_out")
        .count();
    assert_eq!((issued, refused), (6, 14), "cap = 3 units x 2");
    // An admitted buyer may ask again; it takes no new seat.
    let admitted = answers
        .iter()
        .position(|(s, _, _)| *s == StatusCode::OK)
        .unwrap() as i64
        + 1;
    token_for(&app, id, admitted).await;
    app.stop().await;
}

async fn challenge(app: &TestApp, id: i64, user: i64) -> (String, String) {
    let res = app
        .client
        .get(app.url(&format!("/api/promotions/{id}/captcha")))
        .bearer_auth(user_token(user))
        .send()
        .await
        .unwrap();
    let (status, body) = read(res).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let captcha_id = body["captcha_id"].as_str().unwrap().to_string();
    let png = base64_decode(body["image_png_base64"].as_str().unwrap());
    assert_eq!(&png[..4], b"\x89PNG");
    // The answer, as the gateway stored it (a person would read the image).
    let mut conn = app.redis.clone();
    let stored: String = redis::cmd("GET")
        .arg(app.keys.captcha(id, &captcha_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    let answer = stored.split_once(':').unwrap().1.to_string();
    (captcha_id, answer)
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_captcha_answered_wrong_twice_or_late_is_refused() {
    let mut app = spawn_with_settings(Role::Serve, {
        let mut s = test_settings();
        s.captcha_ttl = Duration::from_secs(1);
        s
    })
    .await;
    let id = token_promotion(&app, 5, true).await;
    let path = format!("/api/promotions/{id}/token");

    let (status, body, _) = post(&app, &path, 1, json!({})).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_captcha"),
        "no answer"
    );

    let (cid, _) = challenge(&app, id, 1).await;
    let (status, body, _) = post(
        &app,
        &path,
        1,
        json!({"captcha_id": cid, "answer": "WRONG"}),
    )
    .await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_captcha"),
        "wrong answer"
    );

    let (cid, answer) = challenge(&app, id, 1).await;
    let (status, body, _) =
        post(&app, &path, 2, json!({"captcha_id": cid, "answer": answer})).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_captcha"),
        "another user's challenge"
    );

    let (cid, answer) = challenge(&app, id, 1).await;
    let (status, body, _) = post(
        &app,
        &path,
        1,
        json!({"captcha_id": cid, "answer": answer.to_lowercase()}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "right answer: {body}");
    let token = body["token"].as_str().unwrap().to_string();
    let (status, body, _) =
        post(&app, &path, 1, json!({"captcha_id": cid, "answer": answer})).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_captcha"),
        "answered twice"
    );

    let (cid, answer) = challenge(&app, id, 1).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body, _) =
        post(&app, &path, 1, json!({"captcha_id": cid, "answer": answer})).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::FORBIDDEN, "invalid_captcha"),
        "expired"
    );

    let (status, body) = buy_with(&app, id, 1, Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "captcha → token → purchase: {body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purchases_in_flight_over_the_bound_get_503_at_once() {
    let (mut app, redis) = app_on_private_redis(Role::GatewayOnly, |s| s.max_inflight = 4).await;
    let id = app.active_promotion(100, 1).await;
    app.buy(id, 1).await; // warms the meta cache

    // Redis stops answering for three seconds: the first four purchases
    // hold every permit while they wait.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();

    let app_ref = &app;
    let answers = join_all((2..22).map(|u| async move {
        let started = Instant::now();
        let (status, body, retry) = post(
            app_ref,
            format!("/api/promotions/{id}/purchase"),
            u,
            json!({}),
        )
        .await;
        (status, body, retry, started.elapsed())
    }))
    .await;
    let overflow: Vec<_> = answers
        .iter()
        .filter(|(s, b, _, _)| {
            *s == StatusCode::SERVICE_UNAVAILABLE
                && b["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("in flight")
        })
        .collect();
    println!(
        "20 purchases against a stalled redis with 4 permits: {} refused at once (slowest {:?})",
        overflow.len(),
        overflow.iter().map(|a| a.3).max()
    );
    assert!(overflow.len() >= 16, "{answers:?}");
    for (_, body, retry, took) in &overflow {
        assert_eq!(code(body), "unavailable");
        assert!(retry.is_some());
        assert!(
            *took < Duration::from_secs(3),
            "answered before redis came back: {took:?}"
        );
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_sending_headers_one_byte_a_second_is_cut_off_and_others_are_served() {
    let mut app = spawn_with_settings(Role::GatewayOnly, {
        let mut s = test_settings();
        s.header_timeout = Duration::from_secs(1);
        s
    })
    .await;
    // The ordinary client opens a fresh connection per request: an idle
    // keep-alive connection is itself closed after the 1 s header timeout,
    // and reusing one at that instant would race the close.
    let ordinary = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut_off = None;
    for byte in request.iter() {
        if slow.write_all(&[*byte]).await.is_err() {
            cut_off = Some(started.elapsed());
            break;
        }
        // Meanwhile an ordinary client is served.
        let status = ordinary
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK);
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(1), slow.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                cut_off = Some(started.elapsed());
                break;
            }
            Ok(Ok(n)) => {
                // hyper may answer 408 before closing.
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            }
            Err(_) => {}
        }
    }
    let cut_off = cut_off.expect("the slow client was disconnected");
    println!("slowloris client cut off after {cut_off:?} (header timeout 1 s)");
    assert!(cut_off < Duration::from_secs(5), "{cut_off:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_a_new_client_waits_until_a_slot_frees() {
    let mut app = spawn_with_settings(Role::GatewayOnly, {
        let mut s = test_settings();
        s.max_connections = 1;
        s
    })
    .await;
    let mut first = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    first
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = first.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    // The first connection stays open (keep-alive) and holds the only slot.
    let mut second = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    second
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let waited =
        tokio::time::timeout(Duration::from_millis(500), second.read_to_end(&mut out)).await;
    assert!(waited.is_err(), "not served while the cap is reached");

    drop(first);
    tokio::time::timeout(Duration::from_secs(10), second.read_to_end(&mut out))
        .await
        .expect("served once the slot frees")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id_and_a_sane_incoming_one_is_kept() {
    let mut app = spawn_with_settings(Role::GatewayOnly, test_settings()).await;
    let res = app.client.get(app.url("/health")).send().await.unwrap();
    let generated = res.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(!generated.is_empty());
    let res = app
        .client
        .get(app.url("/nowhere"))
        .header("x-request-id", "nginx-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    assert_eq!(res.headers()["x-request-id"], "nginx-abc-123");
    let res = app
        .client
        .get(app.url("/health"))
        .header("x-request-id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    assert_ne!(
        res.headers()["x-request-id"].len(),
        500,
        "an oversized id is replaced"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused_without_reaching_a_handler() {
    let mut app = spawn_with_settings(Role::GatewayOnly, test_settings()).await;
    let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let req = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 400"),
        "{}",
        text.lines().next().unwrap_or("")
    );
    assert!(!text.starts_with("HTTP/1.1 200"));
    // And the gateway still serves everyone else.
    assert_eq!(
        app.client
            .get(app.url("/health"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purchases_queued_behind_calls_in_flight_share_the_next_calls_and_each_gets_its_answer() {
    let (mut app, redis) = app_on_private_redis(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(100, 1).await;
    // Loads the script into this fresh Redis (the first EVALSHA meets NOSCRIPT).
    app.buy(id, 1).await;
    // The coalescer the gateway uses, on a connection of its own that waits
    // out the pause below.
    let conn = seckill::stock::store::connect(
        &redis.url(),
        seckill::stock::ConnectOptions::commands(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let coalescer = Coalescer::new(seckill::stock::Store::new(conn, app.keys.clone()), 64);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let before = redis_stat(&redis.url(), "commandstats", "cmdstat_evalsha").await;

    // Redis holds every script call until told to go on: the first calls
    // wait in flight, and every purchase after them must queue.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(20_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    // 300 new buyers for the 99 units left, and 50 of them twice.
    let users: Vec<i64> = (1000..1300).chain(1000..1050).collect();
    let tasks: Vec<_> = users
        .iter()
        .map(|&user_id| {
            let coalescer = Arc::clone(&coalescer);
            tokio::spawn(async move {
                let buyer = Buyer {
                    user_id,
                    order_id: uuid::Uuid::now_v7().to_string(),
                };
                let order_id = buyer.order_id.clone();
                (user_id, order_id, coalescer.purchase(id, buyer).await)
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while coalescer.pending(id) < users.len() {
        assert!(Instant::now() < deadline, "purchases never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let answers = join_all(tasks).await;
    let calls = redis_stat(&redis.url(), "commandstats", "cmdstat_evalsha").await - before;

    let mut winners = HashSet::new();
    let mut refused = 0;
    for answer in answers {
        let (user, order_id, outcome) = answer.unwrap();
        match outcome.unwrap() {
            Outcome::Bought { order_id: got } => {
                assert_eq!(got, order_id, "each buyer gets its own order");
                assert!(winners.insert(user), "user {user} bought twice");
            }
            Outcome::SoldOut | Outcome::AlreadyPurchased => refused += 1,
            other => panic!("user {user}: unexpected {other:?}"),
        }
    }
    println!(
        "{} purchases queued behind {} calls in flight: {} bought, {refused} refused, in {calls} script calls",
        users.len(),
        MAX_CALLS,
        winners.len()
    );
    assert_eq!(winners.len(), 99, "every unit left sold, none twice");
    assert_eq!(winners.len() + refused, users.len());
    // The calls in flight, then the rest 64 buyers at a time.
    let most = MAX_CALLS + users.len().div_ceil(64);
    assert!(
        (1..=most as i64).contains(&calls),
        "{calls} script calls for {} queued purchases (at most {most})",
        users.len()
    );
    let stats = app.stats(id).await;
    assert_eq!(stats["remaining"], 0, "{stats}");
    assert_eq!(stats["sold"], 100, "{stats}");
    app.stop().await;
}

/// API.md: `404`, `403 not_started`/`ended` and `410 sold_out` are public
/// facts and may come before the JWT check; the purchase handler answers them
/// first, and everything that reads or changes a buyer's state still needs a
/// valid JWT (`401`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purchase_answers_the_public_facts_before_the_jwt_and_the_rest_after_it() {
    let mut app = crate::helpers::spawn_app().await;
    let on_sale = app.active_promotion(1, 1).await;
    let now = chrono::Utc::now();
    let upcoming = app
        .create_promotion(json!({
            "name": "later", "stock": 5, "per_user_limit": 1, "price_cents": 100,
            "starts_at": crate::helpers::rfc3339(now + chrono::Duration::hours(1)),
            "ends_at": crate::helpers::rfc3339(now + chrono::Duration::hours(2)),
        }))
        .await["id"]
        .as_i64()
        .unwrap();
    let anonymous = |path: String, bearer: Option<&'static str>| {
        let mut req = app.client.post(app.url(&path)).json(&json!({}));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move { read(req.send().await.expect("answered")).await }
    };
    let buy = |id: i64| format!("/api/promotions/{id}/purchase");

    // On sale: the buyer's state is at stake, so the JWT comes first.
    let (status, v) = anonymous(buy(on_sale), None).await;
    crate::helpers::assert_error(
        status,
        &v,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "on sale, no JWT",
    );
    let (status, v) = app.purchase(on_sale, 1).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let (status, v) = app.purchase(on_sale, 2).await;
    crate::helpers::assert_error(
        status,
        &v,
        StatusCode::GONE,
        "sold_out",
        "the script's sold out",
    );
    // Sold out (the local flag), unknown, not started, bad id: before the JWT.
    for bearer in [None, Some("not-a-jwt")] {
        let (status, v) = anonymous(buy(on_sale), bearer).await;
        crate::helpers::assert_error(
            status,
            &v,
            StatusCode::GONE,
            "sold_out",
            "sold out, no valid JWT",
        );
        let (status, v) = anonymous(buy(upcoming), bearer).await;
        crate::helpers::assert_error(
            status,
            &v,
            StatusCode::FORBIDDEN,
            "not_started",
            "upcoming, no valid JWT",
        );
        let (status, v) = anonymous(buy(987_654_321), bearer).await;
        crate::helpers::assert_error(
            status,
            &v,
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown, no valid JWT",
        );
        let (status, v) = anonymous("/api/promotions/abc/purchase".into(), bearer).await;
        crate::helpers::assert_error(
            status,
            &v,
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "bad id, no valid JWT",
        );
    }
    app.stop().await;
}
