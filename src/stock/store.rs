//! The Redis store: every Redis command the program sends, behind typed
//! functions. Nothing outside this module builds a Redis command.
//!
//! [`Store`] holds one connection and the key names. The gateway's store
//! shares one multiplexed connection (cheap clones, one socket, reconnects by
//! itself) with a short reply timeout; each order worker has a store of its
//! own, because `XREADGROUP … BLOCK` holds its connection, with a reply
//! timeout longer than the block. [`connect`] builds both kinds.
//!
//! The connection is a [`RedisConn`]: one standalone server, or a Redis
//! Cluster when `SECKILL_REDIS_URL` lists several seed nodes. Every command
//! of one promotion touches keys of one hash tag (see [`Keys`]); the few that
//! span promotions (the live set, stock of several promotions, reading
//! several streams, acknowledging entries of several streams) are here and
//! nowhere else, and on a cluster they are split so that no command and no
//! pipeline crosses a slot.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::streams::{
    StreamAutoClaimOptions, StreamAutoClaimReply, StreamInfoConsumersReply, StreamPendingReply,
    StreamRangeReply, StreamReadOptions,
};
use redis::{
    AsyncCommands, AsyncConnectionConfig, ErrorKind, ExistenceCheck, IntoConnectionInfo,
    RedisError, RedisResult, SetExpiry, SetOptions,
};

use super::buckets::{self, MAX_BUCKETS};
use super::connection::{RedisConn, seeds};
use super::keys::{Keys, PromotionKeys};
use super::lua::{self, Name, codes, script};
use super::message::{Entry, OrderMessage, ReadReply};

mod buckets_ops;
pub use buckets_ops::{Levels, SeenTransfers, TransferOut, Transit};

/// Entries read per page when a stream is read whole, and members written
/// per command when a hash or set is refilled.
const CHUNK: usize = 1000;

/// How a connection waits for Redis.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// A reply slower than this fails the command.
    pub response_timeout: Duration,
    pub connection_timeout: Duration,
    /// Reconnection attempts before a command fails.
    pub retries: usize,
    /// Longest wait between reconnection attempts.
    pub max_delay: Duration,
    /// Cluster mode: attempts after a failed try (a `MOVED`/`ASK` redirect,
    /// a dropped connection, a node being failed over) before a command
    /// fails; each waits between `min_retry_wait` and `max_delay`.
    pub cluster_retries: u32,
    /// Cluster mode: shortest wait between two attempts.
    pub min_retry_wait: Duration,
    /// Cluster mode: the bound on a whole command, retries and redirects
    /// included (each attempt is bounded by `response_timeout`).
    pub overall_timeout: Duration,
    /// Cluster mode: failed reconnections to a node before the client drops
    /// it and refreshes its slot map. Without a bound (the library's
    /// default) the client keeps reconnecting to a primary that died and
    /// never learns that its replica took over.
    pub max_connection_attempts: usize,
}

impl ConnectOptions {
    /// For ordinary commands: a slow reply means Redis is in trouble, so
    /// fail fast and let the caller answer `503`.
    pub fn commands(response_timeout: Duration) -> Self {
        ConnectOptions {
            response_timeout,
            connection_timeout: Duration::from_secs(1),
            retries: 1,
            max_delay: Duration::from_millis(500),
            // A failover moves a slot within the cluster's node timeout
            // (seconds); a purchase waits for a couple of redirects, no more:
            // past the overall bound the buyer gets a prompt `503`.
            cluster_retries: 3,
            min_retry_wait: Duration::from_millis(20),
            overall_timeout: response_timeout * 2,
            max_connection_attempts: 3,
        }
    }

    /// For a consumer that blocks on `XREADGROUP` for up to `block`.
    pub fn blocking(block: Duration) -> Self {
        ConnectOptions {
            response_timeout: block + Duration::from_secs(5),
            connection_timeout: Duration::from_secs(2),
            retries: 2,
            max_delay: Duration::from_secs(2),
            // A worker outlives a failover: it retries long enough for the
            // replica's promotion, then its loop backs off and tries again.
            cluster_retries: 6,
            min_retry_wait: Duration::from_millis(100),
            overall_timeout: block + Duration::from_secs(10),
            max_connection_attempts: 3,
        }
    }
}

/// The one connection builder: a multiplexed connection to `url` (one URL),
/// or a cluster connection when `url` lists several comma-separated seed
/// nodes. The cluster client's retries, timeouts and retry waits come from
/// `options`, never from the library's defaults.
pub async fn connect(url: &str, options: ConnectOptions) -> anyhow::Result<RedisConn> {
    let nodes = seeds(url);
    if nodes.len() > 1 {
        let conn = cluster_client(nodes, options)?
            .get_async_connection()
            .await
            .context("failed to connect to the redis cluster")?;
        return Ok(RedisConn::Cluster(conn));
    }
    let client = redis::Client::open(url).context("invalid redis url")?;
    let config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(options.response_timeout))
        .set_connection_timeout(Some(options.connection_timeout))
        .set_number_of_retries(options.retries)
        .set_max_delay(options.max_delay);
    let conn = ConnectionManager::new_with_config(client, config)
        .await
        .context("failed to connect to redis")?;
    Ok(RedisConn::Single(conn))
}

/// A cluster client for the seed `nodes`, with every retry, timeout and
/// reconnection setting taken from `options` (for [`connect`] and for the
/// pools of `stock::pool`).
pub(super) fn cluster_client<T: IntoConnectionInfo>(
    nodes: Vec<T>,
    options: ConnectOptions,
) -> anyhow::Result<ClusterClient> {
    ClusterClientBuilder::new(nodes)
        .retries(options.cluster_retries)
        .min_retry_wait(options.min_retry_wait.as_millis() as u64)
        .max_retry_wait(options.max_delay.as_millis() as u64)
        .connection_timeout(options.connection_timeout)
        .response_timeout(options.response_timeout)
        .overall_response_timeout(Some(options.overall_timeout))
        .max_connection_attempts(
            std::num::NonZeroUsize::new(options.max_connection_attempts.max(1))
                .expect("at least 1"),
        )
        .build()
        .context("invalid redis cluster seed urls")
}

