//! `ApiError` and the one place where an outcome becomes an HTTP status.
//!
//! Handlers return `Result<Response, ApiError>`. Business refusals (sold out,
//! already purchased…) and failures (Redis down, a bug) all end here: each
//! domain outcome has its `From`, and [`Code`] is the one list of the
//! contract's error codes, with their statuses, also used as metric labels.
//! 4xx for the caller's mistakes, 503 with `Retry-After` for a dependency
//! outage or overload, 500 only for bugs, and every 5xx logged once, with
//! its source, when the response is made. Internals never reach the client.

use std::borrow::Cow;
use std::sync::Arc;

use hyper::StatusCode;
use hyper::header::{CONNECTION, HeaderValue, RETRY_AFTER};
use serde::Serialize;

use super::{Response, json};
use crate::accounts::AccountError;
use crate::auth::AuthError;
use crate::limit::RateLimited;
use crate::orders::lifecycle::Transition;
use crate::promotions::PromotionError;
use crate::promotions::model::Invalid;
use crate::promotions::repo::Refusal;
use crate::stock::{Admission, Outcome};

/// Seconds a client is told to wait after a `503` or `429`.
const RETRY_AFTER_SECS: u32 = 1;

/// Every error code of the API (`../shared/API.md`), with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidRequest,
    InvalidId,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PayloadTooLarge,
    RateLimited,
    SoldOut,
    AlreadyPurchased,
    NotStarted,
    Ended,
    InvalidToken,
    InvalidCaptcha,
    OrderCancelled,
    OrderPaid,
    OrderPending,
    PromotionStarted,
    PromotionHasOrders,
    UsernameTaken,
    InvalidCredentials,
    Unavailable,
    Internal,
}

