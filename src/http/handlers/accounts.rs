//! `POST /api/register` and `POST /api/login`: accounts with a password, and
//! the JWT the user routes take.

use chrono::{DateTime, Utc};
use hyper::StatusCode;
use serde::Deserialize;

use crate::http::request::Request;
use crate::http::{ApiError, Response, json};

/// The body of both routes. Both fields are required; unknown ones refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    username: String,
    password: String,
}

/// `POST /api/register` → `201 {"user_id"}`.
pub async fn register(req: Request) -> Result<Response, ApiError> {
    let state = req.state.clone();
    let c: Credentials = req.json().await?;
    let user_id = state.accounts.register(&c.username, &c.password).await?;
    tracing::info!(user = user_id, "account created");
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({"user_id": user_id}),
    ))
}

/// `POST /api/login` → `200 {"token", "expires_at", "user_id"}`. Failures
/// are counted per address and per username; past the budget, `429`.
pub async fn login(req: Request) -> Result<Response, ApiError> {
    let state = req.state.clone();
    let ip = state.limits.client_ip(req.peer, &req.parts.headers);
    let c: Credentials = req.json().await?;
    // A failure is reserved before the password is checked, so a burst of
    // concurrent guesses cannot all get past the limit; a success gives it
    // back, and so does a check that could not run.
    state.limits.reserve_login(ip, &c.username)?;
    let user_id = match state.accounts.login(&c.username, &c.password).await {
        Ok(id) => {
            state.limits.login_succeeded(ip, &c.username);
            id
        }
        Err(e) => {
            if !matches!(e, crate::accounts::AccountError::InvalidCredentials) {
                state.limits.login_succeeded(ip, &c.username);
            }
            return Err(e.into());
        }
    };
    let ttl = state.settings.login_ttl.as_secs();
    let ttl = state
        .auth
        .max_lifetime_secs()
        .map_or(ttl, |max| ttl.min(max));
    let token = state.auth.mint(user_id, ttl)?;
    let expires_at = DateTime::<Utc>::from_timestamp(Utc::now().timestamp() + ttl as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"token": token, "expires_at": expires_at, "user_id": user_id}),
    ))
}
