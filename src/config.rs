//! Settings, read once from the environment at start-up.
//!
//! Every knob is an `ENV_X` / `DEFAULT_X` pair with the reason for the default
//! beside it; the defaults live here and nowhere else in the code
//! (`Settings::default()` is the parser with nothing set), and
//! `docs/configuration.md` is the one document that lists them. Every value
//! that does not parse or makes no sense is reported in one start-up error
//! naming each variable. Tests build [`Settings`] directly instead of setting
//! environment variables.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

/// Address the gateway binds; `127.0.0.1:0` picks a free port.
const ENV_LISTEN: &str = "SECKILL_LISTEN";
const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Where `seckill worker` serves `/health`, `/ready` and `/metrics` (unset:
/// nowhere). The gateway serves them on `SECKILL_LISTEN`.
const ENV_WORKER_LISTEN: &str = "SECKILL_WORKER_LISTEN";

const ENV_REDIS_URL: &str = "SECKILL_REDIS_URL";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

const ENV_DATABASE_URL: &str = "SECKILL_DATABASE_URL";
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/seckill";

/// Namespace of every Redis key, so deployments and test runs share one Redis.
const ENV_KEY_PREFIX: &str = "SECKILL_KEY_PREFIX";
const DEFAULT_KEY_PREFIX: &str = "sk";

const ENV_JWT_SECRET: &str = "SECKILL_JWT_SECRET";
/// A development value: start-up warns loudly while it is in use.
pub const DEV_JWT_SECRET: &str = "dev-only-jwt-secret-change-me";

const ENV_ADMIN_TOKEN: &str = "SECKILL_ADMIN_TOKEN";
/// A development value: start-up warns loudly while it is in use.
pub const DEV_ADMIN_TOKEN: &str = "dev-only-admin-token-change-me";

/// When set, a user JWT must carry this `iss` (unset: not checked), and
/// `seckill token` writes it.
const ENV_JWT_ISSUER: &str = "SECKILL_JWT_ISSUER";

/// When set, a user JWT's `aud` must name this audience (unset: not
/// checked), and `seckill token` writes it.
const ENV_JWT_AUDIENCE: &str = "SECKILL_JWT_AUDIENCE";

/// When set, a user JWT living longer than this many seconds (`exp - iat`,
/// or `exp - now` without `iat`) is refused, so a leaked long-lived token
/// cannot be replayed for months (unset: not checked).
const ENV_JWT_MAX_LIFETIME_SECS: &str = "SECKILL_JWT_MAX_LIFETIME_SECS";

/// Unpaid orders are cancelled after this long; fifteen minutes is the usual
/// checkout window of shops.
const ENV_PAYMENT_TIMEOUT_SECS: &str = "SECKILL_PAYMENT_TIMEOUT_SECS";
const DEFAULT_PAYMENT_TIMEOUT_SECS: u64 = 900;

/// How often unpaid orders past the payment timeout are looked for: a unit
/// comes back to sale at most this long after its deadline.
const ENV_SWEEP_INTERVAL_MS: &str = "SECKILL_SWEEP_INTERVAL_MS";
const DEFAULT_SWEEP_INTERVAL_MS: u64 = 1000;

/// How often the worker process compares Redis and PostgreSQL to keep the
/// `seckill_reconcile_drift` metric current.
const ENV_RECONCILE_INTERVAL_MS: &str = "SECKILL_RECONCILE_INTERVAL_MS";
const DEFAULT_RECONCILE_INTERVAL_MS: u64 = 30_000;

/// How often the worker process looks for a promotion on sale whose Redis
/// state is lost (a failover to a replica that missed it, a restart without
/// persistence) and rebuilds it from PostgreSQL.
const ENV_RECOVER_INTERVAL_MS: &str = "SECKILL_RECOVER_INTERVAL_MS";
const DEFAULT_RECOVER_INTERVAL_MS: u64 = 2_000;

/// Purchases per second this gateway lets through to Redis (0: no limit).
/// Above what one Redis serves, the excess is better refused at the edge.
const ENV_RATE_GLOBAL: &str = "SECKILL_RATE_GLOBAL";
const DEFAULT_RATE_GLOBAL: u32 = 50_000;

/// Requests per second per user on the sale routes (purchase, token,
/// captcha) and the order routes (pay, cancel, the order list, the purchase
/// result), one budget for all, with a burst of the same size (0: no limit).
/// A person clicks a few times a second; a script does not get more.
const ENV_RATE_USER: &str = "SECKILL_RATE_USER";
const DEFAULT_RATE_USER: u32 = 5;

/// Requests per second per client IP on `/api` (0: no limit). Generous,
/// because many buyers can share one address behind a carrier NAT.
const ENV_RATE_IP: &str = "SECKILL_RATE_IP";
const DEFAULT_RATE_IP: u32 = 200;

/// Failed admin authentications per minute per client IP, with a burst of
/// the same size (0: no limit); once spent, every admin request from that
/// address is `429` until the budget refills. The admin token is typed by
/// people and scripts that get it right; sixty failures a minute is far past
/// a mistyped token and far below a guessing attack.
const ENV_RATE_ADMIN_FAILURES: &str = "SECKILL_RATE_ADMIN_FAILURES";
const DEFAULT_RATE_ADMIN_FAILURES: u32 = 60;

/// Failed logins a minute per client address and per account name, with a
/// burst of the same size (0: no limit); once either is spent, logins from
/// that address or for that account are `429` until it refills. A person
/// mistypes a password a few times; a guessing script gets ten a minute.
const ENV_RATE_LOGIN_FAILURES: &str = "SECKILL_RATE_LOGIN_FAILURES";
const DEFAULT_RATE_LOGIN_FAILURES: u32 = 10;

/// Lifetime of the JWT `POST /api/login` issues (capped by
/// `SECKILL_JWT_MAX_LIFETIME_SECS` when that is set): a sale session.
const ENV_LOGIN_TTL_SECS: &str = "SECKILL_LOGIN_TTL_SECS";
const DEFAULT_LOGIN_TTL_SECS: u64 = 3600;

/// Peers whose `X-Forwarded-For` / `X-Real-IP` are believed: addresses or
/// CIDR blocks, comma-separated. Loopback, where nginx usually runs.
const ENV_TRUSTED_PROXIES: &str = "SECKILL_TRUSTED_PROXIES";
const DEFAULT_TRUSTED_PROXIES: &str = "127.0.0.1/32,::1/128";

/// Client connections served at once; past it, new connections wait in the
/// kernel's accept queue.
const ENV_MAX_CONNECTIONS: &str = "SECKILL_MAX_CONNECTIONS";
const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Lifetime of an admission token: long enough to click "buy", short enough
/// that tokens cannot be hoarded.
const ENV_TOKEN_TTL_SECS: &str = "SECKILL_TOKEN_TTL_SECS";
const DEFAULT_TOKEN_TTL_SECS: u64 = 60;

/// Admission tokens issued per promotion, as a multiple of its stock.
const ENV_TOKEN_CAP_MULTIPLE: &str = "SECKILL_TOKEN_CAP_MULTIPLE";
const DEFAULT_TOKEN_CAP_MULTIPLE: u64 = 3;

/// HMAC key of admission tokens; derived from the JWT secret when unset.
const ENV_TOKEN_SECRET: &str = "SECKILL_TOKEN_SECRET";

/// Lifetime of a captcha challenge.
const ENV_CAPTCHA_TTL_SECS: &str = "SECKILL_CAPTCHA_TTL_SECS";
const DEFAULT_CAPTCHA_TTL_SECS: u64 = 120;

/// Tokio worker threads of the gateway. 0 (the default) chooses from the
/// machine: one per core but one, at least one ([`Settings::runtime_threads`]).
/// The core left over is for Redis (one thread) and the process's background
/// thread (order workers, sweeper). Measured on 2 cores shared with Redis,
/// PostgreSQL and the load generator (loadtest/README.md): one gateway thread
/// served as many purchases as two without workers and more with them in the
/// process; two served more `/health` and rejections, which cost Redis nothing.
const ENV_THREADS: &str = "SECKILL_THREADS";
const DEFAULT_THREADS: usize = 0;

/// The request handlers' PostgreSQL pool (admin and order queries, pay and
/// cancel). The order workers, the sweeper and the periodic reconcile have a
/// pool of their own (`SECKILL_WORKERS` + 2), so requests cannot take the
/// connections the batch inserts need.
const ENV_DB_MAX_CONNECTIONS: &str = "SECKILL_DB_MAX_CONNECTIONS";
const DEFAULT_DB_MAX_CONNECTIONS: u32 = 10;

/// Order worker tasks per process (each one a stream consumer of its own). A
/// worker spends most of a batch waiting for PostgreSQL's commit; four of them
/// overlap those waits (loadtest/bench.sh: 0.5 of COPY speed, two: about 0.4).
const ENV_WORKERS: &str = "SECKILL_WORKERS";
const DEFAULT_WORKERS: usize = 4;

/// Nice value (0 to 19) of the background thread of `seckill serve` (order
/// workers, sweeper, stream gauges, periodic reconcile). During a burst the
/// gateway's threads come first and the stream holds the orders a little
/// longer (a `200` is already final there); the workers catch up as soon as
/// the gateway leaves them CPU. 0 gives both the same weight.
const ENV_BACKGROUND_NICE: &str = "SECKILL_BACKGROUND_NICE";
const DEFAULT_BACKGROUND_NICE: i32 = 10;
/// The lowest priority Linux has.
const MAX_BACKGROUND_NICE: i32 = 19;

/// Orders read and written per batch: one statement and one commit each.
const ENV_WORKER_BATCH: &str = "SECKILL_WORKER_BATCH";
const DEFAULT_WORKER_BATCH: usize = 1000;

/// How long a worker blocks on an empty stream; bounds its shutdown latency.
const ENV_WORKER_BLOCK_MS: &str = "SECKILL_WORKER_BLOCK_MS";
const DEFAULT_WORKER_BLOCK_MS: u64 = 1000;

/// An entry pending this long with a consumer is presumed abandoned (its
/// worker died) and claimed by another. Well above the slowest healthy batch.
const ENV_CLAIM_IDLE_MS: &str = "SECKILL_CLAIM_IDLE_MS";
const DEFAULT_CLAIM_IDLE_MS: u64 = 30_000;

/// Buyers per call of `lua/purchase.lua` at most: concurrent purchases of one
/// promotion are coalesced into one call (1: each purchase alone).
const ENV_PURCHASE_BATCH: &str = "SECKILL_PURCHASE_BATCH";
const DEFAULT_PURCHASE_BATCH: usize = 64;

/// Purchases in flight towards Redis at once; past it the gateway answers 503
/// at once instead of queueing without end.
const ENV_MAX_INFLIGHT: &str = "SECKILL_MAX_INFLIGHT";
const DEFAULT_MAX_INFLIGHT: usize = 4096;

/// How long promotion meta stays in the local cache. Short, so an edit made
/// through another gateway is seen within a second.
const ENV_CACHE_TTL_MS: &str = "SECKILL_CACHE_TTL_MS";
const DEFAULT_CACHE_TTL_MS: u64 = 1000;

/// How long a local sold-out flag lives. A returned unit is sold again at most
/// this long after it comes back.
const ENV_SOLD_OUT_TTL_MS: &str = "SECKILL_SOLD_OUT_TTL_MS";
const DEFAULT_SOLD_OUT_TTL_MS: u64 = 1000;

/// Time a client has to send its request headers (slowloris guard).
const ENV_HEADER_TIMEOUT_MS: &str = "SECKILL_HEADER_TIMEOUT_MS";
const DEFAULT_HEADER_TIMEOUT_MS: u64 = 5000;

/// Time a client has to send its request body once the headers are in.
const ENV_BODY_TIMEOUT_MS: &str = "SECKILL_BODY_TIMEOUT_MS";
const DEFAULT_BODY_TIMEOUT_MS: u64 = 5000;

/// Reply timeout of the gateway's Redis connection: a purchase script takes
/// well under a millisecond, so a slower answer means Redis is in trouble and
/// the buyer gets a prompt 503 instead of a hang.
const ENV_REDIS_TIMEOUT_MS: &str = "SECKILL_REDIS_TIMEOUT_MS";
const DEFAULT_REDIS_TIMEOUT_MS: u64 = 500;

/// Replicas a purchase's write must reach (`WAIT`) before its `200`: 0
/// answers after the primary alone (fastest; a failover may lose the last
/// writes); 1 or more means a confirmed order survives a failover.
const ENV_REDIS_WAIT_REPLICAS: &str = "SECKILL_REDIS_WAIT_REPLICAS";
const DEFAULT_REDIS_WAIT_REPLICAS: u32 = 0;

/// How long a batch waits for its replicas; past it the batch answers 503.
/// On loopback or one rack a replica acknowledges in about a millisecond,
/// so 100 ms is a replica in trouble; it must stay below the Redis timeout.
const ENV_REDIS_WAIT_TIMEOUT_MS: &str = "SECKILL_REDIS_WAIT_TIMEOUT_MS";
const DEFAULT_REDIS_WAIT_TIMEOUT_MS: u64 = 100;

/// On SIGTERM, in-flight requests get this long to finish before the process
/// exits anyway.
const ENV_SHUTDOWN_GRACE_MS: &str = "SECKILL_SHUTDOWN_GRACE_MS";
const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;

/// Log format: `text` for people, `json` for log pipelines. Unset, it is
/// `json` once real secrets are configured (production) and `text` while the
/// development secrets are in use.
const ENV_LOG_FORMAT: &str = "SECKILL_LOG_FORMAT";

/// A directory to read the Lua scripts from instead of the embedded copies
/// (unset: embedded), so ops can try a changed script without a rebuild.
const ENV_LUA_DIR: &str = "SECKILL_LUA_DIR";

/// Where traces go over OTLP (unset: no export, no tracing layer at all).
/// The standard OpenTelemetry variables, so collectors' docs apply as they are.
const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// `grpc` (Jaeger and collectors listen on 4317) or `http/protobuf` (4318).
const ENV_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const DEFAULT_OTLP_PROTOCOL: &str = "grpc";
const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
const DEFAULT_SERVICE_NAME: &str = "seckill";
/// Finished spans waiting for export; past it spans are dropped (and
/// counted), never waited for: 2048 is the OpenTelemetry default.
const ENV_BSP_MAX_QUEUE_SIZE: &str = "OTEL_BSP_MAX_QUEUE_SIZE";
const DEFAULT_BSP_MAX_QUEUE_SIZE: usize = 2048;
/// Spans per export request (the OpenTelemetry default).
const ENV_BSP_MAX_EXPORT_BATCH_SIZE: &str = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE";
const DEFAULT_BSP_MAX_EXPORT_BATCH_SIZE: usize = 512;
/// The longest a finished span waits before its batch leaves (the
/// OpenTelemetry default).
const ENV_BSP_SCHEDULE_DELAY: &str = "OTEL_BSP_SCHEDULE_DELAY";
const DEFAULT_BSP_SCHEDULE_DELAY_MS: u64 = 5000;

/// The longest payment timeout accepted: PostgreSQL adds it to an order's
/// creation time (`make_interval`), which must stay a valid timestamp; no
/// shop needs more than this.
const MAX_PAYMENT_TIMEOUT_SECS: u64 = 100 * 365 * 24 * 3600 + 25 * 24 * 3600;

/// More tokio threads than this is a typo, not a machine.
const MAX_THREADS: usize = 1024;

/// Each worker holds a Redis connection and a PostgreSQL connection of the
/// workers' pool: more than this is a typo.
const MAX_WORKERS: usize = 1024;

/// The largest request body accepted; promotion bodies are a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Everything the process is configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub worker_listen: Option<SocketAddr>,
    pub redis_url: String,
    pub database_url: String,
    pub key_prefix: String,
    pub jwt_secret: String,
    pub admin_token: String,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub jwt_max_lifetime: Option<Duration>,
    pub payment_timeout: Duration,
    pub sweep_interval: Duration,
    pub reconcile_interval: Duration,
    pub recover_interval: Duration,
    pub rate_global: u32,
    pub rate_user: u32,
    pub rate_ip: u32,
    pub rate_admin_failures: u32,
    pub rate_login_failures: u32,
    pub login_ttl: Duration,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_connections: usize,
    pub token_ttl: Duration,
    pub token_cap_multiple: u64,
    pub token_secret: String,
    pub captcha_ttl: Duration,
    pub threads: usize,
    pub db_max_connections: u32,
    pub workers: usize,
    pub background_nice: i32,
    pub worker_batch: usize,
    pub worker_block: Duration,
    pub claim_idle: Duration,
    pub max_inflight: usize,
    pub purchase_batch: usize,
    pub cache_ttl: Duration,
    pub sold_out_ttl: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub shutdown_grace: Duration,
    pub redis_timeout: Duration,
    pub redis_wait_replicas: u32,
    pub redis_wait_timeout: Duration,
    pub log_format: LogFormat,
    pub lua_dir: Option<std::path::PathBuf>,
    pub otlp: OtlpSettings,
}

