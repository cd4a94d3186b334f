//! The order lifecycle after the purchase: pay, cancel, and the payment
//! timeout that cancels unpaid orders and returns their stock.
//!
//! `pending` → `paid`, or `pending` → `cancelled` (by the buyer or by the
//! timeout). Each transition locks the order's row, so a payment racing its
//! own expiry ends in exactly one of the two. A cancelled order's unit goes
//! back through `lua/restock.lua`, idempotent per order id; `restocked_at`
//! records that it is back, and the sweeper finishes any restock a crash
//! interrupted, so no cancelled unit stays unsold.

use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use redis::aio::ConnectionManager;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::repo::Order;
use crate::stock::scripts::{self, Restock};
use crate::stock::{Keys, events};

/// How long pay and cancel wait for an order that is still on its way from
/// the stream to PostgreSQL (normally milliseconds).
const PERSIST_WAIT: Duration = Duration::from_secs(2);

/// Orders expired per sweep statement.
const SWEEP_BATCH: i64 = 500;

/// What a pay or cancel request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The order in its new (or already reached) state.
    Done(Order),
    /// Pay refused: the order was cancelled or has expired.
    AlreadyCancelled,
    /// Cancel refused: the order is paid.
    AlreadyPaid,
    /// The order was bought but is not in PostgreSQL yet.
    NotPersisted,
    /// No such order for this user.
    NotFound,
}

/// The stores the lifecycle works on.
#[derive(Clone)]
pub struct Lifecycle {
    pub db: PgPool,
    pub redis: ConnectionManager,
    pub keys: Keys,
    pub payment_timeout: Duration,
}

#[derive(Debug, sqlx::FromRow)]
struct Locked {
    order_id: String,
    promotion_id: i64,
    status: String,
    price_cents: i64,
    created_at: DateTime<Utc>,
    restocked_at: Option<DateTime<Utc>>,
    expired: bool,
}

impl Locked {
    fn order(&self, status: &str) -> Order {
        Order {
            order_id: self.order_id.clone(),
            promotion_id: self.promotion_id,
            status: status.to_string(),
            price_cents: self.price_cents,
            created_at: self.created_at,
        }
    }
}

enum Action {
    Pay,
    Cancel,
}

impl Lifecycle {
    /// Pays `order_id` for `user_id`. Paying a paid order again answers it
    /// as paid; an order past its payment deadline is expired here and then.
    pub async fn pay(&self, user_id: i64, order_id: &str) -> anyhow::Result<Transition> {
        self.transition(user_id, order_id, Action::Pay).await
    }

    /// Cancels `order_id` for `user_id` and returns its unit to the sale.
    /// Cancelling a cancelled order again answers it as cancelled.
    pub async fn cancel(&self, user_id: i64, order_id: &str) -> anyhow::Result<Transition> {
        self.transition(user_id, order_id, Action::Cancel).await
    }

