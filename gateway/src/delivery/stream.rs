//! `GET /v1/stream`: the authenticated user's notifications as Server-Sent Events. Served by the
//! instance owning the user's partition; others answer 307 to the owner, or while nobody can serve
//! it 503 + `Retry-After` (EventSource clients: a 200 `retry:` stream that ends). `Last-Event-ID` resumes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use futures::stream;
use serde_json::json;

use super::hub::{CloseReason, Frame, Queued, SubscribeError, Subscription};
use super::{parse_position, Event, Hub, StreamState, Traced};
use crate::error::ApiError;

pub fn router(state: StreamState) -> Router {
    Router::new()
        .route("/v1/stream", get(open).options(super::browser::preflight))
        .layer(axum::middleware::from_fn_with_state(state.clone(), super::browser::cors))
        .with_state(state)
}

/// The answer to a stream request while this state passes (no owner yet, not ready, shutting
/// down, store out): 503 + `Retry-After`, or for a client that accepts `text/event-stream` (every
/// EventSource does) a 200 stream of `retry:` and an `unavailable` event that then ends, because
/// EventSource gives up for good on any other status but reconnects when a stream ends. No `id:`
/// line, so the browser keeps its Last-Event-ID.
fn retry_after(parts: &Parts, secs: u64, code: &'static str, message: String) -> Response {
    let event_stream = parts
        .headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.split(';').next().is_some_and(|t| t.trim() == "text/event-stream")));
    let mut r = if event_stream {
        let data = json!({ "code": code, "message": message });
        let mut r = Response::new(Body::from(format!("retry: {}\nevent: unavailable\ndata: {data}\n\n", secs * 1000)));
        r.headers_mut().extend(sse_headers());
        r
    } else {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message).into_response()
    };
    r.headers_mut().insert(RETRY_AFTER, HeaderValue::from(secs));
    r
}

/// Other parameters (`access_token`, cache busters) are ignored here.
#[derive(serde::Deserialize)]
struct Params {
    last_event_id: Option<String>,
}

async fn open(State(state): State<StreamState>, mut parts: Parts) -> Response {
    match open_subscription(&state, &mut parts).await {
        Ok(sub) => {
            let cursor = StreamCursor::new(sub, state.hub.clone());
            let body = stream::unfold(cursor, |mut c| async move {
                let mut out = Vec::new();
                c.next_chunk(&mut out).await.then(|| (Ok::<_, std::convert::Infallible>(Bytes::from(out)), c))
            });
            let mut r = Response::new(Body::from_stream(body));
            r.headers_mut().extend(sse_headers());
            r
        }
        Err(r) => r,
    }
}

