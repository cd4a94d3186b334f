//! The gateway's local cache (moka): promotion meta for the purchase path,
//! local sold-out flags, and the public list with its JSON bodies.
//!
//! The cache lets the gateway answer unknown, not-started, ended and sold-out
//! purchases without a Redis round trip. It is never the authority: the
//! purchase script re-checks everything, and every entry expires on its own,
//! so a stale entry can delay a sale by at most its TTL and never oversell.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
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
    /// Its public JSON object (`GET /api/promotions/{id}`), serialized when
    /// the list was filled.
    body: Bytes,
}

/// The public list as one cache fill read it, with the JSON bodies of
/// `GET /api/promotions` and of each promotion serialized once.
///
/// A promotion's `status` depends on the time (upcoming → active → ended)
/// and the list leaves ended promotions out, so the bodies are right only
/// until the first start or end after the fill: [`OpenList::list_body`] and
/// [`Listed::body`] give them up to then, and `None` after it, when the
/// caller serializes afresh at the time of the request until the entry
/// expires (at most the cache TTL). `remaining` is as old as the fill, as it
/// always was.
#[derive(Debug)]
pub struct OpenList {
    pub listed: Vec<Listed>,
    list_body: Bytes,
    /// The first start or end after the fill (`None`: no later one).
    fresh_until: Option<DateTime<Utc>>,
}

impl OpenList {
    /// Builds the list and its bodies as they read at `now`.
    pub fn new(rows: Vec<(Promotion, Option<i64>)>, now: DateTime<Utc>) -> OpenList {
        let listed: Vec<Listed> = rows
            .into_iter()
            .map(|(promotion, remaining)| Listed {
                body: to_bytes(&promotion.to_public_json(now, remaining)),
                promotion,
                remaining,
            })
            .collect();
        let fresh_until = listed
            .iter()
            .flat_map(|l| [l.promotion.starts_at, l.promotion.ends_at])
            .filter(|t| *t > now)
            .min();
        let list_body = to_bytes(&Self::list_json(&listed, now));
        OpenList {
            listed,
            list_body,
            fresh_until,
        }
    }

    /// Whether the bodies serialized at the fill still read the same at `now`.
    fn fresh_at(&self, now: DateTime<Utc>) -> bool {
        self.fresh_until.is_none_or(|t| now < t)
    }

    /// The body of `GET /api/promotions` serialized at the fill, while it
    /// still holds at `now`.
    pub fn list_body(&self, now: DateTime<Utc>) -> Option<Bytes> {
        self.fresh_at(now).then(|| self.list_body.clone())
    }

    /// The promotion `id` of the list at `now` (an ended one is not listed).
    pub fn find(&self, id: i64, now: DateTime<Utc>) -> Option<&Listed> {
        self.listed
            .iter()
            .find(|l| l.promotion.id == id && l.promotion.ends_at > now)
    }

    /// The body of `GET /api/promotions` at `now`, serialized afresh.
    pub fn list_json(listed: &[Listed], now: DateTime<Utc>) -> serde_json::Value {
        let items: Vec<_> = listed
            .iter()
            .filter(|l| l.promotion.ends_at > now)
            .map(|l| l.promotion.to_public_json(now, l.remaining))
            .collect();
        serde_json::json!({"promotions": items})
    }

    /// The body of `GET /api/promotions/{id}` for `listed` of this list:
    /// serialized at the fill while that still holds at `now`.
    pub fn body_of(&self, listed: &Listed, now: DateTime<Utc>) -> Bytes {
        if self.fresh_at(now) {
            listed.body.clone()
        } else {
            to_bytes(&listed.promotion.to_public_json(now, listed.remaining))
        }
    }
}

fn to_bytes(value: &serde_json::Value) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()))
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
    /// The public list of open promotions, one entry under the key `()`,
    /// with its JSON bodies serialized once per fill.
    open: Cache<(), Arc<OpenList>>,
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
    ) -> Result<Arc<OpenList>, Arc<anyhow::Error>> {
        self.open
            .try_get_with((), async {
                let promotions = repo::list_open(db).await?;
                let ids: Vec<i64> = promotions.iter().map(|p| p.id).collect();
                let remaining = store.remaining_many(&ids).await?;
                let rows = promotions.into_iter().zip(remaining).collect();
                Ok::<_, anyhow::Error>(Arc::new(OpenList::new(rows, Utc::now())))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn promotion(id: i64, starts_at: DateTime<Utc>, ends_at: DateTime<Utc>) -> Promotion {
        Promotion {
            id,
            name: format!("p{id}"),
            stock: 10,
            per_user_limit: 1,
            price_cents: 100,
            starts_at,
            ends_at,
            require_token: false,
            require_captcha: false,
            buckets: 1,
        }
    }

    #[test]
    fn cached_bodies_are_served_until_the_next_start_or_end_then_serialized_afresh() {
        let t0 = Utc::now();
        let active = promotion(1, t0 - Duration::minutes(1), t0 + Duration::minutes(10));
        let upcoming = promotion(2, t0 + Duration::seconds(2), t0 + Duration::minutes(5));
        let open = OpenList::new(vec![(active, Some(3)), (upcoming, None)], t0);

        let body = open.list_body(t0 + Duration::seconds(1)).expect("fresh");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["promotions"][0]["status"], "active");
        assert_eq!(v["promotions"][0]["remaining"], 3);
        assert_eq!(v["promotions"][1]["status"], "upcoming");

        // Promotion 2 started: the bodies of the fill no longer hold.
        let later = t0 + Duration::seconds(3);
        assert!(open.list_body(later).is_none());
        let v = OpenList::list_json(&open.listed, later);
        assert_eq!(v["promotions"][1]["status"], "active");
        let two = open.find(2, later).expect("listed");
        let v: serde_json::Value = serde_json::from_slice(&open.body_of(two, later)).unwrap();
        assert_eq!(v["status"], "active");

        // Ended promotions leave the list and are not found.
        let after = t0 + Duration::minutes(6);
        assert!(open.find(2, after).is_none());
        assert_eq!(
            OpenList::list_json(&open.listed, after)["promotions"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }
}
