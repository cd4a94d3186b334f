//! seckill: a flash-sale gateway.
//!
//! Buyers hit `POST /api/promotions/{id}/purchase`; one Lua script in Redis
//! decides atomically (window, per-user limit, stock) and appends the order to
//! the promotion's stream; workers move orders to PostgreSQL, idempotently,
//! acknowledging only after the commit.
//!
//! # Layout
//!
//! Dependencies run one way, from the top of this list down.
//!
//! - [`app`]: building the stores and the listener; running gateway and
//!   workers until shutdown.
//! - [`http`]: the hyper server, routing, the shared handler state, the
//!   handlers, and the one mapping of outcomes to statuses.
//! - [`recovery`]: rebuilding Redis from PostgreSQL; reconciling the two.
//! - [`accounts`]: registered buyers, their Argon2id passwords, login.
//! - [`promotions`]: the promotion record and table, the admin workflows,
//!   the local cache and its invalidation listener.
//! - [`orders`]: the stream workers, the order lifecycle, the `orders` table.
//! - [`stock`]: the Redis store (every Redis command), key names, the Lua
//!   scripts and their return codes, the order message, the purchase
//!   coalescer.
//! - [`db`]: the PostgreSQL pool and migrations.
//! - [`config`]: settings, read once from the environment.
//! - [`auth`], [`admission`], [`limit`]: user JWTs and the admin token;
//!   admission tokens and captchas; rate limits.
//! - [`pace`]: the cancellable sleep and the backoff of background loops.
//! - [`checkpoint`]: pause points where tests force an interleaving.
//! - [`telemetry`]: logging and metrics.

pub mod accounts;
pub mod admission;
pub mod app;
pub mod auth;
pub mod checkpoint;
pub mod config;
pub mod db;
pub mod http;
pub mod limit;
pub mod orders;
pub mod pace;
pub mod promotions;
pub mod recovery;
pub mod stock;
pub mod telemetry;
