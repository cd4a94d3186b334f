//! The sale page and the operator console in a real browser: headless
//! Chromium (Debian packages `chromium` and `chromium-driver`, installed by
//! `scripts/ensure-test-packages.sh`) driven over WebDriver with
//! `fantoccini`. Each test starts its own `chromedriver` on a spare port and
//! its own gateway (`spawn_app`), which serves the pages at `/` and
//! `/console/`.
//!
//! Every wait polls the DOM (or the stores) until a condition holds or a
//! deadline passes; nothing sleeps for a fixed time. Each step writes a
//! screenshot to `target/browser-screenshots/` and prints its timing.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, KeyAction, KeyActions};
use fantoccini::key::Key;
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestApp, rfc3339, spawn_app};
use crate::procs::spare_port;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// How long a condition may take to hold in the page.
const WAIT: Duration = Duration::from_secs(20);

/// A private chromedriver (and the browser it starts), stopped on drop.
struct Driver {
    child: Child,
    profile: PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A test that panicked never closed its session: chromedriver is
        // gone but its browser lives on. Stop that browser, found by the
        // profile directory only this test used.
        let flag = format!("--user-data-dir={}", self.profile.display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            if args.contains(&flag.as_bytes()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Starts chromedriver on a spare port and opens a headless Chromium session.
async fn browser() -> (Driver, Client) {
    for bin in [CHROMEDRIVER, CHROMIUM] {
        assert!(
            std::path::Path::new(bin).exists(),
            "{bin} is missing: run scripts/ensure-test-packages.sh (installs chromium and chromium-driver)"
        );
    }
    let port = spare_port();
    let profile = std::env::temp_dir().join(format!(
        "seckill-it-chromium-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&profile).unwrap();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let driver = Driver { child, profile };
    // Ready when /status says so.
    let status_url = format!("http://127.0.0.1:{port}/status");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(res) = http.get(&status_url).send().await
            && let Ok(v) = res.json::<Value>().await
            && v["value"]["ready"] == true
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new",
                // As root (CI containers) Chromium refuses to start sandboxed.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--window-size=1280,1000",
                format!("--user-data-dir={}", driver.profile.display()),
            ],
        }),
    );
    // chromedriver listens on loopback over plain HTTP: no TLS stack needed.
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let client = ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("a Chromium session opens");
    (driver, client)
}

/// The steps of one test: a screenshot and a timing line per step.
struct Steps {
    test: &'static str,
    started: Instant,
    last: Instant,
    n: u32,
    dir: PathBuf,
}

impl Steps {
    fn new(test: &'static str) -> Steps {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let now = Instant::now();
        Steps {
            test,
            started: now,
            last: now,
            n: 0,
            dir,
        }
    }

