//! Trace context across process boundaries: the W3C `traceparent` of a
//! span, read from an HTTP header or a stream entry, written into the order
//! message, and turned into parents and links.
//!
//! Every function does nothing (and allocates nothing) while trace export
//! is off, so callers need not ask first.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::otlp::enabled;

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`);
/// `None` while export is off or when the span is not recorded.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span_context(span)?;
    Some(format_traceparent(&cx))
}

/// The OpenTelemetry context of the current span; `None` (without looking
/// the span up) while export is off.
pub fn current_span_context() -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    span_context(&tracing::Span::current())
}

/// The OpenTelemetry context of `span`; `None` while export is off.
pub fn span_context(span: &tracing::Span) -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    let cx = span.context().span().span_context().clone();
    cx.is_valid().then_some(cx)
}

/// `00-<trace id>-<span id>-<flags>`.
pub fn format_traceparent(cx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        cx.trace_id(),
        cx.span_id(),
        cx.trace_flags().to_u8()
    )
}

/// Parses a W3C `traceparent` (version 00; later versions are read by their
/// first four fields, as the specification asks). `None` when malformed or
/// all zeros.
pub fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let span_id = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    if !hex(version, 2) || version == "ff" || (version == "00" && rest.is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    let cx = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()? & 1),
        true,
        TraceState::default(),
    );
    cx.is_valid().then_some(cx)
}

/// Makes the caller's `traceparent` header (what `header` returns) the
/// parent of `span`: an incoming request continues its caller's trace.
/// Nothing when export is off (the header is not even looked up) or the
/// header is absent or malformed.
pub fn continue_from<'a>(span: &tracing::Span, header: impl FnOnce() -> Option<&'a [u8]>) {
    if !enabled() {
        return;
    }
    let Some(cx) = header()
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(parse_traceparent)
    else {
        return;
    };
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(cx));
}

/// Makes `parent` the parent of `span`.
pub fn set_parent(span: &tracing::Span, parent: &SpanContext) {
    if enabled() && parent.is_valid() {
        let _ =
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
    }
}

/// Links `span` to `to` (a span of another trace it stands for in part:
/// one buyer of a batch, one order of an insert).
pub fn link(span: &tracing::Span, to: &SpanContext) {
    if enabled() {
        span.add_link(to.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = parse_traceparent(text).unwrap();
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(format_traceparent(&cx), text);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
        // A later version is read by its first four fields.
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-x")
                .is_some()
        );
    }
}
