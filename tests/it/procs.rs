//! Processes a fault test owns: its own Redis, its own PostgreSQL, or the
//! real `seckill` binary, each on a spare loopback port, so the test can
//! stop, kill and restart them without touching anyone else's.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use seckill::config::Settings;

use crate::helpers::{ADMIN_TOKEN, StoreOwner, listening_addr, seckill_command};

/// A port nothing listens on right now.
pub fn spare_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "seckill-it-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn wait_for_port(port: u16, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} did not open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private `redis-server`.
pub struct RedisProc {
    pub port: u16,
    dir: PathBuf,
    aof: bool,
    /// The primary's port, for a replica.
    replica_of: Option<u16>,
    child: Option<Child>,
}

impl RedisProc {
    /// Starts one; with `aof`, `appendonly yes` and `appendfsync everysec`.
    pub async fn start(aof: bool) -> RedisProc {
        let mut r = RedisProc {
            port: spare_port(),
            dir: scratch_dir("redis"),
            aof,
            replica_of: None,
            child: None,
        };
        r.spawn().await;
        r
    }

    /// Starts a replica of `primary` (`--replicaof`), without persistence,
    /// and waits until the primary counts it online.
    pub async fn start_replica_of(primary: &RedisProc) -> RedisProc {
        let mut r = RedisProc {
            port: spare_port(),
            dir: scratch_dir("redis"),
            aof: false,
            replica_of: Some(primary.port),
            child: None,
        };
        r.spawn().await;
        primary.wait_for_replicas(1).await;
        r
    }

    /// Waits until this primary has `n` replicas online.
    pub async fn wait_for_replicas(&self, n: usize) {
        let mut c = redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        for _ in 0..400 {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut c)
                .await
                .unwrap();
            if info.matches("state=online").count() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis on {} never had {n} replicas online", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", if self.aof { "yes" } else { "no" }])
            .args(
                self.replica_of
                    .map(|p| vec!["--replicaof".to_string(), "127.0.0.1".into(), p.to_string()])
                    .unwrap_or_default(),
            )
            .args(["--appendfsync", "everysec"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts (is it installed?)");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10)).await;
        // Loading the AOF can take a moment after the port opens.
        let client = redis::Client::open(self.url()).unwrap();
        for _ in 0..200 {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis on {} never answered PING", self.port);
    }

    /// `kill -9`: no shutdown, no final fsync.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and data directory.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn().await;
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private PostgreSQL cluster (initdb + pg_ctl), run as the `postgres`
/// user when the tests run as root.
pub struct PgProc {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

fn pg_bin_dir() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates
        .into_iter()
        .rev()
        .find(|p| p.join("pg_ctl").exists())
        .expect("PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn pg_command(bin: &Path, tool: &str) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

impl PgProc {
    pub async fn start() -> PgProc {
        let dir = scratch_dir("pg");
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let pg = PgProc {
            port: spare_port(),
            dir,
            bin: pg_bin_dir(),
        };
        let out = pg_command(&pg.bin, "initdb")
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "-D",
            ])
            .arg(pg.dir.join("data"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.up().await;
        pg
    }

    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// Starts the server (again).
    pub async fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(self.dir.join("log"))
            .args(["-w", "start"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for_port(self.port, Duration::from_secs(20)).await;
    }

    /// Stops the server (fast: connections are cut, as in an outage).
    pub fn down(&self) {
        let out = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgProc {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real `seckill serve` binary on a free port. Dropping it kills the
/// process and waits for it; then its share of the deployment's stores goes.
pub struct GatewayProc {
    pub addr: String,
    pub child: tokio::process::Child,
    _stores: StoreOwner,
}

impl GatewayProc {
    /// Starts `seckill serve` with `settings` and `extra` environment.
    pub async fn start(settings: &Settings, extra: &[(&str, &str)]) -> GatewayProc {
        GatewayProc::start_with(settings, &[], extra).await
    }

    /// Starts `seckill serve ARGS` with `settings` and `extra` environment
    /// (which may override the defaults below).
    pub async fn start_with(
        settings: &Settings,
        args: &[&str],
        extra: &[(&str, &str)],
    ) -> GatewayProc {
        let stores = StoreOwner::claim(settings);
        let mut cmd = seckill_command(settings);
        cmd.arg("serve")
            .args(args)
            .env("SECKILL_LISTEN", "127.0.0.1:0")
            .env("SECKILL_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            // One test client plays thousands of buyers from one address.
            .env("SECKILL_RATE_GLOBAL", "0")
            .env("SECKILL_RATE_USER", "0")
            .env("SECKILL_RATE_IP", "0")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("the seckill binary starts");
        let addr = listening_addr(&mut child, "gateway listening").await;
        GatewayProc {
            addr,
            child,
            _stores: stores,
        }
    }

    /// Creates a promotion on sale now through this gateway; returns its id.
    pub async fn active_promotion(&self, stock: i64, per_user_limit: i64) -> i64 {
        let created: serde_json::Value = reqwest::Client::new()
            .post(format!("http://{}/admin/promotions", self.addr))
            .bearer_auth(ADMIN_TOKEN)
            .json(&crate::helpers::active_body(stock, per_user_limit))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        created["id"].as_i64().expect("the promotion is created")
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("still running") as i32
    }

    /// `kill -9`.
    pub async fn kill9(&mut self) {
        self.child.kill().await.unwrap();
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        // SIGKILL, and wait until it is gone: it must not write to Redis
        // or PostgreSQL once its stores are being dropped.
        let _ = self.child.start_kill();
        for _ in 0..250 {
            if !matches!(self.child.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
