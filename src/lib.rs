//! seckill: a flash-sale gateway.
//!
//! Buyers hit `POST /api/promotions/{id}/purchase`; one Lua script in Redis
//! decides atomically (window, per-user limit, stock) and appends the order to
//! the promotion's stream; workers move orders to PostgreSQL, idempotently,
//! acknowledging only after the commit.
//!
//! # Layout
//!
//! - [`config`]: settings, read once from the environment.
//! - [`app`]: building the pools and listener; running gateway and workers
//!   until shutdown.
//! - [`http`]: the hyper server, routing, handlers, and the one mapping of
//!   errors to statuses.
//! - [`stock`]: Redis key names and one typed function per Lua script.
//! - [`promotions`]: the promotion record, admin CRUD storage, the local cache.
//! - [`orders`]: the stream worker and the `orders` table.
//! - [`auth`]: user JWTs and the admin token.
//! - [`telemetry`]: logging and metrics.

pub mod admission;
pub mod app;
pub mod auth;
pub mod config;
pub mod http;
pub mod limit;
pub mod orders;
pub mod promotions;
pub mod recovery;
pub mod stock;
pub mod telemetry;