/// The response headers of a stream.
pub fn sse_headers() -> [(HeaderName, HeaderValue); 3] {
    [
        (CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
        (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        // Tells nginx-style proxies not to buffer the stream.
        (HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no")),
    ]
}

/// Authenticates a stream request and registers its subscription, or returns the answer to give
/// instead (401, 422, 307 to the owner, a transient answer from [`retry_after`]). Shared by the axum
/// route and the gateway's direct stream path (see `crate::front`).
pub async fn open_subscription(state: &StreamState, parts: &mut Parts) -> Result<Subscription, Response> {
    let user = crate::auth::stream_user(parts, &state.auth).map_err(IntoResponse::into_response)?;
    let params = match Query::<Params>::try_from_uri(&parts.uri) {
        Ok(Query(p)) => p,
        Err(e) => {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_query", e.body_text()).into_response())
        }
    };
    let last_raw = parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(params.last_event_id)
        .filter(|s| !s.trim().is_empty());
    let last = match last_raw.as_deref().map(parse_position) {
        None => None,
        Some(Some(pos)) => Some(pos),
        Some(None) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_last_event_id",
                "Last-Event-ID is not an id this stream sent",
            )
            .into_response())
        }
    };
    match state.hub.subscribe(&user, last).await {
        Ok(sub) => Ok(sub),
        Err(SubscribeError::NotOwned(p)) => Err(match state.owners.owner(p) {
            Some(url) if url != state.owners.self_url() && !state.owners.may_redirect_to(&url) => {
                tracing::warn!(
                    "Partition {p}'s announced owner {url} is not on the redirect allow-list (--redirect-allow); \
                     answering 503 instead of redirecting there."
                );
                metrics::counter!("tidings_gateway_redirects_refused_total").increment(1);
                retry_after(parts, 1, "owner_not_allowed", format!("partition {p} has no allowed owner URL"))
            }
            Some(url) if url != state.owners.self_url() => {
                let mut location = format!("{}/v1/stream", url.trim_end_matches('/'));
                // Everything but the token: a Location header ends up in logs and browser history.
                // Names are compared decoded (`access%5Ftoken` is the token to the owner too).
                let query: Vec<&str> = parts
                    .uri
                    .query()
                    .unwrap_or("")
                    .split('&')
                    .filter(|kv| !kv.is_empty() && !crate::auth::is_token_param(kv))
                    .collect();
                if !query.is_empty() {
                    location.push('?');
                    location.push_str(&query.join("&"));
                }
                match HeaderValue::from_str(&location) {
                    Ok(v) => (StatusCode::TEMPORARY_REDIRECT, [(LOCATION, v)]).into_response(),
                    Err(_) => retry_after(parts, 1, "owner_unknown", format!("partition {p} has no usable owner URL")),
                }
            }
            _ => retry_after(parts, 1, "partition_unassigned", format!("partition {p} is being reassigned; retry")),
        }),
        Err(SubscribeError::NotReady(p)) => {
            Err(retry_after(parts, 1, "not_ready", format!("this gateway is not ready to serve partition {p} yet")))
        }
        Err(SubscribeError::Store(e)) if e.is_retriable() => Err(retry_after(
            parts,
            2,
            "store_unavailable",
            format!("the resume needs the store, which is unavailable: {e}"),
        )),
        Err(SubscribeError::Store(e)) => {
            tracing::error!(error = %e, "Resume from the store failed.");
            Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the resume failed").into_response())
        }
    }
}

/// One open stream as bytes to write: its backlog, then its queue, with heartbeats in silences.
pub struct StreamCursor {
    sub: Subscription,
    hub: Arc<Hub>,
    next_backlog: usize,
    /// A store range of the backlog being written, a page at a time.
    stored: Option<StoredRange>,
    done: bool,
    heartbeat: Duration,
    /// Fires `heartbeat` after the last write, re-armed only when it fires: a timer per event
    /// (insert and cancel in the shared wheel, per stream, 100,000 times a second in a broadcast)
    /// was most of the stream's own cost.
    beat: std::pin::Pin<Box<tokio::time::Sleep>>,
    last_write: tokio::time::Instant,
    retry_ms: u128,
}

/// Where a resume from the store stands: the page read and not yet written, and what is left.
struct StoredRange {
    /// The last offset read; the next page starts after it.
    after: i64,
    before: i64,
    page: std::collections::VecDeque<Arc<Event>>,
    more: bool,
    written: usize,
    /// The range ended with `reset` (which already says refetch everything), so no `resync`.
    reset: bool,
}

impl StreamCursor {
    pub fn new(sub: Subscription, hub: Arc<Hub>) -> Self {
        let cfg = hub.config();
        let (heartbeat, retry_ms) = (cfg.heartbeat, cfg.retry.as_millis());
        let beat = Box::pin(tokio::time::sleep(heartbeat));
        let last_write = tokio::time::Instant::now();
        StreamCursor { sub, hub, next_backlog: 0, stored: None, done: false, heartbeat, beat, last_write, retry_ms }
    }

