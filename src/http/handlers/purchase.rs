//! `POST /api/promotions/{id}/purchase` (the hot path) and
//! `GET /api/promotions/{id}/result`.
//!
//! The purchase path touches only Redis, and only once: the local cache
//! answers unknown, not-started, ended and recently sold-out promotions,
//! before the JWT is verified or the body read (these are public facts);
//! what passes runs `lua/purchase.lua`, which decides atomically.

use hyper::StatusCode;
use serde::Deserialize;

use crate::http::request::Request;
use crate::http::{ApiError, Response, json};
use crate::orders::repo as orders;
use crate::promotions::cache::SoldOut;
use crate::stock::{Buyer, Outcome, buckets};

/// The purchase body: `{}` or `{"token": "..."}`. There is no quantity: one
/// call buys one unit, and unknown fields are refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PurchaseBody {
    token: Option<String>,
}

pub async fn purchase(req: Request) -> Result<Response, ApiError> {
    let id = req.id()?;
    let state = req.state.clone();
    // The public facts first (API.md lets them come before the JWT check):
    // unknown, outside the window, sold out. None of them reads the body,
    // verifies a JWT or takes an in-flight permit, so a crowd refused after
    // the sale costs the gateway little more than `GET /health`.
    let meta = super::sale_meta(&state, id).await?;
    // Surely outside the window by Redis's clock: refused here. Near its
    // edges, the script decides.
    match state.clock.outside(meta.starts_ms, meta.ends_ms) {
        Some(true) => return Err(rejected(ApiError::not_started())),
        Some(false) => return Err(rejected(ApiError::ended())),
        None => {}
    }
    let probe = match state.cache.sold_out(id).await {
        SoldOut::Fresh => return Err(rejected(ApiError::sold_out())),
        SoldOut::Probe(guard) => Some(guard),
        SoldOut::NotFlagged => None,
    };

    // Whatever reads or changes the buyer's state: a valid JWT first.
    let user_id = req.user()?;
    if let Err(limited) = state.limits.check_user(user_id) {
        return Err(rejected(limited.into()));
    }
    let body: PurchaseBody = req.json().await?;

    let Ok(_permit) = state.inflight.try_acquire() else {
        metrics::counter!("seckill_purchases_total", "outcome" => "overloaded").increment(1);
        return Err(ApiError::unavailable("too many purchases in flight"));
    };

    let now_ms = state.clock.now_ms();
    if meta.require_token
        && let Err(why) = state
            .tokens
            .verify(body.token.as_deref(), id, user_id, now_ms)
    {
        tracing::debug!(
            promotion = id,
            user = user_id,
            ?why,
            "admission token refused"
        );
        return Err(rejected(ApiError::invalid_token()));
    }
    // Only what will reach Redis counts against the ceiling that protects it.
    if let Err(limited) = state.limits.check_global() {
        return Err(rejected(limited.into()));
    }

    let buyer = Buyer {
        user_id,
        order_id: uuid::Uuid::now_v7().to_string(),
    };
    let outcome = state
        .purchases
        .purchase_split(id, meta.buckets, buyer)
        .await?;

    match outcome {
        Outcome::Bought { order_id } => {
            if probe.is_some() {
                // The flag had aged and stock was there after all.
                state.cache.clear_sold_out(id).await;
            }
            metrics::counter!("seckill_purchases_total", "outcome" => "bought").increment(1);
            tracing::debug!(promotion = id, user = user_id, %order_id, "bought");
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({"order_id": order_id, "status": "pending"}),
            ))
        }
        Outcome::SoldOut => {
            // A bucketed promotion is sold out only when no bucket has a
            // unit and none is in transit; the buyer's bucket being dry
            // after the transfers is not enough to flag the whole sale.
            if meta.buckets <= 1 || buckets::is_dry(&state.store, id, meta.buckets).await? {
                state.cache.mark_sold_out(id).await;
            }
            Err(rejected(outcome.into()))
        }
        Outcome::Unknown => {
            // The cache knew the promotion but Redis has no state for it:
            // forget what the cache knows, so the next request asks again.
            state.cache.invalidate(id).await;
            Err(outcome.into())
        }
        refused => Err(rejected(refused.into())),
    }
}

/// Every `outcome` label of `seckill_purchases_total`: `bought`,
/// `overloaded`, and the codes [`rejected`] counts refusals under.
pub const OUTCOMES: &[&str] = &[
    "bought",
    "sold_out",
    "already_purchased",
    "not_started",
    "ended",
    "invalid_token",
    "rate_limited",
    "overloaded",
];

/// Counts a refused purchase under its error code.
fn rejected(e: ApiError) -> ApiError {
    metrics::counter!("seckill_purchases_total", "outcome" => e.code.as_str()).increment(1);
    e
}

/// `GET /api/promotions/{id}/result`: `none`, `pending` (bought, not yet in
/// PostgreSQL) or `confirmed` (persisted). Counts against the per-user rate
/// limit, as a page polling it would otherwise cost PostgreSQL without bound.
pub async fn result(req: Request) -> Result<Response, ApiError> {
    let id = req.id()?;
    let user_id = req.user()?;
    let state = &req.state;
    state.limits.check_user(user_id)?;
    let in_redis = state.store.latest_order(id, user_id).await?;
    let (status, order_id) = match in_redis {
        Some(order_id) if orders::exists(&state.db, &order_id).await? => {
            ("confirmed", Some(order_id))
        }
        Some(order_id) => ("pending", Some(order_id)),
        None => match orders::latest_for(&state.db, id, user_id).await? {
            Some(order_id) => ("confirmed", Some(order_id)),
            None => ("none", None),
        },
    };
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"status": status, "order_id": order_id}),
    ))
}
