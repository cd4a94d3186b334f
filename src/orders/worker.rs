//! The order worker: reads order messages from every live promotion's stream
//! and writes them to PostgreSQL.
//!
//! The loop per batch: `XREADGROUP` (or `XAUTOCLAIM` of entries a dead
//! consumer left pending) → one `INSERT … ON CONFLICT DO NOTHING` → commit →
//! `XACK` + `XDEL`. An entry is acknowledged only after its row is committed,
//! so a crash at any point leaves it pending, to be claimed and written again;
//! the insert skips rows already there, so the effect is exactly once.
//! A failed insert is retried with backoff, never dropped.

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::repo::{self, Inserted};
use crate::pace::{self, Backoff};
use crate::telemetry::{self, context as trace};
use tracing::Instrument as _;

/// Failed steps in a row after which a worker takes a fresh Redis
/// connection from its pool even though none reported a dropped connection
/// (see [`Worker::reconnect`]).
const RECONNECT_AFTER: u32 = 3;

/// Why a malformed entry is in the dead-letter stream.
const MALFORMED: &str = "malformed";

use crate::stock::pool::Lease;
use crate::stock::{Entry, Keys, OrderMessage, Store, WorkerPool};

/// How a worker paces itself.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Entries read and written per batch.
    pub batch: usize,
    /// How long `XREADGROUP` blocks on empty streams.
    pub block: Duration,
    /// Entries pending longer than this with another consumer are claimed.
    pub claim_idle: Duration,
    /// How often the worker looks for abandoned entries.
    pub claim_every: Duration,
    /// How often the list of live promotions is read again.
    pub refresh_every: Duration,
    /// On shutdown, how long the worker goes on writing what is left in the
    /// streams (the gateway in the same process has drained its requests by
    /// then) before it stops.
    pub drain: Duration,
}

impl WorkerConfig {
    pub fn from_settings(s: &crate::config::Settings) -> Self {
        WorkerConfig {
            batch: s.worker_batch,
            block: s.worker_block,
            claim_idle: s.claim_idle,
            claim_every: (s.claim_idle / 2)
                .clamp(Duration::from_millis(100), Duration::from_secs(10)),
            refresh_every: Duration::from_secs(1),
            drain: s.shutdown_grace,
        }
    }
}

/// What one step of the loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// This many entries were written (or skipped as already written) and acknowledged.
    Processed(usize),
    /// Nothing to do.
    Empty,
}

/// One stream consumer.
pub struct Worker {
    /// The worker's own connection, lent by `pool`: `XREADGROUP … BLOCK`
    /// holds it, and its reply timeout is longer than the block.
    lease: Lease,
    /// A store on `lease`'s connection.
    store: Store,
    /// Where a fresh connection comes from when this one fails.
    pool: WorkerPool,
    keys: Keys,
    db: PgPool,
    consumer: String,
    config: WorkerConfig,
    streams: Vec<String>,
    refreshed_at: Option<Instant>,
    claimed_at: Option<Instant>,
}

impl Worker {
    /// A worker named `consumer` (unique per process and task), on a
    /// connection from `pool` (see `WorkerPool::new`, sized to the workers).
    pub async fn connect(
        pool: WorkerPool,
        db: PgPool,
        keys: Keys,
        consumer: String,
        config: WorkerConfig,
    ) -> anyhow::Result<Worker> {
        let lease = pool
            .lease()
            .await
            .context("failed to connect the order worker to redis")?;
        Ok(Worker {
            store: Store::new(lease.conn(), keys.clone()),
            lease,
            pool,
            keys,
            db,
            consumer,
            config,
            streams: Vec::new(),
            refreshed_at: None,
            claimed_at: None,
        })
    }

