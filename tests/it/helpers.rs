//! `spawn_app()` and friends: a gateway per test, on a random port, with a
//! fresh key prefix and a fresh database, both dropped when the test is done
//! (see [`StoreOwner`]); and the helpers more than one test file uses.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use seckill::app::{App, Role};
use seckill::auth::Auth;
use seckill::config::Settings;
use seckill::stock::Keys;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool};
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
        // Tests that lose a promotion's Redis state on purpose rebuild it
        // themselves (`seckill recover`), at the point they choose; those
        // about the background rebuild set it short.
        recover_interval: Duration::from_secs(3600),
        // Rate limits are off unless a test is about them: the concurrency
        // tests send many requests from one address and one user on purpose.
        rate_global: 0,
        rate_user: 0,
        rate_ip: 0,
        ..Settings::default()
    }
}

/// A share in one test deployment's stores: its PostgreSQL database and its
/// Redis keys. When the last share of a deployment is dropped, the database
/// is dropped (`WITH (FORCE)`) and every key of the prefix deleted.
///
/// Every fixture that runs something on a deployment holds one, so the
/// stores go when the test ends, a panicking one included. Several fixtures
/// may run on one deployment (gateways started with the same settings, as
/// the instances of one deployment are): `OWNERS` counts the shares per
/// deployment so that only the last one cleans up. Drop the running
/// processes before their share (fields drop in declaration order).
pub struct StoreOwner {
    deployment: String,
    redis_url: String,
    database_url: String,
    key_prefix: String,
}

/// Live shares per deployment (database URL, Redis URL and key prefix).
static OWNERS: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(Default::default);

impl StoreOwner {
    pub fn claim(settings: &Settings) -> StoreOwner {
        let deployment = format!(
            "{} {} {}",
            settings.database_url, settings.redis_url, settings.key_prefix
        );
        let mut owners = OWNERS.lock().unwrap_or_else(|e| e.into_inner());
        *owners.entry(deployment.clone()).or_default() += 1;
        StoreOwner {
            deployment,
            redis_url: settings.redis_url.clone(),
            database_url: settings.database_url.clone(),
            key_prefix: settings.key_prefix.clone(),
        }
    }
}

impl Drop for StoreOwner {
    fn drop(&mut self) {
        let last = {
            let mut owners = OWNERS.lock().unwrap_or_else(|e| e.into_inner());
            let left = owners.get_mut(&self.deployment).map(|n| {
                *n -= 1;
                *n
            });
            if left == Some(0) {
                owners.remove(&self.deployment);
            }
            left == Some(0)
        };
        if !last {
            return;
        }
        // Drop is synchronous and may run on (or after) the test's runtime:
        // the clean-up gets a thread and a runtime of its own, and never
        // panics (a panic while unwinding would abort the test binary).
        let (redis_url, database_url, prefix) = (
            self.redis_url.clone(),
            self.database_url.clone(),
            self.key_prefix.clone(),
        );
        let cleaned = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let within = Duration::from_secs(10);
                let (redis, pg) = tokio::join!(
                    tokio::time::timeout(within, delete_keys(&redis_url, &prefix)),
                    tokio::time::timeout(within, drop_database(&database_url)),
                );
                redis.context("redis clean-up timed out")??;
                pg.context("postgresql clean-up timed out")??;
                Ok(())
            })
        })
        .join();
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("note: the stores of {} are left: {e:#}", self.key_prefix),
            Err(_) => eprintln!("note: the clean-up of {} panicked", self.key_prefix),
        }
    }
}

/// Every Redis key matching `pattern` (`SCAN … MATCH`), sorted.
pub async fn scan_keys(conn: &mut impl redis::aio::ConnectionLike, pattern: &str) -> Vec<String> {
    try_scan_keys(conn, pattern).await.expect("SCAN succeeds")
}

async fn try_scan_keys(
    conn: &mut impl redis::aio::ConnectionLike,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        out.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    out.sort();
    Ok(out)
}

/// Deletes the keys of a prefix: those of its promotions (`{P:p:ID}:…`,
/// see `src/stock/keys.rs`) and its own (`P:promotions`, `P:events`, …).
async fn delete_keys(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
    if redis_url.contains(',') {
        // A test's own Redis Cluster: its nodes and files go with it.
        return Ok(());
    }
    let client = redis::Client::open(redis_url)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .context("failed to connect to redis")?;
    for pattern in [format!("{{{prefix}:*"), format!("{prefix}:*")] {
        let keys = try_scan_keys(&mut conn, &pattern)
            .await
            .context("failed to scan the keys")?;
        for chunk in keys.chunks(500) {
            redis::cmd("UNLINK")
                .arg(chunk)
                .query_async::<i64>(&mut conn)
                .await
                .context("failed to unlink the keys")?;
        }
    }
    Ok(())
}

/// `DROP DATABASE … WITH (FORCE)` from the server's `postgres` database:
/// connections still open on it (a pool, a killed gateway's) are cut.
async fn drop_database(database_url: &str) -> anyhow::Result<()> {
    let options = PgConnectOptions::from_str(database_url)?;
    let name = options
        .get_database()
        .context("the database url names no database")?
        .replace('"', "\"\"");
    let mut conn = options
        .database("postgres")
        .connect()
        .await
        .context("failed to connect to postgresql")?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .await
    .context("failed to drop the database")?;
    Ok(())
}

