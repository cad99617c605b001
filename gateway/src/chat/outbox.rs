//! The chat outbox: a room or membership change is written with its event in one transaction, and
//! the event is produced from there (by the request, by a retry of it, or by the relay after a
//! grace time), then deleted. A failed produce or a crash thus delays the event but never loses it.

use futures::future::BoxFuture;
use serde_json::Value;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tidings_store::Store;
use tokio::sync::Mutex;

use crate::error::ApiError;
use crate::produce::{EventProducer, Produced};

/// Where chat events go: the broker through an [`EventProducer`] (or a stand-in in tests).
pub trait ChatEvents: Send + Sync {
    /// Produces `event` to `topic` keyed by `key`, answering after the acknowledgement.
    fn produce<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: &'a Value,
    ) -> BoxFuture<'a, Result<Produced, ApiError>>;
}

impl ChatEvents for EventProducer {
    fn produce<'a>(
        &'a self,
        topic: &'a str,
        key: &'a str,
        event: &'a Value,
    ) -> BoxFuture<'a, Result<Produced, ApiError>> {
        Box::pin(EventProducer::produce(self, topic, Some(key), event, None))
    }
}

/// Rooms whose flushes are serialized by one lock (a room always maps to the same one), so one
/// process does not produce a room's outbox row twice at the same time.
const LOCK_STRIPES: usize = 64;
/// Outbox rows read at once.
const PAGE: u32 = 100;

pub(super) struct Outbox {
    store: Store,
    events: Arc<dyn ChatEvents>,
    topic: String,
    locks: Vec<Mutex<()>>,
}

impl Outbox {
    pub(super) fn new(store: Store, events: Arc<dyn ChatEvents>, topic: String) -> Self {
        Outbox { store, events, topic, locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect() }
    }

    /// Produces every outbox event of `room_id`, oldest first, deleting each once acknowledged;
    /// answers the produced events. Stops at the first failed produce (503), keeping its row.
    pub(super) async fn flush(&self, room_id: &str) -> Result<Vec<Value>, ApiError> {
        let stripe = room_id.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
        let _serial = self.locks[stripe % LOCK_STRIPES].lock().await;
        let mut produced = Vec::new();
        loop {
            let rows = self.store.outbox_of_room(room_id, PAGE).await?;
            for row in &rows {
                match serde_json::from_str::<Value>(&row.event) {
                    Ok(event) => match self.events.produce(&self.topic, &row.room_id, &event).await {
                        Ok(_) => produced.push(event),
                        // The broker or the registry is away: the row waits for the next try.
                        Err(e) if e.status().is_server_error() => return Err(e),
                        // An event the schema refuses never will be produced: dropped, loudly, so
                        // it does not hold up the room's later events.
                        Err(e) => {
                            tracing::error!(room = %row.room_id, event = %row.event, error = ?e, "chat outbox event refused; dropped")
                        }
                    },
                    Err(e) => {
                        tracing::error!(room = %row.room_id, event = %row.event, error = %e, "chat outbox row is not JSON; dropped")
                    }
                }
                self.store.outbox_delete(row.id).await?;
            }
            if rows.len() < PAGE as usize {
                return Ok(produced);
            }
        }
    }
}

