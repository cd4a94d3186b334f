//! Recovery and reconciliation of Redis's live state against PostgreSQL.
//!
//! [`recover`] rebuilds a promotion's sale state in Redis when Redis lost it
//! (stock = initial − orders + cancelled, buyers and their latest orders from
//! PostgreSQL and from whatever is left in the stream). [`reconcile`] proves
//! the two stores agree. Both run from the CLI; recovery also at start-up.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use anyhow::Context;
use chrono::Utc;
use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;
use sqlx::PgPool;

use crate::orders::OrderMessage;
use crate::promotions::{Promotion, repo};
use crate::stock::{Keys, scripts};

/// Members written per Redis command while refilling a hash or set.
const CHUNK: usize = 1000;

/// What recovery did for one promotion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    pub promotion_id: i64,
    /// False when Redis still had the state (nothing was changed).
    pub rebuilt: bool,
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
    redis: &ConnectionManager,
    keys: &Keys,
    only: Option<i64>,
) -> anyhow::Result<Vec<Recovered>> {
    let mut out = Vec::new();
    for p in targets(db, only).await? {
        out.push(recover_one(db, redis, keys, &p).await?);
    }
    Ok(out)
}

#[derive(sqlx::FromRow)]
struct StoredOrder {
    order_id: String,
    user_id: i64,
    seq: i64,
    status: String,
}

async fn recover_one(
    db: &PgPool,
    redis: &ConnectionManager,
    keys: &Keys,
    p: &Promotion,
) -> anyhow::Result<Recovered> {
    let mut conn = redis.clone();
    let k = keys.promotion(p.id);
    let live = scripts::counters(&mut conn, keys, p.id).await?;
    let has_meta: bool = redis::cmd("EXISTS")
        .arg(&k.meta)
        .query_async(&mut conn)
        .await
        .context("failed to check the promotion's redis state")?;
    if has_meta {
        let returned: i64 = redis::cmd("HGET")
            .arg(&k.meta)
            .arg("returned")
            .query_async::<Option<i64>>(&mut conn)
            .await?
            .unwrap_or(0);
        return Ok(Recovered {
            promotion_id: p.id,
            rebuilt: false,
            remaining: live.remaining.unwrap_or(0),
            sold: live.sold,
            returned,
        });
    }

    // The stream first, then PostgreSQL: an entry persisted (and deleted
    // from the stream) in between is then seen in PostgreSQL, and one seen
    // in both is counted once.
    let in_stream = stream_orders(&mut conn, &k.orders).await?;
    let stored: Vec<StoredOrder> =
        sqlx::query_as("SELECT order_id, user_id, seq, status FROM orders WHERE promotion_id = $1")
            .bind(p.id)
            .fetch_all(db)
            .await
            .context("failed to read the promotion's orders")?;

    let mut seen: HashSet<String> = HashSet::new();
    // user → (units bought, latest order id and its seq)
    let mut buyers: HashMap<i64, (i64, i64, String)> = HashMap::new();
    let mut returned_ids = Vec::new();
    let mut count = |user_id: i64, seq: i64, order_id: &str| {
        let entry = buyers.entry(user_id).or_insert((0, 0, String::new()));
        entry.0 += 1;
        if seq > entry.1 {
            entry.1 = seq;
            entry.2 = order_id.to_string();
        }
    };
    for o in &stored {
        seen.insert(o.order_id.clone());
        count(o.user_id, o.seq, &o.order_id);
        if o.status == "cancelled" {
            returned_ids.push(o.order_id.clone());
        }
    }
    for m in &in_stream {
        if seen.insert(m.order_id.clone()) {
            count(m.user_id, m.seq, &m.order_id);
        }
    }
    let sold = seen.len() as i64;
    let returned = returned_ids.len() as i64;

    let buyer_list: Vec<(i64, (i64, i64, String))> = buyers.into_iter().collect();
    for chunk in buyer_list.chunks(CHUNK) {
        let counts: Vec<(i64, i64)> = chunk.iter().map(|(u, (n, _, _))| (*u, *n)).collect();
        let latest: Vec<(i64, &str)> = chunk
            .iter()
            .map(|(u, (_, _, o))| (*u, o.as_str()))
            .collect();
        redis::pipe()
            .hset_multiple(&k.buyers, &counts)
            .ignore()
            .hset_multiple(&k.results, &latest)
            .ignore()
            .exec_async(&mut conn)
            .await
            .context("failed to restore the buyers")?;
    }
    for chunk in returned_ids.chunks(CHUNK) {
        redis::cmd("SADD")
            .arg(&k.returned)
            .arg(chunk)
            .exec_async(&mut conn)
            .await
            .context("failed to restore the returned orders")?;
    }
    let rebuilt = scripts::recover(&mut conn, keys, &p.meta(), sold, returned).await?;
    redis::cmd("SADD")
        .arg(keys.live_promotions())
        .arg(p.id)
        .exec_async(&mut conn)
        .await
        .context("failed to register the promotion's order stream")?;
    // Every cancelled order's unit is counted in the rebuilt stock.
    sqlx::query(
        "UPDATE orders SET restocked_at = now() \
         WHERE promotion_id = $1 AND status = 'cancelled' AND restocked_at IS NULL",
    )
    .bind(p.id)
    .execute(db)
    .await
    .context("failed to record the returned units")?;
    let remaining = (p.stock - sold + returned).max(0);
    if rebuilt {
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
        rebuilt,
        remaining,
        sold,
        returned,
    })
}

