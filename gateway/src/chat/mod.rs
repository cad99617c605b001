//! The chat API for users with a token: direct inquiry rooms (one per product and buyer) and public
//! group rooms found by tags, membership, messages, history and read positions. Rooms and
//! membership are written to the store here and nowhere else; every change then becomes an event on
//! `chat` keyed by room (the room's order is its partition's order, a message's offset its seq),
//! produced by the gateway itself and answered after the broker's acknowledgement.

mod messages;
mod rooms;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::StatusCode;
use axum::routing::{get, patch, post};
use axum::Router;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;
use tidings_sinks::store::chat::{Room, StoredMessage};
use tidings_sinks::Store;

use crate::auth::AuthConfig;
use crate::ingest::ApiError;
use crate::produce::{EventProducer, Produced};

/// Chat settings, with their defaults.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Physical `chat` topic.
    pub topic: String,
    /// The persistence stage's group: its stored offsets say how far history is complete.
    pub persistence_group: String,
    /// Physical notifications topic and its partition count, for the stream position a history
    /// page is consistent with.
    pub notifications_topic: String,
    /// Longest message text in bytes (413 beyond). Default 4,000.
    pub max_text_bytes: usize,
    /// How long after sending its sender may edit or delete a message. Default 15 minutes.
    pub edit_window: Duration,
    /// Messages a user may send per second, sustained, and in a burst. Default 5 and 20.
    pub send_rate: (u32, u32),
    /// How long a history read waits for the store to catch up with the room. Default 3 s.
    pub history_wait: Duration,
}

impl ChatConfig {
    pub fn new(topic: String, persistence_group: String, notifications_topic: String) -> Self {
        ChatConfig {
            topic,
            persistence_group,
            notifications_topic,
            max_text_bytes: 4_000,
            edit_window: Duration::from_secs(15 * 60),
            send_rate: (5, 20),
            history_wait: Duration::from_secs(3),
        }
    }
}

/// Shared state of the chat endpoints.
#[derive(Clone)]
pub struct ChatState {
    pub store: Store,
    pub auth: Arc<AuthConfig>,
    pub events: Arc<EventProducer>,
    pub cfg: Arc<ChatConfig>,
    /// Watermarks of the chat and notifications partitions, for consistent history pages.
    pub kafka: Arc<rdkafka::consumer::BaseConsumer>,
    limiter: Arc<DefaultKeyedRateLimiter<String>>,
}

impl FromRef<ChatState> for Arc<AuthConfig> {
    fn from_ref(s: &ChatState) -> Self {
        s.auth.clone()
    }
}

impl ChatState {
    pub fn new(
        store: Store,
        auth: Arc<AuthConfig>,
        events: Arc<EventProducer>,
        cfg: ChatConfig,
        kafka: rdkafka::consumer::BaseConsumer,
    ) -> Self {
        let (per_second, burst) = cfg.send_rate;
        let quota = Quota::per_second(NonZeroU32::new(per_second.max(1)).expect("non-zero"))
            .allow_burst(NonZeroU32::new(burst.max(1)).expect("non-zero"));
        ChatState {
            store,
            auth,
            events,
            cfg: Arc::new(cfg),
            kafka: Arc::new(kafka),
            limiter: Arc::new(RateLimiter::keyed(quota)),
        }
    }

    /// Produces a chat event for `room_id` (its key) with `payload` under `branch`, now.
    async fn emit(&self, room_id: &str, branch: &str, payload: Value) -> Result<Produced, ApiError> {
        self.emit_at(room_id, branch, payload, now_micros()).await
    }

    /// Like [`Self::emit`], with the event's `occurred_at` (microseconds) given.
    async fn emit_at(&self, room_id: &str, branch: &str, payload: Value, at: i64) -> Result<Produced, ApiError> {
        // A message's event id follows from its id: a send retried with the same `client_id` after a
        // lost answer produces the same event again, whose copies carry the same notification ids,
        // so each stream drops the repeat (the history keeps one row by message id anyway).
        let event_id = match (branch, payload.get("message_id").and_then(Value::as_str)) {
            ("MessageSent", Some(id)) => uuid::Uuid::new_v5(&SENT_EVENTS, id.as_bytes()),
            _ => uuid::Uuid::new_v4(),
        };
        let event = json!({
            "event_id": event_id.to_string(),
            "occurred_at": at,
            "room_id": room_id,
            "payload": { branch: payload },
        });
        self.events.produce(&self.cfg.topic, Some(room_id), &event, None).await
    }

    /// The room, or 404.
    async fn room(&self, room_id: &str) -> Result<Room, ApiError> {
        self.store.room(room_id).await?.ok_or_else(not_found)
    }

    /// 429 with `Retry-After` once `user` sends faster than the configured rate.
    fn check_rate(&self, user: &str) -> Result<(), ApiError> {
        // The limiter keeps one small cell per user who sent recently; prune the idle ones now and then.
        if self.limiter.len() > 100_000 {
            self.limiter.retain_recent();
        }
        match self.limiter.check_key(&user.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait =
                    not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                Err(ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many messages; slow down")
                    .with_retry_after(wait.as_secs().max(1)))
            }
        }
    }
}

pub fn router(state: ChatState) -> Router {
    Router::new()
        .route("/v1/rooms", post(rooms::create).get(rooms::mine))
        .route("/v1/rooms/search", get(rooms::search))
        .route("/v1/rooms/{id}", get(rooms::details))
        .route("/v1/rooms/{id}/members", post(rooms::join))
        .route("/v1/rooms/{id}/members/me", axum::routing::delete(rooms::leave))
        .route("/v1/rooms/{id}/close", post(rooms::close))
        .route("/v1/rooms/{id}/messages", post(messages::post).get(messages::history))
        .route("/v1/rooms/{id}/messages/{message_id}", patch(messages::edit).delete(messages::delete))
        .route("/v1/rooms/{id}/read", post(messages::read))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Namespace of the event ids of sent messages (derived from the message id).
const SENT_EVENTS: uuid::Uuid = uuid::Uuid::from_u128(0x5e7a_0c93_2b1d_4f68_8a4e_c3b9_17d2_60f5);

/// Largest request body of the chat API (a message is limited separately, and more tightly).
const MAX_BODY_BYTES: usize = 64 * 1024;

pub(crate) fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn rfc3339(micros: i64) -> Option<String> {
    chrono::DateTime::from_timestamp_micros(micros).map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
}

fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "room_not_found", "no such room")
}

fn not_a_member() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "not_a_member", "only the room's members may do this")
}

fn room_json(r: &Room) -> Value {
    json!({
        "room_id": r.room_id, "kind": r.kind, "name": r.name, "tags": r.tags, "product_id": r.product_id,
        "creator_id": r.creator_id, "closed": r.closed, "members": r.members, "created_at": rfc3339(r.created_at),
    })
}

fn message_json(m: &StoredMessage) -> Value {
    json!({
        "message_id": m.message_id, "room_id": m.room_id, "seq": m.seq, "sender_id": m.sender_id,
        "text": m.text, "occurred_at": rfc3339(m.occurred_at), "edited": m.edited, "deleted": m.deleted,
    })
}

/// A JSON body whose every failure answers in the API's error shape: 413 past the size limit, 422
/// for bad JSON or fields that do not fit.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("bodies are limited to {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::new(StatusCode::BAD_REQUEST, "unreadable_body", e.body_text())
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.to_string()))
    }
}
