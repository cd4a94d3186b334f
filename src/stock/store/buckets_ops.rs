//! The commands of a promotion split into buckets (see `stock::buckets`):
//! the buckets' levels, the three transfer scripts and their records, and
//! what recovery of a lost bucket reads and writes. Part of the store: like
//! the rest of it, every command here touches the keys of one bucket (one
//! hash tag), never two.

use std::collections::BTreeMap;

use redis::{AsyncCommands, RedisResult};

use super::super::keys::PromotionKeys;
use super::super::lua::{Name, codes, script};
use super::super::message::OrderMessage;
use super::{CHUNK, Store, unexpected};

/// What `lua/transfer_out.lua` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferOut {
    /// This many units left the source and are in transit.
    Taken(i64),
    /// The source had nothing on sale (or no state): nothing moved.
    Empty,
}

/// A transfer the source bucket records as in transit (state 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transit {
    pub id: String,
    pub from: u32,
    pub to: u32,
    pub units: i64,
}

/// Finished transfers of one bucket as the other buckets record them:
/// (transfer id, the other bucket, units).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenTransfers {
    /// Out of the bucket (received by the other).
    pub out: Vec<(String, u32, i64)>,
    /// Into the bucket (sent by the other, marked done).
    pub into: Vec<(String, u32, i64)>,
}

impl SeenTransfers {
    /// (moved_out, moved_in).
    pub fn moved(&self) -> (i64, i64) {
        (
            self.out.iter().map(|t| t.2).sum(),
            self.into.iter().map(|t| t.2).sum(),
        )
    }
}

/// One bucket's levels, read atomically (see [`Store::bucket_levels`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Levels {
    /// Units on sale; `None` when the bucket has no stock key.
    pub stock: Option<i64>,
    pub returned: i64,
    pub moved_out: i64,
    pub moved_in: i64,
}

/// A transfer record: `units:other` or `units:other:state`.
fn parse_record(record: &str) -> RedisResult<(i64, u32, Option<&str>)> {
    let malformed = || unexpected("a malformed transfer record", record);
    let mut parts = record.split(':');
    let units = parts.next().and_then(|v| v.parse().ok());
    let other = parts.next().and_then(|v| v.parse().ok());
    let state = parts.next();
    match (units, other, parts.next()) {
        (Some(u), Some(o), None) => Ok((u, o, state)),
        _ => Err(malformed()),
    }
}

impl Store {
    /// The units on sale in each of `n` buckets of promotion `id` (0 for a
    /// bucket without a stock key), one `GET` per bucket: no command spans
    /// two hash tags.
    pub async fn bucket_stocks(&self, id: i64, n: u32) -> RedisResult<Vec<i64>> {
        let mut conn = self.conn();
        let mut out = Vec::with_capacity(n as usize);
        for bucket in 0..n {
            let stock: Option<i64> = conn.get(self.keys.bucket(id, bucket).stock).await?;
            out.push(stock.unwrap_or(0));
        }
        Ok(out)
    }

    /// Bucket `bucket`'s stock, `returned` and transfer counters, read in
    /// one `MULTI` (one hash tag).
    pub async fn bucket_levels(&self, id: i64, bucket: u32) -> RedisResult<Levels> {
        let k = self.keys.bucket(id, bucket);
        let (stock, fields): (Option<i64>, Vec<Option<i64>>) = redis::pipe()
            .atomic()
            .get(&k.stock)
            .hmget(&k.meta, &["returned", "moved_out", "moved_in"])
            .query_async(&mut self.conn())
            .await?;
        let field = |i: usize| fields.get(i).copied().flatten().unwrap_or(0);
        Ok(Levels {
            stock,
            returned: field(0),
            moved_out: field(1),
            moved_in: field(2),
        })
    }

    /// Whether bucket `bucket` of promotion `id` has its meta hash loaded
    /// (with `starts_ms`, as preheat and recovery write it).
    pub async fn bucket_has_meta(&self, id: i64, bucket: u32) -> RedisResult<bool> {
        self.conn()
            .hexists(self.keys.bucket(id, bucket).meta, "starts_ms")
            .await
    }

    /// The order messages still in bucket `bucket`'s stream.
    pub async fn bucket_stream_orders(
        &self,
        id: i64,
        bucket: u32,
    ) -> anyhow::Result<Vec<OrderMessage>> {
        self.one_stream_orders(&self.keys.bucket(id, bucket).orders)
            .await
    }

    /// Runs `lua/transfer_out.lua`: takes up to `units` from bucket `from`
    /// for bucket `to` under `transfer_id`.
    ///
    /// With replicas to wait for (`SECKILL_REDIS_WAIT_REPLICAS`), the units
    /// taken are on the source's replicas before this returns, or it fails
    /// and they stay in transit (recorded, not on sale; recovery finishes
    /// the transfer). Else a failover of the source could bring the units
    /// back on sale there after the destination added them: sold twice.
    pub async fn transfer_out(
        &self,
        id: i64,
        from: u32,
        to: u32,
        transfer_id: &str,
        units: i64,
    ) -> RedisResult<TransferOut> {
        let k = self.keys.bucket(id, from);
        let code = self
            .transfer_step(Name::TransferOut, &k, &k.transfers, transfer_id, units, to)
            .await?;
        match code {
            n if n > 0 => {
                if let Some(wait) = self.wait {
                    self.wait_for_replicas(&k.meta, wait).await?;
                }
                Ok(TransferOut::Taken(n))
            }
            codes::transfer_out::EMPTY | codes::transfer_out::NO_STATE => Ok(TransferOut::Empty),
            other => Err(unexpected(
                "transfer_out.lua returned an unknown code",
                other,
            )),
        }
    }

