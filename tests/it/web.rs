//! `seckill serve` serves the pages of `web/` (`/`, `/console/`,
//! `/assets/{file}`) from the binary, with their types and cache and
//! security headers; `GET /admin/reconcile` is the reconcile report as JSON.

use reqwest::StatusCode;
use reqwest::header::{
    ALLOW, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH,
};

use crate::helpers::{ADMIN_TOKEN, read, spawn_app, user_token};

fn web_file(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("web")
            .join(path),
    )
    .unwrap()
}

#[tokio::test]
async fn the_gateway_serves_the_pages_with_types_etags_and_a_policy_without_inline_script() {
    let app = spawn_app().await;
    for (path, file, ctype) in [
        ("/", "index.html", "text/html; charset=utf-8"),
        (
            "/console/",
            "console/index.html",
            "text/html; charset=utf-8",
        ),
        (
            "/assets/common.js",
            "assets/common.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/assets/sale.js",
            "assets/sale.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/assets/console.js",
            "assets/console.js",
            "text/javascript; charset=utf-8",
        ),
        (
            "/assets/style.css",
            "assets/style.css",
            "text/css; charset=utf-8",
        ),
    ] {
        let res = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let headers = res.headers().clone();
        assert_eq!(headers[CONTENT_TYPE], ctype, "{path}");
        assert_eq!(headers[CACHE_CONTROL], "no-cache", "{path}");
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(csp.contains("script-src 'self'"), "{path}: {csp}");
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        assert_eq!(res.text().await.unwrap(), web_file(file), "{path}");

        let etag = headers[ETAG].clone();
        let again = app
            .client
            .get(app.url(path))
            .header(IF_NONE_MATCH, etag.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert_eq!(again.headers()[ETAG], etag, "{path}");
        assert!(again.bytes().await.unwrap().is_empty(), "{path}");

        // Other methods, HEAD included, as on every route: 405 with Allow.
        for method in [reqwest::Method::HEAD, reqwest::Method::POST] {
            let res = app
                .client
                .request(method.clone(), app.url(path))
                .send()
                .await
                .unwrap();
            assert_eq!(
                res.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(res.headers()[ALLOW], "GET", "{method} {path}");
        }
    }
    // No other file, and no way out of the list.
    for path in [
        "/assets/nope.js",
        "/assets/..%2FCargo.toml",
        "/assets/%2e%2e%2fsrc%2fmain.rs",
        "/console",
        "/index.html",
    ] {
        let (status, body) = read(app.client.get(app.url(path)).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
}

#[tokio::test]
async fn the_public_promotions_carry_the_server_time_of_redis() {
    let app = spawn_app().await;
    let id = app.active_promotion(5, 1).await;
    for path in [
        "/api/promotions".to_string(),
        format!("/api/promotions/{id}"),
    ] {
        let before = chrono::Utc::now().timestamp_millis();
        let res = app.client.get(app.url(&path)).send().await.unwrap();
        let after = chrono::Utc::now().timestamp_millis();
        assert_eq!(res.status(), StatusCode::OK);
        let server: i64 = res.headers()["x-server-time"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // Redis runs on this machine: its clock is this one's, give or take
        // the sync of the gateway's offset.
        assert!(
            server >= before - 1_000 && server <= after + 1_000,
            "{path}: {server} not within [{before}, {after}]"
        );
    }
}

#[tokio::test]
async fn admin_reconcile_reports_each_promotion_as_json_and_only_to_the_admin() {
    let app = spawn_app().await;
    let id = app.active_promotion(10, 1).await;
    for user in 1..=3 {
        app.buy(id, user).await;
    }
    app.wait_for_rows(id, 3, std::time::Duration::from_secs(10))
        .await;

    for auth in [None, Some(user_token(1))] {
        let mut req = app.client.get(app.url("/admin/reconcile"));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let (status, body) = read(req.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }

    let (status, body) = read(
        app.client
            .get(app.url("/admin/reconcile"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["drift"], false, "{body}");
    let rows = body["promotions"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|r| r["promotion_id"] == id)
        .expect("the promotion is reported");
    assert_eq!(row["stock"], 10);
    assert_eq!(row["remaining"], 7);
    assert_eq!(row["sold"], 3);
    assert_eq!(row["persisted"], 3);
    assert_eq!(row["lost"], 0);
    assert_eq!(row["drift"], 0);
    // The same figures as `seckill reconcile`.
    let (code, out) = app.reconcile(id).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no drift"), "{out}");
}
