//! Messages: send (members only, size-checked, rate-limited), history pages consistent with a
//! stream position, read positions, and edits and deletes by the sender within a window.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use rdkafka::consumer::Consumer;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

use super::{message_json, not_a_member, not_found, now_micros, rfc3339, Body, ChatState};
use crate::auth::AuthUser;
use crate::delivery::{partition_for, position_id};
use crate::error::ApiError;

/// Namespace of message ids derived from a client's own id, so a retried send is the same message.
const CLIENT_MESSAGES: uuid::Uuid = uuid::Uuid::from_u128(0x9b2d_7c41_0e6f_4a83_b5c9_1d07_e2a4_6f58);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewMessage {
    text: String,
    /// A client-chosen id: sending again with the same one (a retry) is the same message.
    #[serde(default)]
    client_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadUpTo {
    seq: i64,
}

#[derive(Deserialize)]
pub struct Page {
    before: Option<i64>,
    limit: Option<u32>,
    #[serde(rename = "access_token")]
    _token: Option<String>,
}

impl ChatState {
    /// 413 past the size limit, 422 when empty.
    fn check_text(&self, text: &str) -> Result<(), ApiError> {
        if text.trim().is_empty() {
            return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "empty_message", "a message needs text"));
        }
        if text.len() > self.cfg.max_text_bytes {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_long",
                format!("messages are limited to {} bytes", self.cfg.max_text_bytes),
            ));
        }
        Ok(())
    }

    /// 404 without the room, 403 for non-members.
    async fn member_of(&self, room_id: &str, user: &str) -> Result<tidings_store::chat::RoomAccess, ApiError> {
        self.member_with(room_id, user, None).await
    }

    /// `member_of`, also saying where `message_id` is stored if it is.
    async fn member_with(
        &self,
        room_id: &str,
        user: &str,
        message_id: Option<&str>,
    ) -> Result<tidings_store::chat::RoomAccess, ApiError> {
        let access = self.store.room_access(room_id, user, message_id).await?.ok_or_else(not_found)?;
        if !access.member {
            return Err(not_a_member());
        }
        Ok(access)
    }

    /// A stored message of `room_id` that `user` sent and may still change, and the room's
    /// member count.
    async fn own_message(
        &self,
        room_id: &str,
        message_id: &str,
        user: &str,
    ) -> Result<(tidings_store::chat::StoredMessage, u64), ApiError> {
        let room = self.member_of(room_id, user).await?;
        let m =
            self.store.chat_message(message_id).await?.filter(|m| m.room_id == room_id).ok_or_else(|| {
                ApiError::new(StatusCode::NOT_FOUND, "message_not_found", "no such message in this room")
            })?;
        if m.sender_id != user {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "not_the_sender", "only its sender may change a message"));
        }
        if m.deleted {
            return Err(ApiError::new(StatusCode::CONFLICT, "message_deleted", "the message was deleted"));
        }
        if now_micros() - m.occurred_at > self.cfg.edit_window.as_micros() as i64 {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "edit_window_over",
                format!("messages can be changed for {:?} after sending", self.cfg.edit_window),
            ));
        }
        Ok((m, room.members))
    }

    /// The partition count of `topic` and the high watermark of one of its partitions, chosen from
    /// the count by `pick` (blocking librdkafka calls, on a blocking thread).
    async fn end_of(&self, topic: &str, pick: impl Fn(i32) -> i32 + Send + 'static) -> Result<(i32, i64), ApiError> {
        let (kafka, topic) = (self.kafka.clone(), topic.to_string());
        let got = tokio::task::spawn_blocking(move || {
            let n = tidings_core::kafka::partition_count(kafka.client(), &topic, KAFKA_TIMEOUT)?;
            let p = pick(n.max(1));
            let (_, high) = kafka.fetch_watermarks(&topic, p, KAFKA_TIMEOUT)?;
            Ok::<_, rdkafka::error::KafkaError>((p, high))
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        got.map_err(|e| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", e.to_string()).with_retry_after(1)
        })
    }
}

