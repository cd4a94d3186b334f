//! Recovery of a promotion split into buckets (see `stock::buckets`).
//!
//! Each bucket is one hash tag, so Redis can lose one bucket's keys and keep
//! the others (a failed cluster primary, a flushed slot). [`recover`] rebuilds
//! every bucket whose meta is missing from PostgreSQL, like a promotion of
//! one bucket but with only the orders of the buyers who hash to it, and
//! finishes every transfer found in transit.
//!
//! The units a transfer moved are counted from the records that survive: a
//! bucket's units moved out are those other buckets recorded as received from
//! it, its units moved in those other buckets recorded as sent to it and
//! done. A transfer in transit out of a lost bucket is forgotten with it (the
//! units were never added elsewhere, so the rebuilt bucket keeps them); one
//! in transit into a lost bucket is finished after the rebuild. When several
//! buckets are lost together, the transfers between them are lost with them:
//! their sum is still right, and the units are spread again among them so no
//! bucket's stock goes below zero (recorded as moved out of and into them).

use anyhow::Context;
use sqlx::PgPool;

use super::{LOCK_TTL, Recovered, mark_returned, rebuild};
use crate::orders::repo as orders;
use crate::promotions::Promotion;
use crate::stock::Store;
use crate::stock::buckets::{self, bucket_of, share};

