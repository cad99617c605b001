//! W3C trace context (`traceparent`) carried in Kafka headers from ingest through templating to
//! notifications, so one trace id follows an event end to end. With an OpenTelemetry layer
//! installed ([`otel_layer`]), stage spans take their parent from these headers and put their own back.
//!
//! The stages' spans follow the OpenTelemetry messaging conventions (v1.44): `send {topic}`
//! (producer), `process {topic}` (consumer), `messaging.*` attributes. They are DEBUG spans, so
//! the log's default INFO filter disables them at their call sites (no span work, no
//! allocation) unless [`otel_layer`] asks for them.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::kafka::H_TRACEPARENT;

/// `messaging.system` of every span here.
pub const MESSAGING_SYSTEM: &str = "kafka";

/// The OpenTelemetry layer for tidings' spans: every `tidings*` span down to DEBUG (the stages'
/// messaging spans are DEBUG, see the module docs), and their INFO events as span events. Other
/// crates' spans are noise here, and the exporter's own logs must never feed back into it.
pub fn otel_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer;
    let ours = tracing_subscriber::filter::filter_fn(|m| {
        let max = if m.is_span() { tracing::Level::DEBUG } else { tracing::Level::INFO };
        m.target().starts_with("tidings") && *m.level() <= max
    });
    tracing_opentelemetry::layer().with_tracer(tracer).with_filter(ours)
}

/// A span's context kept with work done after the span ended (a delivered event written to its
/// streams later): boxed, so the work that is not traced carries a null pointer and allocates nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanRef(Box<opentelemetry::trace::SpanContext>);

impl SpanRef {
    /// `span`'s context when an OpenTelemetry layer records it.
    pub fn of(span: &tracing::Span) -> Option<SpanRef> {
        if span.is_disabled() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| SpanRef(Box::new(sc)))
    }

    /// Makes this the parent of `span` (before it is first entered).
    pub fn parent_of(&self, span: &tracing::Span) {
        let _ = span.set_parent(Context::new().with_remote_span_context((*self.0).clone()));
    }

    /// Links `span` to this context.
    pub fn link_from(&self, span: &tracing::Span) {
        span.add_link((*self.0).clone());
    }
}

/// Parses `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; returns (trace id, span id).
pub fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let mut parts = v.split('-');
    let (ver, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    (parts.next().is_none()
        && hex(ver, 2)
        && ver != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2))
    .then_some((trace, span))
}

/// A new sampled trace context.
pub fn new_traceparent() -> String {
    let t = uuid::Uuid::new_v4().simple().to_string();
    let s = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{t}-{s}-01")
}

/// The context for a child operation: same trace id, new span id, same flags.
pub fn child_traceparent(parent: &str) -> Option<String> {
    let (trace, _) = parse_traceparent(parent)?;
    let flags = &parent[parent.len() - 2..];
    let s = &uuid::Uuid::new_v4().simple().to_string()[..16];
    Some(format!("00-{trace}-{s}-{flags}"))
}

/// Makes W3C trace context the process-wide propagator, for libraries that use the global one.
/// The helpers below use it directly: the header format is part of the wire contract.
pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// Reads trace context from Kafka record headers.
pub struct HeaderExtractor<'a, H>(pub &'a H);

impl<H: Headers> Extractor for HeaderExtractor<'_, H> {
    fn get(&self, key: &str) -> Option<&str> {
        // The first match, as `kafka::header_str` (which the fallback path copies) reads it.
        self.0
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(key))
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|h| h.key).collect()
    }
}

/// Writes trace context into Kafka record headers (appending; start from headers without a
/// `traceparent` of their own).
pub struct HeaderInjector(Option<OwnedHeaders>);

impl HeaderInjector {
    pub fn new(headers: OwnedHeaders) -> Self {
        HeaderInjector(Some(headers))
    }

    pub fn into_headers(self) -> OwnedHeaders {
        self.0.unwrap_or_default()
    }
}

impl Injector for HeaderInjector {
    fn set(&mut self, key: &str, value: String) {
        let h = self.0.take().unwrap_or_default();
        self.0 = Some(h.insert(Header { key, value: Some(&value) }));
    }
}

/// The remote parent carried by `headers` (an empty context when there is none or it is invalid).
pub fn extract_context<H: Headers>(headers: &H) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

