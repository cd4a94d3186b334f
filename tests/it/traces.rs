//! Traces over OTLP, received by a real OTLP receiver inside the test: an
//! HTTP server decoding `POST /v1/traces` (http/protobuf) and a gRPC
//! `TraceService`, both decoding the exporter's protobuf with
//! `opentelemetry-proto`. The gateway runs as a child process (`seckill
//! serve`), so each test has its own global tracer provider.
//!
//! What is proved: a purchase is one story (the request span continues the
//! caller's `traceparent`; the script call's span links to the request; the
//! worker's insert span links to it through the `traceparent` carried in the
//! stream entry); the service name is honoured; a receiver that is down or
//! stalled never fails or holds up a purchase, and the dropped spans are
//! counted; with export off, the stream entry has no `traceparent`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message as _;
use redis::AsyncCommands as _;
use reqwest::StatusCode;
use seckill::app::Role;
use seckill::stock::Keys;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::helpers::{ADMIN_TOKEN, active_body, spawn_app_with, test_settings, user_token};
use crate::procs::{GatewayProc, spare_port};

/// One span as the receiver decoded it (ids in hex).
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    links: Vec<(String, String)>,
}

/// What a receiver got, and how many export requests reached it.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Got>>>,
    requests: Arc<AtomicUsize>,
}

