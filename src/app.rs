//! Building the application (pools, migrations, listener) and running it
//! until a shutdown signal: the gateway, the order workers, or both.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::accounts::Accounts;
use crate::admission::AdmissionTokens;
use crate::auth::Auth;
use crate::config::Settings;
use crate::http::AppState;
use crate::limit::Limits;
use crate::orders::lifecycle::Lifecycle;
use crate::orders::{Worker, WorkerConfig};
use crate::promotions::{PromotionCache, Promotions};
use crate::stock::clock::RedisClock;
use crate::stock::coalesce::Coalescer;
use crate::stock::{ConnectOptions, Keys, Store};
use crate::{db, pace};

/// How often the keyed rate limiters forget replenished keys.
const LIMITER_PRUNE_EVERY: Duration = Duration::from_secs(10);

/// How often the gateway reads Redis's clock again.
const CLOCK_SYNC_EVERY: Duration = Duration::from_secs(5);

/// How often the stream length and pending gauges are refreshed.
const STREAM_GAUGES_EVERY: Duration = Duration::from_secs(2);

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

/// Connections of the background pool besides one per worker: the
/// payment-timeout sweeper and the periodic reconcile, each one at a time.
const BACKGROUND_CONNECTIONS: u32 = 2;

/// A built application, ready to run.
pub struct App {
    state: Arc<AppState>,
    /// The pool of the order workers, the sweeper and the periodic
    /// reconcile (`None` for the gateway alone). Apart from the handlers'
    /// pool, so no storm of requests can take the connections the batch
    /// inserts need.
    background_db: Option<PgPool>,
    listener: Option<TcpListener>,
    role: Role,
}

impl App {
    /// Connects to PostgreSQL (creating the database if it does not exist)
    /// and Redis, applies pending migrations and binds the listener.
    pub async fn build(settings: Settings, role: Role) -> anyhow::Result<App> {
        let db = db::connect(&settings.database_url, settings.db_max_connections).await?;
        db::migrate(&db).await?;
        let background_db = match role {
            Role::GatewayOnly => None,
            Role::Serve | Role::WorkersOnly => {
                // At most `MAX_WORKERS` (1024) workers: this fits a u32.
                let size = settings.workers as u32 + BACKGROUND_CONNECTIONS;
                Some(
                    db::pool(&settings.database_url, size)
                        .await
                        .context("failed to open the workers' postgresql pool")?,
                )
            }
        };
        if let Some(dir) = &settings.lua_dir {
            crate::stock::lua::use_dir(dir)?;
        }
        let store = Store::connect(
            &settings.redis_url,
            Keys::new(settings.key_prefix.clone()),
            ConnectOptions::commands(settings.redis_timeout),
        )
        .await?;
        store.load_scripts().await?;
        // Redis may have lost promotions while we were down: rebuild them
        // before taking traffic.
        for r in crate::recovery::recover(&db, &store, None).await? {
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
        // Every metric the dashboards and alerts use is exported from now on.
        crate::telemetry::register_metrics(&crate::http::known_metric_labels());
        let cache = PromotionCache::new(settings.cache_ttl, settings.sold_out_ttl);
        let clock = RedisClock::default();
        clock
            .sync(&store)
            .await
            .context("failed to read redis's clock")?;
        let state = Arc::new(AppState {
            lifecycle: Lifecycle {
                db: db.clone(),
                store: store.clone(),
                payment_timeout: settings.payment_timeout,
            },
            accounts: Accounts::new(db.clone()),
            promotions: Promotions {
                db: db.clone(),
                store: store.clone(),
                cache: cache.clone(),
            },
            purchases: Coalescer::new(store.clone(), settings.purchase_batch),
            auth: Auth::from_settings(&settings),
            cache,
            clock,
            inflight: Semaphore::new(settings.max_inflight),
            limits: Limits::new(
                settings.rate_global,
                settings.rate_user,
                settings.rate_ip,
                settings.trusted_proxies.clone(),
            )
            .with_admin_failures(settings.rate_admin_failures)
            .with_login_failures(settings.rate_login_failures),
            tokens: AdmissionTokens::new(&settings.token_secret),
            connections: Arc::new(Semaphore::new(settings.max_connections)),
            ops_only: role == Role::WorkersOnly,
            metrics: crate::telemetry::metrics_handle(),
            settings,
            store,
            db,
        });
        Ok(App {
            state,
            background_db,
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
        if let Some(background_db) = &self.background_db {
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
                    background_db.clone(),
                    self.state.store.keys().clone(),
                    consumer,
                    config.clone(),
                )
                .await?;
                workers.spawn(worker.run(token.clone()));
            }
            let sweeper = Lifecycle {
                db: background_db.clone(),
                ..self.state.lifecycle.clone()
            };
            workers.spawn(sweeper.run_sweeper(self.state.settings.sweep_interval, token.clone()));
            workers.spawn(crate::orders::worker::observe_streams(
                self.state.store.clone(),
                STREAM_GAUGES_EVERY,
                token.clone(),
            ));
            workers.spawn(crate::recovery::run_periodic(
                background_db.clone(),
                self.state.store.clone(),
                self.state.settings.reconcile_interval,
                token.clone(),
            ));
        }
        if self.role != Role::WorkersOnly {
            let state = self.state.clone();
            let stop = token.clone();
            workers.spawn(async move {
                // Keyed limiters grow with every distinct key: prune them.
                while pace::sleep(LIMITER_PRUNE_EVERY, &stop).await {
                    state.limits.prune();
                }
            });
            let state = self.state.clone();
            let stop = token.clone();
            workers.spawn(async move {
                // Clocks drift: learn Redis's again now and then.
                while pace::sleep(CLOCK_SYNC_EVERY, &stop).await {
                    if let Err(e) = state.clock.sync(&state.store).await {
                        tracing::debug!(error = %e, "redis clock not read");
                    }
                }
            });
            workers.spawn(crate::promotions::events::listen(
                self.state.settings.redis_url.clone(),
                self.state.store.keys().clone(),
                self.state.cache.clone(),
                token.clone(),
            ));
        }
        // The background tasks stop only after HTTP has drained, so the
        // workers write the orders of the last purchases answered.
        let signal = shutdown;
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
