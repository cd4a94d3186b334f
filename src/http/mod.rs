//! The HTTP gateway on hyper 1.x: the accept loop with graceful shutdown
//! (`server`), routing (`router`), request helpers (`request`), what the
//! handlers share (`state`), the handlers, and `error`, the one place where
//! statuses are chosen for failures.

pub mod error;
pub mod handlers;
pub mod request;
pub mod router;
pub mod server;
pub mod state;

use bytes::Bytes;
use http_body_util::Full;
use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HeaderValue};

pub use error::{ApiError, Code};
pub use state::AppState;

/// The label values of the HTTP metrics known before any traffic.
pub fn known_metric_labels() -> crate::telemetry::KnownLabels<'static> {
    crate::telemetry::KnownLabels {
        routes: &router::ROUTE_LABELS,
        purchase_outcomes: handlers::purchase::OUTCOMES,
    }
}

/// Every response the gateway sends.
pub type Response = hyper::Response<Full<Bytes>>;

/// A JSON response.
pub fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut res = hyper::Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// A JSON response from a body serialized before (a cached one).
pub fn json_bytes(status: StatusCode, body: Bytes) -> Response {
    let mut res = hyper::Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// An empty response (`204`).
pub fn empty(status: StatusCode) -> Response {
    let mut res = hyper::Response::new(Full::new(Bytes::new()));
    *res.status_mut() = status;
    res
}