/// The settings of a plain multiplexed connection (one that does not
/// reconnect by itself: its holder asks its pool for another) from `options`.
pub(super) fn connection_config(options: ConnectOptions) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_response_timeout(Some(options.response_timeout))
        .set_connection_timeout(Some(options.connection_timeout))
}

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

/// What `lua/issue_token.lua` decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted (now or before): a token may be signed.
    Admitted,
    /// The cap is reached or nothing is left.
    SoldOut,
    NotStarted,
    Ended,
    /// Redis has no state for the promotion.
    Unknown,
}

/// One chunk of a promotion's state for `lua/refill.lua`.
#[derive(Debug, Clone, Copy)]
pub enum Refill<'a> {
    /// Buyers: (user id, units bought, latest order id).
    Buyers(&'a [(i64, i64, String)]),
    /// Ids of orders whose unit is back.
    Returned(&'a [String]),
    /// Accepted orders: (order id, user id).
    Won(&'a [(String, i64)]),
}

/// What `lua/recover.lua` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recover {
    /// The state is rebuilt and the sale open again.
    Rebuilt,
    /// The meta existed: nothing changed.
    StateExisted,
    /// The caller's lock had lapsed and another took it: nothing changed.
    LockLost,
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
    /// Buckets the stock is split into (1: not split).
    pub buckets: u32,
}

/// A buyer for the purchase script: the user and the order id to use if they win.
#[derive(Debug, Clone)]
pub struct Buyer {
    pub user_id: i64,
    pub order_id: String,
}

/// Live counters of one promotion in Redis, read in one round trip.
#[derive(Debug, Clone, Copy, Default)]
pub struct LiveCounters {
    /// Units left on sale; `None` when Redis has no stock key for it.
    pub remaining: Option<i64>,
    /// Purchases accepted.
    pub sold: i64,
    /// Units given back by cancels and expiries.
    pub returned: i64,
    /// Order messages not yet persisted and acknowledged.
    pub in_stream: i64,
    /// Whether the meta hash is loaded (it has `starts_ms`: preheat or
    /// recovery wrote it, and the promotion can be sold); for a bucketed
    /// promotion, the meta of every bucket.
    pub has_meta: bool,
    /// Units taken out of a bucket by a transfer not yet added to another
    /// (0 unless the promotion is bucketed).
    pub in_transit: i64,
}

/// One promotion's sale state at one instant (see [`Store::snapshot`]).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Units left on sale; `None` when Redis has no stock key or no loaded
    /// meta (with `starts_ms`) for it.
    pub remaining: Option<i64>,
    pub sold: i64,
    pub returned: i64,
    /// Ids of the orders whose unit came back.
    pub returned_ids: HashSet<String>,
    /// Ids of the orders the purchase script accepted.
    pub won: HashSet<String>,
    /// The sum of the buyers' counts, when asked for.
    pub bought_by_buyers: Option<i64>,
    /// Units in transit between buckets (see [`LiveCounters::in_transit`]).
    pub in_transit: i64,
}

/// An error for a reply the program does not understand: never guessed at.
fn unexpected(what: &'static str, detail: impl ToString) -> RedisError {
    RedisError::from((ErrorKind::UnexpectedReturnType, what, detail.to_string()))
}

/// How many replicas a purchase's write must reach before it is answered
/// (`SECKILL_REDIS_WAIT_REPLICAS`), and for how long to wait for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitFor {
    pub replicas: u32,
    pub timeout: Duration,
}

/// The Redis side of the system: one connection and the key names.
#[derive(Clone)]
pub struct Store {
    conn: RedisConn,
    keys: Keys,
    wait: Option<WaitFor>,
}

impl Store {
    pub fn new(conn: impl Into<RedisConn>, keys: Keys) -> Self {
        Store {
            conn: conn.into(),
            keys,
            wait: None,
        }
    }

    /// This store's purchases answer only once `replicas` replicas hold
    /// their write (`WAIT`), or fail after `timeout`; 0 replicas: no wait.
    pub fn with_wait(mut self, replicas: u32, timeout: Duration) -> Self {
        self.wait = (replicas > 0).then_some(WaitFor { replicas, timeout });
        self
    }

    /// A store on a connection of its own.
    pub async fn connect(url: &str, keys: Keys, options: ConnectOptions) -> anyhow::Result<Store> {
        Ok(Store::new(connect(url, options).await?, keys))
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Whether the store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// `PING`: whether Redis answers.
    pub async fn ping(&self) -> RedisResult<()> {
        let _: String = self.conn().ping().await?;
        Ok(())
    }

    /// Redis's clock (`TIME`), in Unix milliseconds.
    pub async fn time_ms(&self) -> RedisResult<i64> {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn()).await?;
        Ok(secs * 1000 + micros / 1000)
    }

    // ---- Scripts -------------------------------------------------------

    /// Loads every script into Redis (`SCRIPT LOAD`) and logs its SHA. A
    /// script Redis refuses (a syntax error, say) is an error naming it.
    pub async fn load_scripts(&self) -> anyhow::Result<()> {
        let mut conn = self.conn();
        for lua in lua::all() {
            let sha = lua.script.load_async(&mut conn).await.with_context(|| {
                format!("redis refused lua script {} ({})", lua.name, lua.origin)
            })?;
            anyhow::ensure!(
                sha == lua.script.get_hash(),
                "redis computed another SHA for {}: {sha}",
                lua.name
            );
            tracing::info!(script = lua.name, sha = %sha, origin = %lua.origin, "lua script loaded");
        }
        Ok(())
    }

    /// Runs `lua/purchase.lua` for `buyers` of promotion `id`; one outcome
    /// per buyer, in order.
    pub async fn purchase(&self, id: i64, buyers: &[Buyer]) -> RedisResult<Vec<Outcome>> {
        self.purchase_in(id, 0, buyers, &[]).await
    }

