//! The `orders` table: the idempotent batch insert and the query side.

use anyhow::Context;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use super::message::OrderMessage;

/// An order as the buyer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Order {
    pub order_id: String,
    pub promotion_id: i64,
    pub status: String,
    pub price_cents: i64,
    pub created_at: DateTime<Utc>,
}

/// The batch insert: one row per element of the arrays.
macro_rules! insert_batch_sql {
    () => {
        "INSERT INTO orders (order_id, promotion_id, user_id, seq, price_cents, created_at) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
         $5::bigint[], $6::timestamptz[])"
    };
}
const INSERT_BATCH: &str = insert_batch_sql!();
const INSERT_BATCH_SKIPPING: &str = concat!(insert_batch_sql!(), " ON CONFLICT DO NOTHING");

/// Writes a batch in one statement. An order already there (a redelivered
/// message) is skipped, not an error, so a redelivery can never poison the
/// stream. Returns the number of rows actually inserted.
///
/// The first try is a plain insert, which costs PostgreSQL about a fifth less
/// per row than `ON CONFLICT` (no speculative insertion). When the batch holds
/// an order already there (a redelivery after a crash, rare), it fails whole
/// with a unique violation and writes nothing; it is then written again with
/// `ON CONFLICT DO NOTHING`, which skips those rows.
pub async fn insert_batch(db: &PgPool, batch: &[&OrderMessage]) -> anyhow::Result<u64> {
    if batch.is_empty() {
        return Ok(0);
    }
    let mut order_ids = Vec::with_capacity(batch.len());
    let mut promotion_ids = Vec::with_capacity(batch.len());
    let mut user_ids = Vec::with_capacity(batch.len());
    let mut seqs = Vec::with_capacity(batch.len());
    let mut prices = Vec::with_capacity(batch.len());
    let mut created = Vec::with_capacity(batch.len());
    for m in batch {
        order_ids.push(m.order_id.as_str());
        promotion_ids.push(m.promotion_id);
        user_ids.push(m.user_id);
        seqs.push(m.seq);
        prices.push(m.price_cents);
        created.push(m.created_at);
    }
    let insert = |sql: &'static str| {
        sqlx::query(sql)
            .bind(&order_ids)
            .bind(&promotion_ids)
            .bind(&user_ids)
            .bind(&seqs)
            .bind(&prices)
            .bind(&created)
            .execute(db)
    };
    let done = match insert(INSERT_BATCH).await {
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            insert(INSERT_BATCH_SKIPPING).await
        }
        other => other,
    }
    .with_context(|| format!("failed to insert a batch of {} orders", batch.len()))?;
    Ok(done.rows_affected())
}

/// A user's orders, newest first.
pub async fn list_for_user(db: &PgPool, user_id: i64, limit: i64) -> anyhow::Result<Vec<Order>> {
    sqlx::query_as::<_, Order>(
        "SELECT order_id, promotion_id, status, price_cents, created_at FROM orders \
         WHERE user_id = $1 ORDER BY created_at DESC, order_id DESC LIMIT $2",
    )
    .bind(user_id)
    .bind(limit)
    .fetch_all(db)
    .await
    .with_context(|| format!("failed to list the orders of user {user_id}"))
}

/// Whether order `order_id` is in PostgreSQL.
pub async fn exists(db: &PgPool, order_id: &str) -> anyhow::Result<bool> {
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM orders WHERE order_id = $1)")
        .bind(order_id)
        .fetch_one(db)
        .await
        .context("failed to look up an order")
}

/// The id of a user's latest persisted order in a promotion.
pub async fn latest_for(
    db: &PgPool,
    promotion_id: i64,
    user_id: i64,
) -> anyhow::Result<Option<String>> {
    sqlx::query_scalar::<_, String>(
        "SELECT order_id FROM orders WHERE promotion_id = $1 AND user_id = $2 \
         ORDER BY seq DESC LIMIT 1",
    )
    .bind(promotion_id)
    .bind(user_id)
    .fetch_optional(db)
    .await
    .context("failed to look up the buyer's order")
}

/// Persisted orders of a promotion by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatusCounts {
    pub persisted: i64,
    pub paid: i64,
    pub cancelled: i64,
}

pub async fn counts(db: &PgPool, promotion_id: i64) -> anyhow::Result<StatusCounts> {
    let (persisted, paid, cancelled): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'paid'), \
         count(*) FILTER (WHERE status = 'cancelled') FROM orders WHERE promotion_id = $1",
    )
    .bind(promotion_id)
    .fetch_one(db)
    .await
    .with_context(|| format!("failed to count the orders of promotion {promotion_id}"))?;
    Ok(StatusCounts {
        persisted,
        paid,
        cancelled,
    })
}
