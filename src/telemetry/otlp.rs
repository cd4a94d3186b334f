//! Trace export over OTLP: the tracer provider, the bounded span queue and
//! its export thread.
//!
//! Installed only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set; without it no
//! OpenTelemetry layer exists and a span costs what it cost before.
//!
//! Export never slows or fails a request: a finished span goes into a queue
//! of `OTEL_BSP_MAX_QUEUE_SIZE` spans with a non-blocking `try_send`; when
//! the queue is full the span is dropped and counted
//! (`seckill_trace_spans_dropped_total{reason="queue_full"}`). One thread of
//! its own takes the spans off the queue and exports them in batches of
//! `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, at least every `OTEL_BSP_SCHEDULE_DELAY`;
//! a batch the receiver refused or never got is counted as dropped
//! (`reason="export_failed"`), an exported one in
//! `seckill_trace_spans_exported_total`. The SDK's own batch processor is not
//! used because it counts its drops nowhere a dashboard can see.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor, Tracer,
};

use crate::config::{OtlpProtocol, OtlpSettings};

/// The provider, kept for the flush at shutdown.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported: the request and purchase paths ask before
/// doing any trace-context work.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether trace export is on in this process.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Builds the exporter and the provider for `settings`, and returns the
/// tracer for the tracing layer. Must run inside the tokio runtime (the gRPC
/// channel and the HTTP client live on it); `None` when no endpoint is set.
pub fn tracer(settings: &OtlpSettings) -> anyhow::Result<Option<Tracer>> {
    use opentelemetry::trace::TracerProvider as _;
    let Some(endpoint) = &settings.endpoint else {
        return Ok(None);
    };
    let mut exporter = match settings.protocol {
        OtlpProtocol::Grpc => SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build(),
        // The specification: the signal's path is appended to the
        // endpoint given for all signals.
        OtlpProtocol::HttpProtobuf => SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build(),
    }
    .context("failed to build the OTLP span exporter")?;
    let handle = tokio::runtime::Handle::try_current()
        .context("the OTLP exporter must be built inside the runtime")?;
    // Only the service name: no resource detector reads variables this
    // program does not document.
    let resource = Resource::builder_empty()
        .with_service_name(settings.service_name.clone())
        .build();
    // The exporter moves to the export thread: it learns the resource now.
    exporter.set_resource(&resource);
    let processor = BoundedProcessor::start(exporter, handle, settings)?;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("seckill");
    if PROVIDER.set(provider).is_ok() {
        ENABLED.store(true, Ordering::Relaxed);
    }
    Ok(Some(tracer))
}

/// Exports what is queued and stops the export thread; the process calls it
/// once, on the way out, while the runtime still runs.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = provider.shutdown() {
            tracing::warn!(error = %e, "trace export did not finish cleanly");
        }
    }
}

/// Exports what is queued now (for the tests and the shutdown path).
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

fn dropped(reason: &'static str, n: usize) {
    metrics::counter!("seckill_trace_spans_dropped_total", "reason" => reason).increment(n as u64);
}

enum Msg {
    Span(Box<SpanData>),
    Flush(SyncSender<()>),
    Shutdown(SyncSender<()>),
}

/// A batch span processor whose queue is bounded and whose drops are counted.
#[derive(Debug)]
struct BoundedProcessor {
    queue: SyncSender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl BoundedProcessor {
    fn start(
        exporter: SpanExporter,
        runtime: tokio::runtime::Handle,
        settings: &OtlpSettings,
    ) -> anyhow::Result<BoundedProcessor> {
        let (queue, rx) = mpsc::sync_channel(settings.max_queue);
        let export = ExportLoop {
            rx,
            exporter,
            runtime,
            max_batch: settings.max_batch,
            delay: settings.schedule_delay,
            failing: false,
        };
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || export.run())
            .context("failed to start the trace export thread")?;
        Ok(BoundedProcessor {
            queue,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sends a control message and waits (at most `timeout`) for its answer.
    fn control(&self, make: fn(SyncSender<()>) -> Msg, timeout: Duration) -> OTelSdkResult {
        let (done, wait) = mpsc::sync_channel(1);
        self.queue
            .send(make(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        wait.recv_timeout(timeout)
            .map_err(|_| OTelSdkError::Timeout(timeout))
    }
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        match self.queue.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => dropped("queue_full", 1),
            Err(TrySendError::Disconnected(_)) => dropped("shutdown", 1),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.control(Msg::Flush, Duration::from_secs(15))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let result = self.control(Msg::Shutdown, timeout);
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take()
            && result.is_ok()
        {
            let _ = thread.join();
        }
        result
    }
}

/// The export thread's state.
struct ExportLoop {
    rx: Receiver<Msg>,
    exporter: SpanExporter,
    runtime: tokio::runtime::Handle,
    max_batch: usize,
    delay: Duration,
    /// Whether the last export failed: a failure is logged when it starts,
    /// not once per batch.
    failing: bool,
}

impl ExportLoop {
    fn run(mut self) {
        let mut batch = Vec::with_capacity(self.max_batch);
        let mut deadline = Instant::now() + self.delay;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(wait) {
                Ok(Msg::Span(span)) => {
                    batch.push(*span);
                    if batch.len() >= self.max_batch {
                        self.export(&mut batch);
                        deadline = Instant::now() + self.delay;
                    }
                }
                Ok(Msg::Flush(done)) => {
                    self.export(&mut batch);
                    let _ = done.send(());
                }
                Ok(Msg::Shutdown(done)) => {
                    self.export(&mut batch);
                    let _ = self.exporter.shutdown();
                    let _ = done.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.export(&mut batch);
                    deadline = Instant::now() + self.delay;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.export(&mut batch);
                    return;
                }
            }
        }
    }

    fn export(&mut self, batch: &mut Vec<SpanData>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let spans = std::mem::replace(batch, Vec::with_capacity(self.max_batch));
        // The exporter's future runs on this thread; its I/O is driven by
        // the runtime's reactor. The exporter's own timeout bounds it.
        match self.runtime.block_on(self.exporter.export(spans)) {
            Ok(()) => {
                metrics::counter!("seckill_trace_spans_exported_total").increment(n as u64);
                if self.failing {
                    self.failing = false;
                    tracing::info!("trace export works again");
                }
            }
            Err(e) => {
                dropped("export_failed", n);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(error = %e, spans = n, "trace export failed; spans are dropped until it works again");
                }
            }
        }
    }
}
