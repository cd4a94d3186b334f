//! The `orders` table: every SQL statement on it. The workers' idempotent
//! batch insert, the lifecycle's row locks and status changes, the sweeper's
//! queries, recovery's reads and the query side.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use futures_util::stream::BoxStream;
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};

use crate::stock::OrderMessage;

/// Where an order is in its life (the `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    /// Bought, not paid yet.
    Pending,
    Paid,
    /// By the buyer or by the payment timeout; its unit goes back on sale.
    Cancelled,
}

/// An order as the buyer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Order {
    pub order_id: String,
    pub promotion_id: i64,
    pub status: OrderStatus,
    pub price_cents: i64,
    pub created_at: DateTime<Utc>,
}

/// An order whose unit is to return: order id, promotion id, buyer, and the
/// promotion's number of buckets (the unit returns to the buyer's bucket).
pub type Returning = (String, i64, i64, i32);

/// An order's row, locked for a status change.
#[derive(Debug, sqlx::FromRow)]
pub struct Locked {
    pub order_id: String,
    pub promotion_id: i64,
    /// The buyer: their bucket is where a bucketed promotion's unit returns.
    pub user_id: i64,
    /// The promotion's number of buckets.
    pub buckets: i32,
    pub status: OrderStatus,
    pub price_cents: i64,
    pub created_at: DateTime<Utc>,
    pub restocked_at: Option<DateTime<Utc>>,
    /// Whether its payment deadline has passed.
    pub expired: bool,
}

impl Locked {
    /// The order as the buyer sees it, in `status`.
    pub fn order(&self, status: OrderStatus) -> Order {
        Order {
            order_id: self.order_id.clone(),
            promotion_id: self.promotion_id,
            status,
            price_cents: self.price_cents,
            created_at: self.created_at,
        }
    }
}

/// The batch insert: one row per element of the arrays.
macro_rules! insert_batch_sql {
    () => {
        "INSERT INTO orders (order_id, promotion_id, user_id, seq, price_cents, created_at) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], \
         $5::bigint[], $6::timestamptz[])"
    };
}
const INSERT_BATCH_SKIPPING: &str =
    concat!(insert_batch_sql!(), " ON CONFLICT (order_id) DO NOTHING");

/// The columns [`copy_rows`] sends, in the order it encodes them.
const COPY_ORDERS: &str = "COPY orders (order_id, promotion_id, user_id, seq, price_cents, \
     created_at) FROM STDIN (FORMAT binary)";

/// What a batch insert did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inserted {
    /// Rows written (orders already there are skipped, not counted).
    pub rows: u64,
    /// The orders PostgreSQL refused, by index in the batch: never written,
    /// for a person to look at.
    pub refused: Vec<(usize, Refused)>,
}

/// Why PostgreSQL refused an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Another order holds this buyer's `seq` in the promotion.
    SeqTaken,
    /// The promotion does not exist.
    NoPromotion,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::SeqTaken => "another order holds this buyer's seq",
            Refused::NoPromotion => "the promotion does not exist",
        }
    }
}

/// Writes a batch in one statement. An order already there (a redelivered
/// message: same `order_id`) is skipped, not an error, so a redelivery can
/// never poison the stream.
///
/// The first try is a binary `COPY`, the cheapest way into PostgreSQL: no
/// statement to plan, no arrays to unpack, no speculative insertion. When the
/// batch holds an order already there (a redelivery after a crash, rare), the
/// `COPY` fails whole with a unique violation and writes nothing; the batch
/// is then written again with `INSERT … ON CONFLICT (order_id) DO NOTHING`,
/// which skips those rows. Any other
/// unique violation (a second order for one buyer's `seq`) is never skipped
/// silently: the batch is then written row by row and the refused rows are
/// returned in [`Inserted::refused`], and so is an order of a promotion that
/// does not exist: neither can ever be written, so retrying would block the
/// stream forever.
pub async fn insert_batch(db: &PgPool, batch: &[&OrderMessage]) -> anyhow::Result<Inserted> {
    if batch.is_empty() {
        return Ok(Inserted::default());
    }
    let context = || format!("failed to insert a batch of {} orders", batch.len());
    let written = |rows| Inserted {
        rows,
        refused: Vec::new(),
    };
    match copy_rows(db, batch).await {
        Ok(rows) => return Ok(written(rows)),
        Err(e) if refusal(&e).is_none() => return Err(e).with_context(context),
        Err(_) => {}
    }
    match insert_rows(db, INSERT_BATCH_SKIPPING, batch).await {
        Ok(rows) => return Ok(written(rows)),
        Err(e) if refusal(&e).is_none() => return Err(e).with_context(context),
        Err(_) => {}
    }
    let mut inserted = written(0);
    for (i, m) in batch.iter().enumerate() {
        match insert_rows(db, INSERT_BATCH_SKIPPING, std::slice::from_ref(m)).await {
            Ok(rows) => inserted.rows += rows,
            Err(e) => match refusal(&e) {
                Some(why) => inserted.refused.push((i, why)),
                None => return Err(e).with_context(context),
            },
        }
    }
    Ok(inserted)
}