impl Code {
    /// The code as clients and metric labels see it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid_request",
            Code::InvalidId => "invalid_id",
            Code::Unauthorized => "unauthorized",
            Code::NotFound => "not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::RequestTimeout => "request_timeout",
            Code::PayloadTooLarge => "payload_too_large",
            Code::RateLimited => "rate_limited",
            Code::SoldOut => "sold_out",
            Code::AlreadyPurchased => "already_purchased",
            Code::NotStarted => "not_started",
            Code::Ended => "ended",
            Code::InvalidToken => "invalid_token",
            Code::InvalidCaptcha => "invalid_captcha",
            Code::OrderCancelled => "order_cancelled",
            Code::OrderPaid => "order_paid",
            Code::OrderPending => "order_pending",
            Code::PromotionStarted => "promotion_started",
            Code::PromotionHasOrders => "promotion_has_orders",
            Code::UsernameTaken => "username_taken",
            Code::InvalidCredentials => "invalid_credentials",
            Code::Unavailable => "unavailable",
            Code::Internal => "internal",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidRequest | Code::InvalidId => StatusCode::BAD_REQUEST,
            Code::Unauthorized | Code::InvalidCredentials => StatusCode::UNAUTHORIZED,
            Code::NotStarted | Code::Ended | Code::InvalidToken | Code::InvalidCaptcha => {
                StatusCode::FORBIDDEN
            }
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::AlreadyPurchased
            | Code::OrderCancelled
            | Code::OrderPaid
            | Code::OrderPending
            | Code::PromotionStarted
            | Code::PromotionHasOrders
            | Code::UsernameTaken => StatusCode::CONFLICT,
            Code::SoldOut => StatusCode::GONE,
            Code::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

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

/// A failed request: stable code, human message, and for a 5xx what caused
/// it (logged, never sent).
#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub message: Cow<'static, str>,
    retry_after: Option<u32>,
    source: Option<String>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<Cow<'static, str>>) -> Self {
        let retry_after = matches!(code, Code::Unavailable).then_some(RETRY_AFTER_SECS);
        ApiError {
            code,
            message: message.into(),
            retry_after,
            source: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    /// Notes what caused this error, for its log line.
    pub fn caused_by(mut self, source: impl std::fmt::Display) -> Self {
        self.source = Some(source.to_string());
        self
    }

    pub fn invalid_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Code::InvalidRequest, message)
    }

    pub fn invalid_id() -> Self {
        Self::new(Code::InvalidId, "ids are positive integers")
    }

    pub fn not_found() -> Self {
        Self::new(Code::NotFound, "no such resource")
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            Code::MethodNotAllowed,
            "this method is not allowed on this resource",
        )
    }

    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            Code::PayloadTooLarge,
            format!("request bodies are limited to {limit} bytes"),
        )
    }

    pub fn request_timeout() -> Self {
        Self::new(
            Code::RequestTimeout,
            "the request body was not received in time",
        )
    }

    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(Code::Unavailable, message)
    }

    pub fn internal() -> Self {
        Self::new(Code::Internal, "an internal error occurred")
    }

    pub fn sold_out() -> Self {
        Self::new(Code::SoldOut, "no stock left")
    }

    pub fn not_started() -> Self {
        Self::new(Code::NotStarted, "the promotion has not started")
    }

    pub fn ended() -> Self {
        Self::new(Code::Ended, "the promotion has ended")
    }

    pub fn invalid_token() -> Self {
        Self::new(
            Code::InvalidToken,
            "a valid admission token for this promotion is required",
        )
    }

    pub fn invalid_captcha() -> Self {
        Self::new(
            Code::InvalidCaptcha,
            "the captcha answer is wrong, reused or expired",
        )
    }

    /// The response the client gets; a 5xx is logged here, once.
    pub fn into_response(self) -> Response {
        let status = self.status();
        let source = self.source.as_deref().unwrap_or("");
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(status = status.as_u16(), code = self.code.as_str(), message = %self.message, source, "request failed");
        } else if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), code = self.code.as_str(), message = %self.message, source, "request failed");
        }
        let mut res = json(
            status,
            &ErrorBody {
                error: ErrorFields {
                    code: self.code.as_str(),
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
        if matches!(self.code, Code::PayloadTooLarge | Code::RequestTimeout) {
            res.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        res
    }
}

impl From<Outcome> for ApiError {
    /// The purchase script's refusals (`Bought` is not an error, and never
    /// reaches this).
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::SoldOut => ApiError::sold_out(),
            Outcome::AlreadyPurchased => ApiError::new(
                Code::AlreadyPurchased,
                "you have reached this promotion's per-user limit",
            ),
            Outcome::NotStarted => ApiError::not_started(),
            Outcome::Ended => ApiError::ended(),
            // The cache knew the promotion but Redis has no state for it:
            // Redis lost it, or it was just deleted. Never guess.
            Outcome::Unknown => ApiError::unavailable("the promotion's sale state is not loaded"),
            Outcome::Bought { .. } => {
                ApiError::internal().caused_by("a purchase was mapped as an error")
            }
        }
    }
}

impl From<Admission> for ApiError {
    /// The refusals of the token script (`Admitted` never reaches this).
    fn from(a: Admission) -> Self {
        match a {
            Admission::SoldOut => ApiError::sold_out(),
            Admission::NotStarted => ApiError::not_started(),
            Admission::Ended => ApiError::ended(),
            // As for a purchase: the promotion was known to the cache, so
            // Redis lost its state or it was just deleted.
            Admission::Unknown => ApiError::unavailable("the promotion's sale state is not loaded"),
            Admission::Admitted => {
                ApiError::internal().caused_by("an admission was mapped as an error")
            }
        }
    }
}

impl From<Transition> for ApiError {
    /// The refusals of pay and cancel (a `Done` transition is not an error,
    /// and never reaches this).
    fn from(t: Transition) -> Self {
        match t {
            Transition::AlreadyCancelled => ApiError::new(
                Code::OrderCancelled,
                "the order was cancelled or its payment time ran out",
            ),
            Transition::AlreadyPaid => ApiError::new(Code::OrderPaid, "the order is already paid"),
            Transition::NotPersisted => ApiError {
                retry_after: Some(RETRY_AFTER_SECS),
                ..ApiError::new(
                    Code::OrderPending,
                    "the order is being recorded; try again in a moment",
                )
            },
            Transition::NotFound => ApiError::not_found(),
            Transition::Done(_) => {
                ApiError::internal().caused_by("a done transition was mapped as an error")
            }
        }
    }
}

