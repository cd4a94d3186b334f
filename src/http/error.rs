//! `ApiError` and the one place where a failure becomes an HTTP status.
//!
//! Handlers return `Result<Response, ApiError>`. Business refusals (sold out,
//! already purchased…) and failures (Redis down, a bug) all end here, so the
//! contract's codes live in one file: 4xx for the caller's mistakes, 503 with
//! `Retry-After` for a dependency outage or overload, 500 only for bugs, and
//! every 5xx logged once. Internals never reach the client.

use std::borrow::Cow;

use hyper::StatusCode;
use hyper::header::{CONNECTION, HeaderValue, RETRY_AFTER};
use serde::Serialize;

use super::{Response, json};
use crate::auth::AuthError;
use crate::limit::RateLimited;
use crate::orders::lifecycle::Transition;
use crate::promotions::model::Invalid;
use crate::promotions::repo::Refusal;

/// Seconds a client is told to wait after a `503` or `429`.
const RETRY_AFTER_SECS: u32 = 1;

/// The error body of API.md: `{"error": {"code", "message"}}`.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    code: &'a str,
    message: &'a str,
}

/// A failed request: status, stable code, human message.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: Cow<'static, str>,
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn invalid_id() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_id",
            "ids are positive integers",
        )
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "no such resource")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this method is not allowed on this resource",
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {limit} bytes"),
        )
    }

    pub fn request_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body was not received in time",
        )
    }

    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        ApiError {
            retry_after: Some(RETRY_AFTER_SECS),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "an internal error occurred",
        )
    }

    pub fn sold_out() -> Self {
        Self::new(StatusCode::GONE, "sold_out", "no stock left")
    }

    pub fn already_purchased() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "already_purchased",
            "you have reached this promotion's per-user limit",
        )
    }

    pub fn not_started() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "not_started",
            "the promotion has not started",
        )
    }

    pub fn invalid_token() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_token",
            "a valid admission token for this promotion is required",
        )
    }

    pub fn invalid_captcha() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "invalid_captcha",
            "the captcha answer is wrong, reused or expired",
        )
    }

    pub fn ended() -> Self {
        Self::new(StatusCode::FORBIDDEN, "ended", "the promotion has ended")
    }

    /// The response the client gets; a 5xx is logged here, once.
    pub fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), code = self.code, message = %self.message, "request failed");
        }
        let mut res = json(
            self.status,
            &ErrorBody {
                error: ErrorFields {
                    code: self.code,
                    message: &self.message,
                },
            },
        );
        if let Some(secs) = self.retry_after {
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        // The body was not read to its end, so the connection cannot carry
        // another request: say so, or a keep-alive client would reuse it.
        if matches!(
            self.status,
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
        ) {
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

impl From<Transition> for ApiError {
    /// The refusals of pay and cancel (a `Done` transition is not an error,
    /// and never reaches this).
    fn from(t: Transition) -> Self {
        match t {
            Transition::AlreadyCancelled => ApiError::new(
                StatusCode::CONFLICT,
                "order_cancelled",
                "the order was cancelled or its payment time ran out",
            ),
            Transition::AlreadyPaid => ApiError::new(
                StatusCode::CONFLICT,
                "order_paid",
                "the order is already paid",
            ),
            Transition::NotPersisted => ApiError {
                retry_after: Some(RETRY_AFTER_SECS),
                ..ApiError::new(
                    StatusCode::CONFLICT,
                    "order_pending",
                    "the order is being recorded; try again in a moment",
                )
            },
            Transition::NotFound | Transition::Done(_) => ApiError::not_found(),
        }
    }
}

impl From<RateLimited> for ApiError {
    fn from(r: RateLimited) -> Self {
        ApiError {
            retry_after: Some(r.retry_after_secs.min(u64::from(u32::MAX)) as u32),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many requests ({} limit); retry later", r.limit),
            )
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::invalid_request(e.0)
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotFound => ApiError::not_found(),
            Refusal::Started => ApiError::new(
                StatusCode::CONFLICT,
                "promotion_started",
                "the promotion has already started",
            ),
            Refusal::HasOrders => ApiError::new(
                StatusCode::CONFLICT,
                "promotion_has_orders",
                "the promotion has orders and cannot be deleted",
            ),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    /// Redis is the sale's live state: when it fails, the answer is "try
    /// again", never a guess.
    fn from(e: redis::RedisError) -> Self {
        tracing::warn!(error = %e, "redis call failed");
        ApiError::unavailable("the sale service is temporarily unavailable")
    }
}

impl From<std::sync::Arc<redis::RedisError>> for ApiError {
    /// A Redis failure shared by the callers of one cache load.
    fn from(e: std::sync::Arc<redis::RedisError>) -> Self {
        tracing::warn!(error = %e, "redis call failed");
        ApiError::unavailable("the sale service is temporarily unavailable")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::failure(&e)
    }
}

impl From<std::sync::Arc<anyhow::Error>> for ApiError {
    /// A failure shared by the callers of one cache load.
    fn from(e: std::sync::Arc<anyhow::Error>) -> Self {
        ApiError::failure(&e)
    }
}

impl ApiError {
    /// A dependency that is down or saturated is a 503; anything else is a
    /// bug, logged with its whole chain of causes.
    fn failure(e: &anyhow::Error) -> Self {
        if is_outage(e) {
            tracing::warn!(error = %format!("{e:#}"), "dependency unavailable");
            return ApiError::unavailable("a storage service is temporarily unavailable");
        }
        tracing::error!(error = %format!("{e:#}"), "internal error");
        ApiError::internal()
    }
}

fn is_outage(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if cause.downcast_ref::<redis::RedisError>().is_some() {
            return true;
        }
        if let Some(db) = cause.downcast_ref::<sqlx::Error>() {
            return matches!(
                db,
                sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::WorkerCrashed
            );
        }
        cause.downcast_ref::<std::io::Error>().is_some()
    })
}