    /// Runs until `shutdown`, then drains: it goes on reading and writing
    /// until the streams have nothing new or `drain` has passed. The batch
    /// in hand is finished (committed and acknowledged) or left pending for
    /// another consumer, never half.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(consumer = %self.consumer, "order worker started");
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            match self.step(&shutdown).await {
                Ok(_) => {
                    backoff.reset();
                    failures = 0;
                }
                Err(e) => {
                    tracing::warn!(consumer = %self.consumer, error = %format!("{e:#}"), "order worker step failed; retrying");
                    failures += 1;
                    if connection_lost(&e) || failures % RECONNECT_AFTER == 0 {
                        self.reconnect().await;
                    }
                    backoff.wait(&shutdown).await;
                }
            }
        }
        let drained = tokio::time::timeout(self.config.drain, self.drain()).await;
        if drained.is_err() {
            tracing::warn!(consumer = %self.consumer, "stopped before the streams were drained; the rest stays for the next worker");
        }
        tracing::info!(consumer = %self.consumer, "order worker stopped");
    }

    /// Takes a fresh Redis connection from the pool and throws the old one
    /// away. On a cluster the new connection learns the slot map afresh from
    /// the seeds: whatever state the old one was stuck in (a map naming a
    /// primary that is now a replica, a node it kept reconnecting to) goes
    /// with it. When no connection can be had, the worker keeps the old one
    /// and tries again at its next failure.
    async fn reconnect(&mut self) {
        match self.pool.lease().await {
            Ok(lease) => {
                let old = std::mem::replace(&mut self.lease, lease);
                self.store = Store::new(self.lease.conn(), self.keys.clone());
                old.discard();
                tracing::warn!(consumer = %self.consumer, "order worker took a fresh redis connection after a failure");
            }
            Err(e) => {
                tracing::warn!(consumer = %self.consumer, error = %format!("{e:#}"), "order worker could not reconnect to redis");
            }
        }
    }

    /// Writes what is left in the streams until a read finds nothing new.
    async fn drain(&mut self) {
        // Not cancelled: the caller bounds the drain with a timeout.
        let never = CancellationToken::new();
        // The claim pass is not due on the way out; a promotion created since
        // the last refresh may have orders.
        self.claimed_at = Some(Instant::now());
        if let Err(e) = self.refresh_streams().await {
            tracing::warn!(consumer = %self.consumer, error = %format!("{e:#}"), "order worker drain failed");
            return;
        }
        loop {
            match self.step(&never).await {
                Ok(Outcome::Processed(_)) => {}
                Ok(Outcome::Empty) => return,
                Err(e) => {
                    tracing::warn!(consumer = %self.consumer, error = %format!("{e:#}"), "order worker drain failed");
                    return;
                }
            }
        }
    }

    /// One turn of the loop: claim abandoned entries when due, else read new
    /// ones; write and acknowledge them.
    #[tracing::instrument(skip_all, fields(consumer = %self.consumer, entries = tracing::field::Empty))]
    pub async fn step(&mut self, shutdown: &CancellationToken) -> anyhow::Result<Outcome> {
        let due = self
            .refreshed_at
            .is_none_or(|t| t.elapsed() >= self.config.refresh_every);
        if due {
            self.refresh_streams().await?;
        }
        if self.streams.is_empty() {
            pace::sleep(self.config.block, shutdown).await;
            return Ok(Outcome::Empty);
        }
        let due = self
            .claimed_at
            .is_none_or(|t| t.elapsed() >= self.config.claim_every);
        let entries = if due {
            self.claimed_at = Some(Instant::now());
            let claimed = self.claim_abandoned().await?;
            if claimed.is_empty() {
                self.read_new().await?
            } else {
                claimed
            }
        } else {
            self.read_new().await?
        };
        if entries.is_empty() {
            return Ok(Outcome::Empty);
        }
        let n = entries.len();
        tracing::Span::current().record("entries", n);
        let inserted = self.persist(&entries, shutdown).await?;
        let mut dead: Vec<(&Entry, &str)> = entries
            .iter()
            .filter(|e| e.message.is_none())
            .map(|e| (e, MALFORMED))
            .collect();
        let written: Vec<&Entry> = entries.iter().filter(|e| e.message.is_some()).collect();
        for &(i, why) in &inserted.refused {
            let e = written[i];
            tracing::error!(stream = %e.stream, id = %e.id, order = ?e.message, reason = why.reason(), "postgresql refused an order; moved to the dead-letter stream");
            dead.push((e, why.reason()));
        }
        if !inserted.refused.is_empty() {
            metrics::counter!("seckill_orders_refused_total")
                .increment(inserted.refused.len() as u64);
        }
        self.ack(&entries, &dead, shutdown).await?;
        metrics::counter!("seckill_orders_acknowledged_total").increment(n as u64);
        Ok(Outcome::Processed(n))
    }

    /// Reads the set of live promotions again: their streams are the ones read.
    pub async fn refresh_streams(&mut self) -> anyhow::Result<()> {
        let ids = self
            .store
            .live_promotions()
            .await
            .context("failed to list live promotions")?;
        let mut streams = Vec::with_capacity(ids.len());
        for id in ids {
            // A bucketed promotion has one stream per bucket.
            streams.extend(
                self.store
                    .order_streams(id)
                    .await
                    .context("failed to list a promotion's order streams")?,
            );
        }
        self.streams = streams;
        self.refreshed_at = Some(Instant::now());
        Ok(())
    }

    /// Reads up to a batch per stream of entries never delivered before.
    pub async fn read_new(&mut self) -> anyhow::Result<Vec<Entry>> {
        let read = self
            .store
            .read_new(
                &self.consumer,
                &self.streams,
                self.config.batch,
                self.config.block,
            )
            .await?;
        match read {
            Some(entries) => Ok(entries),
            None => {
                // Redis lost a stream (deleted, or restarted without
                // persistence): create the group again so reading resumes.
                self.refresh_streams().await?;
                self.store.create_groups(&self.streams).await?;
                Ok(Vec::new())
            }
        }
    }

    /// Claims entries another consumer has held longer than `claim_idle`
    /// (its worker died between reading and acknowledging).
    pub async fn claim_abandoned(&mut self) -> anyhow::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for stream in &self.streams {
            let claimed = self
                .store
                .claim(
                    stream,
                    &self.consumer,
                    self.config.claim_idle,
                    self.config.batch - out.len(),
                )
                .await?;
            if !claimed.is_empty() {
                tracing::info!(%stream, claimed = claimed.len(), "claimed abandoned order entries");
                metrics::counter!("seckill_orders_claimed_total").increment(claimed.len() as u64);
            }
            out.extend(claimed);
            if out.len() >= self.config.batch {
                break;
            }
        }
        Ok(out)
    }

    /// Writes the orders of `entries` in one statement, retrying with backoff
    /// until it commits. Gives up only on shutdown, leaving the entries
    /// pending for another consumer.
    pub async fn persist(
        &self,
        entries: &[Entry],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Inserted> {
        let batch: Vec<&OrderMessage> = entries.iter().filter_map(|e| e.message.as_ref()).collect();
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let span = insert_span(&batch);
        loop {
            let started = Instant::now();
            match repo::insert_batch(&self.db, &batch)
                .instrument(span.clone())
                .await
            {
                Ok(inserted) => {
                    metrics::histogram!("seckill_worker_batch_size").record(batch.len() as f64);
                    metrics::histogram!("seckill_db_write_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("seckill_orders_persisted_total").increment(inserted.rows);
                    return Ok(inserted);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), batch = batch.len(), "order batch not written; retrying");
                    if !backoff.wait(shutdown).await {
                        return Err(
                            e.context("shutting down with the batch unwritten; left pending")
                        );
                    }
                }
            }
        }
    }

    /// Acknowledges and deletes written entries; the `dead` ones (malformed,
    /// or refused by PostgreSQL) are copied to the dead-letter stream first.
    pub async fn ack(
        &mut self,
        entries: &[Entry],
        dead: &[(&Entry, &str)],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        for (e, reason) in dead {
            tracing::error!(stream = %e.stream, id = %e.id, reason, "order entry moved to the dead-letter stream");
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        let mut failures = 0;
        loop {
            match self.store.ack(entries, dead).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "acknowledging written orders failed; retrying");
                    failures += 1;
                    if drops_connection(&e) || failures % RECONNECT_AFTER == 0 {
                        self.reconnect().await;
                    }
                    if !backoff.wait(shutdown).await {
                        // Written but not acknowledged: a redelivery is
                        // skipped by the insert, so nothing is lost or doubled.
                        return Err(anyhow::Error::from(e)
                            .context("shutting down before the acknowledgement"));
                    }
                }
            }
        }
    }
}

