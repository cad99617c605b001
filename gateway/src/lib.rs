//! The HTTP gateway: health and readiness, and JSON event ingest for services that do not speak
//! Kafka. (SSE delivery per owned partition builds on this router.)
//!
//! - `ingest`: `POST /v1/events/{topic}` validates JSON against the registered schema and produces Avro.
//! - `health`: `/healthz` (process up) and `/readyz` (stages running).
//! - `auth`: JWT verification and the `AuthUser` extractor for user-facing endpoints.
//! - `inbox`: `GET /v1/notifications`, `GET /v1/notifications/unread_count`,
//!   `POST /v1/notifications/{id}/read` for the token's user.

pub mod auth;
pub mod health;
pub mod inbox;
pub mod ingest;

use axum::Router;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub use auth::{AuthConfig, AuthUser};
pub use health::Readiness;
pub use inbox::InboxState;
pub use ingest::{IngestState, IngestTopic};

/// The gateway's router: health always, ingest and the inbox when given (tests serve just a part).
pub fn app(ingest: Option<Arc<IngestState>>, inbox: Option<InboxState>, readiness: Readiness) -> Router {
    let mut router = Router::new().merge(health::router(readiness));
    if let Some(ingest) = ingest {
        router = router.merge(ingest::router(ingest));
    }
    if let Some(inbox) = inbox {
        router = router.merge(inbox::router(inbox));
    }
    router
}

/// Serves `app` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}
