//! The `promotions` table.

use anyhow::Context;
use sqlx::PgPool;

use super::model::{NewPromotion, Promotion};

const COLUMNS: &str = "id, name, stock, per_user_limit, price_cents, starts_at, ends_at, \
                       require_token, require_captcha, buckets";

/// Why an edit or a delete was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    /// The promotion has started (edit) or is running (delete).
    Started,
    /// Orders exist for it; deleting would orphan them.
    HasOrders,
}

pub async fn insert(db: &PgPool, p: &NewPromotion) -> anyhow::Result<Promotion> {
    sqlx::query_as::<_, Promotion>(
        "INSERT INTO promotions (name, stock, per_user_limit, price_cents, starts_at, ends_at, \
         require_token, require_captcha, buckets) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         RETURNING id, name, stock, per_user_limit, price_cents, starts_at, ends_at, \
         require_token, require_captcha, buckets",
    )
    .bind(&p.name)
    .bind(p.stock)
    .bind(p.per_user_limit)
    .bind(p.price_cents)
    .bind(p.starts_at)
    .bind(p.ends_at)
    .bind(p.require_token)
    .bind(p.require_captcha)
    .bind(p.buckets)
    .fetch_one(db)
    .await
    .context("failed to insert promotion")
}

pub async fn get(db: &PgPool, id: i64) -> anyhow::Result<Option<Promotion>> {
    sqlx::query_as::<_, Promotion>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM promotions WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await
    .with_context(|| format!("failed to read promotion {id}"))
}

pub async fn list(db: &PgPool) -> anyhow::Result<Vec<Promotion>> {
    sqlx::query_as::<_, Promotion>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM promotions ORDER BY id"
    )))
    .fetch_all(db)
    .await
    .context("failed to list promotions")
}

/// Promotions that have not ended yet: the public list.
pub async fn list_open(db: &PgPool) -> anyhow::Result<Vec<Promotion>> {
    sqlx::query_as::<_, Promotion>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM promotions WHERE ends_at > now() ORDER BY starts_at, id"
    )))
    .fetch_all(db)
    .await
    .context("failed to list open promotions")
}

/// The edit of every field of promotion `$1`, to be completed with its
/// condition and `RETURNING`.
macro_rules! update_sql {
    () => {
        "UPDATE promotions SET name = $2, stock = $3, per_user_limit = $4, price_cents = $5, \
         starts_at = $6, ends_at = $7, require_token = $8, require_captcha = $9, buckets = $10, \
         updated_at = now() WHERE id = $1"
    };
}
const RETURNING: &str = " RETURNING id, name, stock, per_user_limit, price_cents, starts_at, \
                         ends_at, require_token, require_captcha, buckets";

/// Writes `p`'s fields into promotion `id` with `sql` (an `update_sql!`).
async fn write(
    db: &PgPool,
    id: i64,
    p: &NewPromotion,
    sql: &'static str,
) -> anyhow::Result<Option<Promotion>> {
    sqlx::query_as::<_, Promotion>(sqlx::AssertSqlSafe(format!("{sql}{RETURNING}")))
        .bind(id)
        .bind(&p.name)
        .bind(p.stock)
        .bind(p.per_user_limit)
        .bind(p.price_cents)
        .bind(p.starts_at)
        .bind(p.ends_at)
        .bind(p.require_token)
        .bind(p.require_captcha)
        .bind(p.buckets)
        .fetch_optional(db)
        .await
        .with_context(|| format!("failed to update promotion {id}"))
}

/// Replaces the fields of a promotion that has not started; the check and
/// the write are one statement, so an edit cannot slip past the start.
pub async fn update_before_start(
    db: &PgPool,
    id: i64,
    p: &NewPromotion,
) -> anyhow::Result<Result<Promotion, Refusal>> {
    let sql = concat!(update_sql!(), " AND starts_at > now()");
    match write(db, id, p, sql).await? {
        Some(p) => Ok(Ok(p)),
        None => Ok(Err(match get(db, id).await? {
            None => Refusal::NotFound,
            Some(_) => Refusal::Started,
        })),
    }
}

/// Writes `p`'s fields back as they were: only for undoing an edit whose
/// preheat failed, before the promotion starts.
pub async fn restore(db: &PgPool, p: &Promotion) -> anyhow::Result<()> {
    write(db, p.id, &p.fields(), update_sql!()).await?;
    Ok(())
}

/// Deletes a promotion that is not running and has no orders, in one statement.
pub async fn delete_unless_running(db: &PgPool, id: i64) -> anyhow::Result<Result<(), Refusal>> {
    let deleted = sqlx::query(
        "DELETE FROM promotions p WHERE p.id = $1 \
         AND NOT (p.starts_at <= now() AND p.ends_at > now()) \
         AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.promotion_id = p.id)",
    )
    .bind(id)
    .execute(db)
    .await
    .with_context(|| format!("failed to delete promotion {id}"))?;
    if deleted.rows_affected() == 1 {
        return Ok(Ok(()));
    }
    let Some(p) = get(db, id).await? else {
        return Ok(Err(Refusal::NotFound));
    };
    Ok(Err(if p.is_active(chrono::Utc::now()) {
        Refusal::Started
    } else {
        Refusal::HasOrders
    }))
}

/// Removes a promotion unconditionally: only for undoing a creation whose
/// preheat failed, before anything could be sold.
pub async fn remove(db: &PgPool, id: i64) -> anyhow::Result<()> {
    sqlx::query("DELETE FROM promotions WHERE id = $1")
        .bind(id)
        .execute(db)
        .await
        .with_context(|| format!("failed to remove promotion {id}"))?;
    Ok(())
}
