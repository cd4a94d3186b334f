//! `/admin/promotions`: create, list, read with stats, edit before start,
//! delete. Admin token only.

use chrono::Utc;
use hyper::StatusCode;

use crate::http::request::Request;
use crate::http::{ApiError, Response, empty, json};
use crate::orders::repo as orders;
use crate::promotions::PromotionInput;
use crate::promotions::repo::{self, Refusal};
use crate::stock::{events, scripts};

/// `POST /admin/promotions`: records the promotion, preheats Redis, then
/// answers `201`; a promotion whose preheat failed is removed again.
pub async fn create(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let state = req.state.clone();
    let input: PromotionInput = req.json().await?;
    let new = input.into_new()?;
    let p = repo::insert(&state.db, &new).await?;
    let mut conn = state.redis.clone();
    let remaining = match scripts::preheat(&mut conn, &state.keys, &p.meta()).await {
        Ok(left) => left,
        Err(e) => {
            if let Err(undo) = repo::remove(&state.db, p.id).await {
                tracing::error!(id = p.id, error = %format!("{undo:#}"), "failed to remove a promotion whose preheat failed");
            }
            return Err(e.into());
        }
    };
    state.cache.invalidate(p.id).await;
    tracing::info!(
        id = p.id,
        stock = p.stock,
        "promotion created and preheated"
    );
    Ok(json(
        StatusCode::CREATED,
        &p.to_json(Utc::now(), Some(remaining)),
    ))
}

/// `GET /admin/promotions`
pub async fn list(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let state = &req.state;
    let promotions = repo::list(&state.db).await?;
    let ids: Vec<i64> = promotions.iter().map(|p| p.id).collect();
    let mut conn = state.redis.clone();
    let remaining = scripts::remaining_many(&mut conn, &state.keys, &ids).await?;
    let now = Utc::now();
    let items: Vec<_> = promotions
        .iter()
        .zip(remaining)
        .map(|(p, left)| p.to_json(now, left))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"promotions": items}),
    ))
}

/// `GET /admin/promotions/{id}`: the promotion with live and persisted counts.
pub async fn get(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let id = req.id()?;
    let state = &req.state;
    let p = repo::get(&state.db, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    let mut conn = state.redis.clone();
    let live = scripts::counters(&mut conn, &state.keys, id).await?;
    let stored = orders::counts(&state.db, id).await?;
    let mut body = p.to_json(Utc::now(), live.remaining);
    body["stats"] = serde_json::json!({
        "remaining": live.remaining.unwrap_or(0),
        "sold": live.sold,
        "in_stream": live.in_stream,
        "persisted": stored.persisted,
        "paid": stored.paid,
        "cancelled": stored.cancelled,
    });
    Ok(json(StatusCode::OK, &body))
}

/// `PUT /admin/promotions/{id}`: edits a promotion that has not started.
pub async fn update(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let id = req.id()?;
    let state = req.state.clone();
    let input: PromotionInput = req.json().await?;
    let current = repo::get(&state.db, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    if current.starts_at <= Utc::now() {
        return Err(Refusal::Started.into());
    }
    let edited = input.apply_to(&current)?;
    let p = repo::update_before_start(&state.db, id, &edited).await??;
    let mut conn = state.redis.clone();
    let remaining = scripts::preheat(&mut conn, &state.keys, &p.meta()).await?;
    state.cache.invalidate(id).await;
    events::publish_changed(&mut conn, &state.keys, id).await;
    Ok(json(
        StatusCode::OK,
        &p.to_json(Utc::now(), Some(remaining)),
    ))
}

/// `DELETE /admin/promotions/{id}`: refused while the sale runs, and once
/// anything was sold (the orders must keep their promotion).
pub async fn delete(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let id = req.id()?;
    let state = &req.state;
    let p = repo::get(&state.db, id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    if p.is_active(Utc::now()) {
        return Err(Refusal::Started.into());
    }
    let mut conn = state.redis.clone();
    if scripts::counters(&mut conn, &state.keys, id).await?.sold > 0 {
        return Err(Refusal::HasOrders.into());
    }
    repo::delete_unless_running(&state.db, id).await??;
    scripts::forget(&mut conn, &state.keys, id).await?;
    state.cache.invalidate(id).await;
    events::publish_changed(&mut conn, &state.keys, id).await;
    tracing::info!(id, "promotion deleted");
    Ok(empty(StatusCode::NO_CONTENT))
}
