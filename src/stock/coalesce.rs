//! Purchase coalescing: concurrent purchases of one promotion go to Redis
//! together, as one call of `lua/purchase.lua` with a list of buyers.
//!
//! Group commit without a timer. A purchase that finds fewer than
//! [`MAX_CALLS`] calls of its promotion in flight starts one at once, so a
//! lone buyer waits for nothing. Purchases that arrive while calls are in
//! flight queue up, first come first served, and leave together in the next
//! call, at most `max_batch` buyers each: the busier the sale, the fuller the
//! calls, and Redis runs one script per batch instead of one per buyer.
//!
//! The script takes the buyers one after another inside one atomic step, so
//! every check of a one-buyer call (window, per-user limit, stock) holds for
//! each buyer of a batch, also for one buyer queued twice in the same batch.
//! When the call fails, every buyer of the batch gets the error (a `503`):
//! the script ran for all of them or for none.
//!
//! A bucketed promotion queues per bucket: each buyer goes to the bucket
//! [`buckets::bucket_of`] names, and a batch is one call on that bucket's
//! keys. When buyers of a batch find their bucket dry, the batch moves units
//! over from the other buckets ([`buckets::refill`]) and asks again for them;
//! they are sold out only when no other bucket had a unit to give.
//!
//! With trace export on, each buyer brings its request span's context; the
//! call's span (`purchase_script`) is a child of the first buyer's request
//! and has a span link to every buyer's request, and each buyer's
//! `traceparent` goes into its order message, where the worker picks it up.
//! With export off none of this happens: no context is read, and the script
//! gets exactly the arguments it got before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use opentelemetry::trace::SpanContext;
use redis::RedisError;
use tokio::sync::oneshot;
use tracing::Instrument as _;

use super::buckets;
use super::store::{Buyer, Outcome, Store};
use crate::telemetry::context as trace;

/// Script calls of one promotion in flight at once: while Redis runs one
/// batch, the next one is already on its way.
pub const MAX_CALLS: usize = 2;

type Answer = Result<Outcome, Arc<RedisError>>;

/// The buyer's request span, when traces are exported.
type Trace = Option<SpanContext>;

/// The error a buyer gets when its call ended without an answer for it.
fn no_answer() -> Arc<RedisError> {
    Arc::new(RedisError::from((
        redis::ErrorKind::Client,
        "the purchase call ended without an answer",
    )))
}

/// The buyers of one promotion waiting for a call, and the calls in flight.
#[derive(Default)]
struct Queue {
    waiting: Vec<(Buyer, oneshot::Sender<Answer>, Trace)>,
    calls: usize,
    /// Buyers in the calls in flight.
    sending: usize,
}

/// Sends the purchases of every promotion to Redis, coalesced.
pub struct Coalescer {
    store: Store,
    max_batch: usize,
    /// By promotion and bucket.
    queues: Mutex<HashMap<(i64, u32), Queue>>,
}

impl Coalescer {
    /// `max_batch` buyers at most per script call; 1 sends each purchase
    /// alone, as soon as it comes.
    pub fn new(store: Store, max_batch: usize) -> Arc<Coalescer> {
        Arc::new(Coalescer {
            store,
            max_batch: max_batch.max(1),
            queues: Mutex::new(HashMap::new()),
        })
    }

    /// Buyers of promotion `id` waiting for a call or in a call in flight.
    pub fn pending(&self, id: i64) -> usize {
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues
            .iter()
            .filter(|((p, _), _)| *p == id)
            .map(|(_, q)| q.waiting.len() + q.sending)
            .sum()
    }

    /// The outcome of `buyer`'s purchase in promotion `id` (not split).
    pub async fn purchase(self: &Arc<Self>, id: i64, buyer: Buyer) -> Answer {
        self.purchase_split(id, 1, buyer).await
    }

    /// The outcome of `buyer`'s purchase in promotion `id`, whose stock is
    /// split into `buckets` buckets (1: not split).
    pub async fn purchase_split(self: &Arc<Self>, id: i64, buckets: u32, buyer: Buyer) -> Answer {
        let bucket = buckets::bucket_of(buyer.user_id, buckets);
        let id = (id, bucket);
        let trace = trace::current_span_context();
        if self.max_batch == 1 {
            let outcomes = self
                .call(id, buckets, std::slice::from_ref(&buyer), &[trace])
                .await
                .map_err(Arc::new)?;
            return outcomes.into_iter().next().ok_or_else(no_answer);
        }
        let (tx, rx) = oneshot::channel();
        let start_call = {
            let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
            let queue = queues.entry(id).or_default();
            queue.waiting.push((buyer, tx, trace));
            if queue.calls < MAX_CALLS {
                queue.calls += 1;
                true
            } else {
                false
            }
        };
        if start_call {
            // A task of its own: the call must finish and answer every buyer
            // of its batch even if this request is dropped meanwhile.
            tokio::spawn(Arc::clone(self).send_batches(id, buckets));
        }
        rx.await.unwrap_or_else(|_| Err(no_answer()))
    }