    /// The next frame of the store range being written, reading its next page when the last one
    /// is written; `None` once the range is done. A resume longer than `max_store_resume` ends in
    /// `reset` (refetch the inbox) at the range's end; a store failure ends the stream with
    /// `reconnect`, so the client resumes from what it got.
    async fn next_stored(&mut self) -> Option<Frame> {
        let range = self.stored.as_mut()?;
        if range.page.is_empty() && range.more {
            if range.written >= self.hub.config().max_store_resume {
                range.more = false;
                range.reset = true;
                let id = super::position_id(self.sub.partition(), range.before.saturating_sub(1));
                return Some(Frame::Reset { id, reason: "position_too_old" });
            }
            // Cancel-safe: nothing changes until the page is in.
            match self.hub.stored_page(self.sub.user(), self.sub.partition(), range.after, range.before).await {
                Ok((mut page, more)) => {
                    let room = self.hub.config().max_store_resume - range.written;
                    // Past the limit, the next call answers `reset`.
                    range.more = more || page.len() > room;
                    page.truncate(room);
                    range.after = page.last().map_or(range.after, |e| e.offset);
                    range.page = page.into();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Reading a resume from the store failed; the client reconnects.");
                    range.more = false;
                    return Some(Frame::Close(CloseReason::StoreUnavailable));
                }
            }
        }
        match range.page.pop_front() {
            Some(e) => {
                range.written += 1;
                Some(Frame::Event(e))
            }
            None => {
                let resync = !range.reset;
                self.stored = None;
                resync.then_some(Frame::Resync)
            }
        }
    }

    /// Resolves when the hub aborted this stream (a slow client's queue overflowed).
    pub async fn aborted(&self) -> CloseReason {
        self.sub.conn.aborted().await
    }

    /// Appends the next SSE bytes to `out`: a frame, or a heartbeat comment after `heartbeat` of
    /// silence. False once the stream is over (after its closing frame). Cancel-safe: nothing is
    /// taken off the queue unless it is also written to `out`.
    pub async fn next_chunk(&mut self, out: &mut Vec<u8>) -> bool {
        if self.done {
            return false;
        }
        if let Some(frame) = self.next_stored().await {
            self.encode(frame, out);
            return true;
        }
        let frame = if self.next_backlog < self.sub.backlog.len() {
            self.next_backlog += 1;
            let f = std::mem::replace(&mut self.sub.backlog[self.next_backlog - 1], Frame::Hello { id: None });
            if self.next_backlog == self.sub.backlog.len() {
                self.sub.backlog = Vec::new();
                self.next_backlog = 0;
            }
            if let Frame::Stored { after, before } = f {
                self.stored =
                    Some(StoredRange { after, before, page: Default::default(), more: true, written: 0, reset: false });
                return match self.next_stored().await {
                    Some(frame) => {
                        self.encode(frame, out);
                        true
                    }
                    // Nothing stored in the range: go on with the backlog (an empty chunk).
                    None => true,
                };
            }
            f
        } else {
            let conn = self.sub.conn.clone();
            loop {
                tokio::select! {
                    biased;
                    reason = conn.aborted() => break Frame::Close(reason),
                    f = self.sub.rx.recv() => match f {
                        Some(f) => {
                            if let Queued::Event(e) = &f {
                                self.hub.dequeued(&self.sub.conn, e);
                            }
                            break f.into();
                        }
                        None => return false,
                    },
                    _ = self.beat.as_mut() => {
                        let now = tokio::time::Instant::now();
                        let due = self.last_write + self.heartbeat;
                        if now < due {
                            self.beat.as_mut().reset(due);
                            continue;
                        }
                        out.extend_from_slice(b": hb\n\n");
                        self.wrote(now);
                        return true;
                    }
                }
            }
        };
        self.encode(frame, out);
        self.wrote(tokio::time::Instant::now());
        true
    }

    /// Notes a write at `now`: the next heartbeat is due `heartbeat` later.
    fn wrote(&mut self, now: tokio::time::Instant) {
        self.last_write = now;
        if self.beat.is_elapsed() {
            self.beat.as_mut().reset(now + self.heartbeat);
        }
    }