impl From<RateLimited> for ApiError {
    fn from(r: RateLimited) -> Self {
        ApiError {
            retry_after: Some(r.retry_after_secs.min(u64::from(u32::MAX)) as u32),
            ..ApiError::new(
                Code::RateLimited,
                format!("too many requests ({} limit); retry later", r.limit),
            )
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::new(Code::Unauthorized, e.to_string())
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
            Refusal::Started => {
                ApiError::new(Code::PromotionStarted, "the promotion has already started")
            }
            Refusal::HasOrders => ApiError::new(
                Code::PromotionHasOrders,
                "the promotion has orders and cannot be deleted",
            ),
        }
    }
}

impl From<PromotionError> for ApiError {
    fn from(e: PromotionError) -> Self {
        match e {
            PromotionError::Invalid(e) => e.into(),
            PromotionError::Refused(r) => r.into(),
            PromotionError::Failed(e) => e.into(),
        }
    }
}

impl From<AccountError> for ApiError {
    fn from(e: AccountError) -> Self {
        match e {
            AccountError::Invalid(message) => ApiError::invalid_request(message),
            AccountError::UsernameTaken => {
                ApiError::new(Code::UsernameTaken, "this username is taken")
            }
            AccountError::InvalidCredentials => ApiError::new(
                Code::InvalidCredentials,
                "the username or the password is wrong",
            ),
            AccountError::Busy => ApiError::unavailable("too many logins at once"),
            AccountError::Failed(e) => e.into(),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    /// Redis is the sale's live state: when it fails, the answer is "try
    /// again", never a guess.
    fn from(e: redis::RedisError) -> Self {
        ApiError::unavailable("the sale service is temporarily unavailable").caused_by(e)
    }
}

impl From<Arc<redis::RedisError>> for ApiError {
    /// A Redis failure shared by the callers of one cache load or one
    /// coalesced script call.
    fn from(e: Arc<redis::RedisError>) -> Self {
        ApiError::unavailable("the sale service is temporarily unavailable").caused_by(e)
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::failure(&e)
    }
}

impl From<Arc<anyhow::Error>> for ApiError {
    /// A failure shared by the callers of one cache load.
    fn from(e: Arc<anyhow::Error>) -> Self {
        ApiError::failure(&e)
    }
}

impl ApiError {
    /// A dependency that is down or saturated is a 503; anything else is a
    /// bug. Either way the whole chain of causes goes to the log line.
    fn failure(e: &anyhow::Error) -> Self {
        let error = if is_outage(e) {
            ApiError::unavailable("a storage service is temporarily unavailable")
        } else {
            ApiError::internal()
        };
        error.caused_by(format!("{e:#}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_of_the_scripts_has_its_status() {
        let cases = [
            (ApiError::from(Outcome::SoldOut), StatusCode::GONE),
            (
                ApiError::from(Outcome::AlreadyPurchased),
                StatusCode::CONFLICT,
            ),
            (ApiError::from(Outcome::NotStarted), StatusCode::FORBIDDEN),
            (ApiError::from(Outcome::Ended), StatusCode::FORBIDDEN),
            (
                ApiError::from(Outcome::Unknown),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (ApiError::from(Admission::SoldOut), StatusCode::GONE),
            (
                ApiError::from(Admission::Unknown),
                StatusCode::SERVICE_UNAVAILABLE,
            ),
        ];
        for (error, status) in cases {
            assert_eq!(error.status(), status, "{error:?}");
            let unavailable = status == StatusCode::SERVICE_UNAVAILABLE;
            assert_eq!(error.retry_after.is_some(), unavailable, "{error:?}");
        }
    }
}
