//! The live sale state in Redis: key names, the Lua scripts, the store that
//! sends every Redis command, the pools of connections a task holds for
//! itself, the order message format and the purchase coalescer.
//!
//! Everything that changes stock goes through a script in `lua/`, so every
//! change is atomic. This module owns Redis; the record of promotions and
//! orders lives in PostgreSQL (`promotions`, `orders`).

pub mod buckets;
pub mod clock;
pub mod coalesce;
pub mod connection;
pub mod keys;
pub mod lua;
pub mod message;
pub mod pool;
pub mod store;

pub use connection::RedisConn;
pub use keys::Keys;
pub use message::{Entry, OrderMessage};
pub use pool::{ListenerPool, WorkerPool};
pub use store::{
    Admission, Buyer, ConnectOptions, Levels, LiveCounters, Outcome, PromotionMeta, Recover,
    Refill, Restock, SeenTransfers, Snapshot, Store, TransferOut, Transit,
};
