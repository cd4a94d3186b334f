//! Who is calling: user JWTs (HS256, `sub` = user id, `exp` required; `iss`,
//! `aud` and the token's lifetime checked when configured) and the admin
//! bearer token.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Settings;

/// Seconds of clock skew tolerated on `exp`, and on the lifetime of a token
/// without `iat`.
const LEEWAY_SECS: u64 = 5;

/// The optional checks on user JWTs; `None` is not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtChecks {
    /// The `iss` a token must carry.
    pub issuer: Option<String>,
    /// The audience a token's `aud` must name.
    pub audience: Option<String>,
    /// The longest lifetime accepted: `exp - iat`, or `exp - now` when the
    /// token has no `iat`.
    pub max_lifetime: Option<Duration>,
}

/// Verifies user tokens and the admin token; mints user tokens.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    checks: JwtChecks,
    admin_token: String,
}

/// Why a caller was not let in. Every variant is a `401 unauthorized`; the
/// distinction is for the logs only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid or expired token")]
    Invalid,
}

/// The claims read from a user token (`iss` and `aud` are checked by the
/// library from the raw claims: `aud` may be a string or a list).
#[derive(Debug, Deserialize)]
struct Claims {
    sub: serde_json::Value,
    exp: u64,
    iat: Option<u64>,
}

/// The claims of a token minted here.
#[derive(Debug, Serialize)]
struct Minted<'a> {
    sub: String,
    exp: u64,
    iat: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

impl Auth {
    /// Checks signature, `exp` and `sub` only.
    pub fn new(jwt_secret: &str, admin_token: &str) -> Self {
        Self::with_checks(jwt_secret, admin_token, JwtChecks::default())
    }

    /// The secrets and JWT checks of `settings`.
    pub fn from_settings(settings: &Settings) -> Self {
        Self::with_checks(
            &settings.jwt_secret,
            &settings.admin_token,
            JwtChecks {
                issuer: settings.jwt_issuer.clone(),
                audience: settings.jwt_audience.clone(),
                max_lifetime: settings.jwt_max_lifetime,
            },
        )
    }

    pub fn with_checks(jwt_secret: &str, admin_token: &str, checks: JwtChecks) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `sub` is checked by `parse_user_id`: it may be a number, which the
        // library's own `sub` check would refuse.
        let mut required = vec!["exp"];
        if let Some(iss) = &checks.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        // Unset, the audience is not checked: a token naming one is accepted.
        validation.validate_aud = checks.audience.is_some();
        if let Some(aud) = &checks.audience {
            validation.set_audience(&[aud]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        validation.leeway = LEEWAY_SECS;
        Auth {
            encoding: EncodingKey::from_secret(jwt_secret.as_bytes()),
            decoding: DecodingKey::from_secret(jwt_secret.as_bytes()),
            validation,
            checks,
            admin_token: admin_token.to_string(),
        }
    }

    /// The user id of a request's `Authorization: Bearer <JWT>` header.
    pub fn user(&self, authorization: Option<&[u8]>) -> Result<i64, AuthError> {
        let token = bearer(authorization).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| AuthError::Invalid)?;
        if !self.lifetime_allowed(&data.claims, unix_now()) {
            return Err(AuthError::Invalid);
        }
        parse_user_id(&data.claims.sub).ok_or(AuthError::Invalid)
    }

    /// Whether the token lives no longer than the configured maximum:
    /// `exp - iat`, or without `iat`, `exp - now` (with the clock leeway).
    fn lifetime_allowed(&self, claims: &Claims, now: u64) -> bool {
        let Some(max) = self.checks.max_lifetime else {
            return true;
        };
        let max = max.as_secs();
        match claims.iat {
            Some(iat) => claims.exp.saturating_sub(iat) <= max,
            None => claims.exp.saturating_sub(now) <= max.saturating_add(LEEWAY_SECS),
        }
    }

    /// The longest `ttl_secs` [`Auth::mint`] accepts, when one is configured.
    pub fn max_lifetime_secs(&self) -> Option<u64> {
        self.checks.max_lifetime.map(|d| d.as_secs())
    }

