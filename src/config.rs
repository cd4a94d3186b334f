//! Settings, read once from the environment at start-up.
//!
//! Every knob is an `ENV_X` / `DEFAULT_X` pair with the reason for the default
//! beside it. A value that does not parse stops the program with a message that
//! names the variable. Tests build [`Settings`] directly instead of setting
//! environment variables.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};

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

/// Purchases per second this gateway lets through to Redis (0: no limit).
/// Above what one Redis serves, the excess is better refused at the edge.
const ENV_RATE_GLOBAL: &str = "SECKILL_RATE_GLOBAL";
const DEFAULT_RATE_GLOBAL: u32 = 50_000;

/// Requests per second per user on the sale routes (purchase, token,
/// captcha), with a burst of the same size (0: no limit). A person clicks a
/// few times a second; a script does not get more.
const ENV_RATE_USER: &str = "SECKILL_RATE_USER";
const DEFAULT_RATE_USER: u32 = 5;

/// Requests per second per client IP on `/api` (0: no limit). Generous,
/// because many buyers can share one address behind a carrier NAT.
const ENV_RATE_IP: &str = "SECKILL_RATE_IP";
const DEFAULT_RATE_IP: u32 = 200;

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

/// Tokio worker threads. On a small box one thread serves more than two,
/// because Redis and the load generator need the other cores; 0 means one per
/// core.
const ENV_THREADS: &str = "SECKILL_THREADS";
const DEFAULT_THREADS: usize = 0;

/// PostgreSQL pool size: the workers write in batches, so a few connections
/// carry the whole write load; the rest serve admin and order queries.
const ENV_DB_MAX_CONNECTIONS: &str = "SECKILL_DB_MAX_CONNECTIONS";
const DEFAULT_DB_MAX_CONNECTIONS: u32 = 10;

/// Order worker tasks per process (each one a stream consumer of its own). A
/// worker spends most of a batch waiting for PostgreSQL's commit; four of them
/// overlap those waits (loadtest/bench.sh: 0.5 of COPY speed, two: about 0.4).
const ENV_WORKERS: &str = "SECKILL_WORKERS";
const DEFAULT_WORKERS: usize = 4;

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
    pub payment_timeout: Duration,
    pub sweep_interval: Duration,
    pub reconcile_interval: Duration,
    pub rate_global: u32,
    pub rate_user: u32,
    pub rate_ip: u32,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_connections: usize,
    pub token_ttl: Duration,
    pub token_cap_multiple: u64,
    pub token_secret: String,
    pub captcha_ttl: Duration,
    pub threads: usize,
    pub db_max_connections: u32,
    pub workers: usize,
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
    pub log_format: LogFormat,
    pub lua_dir: Option<std::path::PathBuf>,
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
    /// The development defaults, as documented in the README.
    fn default() -> Self {
        Settings {
            listen: DEFAULT_LISTEN.parse().expect("default listen address"),
            worker_listen: None,
            redis_url: DEFAULT_REDIS_URL.into(),
            database_url: DEFAULT_DATABASE_URL.into(),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            jwt_secret: DEV_JWT_SECRET.into(),
            admin_token: DEV_ADMIN_TOKEN.into(),
            payment_timeout: Duration::from_secs(DEFAULT_PAYMENT_TIMEOUT_SECS),
            sweep_interval: Duration::from_millis(DEFAULT_SWEEP_INTERVAL_MS),
            reconcile_interval: Duration::from_millis(DEFAULT_RECONCILE_INTERVAL_MS),
            rate_global: DEFAULT_RATE_GLOBAL,
            rate_user: DEFAULT_RATE_USER,
            rate_ip: DEFAULT_RATE_IP,
            trusted_proxies: crate::limit::parse_trusted(DEFAULT_TRUSTED_PROXIES)
                .expect("default trusted proxies parse"),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            token_ttl: Duration::from_secs(DEFAULT_TOKEN_TTL_SECS),
            token_cap_multiple: DEFAULT_TOKEN_CAP_MULTIPLE,
            token_secret: derive_token_secret(DEV_JWT_SECRET),
            captcha_ttl: Duration::from_secs(DEFAULT_CAPTCHA_TTL_SECS),
            threads: DEFAULT_THREADS,
            db_max_connections: DEFAULT_DB_MAX_CONNECTIONS,
            workers: DEFAULT_WORKERS,
            worker_batch: DEFAULT_WORKER_BATCH,
            worker_block: Duration::from_millis(DEFAULT_WORKER_BLOCK_MS),
            claim_idle: Duration::from_millis(DEFAULT_CLAIM_IDLE_MS),
            max_inflight: DEFAULT_MAX_INFLIGHT,
            purchase_batch: DEFAULT_PURCHASE_BATCH,
            cache_ttl: Duration::from_millis(DEFAULT_CACHE_TTL_MS),
            sold_out_ttl: Duration::from_millis(DEFAULT_SOLD_OUT_TTL_MS),
            header_timeout: Duration::from_millis(DEFAULT_HEADER_TIMEOUT_MS),
            body_timeout: Duration::from_millis(DEFAULT_BODY_TIMEOUT_MS),
            shutdown_grace: Duration::from_millis(DEFAULT_SHUTDOWN_GRACE_MS),
            redis_timeout: Duration::from_millis(DEFAULT_REDIS_TIMEOUT_MS),
            log_format: LogFormat::Text,
            lua_dir: None,
        }
    }
}

