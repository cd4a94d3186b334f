//! Promotions: the admin CRUD, preheating their sale state into Redis, and the
//! local cache the gateway serves them from.
//!
//! PostgreSQL is the record of a promotion; Redis holds the copy the purchase
//! script checks (see `stock`). Creating or editing a promotion writes the
//! record first, then preheats Redis, then answers.

pub mod cache;
pub mod model;
pub mod repo;

pub use cache::PromotionCache;
pub use model::{Promotion, PromotionInput, Status};
