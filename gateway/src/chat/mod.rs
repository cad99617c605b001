//! The chat API for users with a token: direct inquiry rooms (one per product and buyer) and public
//! group rooms found by tags, membership, messages, history and read positions. Rooms and
//! membership are written to the store here and nowhere else; every change then becomes an event on
//! `chat` keyed by room (the room's order is its partition's order, a message's offset its seq),
//! produced by the gateway itself (through the outbox for store changes) and answered after the
//! broker's acknowledgement. Every write spends from the user's budget (see [`ChatConfig`]).

mod limits;
mod messages;
mod outbox;
mod rooms;

pub use outbox::ChatEvents;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::StatusCode;
use axum::routing::{get, patch, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tidings_store::chat::{Room, StoredMessage};
use tidings_store::Store;

use crate::auth::AuthConfig;
use crate::error::ApiError;
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
    /// The write budget every change (send, edit, delete, read mark, join, leave, close, create)
    /// spends from, per user: tokens per second and burst. Default 10 and 40.
    pub write_rate: (f64, u32),
    /// A change fanning out to a room's members costs `1 + members / fanout_per_token` tokens
    /// (at most the burst). Default 100: a 2-member room costs 1, a 1,000-member one 11.
    pub fanout_per_token: u64,
    /// New direct inquiries per buyer, and per buyer and seller, per `inquiry_window` (all at once,
    /// then refilled evenly over the window). Default 20 and 5 per hour.
    pub inquiries_per_buyer: u32,
    pub inquiries_per_pair: u32,
    pub inquiry_window: Duration,
    /// History pages a user may read per second, sustained, and in a burst. Default 5 and 20.
    pub history_rate: (f64, u32),
    /// Largest (and default) page of `GET /v1/rooms`. Default 200.
    pub rooms_page: u32,
    /// Users (and buyer–seller pairs) each budget remembers at most; past it the idle and then the
    /// least recently active are forgotten (their budget starts full again). Default 100,000.
    pub tracked_users: usize,
    /// How often the outbox relay looks for events a request did not produce, and how old they
    /// must be (longer than a request's own produce may take). Default 1 s and 10 s.
    pub outbox_interval: Duration,
    pub outbox_grace: Duration,
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
            write_rate: (10.0, 40),
            fanout_per_token: 100,
            inquiries_per_buyer: 20,
            inquiries_per_pair: 5,
            inquiry_window: Duration::from_secs(3600),
            history_rate: (5.0, 20),
            rooms_page: 200,
            tracked_users: 100_000,
            outbox_interval: Duration::from_secs(1),
            outbox_grace: Duration::from_secs(10),
        }
    }
}

/// Shared state of the chat endpoints.
#[derive(Clone)]
pub struct ChatState {
    pub store: Store,
    pub auth: Arc<AuthConfig>,
    pub events: Arc<dyn ChatEvents>,
    pub cfg: Arc<ChatConfig>,
    /// Watermarks of the chat and notifications partitions, for consistent history pages.
    pub kafka: Arc<rdkafka::consumer::BaseConsumer>,
    outbox: Arc<outbox::Outbox>,
    budgets: Arc<Budgets>,
}

/// The per-user budgets, each bounded to `tracked_users` keys.
struct Budgets {
    sends: limits::Buckets,
    writes: limits::Buckets,
    history: limits::Buckets,
    inquiries: limits::Buckets,
    pairs: limits::Buckets,
}

impl FromRef<ChatState> for Arc<AuthConfig> {
    fn from_ref(s: &ChatState) -> Self {
        s.auth.clone()
    }
}

impl ChatState {
    /// The chat API producing with `events`. Starts the outbox relay when called on a Tokio runtime;
    /// it stops once the state is dropped.
    pub fn new(
        store: Store,
        auth: Arc<AuthConfig>,
        events: Arc<EventProducer>,
        cfg: ChatConfig,
        kafka: rdkafka::consumer::BaseConsumer,
    ) -> Self {
        Self::with_events(store, auth, events, cfg, kafka)
    }