/// Produces, every `interval`, the outbox events older than `grace` (their request failed or its
/// process stopped), a bounded number of rooms at a time, until `outbox` is dropped.
pub(super) async fn relay(outbox: Weak<Outbox>, interval: Duration, grace: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(outbox) = outbox.upgrade() else { return };
        let before = super::now_micros() - grace.as_micros() as i64;
        let rooms = match outbox.store.outbox_rooms(before, PAGE).await {
            Ok(rooms) => rooms,
            Err(e) => {
                tracing::warn!(error = %e, "reading the chat outbox failed; retrying");
                continue;
            }
        };
        for room in rooms {
            match outbox.flush(&room).await {
                Ok(events) if !events.is_empty() => {
                    tracing::info!(room = %room, events = events.len(), "chat outbox: late events produced")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(room = %room, error = ?e, "chat outbox: produce failed; retrying");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{AuthConfig, AuthUser};
    use crate::chat::{rooms, Body, ChatConfig, ChatState};
    use axum::extract::{Path, State};
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Produces into a list, or fails like an unreachable broker while `down`.
    #[derive(Default)]
    struct Flaky {
        down: AtomicBool,
        produced: std::sync::Mutex<Vec<Value>>,
    }

    impl ChatEvents for Flaky {
        fn produce<'a>(
            &'a self,
            _topic: &'a str,
            _key: &'a str,
            event: &'a Value,
        ) -> BoxFuture<'a, Result<Produced, ApiError>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "broker_unavailable",
                        "Message production error: MessageTimedOut",
                    ));
                }
                let mut produced = self.produced.lock().unwrap();
                produced.push(event.clone());
                Ok(Produced { partition: 0, offset: produced.len() as i64 - 1, schema_id: 1 })
            })
        }
    }

    impl Flaky {
        /// The produced events of `branch` about `user`.
        fn count(&self, branch: &str, user: &str) -> usize {
            let key = if branch == "RoomClosed" { "by" } else { "user_id" };
            self.produced.lock().unwrap().iter().filter(|e| e["payload"][branch][key] == json!(user)).count()
        }
    }

    fn state(store: &Store, events: &Arc<Flaky>, grace: Duration) -> ChatState {
        let mut cfg = ChatConfig::new("chat".into(), "persistence".into(), "notifications".into());
        cfg.outbox_interval = Duration::from_millis(20);
        cfg.outbox_grace = grace;
        let kafka = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").create().unwrap();
        ChatState::with_events(store.clone(), Arc::new(AuthConfig::default()), events.clone(), cfg, kafka)
    }

    /// A join, a leave and a close whose produce fails are in the store already: the retry of the
    /// same request produces the event (it found nothing left to change, and so produced nothing,
    /// before the outbox); an event no request retries is produced by the relay of a later process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_whose_produce_failed_is_produced_by_its_retry_or_the_relay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(&format!("sqlite://{}/chat.db", dir.path().display())).await.unwrap();
        let events = Arc::new(Flaky::default());
        // No relay within the test: only requests produce.
        let api = state(&store, &events, Duration::from_secs(3_600));
        let user = |u: &str| AuthUser(u.to_string());
        let create = serde_json::from_value(json!({"kind": "group", "name": "Outbox", "tags": ["o"]})).unwrap();
        let resp = rooms::create(State(api.clone()), user("alice"), Body(create)).await.unwrap();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let id = serde_json::from_slice::<Value>(&body).unwrap()["room_id"].as_str().unwrap().to_string();
        assert_eq!(events.produced.lock().unwrap().len(), 1, "RoomCreated");

        events.down.store(true, Ordering::SeqCst);
        let e = rooms::join(State(api.clone()), user("bob"), Path(id.clone())).await.unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(store.room_members(&id).await.unwrap().contains(&"bob".to_string()), "the store has the join");
        assert_eq!(events.count("MemberJoined", "bob"), 0);
        events.down.store(false, Ordering::SeqCst);
        let joined = rooms::join(State(api.clone()), user("bob"), Path(id.clone())).await.unwrap();
        assert_eq!(
            (events.count("MemberJoined", "bob"), &joined.0["members"]),
            (1, &json!(2)),
            "the retry produced it"
        );
        let _ = rooms::join(State(api.clone()), user("bob"), Path(id.clone())).await.unwrap();
        assert_eq!(events.count("MemberJoined", "bob"), 1, "a join of a member produces nothing more");

        events.down.store(true, Ordering::SeqCst);
        rooms::leave(State(api.clone()), user("bob"), Path(id.clone())).await.unwrap_err();
        rooms::close(State(api.clone()), user("alice"), Path(id.clone())).await.unwrap_err();
        events.down.store(false, Ordering::SeqCst);
        let left = rooms::leave(State(api.clone()), user("bob"), Path(id.clone())).await.unwrap();
        assert_eq!(left, axum::http::StatusCode::NO_CONTENT, "the retried leave succeeds");
        // In the room's order: the leave, then the close (which the leave's retry produced too).
        let branches: Vec<String> = events.produced.lock().unwrap()[2..]
            .iter()
            .map(|e| e["payload"].as_object().unwrap().keys().next().unwrap().clone())
            .collect();
        assert_eq!(branches, ["MemberLeft", "RoomClosed"]);
        assert_eq!(
            rooms::leave(State(api.clone()), user("bob"), Path(id.clone())).await.unwrap_err().status(),
            axum::http::StatusCode::FORBIDDEN,
            "once produced, a leave of a non-member is refused again"
        );

        // Nobody retries: the event waits in the store (the process may stop), and a relay
        // produces it.
        let create = serde_json::from_value(json!({"kind": "group", "name": "Later", "tags": ["o"]})).unwrap();
        let resp = rooms::create(State(api.clone()), user("carol"), Body(create)).await.unwrap();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let later = serde_json::from_slice::<Value>(&body).unwrap()["room_id"].as_str().unwrap().to_string();
        events.down.store(true, Ordering::SeqCst);
        rooms::join(State(api.clone()), user("dave"), Path(later.clone())).await.unwrap_err();
        drop(api);
        events.down.store(false, Ordering::SeqCst);
        let _relaying = state(&store, &events, Duration::ZERO);
        let started = std::time::Instant::now();
        while events.count("MemberJoined", "dave") == 0 {
            assert!(started.elapsed() < Duration::from_secs(20), "the relay never produced dave's join");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(store.outbox_of_room(&later, 10).await.unwrap().is_empty(), "produced rows are deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(events.count("MemberJoined", "dave"), 1, "produced once");
    }
}