pub async fn post(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    Body(msg): Body<NewMessage>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    state.check_text(&msg.text)?;
    let message_id = match &msg.client_id {
        Some(c) => uuid::Uuid::new_v5(&CLIENT_MESSAGES, format!("{id}\0{user}\0{c}").as_bytes()),
        None => uuid::Uuid::new_v4(),
    }
    .to_string();
    let room = state.member_with(&id, &user, msg.client_id.as_ref().map(|_| message_id.as_str())).await?;
    // A retry whose first attempt is in the history already: the same answer, nothing produced.
    // (One still in flight to the store is produced again; each stream drops the repeat by id.)
    if let Some((partition, seq)) = room.stored_at {
        if let Some(m) = state.store.chat_message(&message_id).await?.filter(|m| m.sender_id == user) {
            return Ok((
                StatusCode::CREATED,
                Json(json!({
                    "message_id": message_id, "room_id": id, "seq": seq, "sender_id": user, "text": m.text,
                    "occurred_at": rfc3339(m.occurred_at), "position": position_id(partition, seq),
                })),
            ));
        }
    }
    if room.closed {
        return Err(ApiError::new(StatusCode::CONFLICT, "room_closed", "the room is closed"));
    }
    state.check_rate(&user)?;
    state.spend_write(&user, room.members)?;
    let at = now_micros();
    let payload = json!({"message_id": message_id, "sender_id": user, "text": msg.text});
    let produced = state.emit_at(&id, "MessageSent", payload, at).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "message_id": message_id, "room_id": id, "seq": produced.offset, "sender_id": user, "text": msg.text,
            "occurred_at": rfc3339(at), "position": position_id(produced.partition, produced.offset),
        })),
    ))
}

/// A page of history, newest first. The first page (no `before`) is consistent with the stream
/// position it returns: every message of the room up to the moment of the call is in it, and
/// every later one reaches the member's stream after that position.
pub async fn history(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    state.member_of(&id, &user).await?;
    state.spend_history(&user)?;
    let limit = page.limit.unwrap_or(50).clamp(1, 200);
    // The member's stream end first, the room's partition end second: a message produced after the
    // second has its copy produced after the first, so it arrives on the stream after `position`.
    let user_key = user.clone();
    let (stream_partition, stream_end) =
        state.end_of(&state.cfg.notifications_topic, move |n| partition_for(&user_key, n)).await?;
    let room_key = id.clone();
    let (chat_partition, chat_end) = state.end_of(&state.cfg.topic, move |n| partition_for(&room_key, n)).await?;
    // Everything before `chat_end` must be in the store before the page is read.
    let started = Instant::now();
    loop {
        let stored = state.store.load_offsets(&state.cfg.persistence_group, &state.cfg.topic).await?;
        if stored.get(&chat_partition).copied().unwrap_or(0) >= chat_end {
            break;
        }
        if started.elapsed() > state.cfg.history_wait {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "history_catching_up",
                "the room's history is still being stored; retry",
            )
            .with_retry_after(1));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = page.before.unwrap_or(chat_end).min(chat_end);
    let messages = state.store.room_messages(&id, Some(before), limit).await?;
    let next_before = (messages.len() == limit as usize).then(|| messages.last().map(|m| m.seq)).flatten();
    Ok(Json(json!({
        "messages": messages.iter().map(message_json).collect::<Vec<_>>(),
        "next_before": next_before,
        "position": position_id(stream_partition, stream_end - 1),
    })))
}

pub async fn read(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    Body(up_to): Body<ReadUpTo>,
) -> Result<Json<Value>, ApiError> {
    let room = state.member_of(&id, &user).await?;
    state.spend_write(&user, room.members)?;
    let (read_seq, unread) = state.store.mark_room_read(&id, &user, up_to.seq).await?.ok_or_else(not_a_member)?;
    // The member's other tabs clear their count.
    state.emit(&id, "ReadUpTo", json!({"user_id": user, "seq": read_seq})).await?;
    Ok(Json(json!({ "read_seq": read_seq, "unread": unread })))
}

pub async fn edit(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path((id, message_id)): Path<(String, String)>,
    Body(edit): Body<Edit>,
) -> Result<Json<Value>, ApiError> {
    state.check_text(&edit.text)?;
    let (mut m, members) = state.own_message(&id, &message_id, &user).await?;
    state.spend_write(&user, members)?;
    state.emit(&id, "MessageEdited", json!({"message_id": message_id, "sender_id": user, "text": edit.text})).await?;
    m.text = edit.text;
    m.edited = true;
    Ok(Json(message_json(&m)))
}

pub async fn delete(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path((id, message_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (_, members) = state.own_message(&id, &message_id, &user).await?;
    state.spend_write(&user, members)?;
    state.emit(&id, "MessageDeleted", json!({"message_id": message_id, "sender_id": user})).await?;
    Ok(StatusCode::NO_CONTENT)
}
