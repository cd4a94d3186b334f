//! Buckets of a hot promotion: which bucket a buyer goes to, how the stock
//! is split, and the transfer policy that moves units to a dry bucket.
//!
//! A promotion with `buckets: N` keeps its sale state under N hash tags (see
//! [`super::keys::Keys::bucket`]), so that each can live on another Redis
//! Cluster primary. A buyer always goes to bucket [`bucket_of`]`(user, N)`,
//! so the per-user limit stays one atomic script in one bucket. When the
//! buyer's bucket has run dry and another has units, the gateway moves units
//! over by a transfer in three recorded, idempotent steps
//! (`lua/transfer_out.lua`, `lua/transfer_in.lua`, `lua/transfer_done.lua`);
//! recovery finishes a transfer a crash left between its steps. The protocol
//! and its crash cases are in `docs/decisions.md`.

use redis::RedisResult;

use super::store::{Levels, Store, TransferOut};
use crate::checkpoint;

/// Most buckets a promotion may have (API.md).
pub const MAX_BUCKETS: u32 = 64;

/// murmur3's 64-bit finalizer: every bit of the input moves every bit of
/// the output, so consecutive user ids spread evenly over the buckets.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The bucket of `user_id` in a promotion of `buckets` buckets (0 when the
/// promotion is not split).
pub fn bucket_of(user_id: i64, buckets: u32) -> u32 {
    if buckets <= 1 {
        return 0;
    }
    (fmix64(user_id as u64) % u64::from(buckets)) as u32
}

/// The initial stock of bucket `bucket`: `stock` split as evenly as
/// possible, the first `stock % buckets` buckets holding one unit more.
pub fn share(stock: i64, buckets: u32, bucket: u32) -> i64 {
    let n = i64::from(buckets.max(1));
    stock / n + i64::from(i64::from(bucket) < stock % n)
}

/// How many units to ask a bucket that has `available` for, when `wanted`
/// buyers wait: at least what they need, and half of what the source has,
/// so a bucket that every buyer hashes to empties the others in a few
/// transfers rather than one per buyer, while a source keeps half for its
/// own buyers.
pub fn units_to_take(available: i64, wanted: usize) -> i64 {
    let half = (available + 1) / 2;
    half.max(wanted as i64).min(available).max(0)
}

/// Moves units into bucket `to` of promotion `id` (of `buckets` buckets)
/// from the others, for `wanted` buyers waiting there: asks each other
/// bucket in turn, starting after `to`, until units came. Returns the units
/// now in `to`'s stock, moved or arrived meanwhile (0: the promotion has no
/// unit left outside `to`, on sale or on its way).
///
/// Other gateways move units at the same time, so one read of the levels
/// is not the last word: a source may be emptied between the read and the
/// take, and its units land in a bucket read as dry a moment before. When a
/// look finds nothing to take, the levels are read again, for as long as
/// some other bucket has stock or units are in transit (at most
/// [`MAX_LOOKS`] looks); only then are the buyers told it is sold out.
pub async fn refill(
    store: &Store,
    id: i64,
    buckets: u32,
    to: u32,
    wanted: usize,
) -> RedisResult<i64> {
    if buckets <= 1 {
        return Ok(0);
    }
    for _ in 0..MAX_LOOKS {
        let stocks = store.bucket_stocks(id, buckets).await?;
        if stocks[to as usize] > 0 {
            // Units came in meanwhile (another gateway's transfer, a
            // return): the buyers try those.
            return Ok(stocks[to as usize]);
        }
        let mut saw_stock = false;
        for step in 1..buckets {
            let from = (to + step) % buckets;
            let available = stocks[from as usize];
            if available <= 0 {
                continue;
            }
            saw_stock = true;
            let units = units_to_take(available, wanted);
            let moved = transfer(store, id, from, to, units).await?;
            if moved > 0 {
                return Ok(moved);
            }
        }
        if !saw_stock && in_transit(store, id, buckets).await? == 0 {
            return Ok(0);
        }
        // A source emptied under us, or units are on their way between two
        // other buckets: look again once they have landed.
        checkpoint::point(store.keys().prefix(), REFILL_LOOKS_AGAIN).await;
        tokio::time::sleep(LOOK_AGAIN_AFTER).await;
    }
    Ok(0)
}

/// Most reads of the levels one [`refill`] makes.
pub const MAX_LOOKS: usize = 20;

