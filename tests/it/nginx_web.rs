//! nginx serves the pages of `web/` from its static root and sends only the
//! dynamic routes to the gateways: the production config of `nginx/` in
//! front of one gateway.

use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH};

use crate::helpers::spawn_app;
use crate::nginx::Nginx;

fn web_file(path: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("web")
            .join(path),
    )
    .unwrap()
}

#[tokio::test]
async fn nginx_serves_the_pages_from_its_static_root_and_proxies_only_the_api() {
    let app = spawn_app().await;
    let gateway = app.addr.to_string();
    let nginx = Nginx::start("nginx.conf", &[&gateway]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // The pages and their assets: the files of web/, with their types and
    // cache headers, from nginx itself (nginx logs no upstream: `up=-`;
    // the gateway would have echoed an X-Request-Id).
    for (path, file, ctype) in [
        ("/", "index.html", "text/html"),
        ("/console/", "console/index.html", "text/html"),
        ("/assets/sale.js", "assets/sale.js", "text/javascript"),
        ("/assets/style.css", "assets/style.css", "text/css"),
    ] {
        let res = client.get(nginx.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        let headers = res.headers().clone();
        assert!(
            headers[CONTENT_TYPE].to_str().unwrap().starts_with(ctype),
            "{path}: {:?}",
            headers[CONTENT_TYPE]
        );
        assert_eq!(headers[CACHE_CONTROL], "no-cache", "{path}");
        let csp = headers[CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{path}: {csp}"
        );
        assert!(
            headers.get("x-request-id").is_none(),
            "{path} went to a gateway"
        );
        let etag = headers[ETAG].clone();
        assert_eq!(res.text().await.unwrap(), web_file(file), "{path}");
        // Revalidation: the ETag gives a 304 with no body.
        let again = client
            .get(nginx.url(path))
            .header(IF_NONE_MATCH, etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
    }
    assert!(
        nginx
            .access_log_shows(&["\"GET /assets/sale.js HTTP/1.1\" 200", "up=- us=-"])
            .await,
        "the access log shows the page served without an upstream:\n{}",
        nginx.read("logs/access.log")
    );
    let log = nginx.read("logs/access.log");
    for line in log
        .lines()
        .filter(|l| l.contains("\"GET / ") || l.contains("/assets/"))
    {
        assert!(line.contains("up=- "), "a page went upstream: {line}");
    }

    // /console without the slash: a relative redirect to the directory.
    let res = client.get(nginx.url("/console")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(res.headers()["location"], "/console/");

    // An unknown file: nginx's JSON 404, not a gateway's.
    let res = client
        .get(nginx.url("/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");

    // The dynamic routes are proxied: the gateway's answers, with its
    // X-Server-Time and X-Request-Id, and nginx logs the upstream.
    for path in ["/api/promotions", "/health", "/openapi.json"] {
        let res = client.get(nginx.url(path)).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK, "{path}");
        assert!(res.headers().get("x-request-id").is_some(), "{path}");
        if path == "/api/promotions" {
            assert!(res.headers().get("x-server-time").is_some(), "{path}");
        }
    }
    let res = client
        .get(nginx.url("/admin/promotions"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK, "/admin/promotions");
    let upstream = format!("up={gateway} us=200");
    assert!(
        nginx
            .access_log_shows(&["\"GET /api/promotions HTTP/1.1\" 200", &upstream])
            .await,
        "the access log shows /api proxied to {gateway}:\n{}",
        nginx.read("logs/access.log")
    );
}
