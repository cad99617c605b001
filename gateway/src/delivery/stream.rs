//! `GET /v1/stream`: the authenticated user's notifications as Server-Sent Events. Served by the
//! instance owning the user's partition; others answer 307 to the owner (or 503 with
//! `Retry-After` while nobody owns it). `Last-Event-ID` (header or `last_event_id` query) resumes.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRef, Query, RawQuery, State};
use axum::http::header::{CACHE_CONTROL, LOCATION, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::stream::{self, Stream};
use serde_json::json;
use tidings_core::Notification;

use super::hub::{Frame, SubscribeError, Subscription};
use super::{parse_position, Event, Hub, Owners};
use crate::auth::{AuthConfig, AuthUser};
use crate::ingest::ApiError;

/// Shared state of the stream endpoint.
#[derive(Clone)]
pub struct StreamState {
    pub hub: Arc<Hub>,
    pub owners: Arc<Owners>,
    pub auth: Arc<AuthConfig>,
}

impl FromRef<StreamState> for Arc<AuthConfig> {
    fn from_ref(s: &StreamState) -> Self {
        s.auth.clone()
    }
}

pub fn router(state: StreamState) -> Router {
    Router::new().route("/v1/stream", get(open)).with_state(state)
}

/// The JSON body of a notification, shared by the stream (`data:`) and the inbox.
pub fn notification_json(n: &Notification, position: Option<(i32, i64)>) -> serde_json::Map<String, serde_json::Value> {
    let occurred_at = chrono::DateTime::from_timestamp_micros(n.occurred_at)
        .map(|t| serde_json::Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)))
        .unwrap_or(serde_json::Value::Null);
    let mut m = serde_json::Map::new();
    m.insert("id".into(), n.notification_id.hyphenated().to_string().into());
    m.insert("kind".into(), n.kind.clone().into());
    m.insert("title".into(), n.title.clone().into());
    m.insert("body".into(), n.body.clone().into());
    m.insert("link".into(), n.link.clone().into());
    m.insert("occurred_at".into(), occurred_at);
    m.insert("source_event_id".into(), n.source_event_id.clone().into());
    if let Some((p, o)) = position {
        m.insert("position".into(), super::position_id(p, o).into());
    }
    m
}

/// The delivered form of a notification at a stream position.
pub fn event_from_notification(partition: i32, offset: i64, n: &Notification, timestamp_ms: i64) -> Event {
    let mut data = serde_json::to_vec(&notification_json(n, Some((partition, offset)))).expect("JSON map serializes");
    // The vector grew by doubling; rings and queues account by length, so hold no more than that.
    data.shrink_to_fit();
    Event::new(partition, offset, &n.user_id, &n.kind, data.into(), timestamp_ms)
}

fn retry_after(secs: u64, code: &'static str, message: String) -> Response {
    let mut r = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).into_response();
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// Other parameters (`access_token`, cache busters) are ignored here.
#[derive(serde::Deserialize)]
struct Params {
    last_event_id: Option<String>,
}

async fn open(
    State(state): State<StreamState>,
    AuthUser(user): AuthUser,
    headers: HeaderMap,
    RawQuery(raw_query): RawQuery,
    params: Result<Query<Params>, QueryRejection>,
) -> Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => {
            return ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_query", e.body_text()).into_response()
        }
    };
    let last_raw = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(params.last_event_id)
        .filter(|s| !s.trim().is_empty());
    let last = match last_raw.as_deref().map(parse_position) {
        None => None,
        Some(Some(pos)) => Some(pos),
        Some(None) => {
            return ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_last_event_id",
                "Last-Event-ID is not an id this stream sent",
            )
            .into_response()
        }
    };
    match state.hub.subscribe(&user, last).await {
        Ok(sub) => sse(sub, state.hub.clone()),
        Err(SubscribeError::NotOwned(p)) => match state.owners.owner(p) {
            Some(url) if url != state.owners.self_url() => {
                let mut location = format!("{}/v1/stream", url.trim_end_matches('/'));
                if let Some(q) = raw_query.filter(|q| !q.is_empty()) {
                    location.push('?');
                    location.push_str(&q);
                }
                match HeaderValue::from_str(&location) {
                    Ok(v) => (StatusCode::TEMPORARY_REDIRECT, [(LOCATION, v)]).into_response(),
                    Err(_) => retry_after(1, "owner_unknown", format!("partition {p} has no usable owner URL")),
                }
            }
            _ => retry_after(1, "partition_unassigned", format!("partition {p} is being reassigned; retry")),
        },
        Err(SubscribeError::NotReady(p)) => {
            retry_after(1, "not_ready", format!("this gateway is not ready to serve partition {p} yet"))
        }
        Err(SubscribeError::Store(e)) if e.is_retriable() => {
            retry_after(2, "store_unavailable", format!("the resume needs the store, which is unavailable: {e}"))
        }
        Err(SubscribeError::Store(e)) => {
            tracing::error!(error = %e, "Resume from the store failed.");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the resume failed").into_response()
        }
    }
}

fn sse(sub: Subscription, hub: Arc<Hub>) -> Response {
    let cfg = hub.config().clone();
    let body = frames(sub, hub, cfg.retry);
    let mut r = Sse::new(body).keep_alive(KeepAlive::new().interval(cfg.heartbeat).text("hb")).into_response();
    r.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

struct StreamCursor {
    sub: Subscription,
    hub: Arc<Hub>,
    next_backlog: usize,
    done: bool,
}

fn frames(
    sub: Subscription,
    hub: Arc<Hub>,
    retry: Duration,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    let cursor = StreamCursor { sub, hub, next_backlog: 0, done: false };
    stream::unfold(cursor, move |mut c| async move {
        if c.done {
            return None;
        }
        let frame = if c.next_backlog < c.sub.backlog.len() {
            c.next_backlog += 1;
            let f = c.sub.backlog[c.next_backlog - 1].clone();
            if c.next_backlog == c.sub.backlog.len() {
                c.sub.backlog = Vec::new();
                c.next_backlog = 0;
            }
            f
        } else {
            let conn = c.sub.conn.clone();
            tokio::select! {
                biased;
                reason = conn.aborted() => Frame::Close(reason),
                f = c.sub.rx.recv() => match f {
                    Some(f) => {
                        if let Frame::Event(e) = &f {
                            c.sub.conn.dequeued(e);
                        }
                        f
                    }
                    None => return None,
                },
            }
        };
        let event = match frame {
            Frame::Hello { id } => {
                let e = SseEvent::default().retry(retry).comment("tidings");
                match id {
                    Some(id) => e.id(id),
                    None => e,
                }
            }
            Frame::Event(e) => {
                c.hub.delivered(&e);
                SseEvent::default().id(e.id()).event(&*e.kind).data(std::str::from_utf8(&e.data).unwrap_or("{}"))
            }
            Frame::Reset { id, reason } => SseEvent::default()
                .id(id)
                .event("reset")
                .data(json!({ "reason": reason, "refetch": "/v1/notifications" }).to_string()),
            Frame::Close(reason) => {
                c.done = true;
                SseEvent::default()
                    .event(reason.event_name())
                    .retry(retry)
                    .data(json!({ "reason": reason.as_str() }).to_string())
            }
        };
        Some((Ok(event), c))
    })
}
