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
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::repo::{self, Order, OrderStatus};
use crate::stock::buckets::bucket_of;
use crate::stock::{Restock, Store};
use crate::{checkpoint, pace};

/// The pause point between a cancel's commit and its restock (see
/// `checkpoint`).
pub const AFTER_CANCEL_COMMIT: &str = "lifecycle.after_cancel_commit";

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
    pub store: Store,
    pub payment_timeout: Duration,
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

    /// One look in PostgreSQL; when the row is not there, Redis says whether
    /// the order is on its way (the buyer's latest purchase of a live
    /// promotion: `NotPersisted`, to be retried) or not this user's at all
    /// (`NotFound`). Never a wait: a crowd paying right after buying, or one
    /// user sending made-up ids, costs one statement each, not a polling loop
    /// on the pool.
    async fn transition(
        &self,
        user_id: i64,
        order_id: &str,
        action: Action,
    ) -> anyhow::Result<Transition> {
        if let Some(t) = self.try_transition(user_id, order_id, &action).await? {
            return Ok(t);
        }
        // The row may land between the two looks: the buyer is told to retry,
        // and the retry finds it.
        Ok(if self.is_unpersisted_purchase(user_id, order_id).await? {
            Transition::NotPersisted
        } else {
            Transition::NotFound
        })
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
        let Some(row) = repo::lock(&mut tx, order_id, user_id, self.payment_timeout).await? else {
            return Ok(None);
        };
        use OrderStatus::{Cancelled, Paid, Pending};
        let outcome = match (action, row.status) {
            (Action::Pay, Paid) => Transition::Done(row.order(Paid)),
            (Action::Pay, Cancelled) => Transition::AlreadyCancelled,
            (Action::Pay, Pending) if row.expired => {
                repo::set_status(&mut tx, order_id, Cancelled).await?;
                Transition::AlreadyCancelled
            }
            (Action::Pay, Pending) => {
                repo::set_status(&mut tx, order_id, Paid).await?;
                Transition::Done(row.order(Paid))
            }
            (Action::Cancel, Paid) => Transition::AlreadyPaid,
            (Action::Cancel, Cancelled) => Transition::Done(row.order(Cancelled)),
            (Action::Cancel, Pending) => {
                repo::set_status(&mut tx, order_id, Cancelled).await?;
                Transition::Done(row.order(Cancelled))
            }
        };
        tx.commit()
            .await
            .context("failed to commit the order's new status")?;
        // Whoever cancelled (now or earlier, if that restock was cut short)
        // makes sure the unit is back; restock.lua makes this idempotent.
        let cancelled_now_or_before = matches!(&outcome, Transition::AlreadyCancelled)
            || matches!(&outcome, Transition::Done(o) if o.status == Cancelled);
        if cancelled_now_or_before && (row.status == Pending || row.restocked_at.is_none()) {
            checkpoint::point(self.store.keys().prefix(), AFTER_CANCEL_COMMIT).await;
            let bucket = bucket_of(row.user_id, row.buckets.max(1) as u32);
            self.restock(row.promotion_id, bucket, &row.order_id)
                .await?;
        }
        Ok(Some(outcome))
    }

    /// Whether `order_id` is one of `user_id`'s purchases of a live
    /// promotion (Redis accepted it), still on its way to PostgreSQL.
    async fn is_unpersisted_purchase(&self, user_id: i64, order_id: &str) -> anyhow::Result<bool> {
        self.store
            .is_accepted_order_of(user_id, order_id)
            .await
            .context("failed to look up the buyer's latest orders")
    }

    /// Gives a cancelled order's unit back, records it, and tells every
    /// gateway to drop its sold-out flag.
    /// For a bucketed promotion, to bucket `bucket` (the buyer's).
    pub async fn restock(
        &self,
        promotion_id: i64,
        bucket: u32,
        order_id: &str,
    ) -> anyhow::Result<()> {
        let done = self
            .store
            .restock(promotion_id, bucket, order_id)
            .await
            .with_context(|| format!("failed to return the unit of order {order_id}"))?;
        match done {
            Restock::Returned => {
                repo::mark_restocked(&self.db, order_id).await?;
                metrics::counter!("seckill_units_returned_total").increment(1);
                self.store.publish_changed(promotion_id).await;
            }
            Restock::AlreadyReturned => repo::mark_restocked(&self.db, order_id).await?,
            Restock::NoState => {
                // Not recorded as returned: the unit is back only when a
                // script put it back. A recovery that read this order as
                // cancelled counts it; otherwise the sweeper retries once
                // the state is rebuilt.
                tracing::warn!(promotion = promotion_id, %order_id, "no redis state to return the unit to; left for recovery or the sweeper")
            }
        }
        Ok(())
    }

    /// One sweep: expires unpaid orders past the deadline and finishes
    /// restocks left undone. Returns the number of orders expired.
    pub async fn sweep(&self) -> anyhow::Result<usize> {
        let expired = repo::expire_unpaid(&self.db, self.payment_timeout, SWEEP_BATCH).await?;
        if !expired.is_empty() {
            tracing::info!(count = expired.len(), "expired unpaid orders");
            metrics::counter!("seckill_orders_expired_total").increment(expired.len() as u64);
        }
        for (order_id, promotion_id, user_id, buckets) in &expired {
            let bucket = bucket_of(*user_id, (*buckets).max(1) as u32);
            self.restock(*promotion_id, bucket, order_id).await?;
        }
        for (order_id, promotion_id, user_id, buckets) in
            &repo::awaiting_restock(&self.db, SWEEP_BATCH).await?
        {
            let bucket = bucket_of(*user_id, (*buckets).max(1) as u32);
            self.restock(*promotion_id, bucket, order_id).await?;
        }
        Ok(expired.len())
    }

    /// Sweeps every `every` until `shutdown`.
    pub async fn run_sweeper(self, every: Duration, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %format!("{e:#}"), "payment-timeout sweep failed; will retry");
            }
            if !pace::sleep(every, &shutdown).await {
                return;
            }
        }
    }
}
