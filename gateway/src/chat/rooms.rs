//! Rooms: create (a direct inquiry or a tagged group room), list mine, find by tags, details,
//! join, leave and close. Membership changes here and only here, each with its event in the outbox.

use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tidings_store::chat::{NewRoom, RoomsCursor};

use super::{message_json, not_a_member, not_found, now_micros, room_json, Body, ChatState};
use crate::auth::AuthUser;
use crate::error::ApiError;

/// Namespace of direct room ids: one room per (product, buyer), whoever asks how often.
const DIRECT_ROOMS: uuid::Uuid = uuid::Uuid::from_u128(0x3c8e_51f2_7a94_4b0e_a1d6_92c4_05e7_f318);
const MAX_TAGS: usize = 10;

#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum CreateRoom {
    Group {
        name: String,
        #[serde(default)]
        tags: Vec<String>,
    },
    Direct {
        product_id: String,
        seller_id: String,
    },
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_room", message)
}

/// Tags are compared lower-case: 1 to 32 letters, digits, `-` or `_`.
fn tag(raw: &str) -> Result<String, ApiError> {
    let t = raw.trim().to_lowercase();
    if t.is_empty() || t.chars().count() > 32 || !t.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '_') {
        return Err(invalid(format!("tag {raw:?} must be 1 to 32 letters, digits, - or _")));
    }
    Ok(t)
}

fn bounded(what: &str, s: &str, max: usize) -> Result<String, ApiError> {
    let s = s.trim();
    if s.is_empty() || s.chars().count() > max {
        return Err(invalid(format!("{what} must be 1 to {max} characters")));
    }
    Ok(s.to_string())
}

pub async fn create(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Body(req): Body<CreateRoom>,
) -> Result<Response, ApiError> {
    let now = now_micros();
    let (room_id, kind, name, tags, product, members, seller) = match req {
        CreateRoom::Group { name, tags } => {
            let name = bounded("name", &name, 100)?;
            let mut tags = tags.iter().map(|t| tag(t)).collect::<Result<Vec<_>, _>>()?;
            tags.sort();
            tags.dedup();
            if tags.len() > MAX_TAGS {
                return Err(invalid(format!("at most {MAX_TAGS} tags")));
            }
            (uuid::Uuid::new_v4().to_string(), "group", name, tags, None, vec![user.clone()], None)
        }
        CreateRoom::Direct { product_id, seller_id } => {
            let product = bounded("product_id", &product_id, 100)?;
            let seller = bounded("seller_id", &seller_id, 200)?;
            if seller == user {
                return Err(invalid("a direct inquiry needs a seller other than yourself"));
            }
            let key = format!("{product}\0{user}");
            let id = uuid::Uuid::new_v5(&DIRECT_ROOMS, key.as_bytes()).to_string();
            let members = vec![user.clone(), seller.clone()];
            (id, "direct", format!("Product {product}"), Vec::new(), Some(product), members, Some(seller))
        }
    };
    state.spend_write(&user, members.len() as u64)?;
    // Only a new inquiry counts against the buyer's inquiry budgets: asking again finds the same room.
    if let Some(seller) = &seller {
        if state.store.room(&room_id).await?.is_none() {
            state.spend_inquiry(&user, seller)?;
        }
    }
    let new = NewRoom {
        room_id: &room_id,
        kind,
        name: &name,
        creator_id: &user,
        product_id: product.as_deref(),
        tags: &tags,
        members: &members,
        created_at: now,
    };
    let payload = json!({"name": name, "creator_id": user, "members": members, "kind": kind, "tags": tags,
        "product_id": product});
    let event = state.event(&room_id, "RoomCreated", payload);
    let created = state.store.create_room_and_event(&new, Some(&event)).await?;
    // Also on a repeat: a room whose event a failed produce left is announced now.
    state.flush(&room_id).await?;
    let room = state.room(&room_id).await?;
    // Asking again for the same product's inquiry finds the same room.
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(room_json(&room))).into_response())
}

/// `?limit=` (1 to the configured page, which is the default) and `?after=` (the `next` of the
/// previous page). The most recently active first; `next` is null on the last page.
pub async fn mine(State(state): State<ChatState>, AuthUser(user): AuthUser, uri: Uri) -> Result<Json<Value>, ApiError> {
    let page = state.cfg.rooms_page.max(1);
    let (mut limit, mut after) = (page, None);
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|l| (1..=page).contains(l))
                    .ok_or_else(|| invalid(format!("limit must be 1 to {page}")))?
            }
            "after" => {
                after = Some(parse_cursor(&v).ok_or_else(|| {
                    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_cursor", "after must be a page's next")
                })?)
            }
            "access_token" => {}
            other => return Err(invalid(format!("unknown parameter {other:?}"))),
        }
    }
    let rooms = state.store.my_rooms_after(&user, after.as_ref(), limit).await?;
    let next = (rooms.len() == limit as usize).then(|| rooms.last().map(|r| cursor_text(&r.cursor()))).flatten();
    let rooms: Vec<Value> = rooms
        .iter()
        .map(|r| {
            let mut j = room_json(&r.room);
            j["unread"] = json!(r.unread);
            j["read_seq"] = json!(r.read_seq);
            j["last_message"] = r.last_message.as_ref().map(message_json).unwrap_or(Value::Null);
            j
        })
        .collect();
    Ok(Json(json!({ "rooms": rooms, "next": next })))
}