/// Why PostgreSQL refused a row for good, if it did.
fn refusal(e: &sqlx::Error) -> Option<Refused> {
    let sqlx::Error::Database(d) = e else {
        return None;
    };
    if d.is_unique_violation() {
        Some(Refused::SeqTaken)
    } else if d.is_foreign_key_violation() {
        Some(Refused::NoPromotion)
    } else {
        None
    }
}

/// One binary `COPY` of `batch` into `orders`: all rows or none.
async fn copy_rows(db: &PgPool, batch: &[&OrderMessage]) -> Result<u64, sqlx::Error> {
    use sqlx::postgres::PgPoolCopyExt;
    let mut copy = db.copy_in_raw(COPY_ORDERS).await?;
    copy.send(encode_binary_copy(batch)).await?;
    copy.finish().await
}

/// The microseconds from the Unix epoch to PostgreSQL's, 2000-01-01 UTC.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// `batch` in PostgreSQL's binary `COPY` format: the signature and header,
/// then per row its field count and each field as a length and big-endian
/// bytes (`text` as UTF-8, `bigint` as 8 bytes, `timestamptz` as
/// microseconds since 2000-01-01), then the trailer.
fn encode_binary_copy(batch: &[&OrderMessage]) -> Vec<u8> {
    let mut out = Vec::with_capacity(19 + batch.len() * 110 + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    let int8 = |out: &mut Vec<u8>, v: i64| {
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    };
    for m in batch {
        out.extend_from_slice(&6i16.to_be_bytes());
        let id = m.order_id.as_bytes();
        out.extend_from_slice(&(id.len() as i32).to_be_bytes());
        out.extend_from_slice(id);
        int8(&mut out, m.promotion_id);
        int8(&mut out, m.user_id);
        int8(&mut out, m.seq);
        int8(&mut out, m.price_cents);
        int8(&mut out, m.created_at.timestamp_micros() - PG_EPOCH_MICROS);
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    out
}

/// One `INSERT … SELECT FROM unnest(…)` of `batch` with `sql`.
async fn insert_rows(
    db: &PgPool,
    sql: &'static str,
    batch: &[&OrderMessage],
) -> Result<u64, sqlx::Error> {
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
    let done = sqlx::query(sql)
        .bind(&order_ids)
        .bind(&promotion_ids)
        .bind(&user_ids)
        .bind(&seqs)
        .bind(&prices)
        .bind(&created)
        .execute(db)
        .await?;
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
    /// How many of the `listed` order ids are persisted.
    pub of_listed: i64,
    /// How many of the `returned` order ids are persisted and cancelled.
    pub cancelled_of_returned: i64,
}

/// Counts a promotion's persisted orders by status, how many of `listed`
/// are among them, and how many of `returned` are cancelled, in one
/// statement.
pub async fn counts(
    db: &PgPool,
    promotion_id: i64,
    listed: &[&str],
    returned: &[&str],
) -> anyhow::Result<StatusCounts> {
    let (persisted, paid, cancelled, of_listed, cancelled_of_returned): (i64, i64, i64, i64, i64) =
        sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE status = 'paid'), \
             count(*) FILTER (WHERE status = 'cancelled'), \
             count(*) FILTER (WHERE order_id = ANY($2)), \
             count(*) FILTER (WHERE status = 'cancelled' AND order_id = ANY($3)) \
             FROM orders WHERE promotion_id = $1",
        )
        .bind(promotion_id)
        .bind(listed)
        .bind(returned)
        .fetch_one(db)
        .await
        .with_context(|| format!("failed to count the orders of promotion {promotion_id}"))?;
    Ok(StatusCounts {
        persisted,
        paid,
        cancelled,
        of_listed,
        cancelled_of_returned,
    })
}

