//! PostgreSQL: the pool, the migrations and the health check. The SQL on each
//! table lives in that table's repository (`promotions::repo`, `orders::repo`).

use std::time::Duration;

use anyhow::Context;
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgPool, Postgres};

/// How long a request waits for a pooled connection before failing (`503`).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

/// A pool of at most `max_connections` on `url`, creating the database when
/// absent.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    if !Postgres::database_exists(url)
        .await
        .context("failed to reach postgresql")?
    {
        Postgres::create_database(url)
            .await
            .context("failed to create the database")?;
        tracing::info!("created the database");
    }
    pool(url, max_connections).await
}

/// A pool of at most `max_connections` on the existing database `url`.
pub async fn pool(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await
        .context("failed to connect to postgresql")
}

/// Applies the migrations in `migrations/` that are not applied yet.
pub async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("./migrations")
        .run(db)
        .await
        .context("failed to apply migrations")
}

/// Whether PostgreSQL answers on a pooled connection.
pub async fn ping(db: &PgPool) -> anyhow::Result<()> {
    let mut conn = db.acquire().await.context("no postgresql connection")?;
    conn.ping().await.context("postgresql did not answer")
}
