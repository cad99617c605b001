//! The HTTP gateway: SSE delivery of each user's notifications from the partitions this instance
//! owns, the inbox, JSON event ingest for services that do not speak Kafka, health and metrics.
//!
//! - `delivery`: the per-partition delivery stage and `GET /v1/stream`.
//! - `ingest`: `POST /v1/events/{topic}` (services only, on its own listener) validates JSON against
//!   the registered schema and produces Avro; `service_auth` checks the service credential.
//! - `health`: `/healthz` (process up) and `/readyz` (stages running).
//! - `auth`: JWT verification and the `AuthUser` extractor for user-facing endpoints.
//! - `delivery::browser` (also `browser`): the stream's session cookie (`/v1/session`) and CORS, for
//!   plain EventSource clients.
//! - `inbox`: `GET /v1/notifications` (`?archived=true`: the archive), `GET
//!   /v1/notifications/unread_count`, `POST /v1/notifications/{id}/read|archive|unarchive` and
//!   `POST /v1/notifications/read_all` for the token's user.
//! - `preferences`: `GET`/`PUT /v1/me/preferences` (opted-out categories, time zone, quiet hours).
//! - `chat`: rooms, membership, messages, history and read positions (`/v1/rooms…`) for users.
//! - `coupons`: coupon definitions, claims and redemptions (`/v1/coupons…`), answered with the
//!   claim stage's decisions.
//! - `produce`: JSON → Avro → Kafka, shared by ingest and chat.
//! - `segments`: campaign audiences for services (`/v1/segments…`, a service token).
//! - `campaigns`: campaign launches, dry runs, status and cancels for services (`/v1/campaigns…`).
//! - `metrics`: Prometheus `/metrics`.
//! - `status`: `GET /v1/status` (the system's state, for services and admin users).
//! - `error`: `ApiError`, the JSON error answer every endpoint gives.
//! - `web`: the web page at `/` (files compiled in), its `/config.json`, and in dev mode
//!   `POST /v1/dev/token`.

pub mod auth;
pub mod campaigns;
pub mod chat;
pub mod coupons;
pub mod delivery;
pub mod error;
pub mod front;
pub mod health;
pub mod inbox;
pub mod ingest;
pub mod metrics;
pub mod preferences;
pub mod produce;
pub mod segments;
pub mod service_auth;
pub mod status;
pub mod web;

use axum::Router;
use std::sync::Arc;
pub use tidings_core::http::Limits;
use tokio_util::sync::CancellationToken;

pub use auth::{AuthConfig, AuthUser};
/// The stream's browser side (cookie, CORS), also at its former path.
pub use delivery::browser;
pub use delivery::StreamState;
pub use health::Readiness;
pub use inbox::InboxState;
pub use ingest::{IngestState, IngestTopic};

/// The parts of the public gateway a process serves; health and metrics are always there.
#[derive(Default)]
pub struct Parts {
    pub inbox: Option<InboxState>,
    pub chat: Option<chat::ChatState>,
    pub coupons: Option<coupons::CouponState>,
    pub stream: Option<StreamState>,
    /// `/metrics` is served on a listener of its own ([`metrics_app`]), not here.
    pub metrics_elsewhere: bool,
    /// The web page at `/` (and dev sign-in, when its config says so).
    pub web: Option<web::WebConfig>,
    /// Campaign audiences for services.
    pub segments: Option<Arc<segments::SegmentsState>>,
    /// Each user's notification preferences.
    pub preferences: Option<preferences::PreferencesState>,
    /// Campaigns for services.
    pub campaigns: Option<Arc<campaigns::CampaignsState>>,
    /// `GET /v1/status` for services and admin users.
    pub status: Option<status::StatusState>,
}

/// The public gateway's router (browsers): health and metrics always, the other parts when given.
/// Ingest is not among them: it has its own listener ([`ingest_app`]).
pub fn app(parts: Parts, readiness: Readiness) -> Router {
    let Parts { inbox, chat, coupons, stream, metrics_elsewhere, web, segments, preferences, campaigns, status } =
        parts;
    let mut router = Router::new().merge(health::router(readiness));
    if !metrics_elsewhere {
        router = router.merge(metrics::router());
    }
    // Every route is under the listener's request timeout: `serve` puts it around the whole router.
    if let Some(stream) = stream {
        router =
            router.merge(delivery::stream::router(stream.clone())).merge(delivery::browser::session_router(stream));
    }
    if let Some(chat) = chat {
        router = router.merge(chat::router(chat));
    }
    if let Some(coupons) = coupons {
        router = router.merge(coupons::router(coupons));
    }
    if let Some(inbox) = inbox {
        router = router.merge(inbox::router(inbox));
    }
    if let Some(web) = web {
        router = router.merge(web::router(web));
    }
    if let Some(segments) = segments {
        router = router.merge(segments::router(segments));
    }
    if let Some(preferences) = preferences {
        router = router.merge(preferences::router(preferences));
    }
    if let Some(campaigns) = campaigns {
        router = router.merge(campaigns::router(campaigns));
    }
    if let Some(status) = status {
        router = router.merge(status::router(status));
    }
    router
}

/// A metrics-only router, for `--metrics-listen` (e.g. a port only the Prometheus scraper reaches).
pub fn metrics_app() -> Router {
    metrics::router()
}

/// The ingest listener's router (services): `POST /v1/events/{topic}` and health.
pub fn ingest_app(ingest: Arc<IngestState>, readiness: Readiness) -> Router {
    Router::new().merge(health::router(readiness)).merge(ingest::router(ingest))
}

/// Binds the gateway's listener. `send_buffer` fixes each connection's kernel send buffer
/// (`SO_SNDBUF`, inherited by accepted sockets), which also turns off its autotuning: without it a
/// stalled SSE client can park megabytes per connection in the kernel before our own bounded
/// queue ever sees back-pressure.
pub fn bind(addr: std::net::SocketAddr, send_buffer: Option<u32>) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if let Some(size) = send_buffer {
        socket.set_send_buffer_size(size)?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Serves `app` on `listener` until `shutdown` is cancelled (every request through axum), within
/// `limits` (timeouts, connection caps; see [`Limits`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let accept = tidings_core::http::Capped::new(listener, limits.clone());
    tidings_core::http::serve(accept, app, limits, shutdown).await
}

/// Serves `app` on `listener` with streams of `stream` written straight to their sockets (see
/// `front`), within `limits` (streams too: connection caps, write timeout), until `shutdown` is
/// cancelled; then waits for open streams to send their last event.
pub async fn serve_gateway(
    listener: tokio::net::TcpListener,
    app: Router,
    stream: Option<StreamState>,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let streams = tokio_util::task::TaskTracker::new();
    let front = front::front(listener, stream, limits.clone(), shutdown.clone(), streams.clone())?;
    tidings_core::http::serve(front, app, limits, shutdown).await?;
    streams.close();
    streams.wait().await;
    Ok(())
}
