//! Prometheus `/metrics`: the process-wide `metrics` recorder rendered as text. Installed once per
//! process; the gateway's counters and gauges (connections, deliveries, resumes, closes, lag,
//! queue depths) are recorded through the `metrics` macros wherever they happen.

use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder (first call) and returns its handle. Later calls, including
/// from several gateways in one test process, share it.
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

pub fn router() -> Router {
    let handle = install();
    Router::new().route(
        "/metrics",
        get(move || {
            let h = handle.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], h.render()) }
        }),
    )
}
