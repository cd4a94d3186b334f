//! What a handler gets, and the helpers that turn raw input into typed values
//! or a 4xx: ids, bounded JSON bodies, credentials.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_LENGTH};
use serde::de::DeserializeOwned;

use super::state::AppState;
use super::{ApiError, Response};
use crate::auth::AuthError;
use crate::config::MAX_BODY_BYTES;

/// A routed request.
pub struct Request {
    pub state: Arc<AppState>,
    pub parts: hyper::http::request::Parts,
    pub body: Incoming,
    /// The route's one path parameter (`{id}` or `{order_id}`), if it has one.
    pub param: Option<String>,
    pub peer: SocketAddr,
}

/// The strong `ETag` of a fixed body compiled into the binary: the start of
/// its SHA-256, quoted.
pub fn content_etag(body: &[u8]) -> hyper::header::HeaderValue {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(body);
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    hyper::header::HeaderValue::from_str(&format!("\"{hex}\""))
        .expect("hex is a valid header value")
}

impl Request {
    /// Whether the caller's `If-None-Match` names `tag` (or `*`): the body it
    /// holds is current, and the answer is `304`.
    pub fn holds_current(&self, tag: &hyper::header::HeaderValue) -> bool {
        let tag = tag.to_str().unwrap_or("");
        self.parts
            .headers
            .get_all(hyper::header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == tag)
    }

    /// The path id as a positive integer, or `400 invalid_id`.
    pub fn id(&self) -> Result<i64, ApiError> {
        parse_id(self.param.as_deref().unwrap_or(""))
    }

    /// The path parameter as text (order ids are strings).
    pub fn param(&self) -> &str {
        self.param.as_deref().unwrap_or("")
    }

    /// The caller's user id from its JWT, or `401 unauthorized`.
    pub fn user(&self) -> Result<i64, ApiError> {
        let user = self.state.auth.user(self.authorization())?;
        // Noted for the request span, which gets it only if the request fails
        // (see `with_user_slot`).
        let _ = USER.try_with(|slot| slot.set(Some(user)));
        Ok(user)
    }

    /// Passes only with the admin token, else `401 unauthorized`. A wrong
    /// token counts against the client address's budget of failed admin
    /// authentications; while that is spent, the answer is `429
    /// rate_limited` before the token is looked at, right or wrong.
    pub fn admin(&self) -> Result<(), ApiError> {
        let limits = &self.state.limits;
        let ip = limits.client_ip(self.peer, &self.parts.headers);
        limits.check_admin(ip)?;
        self.state.auth.admin(self.authorization()).map_err(|e| {
            // No token at all is not a guess; a wrong one is.
            if e == AuthError::Invalid {
                limits.admin_failed(ip);
            }
            e.into()
        })
    }

    fn authorization(&self) -> Option<&[u8]> {
        self.parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes())
    }

    /// Reads the whole body, at most [`MAX_BODY_BYTES`] (`413`) within the
    /// body timeout (`408`).
    pub async fn bytes(self) -> Result<Bytes, ApiError> {
        read_body(self.parts, self.body, self.state.settings.body_timeout).await
    }

    /// Reads the body as JSON of type `T`; an empty body counts as `{}`.
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        let bytes = self.bytes().await?;
        parse_json(&bytes)
    }
}

tokio::task_local! {
    /// The user the request in hand authenticated as, once it has.
    static USER: Cell<Option<i64>>;
}

/// Runs a handler with a slot for the user it authenticates, and puts that
/// user into the request span when the handler fails with a 5xx (the
/// failures that are logged). Recording a span field re-serializes all of
/// them with the JSON log format: a cost the hot path pays only on failure.
pub async fn with_user_slot<F>(handler: F) -> Result<Response, ApiError>
where
    F: Future<Output = Result<Response, ApiError>>,
{
    USER.scope(Cell::new(None), async move {
        let result = handler.await;
        if let Err(e) = &result
            && e.status().is_server_error()
            && let Some(user) = USER.with(Cell::get)
        {
            tracing::Span::current().record("user", user);
        }
        result
    })
    .await
}

/// A positive integer id, or `400 invalid_id`.
pub fn parse_id(raw: &str) -> Result<i64, ApiError> {
    if raw.is_empty() || raw.len() > 18 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::invalid_id());
    }
    match raw.parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ApiError::invalid_id()),
    }
}

async fn read_body(
    parts: hyper::http::request::Parts,
    body: Incoming,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::payload_too_large(MAX_BODY_BYTES));
    }
    match tokio::time::timeout(timeout, Limited::new(body, MAX_BODY_BYTES).collect()).await {
        Err(_) => Err(ApiError::request_timeout()),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::payload_too_large(MAX_BODY_BYTES))
        }
        Ok(Err(_)) => Err(ApiError::invalid_request(
            "the request body could not be read",
        )),
    }
}

/// Parses a JSON body; the error names the offending field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::invalid_request(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::invalid_request(format!("invalid field `{path}`: {inner}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::promotions::PromotionInput;

    #[test]
    fn ids_are_positive_integers() {
        assert_eq!(parse_id("7").unwrap(), 7);
        for bad in [
            "",
            "0",
            "-1",
            "abc",
            "1.5",
            "99999999999999999999",
            " 1",
            "1e3",
        ] {
            assert_eq!(
                parse_id(bad).unwrap_err().code.as_str(),
                "invalid_id",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        let err = parse_json::<PromotionInput>(br#"{"stock": "many"}"#).unwrap_err();
        assert!(err.message.contains("stock"), "{}", err.message);
        let err = parse_json::<PromotionInput>(br#"{"stok": 1}"#).unwrap_err();
        assert!(err.message.contains("stok"), "{}", err.message);
        let err = parse_json::<PromotionInput>(b"{not json").unwrap_err();
        assert_eq!(err.code.as_str(), "invalid_request");
        assert!(parse_json::<PromotionInput>(b"").is_ok());
    }
}
