//! Recovery and reconciliation of Redis's live state against PostgreSQL.
//!
//! [`recover`] rebuilds a promotion's sale state in Redis when Redis lost it
//! (stock = initial − orders + cancelled, buyers and their latest orders from
//! PostgreSQL and from whatever is left in the stream). [`reconcile`] proves
//! the two stores agree. Both run from the CLI; recovery also at start-up,
//! and the background side rebuilds a promotion on sale whose state Redis
//! lost ([`run_periodic`]).
//! [`buckets`] does the same for a promotion split into buckets, one lost
//! bucket at a time, and finishes the transfers a crash left in transit.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use futures_util::TryStreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::orders::repo as orders;
use crate::promotions::{Promotion, repo};
use crate::stock::buckets::bucket_of;
use crate::stock::{Recover, Refill, Store};
use crate::{checkpoint, pace};

pub mod buckets;

/// Rows read from PostgreSQL and written to Redis per step of a rebuild.
const CHUNK: usize = 1000;

/// How long a recovery's lock on a promotion lasts without a write; each
/// chunk it writes extends it. A recovery that stalls longer loses the lock,
/// and its later writes are refused (the lock's token fences them).
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(60);

/// The pause point after a recovery took its lock and read both stores,
/// before it writes (see `checkpoint`).
pub const AFTER_READ: &str = "recovery.after_read";

/// The pause point of a reconcile between its first PostgreSQL read and its
/// Redis snapshot (see `checkpoint`).
pub const RECONCILE_AFTER_POSTGRES: &str = "reconcile.after_postgres";

/// What recovery did for one promotion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub promotion_id: i64,
    /// False when Redis still had the state, or another recovery had it in
    /// hand (nothing was changed).
    pub rebuilt: bool,
    /// Another recovery holds the promotion's lock, or took it over while
    /// this one ran: this one changed nothing.
    pub busy: bool,
    pub remaining: i64,
    pub sold: i64,
    pub returned: i64,
}

/// The promotions to look at: one, or every promotion not yet ended.
async fn targets(db: &PgPool, only: Option<i64>) -> anyhow::Result<Vec<Promotion>> {
    match only {
        Some(id) => {
            Ok(vec![repo::get(db, id).await?.with_context(|| {
                format!("promotion {id} does not exist")
            })?])
        }
        None => repo::list_open(db).await,
    }
}

/// Rebuilds the Redis state of every promotion not yet ended (or of `only`)
/// whose state is missing. Idempotent: a promotion whose state exists is left
/// as it is.
pub async fn recover(
    db: &PgPool,
    store: &Store,
    only: Option<i64>,
) -> anyhow::Result<Vec<Recovered>> {
    let mut out = Vec::new();
    for p in targets(db, only).await? {
        out.push(recover_one(db, store, &p).await?);
    }
    Ok(out)
}

async fn recover_one(db: &PgPool, store: &Store, p: &Promotion) -> anyhow::Result<Recovered> {
    if p.buckets > 1 {
        return buckets::recover(db, store, p).await;
    }
    let live = store
        .counters(p.id)
        .await
        .context("failed to check the promotion's redis state")?;
    let unchanged = |busy| Recovered {
        promotion_id: p.id,
        rebuilt: false,
        busy,
        remaining: live.remaining.unwrap_or(0),
        sold: live.sold,
        returned: live.returned,
    };
    if live.has_meta {
        return Ok(unchanged(false));
    }
    // One recovery per promotion at a time; the token fences its writes.
    let token = uuid::Uuid::new_v4().simple().to_string();
    if !store.lock_recovery(p.id, 0, &token, LOCK_TTL).await? {
        tracing::info!(
            promotion = p.id,
            "another recovery holds the promotion; skipped"
        );
        return Ok(unchanged(true));
    }

    let counted = match rebuild(db, store, p, 0, &token, (0, 0)).await? {
        Some(counted) => counted,
        None => {
            tracing::warn!(
                promotion = p.id,
                "another recovery took the promotion over; this one wrote nothing more"
            );
            return Ok(unchanged(true));
        }
    };
    let (sold, returned) = (counted.sold, counted.returned);
    store.add_live(p.id).await?;
    mark_returned(db, store, p.id, 0).await?;
    let remaining = (p.stock - sold + returned).max(0);
    {
        tracing::warn!(
            promotion = p.id,
            sold,
            returned,
            remaining,
            "rebuilt the promotion's redis state from postgresql"
        );
    }
    Ok(Recovered {
        promotion_id: p.id,
        rebuilt: true,
        busy: false,
        remaining,
        sold,
        returned,
    })
}

