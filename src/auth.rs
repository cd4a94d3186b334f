//! Who is calling: user JWTs (HS256, `sub` = user id, `exp` required) and the
//! admin bearer token.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Seconds of clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 5;

/// Verifies user tokens and the admin token; mints user tokens.
#[derive(Clone)]
pub struct Auth {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
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

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: serde_json::Value,
    exp: u64,
}

impl Auth {
    pub fn new(jwt_secret: &str, admin_token: &str) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // `sub` is checked by `parse_user_id`: it may be a number, which the
        // library's own `sub` check would refuse.
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = LEEWAY_SECS;
        Auth {
            encoding: EncodingKey::from_secret(jwt_secret.as_bytes()),
            decoding: DecodingKey::from_secret(jwt_secret.as_bytes()),
            validation,
            admin_token: admin_token.to_string(),
        }
    }

    /// The user id of a request's `Authorization: Bearer <JWT>` header.
    pub fn user(&self, authorization: Option<&[u8]>) -> Result<i64, AuthError> {
        let token = bearer(authorization).ok_or(AuthError::Missing)?;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| AuthError::Invalid)?;
        parse_user_id(&data.claims.sub).ok_or(AuthError::Invalid)
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

    /// A user token valid for `ttl_secs`.
    pub fn mint(&self, user_id: i64, ttl_secs: u64) -> anyhow::Result<String> {
        let claims = Claims {
            sub: serde_json::Value::String(user_id.to_string()),
            exp: unix_now() + ttl_secs,
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
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims { sub, exp },
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
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
