//! Orders: the stream consumer that writes them to PostgreSQL (the workers),
//! their lifecycle after the purchase (pay, cancel, payment timeout), and
//! the `orders` table.
//!
//! An order is born in Redis, as an entry of its promotion's stream, in the
//! same script call that takes the unit. The workers move it to PostgreSQL,
//! idempotently, and acknowledge the entry only after the commit.

pub mod lifecycle;
pub mod repo;
pub mod worker;

pub use repo::{Order, OrderStatus};
pub use worker::{Worker, WorkerConfig};
