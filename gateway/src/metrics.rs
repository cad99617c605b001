//! Prometheus `/metrics`: the process-wide `metrics` recorder rendered as text. Installed once, by
//! the process's owner at start (the binary, before any stage takes a metric handle); counters and
//! gauges are recorded through the `metrics` macros wherever they happen.

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's global one and returns its handle. For the
/// process's owner, at start: a metric handle taken before records nowhere. Later calls (a test
/// process's gateways) return the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
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
