//! The order message `lua/purchase.lua` appends to a promotion's stream, and
//! a stream entry as a worker holds it.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use redis::streams::StreamId;
use redis::{FromRedisValue, ParsingError, Value};

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

/// The entries of an `XREADGROUP` reply (RESP2 or RESP3; `Nil` when the read
/// timed out), parsed from the owned reply in one pass: no per-entry field map
/// as `StreamReadReply` builds, no copy of a value (an order id's bytes become
/// its `String`). A worker reads a thousand entries per call; this is the
/// worker's largest CPU cost after the allocator (docs/decisions.md).
#[derive(Debug, Default)]
pub struct ReadReply(pub Vec<Entry>);

fn parsing(what: &str) -> ParsingError {
    ParsingError::from(format!("unexpected stream read reply: {what}"))
}

/// A two-element array `[a, b]` as a pair.
fn pair(v: Value) -> Result<(Value, Value), ParsingError> {
    match v {
        Value::Array(items) if items.len() == 2 => {
            let mut it = items.into_iter();
            Ok((
                it.next().unwrap_or(Value::Nil),
                it.next().unwrap_or(Value::Nil),
            ))
        }
        _ => Err(parsing("expected a pair")),
    }
}

fn into_string(v: Value) -> Result<String, ParsingError> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8(b)?),
        Value::SimpleString(s) => Ok(s),
        Value::VerbatimString { text, .. } => Ok(text),
        _ => Err(parsing("expected a string")),
    }
}

/// A flat `[k1, v1, k2, v2, …]` array or a RESP3 map, as pairs.
fn field_pairs(v: Value) -> Result<Vec<(Value, Value)>, ParsingError> {
    match v {
        Value::Map(m) => Ok(m),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut it = items.into_iter();
            while let Some(k) = it.next() {
                out.push((k, it.next().ok_or_else(|| parsing("odd field count"))?));
            }
            Ok(out)
        }
        Value::Nil => Ok(Vec::new()),
        _ => Err(parsing("expected fields")),
    }
}

/// The fields of one order entry as they are read, before the order id is
/// taken out of the reply.
#[derive(Default)]
struct Fields {
    /// Index of the `order_id` pair.
    order_id: Option<usize>,
    promotion_id: Option<i64>,
    user_id: Option<i64>,
    seq: Option<i64>,
    price_cents: Option<i64>,
    created_ms: Option<i64>,
    /// Index of the `traceparent` pair, when the entry has one.
    traceparent: Option<usize>,
}

impl Fields {
    /// Records field `i`; false when its value does not parse.
    fn set(&mut self, i: usize, name: &[u8], value: &Value) -> bool {
        let int = || -> Option<i64> {
            match value {
                Value::Int(n) => Some(*n),
                Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
                _ => None,
            }
        };
        let slot = match name {
            b"order_id" => {
                let ok = matches!(value, Value::BulkString(b) if !b.is_empty() && std::str::from_utf8(b).is_ok());
                self.order_id = Some(i);
                return ok;
            }
            b"promotion_id" => &mut self.promotion_id,
            b"user_id" => &mut self.user_id,
            b"seq" => &mut self.seq,
            b"price_cents" => &mut self.price_cents,
            b"created_ms" => &mut self.created_ms,
            // A malformed trace context loses the trace, never the order.
            b"traceparent" => {
                self.traceparent = Some(i);
                return true;
            }
            // Fields a later script version adds are not ours to refuse.
            _ => return true,
        };
        *slot = int();
        slot.is_some()
    }
}

/// Every pair of a malformed entry as text, for its dead-letter copy.
fn raw_of(pairs: &[(Value, Value)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| {
            let k = match k {
                Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                other => format!("{other:?}"),
            };
            (k, format!("{v:?}"))
        })
        .collect()
}