/// The remote parent named by one `traceparent` value (e.g. from an HTTP request).
pub fn context_from_traceparent(traceparent: &str) -> Context {
    let carrier = std::collections::HashMap::from([(H_TRACEPARENT.to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier)
}

/// Adds `cx`'s span context (`traceparent`, and `tracestate` if any) to `headers`; unchanged when
/// `cx` has no valid span context.
pub fn inject_context(cx: &Context, headers: OwnedHeaders) -> OwnedHeaders {
    let mut inj = HeaderInjector::new(headers);
    TraceContextPropagator::new().inject_context(cx, &mut inj);
    inj.into_headers()
}

/// Adds the current tracing span's OpenTelemetry context to `headers`.
pub fn inject_current_span(headers: OwnedHeaders) -> OwnedHeaders {
    inject_context(&tracing::Span::current().context(), headers)
}

/// Makes `parent` the OpenTelemetry parent of `span` (call before the span is first entered).
/// Returns false, doing nothing, when no OpenTelemetry layer records the span or `parent` is empty.
pub fn set_span_parent(span: &tracing::Span, parent: Context) -> bool {
    parent.span().span_context().is_valid() && span.set_parent(parent).is_ok()
}

/// Whether an OpenTelemetry layer records `span` (so it has a span context to propagate).
/// Starts the OpenTelemetry span: set its parent first.
pub fn is_traced(span: &tracing::Span) -> bool {
    !span.is_disabled() && span.context().span().span_context().is_valid()
}

/// Links `span` to the span context `cx` carries (no-op without one or without an OpenTelemetry layer).
pub fn add_span_link(span: &tracing::Span, cx: &Context) {
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// Headers carrying `span`'s trace context to the next stage: the span's own context when an
/// OpenTelemetry layer records it, else `fallback` (the incoming `traceparent`) copied verbatim so
/// the trace id still travels. `None` when there is neither.
pub fn propagation_headers(span: &tracing::Span, fallback: Option<&str>) -> Option<OwnedHeaders> {
    if !span.is_disabled() {
        let cx = span.context();
        if cx.span().span_context().is_valid() {
            return Some(inject_context(&cx, OwnedHeaders::new_with_capacity(2)));
        }
    }
    fallback.map(|tp| OwnedHeaders::new_with_capacity(1).insert(Header { key: H_TRACEPARENT, value: Some(tp) }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn new_and_child_share_the_trace_id() {
        let p = new_traceparent();
        let (t, s) = parse_traceparent(&p).unwrap();
        let c = child_traceparent(&p).unwrap();
        let (ct, cs) = parse_traceparent(&c).unwrap();
        assert_eq!(t, ct);
        assert_ne!(s, cs);
    }

    #[test]
    fn rejects_invalid() {
        assert!(parse_traceparent("00-00000000000000000000000000000000-0000000000000001-01").is_none());
        assert!(parse_traceparent("00-abc-def-01").is_none());
        assert!(parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    }

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanProcessor};
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_tp(tp: &str) -> OwnedHeaders {
        OwnedHeaders::new()
            .insert(Header { key: "other", value: Some("x") })
            .insert(Header { key: H_TRACEPARENT, value: Some(tp) })
    }

    fn tp_of(h: &OwnedHeaders) -> String {
        let mut found = None;
        for x in h.iter() {
            if x.key == H_TRACEPARENT {
                found = x.value.map(|v| String::from_utf8(v.to_vec()).unwrap());
            }
        }
        found.expect("traceparent header")
    }

    /// Keeps finished spans so tests can check parents and links.
    #[derive(Debug, Default, Clone)]
    struct Collect(Arc<Mutex<Vec<SpanData>>>);

    impl SpanProcessor for Collect {
        fn on_start(&self, _: &mut opentelemetry_sdk::trace::Span, _: &Context) {}
        fn on_end(&self, span: SpanData) {
            self.0.lock().unwrap().push(span);
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: std::time::Duration) -> OTelSdkResult {
            Ok(())
        }
    }

    fn otel_subscriber() -> (impl tracing::Subscriber + Send + Sync, Collect) {
        let spans = Collect::default();
        let provider = SdkTracerProvider::builder().with_span_processor(spans.clone()).build();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
        (tracing_subscriber::registry().with(layer), spans)
    }

    #[test]
    fn extract_then_inject_reproduces_the_header() {
        let cx = extract_context(&with_tp(TP));
        assert!(cx.span().span_context().is_valid());
        assert!(cx.span().span_context().is_remote());
        assert_eq!(tp_of(&inject_context(&cx, OwnedHeaders::new())), TP);
        assert_eq!(tp_of(&inject_context(&context_from_traceparent(TP), OwnedHeaders::new())), TP);
    }

    #[test]
    fn invalid_or_missing_header_gives_no_parent() {
        let bad = extract_context(&with_tp("00-00000000000000000000000000000000-00f067aa0ba902b7-01"));
        assert!(!bad.span().span_context().is_valid());
        assert!(!extract_context(&OwnedHeaders::new()).span().span_context().is_valid());
        // Nothing to inject: the headers stay as they were.
        assert_eq!(inject_context(&bad, OwnedHeaders::new()).count(), 0);
    }

    #[test]
    fn child_span_keeps_the_trace_id_with_a_new_span_id() {
        let (sub, spans) = otel_subscriber();
        let out = tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("child");
            assert!(set_span_parent(&span, extract_context(&with_tp(TP))));
            assert!(is_traced(&span));
            let out = propagation_headers(&span, Some(TP)).expect("headers");
            // Inside the span, the current-span injector sees the same context.
            let current = span.in_scope(|| inject_current_span(OwnedHeaders::new()));
            assert_eq!(tp_of(&current), tp_of(&out));
            out
        });
        let out = tp_of(&out);
        let (t, s) = parse_traceparent(TP).unwrap();
        let (ct, cs) = parse_traceparent(&out).unwrap();
        assert_eq!(ct, t);
        assert_ne!(cs, s);
        assert!(out.ends_with("-01"));
        // The exported span is the header's child and carries the id that was propagated.
        let done = spans.0.lock().unwrap();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].name, "child");
        assert_eq!(done[0].parent_span_id.to_string(), s);
        assert_eq!(done[0].span_context.span_id().to_string(), cs);
    }

    #[test]
    fn links_reach_the_exported_span() {
        let (sub, spans) = otel_subscriber();
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("batch");
            assert!(is_traced(&span));
            add_span_link(&span, &context_from_traceparent(TP));
            add_span_link(&span, &Context::new());
        });
        let done = spans.0.lock().unwrap();
        assert_eq!(done[0].links.len(), 1);
        assert_eq!(done[0].links[0].span_context.trace_id().to_string(), parse_traceparent(TP).unwrap().0);
        // A root span: it starts its own trace.
        assert_ne!(done[0].span_context.trace_id(), done[0].links[0].span_context.trace_id());
    }

    #[test]
    fn without_an_otel_layer_the_traceparent_is_copied() {
        let span = tracing::info_span!("no-otel");
        assert!(!set_span_parent(&span, extract_context(&with_tp(TP))));
        assert!(!is_traced(&span));
        assert_eq!(tp_of(&propagation_headers(&span, Some(TP)).unwrap()), TP);
        assert!(propagation_headers(&span, None).is_none());
    }

    #[test]
    fn a_span_ref_parents_or_links_a_later_span() {
        let (sub, spans) = otel_subscriber();
        tracing::subscriber::with_default(sub, || {
            let record = tracing::info_span!("record");
            let r = SpanRef::of(&record).expect("a recorded span has a context");
            drop(record);
            let child = tracing::info_span!(parent: None, "child");
            r.parent_of(&child);
            drop(child);
            let linked = tracing::info_span!(parent: None, "linked");
            r.link_from(&linked);
        });
        let done = spans.0.lock().unwrap();
        let by = |n: &str| done.iter().find(|s| s.name == n).unwrap();
        let (record, child, linked) = (by("record"), by("child"), by("linked"));
        assert_eq!(child.parent_span_id, record.span_context.span_id());
        assert_eq!(child.span_context.trace_id(), record.span_context.trace_id());
        assert_eq!(linked.parent_span_id, opentelemetry::trace::SpanId::INVALID);
        assert_ne!(linked.span_context.trace_id(), record.span_context.trace_id());
        assert_eq!(linked.links[0].span_context.span_id(), record.span_context.span_id());
        // Without an OpenTelemetry layer there is nothing to keep.
        assert!(SpanRef::of(&tracing::info_span!("untraced")).is_none());
    }

    /// The exporting layer takes tidings' DEBUG spans and nothing of other crates, whatever the
    /// log's own filter lets through.
    #[test]
    fn the_otel_layer_takes_tidings_spans_down_to_debug() {
        let spans = Collect::default();
        let provider = SdkTracerProvider::builder().with_span_processor(spans.clone()).build();
        let log = tracing_subscriber::fmt::layer()
            .with_test_writer()
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
        let sub = tracing_subscriber::registry().with(log).with(otel_layer(provider.tracer("test")));
        tracing::subscriber::with_default(sub, || {
            let _ = tracing::debug_span!("ours");
            let _ = tracing::debug_span!(target: "rdkafka", "theirs");
            let _ = tracing::trace_span!("too fine");
        });
        let names: Vec<String> = spans.0.lock().unwrap().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, ["ours"]);
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = parse_traceparent(&s);
        }
    }
}
