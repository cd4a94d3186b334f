//! Fault tests: each owns the process it breaks (its own Redis, its own
//! PostgreSQL, or the real gateway binary) on a spare loopback port.
//! Every `200` a client received must reach PostgreSQL.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::future::join_all;
use reqwest::StatusCode;
use seckill::app::Role;

use crate::helpers::{code, order_ids, read, spawn_with_settings, test_settings, user_token};
use crate::procs::{GatewayProc, PgProc, RedisProc};

async fn stored_ids(db: &sqlx::PgPool, id: i64) -> HashSet<String> {
    order_ids(db, id).await.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_during_the_sale_loses_nothing_and_drains_after_restart() {
    let pg = PgProc::start().await;
    let mut settings = test_settings();
    settings.database_url = format!("{}/seckill_fault", pg.base_url());
    let mut app = spawn_with_settings(Role::Serve, settings).await;
    let id = app.active_promotion(200, 1).await;

    pg.down();
    let (status, ready) = read(app.client.get(app.url("/ready")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        (ready["postgres"].as_str(), ready["redis"].as_str()),
        (Some("down"), Some("ok"))
    );

    let answers = join_all((1..=200).map(|u| app.purchase(id, u))).await;
    let confirmed: HashSet<String> = answers
        .iter()
        .map(|(s, b)| {
            assert_eq!(*s, StatusCode::OK, "purchases need only Redis: {b}");
            b["order_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(confirmed.len(), 200);

    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.up().await;
    let restarted = Instant::now();
    let rows = app.wait_for_rows(id, 200, Duration::from_secs(60)).await;
    println!(
        "postgres outage: 200 confirmed during it, {rows} persisted {:.1} s after the restart, lost {}",
        restarted.elapsed().as_secs_f64(),
        200 - rows
    );
    assert_eq!(rows, 200);
    assert_eq!(stored_ids(&app.db, id).await, confirmed);
    let (status, _) = read(app.client.get(app.url("/ready")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_answers_503_with_retry_after_at_once_and_recovers_by_itself() {
    let mut redis = RedisProc::start(true).await;
    let mut settings = test_settings();
    settings.redis_url = redis.url();
    let mut app = spawn_with_settings(Role::Serve, settings).await;
    let id = app.active_promotion(10, 1).await;
    app.buy(id, 1).await;
    app.wait_for_rows(id, 1, Duration::from_secs(20)).await;

    redis.kill9();
    for user in 2..=4 {
        let started = Instant::now();
        let res = app
            .client
            .post(app.url(&format!("/api/promotions/{id}/purchase")))
            .bearer_auth(user_token(user))
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        let retry_after = res.headers().get("retry-after").cloned();
        let (status, body) = read(res).await;
        println!(
            "redis down: purchase answered {status} in {} ms",
            started.elapsed().as_millis()
        );
        assert_eq!(
            (status, code(&body)),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
        assert!(retry_after.is_some(), "503 carries Retry-After");
        // A hang detector, not a speed test: the answer must not wait for Redis.
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    let (status, ready) = read(app.client.get(app.url("/ready")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["redis"], "down");

    redis.restart().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = app.purchase(id, 2).await;
        if status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        status,
        StatusCode::OK,
        "the gateway reconnects by itself: {body}"
    );
    let (status, body) = app.purchase(id, 1).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::CONFLICT, "already_purchased"),
        "AOF kept the buyers"
    );
    assert_eq!(app.wait_for_rows(id, 2, Duration::from_secs(20)).await, 2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_with_aof_mid_sale_neither_oversells_nor_loses_orders() {
    const STOCK: i64 = 500;
    const BUYERS: i64 = 1500;
    let mut redis = RedisProc::start(true).await;
    let mut settings = test_settings();
    settings.redis_url = redis.url();
    settings.claim_idle = Duration::from_secs(1);
    let mut app = spawn_with_settings(Role::Serve, settings).await;
    let id = app.active_promotion(STOCK, 1).await;

    let app_ref = &app;
    let buyers = futures_util::stream::iter(1..=BUYERS)
        .map(|u| async move {
            tokio::time::sleep(Duration::from_millis((u as u64 % 300) * 5)).await;
            (u, app_ref.purchase(id, u).await)
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>();
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        redis.kill9();
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.restart().await;
    };
    let (answers, ()) = tokio::join!(buyers, chaos);

    let mut confirmed: HashSet<String> = HashSet::new();
    let mut unavailable = Vec::new();
    for (u, (status, body)) in &answers {
        match *status {
            StatusCode::OK => {
                confirmed.insert(body["order_id"].as_str().unwrap().to_string());
            }
            StatusCode::SERVICE_UNAVAILABLE => unavailable.push(*u),
            StatusCode::GONE | StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    // Buyers refused during the outage come back once Redis is up.
    for u in &unavailable {
        let (status, body) = app.purchase(id, *u).await;
        if status == StatusCode::OK {
            confirmed.insert(body["order_id"].as_str().unwrap().to_string());
        }
    }
    let stats = app.stats(id).await;
    let sold = stats["sold"].as_i64().unwrap();
    let rows = app.wait_for_rows(id, sold, Duration::from_secs(60)).await;
    let stored = stored_ids(&app.db, id).await;
    let lost = confirmed.difference(&stored).count();
    println!(
        "redis kill -9 + AOF restart: {} confirmed, {} refused 503 during the outage, sold {sold}, persisted {rows}, lost {lost}",
        confirmed.len(),
        unavailable.len()
    );
    assert!(sold <= STOCK, "no oversell");
    assert!(confirmed.len() as i64 <= STOCK);
    assert_eq!(lost, 0, "every 200 reached PostgreSQL");
    assert_eq!(rows, sold);
    let (rc, out) = app.reconcile(id).await;
    assert_eq!(rc, 0, "{out}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_killed_mid_sale_then_restarted_loses_no_confirmed_order() {
    const STOCK: i64 = 3000;
    const BUYERS: i64 = 6000;
    let settings = test_settings();
    let extra = [
        ("SECKILL_CLAIM_IDLE_MS", "1000"),
        ("SECKILL_WORKER_BLOCK_MS", "200"),
    ];
    let mut gateway = GatewayProc::start(&settings, &extra).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let id = gateway.active_promotion(STOCK, 1).await;

    let buy = |addr: String, user: i64| {
        let client = client.clone();
        async move {
            let res = client
                .post(format!("http://{addr}/api/promotions/{id}/purchase"))
                .bearer_auth(user_token(user))
                .json(&serde_json::json!({}))
                .send()
                .await;
            match res {
                Ok(r) => Some(read(r).await),
                Err(_) => None,
            }
        }
    };

    // First half of the crowd; the gateway dies while it is being served.
    let addr = gateway.addr.clone();
    let first = futures_util::stream::iter(1..=BUYERS / 2)
        .map(|u| {
            let b = buy(addr.clone(), u);
            async move { (u, b.await) }
        })
        .buffer_unordered(100)
        .collect::<Vec<_>>();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        gateway.kill9().await;
    };
    let (first, ()) = tokio::join!(first, killer);

    let mut confirmed: HashSet<String> = HashSet::new();
    let mut retry = Vec::new();
    for (u, answer) in first {
        match answer {
            Some((StatusCode::OK, body)) => {
                confirmed.insert(body["order_id"].as_str().unwrap().to_string());
            }
            _ => retry.push(u),
        }
    }
    let before_kill = confirmed.len();

    // A new gateway takes over; the rest of the crowd and the cut-off buyers buy.
    let gateway = GatewayProc::start(&settings, &extra).await;
    let addr = gateway.addr.clone();
    let second: Vec<i64> = retry.into_iter().chain(BUYERS / 2 + 1..=BUYERS).collect();
    let answers = futures_util::stream::iter(second)
        .map(|u| buy(addr.clone(), u))
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await;
    for answer in answers {
        let (status, body) = answer.expect("the new gateway answers");
        match status {
            StatusCode::OK => {
                confirmed.insert(body["order_id"].as_str().unwrap().to_string());
            }
            StatusCode::GONE | StatusCode::CONFLICT => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }

    let db = sqlx::PgPool::connect(&settings.database_url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut stored = stored_ids(&db, id).await;
    while (stored.len() as i64) < STOCK && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stored = stored_ids(&db, id).await;
    }
    let lost = confirmed.difference(&stored).count();
    println!(
        "gateway kill -9: {before_kill} confirmed before the kill, {} confirmed in all, {} persisted, lost {lost}",
        confirmed.len(),
        stored.len()
    );
    assert_eq!(lost, 0, "every 200 reached PostgreSQL");
    assert!(stored.len() as i64 <= STOCK, "no oversell");
    assert_eq!(
        stored.len() as i64,
        STOCK,
        "6000 buyers for 3000 units sell them all"
    );
    let (rc, out) =
        crate::helpers::run_cli(&settings, &["reconcile", "--promotion", &id.to_string()]).await;
    assert_eq!(rc, 0, "{out}");
    drop(gateway);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_stopped_during_a_postgres_outage_leaves_its_batch_pending_for_another() {
    let pg = PgProc::start().await;
    let mut settings = test_settings();
    settings.database_url = format!("{}/seckill_fault", pg.base_url());
    settings.claim_idle = Duration::from_millis(500);
    let mut first = spawn_with_settings(Role::Serve, settings.clone()).await;
    let id = first.active_promotion(50, 1).await;

    pg.down();
    let confirmed: HashSet<String> = join_all((1..=50).map(|u| first.buy(id, u)))
        .await
        .into_iter()
        .collect();
    // Wait until the workers hold the batch (read, not written).
    let deadline = Instant::now() + Duration::from_secs(10);
    while first.pending_count(id).await < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        first.pending_count(id).await,
        50,
        "the workers read the batch"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    first.stop().await;
    println!(
        "workers stopped with an unwritable batch in {:?}",
        started.elapsed()
    );
    assert_eq!(
        first.pending_count(id).await,
        50,
        "the batch in hand stays pending, unacknowledged"
    );

    pg.up().await;
    let mut second = spawn_with_settings(Role::Serve, settings).await;
    assert_eq!(
        second.wait_for_rows(id, 50, Duration::from_secs(30)).await,
        50
    );
    assert_eq!(stored_ids(&second.db, id).await, confirmed);
    second.stop().await;
}