/// The wait before [`refill`] looks again: a transfer in flight takes two
/// more script calls to land.
const LOOK_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_millis(2);

/// The pause point where [`refill`] found nothing to take but units on their
/// way between other buckets (see `checkpoint`); reached only then.
pub const REFILL_LOOKS_AGAIN: &str = "buckets.refill_looks_again";

/// Units of promotion `id` taken out of a bucket by a transfer and not yet
/// added to another.
async fn in_transit(store: &Store, id: i64, buckets: u32) -> RedisResult<i64> {
    let mut sum = 0;
    for bucket in 0..buckets {
        let l = store.bucket_levels(id, bucket).await?;
        sum += l.moved_out - l.moved_in;
    }
    Ok(sum)
}

/// One transfer of up to `units` from bucket `from` to bucket `to`, all
/// three steps; returns the units moved (0 when the source had none).
pub async fn transfer(store: &Store, id: i64, from: u32, to: u32, units: i64) -> RedisResult<i64> {
    let transfer_id = uuid::Uuid::now_v7().simple().to_string();
    let moved = match store
        .transfer_out(id, from, to, &transfer_id, units)
        .await?
    {
        TransferOut::Taken(n) => n,
        TransferOut::Empty => return Ok(0),
    };
    finish(store, id, from, to, &transfer_id, moved).await?;
    Ok(moved)
}

/// Steps 2 and 3 of transfer `transfer_id` (`moved` units from `from` to
/// `to`): adds the units to the destination once, then clears the source's
/// record. Idempotent: recovery calls it for a transfer found in transit.
/// Returns false when the destination has no state (nothing changed; the
/// transfer stays in transit for recovery).
pub async fn finish(
    store: &Store,
    id: i64,
    from: u32,
    to: u32,
    transfer_id: &str,
    moved: i64,
) -> RedisResult<bool> {
    if !store.transfer_in(id, from, to, transfer_id, moved).await? {
        return Ok(false);
    }
    store.transfer_done(id, from, transfer_id).await?;
    Ok(true)
}

/// Whether promotion `id` (of `buckets` buckets) has no unit left
/// anywhere: every bucket's stock is 0 and no unit is in transit. Each
/// bucket is read atomically, but the buckets one after another, so a unit
/// could move from a bucket not yet read into one already read and be
/// missed; the whole read is therefore made twice, and the promotion is dry
/// only when both agree on every bucket. A unit enters a bucket only by a
/// transfer (`moved_in`) or a return (`returned`), which the second read
/// would see.
pub async fn is_dry(store: &Store, id: i64, buckets: u32) -> RedisResult<bool> {
    let read = || async move {
        let mut levels = Vec::with_capacity(buckets as usize);
        for bucket in 0..buckets {
            levels.push(store.bucket_levels(id, bucket).await?);
        }
        RedisResult::Ok(levels)
    };
    let dry = |levels: &[Levels]| {
        levels.iter().all(|l| l.stock.unwrap_or(0) <= 0)
            && levels.iter().map(|l| l.moved_out - l.moved_in).sum::<i64>() == 0
    };
    let first = read().await?;
    if !dry(&first) {
        return Ok(false);
    }
    Ok(read().await? == first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_to_the_stock_and_differ_by_at_most_one() {
        for stock in [1, 2, 7, 64, 65, 1000, 1001] {
            for n in [1, 2, 3, 4, 7, 64] {
                let shares: Vec<i64> = (0..n).map(|b| share(stock, n, b)).collect();
                assert_eq!(shares.iter().sum::<i64>(), stock, "{stock} over {n}");
                let (lo, hi) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(hi - lo <= 1, "{stock} over {n}: {shares:?}");
            }
        }
    }

    #[test]
    fn one_bucket_takes_every_buyer_and_many_spread_them() {
        assert!((0..1000).all(|u| bucket_of(u, 1) == 0));
        let mut counts = [0u32; 4];
        for u in 0..4000 {
            counts[bucket_of(u, 4) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn a_transfer_asks_for_half_the_source_at_least_what_is_wanted() {
        assert_eq!(units_to_take(10, 1), 5);
        assert_eq!(units_to_take(10, 7), 7);
        assert_eq!(units_to_take(3, 10), 3);
        assert_eq!(units_to_take(1, 1), 1);
        assert_eq!(units_to_take(0, 1), 0);
    }
}