    // SSE framing is a few `field: value` lines; written here because the gateway's direct stream
    // path (crate::front) writes these bytes to the socket itself, without a framework's buffers.
    fn encode(&mut self, frame: Frame, out: &mut Vec<u8>) {
        use std::io::Write;
        match frame {
            Frame::Hello { id } => {
                let _ = write!(out, "retry: {}\n: tidings\n", self.retry_ms);
                if let Some(id) = id {
                    let _ = writeln!(out, "id: {id}");
                }
            }
            Frame::Event(e) => {
                // The write's span, only for an event whose record was traced.
                let _write = e.trace.as_ref().map(|t| write_span(&e, t).entered());
                self.hub.delivered();
                if let Some(c) = &e.campaign {
                    c.wrote();
                }
                let _ = write!(out, "id: {}.{}\nevent: ", e.partition, e.offset);
                // A field value cannot hold a line break; kinds come from topology.yaml.
                out.extend(e.kind.bytes().filter(|b| *b != b'\n' && *b != b'\r'));
                out.extend_from_slice(b"\ndata: ");
                // Compact JSON: line breaks inside strings are escaped, so one `data:` line.
                out.extend_from_slice(&e.data);
                out.push(b'\n');
            }
            Frame::Reset { id, reason } => {
                let data = json!({ "reason": reason, "refetch": "/v1/notifications" });
                let _ = write!(out, "id: {id}\nevent: reset\ndata: {data}\n");
            }
            // Turned into a range by `next_chunk` before it gets here.
            Frame::Stored { .. } => return,
            Frame::Resync => {
                let data = json!({ "reason": "chat_not_stored", "refetch": ["/v1/rooms"] });
                let _ = write!(out, "event: resync\ndata: {data}\n");
            }
            Frame::Close(reason) => {
                self.done = true;
                let data = json!({ "reason": reason.as_str() });
                let _ = write!(out, "event: {}\nretry: {}\ndata: {data}\n", reason.event_name(), self.retry_ms);
            }
        }
        out.push(b'\n');
    }
}

/// The span of one stream's write of a traced event: the SSE framing into the stream's buffer,
/// which the connection writes to its socket right after.
fn write_span(e: &Event, t: &Traced) -> tracing::Span {
    let span = tracing::debug_span!(
        parent: None,
        "sse write",
        messaging.destination.partition.id = %e.partition,
        messaging.kafka.offset = e.offset,
    );
    match t {
        Traced::Child(r) => r.parent_of(&span),
        Traced::Linked(r) => r.link_from(&span),
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::events::event_from_notification;
    use crate::delivery::events::tests::with_data;

    /// The heartbeat comes after a whole interval of silence: an event in between moves it.
    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_follows_a_full_interval_of_silence() {
        let cfg = crate::delivery::HubConfig { heartbeat: Duration::from_secs(10), ..Default::default() };
        let hub = Hub::new(cfg, None);
        hub.set_partition_count(1);
        hub.assign(0, 0, 0);
        let sub = hub.subscribe("ann", None).await.unwrap();
        let mut cursor = StreamCursor::new(sub, hub.clone());
        let mut out = Vec::new();
        assert!(cursor.next_chunk(&mut out).await);
        assert!(out.starts_with(b"retry:"), "the opening frame first");
        tokio::time::sleep(Duration::from_secs(6)).await;
        let mut ev = with_data(None);
        ev.user_id = "ann".into();
        hub.push(event_from_notification(0, 0, &ev, 0));
        out.clear();
        assert!(cursor.next_chunk(&mut out).await);
        assert!(out.starts_with(b"id: 0.0\n"), "{}", String::from_utf8_lossy(&out));
        // 10 s after the start but only 4 s after the event: no heartbeat yet.
        out.clear();
        let early = tokio::time::timeout(Duration::from_secs(9), cursor.next_chunk(&mut out)).await;
        assert!(early.is_err(), "a heartbeat {} too early", String::from_utf8_lossy(&out));
        out.clear();
        let t = tokio::time::Instant::now();
        assert!(cursor.next_chunk(&mut out).await);
        assert_eq!(out, b": hb\n\n");
        assert!(t.elapsed() <= Duration::from_secs(1), "10 s after the event");
        // And the next one a full interval later.
        out.clear();
        let t = tokio::time::Instant::now();
        assert!(cursor.next_chunk(&mut out).await);
        assert_eq!((out.as_slice(), t.elapsed()), (&b": hb\n\n"[..], Duration::from_secs(10)));
    }
}