/// Publishes each live promotion's stream length and pending count as
/// gauges every `every`, and prunes the live set and the idle consumers
/// (see [`prune_once`]), until `shutdown`.
pub async fn observe_streams(store: Store, every: Duration, shutdown: CancellationToken) {
    while pace::sleep(every, &shutdown).await {
        if let Err(e) = observe_once(&store).await {
            tracing::debug!(error = %format!("{e:#}"), "stream gauges not updated");
        }
        if let Err(e) = prune_once(&store, chrono::Utc::now(), CONSUMER_IDLE).await {
            tracing::debug!(error = %format!("{e:#}"), "live set not pruned");
        }
    }
}

async fn observe_once(store: &Store) -> anyhow::Result<()> {
    for id in store.live_promotions().await? {
        let (len, pending) = store.stream_depth(id).await?;
        let label = id.to_string();
        metrics::gauge!("seckill_stream_length", "promotion" => label.clone()).set(len as f64);
        metrics::gauge!("seckill_stream_pending", "promotion" => label).set(pending as f64);
    }
    Ok(())
}

/// A consumer idle this long with nothing pending is gone (every process
/// names its consumers afresh at start-up).
const CONSUMER_IDLE: Duration = Duration::from_secs(600);

/// How long after a promotion's end its stream is still read, whatever the
/// clocks' disagreement.
const ENDED_MARGIN: chrono::Duration = chrono::Duration::minutes(1);