    /// Checks a request's `Authorization: Bearer <admin token>` header.
    pub fn admin(&self, authorization: Option<&[u8]>) -> Result<(), AuthError> {
        let token = bearer(authorization).ok_or(AuthError::Missing)?;
        if constant_time_eq(token.as_bytes(), self.admin_token.as_bytes()) {
            Ok(())
        } else {
            Err(AuthError::Invalid)
        }
    }

    /// A user token valid for `ttl_secs`, with `iat`, and `iss` and `aud`
    /// when they are checked, so it passes [`Auth::user`]. A `ttl_secs`
    /// above the maximum lifetime is an error.
    pub fn mint(&self, user_id: i64, ttl_secs: u64) -> anyhow::Result<String> {
        if let Some(max) = self.max_lifetime_secs() {
            anyhow::ensure!(
                ttl_secs <= max,
                "a lifetime of {ttl_secs} s exceeds SECKILL_JWT_MAX_LIFETIME_SECS ({max} s)"
            );
        }
        let now = unix_now();
        let claims = Minted {
            sub: user_id.to_string(),
            exp: now + ttl_secs,
            iat: now,
            iss: self.checks.issuer.as_deref(),
            aud: self.checks.audience.as_deref(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }
}

fn bearer(header: Option<&[u8]>) -> Option<&str> {
    let value = std::str::from_utf8(header?).ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `sub` as a positive integer, given as a JSON number or a string of digits.
fn parse_user_id(sub: &serde_json::Value) -> Option<i64> {
    let id = match sub {
        serde_json::Value::Number(n) => n.as_i64()?,
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().ok()?
        }
        _ => return None,
    };
    (id > 0).then_some(id)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &str, sub: serde_json::Value, exp: u64) -> String {
        signed(secret, serde_json::json!({"sub": sub, "exp": exp}))
    }

    fn signed(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn bearer_of(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    fn checked(issuer: Option<&str>, audience: Option<&str>, max: Option<u64>) -> Auth {
        Auth::with_checks(
            "s",
            "a",
            JwtChecks {
                issuer: issuer.map(str::to_string),
                audience: audience.map(str::to_string),
                max_lifetime: max.map(Duration::from_secs),
            },
        )
    }

    #[test]
    fn issuer_and_audience_are_checked_only_when_configured() {
        let exp = unix_now() + 60;
        let plain = signed("s", serde_json::json!({"sub": "1", "exp": exp}));
        let good = signed(
            "s",
            serde_json::json!({"sub": "1", "exp": exp, "iss": "idp", "aud": "seckill"}),
        );
        let good_aud_list = signed(
            "s",
            serde_json::json!({"sub": "1", "exp": exp, "iss": "idp", "aud": ["seckill"]}),
        );
        let wrong_iss = signed(
            "s",
            serde_json::json!({"sub": "1", "exp": exp, "iss": "evil", "aud": "seckill"}),
        );
        let wrong_aud = signed(
            "s",
            serde_json::json!({"sub": "1", "exp": exp, "iss": "idp", "aud": "other"}),
        );

        // Unset: nothing about iss or aud is checked.
        let open = checked(None, None, None);
        for t in [&plain, &good, &wrong_iss, &wrong_aud] {
            assert_eq!(open.user(Some(&bearer_of(t))), Ok(1), "{t}");
        }

        let strict = checked(Some("idp"), Some("seckill"), None);
        assert_eq!(strict.user(Some(&bearer_of(&good))), Ok(1));
        assert_eq!(strict.user(Some(&bearer_of(&good_aud_list))), Ok(1));
        for t in [&plain, &wrong_iss, &wrong_aud] {
            assert_eq!(
                strict.user(Some(&bearer_of(t))),
                Err(AuthError::Invalid),
                "{t}"
            );
        }
        // Only the issuer configured: the audience is free.
        let iss_only = checked(Some("idp"), None, None);
        assert_eq!(iss_only.user(Some(&bearer_of(&wrong_aud))), Ok(1));
        assert_eq!(
            iss_only.user(Some(&bearer_of(&plain))),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn a_token_living_longer_than_the_maximum_is_refused() {
        let auth = checked(None, None, Some(600));
        let now = unix_now();
        let claims = |iat: Option<u64>, exp: u64| {
            let mut c = serde_json::json!({"sub": "3", "exp": exp});
            if let Some(iat) = iat {
                c["iat"] = iat.into();
            }
            bearer_of(&signed("s", c))
        };
        // With iat: exp - iat decides, however much of it is left.
        assert_eq!(auth.user(Some(&claims(Some(now), now + 600))), Ok(3));
        assert_eq!(
            auth.user(Some(&claims(Some(now), now + 601))),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.user(Some(&claims(Some(now - 3000), now + 60))),
            Err(AuthError::Invalid),
            "issued for an hour, 50 minutes ago: still too long a lifetime"
        );
        // Without iat: what is left of it, exp - now.
        assert_eq!(auth.user(Some(&claims(None, now + 600))), Ok(3));
        assert_eq!(
            auth.user(Some(&claims(None, now + 3600))),
            Err(AuthError::Invalid)
        );
        // Not configured: a year-long token passes.
        let open = checked(None, None, None);
        assert_eq!(
            open.user(Some(&claims(Some(now), now + 365 * 86400))),
            Ok(3)
        );
    }

    #[test]
    fn minted_tokens_pass_the_configured_checks_and_a_ttl_past_the_maximum_is_refused() {
        let auth = checked(Some("idp"), Some("seckill"), Some(600));
        let t = auth.mint(9, 600).unwrap();
        assert_eq!(auth.user(Some(&bearer_of(&t))), Ok(9));
        assert!(auth.mint(9, 601).is_err());
        // Another deployment's checks refuse it.
        let other = checked(Some("idp"), Some("elsewhere"), None);
        assert_eq!(other.user(Some(&bearer_of(&t))), Err(AuthError::Invalid));
    }

    #[test]
    fn minted_tokens_verify() {
        let auth = Auth::new("s", "a");
        let t = auth.mint(42, 60).unwrap();
        assert_eq!(auth.user(Some(format!("Bearer {t}").as_bytes())), Ok(42));
    }

    #[test]
    fn sub_may_be_a_number_or_a_string_but_positive() {
        let auth = Auth::new("s", "a");
        let exp = unix_now() + 60;
        let ok = |sub| auth.user(Some(format!("Bearer {}", token("s", sub, exp)).as_bytes()));
        assert_eq!(ok(serde_json::json!(7)), Ok(7));
        assert_eq!(ok(serde_json::json!("8")), Ok(8));
        assert_eq!(ok(serde_json::json!(0)), Err(AuthError::Invalid));
        assert_eq!(ok(serde_json::json!("-3")), Err(AuthError::Invalid));
        assert_eq!(ok(serde_json::json!("abc")), Err(AuthError::Invalid));
    }

    #[test]
    fn wrong_secret_expired_and_missing_are_refused() {
        let auth = Auth::new("s", "a");
        let forged = token("other", serde_json::json!(1), unix_now() + 60);
        let expired = token("s", serde_json::json!(1), unix_now() - 120);
        assert_eq!(
            auth.user(Some(format!("Bearer {forged}").as_bytes())),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            auth.user(Some(format!("Bearer {expired}").as_bytes())),
            Err(AuthError::Invalid)
        );
        assert_eq!(auth.user(None), Err(AuthError::Missing));
        assert_eq!(auth.user(Some(b"Basic abc")), Err(AuthError::Missing));
    }

    #[test]
    fn admin_token_is_checked_exactly() {
        let auth = Auth::new("s", "admin-token");
        assert!(auth.admin(Some(b"Bearer admin-token")).is_ok());
        assert!(auth.admin(Some(b"Bearer admin-tokeN")).is_err());
        assert!(auth.admin(Some(b"Bearer admin")).is_err());
        let user = auth.mint(1, 60).unwrap();
        assert!(
            auth.admin(Some(format!("Bearer {user}").as_bytes()))
                .is_err()
        );
    }
}
