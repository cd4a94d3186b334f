//! `GET /api/promotions` and `GET /api/promotions/{id}`: open promotions,
//! public fields, served from the local cache. No authentication.
//!
//! The bodies are serialized once per cache fill
//! ([`OpenList`](crate::promotions::cache::OpenList)); after a start or an
//! end passed since the fill, they are serialized afresh per request until
//! the entry expires, so `status` is always the one at the request's time.
//! Both answers carry `X-Server-Time` for the sale page's countdown.

use chrono::Utc;
use hyper::StatusCode;
use hyper::header::HeaderValue;

use crate::http::request::Request;
use crate::http::{ApiError, Response, json, json_bytes};
use crate::promotions::cache::OpenList;

pub async fn list(req: Request) -> Result<Response, ApiError> {
    let state = &req.state;
    let open = state.cache.open(&state.db, &state.store).await?;
    let now = Utc::now();
    let res = match open.list_body(now) {
        Some(body) => json_bytes(StatusCode::OK, body),
        None => json(StatusCode::OK, &OpenList::list_json(&open.listed, now)),
    };
    Ok(with_server_time(&req, res))
}

pub async fn get(req: Request) -> Result<Response, ApiError> {
    let id = req.id()?;
    let state = &req.state;
    let open = state.cache.open(&state.db, &state.store).await?;
    let now = Utc::now();
    let found = open.find(id, now).ok_or_else(ApiError::not_found)?;
    let res = json_bytes(StatusCode::OK, open.body_of(found, now));
    Ok(with_server_time(&req, res))
}

/// Adds `X-Server-Time`: the gateway's view of Redis's clock (the clock
/// that opens and closes a sale), in Unix milliseconds, so a page's
/// countdown follows the server and not the buyer's computer.
fn with_server_time(req: &Request, mut res: Response) -> Response {
    res.headers_mut()
        .insert("x-server-time", HeaderValue::from(req.state.clock.now_ms()));
    res
}
