//! nginx in front of real gateways: the production config in `nginx/`, run by
//! the real nginx binary with its own prefix and port, in front of two
//! `seckill serve` processes sharing one Redis prefix and one database.
//!
//! nginx comes from `scripts/ensure-test-packages.sh` (Debian packages `nginx` and
//! `libnginx-mod-http-lua`); without it these tests fail and say so.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use seckill::config::Settings;
use seckill::stock::Keys;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, active_body, code, order_rows, test_pool, test_settings, user_token, wait_for_rows,
};
use crate::procs::{GatewayProc, spare_port};

const NGINX: &str = "/usr/sbin/nginx";
const LUA_MODULES: [&str; 2] = [
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
];

fn nginx_bin() -> &'static str {
    assert!(
        Path::new(NGINX).exists(),
        "{NGINX} is missing: run scripts/ensure-test-packages.sh (installs nginx and libnginx-mod-http-lua)"
    );
    NGINX
}

fn assert_lua_module() {
    for m in LUA_MODULES {
        assert!(
            Path::new(m).exists(),
            "{m} is missing: run scripts/ensure-test-packages.sh (installs libnginx-mod-http-lua)"
        );
    }
}

/// A copy of `nginx/` in a fresh prefix: `listen` on `port` (loopback) and
/// `upstreams.conf` naming `gateways`, every other line as shipped.
fn prepare_prefix(port: u16, gateways: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx");
    let dir = std::env::temp_dir().join(format!(
        "seckill-it-nginx-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    std::fs::create_dir_all(dir.join("temp")).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "conf") {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    // The static root of the pages (`root web;`).
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("web"),
        &dir.join("web"),
    );
    // Run as root, nginx's workers drop to `nobody`: they must reach the
    // temp and cache directories under the prefix.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();

    let site = dir.join("seckill.conf");
    let text = std::fs::read_to_string(&site).unwrap();
    assert!(
        text.contains("listen 80 "),
        "seckill.conf listens on port 80"
    );
    std::fs::write(
        &site,
        text.replacen("listen 80 ", &format!("listen 127.0.0.1:{port} "), 1),
    )
    .unwrap();

    // The shipped server lines with their parameters, pointed elsewhere.
    let shipped = std::fs::read_to_string(dir.join("upstreams.conf")).unwrap();
    let params = shipped
        .lines()
        .find_map(|l| l.trim().strip_prefix("server "))
        .and_then(|rest| rest.split_once(' '))
        .map(|(_, params)| params.to_string())
        .expect("upstreams.conf has a `server` line");
    let lines: String = gateways
        .iter()
        .map(|g| format!("server {g} {params}\n"))
        .collect();
    std::fs::write(dir.join("upstreams.conf"), lines).unwrap();
    dir
}

/// Copies the directory `src` to `dst`, readable by everybody.
fn copy_dir(src: &Path, dst: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dst).unwrap();
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let to = dst.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &to);
        } else {
            std::fs::copy(&path, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
}

/// `nginx -t` on `conf` in `dir`: success and nginx's output.
fn nginx_t(dir: &Path, conf: &str) -> (bool, String) {
    let out = Command::new(nginx_bin())
        .arg("-t")
        .arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-c")
        .arg(dir.join(conf))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A private nginx, stopped (and its prefix removed) on drop.
pub(crate) struct Nginx {
    base: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Nginx {
    /// Starts `nginx -p PREFIX -c PREFIX/conf -g 'daemon off;'` in front of
    /// `gateways`; returns once it accepts connections.
    pub(crate) async fn start(conf: &str, gateways: &[&str]) -> Nginx {
        let port = spare_port();
        let dir = prepare_prefix(port, gateways);
        let stderr = std::fs::File::create(dir.join("logs/stderr.log")).unwrap();
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(format!("{}/", dir.display()))
            .arg("-c")
            .arg(dir.join(conf))
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("nginx starts");
        let mut nginx = Nginx {
            base: format!("http://127.0.0.1:{port}"),
            dir,
            child: Some(child),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return nginx;
            }
            let exited = nginx.child.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                panic!(
                    "nginx did not start ({exited:?}):\n{}\n{}",
                    nginx.read("logs/stderr.log"),
                    nginx.read("logs/error.log")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub(crate) fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Waits until the (buffered) access log contains every one of
    /// `needles`; returns whether it did.
    pub(crate) async fn access_log_shows(&self, needles: &[&str]) -> bool {
        for _ in 0..60 {
            let log = self.read("logs/access.log");
            if needles.iter().all(|n| log.contains(n)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGTERM: the master stops its workers before it exits (a
            // SIGKILL would leave them running, holding the port).
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two gateways on one deployment (same Redis prefix, same database).
async fn two_gateways(settings: &Settings, extra: &[(&str, &str)]) -> (GatewayProc, GatewayProc) {
    // One after the other: the first creates the database and migrates it.
    let a = GatewayProc::start(settings, extra).await;
    let b = GatewayProc::start(settings, extra).await;
    (a, b)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A client whose connections come from `ip` (any 127.x.y.z works on
/// Linux loopback): one buyer, one address, as on the internet.
fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .local_address(ip)
        .build()
        .unwrap()
}

/// A distinct loopback address per buyer.
fn buyer_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 1, (i / 200) as u8, (i % 200 + 1) as u8))
}

async fn read(res: reqwest::Response) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({"unparsed": String::from_utf8_lossy(&bytes).to_string()}));
    (status, headers, body)
}

async fn create_promotion(nginx: &Nginx, body: Value) -> i64 {
    let res = client()
        .post(nginx.url("/admin/promotions"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let (status, _, v) = read(res).await;
    assert_eq!(status, StatusCode::CREATED, "create through nginx: {v}");
    v["id"].as_i64().unwrap()
}

/// One purchase: status, headers, body; `None` when no HTTP answer came.
async fn purchase(
    client: &reqwest::Client,
    nginx: &Nginx,
    promotion: i64,
    user: i64,
) -> Option<(StatusCode, reqwest::header::HeaderMap, Value)> {
    let res = client
        .post(nginx.url(&format!("/api/promotions/{promotion}/purchase")))
        .bearer_auth(user_token(user))
        .json(&json!({}))
        .send()
        .await
        .ok()?;
    Some(read(res).await)
}

fn is_rate_limited_by_nginx(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        && code(body) == "rate_limited"
        && headers.get("retry-after").and_then(|v| v.to_str().ok()) == Some("1")
        && headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_config_passes_nginx_t() {
    let dir = prepare_prefix(spare_port(), &["127.0.0.1:8081", "127.0.0.1:8082"]);

    let (ok, out) = nginx_t(&dir, "nginx.conf");
    assert!(ok, "nginx -t nginx.conf:\n{out}");

    // The Lua variant: the module is installed by scripts/ensure-test-packages.sh.
    assert_lua_module();
    let (ok, out) = nginx_t(&dir, "nginx-lua.conf");
    assert!(ok, "nginx -t nginx-lua.conf:\n{out}");

    // The Lua variant is nginx.conf plus its two includes, nothing else.
    let directives = |file: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| !matches!(*l, "include lua-modules.conf;" | "include lua-guard.conf;"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(directives("nginx.conf"), directives("nginx-lua.conf"));

    // The compose upstream list has the same shape: with its host names
    // swapped for addresses that resolve here, the config still passes.
    let compose = std::fs::read_to_string(dir.join("upstreams.compose.conf")).unwrap();
    assert_eq!(
        compose
            .lines()
            .filter(|l| l.trim().starts_with("server "))
            .count(),
        2,
        "{compose}"
    );
    std::fs::write(
        dir.join("upstreams.conf"),
        compose
            .replace("gateway-1:", "127.0.0.1:")
            .replace("gateway-2:", "127.0.0.2:"),
    )
    .unwrap();
    let (ok, out) = nginx_t(&dir, "nginx.conf");
    assert!(ok, "nginx -t with upstreams.compose.conf:\n{out}");

    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purchases_through_nginx_reach_postgres_via_two_gateways() {
    let settings = test_settings();
    let (a, b) = two_gateways(&settings, &[]).await;
    let nginx = Nginx::start("nginx.conf", &[&a.addr, &b.addr]).await;
    let db = test_pool(&settings).await;

    // Admin through nginx: allowed from loopback.
    let promotion = create_promotion(&nginx, active_body(100, 1)).await;

    let buyers = 30;
    let mut tasks = Vec::new();
    for user in 1..=buyers {
        let c = client_from(buyer_ip(user));
        let base = nginx.base.clone();
        tasks.push(tokio::spawn(async move {
            let res = c
                .post(format!("{base}/api/promotions/{promotion}/purchase"))
                .bearer_auth(user_token(user as i64))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            read(res).await
        }));
    }
    let mut order_ids = Vec::new();
    let mut request_ids = Vec::new();
    for t in tasks {
        let (status, headers, body) = t.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "pending", "{body}");
        order_ids.push(body["order_id"].as_str().expect("an order id").to_string());
        request_ids.push(
            headers
                .get("x-request-id")
                .expect("the gateway echoes X-Request-Id")
                .to_str()
                .unwrap()
                .to_string(),
        );
    }

    // Every order reaches PostgreSQL, once.
    assert_eq!(
        wait_for_rows(&db, promotion, buyers as i64, Duration::from_secs(30)).await,
        buyers as i64
    );
    for id in &order_ids {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE order_id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(n, 1, "order {id} is in PostgreSQL once");
    }

    // Both gateways served, and the id the client got back is the one
    // nginx generated and logged (the gateway echoed nginx's X-Request-Id).
    let up_a = format!("up={}", a.addr);
    let up_b = format!("up={}", b.addr);
    let first_id = format!("id={}", request_ids[0]);
    assert!(
        nginx
            .access_log_shows(&[up_a.as_str(), up_b.as_str(), first_id.as_str()])
            .await,
        "access log:\n{}",
        nginx.read("logs/access.log")
    );

    // The public list is cached for a second, each answer with its own id.
    let c = client();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (status, headers, body) =
            read(c.get(nginx.url("/api/promotions")).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            body["promotions"].as_array().is_some_and(|p| !p.is_empty()),
            "{body}"
        );
        seen.push((
            headers["x-cache-status"].to_str().unwrap().to_string(),
            headers["x-request-id"].to_str().unwrap().to_string(),
        ));
    }
    assert_eq!(seen[1].0, "HIT", "{seen:?}");
    assert_ne!(
        seen[0].1, seen[1].1,
        "a cached answer carries its own request id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_from_one_ip_gets_429_json_from_nginx() {
    let settings = test_settings();
    let (a, b) = two_gateways(&settings, &[]).await;
    let nginx = Nginx::start("nginx.conf", &[&a.addr, &b.addr]).await;
    let promotion = create_promotion(&nginx, active_body(10, 1)).await;

    // 400 requests as fast as 32 connections from one address go.
    let c = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7)));
    let url = nginx.url(&format!("/api/promotions/{promotion}"));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (c, url, next) = (c.clone(), url.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < 400 {
                out.push(read(c.get(&url).send().await.unwrap()).await);
            }
            out
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        for (status, headers, body) in t.await.unwrap() {
            if status == StatusCode::OK {
                ok += 1;
            } else {
                assert!(
                    is_rate_limited_by_nginx(status, &headers, &body),
                    "{status} {headers:?} {body}"
                );
                limited += 1;
            }
        }
    }
    assert!(
        ok >= 100,
        "the burst allowance is served: {ok} ok, {limited} limited"
    );
    assert!(limited > 0, "past the burst nginx answers 429: {ok} ok");

    // The limit is per address: another client is served at once.
    let other = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 8)));
    let (status, _, body) = read(other.get(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateways_see_the_client_address_behind_nginx_not_a_forged_one() {
    // The gateways' own per-IP limit on (4/s each), nginx's far above it.
    let settings = test_settings();
    let (a, b) = two_gateways(&settings, &[("SECKILL_RATE_IP", "4")]).await;
    let nginx = Nginx::start("nginx.conf", &[&a.addr, &b.addr]).await;
    let promotion = create_promotion(&nginx, active_body(10, 1)).await;
    let url = nginx.url(&format!("/api/promotions/{promotion}"));
    let gateway_limited = |status: StatusCode, body: &Value| {
        status == StatusCode::TOO_MANY_REQUESTS
            && body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("ip limit"))
    };

    // Requests sent together, so the budgets (4/s per gateway) cannot
    // refill in between, however slow the machine.
    let batch = |client: reqwest::Client, n: usize, forge: bool| {
        let url = url.clone();
        async move {
            let requests = (0..n).map(|i| {
                let mut req = client.get(&url);
                if forge {
                    req = req.header("x-forwarded-for", format!("198.51.100.{i}"));
                }
                async move { read(req.send().await.unwrap()).await }
            });
            futures_util::future::join_all(requests).await
        }
    };

    // One address spends its budget on both gateways…
    let noisy = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let mut refused = 0;
    for (status, _, body) in batch(noisy.clone(), 20, false).await {
        if gateway_limited(status, &body) {
            refused += 1;
        } else {
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
    assert!(
        refused >= 5,
        "the gateways limit 127.0.0.2: {refused} refused of 20"
    );

    // …another address behind the same nginx is not affected…
    let quiet = client_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
    let (status, _, body) = read(quiet.get(&url).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // …and a forged X-Forwarded-For does not buy a fresh budget: nginx
    // appends the real peer, which the gateway takes.
    let forged_refused = batch(noisy, 10, true)
        .await
        .into_iter()
        .filter(|(status, _, body)| gateway_limited(*status, body))
        .count();
    assert!(
        forged_refused >= 5,
        "forged addresses are ignored: {forged_refused} of 10 refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nginx_own_errors_are_json() {
    // Nothing listens behind this nginx.
    let dead = format!("127.0.0.1:{}", spare_port());
    let nginx = Nginx::start("nginx.conf", &[&dead]).await;
    let c = client();

    let (status, headers, body) =
        read(c.get(nginx.url("/api/promotions/1")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(code(&body), "unavailable", "{body}");
    assert_eq!(headers["retry-after"], "1");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );

    let big = vec![b'a'; 70 * 1024];
    let (status, _, body) = read(
        c.post(nginx.url("/admin/promotions"))
            .body(big)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(code(&body), "payload_too_large", "{body}");

    // Requests nginx cannot parse, even before the request line is known.
    let addr = nginx.base.trim_start_matches("http://").to_string();
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(20_000));
    let big_head = format!(
        "GET /api/promotions HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    for (raw, status, code) in [
        ("NONSENSE\r\n\r\n", 400, "invalid_request"),
        (
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
            "invalid_request",
        ),
        (long_uri.as_str(), 414, "invalid_request"),
        (big_head.as_str(), 400, "invalid_request"),
        (
            "GET /_seckill_errors/bad_request HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            404,
            "not_found",
        ),
    ] {
        let answer = raw_request(&addr, raw).await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status} ")),
            "{:.60}: {answer}",
            raw
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{answer}"
        );
        let body: Value = serde_json::from_str(body.trim()).unwrap_or_else(|_| panic!("{answer}"));
        assert_eq!(body["error"]["code"], code, "{answer}");
    }
}

/// Writes `raw` on a new connection; returns everything nginx answers.
async fn raw_request(addr: &str, raw: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // nginx closes the connection after these errors.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_sale_never_replays_a_purchase() {
    let settings = test_settings();
    // Quick workers, and entries the killed gateway's workers had read are
    // claimed by the survivor after a second.
    let extra = [
        ("SECKILL_WORKER_BLOCK_MS", "200"),
        ("SECKILL_CLAIM_IDLE_MS", "1000"),
    ];
    let (mut a, b) = two_gateways(&settings, &extra).await;
    let nginx = Arc::new(Nginx::start("nginx.conf", &[&a.addr, &b.addr]).await);
    let db = test_pool(&settings).await;
    let mut redis = seckill::stock::store::connect(
        &settings.redis_url,
        seckill::stock::ConnectOptions::commands(Duration::from_secs(5)),
    )
    .await
    .unwrap();

    // Every buyer buys exactly once; a limit of 5 means a replayed purchase
    // would be accepted a second time, and show.
    let buyers: usize = 400;
    let promotion = create_promotion(&nginx, active_body(10_000, 5)).await;
    let buyers_key = Keys::new(settings.key_prefix.clone())
        .promotion(promotion)
        .buyers;

    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(1));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let (nginx, done, next) = (nginx.clone(), done.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let user = next.fetch_add(1, Ordering::Relaxed);
                if user > buyers {
                    return out;
                }
                let c = client_from(buyer_ip(user));
                let answer = purchase(&c, &nginx, promotion, user as i64).await;
                out.push((user, answer));
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Mid-sale: a quarter of the buyers answered, the rest in flight or
    // still to come.
    while done.load(Ordering::Relaxed) < buyers / 4 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    a.kill9().await;

    let (mut ok, mut unknown) = (Vec::new(), Vec::new());
    for t in tasks {
        for (user, answer) in t.await.unwrap() {
            match answer {
                Some((StatusCode::OK, _, body)) => {
                    assert!(body["order_id"].is_string(), "{body}");
                    ok.push(user);
                }
                // nginx's own answer when the gateway died with the request
                // in hand (or refused the connection): outcome unknown.
                Some((status, headers, body)) if matches!(status.as_u16(), 502 | 504) => {
                    assert_eq!(code(&body), "unavailable", "{body}");
                    assert_eq!(headers["retry-after"], "1");
                    unknown.push(user);
                }
                None => unknown.push(user),
                Some((status, _, body)) => panic!("user {user}: {status} {body}"),
            }
        }
    }
    eprintln!(
        "kill mid-sale: {} bought, {} unknown (502/504/connection error)",
        ok.len(),
        unknown.len()
    );
    assert!(
        ok.len() >= buyers / 2,
        "most buyers were served: {} of {buyers}",
        ok.len()
    );

    // No purchase ran twice: every buyer's count in Redis is 0 or 1, and 1
    // for every 200.
    let mut executed = 0i64;
    for user in 1..=buyers {
        let n: Option<i64> = redis::AsyncCommands::hget(&mut redis, &buyers_key, user)
            .await
            .unwrap();
        let n = n.unwrap_or(0);
        assert!(n <= 1, "user {user} bought {n} times");
        if ok.contains(&user) {
            assert_eq!(n, 1, "user {user} got a 200");
        }
        executed += n;
    }

    eprintln!("kill mid-sale: {executed} purchases executed");

    // PostgreSQL agrees: one row per executed purchase (the 200s, plus at
    // most the unknown ones), none twice for a user.
    let rows = wait_for_rows(&db, promotion, executed, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows_later = order_rows(&db, promotion).await;
    assert_eq!(rows, executed, "every executed purchase is persisted");
    assert_eq!(rows_later, executed, "and nothing more");
    assert!(
        rows >= ok.len() as i64 && rows <= (ok.len() + unknown.len()) as i64,
        "{rows} rows for {} ok and {} unknown",
        ok.len(),
        unknown.len()
    );
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT user_id FROM orders WHERE promotion_id = $1 \
         GROUP BY user_id HAVING count(*) > 1) d",
    )
    .bind(promotion)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(doubled, 0, "no user has two orders");

    // After the kill, the survivor serves the sale. Purchases are never
    // retried, so the request that finds the dead gateway refused may be a
    // 502 (at most one per fail_timeout); the rest are 200.
    let mut after_ok = 0;
    for user in buyers + 1..=buyers + 20 {
        let c = client_from(buyer_ip(user));
        match purchase(&c, &nginx, promotion, user as i64).await {
            Some((StatusCode::OK, _, _)) => after_ok += 1,
            Some((StatusCode::BAD_GATEWAY, _, _)) => {}
            other => panic!("user {user} after the kill: {other:?}"),
        }
    }
    assert!(after_ok >= 18, "{after_ok} of 20 bought after the kill");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lua_guard_refuses_a_purchase_without_authorization() {
    assert_lua_module();
    let settings = test_settings();
    let gateway = GatewayProc::start(&settings, &[]).await;
    let nginx = Nginx::start("nginx-lua.conf", &[&gateway.addr]).await;
    let promotion = create_promotion(&nginx, active_body(10, 1)).await;
    let c = client();
    let purchase_url = nginx.url(&format!("/api/promotions/{promotion}/purchase"));

    let guard_refused = |status: StatusCode, headers: &reqwest::header::HeaderMap, body: &Value| {
        status == StatusCode::UNAUTHORIZED
            && code(body) == "unauthorized"
            && headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json")
            && headers
                .get("www-authenticate")
                .is_some_and(|v| v.to_str().unwrap().contains("seckill"))
    };

    // No Authorization, or not a bearer one: refused by nginx.
    let (s, h, b) = read(c.post(&purchase_url).json(&json!({})).send().await.unwrap()).await;
    assert!(guard_refused(s, &h, &b), "{s} {h:?} {b}");
    let (s, h, b) = read(
        c.post(&purchase_url)
            .header("authorization", "Basic dXNlcjpwYXNz")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(guard_refused(s, &h, &b), "{s} {h:?} {b}");
    // An encoded variant of the route is the same route to the guard.
    let (s, h, b) = read(
        c.post(nginx.url(&format!("/api/promotions/{promotion}/purchas%65")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(guard_refused(s, &h, &b), "{s} {h:?} {b}");
    // The other user routes too.
    for path in [
        "/api/orders".to_string(),
        format!("/api/promotions/{promotion}/token"),
    ] {
        let req = if path.ends_with("token") {
            c.post(nginx.url(&path))
        } else {
            c.get(nginx.url(&path))
        };
        let (s, h, b) = read(req.send().await.unwrap()).await;
        assert!(guard_refused(s, &h, &b), "{path}: {s} {h:?} {b}");
    }

    // None of those reached the gateway: it counted no purchase at all.
    let metrics = client()
        .get(format!("http://{}/metrics", gateway.addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Every route's series is exported from start-up at 0: none may count.
    let counted: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("seckill_http_requests_total{") && l.contains("route=\"purchase\"")
        })
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(
        counted.is_empty(),
        "the gateway saw a purchase: {counted:?}\n{metrics}"
    );

    // A bearer header passes the guard; the gateway judges the token.
    let (s, h, b) = read(
        c.post(&purchase_url)
            .header("authorization", "Bearer not-a-jwt")
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{b}");
    assert!(!guard_refused(s, &h, &b), "the gateway answered: {h:?} {b}");
    let (s, _, b) = read(
        c.post(&purchase_url)
            .bearer_auth(user_token(1))
            .json(&json!({}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");

    // Public routes need no Authorization.
    let (s, _, b) = read(c.get(nginx.url("/api/promotions")).send().await.unwrap()).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}
