//! The promotion record, its validation rules and its JSON forms.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::stock::PromotionMeta;

/// Largest stock of one promotion (API.md).
pub const MAX_STOCK: i64 = 100_000_000;
/// Longest name, in characters (API.md).
pub const MAX_NAME_CHARS: usize = 200;
/// A per-user limit above this is surely a typo, and would let one buyer
/// drain a sale; the server caps it.
pub const MAX_PER_USER_LIMIT: i64 = 1_000;
/// One billion units of currency, in cents: far above any flash-sale price.
pub const MAX_PRICE_CENTS: i64 = 100_000_000_000;
/// Most buckets one promotion's stock may be split into (API.md).
pub const MAX_BUCKETS: i32 = crate::stock::buckets::MAX_BUCKETS as i32;

/// The times a promotion may use: well inside what PostgreSQL and Unix
/// milliseconds can hold.
fn time_range() -> (DateTime<Utc>, DateTime<Utc>) {
    let at = |y| {
        chrono::NaiveDate::from_ymd_opt(y, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc())
            .expect("a valid date")
    };
    (at(2000), at(10000) - chrono::Duration::seconds(1))
}

/// A promotion as recorded in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Promotion {
    pub id: i64,
    pub name: String,
    pub stock: i64,
    pub per_user_limit: i64,
    pub price_cents: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub require_token: bool,
    pub require_captcha: bool,
    /// Redis buckets the stock is split into (1: one hash tag, as before).
    pub buckets: i32,
}

/// Where a promotion is in its life, as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Upcoming,
    Active,
    Ended,
    SoldOut,
}

impl Promotion {
    /// The status at `now`, given the units left (`None` when unknown).
    pub fn status(&self, now: DateTime<Utc>, remaining: Option<i64>) -> Status {
        if now < self.starts_at {
            Status::Upcoming
        } else if now >= self.ends_at {
            Status::Ended
        } else if remaining == Some(0) {
            Status::SoldOut
        } else {
            Status::Active
        }
    }

    /// Whether the sale window is open at `now`.
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.starts_at <= now && now < self.ends_at
    }

    /// Its fields, without the id.
    pub fn fields(&self) -> NewPromotion {
        NewPromotion {
            name: self.name.clone(),
            stock: self.stock,
            per_user_limit: self.per_user_limit,
            price_cents: self.price_cents,
            starts_at: self.starts_at,
            ends_at: self.ends_at,
            require_token: self.require_token,
            require_captcha: self.require_captcha,
            buckets: self.buckets,
        }
    }

    /// The fields the purchase script checks.
    pub fn meta(&self) -> PromotionMeta {
        PromotionMeta {
            id: self.id,
            starts_ms: self.starts_at.timestamp_millis(),
            ends_ms: self.ends_at.timestamp_millis(),
            per_user_limit: self.per_user_limit,
            price_cents: self.price_cents,
            stock: self.stock,
            require_token: self.require_token,
            require_captcha: self.require_captcha,
            buckets: self.buckets.clamp(1, MAX_BUCKETS) as u32,
        }
    }

    /// The promotion object of the API.
    pub fn to_json(&self, now: DateTime<Utc>, remaining: Option<i64>) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "stock": self.stock,
            "per_user_limit": self.per_user_limit,
            "price_cents": self.price_cents,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "require_token": self.require_token,
            "require_captcha": self.require_captcha,
            "buckets": self.buckets,
            "status": self.status(now, remaining),
        })
    }

    /// The public view: no internals, with an approximate `remaining`.
    pub fn to_public_json(&self, now: DateTime<Utc>, remaining: Option<i64>) -> serde_json::Value {
        let mut v = self.to_json(now, remaining);
        v["remaining"] = serde_json::json!(remaining.unwrap_or(0).max(0));
        v
    }
}

/// The body of `POST` and `PUT /admin/promotions`. Every field is optional
/// here; [`PromotionInput::into_new`] and [`PromotionInput::apply_to`] decide
/// what is required.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromotionInput {
    pub name: Option<String>,
    pub stock: Option<i64>,
    pub per_user_limit: Option<i64>,
    pub price_cents: Option<i64>,
    pub starts_at: Option<DateTime<Utc>>,
    pub ends_at: Option<DateTime<Utc>>,
    pub require_token: Option<bool>,
    pub require_captcha: Option<bool>,
    pub buckets: Option<i32>,
}

/// A promotion's fields before it has an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewPromotion {
    pub name: String,
    pub stock: i64,
    pub per_user_limit: i64,
    pub price_cents: i64,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub require_token: bool,
    pub require_captcha: bool,
    pub buckets: i32,
}

/// A rule the input broke; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

impl PromotionInput {
    /// Validates a creation body: `name`, `stock`, `starts_at`, `ends_at` are
    /// required, the rest default as API.md says.
    pub fn into_new(self) -> Result<NewPromotion, Invalid> {
        let missing = |f: &str| Invalid(format!("`{f}` is required"));
        let new = NewPromotion {
            name: self.name.ok_or_else(|| missing("name"))?,
            stock: self.stock.ok_or_else(|| missing("stock"))?,
            per_user_limit: self.per_user_limit.unwrap_or(1),
            price_cents: self.price_cents.unwrap_or(0),
            starts_at: self.starts_at.ok_or_else(|| missing("starts_at"))?,
            ends_at: self.ends_at.ok_or_else(|| missing("ends_at"))?,
            require_token: self.require_token.unwrap_or(false),
            require_captcha: self.require_captcha.unwrap_or(false),
            buckets: self.buckets.unwrap_or(1),
        };
        new.validated()
    }

