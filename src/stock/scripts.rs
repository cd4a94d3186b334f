//! One typed function per Lua script in `lua/`.
//!
//! The scripts (see `lua` for where their source comes from) run through [`redis::Script`],
//! which calls `EVALSHA` and loads the script again on `NOSCRIPT` (Redis
//! forgets its script cache on restart and failover). Lua source is never
//! built per request.

use anyhow::Context;
use redis::aio::ConnectionManager;

use super::keys::Keys;
use super::lua::{Name, script};

/// What the purchase script decided for one buyer. These are business
/// outcomes, not errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Bought {
        order_id: String,
    },
    SoldOut,
    AlreadyPurchased,
    NotStarted,
    Ended,
    /// Redis has no state for the promotion (never preheated, deleted, or lost).
    Unknown,
}

/// The fields of a promotion that the sale needs, as kept in its `meta` hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotionMeta {
    pub id: i64,
    pub starts_ms: i64,
    pub ends_ms: i64,
    pub per_user_limit: i64,
    pub price_cents: i64,
    pub stock: i64,
    pub require_token: bool,
    pub require_captcha: bool,
}

/// A buyer for the purchase script: the user and the order id to use if they win.
#[derive(Debug, Clone)]
pub struct Buyer {
    pub user_id: i64,
    pub order_id: String,
}

/// Runs `lua/purchase.lua` for `buyers` of promotion `id`; one outcome per
/// buyer, in order.
pub async fn purchase(
    conn: &mut ConnectionManager,
    keys: &Keys,
    id: i64,
    buyers: &[Buyer],
) -> redis::RedisResult<Vec<Outcome>> {
    let k = keys.promotion(id);
    let mut call = script(Name::Purchase).prepare_invoke();
    call.key(&k.meta)
        .key(&k.stock)
        .key(&k.buyers)
        .key(&k.orders)
        .key(&k.results)
        .arg(buyers.len());
    for b in buyers {
        call.arg(b.user_id).arg(&b.order_id);
    }
    let codes: Vec<i64> = call.invoke_async(conn).await?;
    if codes.len() != buyers.len() {
        return Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "purchase.lua returned the wrong number of outcomes",
        )));
    }
    Ok(codes
        .into_iter()
        .zip(buyers)
        .map(|(code, b)| match code {
            1 => Outcome::Bought {
                order_id: b.order_id.clone(),
            },
            0 => Outcome::SoldOut,
            2 => Outcome::AlreadyPurchased,
            3 => Outcome::NotStarted,
            4 => Outcome::Ended,
            _ => Outcome::Unknown,
        })
        .collect())
}

/// The keys and arguments preheat.lua and recover.lua share: KEYS meta,
/// stock, orders; ARGV 1–9 the promotion's meta, the consumer group and
/// `require_captcha`.
fn with_meta<'a>(
    script: &'a redis::Script,
    keys: &Keys,
    meta: &PromotionMeta,
) -> redis::ScriptInvocation<'a> {
    let k = keys.promotion(meta.id);
    let mut call = script.prepare_invoke();
    call.key(&k.meta)
        .key(&k.stock)
        .key(&k.orders)
        .arg(meta.id)
        .arg(meta.starts_ms)
        .arg(meta.ends_ms)
        .arg(meta.per_user_limit)
        .arg(meta.price_cents)
        .arg(meta.stock)
        .arg(u8::from(meta.require_token))
        .arg(keys.consumer_group())
        .arg(u8::from(meta.require_captcha));
    call
}

/// Runs `lua/preheat.lua`: loads the promotion's meta and stock and creates
/// the workers' consumer group. Returns the units left on sale.
pub async fn preheat(
    conn: &mut ConnectionManager,
    keys: &Keys,
    meta: &PromotionMeta,
) -> anyhow::Result<i64> {
    let left: i64 = with_meta(script(Name::Preheat), keys, meta)
        .invoke_async(conn)
        .await
        .with_context(|| format!("failed to preheat promotion {} in redis", meta.id))?;
    redis::cmd("SADD")
        .arg(keys.live_promotions())
        .arg(meta.id)
        .exec_async(conn)
        .await
        .context("failed to register the promotion's order stream")?;
    Ok(left)
}

/// Reads a promotion's meta hash; `None` when Redis has no state for it.
pub async fn load_meta(
    conn: &mut ConnectionManager,
    keys: &Keys,
    id: i64,
) -> redis::RedisResult<Option<PromotionMeta>> {
    let fields: Vec<Option<i64>> = redis::cmd("HMGET")
        .arg(keys.promotion(id).meta)
        .arg(&[
            "id",
            "starts_ms",
            "ends_ms",
            "limit",
            "price_cents",
            "stock",
            "require_token",
            "require_captcha",
        ])
        .query_async(conn)
        .await?;
    let [
        Some(id),
        Some(starts_ms),
        Some(ends_ms),
        Some(limit),
        Some(price_cents),
        Some(stock),
        require_token,
        require_captcha,
    ] = fields[..]
    else {
        return Ok(None);
    };
    Ok(Some(PromotionMeta {
        id,
        starts_ms,
        ends_ms,
        per_user_limit: limit,
        price_cents,
        stock,
        require_token: require_token == Some(1),
        require_captcha: require_captcha == Some(1),
    }))
}

