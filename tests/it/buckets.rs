//! Buckets of a hot promotion (issue 11, item 3): the stock split over
//! several hash tags, buyers routed by `bucket_of`, units moved to a dry
//! bucket by recorded transfers, and everything else (stats, result, orders,
//! cancel, expiry, recovery, reconcile) treating the promotion as one.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::{Method, StatusCode};
use seckill::app::Role;
use seckill::recovery;
use seckill::stock::buckets::bucket_of;
use seckill::stock::{Store, TransferOut};
use serde_json::{Value, json};

use crate::helpers::*;
use crate::procs::RedisProc;

/// `count` user ids, from `from` up, that hash to bucket `bucket` of `n`.
fn users_in(bucket: u32, n: u32, count: usize, from: i64) -> Vec<i64> {
    (from..)
        .filter(|u| bucket_of(*u, n) == bucket)
        .take(count)
        .collect()
}

fn bucketed_body(stock: i64, per_user_limit: i64, buckets: i64) -> Value {
    let mut body = active_body(stock, per_user_limit);
    body["buckets"] = json!(buckets);
    body
}

fn store(app: &TestApp) -> Store {
    Store::new(app.redis.clone(), app.keys.clone())
}

/// Units on sale in each bucket of promotion `id`.
async fn stocks(app: &TestApp, id: i64, n: u32) -> Vec<i64> {
    store(app).bucket_stocks(id, n).await.unwrap()
}

/// Reconciles promotion `id` and asserts zero drift; returns the row.
async fn assert_no_drift(app: &TestApp, id: i64) -> recovery::Reconciliation {
    let rows = recovery::reconcile(&app.db, &store(app), Some(id), true)
        .await
        .unwrap();
    assert_eq!(rows[0].drift, 0, "{}", recovery::table(&rows));
    rows[0].clone()
}

/// Sends every (user, purchase) at once; returns the order ids of the 200s
/// by user and the statuses counted.
async fn buy_concurrently(
    app: &TestApp,
    id: i64,
    users: &[i64],
    each: usize,
) -> (HashMap<i64, Vec<String>>, HashMap<StatusCode, usize>) {
    let mut calls = Vec::new();
    for _ in 0..each {
        for u in users {
            let u = *u;
            calls.push(async move { (u, app.purchase(id, u).await) });
        }
    }
    let answers = futures_util::future::join_all(calls).await;
    let mut bought: HashMap<i64, Vec<String>> = HashMap::new();
    let mut statuses: HashMap<StatusCode, usize> = HashMap::new();
    for (u, (status, body)) in answers {
        *statuses.entry(status).or_default() += 1;
        match status {
            StatusCode::OK => bought
                .entry(u)
                .or_default()
                .push(body["order_id"].as_str().unwrap().to_string()),
            StatusCode::GONE => assert_eq!(code(&body), "sold_out", "{body}"),
            StatusCode::CONFLICT => assert_eq!(code(&body), "already_purchased", "{body}"),
            other => panic!("unexpected {other}: {body}"),
        }
    }
    (bought, statuses)
}

