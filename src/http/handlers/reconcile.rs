//! `GET /admin/reconcile`: the reconcile report as JSON, for the operator
//! console. The same comparison of Redis and PostgreSQL as `seckill
//! reconcile` ([`crate::recovery::reconcile`]) over every promotion not yet
//! ended, without the sum of the buyers' counts (an `HVALS`, O(buyers) in
//! Redis, which the CLI adds and a page refreshing during a sale must not).

use chrono::Utc;
use hyper::StatusCode;

use crate::http::request::Request;
use crate::http::{ApiError, Response, json};
use crate::recovery::{self, Reconciliation};

fn row(r: &Reconciliation) -> serde_json::Value {
    serde_json::json!({
        "promotion_id": r.promotion_id,
        "stock": r.stock,
        "remaining": r.remaining,
        "sold": r.sold,
        "returned": r.returned,
        "unpersisted": r.unpersisted,
        "lost": r.lost,
        "persisted": r.persisted,
        "paid": r.paid,
        "cancelled": r.cancelled,
        "drift": r.drift,
    })
}

/// `200 {"checked_at", "drift": bool, "promotions": [...]}`.
pub async fn report(req: Request) -> Result<Response, ApiError> {
    req.admin()?;
    let state = &req.state;
    let rows = recovery::reconcile(&state.db, &state.store, None, false).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "checked_at": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "drift": rows.iter().any(|r| r.drift != 0),
            "promotions": rows.iter().map(row).collect::<Vec<_>>(),
        }),
    ))
}
