//! The admin workflows on promotions: create, edit before start, delete, and
//! the views with live counts. Each keeps PostgreSQL (the record), Redis (the
//! sale state the script checks) and every gateway's cache in step, so the
//! handlers only parse, call and map.

use chrono::Utc;
use sqlx::PgPool;

use super::cache::PromotionCache;
use super::model::{Invalid, NewPromotion, Promotion, PromotionInput};
use super::repo::{self, Refusal};
use crate::orders::repo::{self as orders, StatusCounts};
use crate::stock::{LiveCounters, Store};

/// Why a promotion workflow did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PromotionError {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("refused: {0:?}")]
    Refused(Refusal),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<Refusal> for PromotionError {
    fn from(r: Refusal) -> Self {
        PromotionError::Refused(r)
    }
}

impl From<redis::RedisError> for PromotionError {
    fn from(e: redis::RedisError) -> Self {
        PromotionError::Failed(e.into())
    }
}

/// A promotion as saved, with the units Redis has on sale for it.
#[derive(Debug, Clone)]
pub struct Saved {
    pub promotion: Promotion,
    pub remaining: i64,
}

/// A promotion with its live (Redis) and persisted (PostgreSQL) counts.
#[derive(Debug, Clone)]
pub struct WithStats {
    pub promotion: Promotion,
    pub live: LiveCounters,
    pub stored: StatusCounts,
}

/// The promotion workflows, over both stores and the local cache.
#[derive(Clone)]
pub struct Promotions {
    pub db: PgPool,
    pub store: Store,
    pub cache: PromotionCache,
}

impl Promotions {
    /// Records the promotion, preheats Redis, and tells every gateway. A
    /// promotion whose preheat failed is removed from both stores again.
    pub async fn create(&self, new: &NewPromotion) -> Result<Saved, PromotionError> {
        let p = repo::insert(&self.db, new).await?;
        let remaining = match self.store.preheat(&p.meta()).await {
            Ok(left) => left,
            Err(e) => {
                if let Err(undo) = self.store.forget(p.id, p.meta().buckets).await {
                    tracing::error!(id = p.id, error = %format!("{undo:#}"), "failed to remove the redis state of a promotion whose preheat failed");
                }
                if let Err(undo) = repo::remove(&self.db, p.id).await {
                    tracing::error!(id = p.id, error = %format!("{undo:#}"), "failed to remove a promotion whose preheat failed");
                }
                return Err(e.into());
            }
        };
        self.changed(p.id).await;
        tracing::info!(
            id = p.id,
            stock = p.stock,
            "promotion created and preheated"
        );
        Ok(Saved {
            promotion: p,
            remaining,
        })
    }

    /// Applies `input` to a promotion that has not started, then preheats
    /// Redis with the new values. When the preheat fails, the old values are
    /// written back to both stores, so they never disagree on what is sold.
    pub async fn update(&self, id: i64, input: PromotionInput) -> Result<Saved, PromotionError> {
        let current = repo::get(&self.db, id).await?.ok_or(Refusal::NotFound)?;
        if current.starts_at <= Utc::now() {
            return Err(Refusal::Started.into());
        }
        let edited = input.apply_to(&current)?;
        let p = repo::update_before_start(&self.db, id, &edited).await??;
        if p.buckets != current.buckets {
            // Nothing is sold before the start: the state is laid out anew
            // over the new number of buckets.
            self.store.forget(id, current.meta().buckets).await?;
        }
        let remaining = match self.store.preheat(&p.meta()).await {
            Ok(left) => left,
            Err(e) => {
                // Redis may still sell with the old values: put them back in
                // PostgreSQL too, and in Redis (after the failed call on the
                // same connection, should that call still run).
                if let Err(undo) = repo::restore(&self.db, &current).await {
                    tracing::error!(id, error = %format!("{undo:#}"), "failed to restore a promotion whose preheat failed");
                } else if let Err(undo) = self.store.preheat(&current.meta()).await {
                    tracing::warn!(id, error = %format!("{undo:#}"), "failed to preheat the restored promotion; recovery will");
                }
                self.changed(id).await;
                return Err(e.into());
            }
        };
        self.changed(id).await;
        Ok(Saved {
            promotion: p,
            remaining,
        })
    }

    /// Deletes a promotion that is not running and sold nothing (the orders
    /// must keep their promotion), in both stores.
    pub async fn delete(&self, id: i64) -> Result<(), PromotionError> {
        let p = repo::get(&self.db, id).await?.ok_or(Refusal::NotFound)?;
        if p.is_active(Utc::now()) {
            return Err(Refusal::Started.into());
        }
        if self.store.counters(id).await?.sold > 0 {
            return Err(Refusal::HasOrders.into());
        }
        repo::delete_unless_running(&self.db, id).await??;
        self.store.forget(id, p.meta().buckets).await?;
        self.changed(id).await;
        tracing::info!(id, "promotion deleted");
        Ok(())
    }

    /// Every promotion with the units left on sale (`None` where Redis has none).
    pub async fn list(&self) -> anyhow::Result<Vec<(Promotion, Option<i64>)>> {
        let promotions = repo::list(&self.db).await?;
        let ids: Vec<i64> = promotions.iter().map(|p| p.id).collect();
        let remaining = self.store.remaining_many(&ids).await?;
        Ok(promotions.into_iter().zip(remaining).collect())
    }

    /// One promotion with its live and persisted counts.
    pub async fn with_stats(&self, id: i64) -> Result<WithStats, PromotionError> {
        let promotion = repo::get(&self.db, id).await?.ok_or(Refusal::NotFound)?;
        let live = self.store.counters(id).await?;
        let stored = orders::counts(&self.db, id, &[], &[]).await?;
        Ok(WithStats {
            promotion,
            live,
            stored,
        })
    }

    /// Drops this gateway's cached view of `id` and tells the others.
    async fn changed(&self, id: i64) {
        self.cache.invalidate(id).await;
        self.store.publish_changed(id).await;
    }
}
