//! Admission to a promotion that requires it: short-lived tokens bound to a
//! user and a promotion (HMAC-signed, so the purchase path verifies them
//! without Redis), and the captcha that guards them.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Why a token was refused. All are `403 invalid_token`; the variants are
/// for the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Missing,
    Malformed,
    BadSignature,
    OtherPromotion,
    OtherUser,
    Expired,
}

/// Signs and verifies admission tokens.
#[derive(Clone)]
pub struct AdmissionTokens {
    key: Vec<u8>,
}

impl AdmissionTokens {
    pub fn new(secret: &str) -> Self {
        AdmissionTokens {
            key: secret.as_bytes().to_vec(),
        }
    }

    fn mac(&self, payload: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any size");
        mac.update(payload.as_bytes());
        mac
    }

    /// A token for `user_id` on `promotion_id`, valid until `expires_ms`
    /// (Unix milliseconds): `promotion.user.expires.signature`.
    pub fn sign(&self, promotion_id: i64, user_id: i64, expires_ms: i64) -> String {
        let payload = format!("{promotion_id}.{user_id}.{expires_ms}");
        let sig = self.mac(&payload).finalize().into_bytes();
        format!("{payload}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// Checks a token against the purchase it comes with.
    pub fn verify(
        &self,
        token: Option<&str>,
        promotion_id: i64,
        user_id: i64,
        now_ms: i64,
    ) -> Result<(), TokenError> {
        let token = token.ok_or(TokenError::Missing)?;
        if token.len() > 256 {
            return Err(TokenError::Malformed);
        }
        let (payload, sig) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        self.mac(payload)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let mut parts = payload.split('.').map(str::parse::<i64>);
        let (Some(Ok(p)), Some(Ok(u)), Some(Ok(exp)), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if p != promotion_id {
            return Err(TokenError::OtherPromotion);
        }
        if u != user_id {
            return Err(TokenError::OtherUser);
        }
        if exp <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// A captcha challenge: the image and the expected answer.
pub struct Challenge {
    pub answer: String,
    pub png_base64: String,
}

/// Characters a challenge draws from: the font's letters and digits, minus
/// the ones people confuse (1/l/I, 0/O, 5/S, 2/Z).
const CAPTCHA_CHARS: &[char] = &[
    '3', '4', '6', '7', '8', '9', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'J', 'K', 'M', 'N', 'P',
    'Q', 'R', 'T', 'U', 'V', 'W', 'X', 'Y',
];

/// Draws a five-character challenge (CPU work: call it off the async threads).
pub fn draw_challenge() -> Option<Challenge> {
    use captcha::filters::{Noise, Wave};
    let mut c = captcha::Captcha::new();
    c.set_chars(CAPTCHA_CHARS)
        .add_chars(5)
        .apply_filter(Noise::new(0.2))
        .apply_filter(Wave::new(2.0, 12.0))
        .view(220, 100);
    let png = c.as_png()?;
    Some(Challenge {
        answer: c.chars_as_string(),
        png_base64: STANDARD.encode(png),
    })
}

/// Whether `given` answers `expected` (case and surrounding spaces ignored).
pub fn answer_matches(expected: &str, given: &str) -> bool {
    let given = given.trim();
    given.len() == expected.len() && given.eq_ignore_ascii_case(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_bound_to_its_promotion_user_and_time() {
        let t = AdmissionTokens::new("k");
        let token = t.sign(7, 42, 10_000);
        assert_eq!(t.verify(Some(&token), 7, 42, 9_999), Ok(()));
        assert_eq!(
            t.verify(Some(&token), 8, 42, 9_999),
            Err(TokenError::OtherPromotion)
        );
        assert_eq!(
            t.verify(Some(&token), 7, 43, 9_999),
            Err(TokenError::OtherUser)
        );
        assert_eq!(
            t.verify(Some(&token), 7, 42, 10_000),
            Err(TokenError::Expired)
        );
        assert_eq!(t.verify(None, 7, 42, 0), Err(TokenError::Missing));
    }

    #[test]
    fn forged_and_garbled_tokens_are_refused() {
        let t = AdmissionTokens::new("k");
        let other = AdmissionTokens::new("other key").sign(7, 42, 10_000);
        assert_eq!(
            t.verify(Some(&other), 7, 42, 0),
            Err(TokenError::BadSignature)
        );
        let token = t.sign(7, 42, 10_000);
        let tampered = token.replacen("7.42", "7.43", 1);
        assert_eq!(
            t.verify(Some(&tampered), 7, 43, 0),
            Err(TokenError::BadSignature)
        );
        for junk in ["", ".", "a.b.c.d", "7.42.10000.!!!", &"x".repeat(300)] {
            assert!(t.verify(Some(junk), 7, 42, 0).is_err(), "{junk}");
        }
    }

    #[test]
    fn a_challenge_is_a_png_with_a_five_character_answer() {
        let c = draw_challenge().unwrap();
        assert_eq!(c.answer.chars().count(), 5);
        let png = STANDARD.decode(&c.png_base64).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert!(answer_matches(&c.answer, &c.answer.to_lowercase()));
        assert!(!answer_matches(&c.answer, "nope"));
    }
}
