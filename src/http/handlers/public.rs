//! `GET /api/promotions` and `GET /api/promotions/{id}`: open promotions,
//! public fields, served from the local cache. No authentication.

use chrono::Utc;
use hyper::StatusCode;

use crate::http::request::Request;
use crate::http::{ApiError, Response, json};

pub async fn list(req: Request) -> Result<Response, ApiError> {
    let state = &req.state;
    let listed = state.cache.open(&state.db, &state.store).await?;
    let now = Utc::now();
    let items: Vec<_> = listed
        .iter()
        .filter(|l| l.promotion.ends_at > now)
        .map(|l| l.promotion.to_public_json(now, l.remaining))
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"promotions": items}),
    ))
}

pub async fn get(req: Request) -> Result<Response, ApiError> {
    let id = req.id()?;
    let state = &req.state;
    let listed = state.cache.open(&state.db, &state.store).await?;
    let now = Utc::now();
    let found = listed
        .iter()
        .find(|l| l.promotion.id == id && l.promotion.ends_at > now)
        .ok_or_else(ApiError::not_found)?;
    Ok(json(
        StatusCode::OK,
        &found.promotion.to_public_json(now, found.remaining),
    ))
}