/// The order messages still in a stream (empty when the stream is gone).
async fn stream_orders(
    conn: &mut ConnectionManager,
    stream: &str,
) -> anyhow::Result<Vec<OrderMessage>> {
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(CHUNK)
            .query_async(conn)
            .await
            .context("failed to read the order stream")?;
        let Some(last) = page.ids.last().map(|e| e.id.clone()) else {
            break;
        };
        let full = page.ids.len() == CHUNK;
        out.extend(
            page.ids
                .iter()
                .filter_map(|e| OrderMessage::from_fields(&e.map)),
        );
        if !full {
            break;
        }
        start = format!("({last}");
    }
    Ok(out)
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
    /// Sum of the buyers' counts.
    pub bought_by_buyers: i64,
    /// Orders in the stream that are not in PostgreSQL yet.
    pub unpersisted: i64,
    pub persisted: i64,
    pub paid: i64,
    pub cancelled: i64,
    /// Zero when the stores agree; the sum of every mismatch otherwise.
    pub drift: i64,
}

/// Compares Redis and PostgreSQL for every promotion not yet ended (or
/// `only`). Checks: remaining + sold − returned = stock; the buyers' counts
/// add up to sold; sold = persisted + orders still in the stream; returned =
/// cancelled.
///
/// `check_buyers` adds up the buyers hash (`HVALS`), which is O(buyers) in
/// Redis: the CLI does it, the periodic metric does not.
pub async fn reconcile(
    db: &PgPool,
    redis: &ConnectionManager,
    keys: &Keys,
    only: Option<i64>,
    check_buyers: bool,
) -> anyhow::Result<Vec<Reconciliation>> {
    let mut out = Vec::new();
    for p in targets(db, only).await? {
        out.push(reconcile_one(db, redis, keys, &p, check_buyers).await?);
    }
    for r in &out {
        metrics::gauge!("seckill_reconcile_drift", "promotion" => r.promotion_id.to_string())
            .set(r.drift as f64);
    }
    Ok(out)
}

async fn reconcile_one(
    db: &PgPool,
    redis: &ConnectionManager,
    keys: &Keys,
    p: &Promotion,
    check_buyers: bool,
) -> anyhow::Result<Reconciliation> {
    let mut conn = redis.clone();
    let k = keys.promotion(p.id);
    let in_stream = stream_orders(&mut conn, &k.orders).await?;
    let (remaining, sold, returned): (Option<i64>, Option<i64>, Option<i64>) = redis::pipe()
        .get(&k.stock)
        .hget(&k.meta, "sold")
        .hget(&k.meta, "returned")
        .query_async(&mut conn)
        .await
        .context("failed to read the promotion's redis state")?;
    let bought: Vec<i64> = if check_buyers {
        redis::cmd("HVALS")
            .arg(&k.buyers)
            .query_async(&mut conn)
            .await
            .context("failed to read the buyers")?
    } else {
        Vec::new()
    };
    let stream_ids: Vec<&str> = in_stream.iter().map(|m| m.order_id.as_str()).collect();
    let (persisted, paid, cancelled, stream_persisted): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'paid'), \
         count(*) FILTER (WHERE status = 'cancelled'), \
         count(*) FILTER (WHERE order_id = ANY($2)) FROM orders WHERE promotion_id = $1",
    )
    .bind(p.id)
    .bind(&stream_ids)
    .fetch_one(db)
    .await
    .context("failed to count the promotion's orders")?;
    let sold = sold.unwrap_or(0);
    let returned = returned.unwrap_or(0);
    let unpersisted = in_stream.len() as i64 - stream_persisted;
    let bought_by_buyers: i64 = if check_buyers {
        bought.iter().sum()
    } else {
        sold
    };
    let drift = match remaining {
        None if p.ends_at > Utc::now() => 1 + persisted,
        None => 0,
        Some(left) => {
            (left + sold - returned - p.stock).abs()
                + (bought_by_buyers - sold).abs()
                + (sold - persisted - unpersisted).abs()
                + (returned - cancelled).abs()
        }
    };
    Ok(Reconciliation {
        promotion_id: p.id,
        stock: p.stock,
        remaining,
        sold,
        returned,
        bought_by_buyers,
        unpersisted,
        persisted,
        paid,
        cancelled,
        drift,
    })
}

/// The reconcile table, one promotion per line.
pub fn table(rows: &[Reconciliation]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10} {:>6}",
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
        "drift"
    );
    for r in rows {
        let remaining = r.remaining.map_or("missing".to_string(), |v| v.to_string());
        let _ = writeln!(
            s,
            "{:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>10} {:>10} {:>9} {:>10} {:>6}",
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
            r.drift
        );
    }
    s
}

/// Reconciles every `every` until `shutdown`, keeping the
/// `seckill_reconcile_drift` gauge current.
pub async fn run_periodic(
    db: PgPool,
    redis: ConnectionManager,
    keys: Keys,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = reconcile(&db, &redis, &keys, None, false).await {
            tracing::warn!(error = %format!("{e:#}"), "periodic reconcile failed");
        }
    }
}
