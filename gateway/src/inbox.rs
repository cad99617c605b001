//! The authenticated user's inbox over HTTP: a cursor-paged list (newest first), the unread count,
//! and marking one notification read. Every query is scoped to the token's user, so another user's
//! notifications are never listed, counted or revealed (a foreign id answers 404 like a missing one).

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tidings_store::InboxItem;
use tidings_store::Store;

use crate::auth::{AuthConfig, AuthUser};
use crate::delivery::events::NotificationJson;
use crate::error::ApiError;

/// Page size when the request gives none.
pub const DEFAULT_LIMIT: u32 = 20;
/// Largest page size.
pub const MAX_LIMIT: u32 = 100;

/// Shared state of the inbox endpoints.
#[derive(Clone)]
pub struct InboxState {
    pub store: Store,
    pub auth: Arc<AuthConfig>,
}

impl FromRef<InboxState> for Arc<AuthConfig> {
    fn from_ref(s: &InboxState) -> Self {
        s.auth.clone()
    }
}

pub fn router(state: InboxState) -> Router {
    Router::new()
        .route("/v1/notifications", get(list))
        .route("/v1/notifications/unread_count", get(unread_count))
        .route("/v1/notifications/{id}/read", post(mark_read))
        .with_state(state)
}

/// The cursor is the stream position `partition.offset` of a page's last item; clients treat it as
/// opaque and only hand it back.
fn encode_cursor(partition: i32, offset: i64) -> String {
    format!("{partition}.{offset}")
}

fn decode_cursor(c: &str) -> Option<(i32, i64)> {
    let (p, o) = c.split_once('.')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(p) || !all_digits(o) {
        return None;
    }
    Some((p.parse().ok()?, o.parse().ok()?))
}

fn item_json(item: &InboxItem) -> Value {
    // Same shape as the stream's `data:`, plus the read flag.
    let mut json = NotificationJson::new(&item.notification, item.stream_partition, item.stream_offset);
    json.read = Some(item.read);
    serde_json::to_value(json).expect("notification serializes")
}

#[derive(Deserialize)]
struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list(
    State(state): State<InboxState>,
    AuthUser(user): AuthUser,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        params.map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_query", e.body_text()))?;
    let limit = match params.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(l) => l.parse::<u32>().ok().filter(|l| (1..=MAX_LIMIT).contains(l)).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_limit",
                format!("limit must be an integer from 1 to {MAX_LIMIT}"),
            )
        })?,
    };
    let before = match params.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor", "cursor is not one this API returned")
        })?),
    };
    // One extra row tells whether another page exists, so the last page says next_cursor: null.
    let mut items = state.store.inbox(&user, before, limit + 1).await.map_err(ApiError::from)?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = match items.last() {
        Some(last) if more => Value::String(encode_cursor(last.stream_partition, last.stream_offset)),
        _ => Value::Null,
    };
    Ok(Json(json!({
        "items": items.iter().map(item_json).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

async fn unread_count(State(state): State<InboxState>, AuthUser(user): AuthUser) -> Result<Json<Value>, ApiError> {
    let n = state.store.unread_count(&user).await.map_err(ApiError::from)?;
    Ok(Json(json!({ "unread": n })))
}

async fn mark_read(
    State(state): State<InboxState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = uuid::Uuid::parse_str(&id)
        .map_err(|_| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_id", "notification id is not a UUID"))?;
    if state.store.mark_read(&user, id).await.map_err(ApiError::from)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such notification"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejects_garbage() {
        assert_eq!(decode_cursor(&encode_cursor(3, 42)), Some((3, 42)));
        for bad in ["", "3", "3.", ".4", "a.b", "-1.2", "3.4.5", "99999999999.1", "1.+2"] {
            assert_eq!(decode_cursor(bad), None, "{bad:?}");
        }
    }
}
