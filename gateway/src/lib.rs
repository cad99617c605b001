//! The HTTP gateway: health and readiness, and JSON event ingest for services that do not speak
//! Kafka. (SSE delivery per owned partition builds on this router.)
//!
//! - `ingest`: `POST /v1/events/{topic}` validates JSON against the registered schema and produces Avro.
//! - `health`: `/healthz` (process up) and `/readyz` (stages running).

pub mod health;
pub mod ingest;

use axum::Router;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use health::Readiness;
pub use ingest::{IngestState, IngestTopic};

/// The gateway's router.
pub fn app(ingest: Arc<IngestState>, readiness: Readiness) -> Router {
    Router::new().merge(health::router(readiness)).merge(ingest::router(ingest))
}

/// Serves `app` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}