    /// Ends a step: prints its time and writes a screenshot.
    async fn done(&mut self, client: &Client, what: &str) {
        self.n += 1;
        let now = Instant::now();
        let file = self.dir.join(format!(
            "{}-{:02}-{}.png",
            self.test,
            self.n,
            what.replace(' ', "-")
        ));
        if let Ok(png) = client.screenshot().await {
            std::fs::write(&file, png).unwrap();
        }
        println!(
            "browser {} step {:02} {what}: {} ms (total {} ms), screenshot {}",
            self.test,
            self.n,
            (now - self.last).as_millis(),
            (now - self.started).as_millis(),
            file.display()
        );
        self.last = Instant::now();
    }
}

/// Polls `expr` (a JavaScript expression) in the page until it is truthy;
/// returns its value. Panics with a screenshot after [`WAIT`].
async fn wait_for(client: &Client, expr: &str, what: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    let script = format!("try {{ return ({expr}); }} catch (e) {{ return null; }}");
    loop {
        let v = client.execute(&script, vec![]).await.expect("script runs");
        let truthy = match &v {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return v;
        }
        if Instant::now() >= deadline {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
            let _ = std::fs::create_dir_all(&dir);
            if let Ok(png) = client.screenshot().await {
                let _ = std::fs::write(dir.join("timeout.png"), png);
            }
            let text = client
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!("timed out waiting for {what} ({expr}); the page shows:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn text_of(id: &str) -> String {
    format!("((document.getElementById({id:?}) || {{}}).textContent || '')")
}

async fn type_into(client: &Client, id: &str, text: &str) {
    let field = client.find(Locator::Id(id)).await.expect(id);
    field.clear().await.expect("clear");
    field.send_keys(text).await.expect("type");
}

async fn click(client: &Client, id: &str) {
    client
        .find(Locator::Id(id))
        .await
        .expect(id)
        .click()
        .await
        .expect("click");
}

/// Redis's clock (the one that opens a sale), in Unix milliseconds.
async fn redis_ms(app: &TestApp) -> i64 {
    let (secs, micros): (i64, i64) = redis::cmd("TIME")
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    secs * 1000 + micros / 1000
}

fn at_ms(ms: i64) -> String {
    rfc3339(chrono::DateTime::from_timestamp_millis(ms).unwrap())
}

/// Registers `username` through the page and waits until it is logged in.
async fn register_in_page(client: &Client, username: &str) {
    type_into(client, "username", username).await;
    type_into(client, "password", "correct horse battery").await;
    click(client, "register").await;
    wait_for(
        client,
        &format!("{}.includes('Logged in as {username}')", text_of("who")),
        "the page to log in",
    )
    .await;
}

#[tokio::test]
async fn a_buyer_logs_in_waits_for_the_countdown_buys_sees_the_order_confirmed_and_pays() {
    let app = spawn_app().await;
    let mut steps = Steps::new("buyer");
    let (_driver, client) = browser().await;
    client.goto(&app.url("/")).await.unwrap();
    wait_for(&client, "document.getElementById('login-form')", "the page").await;
    steps.done(&client, "page loaded").await;

    register_in_page(&client, "alice").await;
    steps.done(&client, "registered and logged in").await;

    // A sale opening 12 s from now on Redis's clock, created once the page
    // is up (however long the browser took to start): the page lists it at
    // its next refresh (every 5 s) and counts down the rest.
    let starts_ms = redis_ms(&app).await + 12_000;
    let promotion = app
        .create_promotion(json!({
            "name": "Browser phone",
            "stock": 5,
            "per_user_limit": 1,
            "price_cents": 19900,
            "starts_at": at_ms(starts_ms),
            "ends_at": at_ms(starts_ms + 3_600_000),
        }))
        .await["id"]
        .as_i64()
        .unwrap();

    let countdown = format!("countdown-{promotion}");
    wait_for(
        &client,
        &format!("{}.startsWith('Starts in')", text_of(&countdown)),
        "the countdown",
    )
    .await;
    let buy = format!("buy-{promotion}");
    let disabled: Value = client
        .execute(
            &format!("return document.getElementById('{buy}').disabled"),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(disabled, true, "Buy is disabled before the sale opens");
    steps.done(&client, "countdown running").await;

    wait_for(
        &client,
        &format!("!document.getElementById('{buy}').disabled"),
        "Buy to be enabled when the countdown reaches zero",
    )
    .await;
    let seen_ms = redis_ms(&app).await;
    // The page opened the sale on the server's clock: not before the start
    // (give or take the clock sync, a few ms on loopback, and the poll).
    assert!(
        seen_ms >= starts_ms - 300,
        "Buy enabled {} ms before the sale opened on the server's clock",
        starts_ms - seen_ms
    );
    let shown = wait_for(&client, &text_of(&countdown), "the countdown text").await;
    assert!(
        shown.as_str().unwrap().starts_with("On sale now"),
        "{shown}"
    );
    steps.done(&client, "countdown reached zero").await;

    click(&client, &buy).await;
    let result = format!("result-{promotion}");
    wait_for(
        &client,
        &format!("{}.includes('is confirmed')", text_of(&result)),
        "the order to be confirmed",
    )
    .await;
    steps.done(&client, "bought and confirmed").await;
    // Confirmed means persisted by the worker.
    let order_id: String =
        sqlx::query_scalar("SELECT order_id FROM orders WHERE promotion_id = $1")
            .bind(promotion)
            .fetch_one(&app.db)
            .await
            .unwrap();
    assert_eq!(
        app.order_status(&order_id).await.as_deref(),
        Some("pending")
    );

    let pay = format!("pay-{order_id}");
    wait_for(
        &client,
        &format!("document.getElementById('{pay}')"),
        "the order with its Pay button under My orders",
    )
    .await;
    click(&client, &pay).await;
    wait_for(
        &client,
        &format!(
            "document.getElementById('order-{order_id}').dataset.status === 'paid' && {}.includes('Paid')",
            text_of(&format!("order-{order_id}"))
        ),
        "the order shown paid",
    )
    .await;
    assert_eq!(app.order_status(&order_id).await.as_deref(), Some("paid"));
    steps.done(&client, "paid").await;
    std::fs::copy(
        steps.dir.join("buyer-06-paid.png"),
        steps.dir.join("sale.png"),
    )
    .ok();
    client.close().await.unwrap();
}

#[tokio::test]
async fn error_codes_are_shown_as_sentences_a_buyer_understands() {
    let app = spawn_app().await;
    let promotion = app.active_promotion(10, 1).await;
    let mut steps = Steps::new("errors");
    let (_driver, client) = browser().await;
    client.goto(&app.url("/")).await.unwrap();
    wait_for(&client, "document.getElementById('login-form')", "the page").await;

    // A wrong password: invalid_credentials, as a sentence.
    type_into(&client, "username", "nobody").await;
    type_into(&client, "password", "wrong password").await;
    click(&client, "login").await;
    wait_for(
        &client,
        &format!(
            "{}.includes('The username or password is wrong.')",
            text_of("message")
        ),
        "the invalid_credentials sentence",
    )
    .await;
    steps.done(&client, "wrong password").await;

    // Buying twice on a limit of one: already_purchased, as a sentence.
    register_in_page(&client, "bob").await;
    let buy = format!("buy-{promotion}");
    let result = format!("result-{promotion}");
    wait_for(
        &client,
        &format!("!document.getElementById('{buy}').disabled"),
        "Buy",
    )
    .await;
    click(&client, &buy).await;
    wait_for(
        &client,
        &format!("{}.includes('is confirmed')", text_of(&result)),
        "the order",
    )
    .await;
    wait_for(
        &client,
        &format!("!document.getElementById('{buy}').disabled"),
        "Buy again",
    )
    .await;
    click(&client, &buy).await;
    wait_for(
        &client,
        &format!(
            "{}.includes('You have already bought as many of these as one buyer may.')",
            text_of(&result)
        ),
        "the already_purchased sentence",
    )
    .await;
    steps.done(&client, "bought twice").await;
    client.close().await.unwrap();
}

/// The answer of the captcha the page shows for `promotion`, read from
/// Redis (where the gateway keeps it as `user:answer`).
async fn captcha_answer(app: &TestApp, client: &Client, promotion: i64) -> String {
    let img = format!("captcha-img-{promotion}");
    let captcha_id = wait_for(
        client,
        &format!("document.getElementById('{img}').dataset.captchaId"),
        "the captcha picture",
    )
    .await;
    let key = app.keys.captcha(promotion, captcha_id.as_str().unwrap());
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut app.redis.clone())
        .await
        .unwrap();
    value.split_once(':').unwrap().1.to_string()
}

#[tokio::test]
async fn a_buyer_passes_the_captcha_and_token_step_and_a_wrong_answer_gets_a_new_picture() {
    let app = spawn_app().await;
    let mut body = crate::helpers::active_body(5, 1);
    body["require_captcha"] = json!(true);
    let promotion = app.create_promotion(body).await["id"].as_i64().unwrap();
    let mut steps = Steps::new("captcha");
    let (_driver, client) = browser().await;
    client.goto(&app.url("/")).await.unwrap();
    wait_for(&client, "document.getElementById('login-form')", "the page").await;
    register_in_page(&client, "dave").await;
    let first = captcha_answer(&app, &client, promotion).await;
    steps.done(&client, "captcha shown").await;

    // A wrong answer: the invalid_captcha sentence, and a new picture.
    let input = format!("captcha-answer-{promotion}");
    let img = format!("captcha-img-{promotion}");
    let shown_id = wait_for(
        &client,
        &format!("document.getElementById('{img}').dataset.captchaId"),
        "id",
    )
    .await;
    type_into(&client, &input, &format!("{first}x")).await;
    click(&client, &format!("buy-{promotion}")).await;
    let result = format!("result-{promotion}");
    wait_for(
        &client,
        &format!("{}.includes('do not match the picture')", text_of(&result)),
        "the invalid_captcha sentence",
    )
    .await;
    wait_for(
        &client,
        &format!(
            "document.getElementById('{img}').dataset.captchaId !== {}",
            shown_id
        ),
        "a new picture",
    )
    .await;
    steps.done(&client, "wrong answer").await;

    // The right answer: token, purchase, confirmed.
    let answer = captcha_answer(&app, &client, promotion).await;
    type_into(&client, &input, &answer).await;
    click(&client, &format!("buy-{promotion}")).await;
    wait_for(
        &client,
        &format!("{}.includes('is confirmed')", text_of(&result)),
        "the order to be confirmed",
    )
    .await;
    assert_eq!(app.order_rows(promotion).await, 1);
    steps.done(&client, "bought with the captcha").await;
    client.close().await.unwrap();
}

#[tokio::test]
async fn the_console_creates_a_promotion_and_its_stats_move_while_a_sale_runs() {
    let app = spawn_app().await;
    let mut steps = Steps::new("console");
    let (_driver, client) = browser().await;
    client.goto(&app.url("/console/")).await.unwrap();
    wait_for(
        &client,
        "document.getElementById('token-form')",
        "the console",
    )
    .await;
    steps.done(&client, "console loaded").await;

    type_into(&client, "admin-token", ADMIN_TOKEN).await;
    click(&client, "use-token").await;
    wait_for(
        &client,
        "!document.getElementById('form-section').hidden",
        "the console to accept the token",
    )
    .await;
    // The token lives in the page's memory only.
    let stored = client
        .execute(
            "return [localStorage.length, sessionStorage.length, document.cookie]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        stored,
        json!([0, 0, ""]),
        "the admin token is stored nowhere"
    );
    steps.done(&client, "token accepted").await;

    let now = redis_ms(&app).await;
    type_into(&client, "p-name", "Console sale").await;
    type_into(&client, "p-stock", "50").await;
    type_into(&client, "p-limit", "1").await;
    type_into(&client, "p-price", "4900").await;
    type_into(&client, "p-starts", &at_ms(now - 1_000)).await;
    type_into(&client, "p-ends", &at_ms(now + 3_600_000)).await;
    click(&client, "save").await;
    wait_for(
        &client,
        &format!("{}.includes('Created sale')", text_of("message")),
        "the sale to be created",
    )
    .await;
    let list = app.admin_list().await;
    let created = list
        .iter()
        .find(|p| p["name"] == "Console sale")
        .expect("the console created the promotion");
    assert_eq!(created["stock"], 50);
    assert_eq!(created["price_cents"], 4900);
    let id = created["id"].as_i64().unwrap();
    let row = format!("stats-{id}");
    let cell = |c: &str| format!("(document.querySelector('#{row} .{c}') || {{}}).textContent");
    wait_for(
        &client,
        &format!("{} === '0'", cell("sold")),
        "the new sale's stats",
    )
    .await;
    steps.done(&client, "sale created").await;

    // A small sale from the test, over HTTP, while the page watches.
    let buyers = 12;
    let sales: Vec<_> = (1..=buyers).map(|u| app.purchase(id, u)).collect();
    for (status, body) in futures_util::future::join_all(sales).await {
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    client
        .execute(
            "document.getElementById('stats-section').scrollIntoView(); return null",
            vec![],
        )
        .await
        .unwrap();
    wait_for(
        &client,
        &format!(
            "{} === '{buyers}' && {} === '{}' && {} === '{buyers}'",
            cell("sold"),
            cell("remaining"),
            50 - buyers,
            cell("persisted")
        ),
        "the stats to show the sale",
    )
    .await;
    steps.done(&client, "stats moved").await;
    std::fs::copy(
        steps.dir.join("console-04-stats-moved.png"),
        steps.dir.join("console.png"),
    )
    .ok();

    click(&client, "reconcile-now").await;
    wait_for(
        &client,
        &format!("{}.startsWith('No drift')", text_of("reconcile-status")),
        "the reconcile status",
    )
    .await;
    steps.done(&client, "reconciled").await;
    client.close().await.unwrap();
}

/// The accessible name of the focused element, and a key naming it.
const FOCUSED: &str = r#"
const e = document.activeElement;
if (!e || e === document.body) return null;
const byIds = (ids) => ids.split(/\s+/).map((i) => (document.getElementById(i) || {}).textContent || '').join(' ');
const name = (e.getAttribute('aria-label') || '').trim()
  || (e.getAttribute('aria-labelledby') ? byIds(e.getAttribute('aria-labelledby')).trim() : '')
  || (e.labels && e.labels.length ? [...e.labels].map((l) => l.textContent).join(' ').trim() : '')
  || (['BUTTON', 'A'].includes(e.tagName) ? e.textContent.trim() : '')
  || (e.getAttribute('alt') || '').trim()
  || (e.getAttribute('title') || '').trim();
return { key: e.tagName + '#' + (e.id || e.textContent.trim()), name };
"#;

/// Every visible, enabled control a keyboard user should reach.
const FOCUSABLE: &str = r#"
return [...document.querySelectorAll('a[href], button, input:not([type=hidden]), select, textarea, [tabindex]')]
  .filter((e) => !e.disabled && e.getAttribute('tabindex') !== '-1' && e.getClientRects().length > 0)
  .map((e) => e.tagName + '#' + (e.id || e.textContent.trim()));
"#;

async fn press_tab(client: &Client) {
    let tab = KeyActions::new("keyboard".into())
        .then(KeyAction::Down {
            value: Key::Tab.into(),
        })
        .then(KeyAction::Up {
            value: Key::Tab.into(),
        });
    client.perform_actions(tab).await.expect("Tab is pressed");
}

/// Tabs through the page from the top; returns each control reached, with
/// its accessible name, until the focus comes back around.
async fn tab_through(client: &Client) -> Vec<(String, String)> {
    // Focus starts at the top of the page: a mark first in the body, out of
    // the tab order, focused by script (the only step not by keyboard).
    client
        .execute(
            "let m = document.getElementById('tab-start'); \
             if (!m) { m = document.createElement('span'); m.id = 'tab-start'; \
             m.tabIndex = -1; document.body.prepend(m); } m.focus(); return null",
            vec![],
        )
        .await
        .unwrap();
    let mut seen: Vec<(String, String)> = Vec::new();
    for _ in 0..200 {
        press_tab(client).await;
        let v = client.execute(FOCUSED, vec![]).await.unwrap();
        if v.is_null() {
            continue;
        }
        let key = v["key"].as_str().unwrap().to_string();
        if seen.iter().any(|(k, _)| *k == key) {
            break;
        }
        seen.push((key, v["name"].as_str().unwrap().to_string()));
    }
    seen
}

#[tokio::test]
async fn every_control_of_the_pages_is_reachable_by_keyboard_and_named() {
    let app = spawn_app().await;
    let promotion = app.active_promotion(10, 1).await;
    let mut steps = Steps::new("keyboard");
    let (_driver, client) = browser().await;
    client.goto(&app.url("/")).await.unwrap();
    wait_for(
        &client,
        &format!("document.getElementById('buy-{promotion}')"),
        "the sale",
    )
    .await;

    // Log in with the keyboard alone: Tab to the fields, type, Enter.
    let (status, _) = crate::helpers::read(
        app.client
            .post(app.url("/api/register"))
            .json(&json!({"username": "carol", "password": "correct horse battery"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let reached = tab_through(&client).await;
    assert_eq!(
        reached.first().map(|r| r.0.as_str()),
        Some("INPUT#username"),
        "{reached:?}"
    );
    client
        .execute(
            "document.getElementById('username').focus(); return null",
            vec![],
        )
        .await
        .unwrap();
    let keys = |s: &str| {
        let mut a = KeyActions::new("typing".into());
        for c in s.chars() {
            a = a
                .then(KeyAction::Down { value: c })
                .then(KeyAction::Up { value: c });
        }
        a
    };
    client.perform_actions(keys("carol")).await.unwrap();
    press_tab(&client).await;
    client
        .perform_actions(keys("correct horse battery"))
        .await
        .unwrap();
    let enter: char = Key::Enter.into();
    client
        .perform_actions(keys(&enter.to_string()))
        .await
        .unwrap();
    wait_for(
        &client,
        &format!("{}.includes('Logged in as carol')", text_of("who")),
        "keyboard login",
    )
    .await;
    wait_for(
        &client,
        &format!("!document.getElementById('buy-{promotion}').disabled"),
        "Buy",
    )
    .await;
    steps.done(&client, "logged in by keyboard").await;

    for (page, path) in [("sale page", "/"), ("console", "/console/")] {
        if path != "/" {
            client.goto(&app.url(path)).await.unwrap();
            wait_for(
                &client,
                "document.getElementById('admin-token')",
                "the console",
            )
            .await;
        }
        let reached = tab_through(&client).await;
        let expected: Vec<String> =
            serde_json::from_value(client.execute(FOCUSABLE, vec![]).await.unwrap()).unwrap();
        println!(
            "browser keyboard {page}: {} controls reached by Tab: {reached:?}",
            reached.len()
        );
        for (key, name) in &reached {
            assert!(!name.is_empty(), "{page}: {key} has no accessible name");
        }
        for key in &expected {
            assert!(
                reached.iter().any(|(k, _)| k == key),
                "{page}: {key} cannot be reached by Tab (reached {reached:?})"
            );
        }
        steps
            .done(&client, &format!("tabbed through the {page}"))
            .await;
    }
    client.close().await.unwrap();
}

/// Wraps `fetch` in the page: every call's path, start time and status go
/// to `window.__calls`.
const RECORD_FETCH: &str = r#"
window.__calls = [];
const real = window.fetch.bind(window);
window.fetch = async (path, init) => {
  const call = { path: String(path), method: (init && init.method) || 'GET', at: performance.now(), status: null };
  window.__calls.push(call);
  const res = await real(path, init);
  call.status = res.status;
  return res;
};
return null;
"#;

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_and_never_hammered() {
    // One request per second per user: the result asked right after the
    // purchase is refused with 429 and Retry-After.
    let app = crate::helpers::spawn_app_with(seckill::app::Role::Serve, |s| s.rate_user = 1).await;
    let promotion = app.active_promotion(5, 1).await;
    let mut steps = Steps::new("retry");
    let (_driver, client) = browser().await;
    client.goto(&app.url("/")).await.unwrap();
    wait_for(&client, "document.getElementById('login-form')", "the page").await;
    client.execute(RECORD_FETCH, vec![]).await.unwrap();
    register_in_page(&client, "erin").await;
    let buy = format!("buy-{promotion}");
    wait_for(
        &client,
        &format!("!document.getElementById('{buy}').disabled"),
        "Buy",
    )
    .await;
    click(&client, &buy).await;
    wait_for(
        &client,
        &format!(
            "{}.includes('is confirmed')",
            text_of(&format!("result-{promotion}"))
        ),
        "the order to be confirmed despite the 429s",
    )
    .await;
    steps.done(&client, "confirmed after 429s").await;

    let calls = client
        .execute("return window.__calls", vec![])
        .await
        .unwrap();
    let calls = calls.as_array().unwrap();
    let limited: Vec<&Value> = calls.iter().filter(|c| c["status"] == 429).collect();
    assert!(
        !limited.is_empty(),
        "no 429 happened, so nothing was proved: {calls:?}"
    );
    for refused in &limited {
        let (path, at) = (&refused["path"], refused["at"].as_f64().unwrap());
        let next = calls
            .iter()
            .filter(|c| c["path"] == *path && c["at"].as_f64().unwrap() > at)
            .map(|c| c["at"].as_f64().unwrap())
            .fold(f64::INFINITY, f64::min);
        assert!(
            next - at >= 950.0,
            "{path} asked again {:.0} ms after a 429 with Retry-After: 1",
            next - at
        );
    }
    println!(
        "browser retry: {} requests, {} answered 429, each followed by a wait of at least 1 s",
        calls.len(),
        limited.len()
    );
    client.close().await.unwrap();
}
