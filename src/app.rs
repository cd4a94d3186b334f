//! Building the application (pools, migrations, listener) and running it
//! until a shutdown signal: the gateway, the order workers, or both.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::admission::AdmissionTokens;
use crate::auth::Auth;
use crate::config::Settings;
use crate::limit::Limits;
use crate::orders::lifecycle::Lifecycle;
use crate::orders::{Worker, WorkerConfig};
use crate::promotions::PromotionCache;
use crate::stock::Keys;
use crate::stock::coalesce::Coalescer;

/// How often the keyed rate limiters forget replenished keys.
const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How often the stream length and pending gauges are refreshed.
const STREAM_GAUGES_EVERY: Duration = Duration::from_secs(2);

/// Everything a request handler needs, shared by all connections.
pub struct AppState {
    pub settings: Settings,
    /// One multiplexed connection (cheap clones share one socket and
    /// reconnect by themselves), used on the purchase path.
    pub redis: ConnectionManager,
    pub db: PgPool,
    pub keys: Keys,
    pub auth: Auth,
    pub cache: PromotionCache,
    /// Purchases in flight towards Redis. A purchase that cannot take a
    /// permit at once is answered `503`: the gateway never queues without end.
    pub inflight: Semaphore,
    /// Sends purchases to `lua/purchase.lua`, concurrent ones of a promotion
    /// together.
    pub purchases: Arc<Coalescer>,
    pub lifecycle: Lifecycle,
    pub limits: Limits,
    pub tokens: AdmissionTokens,
    /// Client connections served at once; the accept loop waits for a permit.
    pub connections: Arc<Semaphore>,
    /// A worker process's listener serves only `/health`, `/ready` and
    /// `/metrics`.
    pub ops_only: bool,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The gateway with order workers in the same process.
    Serve,
    /// The gateway alone (`serve --no-workers`).
    GatewayOnly,
    /// Order workers alone (`seckill worker`).
    WorkersOnly,
}

/// A built application, ready to run.
pub struct App {
    state: Arc<AppState>,
    listener: Option<TcpListener>,
    role: Role,
}

