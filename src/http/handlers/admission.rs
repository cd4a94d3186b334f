//! `POST /api/promotions/{id}/token` (admission tokens) and
//! `GET /api/promotions/{id}/captcha` (the challenge that guards them).

use chrono::{DateTime, Utc};
use hyper::StatusCode;
use serde::Deserialize;

use crate::admission::{self, answer_matches};
use crate::http::request::Request;
use crate::http::{ApiError, Response, json};
use crate::stock::Admission;

/// The token body: `{}` or, when the promotion requires a captcha,
/// `{"captcha_id": "...", "answer": "..."}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    captcha_id: Option<String>,
    answer: Option<String>,
}

fn rfc3339_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Longest captcha id accepted; ours are 32 hex characters.
const MAX_CAPTCHA_ID_LEN: usize = 64;

pub async fn token(req: Request) -> Result<Response, ApiError> {
    let id = req.id()?;
    let user_id = req.user()?;
    let state = req.state.clone();
    state.limits.check_user(user_id)?;
    let body: TokenBody = req.json().await?;
    let meta = super::sale_meta(&state, id).await?;
    if !meta.require_token {
        return Err(ApiError::invalid_request(
            "this promotion does not use admission tokens",
        ));
    }
    if meta.require_captcha {
        let (Some(captcha_id), Some(answer)) = (body.captcha_id, body.answer) else {
            return Err(ApiError::invalid_captcha());
        };
        if captcha_id.is_empty() || captcha_id.len() > MAX_CAPTCHA_ID_LEN {
            return Err(ApiError::invalid_captcha());
        }
        // A challenge is answered once, right or wrong.
        let stored = state.store.take_captcha(id, &captcha_id).await?;
        let passed = stored
            .as_deref()
            .and_then(|s| s.split_once(':'))
            .is_some_and(|(uid, expected)| {
                uid == user_id.to_string() && answer_matches(expected, &answer)
            });
        if !passed {
            return Err(ApiError::invalid_captcha());
        }
    }
    let admission = state
        .store
        .issue_token(id, user_id, state.settings.token_cap_multiple, meta.buckets)
        .await?;
    if admission != Admission::Admitted {
        if admission == Admission::Unknown {
            state.cache.invalidate(id).await;
        }
        return Err(admission.into());
    }
    let expires_ms = state.clock.now_ms() + state.settings.token_ttl.as_millis() as i64;
    let token = state.tokens.sign(id, user_id, expires_ms);
    metrics::counter!("seckill_tokens_issued_total").increment(1);
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"token": token, "expires_at": rfc3339_ms(expires_ms)}),
    ))
}

pub async fn captcha(req: Request) -> Result<Response, ApiError> {
    let id = req.id()?;
    let user_id = req.user()?;
    let state = req.state.clone();
    state.limits.check_user(user_id)?;
    let meta = super::sale_meta(&state, id).await?;
    if !meta.require_captcha {
        return Err(ApiError::invalid_request(
            "this promotion does not use a captcha",
        ));
    }
    let challenge = tokio::task::spawn_blocking(admission::draw_challenge)
        .await
        .ok()
        .flatten()
        .ok_or_else(|| ApiError::internal().caused_by("failed to draw a captcha"))?;
    let captcha_id = uuid::Uuid::new_v4().simple().to_string();
    let ttl = state.settings.captcha_ttl;
    state
        .store
        .put_captcha(
            id,
            &captcha_id,
            &format!("{user_id}:{}", challenge.answer),
            ttl,
        )
        .await?;
    let expires_ms = state.clock.now_ms() + ttl.as_millis() as i64;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "captcha_id": captcha_id,
            "image_png_base64": challenge.png_base64,
            "expires_at": rfc3339_ms(expires_ms),
        }),
    ))
}