/// Every order id of `bought` has its row in PostgreSQL.
async fn assert_all_persisted(app: &TestApp, id: i64, bought: &HashMap<i64, Vec<String>>) {
    let total = bought.values().map(Vec::len).sum::<usize>() as i64;
    let rows = app.wait_for_rows(id, total, Duration::from_secs(30)).await;
    assert_eq!(rows, total, "every 200 reaches PostgreSQL, nothing more");
    let stored: HashSet<String> = order_ids(&app.db, id).await.into_iter().collect();
    for ids in bought.values() {
        for o in ids {
            assert!(
                stored.contains(o),
                "order {o} answered 200 is in PostgreSQL"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_out_of_range_are_rejected_naming_the_field() {
    let mut app = spawn_app().await;
    for bad in [json!(0), json!(65), json!(-1)] {
        let (status, body) = app
            .admin(
                Method::POST,
                "/admin/promotions",
                Some({
                    let mut b = active_body(10, 1);
                    b["buckets"] = bad.clone();
                    b
                }),
            )
            .await;
        assert_error(
            status,
            &body,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("buckets {bad}"),
        );
        assert!(
            body.to_string().contains("buckets"),
            "the error names the field: {body}"
        );
    }
    assert!(app.admin_list().await.is_empty(), "nothing was created");

    // An edit before the start is held to the same rule.
    let mut upcoming = active_body(10, 1);
    let now = chrono::Utc::now();
    upcoming["starts_at"] = json!(rfc3339(now + chrono::Duration::hours(1)));
    upcoming["ends_at"] = json!(rfc3339(now + chrono::Duration::hours(2)));
    let id = app.create_promotion(upcoming).await["id"].as_i64().unwrap();
    let (status, body) = app
        .admin(
            Method::PUT,
            &format!("/admin/promotions/{id}"),
            Some(json!({"buckets": 65})),
        )
        .await;
    assert_error(
        status,
        &body,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "edit to 65",
    );
    assert!(body.to_string().contains("buckets"), "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bucket_keeps_the_keys_and_meta_of_an_unsplit_promotion() {
    let mut app = spawn_app().await;
    let plain = app.create_promotion(active_body(5, 1)).await;
    let one = app.create_promotion(bucketed_body(5, 1, 1)).await;
    assert_eq!(plain["buckets"], 1, "the default is one bucket: {plain}");
    assert_eq!(one["buckets"], 1, "{one}");
    let (a, b) = (plain["id"].as_i64().unwrap(), one["id"].as_i64().unwrap());
    app.buy(a, 7).await;
    app.buy(b, 7).await;
    app.wait_for_rows(b, 1, Duration::from_secs(20)).await;

    let keys = app.redis_keys().await;
    let of = |id: i64| -> Vec<String> {
        let tag = format!("{{{}:p:{id}}}", app.keys.prefix());
        let mut names: Vec<String> = keys
            .iter()
            .filter(|k| k.contains(&format!("{}:p:{id}", app.keys.prefix())))
            .map(|k| {
                assert!(k.starts_with(&tag), "{k} is under the promotion's one tag");
                k[tag.len()..].to_string()
            })
            .collect();
        names.sort();
        names
    };
    assert_eq!(of(a), of(b), "same key names");
    let conn = app.redis.clone();
    let fields = |id: i64| {
        let meta = app.keys.promotion(id).meta;
        let mut conn = conn.clone();
        async move {
            let mut f: Vec<String> = redis::cmd("HKEYS")
                .arg(meta)
                .query_async(&mut conn)
                .await
                .unwrap();
            f.sort();
            f
        }
    };
    let (fa, fb) = (fields(a).await, fields(b).await);
    assert_eq!(fa, fb, "same meta fields");
    assert!(!fb.iter().any(|f| f == "buckets" || f == "share"), "{fb:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buyers_who_all_hash_to_one_bucket_buy_exactly_the_stock_within_their_limit() {
    let mut app = spawn_app().await;
    let (stock, limit, n) = (40, 2, 4);
    let body = app.create_promotion(bucketed_body(stock, limit, n)).await;
    let id = body["id"].as_i64().unwrap();
    assert_eq!(body["buckets"], n, "{body}");
    assert_eq!(stocks(&app, id, n as u32).await, vec![10, 10, 10, 10]);

    // 60 buyers, every one in bucket 0, each trying 3 times at once: 180
    // concurrent purchases for 40 units, at most 2 per buyer.
    let users = users_in(0, n as u32, 60, 1_000);
    let (bought, statuses) = buy_concurrently(&app, id, &users, 3).await;
    let sold: usize = bought.values().map(Vec::len).sum();
    assert_eq!(
        sold, stock as usize,
        "exactly the stock is sold: {statuses:?}"
    );
    for (u, ids) in &bought {
        assert!(ids.len() <= limit as usize, "user {u} bought {}", ids.len());
    }
    assert_eq!(stocks(&app, id, n as u32).await, vec![0, 0, 0, 0]);

    // The other buckets' units came over by transfers, all finished.
    let row = assert_no_drift(&app, id).await;
    assert_eq!((row.sold, row.in_transit), (stock, 0));
    let mut conn = app.redis.clone();
    let moved_in: i64 = redis::cmd("HGET")
        .arg(app.keys.bucket(id, 0).meta)
        .arg("moved_in")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(moved_in, 30, "the three other buckets' 30 units moved in");
    let mut transfers = 0;
    for bucket in 1..n as u32 {
        let len: i64 = redis::cmd("HLEN")
            .arg(app.keys.bucket(id, bucket).transfers)
            .query_async(&mut conn)
            .await
            .unwrap();
        transfers += len;
    }
    println!("{transfers} transfers moved the 30 units into bucket 0");

    // Sold out for everyone now, in any bucket.
    for u in [users[0], users_in(3, n as u32, 1, 50_000)[0]] {
        let (status, body) = app.purchase(id, u).await;
        assert!(
            status == StatusCode::GONE || status == StatusCode::CONFLICT,
            "{status} {body}"
        );
    }
    assert_all_persisted(&app, id, &bought).await;
    assert_no_drift(&app, id).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_buyers_buy_exactly_the_stock_and_every_200_is_persisted() {
    let mut app = spawn_app().await;
    let (stock, n) = (30, 4);
    let id = app.create_promotion(bucketed_body(stock, 1, n)).await["id"]
        .as_i64()
        .unwrap();
    let users: Vec<i64> = (2_000..2_080).collect();
    let (bought, statuses) = buy_concurrently(&app, id, &users, 1).await;
    let sold: usize = bought.values().map(Vec::len).sum();
    assert_eq!(sold, stock as usize, "{statuses:?}");
    assert!(bought.values().all(|ids| ids.len() == 1));
    assert_eq!(stocks(&app, id, n as u32).await.iter().sum::<i64>(), 0);

    let stats = app.stats(id).await;
    assert_eq!(stats["sold"], stock, "stats count every bucket: {stats}");
    assert_eq!(stats["remaining"], 0, "{stats}");
    assert_all_persisted(&app, id, &bought).await;
    assert_no_drift(&app, id).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_orders_and_cancel_treat_a_bucketed_promotion_as_one() {
    let mut app = spawn_app().await;
    let n = 4u32;
    let id = app.create_promotion(bucketed_body(4, 1, 4)).await["id"]
        .as_i64()
        .unwrap();
    // Five buyers of bucket 2 for four units: the other buckets' units move
    // over, the fifth is refused.
    let users = users_in(2, n, 5, 3_000);
    let mut orders = Vec::new();
    for u in &users[..4] {
        orders.push(app.buy(id, *u).await);
    }
    let (status, body) = app.purchase(id, users[4]).await;
    assert_error(
        status,
        &body,
        StatusCode::GONE,
        "sold_out",
        "the fifth buyer",
    );

    let stats = app.stats(id).await;
    assert_eq!(
        (stats["sold"].as_i64(), stats["remaining"].as_i64()),
        (Some(4), Some(0)),
        "{stats}"
    );

    // /result looks in the buyer's bucket (2, not 0).
    let res = app
        .client
        .get(app.url(&format!("/api/promotions/{id}/result")))
        .bearer_auth(user_token(users[0]))
        .send()
        .await
        .unwrap();
    let (status, body) = read(res).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["order_id"], orders[0], "{body}");
    assert_ne!(body["status"], "none", "{body}");

    app.wait_for_rows(id, 4, Duration::from_secs(20)).await;
    let res = app
        .client
        .get(app.url("/api/orders"))
        .bearer_auth(user_token(users[1]))
        .send()
        .await
        .unwrap();
    let (status, body) = read(res).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.to_string().contains(&orders[1]), "my orders: {body}");

    // A cancel gives the unit back to the buyer's bucket, once.
    let (status, body) = app.order_action(&orders[0], "cancel", users[0]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = app.order_action(&orders[0], "cancel", users[0]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a second cancel is answered and returns nothing"
    );
    assert_eq!(
        stocks(&app, id, n).await,
        vec![0, 0, 1, 0],
        "back to bucket 2"
    );
    assert_no_drift(&app, id).await;

    // A buyer of another bucket gets it (by a transfer), exactly once.
    let other = users_in(1, n, 2, 9_000);
    let (status, body) = app
        .purchase_until_not_sold_out(id, other[0], Duration::from_secs(10))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.purchase(id, other[1]).await;
    assert_error(
        status,
        &body,
        StatusCode::GONE,
        "sold_out",
        "after the returned unit",
    );
    let stats = app.stats(id).await;
    assert_eq!(
        (stats["sold"].as_i64(), stats["remaining"].as_i64()),
        (Some(5), Some(0)),
        "{stats}"
    );
    app.wait_for_rows(id, 5, Duration::from_secs(20)).await;
    assert_no_drift(&app, id).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_order_returns_its_unit_to_its_bucket() {
    let mut app = spawn_app_with(Role::Serve, |s| {
        s.payment_timeout = Duration::from_secs(1);
        s.sweep_interval = Duration::from_millis(100);
    })
    .await;
    let n = 3u32;
    let id = app.create_promotion(bucketed_body(3, 1, 3)).await["id"]
        .as_i64()
        .unwrap();
    let buyer = users_in(1, n, 1, 4_000)[0];
    let order = app.buy(id, buyer).await;
    assert_eq!(stocks(&app, id, n).await, vec![1, 0, 1]);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while app.order_status(&order).await.as_deref() != Some("cancelled")
        || stocks(&app, id, n).await != vec![1, 1, 1]
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unpaid order expires and its unit returns to bucket 1: {:?}",
            stocks(&app, id, n).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_no_drift(&app, id).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_rebuilds_a_lost_bucket_and_the_sale_goes_on_exactly() {
    let mut app = spawn_app().await;
    let (stock, n) = (20, 4u32);
    let id = app.create_promotion(bucketed_body(stock, 1, 4)).await["id"]
        .as_i64()
        .unwrap();
    // Ten buyers of bucket 1 (which holds 5): units move in from others.
    let first = users_in(1, n, 10, 5_000);
    for u in &first {
        app.buy(id, *u).await;
    }
    app.wait_for_rows(id, 10, Duration::from_secs(20)).await;
    let before = stocks(&app, id, n).await;
    assert_eq!(before.iter().sum::<i64>(), 10);

    app.lose_bucket(id, 1).await;
    let done = recovery::recover(&app.db, &store(&app), Some(id))
        .await
        .unwrap();
    assert!(done[0].rebuilt, "{done:?}");
    assert_eq!(
        stocks(&app, id, n).await,
        before,
        "every bucket as before the loss"
    );
    assert_no_drift(&app, id).await;
    // A second run changes nothing.
    let again = recovery::recover(&app.db, &store(&app), Some(id))
        .await
        .unwrap();
    assert!(!again[0].rebuilt && !again[0].busy, "{again:?}");

    // The earlier buyers keep their limit; the rest of the stock sells
    // exactly, whatever the bucket.
    let (status, body) = app.purchase(id, first[0]).await;
    assert_error(
        status,
        &body,
        StatusCode::CONFLICT,
        "already_purchased",
        "limit kept",
    );
    let more: Vec<i64> = (6_000..6_040).collect();
    let (bought, _) = buy_concurrently(&app, id, &more, 1).await;
    assert_eq!(bought.values().map(Vec::len).sum::<usize>(), 10);
    app.wait_for_rows(id, stock, Duration::from_secs(30)).await;
    assert_eq!(app.order_rows(id).await, stock);
    assert_no_drift(&app, id).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_stopped_between_its_steps_is_finished_by_recovery_once() {
    let mut app = spawn_app_with(Role::Serve, |_| {}).await;
    let n = 2u32;
    let id = app.create_promotion(bucketed_body(8, 1, 2)).await["id"]
        .as_i64()
        .unwrap();
    let s = store(&app);
    assert_eq!(stocks(&app, id, n).await, vec![4, 4]);

    // Step 1 only (a gateway that died right after it): 3 units in transit.
    let taken = s.transfer_out(id, 1, 0, "t-1", 3).await.unwrap();
    assert_eq!(taken, TransferOut::Taken(3));
    // A replay of step 1 takes nothing more.
    assert_eq!(
        s.transfer_out(id, 1, 0, "t-1", 3).await.unwrap(),
        TransferOut::Taken(3)
    );
    assert_eq!(stocks(&app, id, n).await, vec![4, 1]);
    let row = assert_no_drift(&app, id).await;
    assert_eq!(
        row.in_transit, 3,
        "the invariant holds with the units in transit"
    );

    // Recovery finishes it: the units land once.
    recovery::recover(&app.db, &s, Some(id)).await.unwrap();
    assert_eq!(stocks(&app, id, n).await, vec![7, 1]);
    recovery::recover(&app.db, &s, Some(id)).await.unwrap();
    seckill::stock::buckets::finish(&s, id, 1, 0, "t-1", 3)
        .await
        .unwrap();
    assert_eq!(stocks(&app, id, n).await, vec![7, 1], "no unit doubled");
    assert_eq!(assert_no_drift(&app, id).await.in_transit, 0);

    // The destination lost between steps 1 and 2: rebuilt, then finished.
    assert_eq!(
        s.transfer_out(id, 0, 1, "t-2", 2).await.unwrap(),
        TransferOut::Taken(2)
    );
    app.lose_bucket(id, 1).await;
    recovery::recover(&app.db, &s, Some(id)).await.unwrap();
    assert_eq!(stocks(&app, id, n).await, vec![5, 3]);
    assert_eq!(assert_no_drift(&app, id).await.in_transit, 0);

    // The source lost after step 2, before step 3: its rebuild counts the
    // units the destination received from it, so none comes back twice.
    assert_eq!(
        s.transfer_out(id, 0, 1, "t-3", 4).await.unwrap(),
        TransferOut::Taken(4)
    );
    assert!(s.transfer_in(id, 0, 1, "t-3", 4).await.unwrap());
    app.lose_bucket(id, 0).await;
    recovery::recover(&app.db, &s, Some(id)).await.unwrap();
    assert_eq!(stocks(&app, id, n).await, vec![1, 7]);
    assert_no_drift(&app, id).await;

    // Both lost: the stock is whole again, spread over the two.
    app.lose_bucket(id, 0).await;
    app.lose_bucket(id, 1).await;
    recovery::recover(&app.db, &s, Some(id)).await.unwrap();
    assert_eq!(stocks(&app, id, n).await.iter().sum::<i64>(), 8);

    // The sale sells exactly the 8 units.
    let (bought, _) = buy_concurrently(&app, id, &(7_000..7_020).collect::<Vec<_>>(), 1).await;
    assert_eq!(bought.values().map(Vec::len).sum::<usize>(), 8);
    app.wait_for_rows(id, 8, Duration::from_secs(20)).await;
    assert_no_drift(&app, id).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_buyer_whose_bucket_is_dry_waits_for_units_in_transit_instead_of_being_told_sold_out() {
    // Another gateway's transfer empties bucket 2 into bucket 1 and is
    // between its steps when a buyer of bucket 0 finds every bucket dry.
    let mut app = spawn_app_with(Role::Serve, |_| {}).await;
    let n = 3u32;
    let id = app.create_promotion(bucketed_body(3, 1, 3)).await["id"]
        .as_i64()
        .unwrap();
    let s = store(&app);
    let in_0 = users_in(0, n, 2, 11_000);
    let in_1 = users_in(1, n, 1, 11_000);
    for u in [in_0[0], in_1[0]] {
        assert_eq!(app.purchase(id, u).await.0, StatusCode::OK);
    }
    assert_eq!(
        s.transfer_out(id, 2, 1, "t-other", 1).await.unwrap(),
        TransferOut::Taken(1)
    );
    assert_eq!(
        stocks(&app, id, n).await,
        vec![0, 0, 0],
        "one unit in transit"
    );

    // The buyer's refill sees no stock but the unit in transit: held there.
    let hold = seckill::checkpoint::arm(
        &app.settings.key_prefix,
        seckill::stock::buckets::REFILL_LOOKS_AGAIN,
    );
    let buying = {
        let (client, url) = (
            app.client.clone(),
            app.url(&format!("/api/promotions/{id}/purchase")),
        );
        let user = in_0[1];
        tokio::spawn(async move {
            read(
                client
                    .post(url)
                    .bearer_auth(user_token(user))
                    .json(&json!({}))
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        })
    };
    tokio::time::timeout(Duration::from_secs(10), hold.reached())
        .await
        .expect("the buyer's refill waits for the unit in transit");
    // The other transfer lands in bucket 1, then the buyer looks again.
    assert!(
        seckill::stock::buckets::finish(&s, id, 2, 1, "t-other", 1)
            .await
            .unwrap()
    );
    hold.release();
    let (status, body) = buying.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the last unit is sold, not left in bucket 1: {body}"
    );
    assert_eq!(stocks(&app, id, n).await, vec![0, 0, 0]);
    app.wait_for_rows(id, 3, Duration::from_secs(20)).await;
    assert_eq!(assert_no_drift(&app, id).await.in_transit, 0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_wait_a_transfer_reaches_its_destination_only_once_its_first_step_is_on_a_replica() {
    // A source whose first step a failover could undo must not have given
    // its units away: they would be on sale twice.
    let primary = RedisProc::start(false).await;
    let mut replica = RedisProc::start_replica_of(&primary).await;
    let mut settings = test_settings();
    settings.redis_url = primary.url();
    settings.redis_wait_replicas = 1;
    settings.redis_wait_timeout = Duration::from_millis(200);
    settings.recover_interval = Duration::from_millis(200);
    let mut app = spawn_with_settings(Role::Serve, settings).await;
    let n = 2u32;
    let id = app.create_promotion(bucketed_body(2, 1, 2)).await["id"]
        .as_i64()
        .unwrap();
    let in_0 = users_in(0, n, 2, 12_000);
    assert_eq!(app.purchase(id, in_0[0]).await.0, StatusCode::OK);

    // The replica is gone: bucket 0's next buyer needs bucket 1's unit.
    replica.kill9();
    let (status, body) = app.purchase(id, in_0[1]).await;
    assert_eq!(
        (status, code(&body)),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        "{body}"
    );
    let levels = [s_levels(&app, id, 0).await, s_levels(&app, id, 1).await];
    println!("replica down: bucket levels {levels:?}");
    assert_eq!(
        (levels[1].moved_out, levels[0].moved_in),
        (1, 0),
        "taken out of bucket 1, not added to bucket 0"
    );
    assert_eq!(
        stocks(&app, id, n).await,
        vec![0, 0],
        "the unit is in transit"
    );

    // The replica is back: the background finishes the transfer (its first
    // step now on the replica) and the unit is sold once.
    replica.restart().await;
    primary.wait_for_replicas(1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        // 503 or 410 while the unit is still in transit.
        let (status, body) = app.purchase(id, in_0[1]).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::GONE,
            "{status} {body}"
        );
        assert!(tokio::time::Instant::now() < deadline, "never sold: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stocks(&app, id, n).await, vec![0, 0]);
    app.wait_for_rows(id, 2, Duration::from_secs(20)).await;
    assert_eq!(assert_no_drift(&app, id).await.in_transit, 0);
    app.stop().await;
}

async fn s_levels(app: &TestApp, id: i64, bucket: u32) -> seckill::stock::Levels {
    store(app).bucket_levels(id, bucket).await.unwrap()
}

/// `POST path` as `user` with `body`.
async fn post_as(app: &TestApp, path: &str, user: i64, body: Value) -> (StatusCode, Value) {
    let res = app
        .client
        .post(app.url(path))
        .bearer_auth(user_token(user))
        .json(&body)
        .send()
        .await
        .unwrap();
    read(res).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_tokens_are_issued_while_any_bucket_has_stock() {
    let mut app = spawn_app().await;
    let n = 2u32;
    let mut body = bucketed_body(2, 1, 2);
    body["require_token"] = json!(true);
    let id = app.create_promotion(body).await["id"].as_i64().unwrap();
    let users = users_in(0, n, 2, 8_000);
    for u in &users {
        // Bucket 0 is dry for the second buyer; bucket 1 still has a unit.
        let (status, t) =
            post_as(&app, &format!("/api/promotions/{id}/token"), *u, json!({})).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "a token while the sale has stock: {t}"
        );
        let (status, b) = post_as(
            &app,
            &format!("/api/promotions/{id}/purchase"),
            *u,
            json!({"token": t["token"]}),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{b}");
    }
    assert_eq!(stocks(&app, id, n).await, vec![0, 0]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_moving_units_at_once_never_oversell() {
    // Two gateways on one deployment, each running transfers of its own
    // into the same dry buckets at the same time.
    let settings = test_settings();
    let mut a = spawn_with_settings(Role::Serve, settings.clone()).await;
    let mut b = spawn_with_settings(Role::GatewayOnly, settings).await;
    let (stock, n) = (24, 4u32);
    let id = a.create_promotion(bucketed_body(stock, 1, 4)).await["id"]
        .as_i64()
        .unwrap();
    // Buyers of buckets 0 and 1 only: buckets 2 and 3 give all their units.
    let mut users = users_in(0, n, 40, 10_000);
    users.extend(users_in(1, n, 40, 10_000));
    let answers = futures_util::future::join_all(users.iter().enumerate().map(|(i, u)| {
        let gw = if i % 2 == 0 { &a } else { &b };
        async move { (*u, gw.purchase(id, *u).await) }
    }))
    .await;
    let mut bought: HashMap<i64, Vec<String>> = HashMap::new();
    for (u, (status, body)) in answers {
        match status {
            StatusCode::OK => bought
                .entry(u)
                .or_default()
                .push(body["order_id"].as_str().unwrap().to_string()),
            StatusCode::GONE => {}
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(bought.values().map(Vec::len).sum::<usize>(), stock as usize);
    assert_eq!(stocks(&a, id, n).await, vec![0, 0, 0, 0]);
    assert_all_persisted(&a, id, &bought).await;
    assert_eq!(assert_no_drift(&a, id).await.in_transit, 0);
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_before_the_start_lays_the_stock_out_over_the_new_buckets() {
    let mut app = spawn_app().await;
    let mut body = bucketed_body(10, 1, 1);
    let now = chrono::Utc::now();
    body["starts_at"] = json!(rfc3339(now + chrono::Duration::hours(1)));
    body["ends_at"] = json!(rfc3339(now + chrono::Duration::hours(2)));
    let id = app.create_promotion(body).await["id"].as_i64().unwrap();
    assert_eq!(stocks(&app, id, 1).await, vec![10]);

    let path = format!("/admin/promotions/{id}");
    let edit = |buckets: i64| app.admin(Method::PUT, &path, Some(json!({ "buckets": buckets })));
    let (status, v) = edit(4).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["buckets"], 4, "{v}");
    assert_eq!(stocks(&app, id, 4).await, vec![3, 3, 2, 2]);

    let (status, v) = edit(2).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(stocks(&app, id, 2).await, vec![5, 5]);
    let left: Vec<String> = app
        .redis_keys()
        .await
        .into_iter()
        .filter(|k| k.contains(&format!(":p:{id}:b2}}")) || k.contains(&format!(":p:{id}:b3}}")))
        .collect();
    assert!(
        left.is_empty(),
        "the dropped buckets' keys are gone: {left:?}"
    );
    assert_eq!(app.stats(id).await["remaining"], 10);
    app.stop().await;
}
