//! The handlers, one module per part of the API. Each takes a routed
//! [`Request`](super::request::Request) and returns a response or an
//! [`ApiError`](super::ApiError).

pub mod accounts;
pub mod admin;
pub mod admission;
pub mod openapi;
pub mod ops;
pub mod orders;
pub mod public;
pub mod purchase;
pub mod reconcile;
pub mod web;

use std::sync::Arc;

use super::{ApiError, AppState};
use crate::stock::{Outcome, PromotionMeta};

/// The sale meta of promotion `id` from the local cache (loaded from Redis).
/// When Redis has none, the promotion is unknown (`404`) unless PostgreSQL
/// lists it as open: then Redis lost its state, and the answer is `503` with
/// `Retry-After` until recovery rebuilds it. PostgreSQL is asked only on
/// that path, through the cached public list.
pub(crate) async fn sale_meta(state: &AppState, id: i64) -> Result<Arc<PromotionMeta>, ApiError> {
    if let Some(meta) = state.cache.meta(&state.store, id).await? {
        return Ok(meta);
    }
    let known = match state.cache.open(&state.db, &state.store).await {
        Ok(open) => open.listed.iter().any(|l| l.promotion.id == id),
        Err(e) => {
            tracing::debug!(error = %e, "open promotions not loaded; an unknown promotion is 404");
            false
        }
    };
    if known {
        Err(Outcome::Unknown.into())
    } else {
        Err(ApiError::not_found())
    }
}
