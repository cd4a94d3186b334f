//! Property-based checks of the request parser and the JSON bodies: random
//! bytes, random JSON and random paths never produce a 5xx or a panic, and
//! leave nothing behind.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use reqwest::StatusCode;
use seckill::app::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{ADMIN_TOKEN, spawn_app_with, user_token};

/// Draws `n` values of `strategy` (no shrinking: the failing input is printed).
fn samples<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::new(Config::default());
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// JSON-looking values: right keys with wrong types, wrong keys, nesting.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        Just(serde_json::Value::from("2026-11-22T12:00:00Z")),
        Just(serde_json::Value::from("+275760-09-13T00:00:00Z")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        let keys = prop_oneof![
            Just("name".to_string()),
            Just("stock".to_string()),
            Just("per_user_limit".to_string()),
            Just("price_cents".to_string()),
            Just("starts_at".to_string()),
            Just("ends_at".to_string()),
            Just("require_token".to_string()),
            Just("token".to_string()),
            Just("captcha_id".to_string()),
            "[a-z_]{1,12}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(keys, inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_json_bodies_never_produce_a_5xx() {
    let mut app = spawn_app_with(Role::Serve, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    let bodies = samples(json_value(), 300);
    let raw = samples(prop::collection::vec(any::<u8>(), 0..200), 100);
    let routes = [
        (reqwest::Method::POST, "/admin/promotions".to_string(), true),
        (
            reqwest::Method::PUT,
            format!("/admin/promotions/{id}"),
            true,
        ),
        (
            reqwest::Method::POST,
            format!("/api/promotions/{id}/purchase"),
            false,
        ),
        (
            reqwest::Method::POST,
            format!("/api/promotions/{id}/token"),
            false,
        ),
    ];
    let mut created = 0;
    for (i, body) in bodies
        .iter()
        .map(|v| serde_json::to_vec(v).unwrap())
        .chain(raw)
        .enumerate()
    {
        let (method, path, admin) = &routes[i % routes.len()];
        let token = if *admin {
            ADMIN_TOKEN.to_string()
        } else {
            user_token(5)
        };
        let res = app
            .client
            .request(method.clone(), app.url(path))
            .bearer_auth(token)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = res.status();
        assert!(
            !status.is_server_error(),
            "{method} {path} with {:?} → {status}",
            String::from_utf8_lossy(&body)
        );
        if status == StatusCode::CREATED {
            created += 1;
        }
        if !status.is_success() {
            let v: serde_json::Value = res.json().await.expect("error bodies are JSON");
            assert!(v["error"]["code"].is_string());
        }
    }
    // Random bodies practically never form a valid promotion.
    let listed = app
        .admin(reqwest::Method::GET, "/admin/promotions", None)
        .await
        .1;
    assert_eq!(listed["promotions"].as_array().unwrap().len(), 1 + created);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_request_lines_and_headers_never_produce_a_5xx() {
    let mut app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let heads = samples(
        (
            prop_oneof![
                Just("GET".to_string()),
                Just("POST".to_string()),
                "[A-Z]{1,8}",
                ".{0,10}"
            ],
            prop_oneof![
                Just("/api/promotions/1/purchase".to_string()),
                Just("/admin/promotions/x".to_string()),
                "/[ -~]{0,60}",
                ".{0,60}"
            ],
            prop::collection::vec(("[ -~]{0,20}", "[ -~]{0,40}"), 0..5),
            prop::collection::vec(any::<u8>(), 0..64),
        ),
        200,
    );
    for (method, path, headers, tail) in heads {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n").into_bytes();
        for (k, v) in &headers {
            req.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        req.extend_from_slice(b"Connection: close\r\n\r\n");
        req.extend_from_slice(&tail);
        let mut s = tokio::net::TcpStream::connect(app.addr).await.unwrap();
        let _ = s.write_all(&req).await;
        let mut out = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            !text.starts_with("HTTP/1.1 5"),
            "{:?} → {}",
            String::from_utf8_lossy(&req),
            text.lines().next().unwrap_or("")
        );
    }
    // Still serving.
    let status = app
        .client
        .get(app.url("/health"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}