    /// [`Store::purchase`] on bucket `bucket` of a promotion (0 when it is
    /// not split), with each buyer's W3C `traceparent` (one per buyer, in
    /// order; empty: none) written into its order message. An empty
    /// `traceparents` sends exactly what an untraced purchase sends.
    pub async fn purchase_in(
        &self,
        id: i64,
        bucket: u32,
        buyers: &[Buyer],
        traceparents: &[String],
    ) -> RedisResult<Vec<Outcome>> {
        let k = self.keys.bucket(id, bucket);
        let mut call = script(Name::Purchase).prepare_invoke();
        call.key(&k.meta)
            .key(&k.stock)
            .key(&k.buyers)
            .key(&k.orders)
            .key(&k.results)
            .key(&k.won)
            .arg(buyers.len());
        for b in buyers {
            call.arg(b.user_id).arg(&b.order_id);
        }
        if traceparents.len() == buyers.len() {
            for t in traceparents {
                call.arg(t);
            }
        }
        let replies: Vec<i64> = call.invoke_async(&mut self.conn()).await?;
        if replies.len() != buyers.len() {
            return Err(unexpected(
                "purchase.lua returned the wrong number of outcomes",
                format!("{} for {} buyers", replies.len(), buyers.len()),
            ));
        }
        if let Some(wait) = self.wait
            && replies.contains(&codes::purchase::BOUGHT)
        {
            self.wait_for_replicas(&k.meta, wait).await?;
        }
        replies
            .into_iter()
            .zip(buyers)
            .map(|(code, b)| {
                use codes::purchase as c;
                Ok(match code {
                    c::BOUGHT => Outcome::Bought {
                        order_id: b.order_id.clone(),
                    },
                    c::SOLD_OUT => Outcome::SoldOut,
                    c::ALREADY_PURCHASED => Outcome::AlreadyPurchased,
                    c::NOT_STARTED => Outcome::NotStarted,
                    c::ENDED => Outcome::Ended,
                    c::UNKNOWN => Outcome::Unknown,
                    other => {
                        return Err(unexpected("purchase.lua returned an unknown code", other));
                    }
                })
            })
            .collect()
    }

