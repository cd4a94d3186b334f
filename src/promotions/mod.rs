//! Promotions: the record, its table, the admin workflows that keep
//! PostgreSQL, Redis and every gateway's cache in step (`service`), the local
//! cache the gateway serves them from, and the listener that keeps that cache
//! fresh (`events`).
//!
//! PostgreSQL is the record of a promotion; Redis holds the copy the purchase
//! script checks (see `stock`). Creating or editing a promotion writes the
//! record first, then preheats Redis, then answers.

pub mod cache;
pub mod events;
pub mod model;
pub mod repo;
pub mod service;

pub use cache::PromotionCache;
pub use model::{Promotion, PromotionInput, Status};
pub use service::{PromotionError, Promotions};