impl Settings {
    /// Reads every variable once; the first one that does not parse is an
    /// error naming it.
    pub fn from_env() -> anyhow::Result<Settings> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the settings through `lookup`, so the parsing is testable
    /// without touching the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> anyhow::Result<Settings> {
        let get = |name: &str, default: &str| lookup(name).unwrap_or_else(|| default.to_string());
        let settings = Settings {
            listen: parse(&lookup, ENV_LISTEN, DEFAULT_LISTEN)?,
            worker_listen: match lookup(ENV_WORKER_LISTEN).filter(|v| !v.is_empty()) {
                Some(v) => Some(
                    v.parse()
                        .with_context(|| format!("invalid value `{v}` for {ENV_WORKER_LISTEN}"))?,
                ),
                None => None,
            },
            redis_url: get(ENV_REDIS_URL, DEFAULT_REDIS_URL),
            database_url: get(ENV_DATABASE_URL, DEFAULT_DATABASE_URL),
            key_prefix: get(ENV_KEY_PREFIX, DEFAULT_KEY_PREFIX),
            jwt_secret: get(ENV_JWT_SECRET, DEV_JWT_SECRET),
            admin_token: get(ENV_ADMIN_TOKEN, DEV_ADMIN_TOKEN),
            payment_timeout: Duration::from_secs(parse(
                &lookup,
                ENV_PAYMENT_TIMEOUT_SECS,
                DEFAULT_PAYMENT_TIMEOUT_SECS,
            )?),
            sweep_interval: millis(&lookup, ENV_SWEEP_INTERVAL_MS, DEFAULT_SWEEP_INTERVAL_MS)?,
            reconcile_interval: millis(
                &lookup,
                ENV_RECONCILE_INTERVAL_MS,
                DEFAULT_RECONCILE_INTERVAL_MS,
            )?,
            rate_global: parse(&lookup, ENV_RATE_GLOBAL, DEFAULT_RATE_GLOBAL)?,
            rate_user: parse(&lookup, ENV_RATE_USER, DEFAULT_RATE_USER)?,
            rate_ip: parse(&lookup, ENV_RATE_IP, DEFAULT_RATE_IP)?,
            trusted_proxies: {
                let raw = get(ENV_TRUSTED_PROXIES, DEFAULT_TRUSTED_PROXIES);
                crate::limit::parse_trusted(&raw)
                    .map_err(|e| anyhow::anyhow!("invalid value for {ENV_TRUSTED_PROXIES}: {e}"))?
            },
            max_connections: parse(&lookup, ENV_MAX_CONNECTIONS, DEFAULT_MAX_CONNECTIONS)?,
            token_ttl: Duration::from_secs(parse(
                &lookup,
                ENV_TOKEN_TTL_SECS,
                DEFAULT_TOKEN_TTL_SECS,
            )?),
            token_cap_multiple: parse(&lookup, ENV_TOKEN_CAP_MULTIPLE, DEFAULT_TOKEN_CAP_MULTIPLE)?,
            token_secret: lookup(ENV_TOKEN_SECRET)
                .unwrap_or_else(|| derive_token_secret(&get(ENV_JWT_SECRET, DEV_JWT_SECRET))),
            captcha_ttl: Duration::from_secs(parse(
                &lookup,
                ENV_CAPTCHA_TTL_SECS,
                DEFAULT_CAPTCHA_TTL_SECS,
            )?),
            threads: parse(&lookup, ENV_THREADS, DEFAULT_THREADS)?,
            db_max_connections: parse(&lookup, ENV_DB_MAX_CONNECTIONS, DEFAULT_DB_MAX_CONNECTIONS)?,
            workers: parse(&lookup, ENV_WORKERS, DEFAULT_WORKERS)?,
            worker_batch: parse(&lookup, ENV_WORKER_BATCH, DEFAULT_WORKER_BATCH)?,
            worker_block: millis(&lookup, ENV_WORKER_BLOCK_MS, DEFAULT_WORKER_BLOCK_MS)?,
            claim_idle: millis(&lookup, ENV_CLAIM_IDLE_MS, DEFAULT_CLAIM_IDLE_MS)?,
            max_inflight: parse(&lookup, ENV_MAX_INFLIGHT, DEFAULT_MAX_INFLIGHT)?,
            purchase_batch: parse(&lookup, ENV_PURCHASE_BATCH, DEFAULT_PURCHASE_BATCH)?,
            cache_ttl: millis(&lookup, ENV_CACHE_TTL_MS, DEFAULT_CACHE_TTL_MS)?,
            sold_out_ttl: millis(&lookup, ENV_SOLD_OUT_TTL_MS, DEFAULT_SOLD_OUT_TTL_MS)?,
            header_timeout: millis(&lookup, ENV_HEADER_TIMEOUT_MS, DEFAULT_HEADER_TIMEOUT_MS)?,
            body_timeout: millis(&lookup, ENV_BODY_TIMEOUT_MS, DEFAULT_BODY_TIMEOUT_MS)?,
            shutdown_grace: millis(&lookup, ENV_SHUTDOWN_GRACE_MS, DEFAULT_SHUTDOWN_GRACE_MS)?,
            redis_timeout: millis(&lookup, ENV_REDIS_TIMEOUT_MS, DEFAULT_REDIS_TIMEOUT_MS)?,
            log_format: LogFormat::Text,
            lua_dir: lookup(ENV_LUA_DIR)
                .filter(|d| !d.is_empty())
                .map(std::path::PathBuf::from),
        };
        let mut settings = settings;
        let default_format = if settings.insecure_secrets().is_empty() {
            "json"
        } else {
            "text"
        };
        settings.log_format = parse(&lookup, ENV_LOG_FORMAT, default_format)?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.key_prefix.is_empty() || self.key_prefix.contains(['{', '}', ' ']) {
            bail!("{ENV_KEY_PREFIX} must be non-empty, without braces or spaces");
        }
        if self.jwt_secret.is_empty() {
            bail!("{ENV_JWT_SECRET} must not be empty");
        }
        if self.admin_token.is_empty() {
            bail!("{ENV_ADMIN_TOKEN} must not be empty");
        }
        if self.workers == 0 {
            bail!("{ENV_WORKERS} must be at least 1 (use `serve --no-workers` to run none)");
        }
        if self.worker_batch == 0 {
            bail!("{ENV_WORKER_BATCH} must be at least 1");
        }
        if self.max_connections == 0 {
            bail!("{ENV_MAX_CONNECTIONS} must be at least 1");
        }
        if self.token_cap_multiple == 0 {
            bail!("{ENV_TOKEN_CAP_MULTIPLE} must be at least 1");
        }
        if self.token_ttl.is_zero() || self.captcha_ttl.is_zero() {
            bail!("{ENV_TOKEN_TTL_SECS} and {ENV_CAPTCHA_TTL_SECS} must be at least 1");
        }
        if self.redis_timeout.is_zero() {
            bail!("{ENV_REDIS_TIMEOUT_MS} must be at least 1");
        }
        if self.purchase_batch == 0 {
            bail!("{ENV_PURCHASE_BATCH} must be at least 1");
        }
        if self.max_inflight == 0 {
            bail!("{ENV_MAX_INFLIGHT} must be at least 1");
        }
        if self.db_max_connections == 0 {
            bail!("{ENV_DB_MAX_CONNECTIONS} must be at least 1");
        }
        Ok(())
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

fn parse<T, D>(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: D,
) -> anyhow::Result<T>
where
    T: FromStr,
    T::Err: std::fmt::Display,
    D: ToString,
{
    let raw = lookup(name).unwrap_or_else(|| default.to_string());
    raw.trim()
        .parse::<T>()
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("invalid value `{raw}` for {name}"))
}

fn millis(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: u64,
) -> anyhow::Result<Duration> {
    parse::<u64, u64>(lookup, name, default).map(Duration::from_millis)
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
}