/// The ids of a promotion's cancelled orders recorded as returned.
pub async fn restocked(db: &PgPool, promotion_id: i64) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT order_id FROM orders WHERE promotion_id = $1 \
         AND status = 'cancelled' AND restocked_at IS NOT NULL",
    )
    .bind(promotion_id)
    .fetch_all(db)
    .await
    .context("failed to list the returned orders")
}

/// A read-only transaction on one snapshot of the database: the reads of
/// one recovery agree with one another.
pub async fn snapshot(db: &PgPool) -> anyhow::Result<Transaction<'static, Postgres>> {
    let mut tx = db.begin().await.context("failed to begin a transaction")?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await
        .context("failed to take a snapshot")?;
    Ok(tx)
}

/// Which of `order_ids` are in the table.
pub async fn existing(
    tx: &mut Transaction<'_, Postgres>,
    order_ids: &[&str],
) -> anyhow::Result<HashSet<String>> {
    let found: Vec<String> =
        sqlx::query_scalar("SELECT order_id FROM orders WHERE order_id = ANY($1)")
            .bind(order_ids)
            .fetch_all(&mut **tx)
            .await
            .context("failed to look up orders")?;
    Ok(found.into_iter().collect())
}

/// One buyer of a promotion as PostgreSQL has it: units bought and the
/// latest order.
#[derive(Debug, sqlx::FromRow)]
pub struct BuyerTotal {
    pub user_id: i64,
    pub bought: i64,
    pub latest_seq: i64,
    pub latest: String,
}

/// A promotion's buyers, one row each, as a stream (recovery holds a chunk
/// at a time, whatever the number of orders).
pub fn buyer_totals<'a>(
    tx: &'a mut Transaction<'_, Postgres>,
    promotion_id: i64,
) -> BoxStream<'a, Result<BuyerTotal, sqlx::Error>> {
    sqlx::query_as(
        "SELECT user_id, count(*) AS bought, max(seq) AS latest_seq, \
         (array_agg(order_id ORDER BY seq DESC))[1] AS latest \
         FROM orders WHERE promotion_id = $1 GROUP BY user_id",
    )
    .bind(promotion_id)
    .fetch(&mut **tx)
}

/// A promotion's orders as `(order_id, user_id)`, as a stream.
pub fn order_owners<'a>(
    tx: &'a mut Transaction<'_, Postgres>,
    promotion_id: i64,
) -> BoxStream<'a, Result<(String, i64), sqlx::Error>> {
    sqlx::query_as("SELECT order_id, user_id FROM orders WHERE promotion_id = $1")
        .bind(promotion_id)
        .fetch(&mut **tx)
}

/// The ids of a promotion's cancelled orders, as a stream.
pub fn cancelled_ids<'a>(
    tx: &'a mut Transaction<'_, Postgres>,
    promotion_id: i64,
) -> BoxStream<'a, Result<String, sqlx::Error>> {
    sqlx::query_scalar(
        "SELECT order_id FROM orders WHERE promotion_id = $1 AND status = 'cancelled'",
    )
    .bind(promotion_id)
    .fetch(&mut **tx)
}

/// The cancelled orders of a promotion as `(order_id, user_id)`, as a
/// stream (recovery of a bucketed promotion sorts them by bucket).
pub fn cancelled_owners<'a>(
    tx: &'a mut Transaction<'_, Postgres>,
    promotion_id: i64,
) -> BoxStream<'a, Result<(String, i64), sqlx::Error>> {
    sqlx::query_as(
        "SELECT order_id, user_id FROM orders WHERE promotion_id = $1 AND status = 'cancelled'",
    )
    .bind(promotion_id)
    .fetch(&mut **tx)
}

/// Per buyer of a promotion: `(user_id, orders, cancelled orders)`.
pub async fn buyer_counts(
    tx: &mut Transaction<'_, Postgres>,
    promotion_id: i64,
) -> anyhow::Result<Vec<(i64, i64, i64)>> {
    sqlx::query_as(
        "SELECT user_id, count(*), count(*) FILTER (WHERE status = 'cancelled') \
         FROM orders WHERE promotion_id = $1 GROUP BY user_id",
    )
    .bind(promotion_id)
    .fetch_all(&mut **tx)
    .await
    .context("failed to count the orders by buyer")
}