impl Entry {
    /// One `[id, fields]` element of a stream's entries.
    fn from_value(stream: &str, v: Value) -> Result<Entry, ParsingError> {
        let (id, fields) = pair(v)?;
        let id = into_string(id)?;
        let mut pairs = field_pairs(fields)?;
        let mut f = Fields::default();
        let mut ok = true;
        for (i, (k, v)) in pairs.iter().enumerate() {
            ok &= match k {
                Value::BulkString(name) => f.set(i, name, v),
                Value::SimpleString(name) => f.set(i, name.as_bytes(), v),
                _ => false,
            };
        }
        let complete = ok
            && f.promotion_id.is_some()
            && f.user_id.is_some()
            && f.seq.is_some()
            && f.price_cents.is_some();
        let created_at = f.created_ms.and_then(DateTime::from_timestamp_millis);
        let traceparent = f.traceparent.and_then(|i| match &pairs[i].1 {
            Value::BulkString(b) if !b.is_empty() => {
                std::str::from_utf8(b).ok().map(str::to_string)
            }
            _ => None,
        });
        let message = match (complete, f.order_id, created_at) {
            (true, Some(i), Some(created_at)) => {
                match std::mem::replace(&mut pairs[i].1, Value::Nil) {
                    Value::BulkString(b) => {
                        String::from_utf8(b).ok().map(|order_id| OrderMessage {
                            order_id,
                            promotion_id: f.promotion_id.unwrap_or_default(),
                            user_id: f.user_id.unwrap_or_default(),
                            seq: f.seq.unwrap_or_default(),
                            price_cents: f.price_cents.unwrap_or_default(),
                            created_at,
                            traceparent,
                        })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        // The raw fields are kept only for the dead-letter copy of a
        // malformed entry: a well-formed one would pay an allocation per field.
        let raw = if message.is_some() {
            Vec::new()
        } else {
            raw_of(&pairs)
        };
        Ok(Entry {
            stream: stream.to_string(),
            id,
            message,
            raw,
        })
    }
}

impl FromRedisValue for ReadReply {
    fn from_redis_value(v: Value) -> Result<Self, ParsingError> {
        let streams: Vec<(Value, Value)> = match v {
            Value::Nil => return Ok(ReadReply::default()),
            Value::Map(m) => m,
            Value::Array(items) => items.into_iter().map(pair).collect::<Result<_, _>>()?,
            _ => return Err(parsing("expected streams")),
        };
        let mut out = Vec::new();
        for (name, entries) in streams {
            let name = into_string(name)?;
            let entries = match entries {
                Value::Array(e) => e,
                Value::Nil => continue,
                _ => return Err(parsing("expected entries")),
            };
            out.reserve(entries.len());
            for e in entries {
                out.push(Entry::from_value(&name, e)?);
            }
        }
        Ok(ReadReply(out))
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

    fn entry(fields: &[(&str, Value)]) -> Value {
        let flat = fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), v.clone()])
            .collect();
        Value::Array(vec![bulk("1-1"), Value::Array(flat)])
    }

    fn script_fields() -> Vec<(&'static str, Value)> {
        vec![
            ("order_id", bulk("abc")),
            ("promotion_id", bulk("7")),
            ("user_id", bulk("42")),
            ("seq", bulk("1")),
            ("price_cents", bulk("99900")),
            ("created_ms", bulk("1700000000000")),
        ]
    }

    #[test]
    fn a_read_reply_parses_like_the_field_map() {
        let good = entry(&script_fields());
        let mut bad_fields = script_fields();
        bad_fields[2] = ("user_id", bulk("x"));
        let bad = entry(&bad_fields);
        let missing = entry(&script_fields()[..5]);
        let resp2 = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![good.clone(), bad.clone(), missing.clone()]),
        ])]);
        let resp3 = Value::Map(vec![(bulk("s"), Value::Array(vec![good, bad, missing]))]);
        for reply in [resp2, resp3] {
            let ReadReply(entries) = ReadReply::from_redis_value(reply).unwrap();
            assert_eq!(entries.len(), 3);
            assert!(entries.iter().all(|e| e.stream == "s" && e.id == "1-1"));
            let m = entries[0].message.as_ref().unwrap();
            assert_eq!(m.order_id, "abc");
            assert_eq!(
                (m.promotion_id, m.user_id, m.seq, m.price_cents),
                (7, 42, 1, 99900)
            );
            assert_eq!(m.created_at.timestamp_millis(), 1_700_000_000_000);
            assert!(entries[0].raw.is_empty());
            assert!(entries[1].message.is_none());
            assert_eq!(
                entries[1].raw.len(),
                6,
                "every field kept for the dead letter"
            );
            assert!(entries[2].message.is_none());
            assert_eq!(entries[2].raw.len(), 5);
        }
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut traced = script_fields();
        traced.push(("traceparent", bulk(tp)));
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![entry(&traced)]),
        ])]);
        let ReadReply(entries) = ReadReply::from_redis_value(reply).unwrap();
        assert_eq!(
            entries[0].message.as_ref().unwrap().traceparent.as_deref(),
            Some(tp)
        );
        let ReadReply(none) = ReadReply::from_redis_value(Value::Nil).unwrap();
        assert!(none.is_empty());
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
