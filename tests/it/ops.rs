//! Operations: metrics, the Lua scripts ops can tune, the CLI's script listing.

use std::time::Duration;

use reqwest::StatusCode;

use crate::helpers::{
    StoreOwner, listening_addr, run_cli, seckill_command, spawn_app, test_settings,
};
use crate::procs::GatewayProc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_requests_purchases_scripts_and_cache_in_prometheus_text() {
    let mut app = spawn_app().await;
    let id = app.active_promotion(1, 1).await;
    app.buy(id, 1).await;
    app.purchase(id, 2).await;
    app.purchase(id, 3).await;
    app.wait_for_rows(id, 1, Duration::from_secs(20)).await;
    let res = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "prometheus text exposition"
    );
    let text = res.text().await.unwrap();
    for needle in [
        "seckill_http_requests_total{",
        "seckill_purchases_total{outcome=\"bought\"}",
        "seckill_purchases_total{outcome=\"sold_out\"}",
        "seckill_lua_seconds_bucket{",
        "seckill_cache_requests_total{",
        "seckill_orders_persisted_total",
        "seckill_worker_batch_size_bucket",
        "seckill_db_write_seconds_bucket",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripts_command_prints_each_script_with_its_sha_and_contract() {
    let settings = test_settings();
    let (rc, out) = run_cli(&settings, &["scripts"]).await;
    assert_eq!(rc, 0, "{out}");
    for name in [
        "purchase.lua",
        "preheat.lua",
        "restock.lua",
        "recover.lua",
        "issue_token.lua",
    ] {
        assert!(
            out.contains(&format!("== {name}  sha1 ")),
            "{name} missing:\n{out}"
        );
    }
    assert!(out.contains("KEYS[1]") && out.contains("ARGV[1]"));
}

fn copy_lua_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("seckill-lua-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/lua")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_from_seckill_lua_dir_is_used_and_a_broken_one_stops_start_up() {
    let settings = test_settings();
    // Held to the end: the broken start-up below may create the database again.
    let _stores = StoreOwner::claim(&settings);
    // A changed (but valid) purchase script: a different SHA, same contract.
    let dir = copy_lua_dir();
    let path = dir.join("purchase.lua");
    let changed = format!(
        "-- tuned by ops\n{}",
        std::fs::read_to_string(&path).unwrap()
    );
    std::fs::write(&path, changed).unwrap();
    let dir_str = dir.display().to_string();
    let gateway = GatewayProc::start(&settings, &[("SECKILL_LUA_DIR", dir_str.as_str())]).await;
    let client = reqwest::Client::new();
    let id = gateway.active_promotion(3, 1).await;
    let bought = client
        .post(format!(
            "http://{}/api/promotions/{id}/purchase",
            gateway.addr
        ))
        .bearer_auth(crate::helpers::user_token(1))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(bought.status(), StatusCode::OK);
    drop(gateway);
    let listed = tokio::process::Command::new(env!("CARGO_BIN_EXE_seckill"))
        .arg("scripts")
        .env("SECKILL_LUA_DIR", &dir)
        .output()
        .await
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(
        listed.contains(&dir_str),
        "the listing names where each script came from"
    );

    // A script with a syntax error: start-up stops with Redis's error.
    std::fs::write(dir.join("restock.lua"), "this is not lua (").unwrap();
    let out = seckill_command(&settings)
        .arg("serve")
        .env("SECKILL_LISTEN", "127.0.0.1:0")
        .env("SECKILL_LUA_DIR", &dir)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("start-up stops instead of hanging")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("restock.lua"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_health_ready_and_metrics_but_no_api() {
    let settings = test_settings();
    let _stores = StoreOwner::claim(&settings);
    let mut child = seckill_command(&settings)
        .arg("worker")
        .env("SECKILL_WORKER_LISTEN", "127.0.0.1:0")
        .env("SECKILL_LOG_FORMAT", "json")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let addr = listening_addr(&mut child, "worker ops endpoint listening").await;
    let get = |path: &str| reqwest::get(format!("http://{addr}{path}"));
    assert_eq!(get("/health").await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/ready").await.unwrap().status(), StatusCode::OK);
    assert_eq!(get("/metrics").await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        get("/api/promotions").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // Gone before its stores are.
    child.kill().await.unwrap();
}