/// One pruning pass at `now`: removes from the live set every promotion that
/// ended (with a margin) and whose stream is empty with nothing pending, or
/// whose state Redis no longer has (recovery adds it back when it rebuilds
/// it); removes the consumers idle at least `idle` with nothing pending.
/// Returns the promotions removed.
pub async fn prune_once(
    store: &Store,
    now: chrono::DateTime<chrono::Utc>,
    idle: Duration,
) -> anyhow::Result<Vec<i64>> {
    let mut removed = Vec::new();
    for id in store.live_promotions().await? {
        let (len, pending) = store.stream_depth(id).await?;
        let over = match store.meta(id).await? {
            Some(meta) => meta.ends_ms < (now - ENDED_MARGIN).timestamp_millis(),
            None => true,
        };
        if over && len == 0 && pending == 0 {
            store.remove_live(id).await?;
            removed.push(id);
            continue;
        }
        let gone = store.prune_consumers(id, idle).await?;
        if gone > 0 {
            tracing::info!(
                promotion = id,
                consumers = gone,
                "removed idle stream consumers"
            );
        }
    }
    if !removed.is_empty() {
        tracing::info!(promotions = ?removed, "ended promotions' drained streams are no longer read");
    }
    Ok(removed)
}

/// The span of one batch insert. With trace export on, it links to the
/// request of every order that carried a trace context in its stream entry,
/// so a purchase and its persistence are one story; with it off, there is
/// no span (nothing to pay per batch).
fn insert_span(batch: &[&OrderMessage]) -> tracing::Span {
    if !telemetry::otlp::enabled() {
        return tracing::Span::none();
    }
    // A root: the worker loop's own span is not exported (see telemetry).
    let span = tracing::info_span!(parent: None, "insert_orders", orders = batch.len());
    for m in batch {
        if let Some(cx) = m.traceparent.as_deref().and_then(trace::parse_traceparent) {
            trace::link(&span, &cx);
        }
    }
    span
}

/// Whether `e` says the worker's Redis connection is gone (closed, reset,
/// refused): a pooled connection does not reconnect by itself, so the worker
/// takes another at once rather than after [`RECONNECT_AFTER`] failures.
fn connection_lost(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<redis::RedisError>())
        .any(drops_connection)
}

/// Whether a Redis error means its connection must be replaced.
fn drops_connection(e: &redis::RedisError) -> bool {
    e.is_connection_dropped() || e.is_connection_refusal() || e.is_unrecoverable_error()
}