    /// `WAIT replicas timeout` on the primary of `key`'s slot (on a cluster
    /// the command is routed there; standalone, it goes on the one
    /// connection), so it covers the writes this connection sent to that
    /// node, the purchase script's among them. Fewer replicas than asked
    /// within the timeout is an error: the caller answers `503`, though the
    /// write stands on the primary (its order is persisted if it survives).
    async fn wait_for_replicas(&self, key: &str, wait: WaitFor) -> RedisResult<()> {
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(wait.replicas).arg(wait.timeout.as_millis() as u64);
        let acked: i64 = match self.conn() {
            RedisConn::Single(mut c) => cmd.query_async(&mut c).await?,
            RedisConn::Multiplexed(mut c) => cmd.query_async(&mut c).await?,
            RedisConn::Cluster(mut c) => {
                let route = Route::with_key(key, SlotAddr::Master);
                let value = c
                    .route_command(
                        cmd,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                redis::from_redis_value(value)
                    .map_err(|e| unexpected("WAIT returned a non-integer", e))?
            }
        };
        if acked < i64::from(wait.replicas) {
            return Err(RedisError::from((
                ErrorKind::Io,
                "the purchase reached fewer replicas than SECKILL_REDIS_WAIT_REPLICAS in time",
                format!("{acked} of {} within {:?}", wait.replicas, wait.timeout),
            )));
        }
        Ok(())
    }

    /// The keys and arguments preheat.lua and recover.lua share: KEYS meta,
    /// stock, orders; ARGV 1–9 the promotion's meta, the consumer group and
    /// `require_captcha`; on bucket `bucket`'s keys.
    fn with_meta<'a>(
        &self,
        script: &'a redis::Script,
        meta: &PromotionMeta,
        bucket: u32,
    ) -> redis::ScriptInvocation<'a> {
        let k = self.keys.bucket(meta.id, bucket);
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
            .arg(self.keys.consumer_group())
            .arg(u8::from(meta.require_captcha));
        call
    }

    /// Runs `lua/preheat.lua` (meta, stock, the workers' consumer group) and
    /// adds the promotion to the live set the workers read. Returns the units
    /// left on sale.
    /// For a bucketed promotion, every bucket, each with its share of the
    /// stock; the sum of what is left is returned.
    pub async fn preheat(&self, meta: &PromotionMeta) -> anyhow::Result<i64> {
        let mut conn = self.conn();
        let n = meta.buckets.clamp(1, MAX_BUCKETS);
        let mut total = 0;
        for bucket in 0..n {
            let mut call = self.with_meta(script(Name::Preheat), meta, bucket);
            if n > 1 {
                call.arg(buckets::share(meta.stock, n, bucket)).arg(n);
            }
            let left: i64 = call
                .invoke_async(&mut conn)
                .await
                .with_context(|| format!("failed to preheat promotion {} in redis", meta.id))?;
            total += left;
            // With replicas to wait for, the sale state is on them before
            // the sale opens; when they are late the promotion stands (a
            // replica promoted without it is rebuilt by recovery).
            if let Some(wait) = self.wait {
                let k = self.keys.bucket(meta.id, bucket);
                if let Err(e) = self.wait_for_replicas(&k.meta, wait).await {
                    tracing::warn!(promotion = meta.id, bucket, error = %e, "a preheat is not on the replicas yet");
                }
            }
        }
        self.add_live(meta.id).await?;
        Ok(total)
    }

    /// Promotion `id`'s number of buckets, as bucket 0's meta records it
    /// (1 when it records none, or has no meta).
    pub async fn bucket_count(&self, id: i64) -> RedisResult<u32> {
        let n: Option<u32> = self
            .conn()
            .hget(self.keys.promotion(id).meta, "buckets")
            .await?;
        Ok(n.unwrap_or(1).clamp(1, MAX_BUCKETS))
    }

    /// Takes promotion `id`'s recovery lock for `ttl` under `token`;
    /// `false` when another recovery holds it.
    /// (Of bucket `bucket`: each bucket is rebuilt under a lock of its own.)
    pub async fn lock_recovery(
        &self,
        id: i64,
        bucket: u32,
        token: &str,
        ttl: Duration,
    ) -> RedisResult<bool> {
        let set: Option<String> = self
            .conn()
            .set_options(
                self.keys.bucket(id, bucket).recovering,
                token,
                SetOptions::default()
                    .conditional_set(ExistenceCheck::NX)
                    .with_expiration(SetExpiry::PX(ttl.as_millis() as u64)),
            )
            .await?;
        Ok(set.is_some())
    }

    /// Runs `lua/refill.lua` for one chunk, for the recovery holding
    /// `token` (extending its lock to `ttl`); `false` when refused (the meta
    /// exists or `token` lost the lock).
    pub async fn refill(
        &self,
        id: i64,
        bucket: u32,
        token: &str,
        ttl: Duration,
        chunk: Refill<'_>,
    ) -> anyhow::Result<bool> {
        let k = self.keys.bucket(id, bucket);
        let mut call = script(Name::Refill).prepare_invoke();
        call.key(&k.meta)
            .key(&k.recovering)
            .key(&k.buyers)
            .key(&k.results)
            .key(&k.returned)
            .key(&k.won)
            .arg(token)
            .arg(ttl.as_millis() as u64);
        let what = match chunk {
            Refill::Buyers(buyers) => {
                call.arg("buyers");
                for (user, bought, latest) in buyers {
                    call.arg(user).arg(bought).arg(latest);
                }
                "buyers"
            }
            Refill::Returned(ids) => {
                call.arg("returned").arg(ids);
                "returned orders"
            }
            Refill::Won(owners) => {
                call.arg("won");
                for (order, user) in owners {
                    call.arg(order).arg(user);
                }
                "accepted orders"
            }
        };
        let code: i64 = call
            .invoke_async(&mut self.conn())
            .await
            .with_context(|| format!("failed to restore the {what}"))?;
        match code {
            codes::refill::WRITTEN => Ok(true),
            codes::refill::REFUSED => Ok(false),
            other => Err(unexpected("refill.lua returned an unknown code", other).into()),
        }
    }

    /// One page of the ids in promotion `id`'s returned set (`SSCAN`), from
    /// `cursor` (0 to start); the next cursor is 0 after the last page.
    pub async fn returned_page(
        &self,
        id: i64,
        bucket: u32,
        cursor: u64,
    ) -> RedisResult<(u64, Vec<String>)> {
        redis::cmd("SSCAN")
            .arg(self.keys.bucket(id, bucket).returned)
            .arg(cursor)
            .arg("COUNT")
            .arg(CHUNK)
            .query_async(&mut self.conn())
            .await
    }

    /// Runs `lua/recover.lua` for the recovery holding `token`: writes stock
    /// and meta unless the meta exists. For a bucket of a bucketed
    /// promotion, `moved` is the bucket's (moved_out, moved_in).
    pub async fn recover(
        &self,
        meta: &PromotionMeta,
        bucket: u32,
        sold: i64,
        returned: i64,
        token: &str,
        moved: (i64, i64),
    ) -> RedisResult<Recover> {
        let mut call = self.with_meta(script(Name::Recover), meta, bucket);
        call.key(self.keys.bucket(meta.id, bucket).recovering)
            .arg(sold)
            .arg(returned)
            .arg(token);
        let n = meta.buckets.clamp(1, MAX_BUCKETS);
        if n > 1 {
            call.arg(buckets::share(meta.stock, n, bucket))
                .arg(n)
                .arg(moved.0)
                .arg(moved.1);
        }
        let code: i64 = call.invoke_async(&mut self.conn()).await?;
        match code {
            codes::recover::REBUILT => Ok(Recover::Rebuilt),
            codes::recover::STATE_EXISTED => Ok(Recover::StateExisted),
            codes::recover::LOCK_LOST => Ok(Recover::LockLost),
            other => Err(unexpected("recover.lua returned an unknown code", other)),
        }
    }

    /// Runs `lua/restock.lua`: gives the unit of `order_id` back, once, to
    /// bucket `bucket` (the buyer's: the one it was taken from; 0 when the
    /// promotion is not split).
    pub async fn restock(
        &self,
        promotion_id: i64,
        bucket: u32,
        order_id: &str,
    ) -> RedisResult<Restock> {
        let k = self.keys.bucket(promotion_id, bucket);
        let code: i64 = script(Name::Restock)
            .key(&k.meta)
            .key(&k.stock)
            .key(&k.returned)
            .arg(order_id)
            .invoke_async(&mut self.conn())
            .await?;
        match code {
            codes::restock::RETURNED => Ok(Restock::Returned),
            codes::restock::ALREADY_RETURNED => Ok(Restock::AlreadyReturned),
            codes::restock::NO_STATE => Ok(Restock::NoState),
            other => Err(unexpected("restock.lua returned an unknown code", other)),
        }
    }

    /// Runs `lua/issue_token.lua` for `user_id`. A promotion split into
    /// `buckets` > 1 counts its admitted buyers in bucket 0, against the
    /// cap only (bucket 0's stock is not the promotion's).
    pub async fn issue_token(
        &self,
        id: i64,
        user_id: i64,
        cap_multiple: u64,
        buckets: u32,
    ) -> RedisResult<Admission> {
        let k = self.keys.promotion(id);
        let mut call = script(Name::IssueToken).prepare_invoke();
        call.key(&k.meta)
            .key(&k.stock)
            .key(&k.tokens)
            .arg(user_id)
            .arg(cap_multiple);
        if buckets > 1 {
            call.arg(1);
        }
        let code: i64 = call.invoke_async(&mut self.conn()).await?;
        use codes::issue_token as c;
        match code {
            c::ADMITTED | c::ADMITTED_BEFORE => Ok(Admission::Admitted),
            c::REFUSED => Ok(Admission::SoldOut),
            c::NOT_STARTED => Ok(Admission::NotStarted),
            c::ENDED => Ok(Admission::Ended),
            c::UNKNOWN => Ok(Admission::Unknown),
            other => Err(unexpected(
                "issue_token.lua returned an unknown code",
                other,
            )),
        }
    }

    // ---- A promotion's state -------------------------------------------

    /// Reads a promotion's meta hash; `None` when Redis has no state for it.
    pub async fn meta(&self, id: i64) -> RedisResult<Option<PromotionMeta>> {
        let fields: Vec<Option<i64>> = self
            .conn()
            .hmget(
                self.keys.promotion(id).meta,
                &[
                    "id",
                    "starts_ms",
                    "ends_ms",
                    "limit",
                    "price_cents",
                    "stock",
                    "require_token",
                    "require_captcha",
                    "buckets",
                ],
            )
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
            buckets,
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
            buckets: buckets.unwrap_or(1).clamp(1, i64::from(MAX_BUCKETS)) as u32,
        }))
    }

    /// Stock, `sold`, `returned`, the stream length and whether the meta
    /// exists, in one round trip; for a bucketed promotion, summed over its
    /// buckets (one round trip each), with the units in transit.
    pub async fn counters(&self, id: i64) -> RedisResult<LiveCounters> {
        let (mut total, n, mut moved) = self.bucket_counters(&self.keys.promotion(id)).await?;
        for bucket in 1..n {
            let (c, _, m) = self.bucket_counters(&self.keys.bucket(id, bucket)).await?;
            total.remaining = match (total.remaining, c.remaining) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            total.sold += c.sold;
            total.returned += c.returned;
            total.in_stream += c.in_stream;
            total.has_meta &= c.has_meta;
            moved += m;
        }
        total.in_transit = moved;
        Ok(total)
    }

    /// One bucket's counters, its number of buckets (from its meta, 1 when
    /// none) and its `moved_out - moved_in`, in one round trip.
    async fn bucket_counters(&self, k: &PromotionKeys) -> RedisResult<(LiveCounters, u32, i64)> {
        let (remaining, fields, in_stream, has_meta): (Option<i64>, Vec<Option<i64>>, i64, bool) =
            redis::pipe()
                .get(&k.stock)
                .hmget(
                    &k.meta,
                    &["sold", "returned", "buckets", "moved_out", "moved_in"],
                )
                .xlen(&k.orders)
                .hexists(&k.meta, "starts_ms")
                .query_async(&mut self.conn())
                .await?;
        let field = |i: usize| fields.get(i).copied().flatten();
        let counters = LiveCounters {
            remaining,
            sold: field(0).unwrap_or(0),
            returned: field(1).unwrap_or(0),
            in_stream,
            has_meta,
            in_transit: 0,
        };
        let n = field(2).unwrap_or(1).clamp(1, i64::from(MAX_BUCKETS)) as u32;
        let moved = field(3).unwrap_or(0) - field(4).unwrap_or(0);
        Ok((counters, n, moved))
    }

    /// A consistent view of promotion `id` for reconciliation: counters and
    /// the returned and accepted order ids, read in one `MULTI`, so no
    /// script runs in between. The buyers' counts are added up only when
    /// `with_buyers` (`HVALS`, O(buyers)). A bucketed promotion is read one
    /// bucket after another (one `MULTI` each) and summed: an order may
    /// cross from a bucket's stock to `won` between two reads of different
    /// buckets, never inside one, and a unit in transit is counted by
    /// `moved_out - moved_in`.
    pub async fn snapshot(&self, id: i64, with_buyers: bool) -> RedisResult<Snapshot> {
        let n = self.bucket_count(id).await?;
        let mut total = self
            .bucket_snapshot(&self.keys.promotion(id), with_buyers)
            .await?;
        for bucket in 1..n {
            let s = self
                .bucket_snapshot(&self.keys.bucket(id, bucket), with_buyers)
                .await?;
            total.remaining = match (total.remaining, s.remaining) {
                (Some(a), Some(b)) => Some(a + b),
                (a, b) => a.or(b),
            };
            total.sold += s.sold;
            total.returned += s.returned;
            total.returned_ids.extend(s.returned_ids);
            total.won.extend(s.won);
            total.bought_by_buyers = total
                .bought_by_buyers
                .zip(s.bought_by_buyers)
                .map(|(a, b)| a + b);
            total.in_transit += s.in_transit;
        }
        Ok(total)
    }

    async fn bucket_snapshot(&self, k: &PromotionKeys, with_buyers: bool) -> RedisResult<Snapshot> {
        type Counters = (Option<i64>, Vec<Option<i64>>);
        type Ids = (HashSet<String>, HashSet<String>);
        let fields = ["sold", "returned", "moved_out", "moved_in", "starts_ms"];
        let mut conn = self.conn();
        let ((remaining, f), (returned_ids, won), bought) = if with_buyers {
            let (c, i, bought): (Counters, Ids, Vec<i64>) = redis::pipe()
                .atomic()
                .get(&k.stock)
                .hmget(&k.meta, &fields)
                .smembers(&k.returned)
                .hkeys(&k.won)
                .hvals(&k.buyers)
                .query_async(&mut conn)
                .await
                .map(|(a, b, d, e, f)| ((a, b), (d, e), f))?;
            (c, i, Some(bought.iter().sum()))
        } else {
            let (c, i): (Counters, Ids) = redis::pipe()
                .atomic()
                .get(&k.stock)
                .hmget(&k.meta, &fields)
                .smembers(&k.returned)
                .hkeys(&k.won)
                .query_async(&mut conn)
                .await
                .map(|(a, b, d, e)| ((a, b), (d, e)))?;
            (c, i, None)
        };
        let field = |i: usize| f.get(i).copied().flatten().unwrap_or(0);
        // A meta without `starts_ms` is not loaded: the state is lost, even
        // if its stock key is there.
        let loaded = f.get(4).copied().flatten().is_some();
        Ok(Snapshot {
            remaining: remaining.filter(|_| loaded),
            sold: field(0),
            returned: field(1),
            returned_ids,
            won,
            bought_by_buyers: bought,
            in_transit: field(2) - field(3),
        })
    }

    /// Units left on sale for several promotions in one round trip (and
    /// one more per bucketed promotion among them).
    pub async fn remaining_many(&self, ids: &[i64]) -> RedisResult<Vec<Option<i64>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // The first bucket's stock and the bucket count of each promotion:
        // one pipeline on a single node; on a cluster one pipeline per
        // promotion (one slot each), all in flight at once.
        let firsts: Vec<(Option<i64>, Option<u32>)> = if self.is_cluster() {
            let conn = self.conn();
            let reads = ids.iter().map(|id| {
                let mut conn = conn.clone();
                let k = self.keys.promotion(*id);
                async move {
                    redis::pipe()
                        .get(&k.stock)
                        .hget(&k.meta, "buckets")
                        .query_async::<(Option<i64>, Option<u32>)>(&mut conn)
                        .await
                }
            });
            futures_util::future::try_join_all(reads).await?
        } else {
            let mut pipe = redis::pipe();
            for id in ids {
                let k = self.keys.promotion(*id);
                pipe.get(&k.stock).hget(&k.meta, "buckets");
            }
            pipe.query_async(&mut self.conn()).await?
        };
        let mut out = Vec::with_capacity(ids.len());
        for (id, (first, n)) in ids.iter().zip(firsts) {
            let n = n.unwrap_or(1).clamp(1, MAX_BUCKETS);
            if n == 1 || first.is_none() {
                out.push(first);
            } else {
                out.push(Some(self.bucket_stocks(*id, n).await?.iter().sum()));
            }
        }
        Ok(out)
    }

    /// The sum of every buyer's count (`HVALS`, O(buyers)), over every bucket.
    pub async fn bought_by_buyers(&self, id: i64) -> RedisResult<i64> {
        let n = self.bucket_count(id).await?;
        let mut total = 0;
        for bucket in 0..n {
            let counts: Vec<i64> = self
                .conn()
                .hvals(self.keys.bucket(id, bucket).buyers)
                .await?;
            total += counts.iter().sum::<i64>();
        }
        Ok(total)
    }

    /// Removes a promotion's whole Redis state (of each of its `buckets`
    /// buckets). Bucket 0 goes first, in one step with the live set and
    /// with no read before it, so an undo sent right after a failed call
    /// follows that call on the connection.
    pub async fn forget(&self, id: i64, buckets: u32) -> anyhow::Result<()> {
        let keys_of = |k: PromotionKeys| {
            [
                k.meta,
                k.stock,
                k.buyers,
                k.orders,
                k.results,
                k.returned,
                k.tokens,
                k.won,
                k.recovering,
                k.transfers,
                k.received,
            ]
        };
        if self.is_cluster() {
            // The live set has a slot of its own: first out of it (the
            // workers stop reading the stream), then each bucket's keys, one
            // slot each, in one `DEL` (atomic by itself).
            self.remove_live(id)
                .await
                .with_context(|| format!("failed to remove promotion {id} from redis"))?;
            let _: () = self
                .conn()
                .del(&keys_of(self.keys.promotion(id)))
                .await
                .with_context(|| format!("failed to remove promotion {id} from redis"))?;
        } else {
            redis::pipe()
                .atomic()
                .srem(self.keys.live_promotions(), id)
                .del(&keys_of(self.keys.promotion(id)))
                .exec_async(&mut self.conn())
                .await
                .with_context(|| format!("failed to remove promotion {id} from redis"))?;
        }
        for bucket in 1..buckets.clamp(1, MAX_BUCKETS) {
            let _: () = self
                .conn()
                .del(&keys_of(self.keys.bucket(id, bucket)))
                .await
                .with_context(|| format!("failed to remove promotion {id} from redis"))?;
        }
        Ok(())
    }

    // ---- Buyers' results, captchas ---------------------------------------

    /// The order id of `user_id`'s latest purchase in promotion `id`.
    /// Looked up in the buyer's bucket: one round trip, two for a
    /// bucketed promotion.
    pub async fn latest_order(&self, id: i64, user_id: i64) -> RedisResult<Option<String>> {
        let k = self.keys.promotion(id);
        let (latest, n): (Option<String>, Option<u32>) = redis::pipe()
            .hget(&k.results, user_id)
            .hget(&k.meta, "buckets")
            .query_async(&mut self.conn())
            .await?;
        let bucket = buckets::bucket_of(user_id, n.unwrap_or(1).clamp(1, MAX_BUCKETS));
        if bucket == 0 {
            return Ok(latest);
        }
        self.conn()
            .hget(self.keys.bucket(id, bucket).results, user_id)
            .await
    }

    /// Whether `order_id` was accepted for `user_id` in one of the live
    /// promotions (any of the buyer's orders, not only the latest).
    pub async fn is_accepted_order_of(&self, user_id: i64, order_id: &str) -> RedisResult<bool> {
        let live = self.live_promotions().await?;
        if live.is_empty() {
            return Ok(false);
        }
        let owners: Vec<Option<i64>> = if self.is_cluster() {
            // Per promotion, each on its own slot: its bucket count, then
            // the `won` hash of the buyer's bucket.
            let conn = self.conn();
            let gets = live.iter().map(|id| {
                let mut conn = conn.clone();
                let meta = self.keys.promotion(*id).meta;
                async move {
                    let n: Option<u32> = conn.hget(meta, "buckets").await?;
                    let n = n.unwrap_or(1).clamp(1, MAX_BUCKETS);
                    let won = self.keys.bucket(*id, buckets::bucket_of(user_id, n)).won;
                    conn.hget::<_, _, Option<i64>>(won, order_id).await
                }
            });
            futures_util::future::try_join_all(gets).await?
        } else {
            let mut pipe = redis::pipe();
            for id in &live {
                pipe.hget(self.keys.promotion(*id).meta, "buckets");
            }
            let counts: Vec<Option<u32>> = pipe.query_async(&mut self.conn()).await?;
            let mut pipe = redis::pipe();
            for (id, n) in live.iter().zip(counts) {
                let n = n.unwrap_or(1).clamp(1, MAX_BUCKETS);
                pipe.hget(
                    self.keys.bucket(*id, buckets::bucket_of(user_id, n)).won,
                    order_id,
                );
            }
            pipe.query_async(&mut self.conn()).await?
        };
        Ok(owners.contains(&Some(user_id)))
    }

    /// Stores a captcha challenge's `value` for `ttl`.
    pub async fn put_captcha(
        &self,
        id: i64,
        challenge: &str,
        value: &str,
        ttl: Duration,
    ) -> RedisResult<()> {
        self.conn()
            .pset_ex(
                self.keys.captcha(id, challenge),
                value,
                ttl.as_millis() as u64,
            )
            .await
    }

    /// Takes a captcha challenge's value out (`GETDEL`): a challenge is
    /// answered once, right or wrong.
    pub async fn take_captcha(&self, id: i64, challenge: &str) -> RedisResult<Option<String>> {
        self.conn().get_del(self.keys.captcha(id, challenge)).await
    }

    // ---- The live set and cache invalidation ------------------------------

    /// The ids of the promotions whose streams the workers read.
    pub async fn live_promotions(&self) -> RedisResult<Vec<i64>> {
        let ids: HashSet<i64> = self.conn().smembers(self.keys.live_promotions()).await?;
        let mut ids: Vec<i64> = ids.into_iter().collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Adds a promotion to the live set.
    pub async fn add_live(&self, id: i64) -> anyhow::Result<()> {
        let _: usize = self
            .conn()
            .sadd(self.keys.live_promotions(), id)
            .await
            .context("failed to register the promotion's order stream")?;
        Ok(())
    }

    /// Removes a promotion from the live set (its stream is no longer read).
    pub async fn remove_live(&self, id: i64) -> RedisResult<()> {
        let _: usize = self.conn().srem(self.keys.live_promotions(), id).await?;
        Ok(())
    }

    /// Removes the consumers of promotion `id`'s stream that hold no entry
    /// and have been idle at least `idle`; returns how many.
    pub async fn prune_consumers(&self, id: i64, idle: Duration) -> RedisResult<usize> {
        let mut removed = 0;
        for stream in self.order_streams(id).await? {
            removed += self.prune_stream_consumers(stream, idle).await?;
        }
        Ok(removed)
    }

    /// The order streams of promotion `id`: one per bucket.
    pub async fn order_streams(&self, id: i64) -> RedisResult<Vec<String>> {
        let n = self.bucket_count(id).await?;
        Ok((0..n).map(|b| self.keys.bucket(id, b).orders).collect())
    }

    async fn prune_stream_consumers(&self, stream: String, idle: Duration) -> RedisResult<usize> {
        let group = self.keys.consumer_group();
        let mut conn = self.conn();
        let reply: RedisResult<StreamInfoConsumersReply> =
            conn.xinfo_consumers(&stream, group).await;
        let consumers = match reply {
            Ok(r) => r.consumers,
            Err(e) if e.code() == Some("NOGROUP") || e.code() == Some("ERR") => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut removed = 0;
        for c in consumers {
            if c.pending == 0 && c.idle as u128 >= idle.as_millis() {
                let _: usize = conn.xgroup_delconsumer(&stream, group, &c.name).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Tells every gateway that promotion `id` changed. Best effort: the
    /// cache TTL covers a lost message.
    pub async fn publish_changed(&self, id: i64) {
        let published: RedisResult<usize> = self.conn().publish(self.keys.events(), id).await;
        if let Err(e) = published {
            tracing::warn!(promotion = id, error = %e, "failed to publish a cache invalidation");
        }
    }

    // ---- Order streams -------------------------------------------------------

    /// Reads up to `count` entries per stream never delivered before, waiting
    /// up to `block` when there are none. Every entry of the reply is
    /// returned: once read, they are pending with this consumer. `Ok(None)`
    /// when a stream has no consumer group (Redis lost it): call
    /// [`Store::create_groups`].
    ///
    /// On a cluster one `XREADGROUP` cannot span slots: each stream is read
    /// by a call of its own. With one stream the call blocks; with several
    /// the calls do not block (a blocked call would hold up the others on
    /// its node's connection) and run at once, and when none finds anything
    /// the read waits [`CLUSTER_POLL`] (at most `block`) before answering.
    pub async fn read_new(
        &self,
        consumer: &str,
        streams: &[String],
        count: usize,
        block: Duration,
    ) -> anyhow::Result<Option<Vec<Entry>>> {
        if !self.is_cluster() || streams.len() <= 1 {
            return self.read_group(consumer, streams, count, Some(block)).await;
        }
        let reads = streams
            .iter()
            .map(|s| self.read_group(consumer, std::slice::from_ref(s), count, None));
        let mut out = Vec::new();
        let mut lost_group = false;
        for read in futures_util::future::join_all(reads).await {
            match read? {
                Some(entries) => out.extend(entries),
                None => lost_group = true,
            }
        }
        if lost_group && out.is_empty() {
            return Ok(None);
        }
        if out.is_empty() {
            tokio::time::sleep(CLUSTER_POLL.min(block)).await;
        }
        Ok(Some(out))
    }

    /// One `XREADGROUP` over `streams` (one slot on a cluster), blocking up
    /// to `block` when given.
    async fn read_group(
        &self,
        consumer: &str,
        streams: &[String],
        count: usize,
        block: Option<Duration>,
    ) -> anyhow::Result<Option<Vec<Entry>>> {
        let mut options = StreamReadOptions::default()
            .group(self.keys.consumer_group(), consumer)
            .count(count);
        if let Some(block) = block {
            options = options.block(block.as_millis() as usize);
        }
        let ids = vec![">"; streams.len()];
        let reply: ReadReply = match self.conn().xread_options(streams, &ids, &options).await {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => return Ok(None),
            Err(e) => return Err(e).context("failed to read order streams"),
        };
        Ok(Some(reply.0))
    }

    /// Creates the consumer group of each stream that lacks one.
    pub async fn create_groups(&self, streams: &[String]) -> anyhow::Result<()> {
        let mut conn = self.conn();
        for stream in streams {
            let created: RedisResult<()> = conn
                .xgroup_create_mkstream(stream, self.keys.consumer_group(), "0")
                .await;
            match created {
                Ok(()) => tracing::warn!(%stream, "order stream had no consumer group; created it"),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e).context("failed to create a consumer group"),
            }
        }
        Ok(())
    }

    /// Claims up to `count` entries of `stream` another consumer has held
    /// longer than `idle`.
    pub async fn claim(
        &self,
        stream: &str,
        consumer: &str,
        idle: Duration,
        count: usize,
    ) -> anyhow::Result<Vec<Entry>> {
        let reply: RedisResult<StreamAutoClaimReply> = self
            .conn()
            .xautoclaim_options(
                stream,
                self.keys.consumer_group(),
                consumer,
                idle.as_millis() as u64,
                "0-0",
                StreamAutoClaimOptions::default().count(count),
            )
            .await;
        match reply {
            Ok(r) => Ok(r
                .claimed
                .into_iter()
                .map(|sid| Entry::new(stream, sid))
                .collect()),
            Err(e) if e.code() == Some("NOGROUP") => Ok(Vec::new()),
            Err(e) => Err(e).context("failed to claim abandoned orders"),
        }
    }

    /// Acknowledges and deletes `entries`, in one round trip; the entries of
    /// `dead` (with why) are copied to the dead-letter stream first.
    ///
    /// On a cluster the streams and the dead-letter stream are on different
    /// slots: the dead letters are written first, then each stream's entries
    /// are acknowledged and deleted in a `MULTI` of its own (a crash in
    /// between leaves them pending, to be claimed and written again: at
    /// least once, as everywhere).
    pub async fn ack(&self, entries: &[Entry], dead: &[(&Entry, &str)]) -> RedisResult<()> {
        let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for e in entries {
            by_stream.entry(&e.stream).or_default().push(&e.id);
        }
        if self.is_cluster() {
            let mut conn = self.conn();
            for (e, reason) in dead {
                let _: String = conn
                    .xadd(self.keys.dead_letters(), "*", &dead_letter(e, reason))
                    .await?;
            }
            let acks = by_stream
                .iter()
                .map(|(stream, ids)| self.ack_stream(stream, ids));
            futures_util::future::try_join_all(acks).await?;
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (e, reason) in dead {
            pipe.xadd(self.keys.dead_letters(), "*", &dead_letter(e, reason))
                .ignore();
        }
        for (stream, ids) in &by_stream {
            pipe.atomic()
                .xack(*stream, self.keys.consumer_group(), ids)
                .ignore()
                .xdel(*stream, ids)
                .ignore();
        }
        pipe.exec_async(&mut self.conn()).await
    }

    /// Cluster mode: acknowledges and deletes `ids` of `stream` in a `MULTI`
    /// of its own.
    ///
    /// The cluster client follows a `MOVED` answered to a single command
    /// (and refreshes its slot map), but not the `MOVED`s inside a
    /// transaction: those come back as one `EXECABORT`, which it does not
    /// retry. After a failover its map may still name the old primary,
    /// which came back as a replica and answers every queued command with
    /// `MOVED`: the same transaction would be refused for ever. So on
    /// `EXECABORT` one plain command to the stream's slot (`XLEN`) lets the
    /// client follow the redirect and refresh its map, and the transaction
    /// is sent once more, to the primary.
    async fn ack_stream(&self, stream: &str, ids: &[&str]) -> RedisResult<()> {
        let mut conn = self.conn();
        let transaction = || {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .xack(stream, self.keys.consumer_group(), ids)
                .ignore()
                .xdel(stream, ids)
                .ignore();
            pipe
        };
        match transaction().exec_async(&mut conn).await {
            Err(e) if e.code() == Some("EXECABORT") => {
                tracing::warn!(%stream, error = %e, "acknowledgement refused (redirected?); refreshing the cluster slot map and sending it again");
                let _: i64 = conn.xlen(stream).await?;
                transaction().exec_async(&mut conn).await
            }
            done => done,
        }
    }

    /// The length and pending count of promotion `id`'s stream.
    /// Summed over its buckets' streams.
    pub async fn stream_depth(&self, id: i64) -> RedisResult<(i64, i64)> {
        let (mut len, mut pending) = (0, 0);
        for stream in self.order_streams(id).await? {
            let (l, p) = self.one_stream_depth(stream).await?;
            len += l;
            pending += p;
        }
        Ok((len, pending))
    }

    async fn one_stream_depth(&self, stream: String) -> RedisResult<(i64, i64)> {
        let depth: RedisResult<(i64, StreamPendingReply)> = redis::pipe()
            .xlen(&stream)
            .xpending(&stream, self.keys.consumer_group())
            .query_async(&mut self.conn())
            .await;
        match depth {
            Ok((len, pending)) => Ok((len, pending.count() as i64)),
            // No stream or no group: nothing can be pending.
            Err(e) if e.code() == Some("NOGROUP") => Ok((self.conn().xlen(&stream).await?, 0)),
            Err(e) => Err(e),
        }
    }

    /// The order messages still in promotion `id`'s stream, read in pages
    /// (empty when the stream is gone).
    /// Every bucket's stream of a bucketed promotion.
    pub async fn stream_orders(&self, id: i64) -> anyhow::Result<Vec<OrderMessage>> {
        let mut out = Vec::new();
        for stream in self.order_streams(id).await? {
            out.extend(self.one_stream_orders(&stream).await?);
        }
        Ok(out)
    }

    async fn one_stream_orders(&self, stream: &str) -> anyhow::Result<Vec<OrderMessage>> {
        let mut conn = self.conn();
        let mut out = Vec::new();
        let mut start = "-".to_string();
        loop {
            let page: StreamRangeReply = conn
                .xrange_count(stream, &start, "+", CHUNK)
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
}

/// The fields of a dead letter: where the entry was, why, and its fields.
fn dead_letter(e: &Entry, reason: &str) -> Vec<(String, String)> {
    let mut fields = vec![
        ("stream".to_string(), e.stream.clone()),
        ("id".to_string(), e.id.clone()),
        ("reason".to_string(), reason.to_string()),
    ];
    fields.extend(e.fields());
    fields
}

/// How long a cluster worker waits when none of its streams had anything
/// (its reads of several streams do not block; see [`Store::read_new`]).
pub const CLUSTER_POLL: Duration = Duration::from_millis(50);

/// `PING` on a connection a pool checks before lending it again.
pub(super) async fn ping(conn: &mut impl ConnectionLike) -> RedisResult<()> {
    let _: String = redis::cmd("PING").query_async(conn).await?;
    Ok(())
}

/// `PING` on a pub/sub connection: `PONG`, or an array while subscribed.
pub(super) async fn ping_subscription(pubsub: &mut PubSub) -> RedisResult<()> {
    let _: redis::Value = pubsub.ping().await?;
    Ok(())
}

/// Names a connection in `CLIENT LIST` (`CLIENT SETNAME`; on a cluster
/// connection, on every node).
pub(super) async fn name_connection(conn: &mut impl ConnectionLike, name: &str) -> RedisResult<()> {
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(name)
        .query_async(conn)
        .await
}

/// Subscribes a listener's connection (from [`super::pool::ListenerPool`])
/// to the invalidation channel; its messages are read with
/// [`changed_promotion`].
///
/// On a cluster, a `PUBLISH` on any node reaches the subscribers of every
/// node (the cluster bus carries it), so one subscription to one node hears
/// them all, whatever the slots do (resharding moves keys, not channels).
pub async fn subscribe_changes(pubsub: &mut PubSub, keys: &Keys) -> RedisResult<()> {
    pubsub.subscribe(keys.events()).await
}

/// Ends [`subscribe_changes`], so the connection can go back to its pool.
pub async fn unsubscribe_changes(pubsub: &mut PubSub, keys: &Keys) -> RedisResult<()> {
    pubsub.unsubscribe(keys.events()).await
}

/// The promotion id an invalidation message names.
pub fn changed_promotion(msg: &redis::Msg) -> RedisResult<i64> {
    msg.get_payload::<i64>()
}
