//! `GET /api/orders` (the caller's persisted orders, newest first) and the
//! buyer's side of the lifecycle: `POST /api/orders/{order_id}/pay` and
//! `/cancel`. Each counts against the caller's per-user rate limit, checked
//! right after the JWT and before PostgreSQL is asked anything.

use hyper::StatusCode;

use crate::http::request::Request;
use crate::http::{ApiError, Response, json};
use crate::orders::lifecycle::Transition;
use crate::orders::repo;

/// At most this many orders are listed.
const MAX_LISTED: i64 = 200;

pub async fn list(req: Request) -> Result<Response, ApiError> {
    let user_id = req.user()?;
    req.state.limits.check_user(user_id)?;
    let orders = repo::list_for_user(&req.state.db, user_id, MAX_LISTED).await?;
    Ok(json(StatusCode::OK, &serde_json::json!({"orders": orders})))
}

/// The longest order id accepted in a path; ours are 36-character UUIDs.
const MAX_ORDER_ID_LEN: usize = 64;

fn order_id(req: &Request) -> Result<String, ApiError> {
    let id = req.param();
    let valid = !id.is_empty()
        && id.len() <= MAX_ORDER_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if valid {
        Ok(id.to_string())
    } else {
        Err(ApiError::invalid_id())
    }
}

/// `POST /api/orders/{order_id}/pay`
pub async fn pay(req: Request) -> Result<Response, ApiError> {
    let user_id = req.user()?;
    req.state.limits.check_user(user_id)?;
    let order_id = order_id(&req)?;
    match req.state.lifecycle.pay(user_id, &order_id).await? {
        Transition::Done(order) => Ok(json(StatusCode::OK, &serde_json::json!(order))),
        refused => Err(refused.into()),
    }
}

/// `POST /api/orders/{order_id}/cancel`
pub async fn cancel(req: Request) -> Result<Response, ApiError> {
    let user_id = req.user()?;
    req.state.limits.check_user(user_id)?;
    let order_id = order_id(&req)?;
    match req.state.lifecycle.cancel(user_id, &order_id).await? {
        Transition::Done(order) => Ok(json(StatusCode::OK, &serde_json::json!(order))),
        refused => Err(refused.into()),
    }
}