    /// Runs `lua/transfer_in.lua`: adds transfer `transfer_id`'s `units` to
    /// bucket `to`, once. False when that bucket has no state.
    pub async fn transfer_in(
        &self,
        id: i64,
        from: u32,
        to: u32,
        transfer_id: &str,
        units: i64,
    ) -> RedisResult<bool> {
        let k = self.keys.bucket(id, to);
        let code = self
            .transfer_step(Name::TransferIn, &k, &k.received, transfer_id, units, from)
            .await?;
        match code {
            codes::transfer_in::ADDED | codes::transfer_in::ALREADY_RECEIVED => Ok(true),
            codes::transfer_in::NO_STATE => Ok(false),
            other => Err(unexpected(
                "transfer_in.lua returned an unknown code",
                other,
            )),
        }
    }

    /// Runs step `name` of a transfer on bucket `k` (transfer_out.lua on the
    /// source, transfer_in.lua on the destination: the same keys and
    /// arguments): KEYS meta, stock, `record` (the bucket's transfers or
    /// received hash); ARGV the transfer id, the units, the other bucket.
    async fn transfer_step(
        &self,
        name: Name,
        k: &PromotionKeys,
        record: &str,
        transfer_id: &str,
        units: i64,
        other: u32,
    ) -> RedisResult<i64> {
        script(name)
            .key(&k.meta)
            .key(&k.stock)
            .key(record)
            .arg(transfer_id)
            .arg(units)
            .arg(other)
            .invoke_async(&mut self.conn())
            .await
    }

    /// Runs `lua/transfer_done.lua`: marks transfer `transfer_id` done in
    /// bucket `from`'s records.
    pub async fn transfer_done(&self, id: i64, from: u32, transfer_id: &str) -> RedisResult<()> {
        let code: i64 = script(Name::TransferDone)
            .key(self.keys.bucket(id, from).transfers)
            .arg(transfer_id)
            .invoke_async(&mut self.conn())
            .await?;
        match code {
            codes::transfer_done::DONE
            | codes::transfer_done::ALREADY_DONE
            | codes::transfer_done::NO_RECORD => Ok(()),
            other => Err(unexpected(
                "transfer_done.lua returned an unknown code",
                other,
            )),
        }
    }

    /// The transfers bucket `from` records as in transit (state 0).
    pub async fn transits(&self, id: i64, from: u32) -> RedisResult<Vec<Transit>> {
        let records: BTreeMap<String, String> = self
            .conn()
            .hgetall(self.keys.bucket(id, from).transfers)
            .await?;
        let mut out = Vec::new();
        for (tid, record) in records {
            let (units, to, state) = parse_record(&record)?;
            if state == Some("0") {
                out.push(Transit {
                    id: tid,
                    from,
                    to,
                    units,
                });
            }
        }
        Ok(out)
    }

    /// What the other buckets of promotion `id` (of `n`) record about
    /// bucket `bucket`'s transfers: the ones they received from it (moved
    /// out of it) and the ones they sent it and marked done (moved into
    /// it). A bucket rebuilt from PostgreSQL counts them, and writes its own
    /// side of their records back ([`Store::restore_transfers`]).
    pub async fn transfers_seen_by_others(
        &self,
        id: i64,
        n: u32,
        bucket: u32,
    ) -> RedisResult<SeenTransfers> {
        let mut seen = SeenTransfers::default();
        for other in (0..n).filter(|b| *b != bucket) {
            let k = self.keys.bucket(id, other);
            let received: BTreeMap<String, String> = self.conn().hgetall(&k.received).await?;
            for (tid, r) in received {
                let (units, source, _) = parse_record(&r)?;
                if source == bucket {
                    seen.out.push((tid, other, units));
                }
            }
            let sent: BTreeMap<String, String> = self.conn().hgetall(&k.transfers).await?;
            for (tid, r) in sent {
                let (units, to, state) = parse_record(&r)?;
                if state == Some("1") && to == bucket {
                    seen.into.push((tid, other, units));
                }
            }
        }
        Ok(seen)
    }

    /// Writes bucket `bucket`'s side of finished transfers: `out` into its
    /// `transfers` hash (done), `into` into its `received` hash. For a
    /// recovery rebuilding the bucket, before its meta exists (no script
    /// runs on a bucket without meta).
    pub async fn restore_transfers(
        &self,
        id: i64,
        bucket: u32,
        seen: &SeenTransfers,
    ) -> RedisResult<()> {
        let k = self.keys.bucket(id, bucket);
        let mut conn = self.conn();
        for chunk in seen.out.chunks(CHUNK) {
            let pairs: Vec<(String, String)> = chunk
                .iter()
                .map(|(tid, to, units)| (tid.clone(), format!("{units}:{to}:1")))
                .collect();
            let _: () = conn.hset_multiple(&k.transfers, &pairs).await?;
        }
        for chunk in seen.into.chunks(CHUNK) {
            let pairs: Vec<(String, String)> = chunk
                .iter()
                .map(|(tid, from, units)| (tid.clone(), format!("{units}:{from}")))
                .collect();
            let _: () = conn.hset_multiple(&k.received, &pairs).await?;
        }
        Ok(())
    }

    /// Runs `lua/release_lock.lua`: releases bucket `bucket`'s recovery
    /// lock if `token` still holds it.
    pub async fn release_recovery(&self, id: i64, bucket: u32, token: &str) -> RedisResult<()> {
        let code: i64 = script(Name::ReleaseLock)
            .key(self.keys.bucket(id, bucket).recovering)
            .arg(token)
            .invoke_async(&mut self.conn())
            .await?;
        match code {
            codes::release_lock::RELEASED | codes::release_lock::NOT_HELD => Ok(()),
            other => Err(unexpected(
                "release_lock.lua returned an unknown code",
                other,
            )),
        }
    }
}
