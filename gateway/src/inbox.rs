//! The authenticated user's inbox over HTTP: a cursor-paged list (newest first) and its archive, the
//! unread count, marking one or all read, archiving. Every query is scoped to the token's user, so
//! another user's notifications are never listed, counted or revealed (a foreign id answers 404).

use axum::extract::rejection::{JsonRejection, QueryRejection};
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
        .route("/v1/notifications/read_all", post(mark_all_read))
        .route("/v1/notifications/{id}/archive", post(archive))
        .route("/v1/notifications/{id}/unarchive", post(unarchive))
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

fn item_json(item: &InboxItem, archived: bool) -> Value {
    // Same shape as the stream's `data:`, plus the read and archived flags.
    let mut json = NotificationJson::new(&item.notification, item.stream_partition, item.stream_offset);
    json.read = Some(item.read);
    let mut value = serde_json::to_value(json).expect("notification serializes");
    value["archived"] = Value::Bool(archived);
    value
}

#[derive(Deserialize)]
struct ListParams {
    limit: Option<String>,
    cursor: Option<String>,
    /// `true` lists the archive instead of the inbox.
    archived: Option<String>,
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
    let archived = match params.archived.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_archived",
                "archived must be true or false",
            ))
        }
    };
    // One extra row tells whether another page exists, so the last page says next_cursor: null.
    let mut items = if archived {
        state.store.archived(&user, before, limit + 1).await
    } else {
        state.store.inbox(&user, before, limit + 1).await
    }
    .map_err(ApiError::from)?;
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    let next_cursor = match items.last() {
        Some(last) if more => Value::String(encode_cursor(last.stream_partition, last.stream_offset)),
        _ => Value::Null,
    };
    Ok(Json(json!({
        "items": items.iter().map(|i| item_json(i, archived)).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

/// `{"unread": n, "by_category": {"orders": 2, …}}`: inbox notifications only (archived ones left
/// out); a category with nothing unread is absent, and one stored before categories existed counts
/// in `unread` only.
async fn unread_count(State(state): State<InboxState>, AuthUser(user): AuthUser) -> Result<Json<Value>, ApiError> {
    let counts = state.store.unread_counts(&user).await.map_err(ApiError::from)?;
    let by_category: serde_json::Map<String, Value> =
        counts.by_category.into_iter().map(|(category, n)| (category, Value::from(n))).collect();
    Ok(Json(json!({ "unread": counts.total, "by_category": by_category })))
}

fn notification_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(id)
        .map_err(|_| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_id", "notification id is not a UUID"))
}

/// 204 when the store found the user's notification, else 404.
fn found(found: bool) -> Result<StatusCode, ApiError> {
    if found {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such notification"))
    }
}

async fn mark_read(
    State(state): State<InboxState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = notification_id(&id)?;
    found(state.store.mark_read(&user, id).await.map_err(ApiError::from)?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadAllBody {
    /// The newest notification the client showed: it and everything before it in the inbox's order
    /// are marked read, and one that arrived after it stays unread.
    up_to: String,
}

/// `POST /v1/notifications/read_all` with `{"up_to": "<id>"}`: answers `{"marked": n}`.
async fn mark_all_read(
    State(state): State<InboxState>,
    AuthUser(user): AuthUser,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let invalid = |message: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message);
    let Json(body) = body.map_err(|e| invalid(e.body_text()))?;
    // Only an object: serde would also take `["<id>"]` for the struct.
    if !body.is_object() {
        return Err(invalid(r#"the body is {"up_to": "<notification id>"}"#.into()));
    }
    let body: ReadAllBody = serde_json::from_value(body).map_err(|e| invalid(e.to_string()))?;
    let up_to = notification_id(&body.up_to).map_err(|e| e.with_path("up_to".into()))?;
    match state.store.mark_all_read(&user, up_to).await.map_err(ApiError::from)? {
        Some(marked) => Ok(Json(json!({ "marked": marked }))),
        None => {
            Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such notification").with_path("up_to".into()))
        }
    }
}

async fn archive(
    State(state): State<InboxState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = notification_id(&id)?;
    found(state.store.archive(&user, id).await.map_err(ApiError::from)?)
}

async fn unarchive(
    State(state): State<InboxState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = notification_id(&id)?;
    found(state.store.unarchive(&user, id).await.map_err(ApiError::from)?)
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