    async fn transition(
        &self,
        user_id: i64,
        order_id: &str,
        action: Action,
    ) -> anyhow::Result<Transition> {
        let deadline = tokio::time::Instant::now() + PERSIST_WAIT;
        loop {
            if let Some(t) = self.try_transition(user_id, order_id, &action).await? {
                return Ok(t);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(if self.is_unpersisted_purchase(user_id, order_id).await? {
                    Transition::NotPersisted
                } else {
                    Transition::NotFound
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One attempt under the row lock; `None` when the row is not there (yet).
    async fn try_transition(
        &self,
        user_id: i64,
        order_id: &str,
        action: &Action,
    ) -> anyhow::Result<Option<Transition>> {
        let mut tx = self
            .db
            .begin()
            .await
            .context("failed to begin a transaction")?;
        let locked = sqlx::query_as::<_, Locked>(
            "SELECT order_id, promotion_id, status, price_cents, created_at, restocked_at, \
             created_at + make_interval(secs => $3) <= now() AS expired \
             FROM orders WHERE order_id = $1 AND user_id = $2 FOR UPDATE",
        )
        .bind(order_id)
        .bind(user_id)
        .bind(self.payment_timeout.as_secs_f64())
        .fetch_optional(&mut *tx)
        .await
        .context("failed to lock the order")?;
        let Some(row) = locked else {
            return Ok(None);
        };
        let outcome = match (action, row.status.as_str()) {
            (Action::Pay, "paid") => Transition::Done(row.order("paid")),
            (Action::Pay, "cancelled") => Transition::AlreadyCancelled,
            (Action::Pay, _) if row.expired => {
                set_status(&mut tx, order_id, NewStatus::Cancelled).await?;
                Transition::AlreadyCancelled
            }
            (Action::Pay, _) => {
                set_status(&mut tx, order_id, NewStatus::Paid).await?;
                Transition::Done(row.order("paid"))
            }
            (Action::Cancel, "paid") => Transition::AlreadyPaid,
            (Action::Cancel, "cancelled") => Transition::Done(row.order("cancelled")),
            (Action::Cancel, _) => {
                set_status(&mut tx, order_id, NewStatus::Cancelled).await?;
                Transition::Done(row.order("cancelled"))
            }
        };
        tx.commit()
            .await
            .context("failed to commit the order's new status")?;
        // Whoever cancelled (now or earlier, if that restock was cut short)
        // makes sure the unit is back; restock.lua makes this idempotent.
        let cancelled_now_or_before = matches!(&outcome, Transition::AlreadyCancelled)
            || matches!(&outcome, Transition::Done(o) if o.status == "cancelled");
        if cancelled_now_or_before && (row.status == "pending" || row.restocked_at.is_none()) {
            self.restock(row.promotion_id, &row.order_id).await?;
        }
        Ok(Some(outcome))
    }

    /// Whether `order_id` is `user_id`'s latest purchase of a live promotion,
    /// still on its way to PostgreSQL.
    async fn is_unpersisted_purchase(&self, user_id: i64, order_id: &str) -> anyhow::Result<bool> {
        let mut conn = self.redis.clone();
        let live: Vec<i64> = redis::cmd("SMEMBERS")
            .arg(self.keys.live_promotions())
            .query_async(&mut conn)
            .await
            .context("failed to list live promotions")?;
        if live.is_empty() {
            return Ok(false);
        }
        let mut pipe = redis::pipe();
        for id in &live {
            pipe.hget(self.keys.promotion(*id).results, user_id);
        }
        let latest: Vec<Option<String>> = pipe
            .query_async(&mut conn)
            .await
            .context("failed to look up the buyer's latest orders")?;
        Ok(latest.iter().flatten().any(|o| o == order_id))
    }

    /// Gives a cancelled order's unit back, records it, and tells every
    /// gateway to drop its sold-out flag.
    pub async fn restock(&self, promotion_id: i64, order_id: &str) -> anyhow::Result<()> {
        let mut conn = self.redis.clone();
        let done = scripts::restock(&mut conn, &self.keys, promotion_id, order_id)
            .await
            .with_context(|| format!("failed to return the unit of order {order_id}"))?;
        sqlx::query(
            "UPDATE orders SET restocked_at = now() WHERE order_id = $1 AND restocked_at IS NULL",
        )
        .bind(order_id)
        .execute(&self.db)
        .await
        .context("failed to record the returned unit")?;
        match done {
            Restock::Returned => {
                metrics::counter!("seckill_units_returned_total").increment(1);
                events::publish_changed(&mut conn, &self.keys, promotion_id).await;
            }
            Restock::AlreadyReturned => {}
            Restock::NoState => {
                tracing::warn!(promotion = promotion_id, %order_id, "no redis state to return the unit to; recovery will count it")
            }
        }
        Ok(())
    }

    /// One sweep: expires unpaid orders past the deadline and finishes
    /// restocks left undone. Returns the number of orders expired.
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let expired: Vec<(String, i64)> = sqlx::query_as(
            "UPDATE orders SET status = 'cancelled', cancelled_at = now() \
             WHERE status = 'pending' AND order_id IN ( \
               SELECT order_id FROM orders WHERE status = 'pending' \
               AND created_at + make_interval(secs => $1) <= now() \
               ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
             RETURNING order_id, promotion_id",
        )
        .bind(self.payment_timeout.as_secs_f64())
        .bind(SWEEP_BATCH)
        .fetch_all(&self.db)
        .await
        .context("failed to expire unpaid orders")?;
        if !expired.is_empty() {
            tracing::info!(count = expired.len(), "expired unpaid orders");
            metrics::counter!("seckill_orders_expired_total").increment(expired.len() as u64);
        }
        for (order_id, promotion_id) in &expired {
            self.restock(*promotion_id, order_id).await?;
        }
        let due: Vec<(String, i64)> = sqlx::query_as(
            "SELECT order_id, promotion_id FROM orders \
             WHERE status = 'cancelled' AND restocked_at IS NULL \
             ORDER BY cancelled_at LIMIT $1",
        )
        .bind(SWEEP_BATCH)
        .fetch_all(&self.db)
        .await
        .context("failed to list cancelled orders awaiting their restock")?;
        for (order_id, promotion_id) in &due {
            self.restock(*promotion_id, order_id).await?;
        }
        Ok(expired.len())
    }

    /// Sweeps every `every` until `shutdown`.
    pub async fn run_sweeper(self, every: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %format!("{e:#}"), "payment-timeout sweep failed; will retry");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum NewStatus {
    Paid,
    Cancelled,
}

async fn set_status(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    order_id: &str,
    status: NewStatus,
) -> anyhow::Result<()> {
    let sql = match status {
        NewStatus::Paid => "UPDATE orders SET status = 'paid', paid_at = now() WHERE order_id = $1",
        NewStatus::Cancelled => {
            "UPDATE orders SET status = 'cancelled', cancelled_at = now() WHERE order_id = $1"
        }
    };
    sqlx::query(sql)
        .bind(order_id)
        .execute(&mut **tx)
        .await
        .with_context(|| format!("failed to mark order {order_id} {status:?}"))?;
    Ok(())
}
