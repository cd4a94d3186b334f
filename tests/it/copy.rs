//! The workers' binary `COPY`: what PostgreSQL stores is, field for field,
//! what the purchase script put in the stream.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;
use seckill::orders::{Worker, WorkerConfig};
use seckill::stock::WorkerPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::spawn_app_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_batch_stores_every_field_of_every_stream_message_exactly() {
    let mut app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let mut body = crate::helpers::active_body(40, 2);
    body["price_cents"] = serde_json::json!(98_765_432_109i64);
    let id = app.create_promotion(body).await["id"].as_i64().unwrap();
    // Buyers with large ids and a second unit each, so seq 2 and ids beyond
    // 32 bits are in the batch.
    let buyers: Vec<i64> = (0..20).map(|i| 5_000_000_000 + i * 7).collect();
    for _ in 0..2 {
        for (status, b) in join_all(buyers.iter().map(|&u| app.purchase(id, u))).await {
            assert_eq!(status, StatusCode::OK, "{b}");
        }
    }
    let never = CancellationToken::new();
    let config = WorkerConfig {
        batch: 100,
        block: Duration::from_millis(100),
        claim_idle: Duration::from_secs(60),
        claim_every: Duration::from_secs(60),
        refresh_every: Duration::from_secs(60),
        drain: Duration::from_secs(5),
    };
    let mut w = Worker::connect(
        WorkerPool::new(&app.settings.redis_url, 1, config.block).unwrap(),
        app.db.clone(),
        app.keys.clone(),
        "copy".into(),
        config,
    )
    .await
    .unwrap();
    w.refresh_streams().await.unwrap();
    let entries = w.read_new().await.unwrap();
    assert_eq!(entries.len(), 40);
    let inserted = w.persist(&entries, &never).await.unwrap();
    assert_eq!(inserted.rows, 40);
    assert!(inserted.refused.is_empty());

    type Row = (String, i64, i64, i64, i64, DateTime<Utc>, String);
    let mut stored: Vec<Row> = sqlx::query_as(
        "SELECT order_id, promotion_id, user_id, seq, price_cents, created_at, status \
         FROM orders WHERE promotion_id = $1",
    )
    .bind(id)
    .fetch_all(&app.db)
    .await
    .unwrap();
    stored.sort();
    let mut sent: Vec<Row> = entries
        .iter()
        .map(|e| {
            let m = e.message.as_ref().unwrap();
            (
                m.order_id.clone(),
                m.promotion_id,
                m.user_id,
                m.seq,
                m.price_cents,
                m.created_at,
                "pending".to_string(),
            )
        })
        .collect();
    sent.sort();
    assert_eq!(stored, sent);
    assert!(
        sent.iter().any(|r| r.3 == 2),
        "second units are in the batch"
    );
    app.stop().await;
}
