//! The order message `lua/purchase.lua` appends to a promotion's stream, and
//! a stream entry as a worker holds it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use redis::Value;
use redis::streams::StreamId;

/// One order, as written by `lua/purchase.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderMessage {
    pub order_id: String,
    pub promotion_id: i64,
    pub user_id: i64,
    /// The buyer's n-th unit of this promotion, from 1.
    pub seq: i64,
    pub price_cents: i64,
    pub created_at: DateTime<Utc>,
    /// The W3C `traceparent` of the buyer's request, present only when the
    /// gateway exported traces; entries without it are just as valid.
    pub traceparent: Option<String>,
}

impl OrderMessage {
    /// Parses a stream entry's fields; `None` when a field is missing or malformed.
    pub fn from_fields(fields: &HashMap<String, Value>) -> Option<OrderMessage> {
        let text = |name: &str| -> Option<&str> {
            match fields.get(name)? {
                Value::BulkString(b) => std::str::from_utf8(b).ok(),
                Value::SimpleString(s) => Some(s),
                _ => None,
            }
        };
        let int = |name: &str| -> Option<i64> {
            match fields.get(name)? {
                Value::Int(i) => Some(*i),
                _ => text(name)?.parse::<i64>().ok(),
            }
        };
        let order_id = text("order_id").filter(|s| !s.is_empty())?.to_string();
        Some(OrderMessage {
            order_id,
            promotion_id: int("promotion_id")?,
            user_id: int("user_id")?,
            seq: int("seq")?,
            price_cents: int("price_cents")?,
            created_at: DateTime::from_timestamp_millis(int("created_ms")?)?,
            // A malformed trace context loses the trace, never the order.
            traceparent: text("traceparent")
                .filter(|t| !t.is_empty())
                .map(str::to_string),
        })
    }
}

/// One stream entry in hand: where it came from and what it says.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stream: String,
    pub id: String,
    /// `None` when the entry is malformed (it goes to the dead-letter stream).
    pub message: Option<OrderMessage>,
    /// The raw fields of a malformed entry, for its dead-letter copy.
    pub raw: Vec<(String, String)>,
}

impl Entry {
    pub fn new(stream: &str, sid: StreamId) -> Entry {
        let message = OrderMessage::from_fields(&sid.map);
        // The raw fields are kept only for the dead-letter copy of a
        // malformed entry: a well-formed one would pay an allocation per field.
        let raw = if message.is_some() {
            Vec::new()
        } else {
            sid.map
                .iter()
                .map(|(k, v)| (k.clone(), format!("{v:?}")))
                .collect()
        };
        Entry {
            stream: stream.to_string(),
            id: sid.id,
            message,
            raw,
        }
    }
}

impl Entry {
    /// The entry's fields as text, for its dead-letter copy.
    pub fn fields(&self) -> Vec<(String, String)> {
        match &self.message {
            None => self.raw.clone(),
            Some(m) => {
                let mut fields = vec![
                    ("order_id".into(), m.order_id.clone()),
                    ("promotion_id".into(), m.promotion_id.to_string()),
                    ("user_id".into(), m.user_id.to_string()),
                    ("seq".into(), m.seq.to_string()),
                    ("price_cents".into(), m.price_cents.to_string()),
                    (
                        "created_ms".into(),
                        m.created_at.timestamp_millis().to_string(),
                    ),
                ];
                if let Some(t) = &m.traceparent {
                    fields.push(("traceparent".into(), t.clone()));
                }
                fields
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn parses_what_the_script_writes() {
        let fields: HashMap<String, Value> = [
            ("order_id", bulk("abc")),
            ("promotion_id", bulk("7")),
            ("user_id", bulk("42")),
            ("seq", bulk("1")),
            ("price_cents", bulk("99900")),
            ("created_ms", bulk("1700000000000")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let m = OrderMessage::from_fields(&fields).unwrap();
        assert_eq!((m.promotion_id, m.user_id, m.seq), (7, 42, 1));
        assert_eq!(m.created_at.timestamp_millis(), 1_700_000_000_000);
        assert_eq!(m.traceparent, None);
    }

    #[test]
    fn parses_an_entry_with_a_trace_context() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let fields: HashMap<String, Value> = [
            ("order_id", bulk("abc")),
            ("promotion_id", bulk("7")),
            ("user_id", bulk("42")),
            ("seq", bulk("1")),
            ("price_cents", bulk("99900")),
            ("created_ms", bulk("1700000000000")),
            ("traceparent", bulk(tp)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let m = OrderMessage::from_fields(&fields).unwrap();
        assert_eq!(m.traceparent.as_deref(), Some(tp));
        assert_eq!((m.promotion_id, m.user_id), (7, 42));
        let entry = Entry {
            stream: "s".into(),
            id: "1-0".into(),
            message: Some(m),
            raw: Vec::new(),
        };
        assert!(entry.fields().contains(&("traceparent".into(), tp.into())));
    }

    #[test]
    fn rejects_a_malformed_entry() {
        let fields: HashMap<String, Value> = [
            ("order_id".to_string(), bulk("abc")),
            ("user_id".to_string(), bulk("x")),
        ]
        .into_iter()
        .collect();
        assert!(OrderMessage::from_fields(&fields).is_none());
    }
}
