//! What every request handler shares: built once by `app`, owned here so the
//! HTTP layer depends on nothing above it.

use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::accounts::Accounts;
use crate::admission::AdmissionTokens;
use crate::auth::Auth;
use crate::config::Settings;
use crate::limit::Limits;
use crate::orders::lifecycle::Lifecycle;
use crate::promotions::{PromotionCache, Promotions};
use crate::stock::Store;
use crate::stock::clock::RedisClock;
use crate::stock::coalesce::Coalescer;

/// Everything a request handler needs, shared by all connections.
pub struct AppState {
    pub settings: Settings,
    /// Redis, on one multiplexed connection (cheap clones share one socket
    /// and reconnect by themselves) with a short reply timeout.
    pub store: Store,
    /// Redis's clock, for the early refusals of the sale window.
    pub clock: RedisClock,
    /// The handlers' PostgreSQL pool (`SECKILL_DB_MAX_CONNECTIONS`). The
    /// order workers, the sweeper and the periodic reconcile have a pool of
    /// their own, so requests can only ever wait on this one.
    pub db: PgPool,
    pub auth: Auth,
    pub cache: PromotionCache,
    /// Purchases in flight towards Redis. A purchase that cannot take a
    /// permit at once is answered `503`: the gateway never queues without end.
    pub inflight: Semaphore,
    /// Sends purchases to `lua/purchase.lua`, concurrent ones of a promotion
    /// together.
    pub purchases: Arc<Coalescer>,
    pub lifecycle: Lifecycle,
    pub promotions: Promotions,
    pub accounts: Accounts,
    pub limits: Limits,
    pub tokens: AdmissionTokens,
    /// Client connections served at once; the accept loop waits for a permit.
    pub connections: Arc<Semaphore>,
    /// A worker process's listener serves only `/health`, `/ready` and
    /// `/metrics`.
    pub ops_only: bool,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}
