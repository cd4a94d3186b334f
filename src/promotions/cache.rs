//! The gateway's local cache (moka): promotion meta for the purchase path,
//! local sold-out flags, and the public list.
//!
//! The cache lets the gateway answer unknown, not-started, ended and sold-out
//! purchases without a Redis round trip. It is never the authority: the
//! purchase script re-checks everything, and every entry expires on its own,
//! so a stale entry can delay a sale by at most its TTL and never oversell.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moka::future::Cache;
use sqlx::PgPool;

use super::model::Promotion;
use super::repo;
use crate::stock::{PromotionMeta, Store};

/// A local "sold out" flag.
pub struct SoldOutFlag {
    set_at: Instant,
    /// Whether a request is re-checking Redis for this flag right now.
    probing: AtomicBool,
}

/// The local verdict before a purchase goes to Redis.
pub enum SoldOut {
    /// No flag: ask Redis.
    NotFlagged,
    /// A fresh flag (or someone else is re-checking): answer 410 locally.
    Fresh,
    /// The flag aged and this request re-checks Redis.
    Probe(ProbeGuard),
}

/// Held by the one request re-checking an aged flag; dropping it lets the
/// next request re-check if this one learned nothing.
pub struct ProbeGuard(Arc<SoldOutFlag>);

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

/// A promotion of the public list with its approximate units left.
#[derive(Debug, Clone)]
pub struct Listed {
    pub promotion: Promotion,
    pub remaining: Option<i64>,
}

/// The local caches of one gateway.
#[derive(Clone)]
pub struct PromotionCache {
    /// Promotion id → meta as Redis holds it (`None`: Redis has none, so the
    /// promotion is unknown). Loaded from Redis, so the purchase path never
    /// needs PostgreSQL.
    meta: Cache<i64, Option<Arc<PromotionMeta>>>,
    /// Promotion ids the script has answered "sold out" for. A flag is fresh
    /// for `sold_out_ttl`; after that a single request re-checks Redis while
    /// the rest are still refused, so a returned unit is found within the
    /// TTL even when its pub/sub message was missed, and a crowd never
    /// stampedes Redis when a flag ages.
    sold_out: Cache<i64, Arc<SoldOutFlag>>,
    sold_out_ttl: Duration,
    /// The public list of open promotions, one entry under the key `()`.
    open: Cache<(), Arc<Vec<Listed>>>,
}

impl PromotionCache {
    pub fn new(meta_ttl: Duration, sold_out_ttl: Duration) -> Self {
        PromotionCache {
            meta: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(meta_ttl)
                .build(),
            // Flags are replaced or cleared, never trusted past their TTL; the
            // hour only bounds the memory of promotions long gone.
            sold_out: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
            sold_out_ttl,
            open: Cache::builder()
                .max_capacity(1)
                .time_to_live(meta_ttl)
                .build(),
        }
    }

    /// The meta of promotion `id`; concurrent misses share one Redis read.
    pub async fn meta(
        &self,
        store: &Store,
        id: i64,
    ) -> Result<Option<Arc<PromotionMeta>>, Arc<redis::RedisError>> {
        if let Some(hit) = self.meta.get(&id).await {
            metrics::counter!("seckill_cache_requests_total", "cache" => "meta", "result" => "hit")
                .increment(1);
            return Ok(hit);
        }
        metrics::counter!("seckill_cache_requests_total", "cache" => "meta", "result" => "miss")
            .increment(1);
        self.meta
            .try_get_with(id, async { store.meta(id).await.map(|m| m.map(Arc::new)) })
            .await
    }

    /// What the local flag says about promotion `id`.
    pub async fn sold_out(&self, id: i64) -> SoldOut {
        let Some(flag) = self.sold_out.get(&id).await else {
            return SoldOut::NotFlagged;
        };
        if flag.set_at.elapsed() < self.sold_out_ttl {
            metrics::counter!("seckill_cache_requests_total", "cache" => "sold_out", "result" => "hit")
                .increment(1);
            return SoldOut::Fresh;
        }
        if flag
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            SoldOut::Probe(ProbeGuard(flag))
        } else {
            SoldOut::Fresh
        }
    }

    /// Records (or refreshes) a sold-out answer from Redis.
    pub async fn mark_sold_out(&self, id: i64) {
        let flag = SoldOutFlag {
            set_at: Instant::now(),
            probing: AtomicBool::new(false),
        };
        self.sold_out.insert(id, Arc::new(flag)).await;
    }

    /// Drops the flag: stock was found or came back.
    pub async fn clear_sold_out(&self, id: i64) {
        self.sold_out.invalidate(&id).await;
    }

    /// Forgets everything known about promotion `id` (after an edit or a
    /// delete, or when stock came back).
    pub async fn invalidate(&self, id: i64) {
        self.meta.invalidate(&id).await;
        self.sold_out.invalidate(&id).await;
        self.open.invalidate(&()).await;
    }

    /// Forgets everything (after a gap in the invalidation messages).
    pub fn invalidate_all(&self) {
        self.meta.invalidate_all();
        self.sold_out.invalidate_all();
        self.open.invalidate_all();
    }

    /// The open promotions (upcoming or active) with their approximate
    /// remaining stock.
    pub async fn open(
        &self,
        db: &PgPool,
        store: &Store,
    ) -> Result<Arc<Vec<Listed>>, Arc<anyhow::Error>> {
        self.open
            .try_get_with((), async {
                let promotions = repo::list_open(db).await?;
                let ids: Vec<i64> = promotions.iter().map(|p| p.id).collect();
                let remaining = store.remaining_many(&ids).await?;
                let listed = promotions
                    .into_iter()
                    .zip(remaining)
                    .map(|(promotion, remaining)| Listed {
                        promotion,
                        remaining,
                    })
                    .collect();
                Ok::<_, anyhow::Error>(Arc::new(listed))
            })
            .await
    }
}