/// A running gateway (with workers unless the role says otherwise).
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub settings: Settings,
    pub db: PgPool,
    pub redis: seckill::stock::RedisConn,
    pub keys: Keys,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    /// Dropped last: the database and keys go once the app is gone.
    _stores: StoreOwner,
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
    // Claimed first: a gateway that fails to build still leaves nothing.
    let stores = StoreOwner::claim(&settings);
    let app = App::build(settings.clone(), role)
        .await
        .expect("app builds");
    let addr = app.local_addr().expect("gateway is listening");
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let db = test_pool(&settings).await;
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
        _stores: stores,
    }
}

/// A small pool of the test's own on the deployment's database.
pub async fn test_pool(settings: &Settings) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(&settings.database_url)
        .await
        .expect("test pool connects")
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
        order_rows(&self.db, promotion).await
    }

    /// Waits until the promotion has `n` rows in PostgreSQL (or the timeout);
    /// returns the last count seen.
    pub async fn wait_for_rows(&self, promotion: i64, n: i64, timeout: Duration) -> i64 {
        wait_for_rows(&self.db, promotion, n, timeout).await
    }

    /// Entries of the promotion's stream read by a worker and not yet
    /// acknowledged (`XPENDING`).
    pub async fn pending_count(&self, promotion: i64) -> i64 {
        let mut conn = self.redis.clone();
        let summary: (i64, Option<String>, Option<String>, redis::Value) = redis::cmd("XPENDING")
            .arg(self.keys.promotion(promotion).orders)
            .arg(self.keys.consumer_group())
            .query_async(&mut conn)
            .await
            .unwrap();
        summary.0
    }

    /// Every Redis key that contains this deployment's key prefix, sorted.
    pub async fn redis_keys(&self) -> Vec<String> {
        let pattern = format!("*{}*", self.keys.prefix());
        scan_keys(&mut self.redis.clone(), &pattern).await
    }

    /// The admin list, asserted to be a 200.
    pub async fn admin_list(&self) -> Vec<Value> {
        let (status, v) = self
            .admin(reqwest::Method::GET, "/admin/promotions", None)
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["promotions"]
            .as_array()
            .expect("promotions array")
            .clone()
    }

    /// Redis loses every key of promotion `id`'s sale state and stream (of
    /// its first bucket: all of it when the promotion is not split).
    pub async fn lose_promotion(&self, id: i64) {
        self.lose_bucket(id, 0).await;
    }

    /// Redis loses every key of bucket `bucket` of promotion `id` (its hash
    /// tag).
    pub async fn lose_bucket(&self, id: i64, bucket: u32) {
        let k = self.keys.bucket(id, bucket);
        let _: i64 = redis::cmd("DEL")
            .arg(&[
                &k.meta,
                &k.stock,
                &k.buyers,
                &k.orders,
                &k.results,
                &k.returned,
                &k.won,
                &k.tokens,
                &k.transfers,
                &k.received,
            ])
            .query_async(&mut self.redis.clone())
            .await
            .unwrap();
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

impl Drop for TestApp {
    /// A test that ends without `stop()` (a panic): the app is aborted and
    /// given a moment to go before its stores are dropped.
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
            for _ in 0..100 {
                if handle.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
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

/// An error answer: its status, its code, and a message.
pub fn assert_error(status: StatusCode, v: &Value, want: StatusCode, want_code: &str, what: &str) {
    assert_eq!(status, want, "{what}: {v}");
    assert_eq!(code(v), want_code, "{what}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: the error has a message: {v}"
    );
}

/// Rows in `orders` for a promotion.
pub async fn order_rows(db: &PgPool, promotion: i64) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT count(*) FROM orders WHERE promotion_id = $1")
        .bind(promotion)
        .fetch_one(db)
        .await
        .unwrap()
}

/// The order ids of a promotion in PostgreSQL.
pub async fn order_ids(db: &PgPool, promotion: i64) -> Vec<String> {
    sqlx::query_scalar("SELECT order_id FROM orders WHERE promotion_id = $1")
        .bind(promotion)
        .fetch_all(db)
        .await
        .unwrap()
}

/// Waits until the promotion has `n` rows in PostgreSQL (or the timeout);
/// returns the last count seen.
pub async fn wait_for_rows(db: &PgPool, promotion: i64, n: i64, timeout: Duration) -> i64 {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let rows = order_rows(db, promotion).await;
        if rows >= n || tokio::time::Instant::now() >= deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

    /// `seckill reconcile --promotion ID` against this app's stores.
    pub async fn reconcile(&self, promotion: i64) -> (i32, String) {
        self.cli(&["reconcile", "--promotion", &promotion.to_string()])
            .await
    }
}

/// The real binary with `settings` in its environment (stores and secrets).
pub fn seckill_command(settings: &Settings) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_seckill"));
    cmd.env("SECKILL_REDIS_URL", &settings.redis_url)
        .env("SECKILL_DATABASE_URL", &settings.database_url)
        .env("SECKILL_KEY_PREFIX", &settings.key_prefix)
        .env("SECKILL_JWT_SECRET", JWT_SECRET)
        .env("SECKILL_ADMIN_TOKEN", ADMIN_TOKEN);
    cmd
}

/// Runs the real binary with `settings` in its environment.
pub async fn run_cli(settings: &Settings, args: &[&str]) -> (i32, String) {
    let out = seckill_command(settings)
        .args(args)
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

/// Waits (30 s at most) for the JSON log line whose message is `message`
/// on a child's standard error; returns its `addr` field. The rest of the
/// log is drained in the background, so the child never blocks on a full
/// pipe.
pub async fn listening_addr(child: &mut tokio::process::Child, message: &str) -> String {
    use tokio::io::AsyncBufReadExt;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == message {
                return v["fields"]["addr"].as_str().unwrap().to_string();
            }
        }
        panic!("the process exited before `{message}`");
    })
    .await
    .unwrap_or_else(|_| panic!("`{message}` within 30 s"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    addr
}