/// Records the units of bucket `bucket`'s returned set as back in
/// PostgreSQL.
///
/// The units of the cancelled orders counted are in the rebuilt stock:
/// record them as returned, and only them (an order cancelled since is
/// returned by its own restock, or the sweeper's). The returned set holds
/// exactly those, plus units a restock gave back since (already recorded).
async fn mark_returned(db: &PgPool, store: &Store, id: i64, bucket: u32) -> anyhow::Result<()> {
    let mut cursor = 0;
    loop {
        let (next, ids) = store.returned_page(id, bucket, cursor).await?;
        orders::mark_restocked_all(db, &ids).await?;
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Redis and PostgreSQL side by side for one promotion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    pub promotion_id: i64,
    pub stock: i64,
    /// `None` when Redis has no state for the promotion.
    pub remaining: Option<i64>,
    pub sold: i64,
    pub returned: i64,
    /// Units in transit between the buckets of a bucketed promotion.
    pub in_transit: i64,
    /// Sum of the buyers' counts.
    pub bought_by_buyers: i64,
    /// Accepted orders still in the stream (not acknowledged yet).
    pub unpersisted: i64,
    /// Accepted orders found neither in the stream nor in PostgreSQL.
    pub lost: i64,
    pub persisted: i64,
    pub paid: i64,
    pub cancelled: i64,
    /// Zero when the stores agree; the sum of every mismatch otherwise.
    pub drift: i64,
}

/// Compares Redis and PostgreSQL for every promotion not yet ended (or
/// `only`), during a live sale as well as after it.
///
/// Redis is read in one atomic snapshot (counters, returned and accepted
/// order ids); PostgreSQL before it (orders recorded as returned) and after
/// it (what became of the accepted orders). Each check compares values that
/// only grow between the two reads in the direction that cannot fake a
/// mismatch, so work in flight (an order in the stream, a cancel whose unit
/// is on its way back) is never reported as drift. Checks: remaining + sold −
/// returned + in transit = stock (for a bucketed promotion each bucket is
/// read in one `MULTI` and its own identity holds in it, so the sum is
/// exact however the reads of two buckets interleave with a transfer); the buyers' counts add up to sold; sold = accepted
/// orders; every accepted order is in the stream or in PostgreSQL; the
/// returned counter matches the returned orders, each of them cancelled in
/// PostgreSQL; every order PostgreSQL records as returned is returned in
/// Redis.
///
/// `check_buyers` adds up the buyers hash (`HVALS`), which is O(buyers) in
/// Redis: the CLI does it, the periodic metric does not.
pub async fn reconcile(
    db: &PgPool,
    store: &Store,
    only: Option<i64>,
    check_buyers: bool,
) -> anyhow::Result<Vec<Reconciliation>> {
    let mut out = Vec::new();
    for p in targets(db, only).await? {
        out.push(reconcile_one(db, store, &p, check_buyers).await?);
    }
    for r in &out {
        metrics::gauge!("seckill_reconcile_drift", "promotion" => r.promotion_id.to_string())
            .set(r.drift as f64);
    }
    Ok(out)
}

async fn reconcile_one(
    db: &PgPool,
    store: &Store,
    p: &Promotion,
    check_buyers: bool,
) -> anyhow::Result<Reconciliation> {
    let recorded_returned = orders::restocked(db, p.id).await?;
    checkpoint::point(store.keys().prefix(), RECONCILE_AFTER_POSTGRES).await;
    let snap = store
        .snapshot(p.id, check_buyers)
        .await
        .context("failed to read the promotion's redis state")?;
    let in_stream: HashSet<String> = store
        .stream_orders(p.id)
        .await?
        .into_iter()
        .map(|m| m.order_id)
        .collect();
    // Accepted orders no longer in the stream were acknowledged, so
    // written: PostgreSQL must have each of them.
    let written: Vec<&str> = snap
        .won
        .iter()
        .filter(|o| !in_stream.contains(*o))
        .map(String::as_str)
        .collect();
    let returned_ids: Vec<&str> = snap.returned_ids.iter().map(String::as_str).collect();
    let counts = orders::counts(db, p.id, &written, &returned_ids).await?;
    let unpersisted = (snap.won.len() - written.len()) as i64;
    let lost = written.len() as i64 - counts.of_listed;
    let bought_by_buyers = snap.bought_by_buyers.unwrap_or(snap.sold);
    let (sold, returned) = (snap.sold, snap.returned);
    let stranded = recorded_returned
        .iter()
        .filter(|o| !snap.returned_ids.contains(*o))
        .count() as i64;
    let drift = match snap.remaining {
        None if p.ends_at > Utc::now() => 1 + counts.persisted,
        None => 0,
        Some(left) => {
            (left + sold - returned + snap.in_transit - p.stock).abs()
                + (bought_by_buyers - sold).abs()
                + (sold - snap.won.len() as i64).abs()
                + lost
                + (returned - returned_ids.len() as i64).abs()
                + (returned_ids.len() as i64 - counts.cancelled_of_returned)
                + stranded
        }
    };
    Ok(Reconciliation {
        promotion_id: p.id,
        stock: p.stock,
        remaining: snap.remaining,
        sold,
        returned,
        in_transit: snap.in_transit,
        bought_by_buyers,
        unpersisted,
        lost,
        persisted: counts.persisted,
        paid: counts.paid,
        cancelled: counts.cancelled,
        drift,
    })
}

/// What a rebuild counted.
struct Counted {
    sold: i64,
    returned: i64,
}

/// Writes promotion `p`'s sale state from PostgreSQL and what is left of its
/// stream, for the recovery holding `token`; `None` when it lost the lock
/// (or another recovery finished first) and stopped writing. For a
/// bucketed promotion, the state of bucket `bucket` only: the orders of the
/// buyers who hash to it, and `moved` (its units moved out and in).
///
/// The stream is read first, then PostgreSQL on one snapshot: an entry
/// persisted (and deleted from the stream) in between is found in the
/// snapshot, and one found in both is counted once. PostgreSQL's rows are
/// streamed and written a chunk at a time, so the memory used is bounded by
/// the chunk and the stream's backlog, not by the number of orders.
async fn rebuild(
    db: &PgPool,
    store: &Store,
    p: &Promotion,
    bucket: u32,
    token: &str,
    moved: (i64, i64),
) -> anyhow::Result<Option<Counted>> {
    let n = p.meta().buckets;
    let mine = |user: i64| bucket_of(user, n) == bucket;
    let in_stream = store.bucket_stream_orders(p.id, bucket).await?;
    let mut tx = orders::snapshot(db).await?;
    let ids: Vec<&str> = in_stream.iter().map(|m| m.order_id.as_str()).collect();
    let persisted = orders::existing(&mut tx, &ids).await?;
    checkpoint::point(store.keys().prefix(), AFTER_READ).await;

    // The orders only the stream has, by buyer: (units, latest seq, latest id).
    let mut stream_only: Vec<(String, i64)> = Vec::new();
    let mut extra: HashMap<i64, (i64, i64, String)> = HashMap::new();
    let mut seen_in_stream = HashSet::new();
    for m in &in_stream {
        if persisted.contains(&m.order_id) || !seen_in_stream.insert(m.order_id.as_str()) {
            continue;
        }
        stream_only.push((m.order_id.clone(), m.user_id));
        let e = extra.entry(m.user_id).or_insert((0, 0, String::new()));
        e.0 += 1;
        if m.seq > e.1 {
            (e.1, e.2) = (m.seq, m.order_id.clone());
        }
    }
    let mut sold = stream_only.len() as i64;

    let mut buyers = orders::buyer_totals(&mut tx, p.id).try_chunks(CHUNK);
    while let Some(chunk) = buyers.try_next().await.map_err(|e| e.1)? {
        let mut rows = Vec::with_capacity(chunk.len());
        for b in chunk.into_iter().filter(|b| mine(b.user_id)) {
            sold += b.bought;
            let (mut bought, mut latest) = (b.bought, b.latest);
            if let Some((n, seq, id)) = extra.remove(&b.user_id) {
                bought += n;
                if seq > b.latest_seq {
                    latest = id;
                }
            }
            rows.push((b.user_id, bought, latest));
        }
        if !store
            .refill(p.id, bucket, token, LOCK_TTL, Refill::Buyers(&rows))
            .await?
        {
            return Ok(None);
        }
    }
    drop(buyers);
    let rest: Vec<(i64, i64, String)> = extra
        .into_iter()
        .map(|(u, (n, _, id))| (u, n, id))
        .collect();
    for chunk in rest.chunks(CHUNK) {
        if !store
            .refill(p.id, bucket, token, LOCK_TTL, Refill::Buyers(chunk))
            .await?
        {
            return Ok(None);
        }
    }

    for chunk in stream_only.chunks(CHUNK) {
        if !store
            .refill(p.id, bucket, token, LOCK_TTL, Refill::Won(chunk))
            .await?
        {
            return Ok(None);
        }
    }
    let mut owners = orders::order_owners(&mut tx, p.id).try_chunks(CHUNK);
    while let Some(chunk) = owners.try_next().await.map_err(|e| e.1)? {
        let chunk: Vec<(String, i64)> = chunk.into_iter().filter(|(_, u)| mine(*u)).collect();
        if !store
            .refill(p.id, bucket, token, LOCK_TTL, Refill::Won(&chunk))
            .await?
        {
            return Ok(None);
        }
    }
    drop(owners);

    let mut returned = 0;
    let mut cancelled = orders::cancelled_owners(&mut tx, p.id).try_chunks(CHUNK);
    while let Some(chunk) = cancelled.try_next().await.map_err(|e| e.1)? {
        let chunk: Vec<String> = chunk
            .into_iter()
            .filter(|(_, u)| mine(*u))
            .map(|(o, _)| o)
            .collect();
        returned += chunk.len() as i64;
        if !store
            .refill(p.id, bucket, token, LOCK_TTL, Refill::Returned(&chunk))
            .await?
        {
            return Ok(None);
        }
    }
    drop(cancelled);
    tx.rollback().await.context("failed to end the snapshot")?;

    match store
        .recover(&p.meta(), bucket, sold, returned, token, moved)
        .await?
    {
        Recover::Rebuilt => Ok(Some(Counted { sold, returned })),
        Recover::StateExisted | Recover::LockLost => Ok(None),
    }
}

/// The reconcile table, one promotion per line.
pub fn table(rows: &[Reconciliation]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>6}",
        "promotion",
        "stock",
        "remaining",
        "sold",
        "returned",
        "in_stream",
        "persisted",
        "pending",
        "paid",
        "cancelled",
        "in_transit",
        "drift"
    );
    for r in rows {
        let remaining = r.remaining.map_or("missing".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "{:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>6}",
            r.promotion_id,
            r.stock,
            remaining,
            r.sold,
            r.returned,
            r.unpersisted,
            r.persisted,
            r.persisted - r.paid - r.cancelled,
            r.paid,
            r.cancelled,
            r.in_transit,
            r.drift
        );
    }
    s
}

