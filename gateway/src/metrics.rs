//! Prometheus `/metrics`: the process-wide `metrics` recorder rendered as text. Installed once, by
//! the process's owner at start (the binary, before any stage takes a metric handle); counters and
//! gauges are recorded through the `metrics` macros wherever they happen.

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Upper bounds of every `…_seconds` histogram (and of any histogram not named otherwise): from a
/// millisecond hop to a five-minute lag. The same everywhere, so instances' buckets add up.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Upper bounds of every `…_records` histogram (batch sizes).
pub const RECORDS_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0];

/// The recorder's builder: every histogram is a Prometheus histogram with fixed buckets (which
/// sum across instances), never a per-process quantile summary.
pub fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets(SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_records".into()), RECORDS_BUCKETS))
        .expect("bucket lists are not empty")
}

/// Installs the Prometheus recorder as the process's global one and returns its handle. For the
/// process's owner, at start: a metric handle taken before records nowhere. Later calls (a test
/// process's gateways) return the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a host program's); then ours stays
            // empty but the endpoint still answers.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The installed recorder's handle; `None` before [`install`]. Never installs one.
pub fn handle() -> Option<PrometheusHandle> {
    HANDLE.get().cloned()
}

/// `GET /metrics`: the installed recorder's text (empty when none was installed).
pub fn router() -> Router {
    Router::new().route(
        "/metrics",
        get(|| async {
            let text = handle().map(|h| h.render()).unwrap_or_default();
            ([("content-type", "text/plain; version=0.0.4")], text)
        }),
    )
}

#[cfg(test)]
mod tests {
    /// Histograms render with buckets by their name's unit, not as summaries.
    #[test]
    fn histograms_have_buckets_by_unit() {
        let recorder = super::builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::histogram!("x_processing_seconds").record(0.003);
            metrics::histogram!("x_batch_records").record(7.0);
        });
        let text = handle.render();
        assert!(text.contains("# TYPE x_processing_seconds histogram"), "{text}");
        assert!(text.contains("x_processing_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("x_processing_seconds_bucket{le=\"0.0025\"} 0"), "{text}");
        assert!(text.contains("x_batch_records_bucket{le=\"10\"} 1"), "{text}");
        assert!(text.contains("x_batch_records_bucket{le=\"5\"} 0"), "{text}");
        assert!(!text.contains("quantile"), "{text}");
    }

    /// Only the process's owner installs the recorder: a hub and the routers (what library users
    /// and tests build) take no global slot.
    #[test]
    fn building_the_gateway_installs_no_recorder() {
        let _hub = crate::delivery::Hub::new(Default::default(), None);
        let _app = crate::app(crate::Parts::default(), crate::Readiness::default());
        let _metrics = crate::metrics_app();
        assert!(super::handle().is_none(), "a library call installed the recorder");
    }
}
