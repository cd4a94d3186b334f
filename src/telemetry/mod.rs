//! Logging (tracing), trace export (OTLP) and metrics (Prometheus) set-up,
//! and the list of every metric: each is described and exported from
//! start-up, at zero for the label values known before any traffic, so
//! dashboards and alerts see a value, not "no data", on a fresh process.
//!
//! `otlp` exports spans when an endpoint is configured; `context` carries a
//! trace across the stream and HTTP headers (W3C `traceparent`).

pub mod context;
pub mod otlp;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, OtlpSettings};

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`),
/// `format` picks human text or JSON lines. Later calls do nothing.
pub fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Spans kept in the log only: the order worker's loop turn (`step`) opens
/// one every poll, mostly empty; its insert has a span of its own.
const NOT_EXPORTED: &[&str] = &["step"];

/// [`init_tracing`], plus the OpenTelemetry layer when `otlp` names an
/// endpoint: the spans of this crate (not those of the libraries, so the
/// exporter's own HTTP/2 spans never feed back into it) go to the OTLP
/// exporter. Without an endpoint no layer is installed at all. Must run
/// inside the tokio runtime.
pub fn init_tracing_with_export(format: LogFormat, otlp: &OtlpSettings) -> anyhow::Result<()> {
    let Some(tracer) = otlp::tracer(otlp)? else {
        init_tracing(format);
        return Ok(());
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let export = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.target().starts_with("seckill") && !NOT_EXPORTED.contains(&meta.name())
        }));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(export)
        .try_init();
    Ok(())
}

/// Histogram buckets in seconds: from half a millisecond (a Redis script) to
/// seconds (a stalled database write).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Buckets of the worker batch size, in orders.
const BATCH_BUCKETS: &[f64] = &[1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0];

/// The process-wide Prometheus recorder (one per process, however many
/// gateways the process runs, as in the tests).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets(BUCKETS)
                .expect("bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full("seckill_worker_batch_size".into()),
                    BATCH_BUCKETS,
                )
                .expect("bucket list is not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed")
        })
        .clone()
}

/// Label values known before any traffic, given by the layers that own them.
#[derive(Debug, Clone, Copy)]
pub struct KnownLabels<'a> {
    /// Every `route` label of the request metrics.
    pub routes: &'a [&'static str],
    /// Every `outcome` label of `seckill_purchases_total`.
    pub purchase_outcomes: &'a [&'static str],
}

/// Every counter, with its help text.
const COUNTERS: &[(&str, &str)] = &[
    (
        "seckill_http_requests_total",
        "HTTP requests answered, by route and status",
    ),
    ("seckill_purchases_total", "Purchase requests, by outcome"),
    (
        "seckill_cache_requests_total",
        "Local cache look-ups, by cache and result",
    ),
    (
        "seckill_rate_limited_total",
        "Requests refused 429 by a rate limit, by limit",
    ),
    ("seckill_tokens_issued_total", "Admission tokens signed"),
    (
        "seckill_orders_persisted_total",
        "Order rows inserted by the workers",
    ),
    (
        "seckill_orders_acknowledged_total",
        "Stream entries acknowledged by the workers",
    ),
    (
        "seckill_orders_claimed_total",
        "Stream entries claimed from a consumer presumed dead",
    ),
    (
        "seckill_orders_expired_total",
        "Orders cancelled by the payment timeout",
    ),
    (
        "seckill_orders_refused_total",
        "Orders PostgreSQL refused for good, moved to the dead-letter stream",
    ),
    (
        "seckill_units_returned_total",
        "Units given back to sale by restock.lua",
    ),
    (
        "seckill_trace_spans_exported_total",
        "Spans the OTLP receiver accepted",
    ),
    (
        "seckill_trace_spans_dropped_total",
        "Spans not exported, by reason (queue_full, export_failed, shutdown)",
    ),
];

/// Every histogram, with its help text.
const HISTOGRAMS: &[(&str, &str)] = &[
    (
        "seckill_http_request_seconds",
        "Time to answer a request, by route",
    ),
    (
        "seckill_lua_seconds",
        "Time of one purchase script call (many buyers per call)",
    ),
    (
        "seckill_worker_batch_size",
        "Orders per batch written by a worker",
    ),
    (
        "seckill_db_write_seconds",
        "Time of one batch insert into PostgreSQL",
    ),
];

/// Gauges labelled by promotion; before any promotion they have one
/// unlabelled series at 0.
const GAUGES: &[(&str, &str)] = &[
    (
        "seckill_stream_length",
        "Order messages in a promotion's stream",
    ),
    (
        "seckill_stream_pending",
        "Stream entries delivered to a worker, not yet acknowledged",
    ),
    (
        "seckill_reconcile_drift",
        "Units Redis and PostgreSQL disagree on, by promotion",
    ),
];

/// The `limit` labels of `seckill_rate_limited_total`.
const RATE_LIMITS: &[&str] = &["global", "user", "ip", "admin", "login"];

/// The statuses every route starts with a zero series of: its success and
/// the two 5xx the alerts watch.
const ROUTE_STATUSES: &[&str] = &["200", "500", "503"];

/// Every metric name this program records (dashboards and alerts may use
/// only these).
pub fn metric_names() -> impl Iterator<Item = &'static str> {
    COUNTERS
        .iter()
        .chain(HISTOGRAMS)
        .chain(GAUGES)
        .map(|(name, _)| *name)
}

/// Describes every metric and exports a zero series for each label set
/// known before any traffic. Idempotent: a process running several gateways
/// (the tests) calls it once per gateway.
pub fn register_metrics(known: &KnownLabels) {
    // The recorder must exist before anything is registered with it.
    let _ = metrics_handle();
    for (name, help) in COUNTERS {
        metrics::describe_counter!(*name, *help);
    }
    for (name, help) in HISTOGRAMS {
        let unit = if name.ends_with("_seconds") {
            metrics::Unit::Seconds
        } else {
            metrics::Unit::Count
        };
        metrics::describe_histogram!(*name, unit, *help);
    }
    for (name, help) in GAUGES {
        metrics::describe_gauge!(*name, *help);
        metrics::gauge!(*name).set(0.0);
    }
    for route in known.routes {
        for status in ROUTE_STATUSES {
            metrics::counter!("seckill_http_requests_total", "route" => *route, "status" => *status)
                .increment(0);
        }
        // Registering is enough: a histogram with no sample is rendered
        // with zero buckets, sum and count.
        let _ = metrics::histogram!("seckill_http_request_seconds", "route" => *route);
    }
    for outcome in known.purchase_outcomes {
        metrics::counter!("seckill_purchases_total", "outcome" => *outcome).increment(0);
    }
    for cache in ["meta", "sold_out"] {
        for result in ["hit", "miss"] {
            metrics::counter!("seckill_cache_requests_total", "cache" => cache, "result" => result)
                .increment(0);
        }
    }
    for limit in RATE_LIMITS {
        metrics::counter!("seckill_rate_limited_total", "limit" => *limit).increment(0);
    }
    for name in [
        "seckill_tokens_issued_total",
        "seckill_orders_persisted_total",
        "seckill_orders_acknowledged_total",
        "seckill_orders_claimed_total",
        "seckill_orders_expired_total",
        "seckill_orders_refused_total",
        "seckill_units_returned_total",
        "seckill_trace_spans_exported_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["queue_full", "export_failed", "shutdown"] {
        metrics::counter!("seckill_trace_spans_dropped_total", "reason" => reason).increment(0);
    }
    let _ = metrics::histogram!("seckill_lua_seconds", "script" => "purchase");
    let _ = metrics::histogram!("seckill_worker_batch_size");
    let _ = metrics::histogram!("seckill_db_write_seconds");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric names a text uses (`_bucket`, `_sum` and `_count` of a
    /// histogram stand for the histogram).
    fn names_in(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("seckill_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| HISTOGRAMS.iter().any(|(h, _)| h == b))
                .unwrap_or(name);
            out.push(base.to_string());
            rest = &tail[end..];
        }
        out
    }

    #[test]
    fn every_metric_the_dashboard_and_prometheus_files_use_is_one_the_program_records() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        let mut files = Vec::new();
        for dir in ["grafana/dashboards", "prometheus"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                files.push(entry.unwrap().path());
            }
        }
        let known: Vec<&str> = metric_names().collect();
        let mut used = 0;
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for name in names_in(&text) {
                used += 1;
                assert!(
                    known.contains(&name.as_str()),
                    "{} uses {name}, which the program does not record",
                    file.display()
                );
            }
        }
        assert!(used > 10, "the dashboard uses the metrics");
    }
}
