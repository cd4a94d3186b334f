//! `GET /openapi.json`: the document served is `docs/openapi.json`, public
//! and cacheable. (The document against the route table and the error codes:
//! the unit tests in `src/http/handlers/openapi.rs`; against live answers:
//! `scripts/schemathesis.sh`.) Below it, each answer Schemathesis found
//! wrong, pinned as a regression test.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_error, read, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_json_serves_docs_openapi_json_with_an_etag_and_answers_304_to_it() {
    let mut app = spawn_app().await;
    let file = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json"))
        .expect("docs/openapi.json");

    // No credentials: the document is public.
    let res = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(res.headers()["cache-control"], "public, max-age=300");
    let etag = res.headers()["etag"].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "a strong ETag: {etag}"
    );
    let body = res.bytes().await.unwrap();
    assert!(
        body.as_ref() == file.as_slice(),
        "the served document is docs/openapi.json"
    );
    let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    // A cache holding this version gets a 304 without a body.
    let res = app
        .client
        .get(app.url("/openapi.json"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(res.headers()["etag"], etag.as_str());
    assert!(res.bytes().await.unwrap().is_empty());

    // Another version's tag gets the document.
    let res = app
        .client
        .get(app.url("/openapi.json"))
        .header("if-none-match", "\"0000000000000000\"")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);

    // Only GET.
    let res = app
        .client
        .post(app.url("/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(res.headers()["allow"], "GET");
    app.stop().await;
}

/// Found by Schemathesis: a login whose username held a NUL byte was looked
/// up in PostgreSQL, which refuses such text, and the answer was `500`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_with_a_nul_byte_or_non_ascii_in_the_username_is_401_invalid_credentials_not_500() {
    let mut app = spawn_app().await;
    for username in ["buyer\u{0}one", "\u{0}", "b\u{fc}yer", "UPPER", "x"] {
        let res = app
            .client
            .post(app.url("/api/login"))
            .json(&json!({"username": username, "password": "a password of some length"}))
            .send()
            .await
            .unwrap();
        let (status, body) = read(res).await;
        assert_error(
            status,
            &body,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            &format!("login as {username:?}"),
        );
    }
    app.stop().await;
}
