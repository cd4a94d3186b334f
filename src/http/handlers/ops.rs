//! `GET /health`, `GET /ready`, `GET /metrics`.

use std::time::Duration;

use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HeaderValue};

use crate::http::request::Request;
use crate::http::{ApiError, Response, json};

/// How long `/ready` waits for each dependency.
const READY_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn health(_req: Request) -> Result<Response, ApiError> {
    Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"})))
}

/// `200` when Redis and PostgreSQL both answer, else `503` saying which is down.
pub async fn ready(req: Request) -> Result<Response, ApiError> {
    let state = &req.state;
    let redis_ok = matches!(
        tokio::time::timeout(READY_TIMEOUT, state.store.ping()).await,
        Ok(Ok(()))
    );
    let db_ok = matches!(
        tokio::time::timeout(READY_TIMEOUT, crate::db::ping(&state.db)).await,
        Ok(Ok(()))
    );
    let word = |ok: bool| if ok { "ok" } else { "down" };
    let body = serde_json::json!({
        "status": word(redis_ok && db_ok),
        "redis": word(redis_ok),
        "postgres": word(db_ok),
    });
    if redis_ok && db_ok {
        Ok(json(StatusCode::OK, &body))
    } else {
        let mut res = json(StatusCode::SERVICE_UNAVAILABLE, &body);
        res.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(1));
        Ok(res)
    }
}

/// Prometheus text exposition.
pub async fn metrics(req: Request) -> Result<Response, ApiError> {
    let text = req.state.metrics.render();
    let mut res = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(text)));
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(res)
}