impl Received {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Got {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        links: s
                            .links
                            .iter()
                            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                            .collect(),
                    });
                }
            }
        }
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits (30 s at most) until `found` finds what it looks for.
    async fn wait_for<T>(&self, what: &str, found: impl Fn(&[Got]) -> Option<T>) -> T {
        for _ in 0..300 {
            if let Some(t) = found(&self.spans()) {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no {what} within 30 s; received: {:#?}", self.spans());
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver on a port of its own: `POST /v1/traces` with a
/// protobuf body. With `stall`, each request waits for a permit first (a
/// receiver that accepted the connection and does not answer).
async fn http_receiver(received: Received, stall: Option<Arc<Semaphore>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = received.clone();
            let stall = stall.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let received = received.clone();
                    let stall = stall.clone();
                    async move {
                        let ok = req.method() == hyper::Method::POST
                            && req.uri().path() == "/v1/traces"
                            && req.headers().get("content-type").map(|v| v.as_bytes())
                                == Some(b"application/x-protobuf");
                        let body = match req.into_body().collect().await {
                            Ok(body) => body.to_bytes(),
                            Err(_) => Bytes::new(),
                        };
                        if !ok {
                            return hyper::Response::builder()
                                .status(404)
                                .body(Full::new(Bytes::new()));
                        }
                        received.requests.fetch_add(1, Ordering::SeqCst);
                        if let Some(stall) = stall {
                            let _permit = stall.acquire().await;
                        }
                        let decoded = ExportTraceServiceRequest::decode(body)
                            .expect("the exporter sends a valid ExportTraceServiceRequest");
                        received.add(decoded);
                        hyper::Response::builder()
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(Bytes::from(
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// The gRPC side: tonic's generated `TraceService`, served over HTTP/2.
struct Grpc(Received);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.requests.fetch_add(1, Ordering::SeqCst);
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a port of its own.
async fn grpc_receiver(received: Received) -> u16 {
    use tonic::codegen::Service as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = TraceServiceServer::new(Grpc(received));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let server = server.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let mut server = server.clone();
                    server.call(req)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

/// `seckill serve` (with `args`) as a child process with `env`, its workers
/// polling and its spans exported every 100 ms.
struct Gateway {
    proc: GatewayProc,
    settings: seckill::config::Settings,
}

impl Gateway {
    async fn start(args: &[&str], env: &[(&str, String)]) -> Gateway {
        let settings = test_settings();
        let mut all = vec![
            ("SECKILL_WORKER_BLOCK_MS", "100"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ];
        all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
        let proc = GatewayProc::start_with(&settings, args, &all).await;
        Gateway { proc, settings }
    }

    async fn promotion(&self, stock: i64) -> i64 {
        let created: serde_json::Value = reqwest::Client::new()
            .post(format!("http://{}/admin/promotions", self.proc.addr))
            .bearer_auth(ADMIN_TOKEN)
            .json(&active_body(stock, 1))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        created["id"].as_i64().expect("the promotion is created")
    }

    async fn purchase(&self, promotion: i64, user: i64, traceparent: Option<&str>) -> StatusCode {
        let mut req = reqwest::Client::new()
            .post(format!(
                "http://{}/api/promotions/{promotion}/purchase",
                self.proc.addr
            ))
            .bearer_auth(user_token(user))
            .json(&serde_json::json!({}));
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        req.send().await.expect("purchase is answered").status()
    }

    /// The value of the counter series `series` (name and labels as
    /// rendered) on `/metrics`.
    async fn counter(&self, series: &str) -> f64 {
        let text = reqwest::get(format!("http://{}/metrics", self.proc.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} is on /metrics"))
    }

    /// Waits (30 s at most) until `series` is above zero; returns it.
    async fn wait_for_counter(&self, series: &str) -> f64 {
        for _ in 0..300 {
            let v = self.counter(series).await;
            if v > 0.0 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{series} stayed at 0 for 30 s");
    }
}

fn otlp_env(protocol: &str, port: u16, service: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://127.0.0.1:{port}"),
        ),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_string()),
        ("OTEL_SERVICE_NAME", service.to_string()),
    ]
}

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// Buys one unit with the caller's `traceparent` and checks the story the
/// receiver got: request → script call (link) → worker insert (link, from
/// the stream entry), all under the configured service name.
async fn one_purchase_is_one_story(protocol: &str, grpc: bool) {
    let received = Received::default();
    let port = if grpc {
        grpc_receiver(received.clone()).await
    } else {
        http_receiver(received.clone(), None).await
    };
    let service = format!(
        "seckill-it-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let gw = Gateway::start(&[], &otlp_env(protocol, port, &service)).await;
    let id = gw.promotion(5).await;
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    assert_eq!(gw.purchase(id, 7, Some(&caller)).await, StatusCode::OK);

    // The request span continues the caller's trace, as its child.
    let request = received
        .wait_for("request span in the caller's trace", |spans| {
            spans
                .iter()
                .find(|s| s.name == "request" && s.trace_id == CALLER_TRACE)
                .cloned()
        })
        .await;
    assert_eq!(request.parent, CALLER_SPAN, "{request:?}");
    assert_eq!(request.service, service);
    let request_ref = (request.trace_id.clone(), request.span_id.clone());

    // The script call's span links to the buyer's request.
    let script = received
        .wait_for("purchase_script span linked to the request", |spans| {
            spans
                .iter()
                .find(|s| s.name == "purchase_script" && s.links.contains(&request_ref))
                .cloned()
        })
        .await;
    assert_eq!(script.service, service);
    // With one buyer the call is also in the buyer's trace.
    assert_eq!(script.trace_id, CALLER_TRACE);

    // The worker's insert links to the request through the stream entry.
    let insert = received
        .wait_for("insert_orders span linked to the request", |spans| {
            spans
                .iter()
                .find(|s| s.name == "insert_orders" && s.links.contains(&request_ref))
                .cloned()
        })
        .await;
    assert_eq!(insert.service, service);
    assert!(received.requests.load(Ordering::SeqCst) >= 1);
}

#[tokio::test]
async fn a_purchase_is_one_story_from_request_to_insert_over_http_protobuf() {
    one_purchase_is_one_story("http/protobuf", false).await;
}

#[tokio::test]
async fn a_purchase_is_one_story_from_request_to_insert_over_grpc() {
    one_purchase_is_one_story("grpc", true).await;
}

#[tokio::test]
async fn a_batch_call_links_to_every_buyer_of_the_batch() {
    let received = Received::default();
    let port = http_receiver(received.clone(), None).await;
    let gw = Gateway::start(&[], &otlp_env("http/protobuf", port, "seckill")).await;
    let id = gw.promotion(100).await;
    let buyers = 40;
    let statuses =
        futures_util::future::join_all((1..=buyers).map(|u| gw.purchase(id, u, None))).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    // The script calls' links, together, name every buyer's request once.
    let scripts = received
        .wait_for("a link per buyer from the script calls", |spans| {
            let scripts: Vec<Got> = spans
                .iter()
                .filter(|s| s.name == "purchase_script")
                .cloned()
                .collect();
            let linked: usize = scripts.iter().map(|s| s.links.len()).sum();
            // The request spans may come in a later export batch than
            // the script calls that link to them: wait for those too.
            let requests_in = scripts.iter().flat_map(|s| &s.links).all(|(t, id)| {
                spans
                    .iter()
                    .any(|r| r.name == "request" && &r.trace_id == t && &r.span_id == id)
            });
            (linked >= buyers as usize && requests_in).then_some(scripts)
        })
        .await;
    let all_links: Vec<&(String, String)> = scripts.iter().flat_map(|s| &s.links).collect();
    let distinct: std::collections::HashSet<_> = all_links.iter().collect();
    assert_eq!(
        distinct.len(),
        buyers as usize,
        "one link per buyer, none twice"
    );
    let spans = received.spans();
    for (trace, span) in distinct {
        assert!(
            spans
                .iter()
                .any(|s| s.name == "request" && &s.trace_id == trace && &s.span_id == span),
            "a link points at a request span"
        );
    }
}

#[tokio::test]
async fn spans_still_queued_are_exported_on_shutdown() {
    let received = Received::default();
    let port = http_receiver(received.clone(), None).await;
    let mut env = otlp_env("http/protobuf", port, "seckill");
    // Nothing leaves on the timer during the test: only the shutdown flush.
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "600000".into()));
    let mut gw = Gateway::start(&["--no-workers"], &env).await;
    let id = gw.promotion(5).await;
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    assert_eq!(gw.purchase(id, 1, Some(&caller)).await, StatusCode::OK);
    assert_eq!(
        received.requests.load(Ordering::SeqCst),
        0,
        "nothing sent yet"
    );
    let pid = nix::unistd::Pid::from_raw(gw.proc.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), gw.proc.child.wait())
        .await
        .expect("the gateway stops within 30 s")
        .unwrap();
    assert!(status.success(), "{status}");
    let spans = received.spans();
    for name in ["request", "purchase_script"] {
        assert!(
            spans
                .iter()
                .any(|s| s.name == name && s.trace_id == CALLER_TRACE),
            "{name} exported on shutdown: {spans:#?}"
        );
    }
}

#[tokio::test]
async fn with_the_receiver_down_purchases_answer_and_failed_exports_are_counted() {
    // A port nothing listens on.
    let port = spare_port();
    let gw = Gateway::start(&[], &otlp_env("http/protobuf", port, "seckill")).await;
    let id = gw.promotion(20).await;
    for user in 1..=20 {
        assert_eq!(gw.purchase(id, user, None).await, StatusCode::OK);
    }
    let failed = gw
        .wait_for_counter("seckill_trace_spans_dropped_total{reason=\"export_failed\"}")
        .await;
    assert!(failed >= 1.0);
    assert_eq!(gw.counter("seckill_trace_spans_exported_total").await, 0.0);
}

#[tokio::test]
async fn a_stalled_receiver_never_holds_up_a_purchase_and_the_queue_stays_bounded() {
    let received = Received::default();
    let stall = Arc::new(Semaphore::new(0));
    let port = http_receiver(received.clone(), Some(Arc::clone(&stall))).await;
    let mut env = otlp_env("http/protobuf", port, "seckill");
    env.push(("OTEL_BSP_MAX_QUEUE_SIZE", "4".into()));
    env.push(("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1".into()));
    let gw = Gateway::start(&[], &env).await;
    let id = gw.promotion(50).await;
    // The first export reaches the receiver and hangs there.
    assert_eq!(gw.purchase(id, 1, None).await, StatusCode::OK);
    for _ in 0..300 {
        if received.requests.load(Ordering::SeqCst) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        received.requests.load(Ordering::SeqCst),
        1,
        "one export in flight"
    );
    // The export thread is stuck: every span past the 4 queued is dropped,
    // and every purchase still answers.
    for user in 2..=30 {
        assert_eq!(gw.purchase(id, user, None).await, StatusCode::OK);
    }
    let dropped = gw
        .counter("seckill_trace_spans_dropped_total{reason=\"queue_full\"}")
        .await;
    // Purchases 2 to 30 end 58 spans (request and script call each) while
    // the export thread is stuck: at most 4 of them fit in the queue.
    assert!(dropped >= 54.0, "dropped {dropped}");
    assert_eq!(received.requests.load(Ordering::SeqCst), 1);
    // Released, the export thread goes on with what it kept.
    stall.add_permits(1000);
    let exported = gw
        .wait_for_counter("seckill_trace_spans_exported_total")
        .await;
    assert!(exported >= 1.0);
}

#[tokio::test]
async fn the_stream_entry_carries_the_traceparent_only_while_traces_are_exported() {
    // On: a gateway without workers, so the entry stays in the stream.
    let received = Received::default();
    let port = http_receiver(received.clone(), None).await;
    let gw = Gateway::start(
        &["--no-workers"],
        &otlp_env("http/protobuf", port, "seckill"),
    )
    .await;
    let id = gw.promotion(5).await;
    let caller = format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01");
    assert_eq!(gw.purchase(id, 3, Some(&caller)).await, StatusCode::OK);
    let mut redis = redis::Client::open(gw.settings.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stream = Keys::new(gw.settings.key_prefix.clone())
        .promotion(id)
        .orders;
    let entries: redis::streams::StreamRangeReply = redis.xrange_all(&stream).await.unwrap();
    assert_eq!(entries.ids.len(), 1);
    let fields: HashMap<String, String> = entries.ids[0]
        .map
        .iter()
        .map(|(k, v)| (k.clone(), redis::from_redis_value_ref::<String>(v).unwrap()))
        .collect();
    let tp = fields.get("traceparent").expect("a traceparent field");
    let request = received
        .wait_for("the request span", |spans| {
            spans
                .iter()
                .find(|s| s.name == "request" && s.trace_id == CALLER_TRACE)
                .cloned()
        })
        .await;
    assert_eq!(
        tp,
        &format!("00-{}-{}-01", request.trace_id, request.span_id)
    );
    assert_eq!(request.trace_id, CALLER_TRACE);

    // Off (no endpoint): exactly the six fields of the script's contract.
    let app = spawn_app_with(Role::GatewayOnly, |_| {}).await;
    let id = app.active_promotion(5, 1).await;
    let (status, _) = app.purchase(id, 3).await;
    assert_eq!(status, StatusCode::OK);
    let mut redis = app.redis.clone();
    let stream = app.keys.promotion(id).orders;
    let entries: redis::streams::StreamRangeReply = redis.xrange_all(&stream).await.unwrap();
    assert_eq!(entries.ids.len(), 1);
    let mut names: Vec<&str> = entries.ids[0].map.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "created_ms",
            "order_id",
            "price_cents",
            "promotion_id",
            "seq",
            "user_id"
        ]
    );
}

#[test]
fn compose_runs_jaeger_every_seckill_service_exports_to_it_and_grafana_links_to_it() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap();
    let mut compose: serde_yaml::Value = serde_yaml::from_str(&read("docker-compose.yml")).unwrap();
    compose.apply_merge().unwrap();
    let services = &compose["services"];
    let jaeger = &services["jaeger"];
    assert!(
        jaeger["image"]
            .as_str()
            .unwrap()
            .starts_with("jaegertracing/all-in-one:")
    );
    let exposed: Vec<&str> = jaeger["expose"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p.as_str())
        .collect();
    assert!(exposed.contains(&"4317") && exposed.contains(&"4318"));
    for (name, service) in [
        ("gateway-1", "seckill-gateway"),
        ("gateway-2", "seckill-gateway"),
        ("worker", "seckill-worker"),
    ] {
        let env = &services[name]["environment"];
        let settings = seckill::config::Settings::from_lookup(|key| {
            env[key]
                .as_str()
                .map(str::to_string)
                .filter(|v| !v.contains("${"))
        })
        .unwrap();
        assert_eq!(
            settings.otlp.endpoint.as_deref(),
            Some("http://jaeger:4317"),
            "{name}"
        );
        assert_eq!(settings.otlp.protocol, seckill::config::OtlpProtocol::Grpc);
        assert_eq!(settings.otlp.service_name, service, "{name}");
    }
    let datasources: serde_yaml::Value =
        serde_yaml::from_str(&read("deploy/grafana/provisioning/datasources/jaeger.yml")).unwrap();
    let jaeger_ds = &datasources["datasources"][0];
    assert_eq!(jaeger_ds["type"], "jaeger");
    assert_eq!(jaeger_ds["url"], "http://jaeger:16686");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboards/seckill.json")).unwrap();
    let links = dashboard["links"].as_array().unwrap();
    assert!(
        links
            .iter()
            .any(|l| l["url"].as_str().unwrap_or_default().contains(":16686/")),
        "the dashboard links to Jaeger's UI"
    );
}