/// Live counters of one promotion in Redis.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveCounters {
    /// Units left on sale; `None` when Redis has no state for the promotion.
    pub remaining: Option<i64>,
    /// Purchases accepted.
    pub sold: i64,
    /// Order messages not yet persisted and acknowledged.
    pub in_stream: i64,
}

/// Reads `remaining`, `sold` and the stream length in one round trip.
pub async fn counters(
    conn: &mut ConnectionManager,
    keys: &Keys,
    id: i64,
) -> redis::RedisResult<LiveCounters> {
    let k = keys.promotion(id);
    let (remaining, sold, in_stream): (Option<i64>, Option<i64>, i64) = redis::pipe()
        .get(&k.stock)
        .hget(&k.meta, "sold")
        .xlen(&k.orders)
        .query_async(conn)
        .await?;
    Ok(LiveCounters {
        remaining,
        sold: sold.unwrap_or(0),
        in_stream,
    })
}

/// Units left on sale for several promotions in one round trip.
pub async fn remaining_many(
    conn: &mut ConnectionManager,
    keys: &Keys,
    ids: &[i64],
) -> redis::RedisResult<Vec<Option<i64>>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let stock_keys: Vec<String> = ids.iter().map(|id| keys.promotion(*id).stock).collect();
    redis::cmd("MGET").arg(stock_keys).query_async(conn).await
}

/// Removes a promotion's whole Redis state.
pub async fn forget(conn: &mut ConnectionManager, keys: &Keys, id: i64) -> anyhow::Result<()> {
    let k = keys.promotion(id);
    redis::pipe()
        .atomic()
        .srem(keys.live_promotions(), id)
        .del(&[
            k.meta, k.stock, k.buyers, k.orders, k.results, k.returned, k.tokens,
        ])
        .exec_async(conn)
        .await
        .with_context(|| format!("failed to remove promotion {id} from redis"))
}

/// What `lua/restock.lua` did with an order's unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restock {
    /// The unit is back on sale.
    Returned,
    /// It had come back already (a retried or concurrent cancel).
    AlreadyReturned,
    /// Redis has no state for the promotion; recovery will count the order.
    NoState,
}

/// Runs `lua/restock.lua`: gives the unit of `order_id` back, once.
pub async fn restock(
    conn: &mut ConnectionManager,
    keys: &Keys,
    promotion_id: i64,
    order_id: &str,
) -> redis::RedisResult<Restock> {
    let k = keys.promotion(promotion_id);
    let code: i64 = script(Name::Restock)
        .key(&k.meta)
        .key(&k.stock)
        .key(&k.returned)
        .arg(order_id)
        .invoke_async(conn)
        .await?;
    Ok(match code {
        1 => Restock::Returned,
        0 => Restock::AlreadyReturned,
        _ => Restock::NoState,
    })
}

/// Runs `lua/recover.lua`: writes stock and meta unless the meta exists.
/// Returns whether the state was rebuilt.
pub async fn recover(
    conn: &mut ConnectionManager,
    keys: &Keys,
    meta: &PromotionMeta,
    sold: i64,
    returned: i64,
) -> redis::RedisResult<bool> {
    let rebuilt: i64 = with_meta(script(Name::Recover), keys, meta)
        .arg(sold)
        .arg(returned)
        .invoke_async(conn)
        .await?;
    Ok(rebuilt == 1)
}

/// What `lua/issue_token.lua` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted (now or before): a token may be signed.
    Admitted,
    /// The cap is reached or nothing is left.
    SoldOut,
    NotStarted,
    Ended,
    Unknown,
}

/// Runs `lua/issue_token.lua` for `user_id`.
pub async fn issue_token(
    conn: &mut ConnectionManager,
    keys: &Keys,
    id: i64,
    user_id: i64,
    cap_multiple: u64,
) -> redis::RedisResult<Admission> {
    let k = keys.promotion(id);
    let code: i64 = script(Name::IssueToken)
        .key(&k.meta)
        .key(&k.stock)
        .key(&k.tokens)
        .arg(user_id)
        .arg(cap_multiple)
        .invoke_async(conn)
        .await?;
    Ok(match code {
        1 | 2 => Admission::Admitted,
        0 => Admission::SoldOut,
        3 => Admission::NotStarted,
        4 => Admission::Ended,
        _ => Admission::Unknown,
    })
}
