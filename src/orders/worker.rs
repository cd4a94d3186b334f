//! The order worker: reads order messages from every live promotion's stream
//! and writes them to PostgreSQL.
//!
//! The loop per batch: `XREADGROUP` (or `XAUTOCLAIM` of entries a dead
//! consumer left pending) → one `INSERT … ON CONFLICT DO NOTHING` → commit →
//! `XACK` + `XDEL`. An entry is acknowledged only after its row is committed,
//! so a crash at any point leaves it pending, to be claimed and written again;
//! the insert skips rows already there, so the effect is exactly once.
//! A failed insert is retried with backoff, never dropped.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::message::OrderMessage;
use super::repo;
use crate::stock::Keys;

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
        }
    }
}

/// One stream entry in hand: where it came from and what it says.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stream: String,
    pub id: String,
    /// `None` when the entry is malformed (it goes to the dead-letter stream).
    pub message: Option<OrderMessage>,
    raw: Vec<(String, String)>,
}

impl Entry {
    fn new(stream: &str, sid: StreamId) -> Entry {
        let message = OrderMessage::from_fields(&sid.map);
        // The raw fields are kept only for the dead-letter copy of a
        // malformed entry: a well-formed one would pay an allocation per field.
        let raw = if message.is_some() {
            Vec::new()
        } else {
            sid.map
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:?}")))
                .collect()
        };
        Entry {
            stream: stream.to_string(),
            id: sid.id,
            message,
            raw,
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
    /// A connection of its own: `XREADGROUP … BLOCK` holds it, and its
    /// response timeout is longer than the block.
    redis: ConnectionManager,
    db: PgPool,
    keys: Keys,
    consumer: String,
    config: WorkerConfig,
    streams: Vec<String>,
    refreshed_at: Option<Instant>,
    claimed_at: Option<Instant>,
}

impl Worker {
    /// Connects a worker named `consumer` (unique per process and task).
    pub async fn connect(
        redis_url: &str,
        db: PgPool,
        keys: Keys,
        consumer: String,
        config: WorkerConfig,
    ) -> anyhow::Result<Worker> {
        let client = redis::Client::open(redis_url).context("invalid redis url")?;
        let conn_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.block + Duration::from_secs(5)))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let redis = ConnectionManager::new_with_config(client, conn_config)
            .await
            .context("failed to connect the order worker to redis")?;
        Ok(Worker {
            redis,
            db,
            keys,
            consumer,
            config,
            streams: Vec::new(),
            refreshed_at: None,
            claimed_at: None,
        })
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Runs until `shutdown`; the batch in hand is finished (committed and
    /// acknowledged) or left pending for another consumer, never half.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tracing::info!(consumer = %self.consumer, "order worker started");
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            match self.step(&shutdown).await {
                Ok(_) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(consumer = %self.consumer, error = %format!("{e:#}"), "order worker step failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::info!(consumer = %self.consumer, "order worker stopped");
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
            tokio::select! {
                _ = tokio::time::sleep(self.config.block) => {}
                _ = shutdown.cancelled() => {}
            }
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
        self.persist(&entries, shutdown).await?;
        self.ack(&entries, shutdown).await?;
        metrics::counter!("seckill_orders_acknowledged_total").increment(n as u64);
        Ok(Outcome::Processed(n))
    }

    /// Reads the set of live promotions again: their streams are the ones read.
    pub async fn refresh_streams(&mut self) -> anyhow::Result<()> {
        let mut ids: Vec<i64> = redis::cmd("SMEMBERS")
            .arg(self.keys.live_promotions())
            .query_async(&mut self.redis)
            .await
            .context("failed to list live promotions")?;
        ids.sort_unstable();
        self.streams = ids
            .iter()
            .map(|id| self.keys.promotion(*id).orders)
            .collect();
        self.refreshed_at = Some(Instant::now());
        Ok(())
    }

    /// Reads up to a batch of entries never delivered before.
    pub async fn read_new(&mut self) -> anyhow::Result<Vec<Entry>> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.keys.consumer_group())
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.config.batch)
            .arg("BLOCK")
            .arg(self.config.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.streams);
        for _ in &self.streams {
            cmd.arg(">");
        }
        let reply: Option<StreamReadReply> = match cmd.query_async(&mut self.redis).await {
            Ok(r) => r,
            Err(e) if e.code() == Some("NOGROUP") => {
                // Redis lost a stream (deleted, or restarted without
                // persistence): create the group again so reading resumes.
                self.recreate_groups().await?;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e).context("failed to read order streams"),
        };
        let mut out = Vec::new();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for sid in key.ids {
                out.push(Entry::new(&key.key, sid));
            }
            if out.len() >= self.config.batch {
                break;
            }
        }
        Ok(out)
    }

    async fn recreate_groups(&mut self) -> anyhow::Result<()> {
        self.refresh_streams().await?;
        for stream in &self.streams {
            let created: redis::RedisResult<()> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(stream)
                .arg(self.keys.consumer_group())
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.redis)
                .await;
            match created {
                Ok(()) => tracing::warn!(%stream, "order stream had no consumer group; created it"),
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                Err(e) => return Err(e).context("failed to create a consumer group"),
            }
        }
        Ok(())
    }

    /// Claims entries another consumer has held longer than `claim_idle`
    /// (its worker died between reading and acknowledging).
    pub async fn claim_abandoned(&mut self) -> anyhow::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for stream in self.streams.clone() {
            let reply: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                .arg(&stream)
                .arg(self.keys.consumer_group())
                .arg(&self.consumer)
                .arg(self.config.claim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.config.batch - out.len())
                .query_async(&mut self.redis)
                .await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) if e.code() == Some("NOGROUP") => continue,
                Err(e) => return Err(e).context("failed to claim abandoned orders"),
            };
            if !reply.claimed.is_empty() {
                tracing::info!(%stream, claimed = reply.claimed.len(), "claimed abandoned order entries");
                metrics::counter!("seckill_orders_claimed_total")
                    .increment(reply.claimed.len() as u64);
            }
            out.extend(
                reply
                    .claimed
                    .into_iter()
                    .map(|sid| Entry::new(&stream, sid)),
            );
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
    ) -> anyhow::Result<u64> {
        let batch: Vec<&OrderMessage> = entries.iter().filter_map(|e| e.message.as_ref()).collect();
        let mut backoff = Duration::from_millis(50);
        loop {
            let started = Instant::now();
            match repo::insert_batch(&self.db, &batch).await {
                Ok(inserted) => {
                    metrics::histogram!("seckill_worker_batch_size").record(batch.len() as f64);
                    metrics::histogram!("seckill_db_write_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("seckill_orders_persisted_total").increment(inserted);
                    return Ok(inserted);
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), batch = batch.len(), "order batch not written; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {
                            return Err(e.context("shutting down with the batch unwritten; left pending"));
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Acknowledges and deletes written entries; malformed ones are copied to
    /// the dead-letter stream first.
    pub async fn ack(
        &mut self,
        entries: &[Entry],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let mut by_stream: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for e in entries {
            by_stream.entry(&e.stream).or_default().push(&e.id);
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut pipe = redis::pipe();
            for e in entries.iter().filter(|e| e.message.is_none()) {
                tracing::error!(stream = %e.stream, id = %e.id, "malformed order entry moved to the dead-letter stream");
                let mut fields = vec![
                    ("stream".to_string(), e.stream.clone()),
                    ("id".to_string(), e.id.clone()),
                ];
                fields.extend(e.raw.iter().cloned());
                pipe.xadd(self.keys.dead_letters(), "*", &fields).ignore();
            }
            for (stream, ids) in &by_stream {
                pipe.atomic()
                    .xack(*stream, self.keys.consumer_group(), ids)
                    .ignore()
                    .xdel(*stream, ids)
                    .ignore();
            }
            match pipe.exec_async(&mut self.redis).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "acknowledging written orders failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {
                            // Written but not acknowledged: a redelivery is
                            // skipped by the insert, so nothing is lost or doubled.
                            return Err(anyhow::Error::from(e).context("shutting down before the acknowledgement"));
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Publishes each live promotion's stream length and pending count as
/// gauges, every `every` until `shutdown`.
pub async fn observe_streams(
    mut redis: ConnectionManager,
    keys: Keys,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = observe_once(&mut redis, &keys).await {
            tracing::debug!(error = %format!("{e:#}"), "stream gauges not updated");
        }
    }
}

async fn observe_once(redis: &mut ConnectionManager, keys: &Keys) -> anyhow::Result<()> {
    let ids: Vec<i64> = redis::cmd("SMEMBERS")
        .arg(keys.live_promotions())
        .query_async(redis)
        .await?;
    for id in ids {
        let stream = keys.promotion(id).orders;
        let (len, pending): (i64, redis::Value) = redis::pipe()
            .xlen(&stream)
            .cmd("XPENDING")
            .arg(&stream)
            .arg(keys.consumer_group())
            .query_async(redis)
            .await?;
        let pending = match pending {
            redis::Value::Array(items) => match items.first() {
                Some(redis::Value::Int(n)) => *n,
                _ => 0,
            },
            _ => 0,
        };
        let label = id.to_string();
        metrics::gauge!("seckill_stream_length", "promotion" => label.clone()).set(len as f64);
        metrics::gauge!("seckill_stream_pending", "promotion" => label).set(pending as f64);
    }
    Ok(())
}
