//! The live sale state in Redis: key names, the Lua scripts, and the purchase
//! decision.
//!
//! Everything that changes stock goes through a script in `lua/`, so every
//! change is atomic. This module owns the Redis side of a promotion; the
//! record of promotions and orders lives in PostgreSQL (`promotions`, `orders`).

pub mod coalesce;
pub mod events;
pub mod keys;
pub mod lua;
pub mod scripts;

pub use keys::Keys;
pub use scripts::{Outcome, PromotionMeta};