/// A rooms page's cursor as the client sees it (opaque: `<seq>.<created_at>.<room id>`).
fn cursor_text(c: &RoomsCursor) -> String {
    format!("{}.{}.{}", c.top_seq, c.created_at, c.room_id)
}

fn parse_cursor(s: &str) -> Option<RoomsCursor> {
    let mut parts = s.splitn(3, '.');
    let top_seq = parts.next()?.parse().ok()?;
    let created_at = parts.next()?.parse().ok()?;
    let room_id = parts.next().filter(|r| !r.is_empty() && r.len() <= 200)?.to_string();
    Some(RoomsCursor { top_seq, created_at, room_id })
}

/// `?tag=a&tag=b` (rooms with all of them), `limit` (1–100, default 20), `after` (a page's cursor).
pub async fn search(State(state): State<ChatState>, AuthUser(_): AuthUser, uri: Uri) -> Result<Json<Value>, ApiError> {
    let (mut tags, mut limit, mut after) = (Vec::new(), 20u32, None);
    for (k, v) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        match k.as_ref() {
            "tag" => {
                tags.extend(v.split(',').filter(|t| !t.trim().is_empty()).map(tag).collect::<Result<Vec<_>, _>>()?)
            }
            "limit" => {
                limit =
                    v.parse().ok().filter(|l| (1..=100).contains(l)).ok_or_else(|| invalid("limit must be 1 to 100"))?
            }
            "after" => after = Some(v.into_owned()),
            "access_token" => {}
            other => return Err(invalid(format!("unknown parameter {other:?}"))),
        }
    }
    if tags.is_empty() || tags.len() > MAX_TAGS {
        return Err(invalid(format!("give 1 to {MAX_TAGS} tags (tag=…)")));
    }
    tags.sort();
    tags.dedup();
    let rooms = state.store.search_rooms(&tags, after.as_deref(), limit).await?;
    let next = (rooms.len() == limit as usize).then(|| rooms.last().map(|r| r.room_id.clone())).flatten();
    Ok(Json(json!({ "rooms": rooms.iter().map(room_json).collect::<Vec<_>>(), "next_cursor": next })))
}

/// A group room is public; a direct room is visible to its members only (404 to others, so its
/// existence is not revealed).
pub async fn details(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let room = state.room(&id).await?;
    let members = state.store.room_members(&id).await?;
    if room.kind != "group" && !members.contains(&user) {
        return Err(not_found());
    }
    let mut j = room_json(&room);
    j["member_ids"] = json!(members);
    Ok(Json(j))
}

pub async fn join(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let room = state.room(&id).await?;
    if room.kind != "group" {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not_joinable", "only group rooms can be joined"));
    }
    if room.closed {
        return Err(ApiError::new(StatusCode::CONFLICT, "room_closed", "the room is closed"));
    }
    state.spend_write(&user, room.members + 1)?;
    let event = state.event(&id, "MemberJoined", json!({ "user_id": user }));
    state.store.join_room_and_event(&id, &user, now_micros(), Some(&event)).await?;
    // Also when a member already: a retry produces what a failed produce left.
    state.flush(&id).await?;
    let room = state.room(&id).await?;
    Ok(Json(room_json(&room)))
}

pub async fn leave(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let room = state.room(&id).await?;
    state.spend_write(&user, room.members)?;
    let event = state.event(&id, "MemberLeft", json!({ "user_id": user }));
    let left = state.store.leave_room_and_event(&id, &user, now_micros(), Some(&event)).await?;
    let produced = state.flush(&id).await?;
    // A retry of a leave whose event a failed produce left: that event is out now, the leave done.
    let retried = produced.iter().any(|e| e["payload"]["MemberLeft"]["user_id"] == json!(user));
    if !left && !retried {
        return Err(not_a_member());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Only the creator of a group room may close it.
pub async fn close(
    State(state): State<ChatState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let room = state.room(&id).await?;
    if room.kind != "group" || room.creator_id != user {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "not_the_creator", "only the room's creator may close it"));
    }
    state.spend_write(&user, room.members)?;
    let event = state.event(&id, "RoomClosed", json!({ "by": user }));
    state.store.close_room_and_event(&id, now_micros(), Some(&event)).await?;
    state.flush(&id).await?;
    let room = state.room(&id).await?;
    Ok(Json(room_json(&room)))
}
