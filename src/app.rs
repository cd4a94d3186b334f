//! Building the application (pools, migrations, listener) and running it
//! until a shutdown signal: the gateway, the order workers, or both.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
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
use crate::stock::{ConnectOptions, Keys, ListenerPool, Store, WorkerPool};
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
    listener: Option<TcpListener>,
    role: Role,
}

impl App {
    /// Connects to PostgreSQL (creating the database if it does not exist)
    /// and Redis, applies pending migrations and binds the listener.
    pub async fn build(settings: Settings, role: Role) -> anyhow::Result<App> {
        let db = db::connect(&settings.database_url, settings.db_max_connections).await?;
        db::migrate(&db).await?;
        if let Some(dir) = &settings.lua_dir {
            crate::stock::lua::use_dir(dir)?;
        }
        let store = Store::connect(
            &settings.redis_url,
            Keys::new(settings.key_prefix.clone()),
            ConnectOptions::commands(settings.redis_timeout),
        )
        .await?
        .with_wait(settings.redis_wait_replicas, settings.redis_wait_timeout);
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
    /// its in-flight requests; then the workers write what the streams still
    /// hold and finish or leave pending the batch in hand. Returns when both
    /// are done.
    ///
    /// With the gateway in the process (`serve`), the background side (order
    /// workers, payment-timeout sweeper, stream gauges, periodic reconcile)
    /// runs on a single-threaded runtime of its own, on an OS thread of its
    /// own, with its own Redis connections and PostgreSQL pool, so the
    /// gateway's runtime threads serve HTTP only (apart from a few light
    /// timers of the gateway itself). A workers-only process runs it on the
    /// main runtime.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let token = CancellationToken::new();
        let mut workers = JoinSet::new();
        let keys = self.state.store.keys().clone();
        let mut background_done = None;
        match self.role {
            Role::GatewayOnly => {}
            Role::WorkersOnly => {
                let mut tasks = start_background(&self.state.settings, keys, &token).await?;
                workers.spawn(async move { while tasks.join_next().await.is_some() {} });
            }
            Role::Serve => {
                background_done = Some(
                    spawn_background_thread(self.state.settings.clone(), keys, token.clone())
                        .await?,
                );
            }
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
            let listeners = ListenerPool::new(
                &self.state.settings.redis_url,
                1,
                ConnectOptions::commands(self.state.settings.redis_timeout),
            )
            .context("failed to set up the cache listener's redis connection")?;
            workers.spawn(crate::promotions::events::listen(
                listeners,
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
                // The runtime's threads: what SECKILL_THREADS gave the gateway.
                let threads = tokio::runtime::Handle::current().metrics().num_workers();
                tracing::info!(addr = %listener.local_addr()?, threads, "{what}");
                crate::http::server::serve(listener, self.state.clone(), signal).await?;
            }
            None => signal.await,
        }
        token.cancel();
        while workers.join_next().await.is_some() {}
        if let Some(done) = background_done {
            // Sent when the background thread has finished; an error means it
            // ended without sending (a panic), which leaves nothing to wait for.
            let _ = done.await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Opens the background side's own stores (a PostgreSQL pool apart from the
/// handlers', so no storm of requests can take the connections the batch
/// inserts need, and Redis connections made on the calling runtime) and
/// starts the order workers, the sweeper, the stream gauges and the periodic
/// reconcile on the current runtime, until `shutdown`.
async fn start_background(
    settings: &Settings,
    keys: Keys,
    shutdown: &CancellationToken,
) -> anyhow::Result<JoinSet<()>> {
    // At most `MAX_WORKERS` (1024) workers: this fits a u32.
    let size = settings.workers as u32 + BACKGROUND_CONNECTIONS;
    let db = db::pool(&settings.database_url, size)
        .await
        .context("failed to open the workers' postgresql pool")?;
    let store = Store::connect(
        &settings.redis_url,
        keys.clone(),
        ConnectOptions::commands(settings.redis_timeout),
    )
    .await
    .context("failed to connect the background tasks to redis")?;
    let mut tasks = JoinSet::new();
    let config = WorkerConfig::from_settings(settings);
    let pool = WorkerPool::new(&settings.redis_url, settings.workers, config.block)
        .context("failed to set up the order workers' redis connections")?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    for n in 0..settings.workers {
        let consumer = format!(
            "{host}-{}-{}-{n}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        );
        let worker = Worker::connect(
            pool.clone(),
            db.clone(),
            keys.clone(),
            consumer,
            config.clone(),
        )
        .await?;
        tasks.spawn(worker.run(shutdown.clone()));
    }
    let sweeper = Lifecycle {
        db: db.clone(),
        store: store.clone(),
        payment_timeout: settings.payment_timeout,
    };
    tasks.spawn(sweeper.run_sweeper(settings.sweep_interval, shutdown.clone()));
    tasks.spawn(crate::orders::worker::observe_streams(
        store.clone(),
        STREAM_GAUGES_EVERY,
        shutdown.clone(),
    ));
    tasks.spawn(crate::recovery::run_periodic(
        db,
        store,
        settings.reconcile_interval,
        settings.recover_interval,
        shutdown.clone(),
    ));
    Ok(tasks)
}

/// Starts [`start_background`] on a `current_thread` runtime on an OS thread
/// of its own. Returns once everything has started (or with the error that
/// stopped it), with a receiver that completes when the thread has finished:
/// after `shutdown`, when the workers have drained.
async fn spawn_background_thread(
    settings: Settings,
    keys: Keys,
    shutdown: CancellationToken,
) -> anyhow::Result<oneshot::Receiver<()>> {
    let (started_tx, started_rx) = oneshot::channel::<anyhow::Result<()>>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("seckill-background".into())
        .spawn(move || {
            lower_priority(settings.background_nice);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let e = anyhow::Error::new(e).context("failed to start the background runtime");
                    let _ = started_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                match start_background(&settings, keys, &shutdown).await {
                    Ok(mut tasks) => {
                        let _ = started_tx.send(Ok(()));
                        while tasks.join_next().await.is_some() {}
                    }
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                    }
                }
            });
            // Connections and timers go with the runtime, before "done".
            drop(runtime);
            let _ = done_tx.send(());
        })
        .context("failed to spawn the background thread")?;
    started_rx
        .await
        .context("the background thread stopped during start-up")??;
    Ok(done_rx)
}

/// Gives the calling thread the nice value `nice` (Linux: the nice value is
/// per thread), so the gateway's threads come first when the cores are busy.
/// A failure is logged and changes nothing else.
fn lower_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: setpriority takes plain integers and touches no memory of ours;
    // `who` 0 is the calling thread on Linux.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::warn!(
            nice,
            error = %std::io::Error::last_os_error(),
            "could not lower the background thread's priority"
        );
    }
}