/// Trace export over OTLP (see `telemetry::otlp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtlpSettings {
    /// `None`: tracing stays in the log, nothing is exported.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub max_queue: usize,
    pub max_batch: usize,
    pub schedule_delay: Duration,
}

/// The OTLP transport, spelled as the OpenTelemetry specification does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl FromStr for OtlpProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            other => Err(format!("expected `grpc` or `http/protobuf`, got `{other}`")),
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected `text` or `json`, got `{other}`")),
        }
    }
}

impl Default for Settings {
    /// The settings with no variable set: the development defaults.
    fn default() -> Self {
        Settings::from_lookup(|_| None).expect("the defaults are valid settings")
    }
}

/// Reads variables through a lookup, keeping every error instead of stopping
/// at the first, and the name of every variable read.
struct Reader<L> {
    lookup: L,
    errors: RefCell<Vec<String>>,
    read: RefCell<Vec<&'static str>>,
}

impl<L: Fn(&str) -> Option<String>> Reader<L> {
    fn new(lookup: L) -> Self {
        Reader {
            lookup,
            errors: RefCell::new(Vec::new()),
            read: RefCell::new(Vec::new()),
        }
    }

    /// The raw value of `name`.
    fn raw(&self, name: &'static str) -> Option<String> {
        self.read.borrow_mut().push(name);
        (self.lookup)(name)
    }