    /// Applies an edit body to an existing promotion and validates the result.
    pub fn apply_to(self, p: &Promotion) -> Result<NewPromotion, Invalid> {
        let new = NewPromotion {
            name: self.name.unwrap_or_else(|| p.name.clone()),
            stock: self.stock.unwrap_or(p.stock),
            per_user_limit: self.per_user_limit.unwrap_or(p.per_user_limit),
            price_cents: self.price_cents.unwrap_or(p.price_cents),
            starts_at: self.starts_at.unwrap_or(p.starts_at),
            ends_at: self.ends_at.unwrap_or(p.ends_at),
            require_token: self.require_token.unwrap_or(p.require_token),
            require_captcha: self.require_captcha.unwrap_or(p.require_captcha),
            buckets: self.buckets.unwrap_or(p.buckets),
        };
        new.validated()
    }
}

impl NewPromotion {
    fn validated(mut self) -> Result<NewPromotion, Invalid> {
        let chars = self.name.chars().count();
        if self.name.trim().is_empty() || chars > MAX_NAME_CHARS {
            return Err(Invalid(format!(
                "`name` must be 1 to {MAX_NAME_CHARS} characters, not blank"
            )));
        }
        if self.name.chars().any(char::is_control) {
            return Err(Invalid("`name` must not contain control characters".into()));
        }
        if !(1..=MAX_STOCK).contains(&self.stock) {
            return Err(Invalid(format!("`stock` must be 1 to {MAX_STOCK}")));
        }
        if !(1..=MAX_PER_USER_LIMIT).contains(&self.per_user_limit) {
            return Err(Invalid(format!(
                "`per_user_limit` must be 1 to {MAX_PER_USER_LIMIT}"
            )));
        }
        if !(0..=MAX_PRICE_CENTS).contains(&self.price_cents) {
            return Err(Invalid(format!(
                "`price_cents` must be 0 to {MAX_PRICE_CENTS}"
            )));
        }
        if !(1..=MAX_BUCKETS).contains(&self.buckets) {
            return Err(Invalid(format!("`buckets` must be 1 to {MAX_BUCKETS}")));
        }
        let (earliest, latest) = time_range();
        for (field, t) in [("starts_at", self.starts_at), ("ends_at", self.ends_at)] {
            if t < earliest || t > latest {
                return Err(Invalid(format!(
                    "`{field}` must be between the years 2000 and 9999"
                )));
            }
        }
        if self.ends_at <= self.starts_at {
            return Err(Invalid("`ends_at` must be after `starts_at`".into()));
        }
        // A captcha guards the token, so it implies one.
        if self.require_captcha {
            self.require_token = true;
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn input() -> PromotionInput {
        let now = Utc::now();
        PromotionInput {
            name: Some("Phone".into()),
            stock: Some(10),
            starts_at: Some(now),
            ends_at: Some(now + Duration::hours(1)),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_apply_on_create() {
        let p = input().into_new().unwrap();
        assert_eq!((p.per_user_limit, p.price_cents), (1, 0));
        assert!(!p.require_token && !p.require_captcha);
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: Vec<(PromotionInput, &str)> = vec![
            (
                PromotionInput {
                    name: Some(String::new()),
                    ..input()
                },
                "name",
            ),
            (
                PromotionInput {
                    name: Some("x".repeat(201)),
                    ..input()
                },
                "name",
            ),
            (
                PromotionInput {
                    stock: Some(0),
                    ..input()
                },
                "stock",
            ),
            (
                PromotionInput {
                    stock: Some(-5),
                    ..input()
                },
                "stock",
            ),
            (
                PromotionInput {
                    stock: Some(MAX_STOCK + 1),
                    ..input()
                },
                "stock",
            ),
            (
                PromotionInput {
                    per_user_limit: Some(0),
                    ..input()
                },
                "per_user_limit",
            ),
            (
                PromotionInput {
                    price_cents: Some(-1),
                    ..input()
                },
                "price_cents",
            ),
            (
                PromotionInput {
                    ends_at: input().starts_at,
                    ..input()
                },
                "ends_at",
            ),
            (
                PromotionInput {
                    stock: None,
                    ..input()
                },
                "stock",
            ),
        ];
        for (case, field) in cases {
            let err = case.into_new().unwrap_err();
            assert!(err.0.contains(field), "{err} should name {field}");
        }
    }

    #[test]
    fn two_hundred_characters_is_the_longest_name() {
        let p = PromotionInput {
            name: Some("é".repeat(200)),
            ..input()
        };
        assert!(p.into_new().is_ok());
    }

    #[test]
    fn captcha_implies_token() {
        let p = PromotionInput {
            require_captcha: Some(true),
            ..input()
        }
        .into_new()
        .unwrap();
        assert!(p.require_token);
    }
}