/// Until `shutdown`: rebuilds every `recover_every` the promotions on sale
/// whose Redis state is lost ([`recover_on_sale`]), and reconciles every
/// `reconcile_every`, keeping the `seckill_reconcile_drift` gauge current.
pub async fn run_periodic(
    db: PgPool,
    store: Store,
    reconcile_every: Duration,
    recover_every: Duration,
    shutdown: CancellationToken,
) {
    let mut reconciled = Instant::now();
    let mut recovered = Instant::now();
    let mut in_transit = HashMap::new();
    while pace::sleep(recover_every.min(reconcile_every), &shutdown).await {
        if recovered.elapsed() >= recover_every {
            recovered = Instant::now();
            if let Err(e) = recover_on_sale(&db, &store, &mut in_transit).await {
                tracing::warn!(error = %format!("{e:#}"), "looking for lost promotions failed");
            }
        }
        if reconciled.elapsed() >= reconcile_every {
            reconciled = Instant::now();
            if let Err(e) = reconcile(&db, &store, None, false).await {
                tracing::warn!(error = %format!("{e:#}"), "periodic reconcile failed");
            }
        }
    }
}

/// Rebuilds the Redis state of every promotion on sale (its window open)
/// that Redis lost: after a failover to a replica that missed it, or a
/// restart without persistence, the sale goes on within
/// `SECKILL_RECOVER_INTERVAL_MS` instead of answering `503` until someone runs `seckill recover`. A
/// promotion not started yet is left to start-up and `seckill recover`:
/// only a promotion on sale cannot be deleted meanwhile (the admin API
/// refuses), so a rebuild never brings back a deleted one.
///
/// It also finishes the transfers of a bucketed promotion that stay in
/// transit: units in transit at two looks in a row (`in_transit`, the units
/// each promotion had in transit at the previous look) belong to a gateway
/// that died between the steps, or whose first step the replicas did not
/// acknowledge in time; until finished they are on sale nowhere.
pub async fn recover_on_sale(
    db: &PgPool,
    store: &Store,
    in_transit: &mut HashMap<i64, i64>,
) -> anyhow::Result<Vec<Recovered>> {
    let now = Utc::now();
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for p in repo::list_open(db).await? {
        if !p.is_active(now) {
            continue;
        }
        // The common case, in one round trip per bucket: nothing lost.
        let live = store
            .counters(p.id)
            .await
            .context("failed to check the promotion's redis state")?;
        if live.has_meta {
            if live.in_transit > 0 {
                if in_transit.get(&p.id).is_some_and(|before| *before > 0) {
                    let finished = buckets::finish_transits(store, p.id, p.meta().buckets).await?;
                    tracing::warn!(
                        promotion = p.id,
                        finished,
                        "finished transfers left in transit"
                    );
                }
                seen.insert(p.id, live.in_transit);
            }
            continue;
        }
        let r = recover_one(db, store, &p).await?;
        if r.rebuilt {
            tracing::warn!(
                promotion = p.id,
                remaining = r.remaining,
                sold = r.sold,
                "rebuilt the redis state of a promotion on sale that redis had lost"
            );
        }
        out.push(r);
    }
    *in_transit = seen;
    Ok(out)
}