/// Locks `user_id`'s order `order_id` for a status change; `None` when no
/// such row exists (yet).
pub async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    order_id: &str,
    user_id: i64,
    payment_timeout: Duration,
) -> anyhow::Result<Option<Locked>> {
    sqlx::query_as::<_, Locked>(
        "SELECT o.order_id, o.promotion_id, o.user_id, p.buckets, o.status, o.price_cents, \
         o.created_at, o.restocked_at, \
         o.created_at + make_interval(secs => $3) <= now() AS expired \
         FROM orders o JOIN promotions p ON p.id = o.promotion_id \
         WHERE o.order_id = $1 AND o.user_id = $2 FOR UPDATE OF o",
    )
    .bind(order_id)
    .bind(user_id)
    .bind(payment_timeout.as_secs_f64())
    .fetch_optional(&mut **tx)
    .await
    .context("failed to lock the order")
}

/// Moves a locked order to `status` (paid or cancelled), stamping the time.
pub async fn set_status(
    tx: &mut Transaction<'_, Postgres>,
    order_id: &str,
    status: OrderStatus,
) -> anyhow::Result<()> {
    let sql = match status {
        OrderStatus::Paid => {
            "UPDATE orders SET status = 'paid', paid_at = now() WHERE order_id = $1"
        }
        OrderStatus::Cancelled => {
            "UPDATE orders SET status = 'cancelled', cancelled_at = now() WHERE order_id = $1"
        }
        OrderStatus::Pending => anyhow::bail!("an order never goes back to pending"),
    };
    sqlx::query(sql)
        .bind(order_id)
        .execute(&mut **tx)
        .await
        .with_context(|| format!("failed to mark order {order_id} {status:?}"))?;
    Ok(())
}

/// Records that a cancelled order's unit is back on sale.
pub async fn mark_restocked(db: &PgPool, order_id: &str) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE orders SET restocked_at = now() WHERE order_id = $1 AND restocked_at IS NULL",
    )
    .bind(order_id)
    .execute(db)
    .await
    .context("failed to record the returned unit")?;
    Ok(())
}

/// Records that the units of `order_ids` are back (recovery counted them in
/// the stock it rebuilt).
pub async fn mark_restocked_all(db: &PgPool, order_ids: &[String]) -> anyhow::Result<()> {
    for chunk in order_ids.chunks(10_000) {
        sqlx::query(
            "UPDATE orders SET restocked_at = now() \
             WHERE order_id = ANY($1) AND restocked_at IS NULL",
        )
        .bind(chunk)
        .execute(db)
        .await
        .context("failed to record the returned units")?;
    }
    Ok(())
}

/// Cancels up to `limit` unpaid orders past their deadline, skipping rows
/// locked by a payment in progress. Returns `(order_id, promotion_id)` of each.
pub async fn expire_unpaid(
    db: &PgPool,
    payment_timeout: Duration,
    limit: i64,
) -> anyhow::Result<Vec<Returning>> {
    sqlx::query_as(
        "UPDATE orders SET status = 'cancelled', cancelled_at = now() \
         WHERE status = 'pending' AND order_id IN ( \
           SELECT order_id FROM orders WHERE status = 'pending' \
           AND created_at + make_interval(secs => $1) <= now() \
           ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING order_id, promotion_id, user_id, \
         (SELECT buckets FROM promotions p WHERE p.id = orders.promotion_id)",
    )
    .bind(payment_timeout.as_secs_f64())
    .bind(limit)
    .fetch_all(db)
    .await
    .context("failed to expire unpaid orders")
}

/// Up to `limit` cancelled orders of promotions not yet ended whose unit is
/// not recorded as back (a unit of an ended sale can no longer be sold).
pub async fn awaiting_restock(db: &PgPool, limit: i64) -> anyhow::Result<Vec<Returning>> {
    sqlx::query_as(
        "SELECT o.order_id, o.promotion_id, o.user_id, p.buckets FROM orders o \
         JOIN promotions p ON p.id = o.promotion_id \
         WHERE o.status = 'cancelled' AND o.restocked_at IS NULL AND p.ends_at > now() \
         ORDER BY o.cancelled_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
    .context("failed to list cancelled orders awaiting their restock")
}
