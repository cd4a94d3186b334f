//! `spawn_app()` and friends: a gateway per test, on a random port, with a
//! fresh key prefix and a fresh database.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use reqwest::StatusCode;
use seckill::app::{App, Role};
use seckill::auth::Auth;
use seckill::config::Settings;
use seckill::stock::Keys;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const JWT_SECRET: &str = "test-jwt-secret";

/// PostgreSQL server the tests create their databases on.
pub fn pg_base_url() -> String {
    std::env::var("SECKILL_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
        .trim_end_matches('/')
        .to_string()
}

pub fn redis_url() -> String {
    std::env::var("SECKILL_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Settings for one test: port 0, a fresh prefix and database, quick workers.
pub fn test_settings() -> Settings {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        redis_url: redis_url(),
        database_url: format!("{}/seckill_it_{}", pg_base_url(), &tag[..16]),
        key_prefix: format!("t{}", &tag[..12]),
        jwt_secret: JWT_SECRET.into(),
        admin_token: ADMIN_TOKEN.into(),
        worker_block: Duration::from_millis(200),
        claim_idle: Duration::from_secs(2),
        shutdown_grace: Duration::from_secs(5),
        // Rate limits are off unless a test is about them: the concurrency
        // tests send many requests from one address and one user on purpose.
        rate_global: 0,
        rate_user: 0,
        rate_ip: 0,
        ..Settings::default()
    }
}

/// A running gateway (with workers unless the role says otherwise).
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub keys: Keys,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(Role::Serve, |_| {}).await
}

pub async fn spawn_app_with(role: Role, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings();
    tweak(&mut settings);
    spawn_with_settings(role, settings).await
}

/// Starts a gateway on `settings` (which may share a database and prefix
/// with another gateway, as several instances of one deployment do).
pub async fn spawn_with_settings(role: Role, settings: Settings) -> TestApp {
    if std::env::var("TEST_LOG").is_ok() {
        seckill::telemetry::init_tracing(seckill::config::LogFormat::Text);
    }
    let app = App::build(settings.clone(), role)
        .await
        .expect("app builds");
    let addr = app.local_addr().expect("gateway is listening");
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let db = PgPoolOptions::new()
        .max_connections(4)
        .connect(&settings.database_url)
        .await
        .expect("test pool connects");
    let redis = seckill::stock::store::connect(
        &settings.redis_url,
        seckill::stock::ConnectOptions::commands(Duration::from_secs(5)),
    )
    .await
    .expect("test redis connects");
    TestApp {
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            // Below the gateway's header timeout, which also closes idle
            // keep-alive connections: never reuse one the server is closing.
            .pool_idle_timeout(Duration::from_millis(
                (settings.header_timeout.as_millis() as u64 / 2).max(100),
            ))
            .build()
            .unwrap(),
        keys: Keys::new(settings.key_prefix.clone()),
        settings,
        db,
        redis,
        stop: Some(stop),
        handle: Some(handle),
    }
}

/// A user token signed with the test secret.
pub fn user_token(user_id: i64) -> String {
    Auth::new(JWT_SECRET, ADMIN_TOKEN)
        .mint(user_id, 600)
        .unwrap()
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A creation body for a promotion running from a minute ago for an hour.
pub fn active_body(stock: i64, per_user_limit: i64) -> Value {
    let now = Utc::now();
    json!({
        "name": "Phone X flash sale",
        "stock": stock,
        "per_user_limit": per_user_limit,
        "price_cents": 99900,
        "starts_at": rfc3339(now - chrono::Duration::minutes(1)),
        "ends_at": rfc3339(now + chrono::Duration::hours(1)),
    })
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.expect("request is answered");
        read(res).await
    }

    /// Creates a promotion; panics unless the answer is 201.
    pub async fn create_promotion(&self, body: Value) -> Value {
        let (status, v) = self
            .admin(reqwest::Method::POST, "/admin/promotions", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        v
    }

    /// Creates a promotion on sale now; returns its id.
    pub async fn active_promotion(&self, stock: i64, per_user_limit: i64) -> i64 {
        self.create_promotion(active_body(stock, per_user_limit))
            .await["id"]
            .as_i64()
            .unwrap()
    }

    pub async fn purchase(&self, promotion: i64, user: i64) -> (StatusCode, Value) {
        let res = self
            .client
            .post(self.url(&format!("/api/promotions/{promotion}/purchase")))
            .bearer_auth(user_token(user))
            .json(&json!({}))
            .send()
            .await
            .expect("purchase is answered");
        read(res).await
    }

    pub async fn stats(&self, promotion: i64) -> Value {
        let (status, v) = self
            .admin(
                reqwest::Method::GET,
                &format!("/admin/promotions/{promotion}"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["stats"].clone()
    }

    /// Rows in `orders` for a promotion.
    pub async fn order_rows(&self, promotion: i64) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE promotion_id = $1")
            .bind(promotion)
            .fetch_one(&self.db)
            .await
            .unwrap()
    }

    /// Waits until the promotion has `n` rows in PostgreSQL (or the timeout);
    /// returns the last count seen.
    pub async fn wait_for_rows(&self, promotion: i64, n: i64, timeout: Duration) -> i64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rows = self.order_rows(promotion).await;
            if rows >= n || tokio::time::Instant::now() >= deadline {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the gateway and its workers gracefully.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.expect("app task").expect("app stops cleanly");
        }
    }
}

/// Status and JSON body of a response (`Value::Null` for an empty body).
pub async fn read(res: reqwest::Response) -> (StatusCode, Value) {
    let status = res.status();
    let bytes = res.bytes().await.expect("body is read");
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("body is JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, v)
}

/// The error code of an error body.
pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

impl TestApp {
    /// `POST /api/orders/{order_id}/{action}` as `user`.
    pub async fn order_action(
        &self,
        order_id: &str,
        action: &str,
        user: i64,
    ) -> (StatusCode, Value) {
        let res = self
            .client
            .post(self.url(&format!("/api/orders/{order_id}/{action}")))
            .bearer_auth(user_token(user))
            .send()
            .await
            .expect("order action is answered");
        read(res).await
    }

    /// Buys one unit; panics unless it is a 200. Returns the order id.
    pub async fn buy(&self, promotion: i64, user: i64) -> String {
        let (status, body) = self.purchase(promotion, user).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["order_id"].as_str().unwrap().to_string()
    }

    /// Retries a purchase until it is no longer refused as sold out (or the
    /// timeout); returns the last answer.
    pub async fn purchase_until_not_sold_out(
        &self,
        promotion: i64,
        user: i64,
        timeout: Duration,
    ) -> (StatusCode, Value) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (status, body) = self.purchase(promotion, user).await;
            if status != StatusCode::GONE || tokio::time::Instant::now() >= deadline {
                return (status, body);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An order's status in PostgreSQL.
    pub async fn order_status(&self, order_id: &str) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(&self.db)
            .await
            .unwrap()
    }

    /// Runs `seckill ARGS…` against this app's stores; returns the exit code
    /// and standard output.
    pub async fn cli(&self, args: &[&str]) -> (i32, String) {
        run_cli(&self.settings, args).await
    }
}

/// Runs the real binary with `settings` in its environment.
pub async fn run_cli(settings: &Settings, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
        .args(args)
        .env("SECKILL_REDIS_URL", &settings.redis_url)
        .env("SECKILL_DATABASE_URL", &settings.database_url)
        .env("SECKILL_KEY_PREFIX", &settings.key_prefix)
        .env("SECKILL_JWT_SECRET", JWT_SECRET)
        .env("SECKILL_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("the seckill binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        eprintln!(
            "seckill {args:?} stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (out.status.code().unwrap_or(-1), stdout)
}