    /// One call of `lua/purchase.lua` for `buyers` on bucket `id.1`,
    /// recorded in the Lua latency histogram; for a bucketed promotion, the
    /// buyers who found the bucket dry are asked again after each transfer
    /// that brought units, until none is sold out or no bucket has a unit.
    /// `traces` are the buyers' request spans, in order (empty: none).
    async fn call(
        &self,
        id: (i64, u32),
        buckets: u32,
        buyers: &[Buyer],
        traces: &[Trace],
    ) -> redis::RedisResult<Vec<Outcome>> {
        let (promotion, bucket) = id;
        let mut outcomes = self.call_once(id, buyers, traces).await?;
        if buckets <= 1 {
            return Ok(outcomes);
        }
        loop {
            let dry: Vec<usize> = (0..outcomes.len())
                .filter(|i| outcomes[*i] == Outcome::SoldOut)
                .collect();
            if dry.is_empty() {
                return Ok(outcomes);
            }
            let moved = buckets::refill(&self.store, promotion, buckets, bucket, dry.len()).await?;
            if moved == 0 {
                return Ok(outcomes);
            }
            let again: Vec<Buyer> = dry.iter().map(|i| buyers[*i].clone()).collect();
            let again_traces: Vec<Trace> = if traces.is_empty() {
                Vec::new()
            } else {
                dry.iter().map(|i| traces[*i].clone()).collect()
            };
            let answers = self.call_once(id, &again, &again_traces).await?;
            for (i, outcome) in dry.into_iter().zip(answers) {
                outcomes[i] = outcome;
            }
        }
    }

    /// One script call on bucket `id.1`, inside a `purchase_script` span
    /// linked to every buyer's request when traces are exported.
    async fn call_once(
        &self,
        id: (i64, u32),
        buyers: &[Buyer],
        traces: &[Trace],
    ) -> redis::RedisResult<Vec<Outcome>> {
        let started = Instant::now();
        let outcomes = if traces.iter().any(Option::is_some) {
            let span =
                tracing::info_span!("purchase_script", promotion = id.0, buyers = buyers.len());
            if let Some(first) = traces.iter().flatten().next() {
                trace::set_parent(&span, first);
            }
            let mut parents = Vec::with_capacity(traces.len());
            for t in traces {
                match t {
                    Some(cx) => {
                        trace::link(&span, cx);
                        parents.push(trace::format_traceparent(cx));
                    }
                    None => parents.push(String::new()),
                }
            }
            self.store
                .purchase_in(id.0, id.1, buyers, &parents)
                .instrument(span)
                .await
        } else {
            self.store.purchase_in(id.0, id.1, buyers, &[]).await
        };
        metrics::histogram!("seckill_lua_seconds", "script" => "purchase")
            .record(started.elapsed().as_secs_f64());
        outcomes
    }

    /// Sends the waiting buyers of promotion `id`, a batch per call, until
    /// none is left.
    async fn send_batches(self: Arc<Self>, id: (i64, u32), buckets: u32) {
        loop {
            let batch: Vec<_> = {
                let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                let Some(queue) = queues.get_mut(&id) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queue.calls -= 1;
                    if queue.calls == 0 {
                        queues.remove(&id);
                    }
                    return;
                }
                let n = queue.waiting.len().min(self.max_batch);
                queue.sending += n;
                queue.waiting.drain(..n).collect()
            };
            let n = batch.len();
            let mut buyers = Vec::with_capacity(n);
            let mut replies = Vec::with_capacity(n);
            // Empty (no allocation) while traces are not exported.
            let mut traces = Vec::new();
            for (buyer, reply, trace) in batch {
                buyers.push(buyer);
                replies.push(reply);
                if trace.is_some() {
                    traces.resize(buyers.len() - 1, None);
                    traces.push(trace);
                }
            }
            if !traces.is_empty() {
                traces.resize(n, None);
            }
            let result = self.call(id, buckets, &buyers, &traces).await;
            if let Some(queue) = self
                .queues
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&id)
            {
                queue.sending -= n;
            }
            match result {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        // A buyer who went away still bought: its order is
                        // in the stream and its result in Redis.
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for reply in replies {
                        let _ = reply.send(Err(Arc::clone(&e)));
                    }
                }
            }
        }
    }
}
