//! `/admin/promotions`: create, list, read with stats, edit before start,
//! delete. Admin token only. The workflows are `promotions::service`'s.

use chrono::Utc;
use hyper::StatusCode;

use crate::http::request::Request;
use crate::http::{ApiError, Response, empty, json};
use crate::promotions::PromotionInput;
use crate::promotions::service::Saved;

fn saved(status: StatusCode, s: &Saved) -> Response {
    json(status, &s.promotion.to_json(Utc::now(), Some(s.remaining)))
}

/// `POST /admin/promotions`: records the promotion, preheats Redis, then
/// answers `201`.
pub async fn create(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let state = req.state.clone();
    let input: PromotionInput = req.json().await?;
    let new = input.into_new()?;
    let created = state.promotions.create(&new).await?;
    Ok(saved(StatusCode::CREATED, &created))
}

/// `GET /admin/promotions`
pub async fn list(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let now = Utc::now();
    let items: Vec<_> = req
        .state
        .promotions
        .list()
        .await?
        .iter()
        .map(|(p, left)| p.to_json(now, *left))
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
    let s = req.state.promotions.with_stats(id).await?;
    let mut body = s.promotion.to_json(Utc::now(), s.live.remaining);
    body["stats"] = serde_json::json!({
        "remaining": s.live.remaining.unwrap_or(0),
        "sold": s.live.sold,
        "in_stream": s.live.in_stream,
        "persisted": s.stored.persisted,
        "paid": s.stored.paid,
        "cancelled": s.stored.cancelled,
    });
    Ok(json(StatusCode::OK, &body))
}

/// `PUT /admin/promotions/{id}`: edits a promotion that has not started.
pub async fn update(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let id = req.id()?;
    let state = req.state.clone();
    let input: PromotionInput = req.json().await?;
    let updated = state.promotions.update(id, input).await?;
    Ok(saved(StatusCode::OK, &updated))
}

/// `DELETE /admin/promotions/{id}`: refused while the sale runs, and once
/// anything was sold (the orders must keep their promotion).
pub async fn delete(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let id = req.id()?;
    req.state.promotions.delete(id).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