    /// [`Self::new`] with any [`ChatEvents`].
    pub fn with_events(
        store: Store,
        auth: Arc<AuthConfig>,
        events: Arc<dyn ChatEvents>,
        cfg: ChatConfig,
        kafka: rdkafka::consumer::BaseConsumer,
    ) -> Self {
        use limits::{Buckets, Rate};
        let users = cfg.tracked_users;
        let (sends, burst) = cfg.send_rate;
        let budgets = Budgets {
            sends: Buckets::new(Rate::per_second(f64::from(sends.max(1)), burst), users),
            writes: Buckets::new(Rate::per_second(cfg.write_rate.0, cfg.write_rate.1), users),
            history: Buckets::new(Rate::per_second(cfg.history_rate.0, cfg.history_rate.1), users),
            inquiries: Buckets::new(Rate::per_window(cfg.inquiries_per_buyer, cfg.inquiry_window), users),
            pairs: Buckets::new(Rate::per_window(cfg.inquiries_per_pair, cfg.inquiry_window), users),
        };
        let outbox = Arc::new(outbox::Outbox::new(store.clone(), events.clone(), cfg.topic.clone()));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(outbox::relay(Arc::downgrade(&outbox), cfg.outbox_interval, cfg.outbox_grace));
        }
        ChatState {
            store,
            auth,
            events,
            cfg: Arc::new(cfg),
            kafka: Arc::new(kafka),
            outbox,
            budgets: Arc::new(budgets),
        }
    }

    /// A chat event for `room_id` with `payload` under `branch`, occurring now, as JSON text for
    /// the outbox.
    fn event(&self, room_id: &str, branch: &str, payload: Value) -> String {
        event_json(room_id, branch, payload, now_micros(), uuid::Uuid::new_v4()).to_string()
    }

    /// Produces the outbox's events of `room_id` (the request's own and any a failed produce
    /// left); 503 with `Retry-After` while the broker fails (the events stay for a retry or the
    /// relay). Answers the produced events.
    async fn flush(&self, room_id: &str) -> Result<Vec<Value>, ApiError> {
        self.outbox.flush(room_id).await.map_err(|e| {
            if e.status() == StatusCode::SERVICE_UNAVAILABLE {
                e.with_retry_after(1)
            } else {
                e
            }
        })
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
        let event = event_json(room_id, branch, payload, at, event_id);
        self.events.produce(&self.cfg.topic, room_id, &event).await
    }

    /// The room, or 404.
    async fn room(&self, room_id: &str) -> Result<Room, ApiError> {
        self.store.room(room_id).await?.ok_or_else(not_found)
    }

    /// 429 with `Retry-After` once `user` sends faster than the configured rate.
    fn check_rate(&self, user: &str) -> Result<(), ApiError> {
        self.budgets
            .sends
            .take(user, 1.0)
            .map_err(|wait| too_many("rate_limited", "too many messages; slow down", wait))
    }

    /// Spends a change's cost from `user`'s write budget: 1, plus 1 per `fanout_per_token`
    /// members it reaches. 429 with `Retry-After` when the budget is spent.
    fn spend_write(&self, user: &str, members: u64) -> Result<(), ApiError> {
        let cost = 1 + members / self.cfg.fanout_per_token.max(1);
        self.budgets
            .writes
            .take(user, cost as f64)
            .map_err(|wait| too_many("write_rate_limited", "too many chat changes; slow down", wait))
    }

    /// Spends one history read of `user`'s budget (429 beyond).
    fn spend_history(&self, user: &str) -> Result<(), ApiError> {
        self.budgets
            .history
            .take(user, 1.0)
            .map_err(|wait| too_many("history_rate_limited", "too many history reads; slow down", wait))
    }

    /// Spends one new direct inquiry of `buyer`'s and of the (buyer, seller) pair's budgets (429
    /// beyond; a refused one costs neither).
    fn spend_inquiry(&self, buyer: &str, seller: &str) -> Result<(), ApiError> {
        let pair = format!("{buyer}\0{seller}");
        self.budgets.inquiries.take_both(buyer, &self.budgets.pairs, &pair, 1.0).map_err(|wait| {
            too_many("inquiry_limit", "too many new inquiries; ask again later or use an existing one", wait)
        })
    }
}

fn too_many(code: &'static str, message: &str, wait: Duration) -> ApiError {
    ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        .with_retry_after(wait.as_secs_f64().ceil().max(1.0) as u64)
}

/// A chat event as produced to `chat`.
fn event_json(room_id: &str, branch: &str, payload: Value, at: i64, event_id: uuid::Uuid) -> Value {
    json!({
        "event_id": event_id.to_string(),
        "occurred_at": at,
        "room_id": room_id,
        "payload": { branch: payload },
    })
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