impl App {
    /// Connects to PostgreSQL (creating the database if it does not exist)
    /// and Redis, applies pending migrations and binds the listener.
    pub async fn build(settings: Settings, role: Role) -> anyhow::Result<App> {
        let db = connect_db(&settings).await?;
        migrate(&db).await?;
        let redis = connect_redis(&settings.redis_url, settings.redis_timeout).await?;
        if let Some(dir) = &settings.lua_dir {
            crate::stock::lua::use_dir(dir)?;
        }
        crate::stock::lua::load_all(&mut redis.clone()).await?;
        let keys = Keys::new(settings.key_prefix.clone());
        // Redis may have lost promotions while we were down: rebuild them
        // before taking traffic.
        for r in crate::recovery::recover(&db, &redis, &keys, None).await? {
            if r.rebuilt {
                tracing::warn!(
                    promotion = r.promotion_id,
                    remaining = r.remaining,
                    "recovered a promotion's redis state at start-up"
                );
            }
        }
        let addr = match role {
            Role::WorkersOnly => settings.worker_listen,
            Role::Serve | Role::GatewayOnly => Some(settings.listen),
        };
        let listener = match addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("failed to bind {addr}"))?,
            ),
            None => None,
        };
        let lifecycle = Lifecycle {
            db: db.clone(),
            redis: redis.clone(),
            keys: keys.clone(),
            payment_timeout: settings.payment_timeout,
        };
        let purchases = Coalescer::new(redis.clone(), keys.clone(), settings.purchase_batch);
        let state = Arc::new(AppState {
            keys,
            lifecycle,
            auth: Auth::new(&settings.jwt_secret, &settings.admin_token),
            cache: PromotionCache::new(settings.cache_ttl, settings.sold_out_ttl),
            inflight: Semaphore::new(settings.max_inflight),
            purchases,
            limits: Limits::new(
                settings.rate_global,
                settings.rate_user,
                settings.rate_ip,
                settings.trusted_proxies.clone(),
            ),
            tokens: AdmissionTokens::new(&settings.token_secret),
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            ops_only: role == Role::WorkersOnly,
            metrics: crate::telemetry::metrics_handle(),
            settings,
            redis,
            db,
        });
        Ok(App {
            state,
            listener,
            role,
        })
    }

    /// The bound address (`None` for a workers-only process).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Runs until `shutdown` completes: the gateway stops accepting and drains
    /// its in-flight requests; the workers finish or leave pending the batch
    /// in hand. Returns when both are done.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let token = CancellationToken::new();
        let mut workers = JoinSet::new();
        if self.role != Role::GatewayOnly {
            let config = WorkerConfig::from_settings(&self.state.settings);
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
            for n in 0..self.state.settings.workers {
                let consumer = format!(
                    "{host}-{}-{}-{n}",
                    std::process::id(),
                    uuid::Uuid::new_v4().simple()
                );
                let worker = Worker::connect(
                    &self.state.settings.redis_url,
                    self.state.db.clone(),
                    self.state.keys.clone(),
                    consumer,
                    config.clone(),
                )
                .await?;
                workers.spawn(worker.run(token.clone()));
            }
            let sweeper = self.state.lifecycle.clone();
            workers.spawn(sweeper.run_sweeper(self.state.settings.sweep_interval, token.clone()));
            workers.spawn(crate::orders::worker::observe_streams(
                self.state.redis.clone(),
                self.state.keys.clone(),
                STREAM_GAUGES_EVERY,
                token.clone(),
            ));
            workers.spawn(crate::recovery::run_periodic(
                self.state.db.clone(),
                self.state.redis.clone(),
                self.state.keys.clone(),
                self.state.settings.reconcile_interval,
                token.clone(),
            ));
        }
        if self.role != Role::WorkersOnly {
            let state = self.state.clone();
            let stop = token.clone();
            workers.spawn(async move {
                // Keyed limiters grow with every distinct key: prune them.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(LIMITER_PRUNE_EVERY) => state.limits.prune(),
                        _ = stop.cancelled() => return,
                    }
                }
            });
            workers.spawn(crate::stock::events::listen(
                self.state.settings.redis_url.clone(),
                self.state.keys.clone(),
                self.state.cache.clone(),
                token.clone(),
            ));
        }
        let stopped = token.clone();
        let signal = async move {
            shutdown.await;
            stopped.cancel();
        };
        match self.listener {
            Some(listener) => {
                let what = if self.state.ops_only {
                    "worker ops endpoint listening"
                } else {
                    "gateway listening"
                };
                tracing::info!(addr = %listener.local_addr()?, "{what}");
                crate::http::server::serve(listener, self.state.clone(), signal).await?;
            }
            None => signal.await,
        }
        token.cancel();
        while workers.join_next().await.is_some() {}
        tracing::info!("stopped");
        Ok(())
    }
}

/// A pool on `settings.database_url`, creating the database when absent.
pub async fn connect_db(settings: &Settings) -> anyhow::Result<PgPool> {
    let url = &settings.database_url;
    if !Postgres::database_exists(url)
        .await
        .context("failed to reach postgresql")?
    {
        Postgres::create_database(url)
            .await
            .context("failed to create the database")?;
        tracing::info!("created the database");
    }
    PgPoolOptions::new()
        .max_connections(settings.db_max_connections)
        .acquire_timeout(Duration::from_secs(2))
        .connect(url)
        .await
        .context("failed to connect to postgresql")
}

/// Applies the migrations in `migrations/` that are not applied yet.
pub async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations")
        .run(db)
        .await
        .context("failed to apply migrations")
}

/// A multiplexed Redis connection with the given response timeout.
pub async fn connect_redis(
    url: &str,
    response_timeout: Duration,
) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url).context("invalid redis url")?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(response_timeout))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    ConnectionManager::new_with_config(client, config)
        .await
        .context("failed to connect to redis")
}