/// Rebuilds every lost bucket of `p` (`p.buckets` > 1) and finishes the
/// transfers in transit. Idempotent: with every bucket present, only the
/// transfers are finished.
pub async fn recover(db: &PgPool, store: &Store, p: &Promotion) -> anyhow::Result<Recovered> {
    let n = p.meta().buckets;
    let mut lost = Vec::new();
    for bucket in 0..n {
        if !store.bucket_has_meta(p.id, bucket).await? {
            lost.push(bucket);
        }
    }
    if lost.is_empty() {
        finish_transits(store, p.id, n).await?;
        return unchanged(store, p, false).await;
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut held = Vec::new();
    for bucket in &lost {
        if !store.lock_recovery(p.id, *bucket, &token, LOCK_TTL).await? {
            release(store, p.id, &held, &token).await;
            tracing::info!(
                promotion = p.id,
                bucket,
                "another recovery holds a bucket of the promotion; skipped"
            );
            return unchanged(store, p, true).await;
        }
        held.push(*bucket);
    }
    let result = rebuild_lost(db, store, p, &lost, &token).await;
    // Whatever happened, the locks still held go (a rebuilt bucket's went
    // with its recover.lua call): the next recovery need not wait them out.
    release(store, p.id, &held, &token).await;
    if !result? {
        tracing::warn!(
            promotion = p.id,
            "another recovery took a bucket over; this one wrote nothing more"
        );
        return unchanged(store, p, true).await;
    }
    store.add_live(p.id).await?;
    finish_transits(store, p.id, n).await?;
    let live = store.counters(p.id).await?;
    tracing::warn!(
        promotion = p.id,
        buckets = ?lost,
        sold = live.sold,
        returned = live.returned,
        remaining = live.remaining.unwrap_or(0),
        "rebuilt the lost buckets of the promotion from postgresql"
    );
    Ok(Recovered {
        promotion_id: p.id,
        rebuilt: true,
        busy: false,
        remaining: live.remaining.unwrap_or(0),
        sold: live.sold,
        returned: live.returned,
    })
}

async fn unchanged(store: &Store, p: &Promotion, busy: bool) -> anyhow::Result<Recovered> {
    let live = store
        .counters(p.id)
        .await
        .context("failed to check the promotion's redis state")?;
    Ok(Recovered {
        promotion_id: p.id,
        rebuilt: false,
        busy,
        remaining: live.remaining.unwrap_or(0),
        sold: live.sold,
        returned: live.returned,
    })
}

async fn release(store: &Store, id: i64, buckets: &[u32], token: &str) {
    for bucket in buckets {
        if let Err(e) = store.release_recovery(id, *bucket, token).await {
            tracing::warn!(promotion = id, bucket, error = %e, "failed to release a recovery lock; it lapses with its TTL");
        }
    }
}

/// Rebuilds the `lost` buckets; false when a lock was lost on the way.
async fn rebuild_lost(
    db: &PgPool,
    store: &Store,
    p: &Promotion,
    lost: &[u32],
    token: &str,
) -> anyhow::Result<bool> {
    let n = p.meta().buckets;
    // What PostgreSQL and the lost buckets' streams hold, per bucket: the
    // counts the rebuild will find (no order can be added to a bucket
    // without meta, and an order moving from the stream to PostgreSQL is
    // counted once either way).
    let mut sold = vec![0i64; n as usize];
    let mut returned = vec![0i64; n as usize];
    let mut tx = orders::snapshot(db).await?;
    for (user, bought, cancelled) in orders::buyer_counts(&mut tx, p.id).await? {
        let b = bucket_of(user, n) as usize;
        sold[b] += bought;
        returned[b] += cancelled;
    }
    for bucket in lost {
        let in_stream = store.bucket_stream_orders(p.id, *bucket).await?;
        let ids: Vec<&str> = in_stream.iter().map(|m| m.order_id.as_str()).collect();
        let persisted = orders::existing(&mut tx, &ids).await?;
        sold[*bucket as usize] += ids.iter().filter(|o| !persisted.contains(**o)).count() as i64;
    }
    tx.rollback().await.context("failed to end the snapshot")?;

    let mut seen = Vec::with_capacity(lost.len());
    for bucket in lost {
        seen.push(store.transfers_seen_by_others(p.id, n, *bucket).await?);
    }
    let raw: Vec<i64> = lost
        .iter()
        .zip(&seen)
        .map(|(b, seen)| {
            let (out, into) = seen.moved();
            share(p.stock, n, *b) - sold[*b as usize] + returned[*b as usize] - out + into
        })
        .collect();
    for (i, j, units) in spread(&raw) {
        // Recorded as a finished transfer on both sides, so a later rebuild
        // of either bucket counts it like any other.
        let tid = format!("recovery-{}", uuid::Uuid::now_v7().simple());
        seen[i].out.push((tid.clone(), lost[j], units));
        seen[j].into.push((tid, lost[i], units));
    }
    for (bucket, seen) in lost.iter().zip(&seen) {
        store.restore_transfers(p.id, *bucket, seen).await?;
    }
    for (bucket, seen) in lost.iter().zip(&seen) {
        if rebuild(db, store, p, *bucket, token, seen.moved())
            .await?
            .is_none()
        {
            return Ok(false);
        }
        mark_returned(db, store, p.id, *bucket).await?;
    }
    Ok(true)
}

/// Evens out the lost buckets whose counted stock `raw` is negative (the
/// records of transfers between lost buckets went with them): units are
/// moved from the lost buckets with some, so every bucket's stock is at
/// least zero and their sum is unchanged. Returns the moves as (from index,
/// to index, units).
pub fn spread(raw: &[i64]) -> Vec<(usize, usize, i64)> {
    let mut left = raw.to_vec();
    let mut moves = Vec::new();
    for i in 0..left.len() {
        for j in 0..left.len() {
            if left[i] >= 0 {
                break;
            }
            if left[j] <= 0 {
                continue;
            }
            let units = left[j].min(-left[i]);
            left[j] -= units;
            left[i] += units;
            moves.push((j, i, units));
        }
    }
    if left.iter().any(|l| *l < 0) {
        tracing::error!(
            ?raw,
            "the lost buckets count fewer units than they sold; their stock is set to zero"
        );
    }
    moves
}

/// Finishes every transfer a bucket of promotion `id` records as in
/// transit: replays its first step (with replicas to wait for, the step is
/// then on the source's replicas: see `Store::transfer_out`), adds the units
/// to the destination (once, by transfer id) and marks it done. A transfer
/// whose step the replicas did not acknowledge in time stays in transit,
/// for a later pass; a destination without state is left for the recovery
/// that rebuilds it. Returns how many were finished.
pub async fn finish_transits(store: &Store, id: i64, n: u32) -> anyhow::Result<usize> {
    let mut finished = 0;
    for from in 0..n {
        for t in store.transits(id, from).await? {
            if let Err(e) = store.transfer_out(id, t.from, t.to, &t.id, t.units).await {
                tracing::warn!(promotion = id, transfer = %t.id, error = %e, "a transfer in transit is not on the replicas yet; left for a later pass");
                continue;
            }
            if buckets::finish(store, id, t.from, t.to, &t.id, t.units).await? {
                finished += 1;
                tracing::info!(
                    promotion = id,
                    from = t.from,
                    to = t.to,
                    units = t.units,
                    transfer = %t.id,
                    "finished a transfer left in transit"
                );
            }
        }
    }
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_lifts_every_bucket_to_zero_and_keeps_the_sum() {
        let raw = [-5, 3, 4, 0];
        let mut after = raw.to_vec();
        for (from, to, units) in spread(&raw) {
            after[from] -= units;
            after[to] += units;
        }
        assert!(after.iter().all(|a| *a >= 0), "{after:?}");
        assert_eq!(after.iter().sum::<i64>(), raw.iter().sum::<i64>());
    }
}
