//! The `users` table.

use anyhow::Context;
use sqlx::PgPool;

/// An account as a login needs it.
#[derive(Debug, sqlx::FromRow)]
pub struct Account {
    pub id: i64,
    pub password_hash: String,
}

/// Creates an account; `None` when the username is taken.
pub async fn insert(
    db: &PgPool,
    username: &str,
    password_hash: &str,
) -> anyhow::Result<Option<i64>> {
    let inserted: Result<i64, sqlx::Error> = sqlx::query_scalar(
        "INSERT INTO users (username, password_hash) VALUES ($1, $2) RETURNING id",
    )
    .bind(username)
    .bind(password_hash)
    .fetch_one(db)
    .await;
    match inserted {
        Ok(id) => Ok(Some(id)),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(None),
        Err(e) => Err(e).context("failed to create the account"),
    }
}

/// The account named `username`.
pub async fn find(db: &PgPool, username: &str) -> anyhow::Result<Option<Account>> {
    sqlx::query_as("SELECT id, password_hash FROM users WHERE username = $1")
        .bind(username)
        .fetch_optional(db)
        .await
        .context("failed to look up the account")
}