    /// The raw value of `name`, where empty means unset.
    fn optional(&self, name: &'static str) -> Option<String> {
        self.raw(name).filter(|v| !v.trim().is_empty())
    }

    fn text(&self, name: &'static str, default: &str) -> String {
        self.raw(name).unwrap_or_else(|| default.to_string())
    }

    /// `name` parsed as `T`; on a bad value the error is noted and the
    /// default stands in, so the other variables are still checked.
    fn parse<T, D>(&self, name: &'static str, default: D) -> T
    where
        T: FromStr,
        T::Err: std::fmt::Display,
        D: ToString,
    {
        let default = default.to_string();
        let fallback = || {
            default
                .parse()
                .unwrap_or_else(|_| panic!("the default of {name} (`{default}`) does not parse"))
        };
        match self.raw(name) {
            None => fallback(),
            Some(raw) => raw.trim().parse().unwrap_or_else(|e| {
                self.error(name, format!("invalid value `{raw}`: {e}"));
                fallback()
            }),
        }
    }

    fn millis(&self, name: &'static str, default: u64) -> Duration {
        Duration::from_millis(self.parse(name, default))
    }

    fn secs(&self, name: &'static str, default: u64) -> Duration {
        Duration::from_secs(self.parse(name, default))
    }

    fn error(&self, name: &str, message: impl std::fmt::Display) {
        self.errors.borrow_mut().push(format!("{name}: {message}"));
    }

    /// Notes an error for `name` unless `ok`.
    fn check(&self, ok: bool, name: &str, message: &str) {
        if !ok {
            self.error(name, message);
        }
    }
}

impl Settings {
    /// The gateway runtime's worker threads: `SECKILL_THREADS`, or when it
    /// is 0 one per core but one (at least one).
    pub fn runtime_threads(&self) -> usize {
        if self.threads > 0 {
            return self.threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_sub(1).max(1)
    }

    /// Reads every variable once; every one that does not parse or makes no
    /// sense is named in the error.
    pub fn from_env() -> anyhow::Result<Settings> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup`, so the parsing is testable
    /// without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        let (settings, reader) = Self::read(lookup);
        let errors = reader.errors.into_inner();
        if errors.is_empty() {
            Ok(settings)
        } else {
            anyhow::bail!("invalid configuration:\n  {}", errors.join("\n  "))
        }
    }

    /// The names of every variable the settings are read from.
    pub fn variables() -> Vec<&'static str> {
        let (_, reader) = Self::read(|_| None);
        reader.read.into_inner()
    }

    fn read<L: Fn(&str) -> Option<String>>(lookup: L) -> (Settings, Reader<L>) {
        let r = Reader::new(lookup);
        let jwt_secret = r.text(ENV_JWT_SECRET, DEV_JWT_SECRET);
        let trusted_proxies = parse_trusted(&r.text(ENV_TRUSTED_PROXIES, DEFAULT_TRUSTED_PROXIES))
            .unwrap_or_else(|e| {
                r.error(ENV_TRUSTED_PROXIES, e);
                Vec::new()
            });
        let worker_listen = r.optional(ENV_WORKER_LISTEN).and_then(|v| {
            v.trim()
                .parse()
                .map_err(|e| r.error(ENV_WORKER_LISTEN, format!("invalid value `{v}`: {e}")))
                .ok()
        });
        let mut settings = Settings {
            listen: r.parse(ENV_LISTEN, DEFAULT_LISTEN),
            worker_listen,
            redis_url: r.text(ENV_REDIS_URL, DEFAULT_REDIS_URL),
            database_url: r.text(ENV_DATABASE_URL, DEFAULT_DATABASE_URL),
            key_prefix: r.text(ENV_KEY_PREFIX, DEFAULT_KEY_PREFIX),
            token_secret: r
                .raw(ENV_TOKEN_SECRET)
                .unwrap_or_else(|| derive_token_secret(&jwt_secret)),
            jwt_secret,
            admin_token: r.text(ENV_ADMIN_TOKEN, DEV_ADMIN_TOKEN),
            jwt_issuer: r.optional(ENV_JWT_ISSUER),
            jwt_audience: r.optional(ENV_JWT_AUDIENCE),
            jwt_max_lifetime: r.optional(ENV_JWT_MAX_LIFETIME_SECS).and_then(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|e| {
                        r.error(
                            ENV_JWT_MAX_LIFETIME_SECS,
                            format!("invalid value `{v}`: {e}"),
                        )
                    })
                    .ok()
                    .map(Duration::from_secs)
            }),
            payment_timeout: r.secs(ENV_PAYMENT_TIMEOUT_SECS, DEFAULT_PAYMENT_TIMEOUT_SECS),
            sweep_interval: r.millis(ENV_SWEEP_INTERVAL_MS, DEFAULT_SWEEP_INTERVAL_MS),
            reconcile_interval: r.millis(ENV_RECONCILE_INTERVAL_MS, DEFAULT_RECONCILE_INTERVAL_MS),
            recover_interval: r.millis(ENV_RECOVER_INTERVAL_MS, DEFAULT_RECOVER_INTERVAL_MS),
            rate_global: r.parse(ENV_RATE_GLOBAL, DEFAULT_RATE_GLOBAL),
            rate_user: r.parse(ENV_RATE_USER, DEFAULT_RATE_USER),
            rate_ip: r.parse(ENV_RATE_IP, DEFAULT_RATE_IP),
            rate_admin_failures: r.parse(ENV_RATE_ADMIN_FAILURES, DEFAULT_RATE_ADMIN_FAILURES),
            rate_login_failures: r.parse(ENV_RATE_LOGIN_FAILURES, DEFAULT_RATE_LOGIN_FAILURES),
            login_ttl: r.secs(ENV_LOGIN_TTL_SECS, DEFAULT_LOGIN_TTL_SECS),
            trusted_proxies,
            max_connections: r.parse(ENV_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS),
            token_ttl: r.secs(ENV_TOKEN_TTL_SECS, DEFAULT_TOKEN_TTL_SECS),
            token_cap_multiple: r.parse(ENV_TOKEN_CAP_MULTIPLE, DEFAULT_TOKEN_CAP_MULTIPLE),
            captcha_ttl: r.secs(ENV_CAPTCHA_TTL_SECS, DEFAULT_CAPTCHA_TTL_SECS),
            threads: r.parse(ENV_THREADS, DEFAULT_THREADS),
            db_max_connections: r.parse(ENV_DB_MAX_CONNECTIONS, DEFAULT_DB_MAX_CONNECTIONS),
            workers: r.parse(ENV_WORKERS, DEFAULT_WORKERS),
            background_nice: r.parse(ENV_BACKGROUND_NICE, DEFAULT_BACKGROUND_NICE),
            worker_batch: r.parse(ENV_WORKER_BATCH, DEFAULT_WORKER_BATCH),
            worker_block: r.millis(ENV_WORKER_BLOCK_MS, DEFAULT_WORKER_BLOCK_MS),
            claim_idle: r.millis(ENV_CLAIM_IDLE_MS, DEFAULT_CLAIM_IDLE_MS),
            max_inflight: r.parse(ENV_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT),
            purchase_batch: r.parse(ENV_PURCHASE_BATCH, DEFAULT_PURCHASE_BATCH),
            cache_ttl: r.millis(ENV_CACHE_TTL_MS, DEFAULT_CACHE_TTL_MS),
            sold_out_ttl: r.millis(ENV_SOLD_OUT_TTL_MS, DEFAULT_SOLD_OUT_TTL_MS),
            header_timeout: r.millis(ENV_HEADER_TIMEOUT_MS, DEFAULT_HEADER_TIMEOUT_MS),
            body_timeout: r.millis(ENV_BODY_TIMEOUT_MS, DEFAULT_BODY_TIMEOUT_MS),
            shutdown_grace: r.millis(ENV_SHUTDOWN_GRACE_MS, DEFAULT_SHUTDOWN_GRACE_MS),
            redis_timeout: r.millis(ENV_REDIS_TIMEOUT_MS, DEFAULT_REDIS_TIMEOUT_MS),
            redis_wait_replicas: r.parse(ENV_REDIS_WAIT_REPLICAS, DEFAULT_REDIS_WAIT_REPLICAS),
            redis_wait_timeout: r.millis(ENV_REDIS_WAIT_TIMEOUT_MS, DEFAULT_REDIS_WAIT_TIMEOUT_MS),
            log_format: LogFormat::Text,
            lua_dir: r.optional(ENV_LUA_DIR).map(std::path::PathBuf::from),
            otlp: OtlpSettings {
                endpoint: r.optional(ENV_OTLP_ENDPOINT).map(|v| v.trim().to_string()),
                protocol: r.parse(ENV_OTLP_PROTOCOL, DEFAULT_OTLP_PROTOCOL),
                service_name: r.text(ENV_SERVICE_NAME, DEFAULT_SERVICE_NAME),
                max_queue: r.parse(ENV_BSP_MAX_QUEUE_SIZE, DEFAULT_BSP_MAX_QUEUE_SIZE),
                max_batch: r.parse(
                    ENV_BSP_MAX_EXPORT_BATCH_SIZE,
                    DEFAULT_BSP_MAX_EXPORT_BATCH_SIZE,
                ),
                schedule_delay: r.millis(ENV_BSP_SCHEDULE_DELAY, DEFAULT_BSP_SCHEDULE_DELAY_MS),
            },
        };
        // JSON logs by default once real secrets are configured (production).
        let default_format = if settings.insecure_secrets().is_empty() {
            "json"
        } else {
            "text"
        };
        settings.log_format = r.parse(ENV_LOG_FORMAT, default_format);
        settings.validate(&r);
        (settings, r)
    }

    /// Notes every setting that parsed but makes no sense.
    fn validate<L: Fn(&str) -> Option<String>>(&self, r: &Reader<L>) {
        r.check(
            !self.key_prefix.is_empty() && !self.key_prefix.contains(['{', '}', ' ']),
            ENV_KEY_PREFIX,
            "must be non-empty, without braces or spaces",
        );
        r.check(
            !self.jwt_secret.is_empty(),
            ENV_JWT_SECRET,
            "must not be empty",
        );
        r.check(
            !self.admin_token.is_empty(),
            ENV_ADMIN_TOKEN,
            "must not be empty",
        );
        r.check(
            self.workers > 0,
            ENV_WORKERS,
            "must be at least 1 (use `serve --no-workers` to run none)",
        );
        r.check(
            !self.payment_timeout.is_zero()
                && self.payment_timeout.as_secs() <= MAX_PAYMENT_TIMEOUT_SECS,
            ENV_PAYMENT_TIMEOUT_SECS,
            &format!(
                "must be between 1 and {MAX_PAYMENT_TIMEOUT_SECS} (100 years; PostgreSQL adds it \
                 to an order's creation time as an interval)"
            ),
        );
        r.check(
            self.jwt_max_lifetime.is_none_or(|d| !d.is_zero()),
            ENV_JWT_MAX_LIFETIME_SECS,
            "must be at least 1 (unset it to not check token lifetimes)",
        );
        r.check(
            self.claim_idle > self.worker_block,
            ENV_CLAIM_IDLE_MS,
            &format!(
                "must be longer than {ENV_WORKER_BLOCK_MS} ({} ms), or entries a healthy worker \
                 holds would be claimed from it",
                self.worker_block.as_millis()
            ),
        );
        r.check(
            self.threads <= MAX_THREADS,
            ENV_THREADS,
            &format!("must be at most {MAX_THREADS} (0 chooses from the cores)"),
        );
        r.check(
            self.workers <= MAX_WORKERS,
            ENV_WORKERS,
            &format!("must be at most {MAX_WORKERS}"),
        );
        r.check(
            (0..=MAX_BACKGROUND_NICE).contains(&self.background_nice),
            ENV_BACKGROUND_NICE,
            &format!("must be from 0 to {MAX_BACKGROUND_NICE}"),
        );
        r.check(
            self.redis_wait_replicas == 0 || self.redis_wait_timeout < self.redis_timeout,
            ENV_REDIS_WAIT_TIMEOUT_MS,
            &format!("must be below {ENV_REDIS_TIMEOUT_MS} when {ENV_REDIS_WAIT_REPLICAS} is set"),
        );
        for (ok, name) in [
            (
                !self.redis_wait_timeout.is_zero(),
                ENV_REDIS_WAIT_TIMEOUT_MS,
            ),
            (!self.sweep_interval.is_zero(), ENV_SWEEP_INTERVAL_MS),
            (
                !self.reconcile_interval.is_zero(),
                ENV_RECONCILE_INTERVAL_MS,
            ),
            (!self.recover_interval.is_zero(), ENV_RECOVER_INTERVAL_MS),
            (!self.worker_block.is_zero(), ENV_WORKER_BLOCK_MS),
            (!self.claim_idle.is_zero(), ENV_CLAIM_IDLE_MS),
            (!self.cache_ttl.is_zero(), ENV_CACHE_TTL_MS),
            (!self.sold_out_ttl.is_zero(), ENV_SOLD_OUT_TTL_MS),
            (!self.header_timeout.is_zero(), ENV_HEADER_TIMEOUT_MS),
            (!self.body_timeout.is_zero(), ENV_BODY_TIMEOUT_MS),
            (!self.shutdown_grace.is_zero(), ENV_SHUTDOWN_GRACE_MS),
            (self.worker_batch > 0, ENV_WORKER_BATCH),
            (self.max_connections > 0, ENV_MAX_CONNECTIONS),
            (self.token_cap_multiple > 0, ENV_TOKEN_CAP_MULTIPLE),
            (!self.token_ttl.is_zero(), ENV_TOKEN_TTL_SECS),
            (!self.login_ttl.is_zero(), ENV_LOGIN_TTL_SECS),
            (!self.captcha_ttl.is_zero(), ENV_CAPTCHA_TTL_SECS),
            (!self.redis_timeout.is_zero(), ENV_REDIS_TIMEOUT_MS),
            (self.purchase_batch > 0, ENV_PURCHASE_BATCH),
            (self.max_inflight > 0, ENV_MAX_INFLIGHT),
            (self.db_max_connections > 0, ENV_DB_MAX_CONNECTIONS),
            (self.otlp.max_queue > 0, ENV_BSP_MAX_QUEUE_SIZE),
            (self.otlp.max_batch > 0, ENV_BSP_MAX_EXPORT_BATCH_SIZE),
            (!self.otlp.schedule_delay.is_zero(), ENV_BSP_SCHEDULE_DELAY),
        ] {
            r.check(ok, name, "must be at least 1");
        }
    }

    /// Whether a development secret is in use (start-up warns loudly).
    pub fn insecure_secrets(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.jwt_secret == DEV_JWT_SECRET {
            out.push(ENV_JWT_SECRET);
        }
        if self.admin_token == DEV_ADMIN_TOKEN {
            out.push(ENV_ADMIN_TOKEN);
        }
        out
    }
}

/// The admission-token key when none is configured: a hash of the JWT
/// secret under a label of its own, so the two keys differ.
fn derive_token_secret(jwt_secret: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("seckill admission tokens\0{jwt_secret}"));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `SECKILL_TRUSTED_PROXIES`: comma-separated addresses or CIDR blocks.
pub fn parse_trusted(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse() {
        let s = Settings::from_lookup(|_| None).unwrap();
        assert_eq!(s.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(s.payment_timeout, Duration::from_secs(900));
        assert_eq!(s.insecure_secrets().len(), 2);
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = Settings::from_lookup(|n| (n == ENV_WORKER_BATCH).then(|| "lots".to_string()))
            .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains(ENV_WORKER_BATCH), "{text}");

        let err = Settings::from_lookup(|n| (n == ENV_LISTEN).then(|| "nowhere".to_string()))
            .unwrap_err();
        assert!(format!("{err:#}").contains(ENV_LISTEN));
    }

    #[test]
    fn logs_are_json_by_default_once_real_secrets_are_set() {
        assert_eq!(
            Settings::from_lookup(|_| None).unwrap().log_format,
            LogFormat::Text
        );
        let prod = Settings::from_lookup(|n| match n {
            "SECKILL_JWT_SECRET" | "SECKILL_ADMIN_TOKEN" => Some("real".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(prod.log_format, LogFormat::Json);
    }

    #[test]
    fn set_secrets_silence_the_warning() {
        let s = Settings::from_lookup(|n| match n {
            "SECKILL_JWT_SECRET" => Some("s3cret".into()),
            "SECKILL_ADMIN_TOKEN" => Some("adm".into()),
            _ => None,
        })
        .unwrap();
        assert!(s.insecure_secrets().is_empty());
    }

    #[test]
    fn every_bad_variable_is_named_in_one_error() {
        let err = Settings::from_lookup(|n| match n {
            ENV_WORKER_BATCH => Some("lots".into()),
            ENV_RATE_IP => Some("-1".into()),
            ENV_TRUSTED_PROXIES => Some("nonsense".into()),
            ENV_MAX_INFLIGHT => Some("0".into()),
            _ => None,
        })
        .unwrap_err();
        let text = format!("{err:#}");
        for name in [
            ENV_WORKER_BATCH,
            ENV_RATE_IP,
            ENV_TRUSTED_PROXIES,
            ENV_MAX_INFLIGHT,
        ] {
            assert!(text.contains(name), "{name} missing from: {text}");
        }
    }

    #[test]
    fn bad_trusted_proxy_lists_are_refused() {
        assert!(parse_trusted("10.0.0.0/8,nonsense").is_err());
        assert_eq!(parse_trusted("").unwrap(), vec![]);
        assert_eq!(parse_trusted(" 127.0.0.1 ").unwrap().len(), 1);
    }

    /// `docs/configuration.md` is where operators look: every variable the
    /// settings are read from is listed there, spelled as the code reads it.
    #[test]
    fn every_variable_read_is_documented() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md");
        let doc = std::fs::read_to_string(path).expect("docs/configuration.md exists");
        let variables = Settings::variables();
        assert!(variables.len() > 30, "{variables:?}");
        for name in variables {
            assert!(
                doc.contains(&format!("`{name}`")),
                "{name} is read by the code but not documented in docs/configuration.md"
            );
        }
    }

    #[test]
    fn redis_timeout_and_purchase_batch_are_read_and_zero_is_refused() {
        let s = Settings::from_lookup(|n| match n {
            ENV_REDIS_TIMEOUT_MS => Some("750".into()),
            ENV_PURCHASE_BATCH => Some("8".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.redis_timeout, Duration::from_millis(750));
        assert_eq!(s.purchase_batch, 8);
        let d = Settings::from_lookup(|_| None).unwrap();
        assert_eq!(
            d.redis_timeout,
            Duration::from_millis(DEFAULT_REDIS_TIMEOUT_MS)
        );
        assert_eq!(d.purchase_batch, DEFAULT_PURCHASE_BATCH);
        for name in [ENV_REDIS_TIMEOUT_MS, ENV_PURCHASE_BATCH] {
            let err = Settings::from_lookup(|n| (n == name).then(|| "0".to_string())).unwrap_err();
            assert!(format!("{err:#}").contains(name), "{err:#}");
        }
    }

    fn error_of(vars: &[(&str, &str)]) -> String {
        let err = Settings::from_lookup(|n| {
            vars.iter()
                .find(|(name, _)| *name == n)
                .map(|(_, v)| v.to_string())
        })
        .expect_err("the settings are refused");
        format!("{err:#}")
    }

    #[test]
    fn zero_durations_that_make_no_sense_are_refused_naming_each_variable() {
        let names = [
            ENV_PAYMENT_TIMEOUT_SECS,
            ENV_SWEEP_INTERVAL_MS,
            ENV_RECONCILE_INTERVAL_MS,
            ENV_RECOVER_INTERVAL_MS,
            ENV_WORKER_BLOCK_MS,
            ENV_CLAIM_IDLE_MS,
            ENV_CACHE_TTL_MS,
            ENV_SOLD_OUT_TTL_MS,
            ENV_HEADER_TIMEOUT_MS,
            ENV_BODY_TIMEOUT_MS,
            ENV_SHUTDOWN_GRACE_MS,
        ];
        for name in names {
            let text = error_of(&[(name, "0")]);
            assert!(text.contains(name), "{name} not named in: {text}");
        }
        // All at once: one error naming every one of them.
        let all: Vec<(&str, &str)> = names.iter().map(|n| (*n, "0")).collect();
        let text = error_of(&all);
        for name in names {
            assert!(text.contains(name), "{name} missing from: {text}");
        }
    }

    #[test]
    fn a_payment_timeout_beyond_what_postgresql_can_add_is_refused() {
        let ok = Settings::from_lookup(|n| {
            (n == ENV_PAYMENT_TIMEOUT_SECS).then(|| MAX_PAYMENT_TIMEOUT_SECS.to_string())
        })
        .unwrap();
        assert_eq!(ok.payment_timeout.as_secs(), MAX_PAYMENT_TIMEOUT_SECS);
        for bad in [
            (MAX_PAYMENT_TIMEOUT_SECS + 1).to_string(),
            u64::MAX.to_string(),
        ] {
            let text = error_of(&[(ENV_PAYMENT_TIMEOUT_SECS, &bad)]);
            assert!(text.contains(ENV_PAYMENT_TIMEOUT_SECS), "{text}");
        }
    }

    #[test]
    fn a_claim_idle_not_above_the_worker_block_is_refused() {
        let text = error_of(&[(ENV_WORKER_BLOCK_MS, "5000"), (ENV_CLAIM_IDLE_MS, "4000")]);
        assert!(text.contains(ENV_CLAIM_IDLE_MS), "{text}");
        assert!(!text.contains(&format!("{ENV_WORKER_BLOCK_MS}:")), "{text}");
        let text = error_of(&[(ENV_WORKER_BLOCK_MS, "5000"), (ENV_CLAIM_IDLE_MS, "5000")]);
        assert!(text.contains(ENV_CLAIM_IDLE_MS), "{text}");
        let s = Settings::from_lookup(|n| match n {
            ENV_WORKER_BLOCK_MS => Some("5000".into()),
            ENV_CLAIM_IDLE_MS => Some("5001".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.claim_idle, Duration::from_millis(5001));
    }

    #[test]
    fn thread_and_worker_counts_past_a_sane_bound_are_refused() {
        for (name, max) in [(ENV_THREADS, MAX_THREADS), (ENV_WORKERS, MAX_WORKERS)] {
            let text = error_of(&[(name, &(max + 1).to_string())]);
            assert!(text.contains(name), "{text}");
            let s = Settings::from_lookup(|n| (n == name).then(|| max.to_string()));
            assert!(s.is_ok(), "{name}={max} is accepted");
        }
    }

    #[test]
    fn jwt_checks_are_unset_by_default_and_read_when_set() {
        let d = Settings::from_lookup(|_| None).unwrap();
        assert_eq!(
            (d.jwt_issuer, d.jwt_audience, d.jwt_max_lifetime),
            (None, None, None)
        );
        let s = Settings::from_lookup(|n| match n {
            ENV_JWT_ISSUER => Some("https://id.example".into()),
            ENV_JWT_AUDIENCE => Some("seckill".into()),
            ENV_JWT_MAX_LIFETIME_SECS => Some("900".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(s.jwt_issuer.as_deref(), Some("https://id.example"));
        assert_eq!(s.jwt_audience.as_deref(), Some("seckill"));
        assert_eq!(s.jwt_max_lifetime, Some(Duration::from_secs(900)));
        for bad in ["0", "soon", "-5"] {
            let text = error_of(&[(ENV_JWT_MAX_LIFETIME_SECS, bad)]);
            assert!(text.contains(ENV_JWT_MAX_LIFETIME_SECS), "{text}");
        }
    }
}
