//! Chat rooms, membership, read positions and history queries. Rooms and membership are written
//! only by the gateway's chat API; history by the persistence stage from the `chat` topic. Every
//! query is one text both backends run (`sql/chat_*.sql`, see `on_pool!`). Each room or membership
//! change is written with its event in `chat_outbox`, in one transaction, so the event is produced
//! even if the first produce fails (see the gateway's chat outbox).

use super::{count, with_bind_list, Dialect, Store};
use crate::error::StoreError;

/// A chat room as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    pub room_id: String,
    /// `group` or `direct`.
    pub kind: String,
    pub name: String,
    pub creator_id: String,
    pub product_id: Option<String>,
    pub closed: bool,
    /// Microseconds since the Unix epoch.
    pub created_at: i64,
    pub tags: Vec<String>,
    pub members: u64,
}

/// A room as one of its members sees it in their list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MyRoom {
    pub room: Room,
    pub read_seq: i64,
    pub unread: u64,
    pub last_message: Option<StoredMessage>,
}

/// What a send needs to know about a room and its sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomAccess {
    pub closed: bool,
    pub member: bool,
    /// The room's member count (what a change fans out to).
    pub members: u64,
    /// When asked about a message id: its (partition, offset) on `chat` if the room's history
    /// already holds it (a send retried after a lost answer).
    pub stored_at: Option<(i32, i64)>,
}

/// A message of a room's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub message_id: String,
    pub room_id: String,
    /// Its offset on the room's `chat` partition: increasing within the room.
    pub seq: i64,
    pub sender_id: String,
    pub text: String,
    /// Microseconds since the Unix epoch.
    pub occurred_at: i64,
    pub edited: bool,
    pub deleted: bool,
}

/// A later change to a stored message (from `MessageEdited` / `MessageDeleted`), applied by sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatChange {
    pub message_id: String,
    pub sender_id: String,
    /// The new text, or `None` for a delete.
    pub text: Option<String>,
    /// Microseconds since the Unix epoch.
    pub at: i64,
}

/// Where a page of a member's rooms ends: the next page starts after it. The list is ordered by
/// the seq of the room's last message (-1 without), then creation time, then room id, all descending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomsCursor {
    pub top_seq: i64,
    pub created_at: i64,
    pub room_id: String,
}

impl MyRoom {
    /// The cursor of the page ending with this room.
    pub fn cursor(&self) -> RoomsCursor {
        RoomsCursor {
            top_seq: self.last_message.as_ref().map_or(-1, |m| m.seq),
            created_at: self.room.created_at,
            room_id: self.room.room_id.clone(),
        }
    }
}

/// A chat event waiting in the outbox: its row id, room (its key) and JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub id: i64,
    pub room_id: String,
    pub event: String,
}

/// A room to create.
#[derive(Debug, Clone)]
pub struct NewRoom<'a> {
    pub room_id: &'a str,
    pub kind: &'a str,
    pub name: &'a str,
    pub creator_id: &'a str,
    pub product_id: Option<&'a str>,
    pub tags: &'a [String],
    pub members: &'a [String],
    pub created_at: i64,
}

/// A row of `room_access`: closed, member (0/1), member count, and where the message is stored.
type AccessRow = (bool, i64, i64, Option<i32>, Option<i64>);

#[derive(sqlx::FromRow)]
struct RoomRow {
    room_id: String,
    kind: String,
    name: String,
    creator_id: String,
    product_id: Option<String>,
    closed: bool,
    created_at: i64,
    members: i64,
}

#[derive(sqlx::FromRow)]
struct MessageRow<Time> {
    message_id: String,
    room_id: String,
    seq: i64,
    sender_id: String,
    text: String,
    occurred_at: Time,
    edited: bool,
    deleted: bool,
}

impl<T> MessageRow<T> {
    fn into_message<D: Dialect<Time = T>>(self) -> StoredMessage {
        StoredMessage {
            message_id: self.message_id,
            room_id: self.room_id,
            seq: self.seq,
            sender_id: self.sender_id,
            text: self.text,
            occurred_at: D::micros(self.occurred_at),
            edited: self.edited,
            deleted: self.deleted,
        }
    }
}

/// A row of `chat_my_rooms.sql`: the room, the member's read position and unread count, and the
/// room's last message if it has one.
#[derive(sqlx::FromRow)]
struct MyRoomRow<Time> {
    #[sqlx(flatten)]
    room: RoomRow,
    read_seq: i64,
    unread: i64,
    last_id: Option<String>,
    last_seq: Option<i64>,
    last_sender: Option<String>,
    last_text: Option<String>,
    last_at: Option<Time>,
    last_edited: Option<bool>,
    last_deleted: Option<bool>,
}

const ROOM: &str = include_str!("sql/chat_room.sql");
const MY_ROOMS: &str = include_str!("sql/chat_my_rooms.sql");
const MESSAGES: &str = include_str!("sql/chat_messages.sql");
const MESSAGE: &str = include_str!("sql/chat_message.sql");
const UNREAD: &str = include_str!("sql/chat_unread.sql");
const ROOM_TAGS: &str = include_str!("sql/chat_room_tags.sql");
const SEARCH_ROOMS: &str = include_str!("sql/chat_search_rooms.sql");
const SEARCH_ROOMS_AFTER: &str = include_str!("sql/chat_search_rooms_after.sql");
const ROOM_ACCESS: &str = include_str!("sql/chat_room_access.sql");
const CREATE_ROOM: &str = include_str!("sql/chat_create_room.sql");
const ADD_ROOM_TAG: &str = include_str!("sql/chat_add_room_tag.sql");
const ADD_MEMBER: &str = include_str!("sql/chat_add_member.sql");
const REMOVE_MEMBER: &str = include_str!("sql/chat_remove_member.sql");
const CLOSE_ROOM: &str = include_str!("sql/chat_close_room.sql");
const MARK_READ: &str = include_str!("sql/chat_mark_read.sql");
const OUTBOX_INSERT: &str = include_str!("sql/chat_outbox_insert.sql");
const OUTBOX_OF_ROOM: &str = include_str!("sql/chat_outbox_of_room.sql");
const OUTBOX_ROOMS: &str = include_str!("sql/chat_outbox_rooms.sql");
const OUTBOX_DELETE: &str = include_str!("sql/chat_outbox_delete.sql");

impl RoomRow {
    fn into_room(self, tags: Vec<String>) -> Room {
        Room {
            room_id: self.room_id,
            kind: self.kind,
            name: self.name,
            creator_id: self.creator_id,
            product_id: self.product_id,
            closed: self.closed,
            created_at: self.created_at,
            tags,
            members: count(self.members),
        }
    }
}

impl Store {
    /// Creates `room` with its tags and members; false (and nothing changed) when a room with its
    /// id exists already (a direct room's id is derived from its product and buyer).
    pub async fn create_room(&self, room: &NewRoom<'_>) -> Result<bool, StoreError> {
        self.create_room_and_event(room, None).await
    }

    /// [`Self::create_room`], writing `event` (JSON) to the outbox in the same transaction when the
    /// room is created.
    pub async fn create_room_and_event(&self, room: &NewRoom<'_>, event: Option<&str>) -> Result<bool, StoreError> {
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            let created = sqlx::query(CREATE_ROOM)
                .bind(Db::text(room.room_id))
                .bind(Db::text(room.kind))
                .bind(Db::text(room.name))
                .bind(Db::text(room.creator_id))
                .bind(room.product_id.map(Db::text))
                .bind(room.created_at)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                > 0;
            if created {
                for tag in room.tags {
                    sqlx::query(ADD_ROOM_TAG)
                        .bind(Db::text(tag))
                        .bind(Db::text(room.room_id))
                        .execute(&mut *tx)
                        .await?;
                }
                for user in room.members {
                    sqlx::query(ADD_MEMBER)
                        .bind(Db::text(room.room_id))
                        .bind(Db::text(user))
                        .bind(room.created_at)
                        .execute(&mut *tx)
                        .await?;
                }
                if let Some(event) = event {
                    sqlx::query(OUTBOX_INSERT)
                        .bind(Db::text(room.room_id))
                        .bind(Db::text(event))
                        .bind(room.created_at)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await?;
            Ok(created)
        })
    }

    /// The room, with its tags and member count.
    pub async fn room(&self, room_id: &str) -> Result<Option<Room>, StoreError> {
        let row: Option<RoomRow> =
            on_pool!(self, |pool, Db| sqlx::query_as(ROOM).bind(Db::text(room_id)).fetch_optional(pool).await?);
        match row {
            None => Ok(None),
            Some(r) => {
                let mut tags = self.tags_of(std::slice::from_ref(&r.room_id)).await?;
                Ok(Some(r.into_room(tags.remove(room_id).unwrap_or_default())))
            }
        }
    }

    async fn tags_of(&self, rooms: &[String]) -> Result<std::collections::HashMap<String, Vec<String>>, StoreError> {
        let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
        if rooms.is_empty() {
            return Ok(out);
        }
        let sql = with_bind_list(ROOM_TAGS, 1, rooms.len());
        let rows: Vec<(String, String)> = on_pool!(self, |pool, Db| {
            let mut q = sqlx::query_as(&sql);
            for r in rooms {
                q = q.bind(Db::text(r));
            }
            q.fetch_all(pool).await?
        });
        for (room, tag) in rows {
            out.entry(room).or_default().push(tag);
        }
        Ok(out)
    }

    /// Whether `room` exists, is closed, and has `user` as a member, and where message
    /// `message_id` (if given) is stored: one query, on every send.
    pub async fn room_access(
        &self,
        room_id: &str,
        user: &str,
        message_id: Option<&str>,
    ) -> Result<Option<RoomAccess>, StoreError> {
        let row: Option<AccessRow> = on_pool!(self, |pool, Db| {
            sqlx::query_as(ROOM_ACCESS)
                .bind(Db::text(room_id))
                .bind(Db::text(user))
                .bind(message_id.map(Db::text))
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(closed, member, members, p, o)| RoomAccess {
            closed,
            member: member > 0,
            members: count(members),
            stored_at: p.zip(o),
        }))
    }

    /// Adds `user` to `room`; false when they were a member already.
    pub async fn join_room(&self, room_id: &str, user: &str, at: i64) -> Result<bool, StoreError> {
        self.join_room_and_event(room_id, user, at, None).await
    }

    /// [`Self::join_room`], writing `event` to the outbox in the same transaction when `user` joined.
    pub async fn join_room_and_event(
        &self,
        room_id: &str,
        user: &str,
        at: i64,
        event: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.change_and_event(ADD_MEMBER, room_id, Some(user), Some(at), event, at).await
    }

    /// Removes `user` from `room`; false when they were not a member.
    pub async fn leave_room(&self, room_id: &str, user: &str) -> Result<bool, StoreError> {
        self.leave_room_and_event(room_id, user, 0, None).await
    }

    /// [`Self::leave_room`], writing `event` to the outbox in the same transaction when `user` left.
    pub async fn leave_room_and_event(
        &self,
        room_id: &str,
        user: &str,
        at: i64,
        event: Option<&str>,
    ) -> Result<bool, StoreError> {
        self.change_and_event(REMOVE_MEMBER, room_id, Some(user), None, event, at).await
    }

    /// Closes `room` (no more joins or messages).
    pub async fn close_room(&self, room_id: &str) -> Result<(), StoreError> {
        self.close_room_and_event(room_id, 0, None).await.map(drop)
    }

    /// Closes `room`, writing `event` to the outbox in the same transaction; false when it was
    /// closed already.
    pub async fn close_room_and_event(&self, room_id: &str, at: i64, event: Option<&str>) -> Result<bool, StoreError> {
        self.change_and_event(CLOSE_ROOM, room_id, None, None, event, at).await
    }

    /// Runs `sql` on `room_id` (`$1`, then `user` and `joined_at` when given) and, when it changed
    /// a row, inserts `event` into the outbox: one transaction.
    async fn change_and_event(
        &self,
        sql: &'static str,
        room_id: &str,
        user: Option<&str>,
        joined_at: Option<i64>,
        event: Option<&str>,
        at: i64,
    ) -> Result<bool, StoreError> {
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            let mut q = sqlx::query(sql).bind(Db::text(room_id));
            if let Some(user) = user {
                q = q.bind(Db::text(user));
            }
            if let Some(joined_at) = joined_at {
                q = q.bind(joined_at);
            }
            let changed = q.execute(&mut *tx).await?.rows_affected() > 0;
            if let (true, Some(event)) = (changed, event) {
                sqlx::query(OUTBOX_INSERT)
                    .bind(Db::text(room_id))
                    .bind(Db::text(event))
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok(changed)
        })
    }

    /// The outbox's oldest events of `room_id`, in the order they were written.
    pub async fn outbox_of_room(&self, room_id: &str, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows: Vec<(i64, String, String)> = on_pool!(self, |pool, Db| {
            sqlx::query_as(OUTBOX_OF_ROOM).bind(Db::text(room_id)).bind(i64::from(limit)).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(|(id, room_id, event)| OutboxEvent { id, room_id, event }).collect())
    }

    /// Rooms with outbox events written before `before` (microseconds), oldest first, at most `limit`.
    pub async fn outbox_rooms(&self, before: i64, limit: u32) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = on_pool!(self, |pool, _Db| sqlx::query_as(OUTBOX_ROOMS)
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    /// Removes a produced event from the outbox.
    pub async fn outbox_delete(&self, id: i64) -> Result<(), StoreError> {
        on_pool!(self, |pool, _Db| sqlx::query(OUTBOX_DELETE).bind(id).execute(pool).await?.rows_affected());
        Ok(())
    }

    /// `user`'s rooms, the most recently active first, each with its unread count and last message.
    pub async fn my_rooms(&self, user: &str, limit: u32) -> Result<Vec<MyRoom>, StoreError> {
        self.my_rooms_after(user, None, limit).await
    }

    /// A page of [`Self::my_rooms`]: the rooms after `after` (from the first when `None`).
    pub async fn my_rooms_after(
        &self,
        user: &str,
        after: Option<&RoomsCursor>,
        limit: u32,
    ) -> Result<Vec<MyRoom>, StoreError> {
        // The first page starts before every room: no seq reaches i64::MAX.
        let (top, created, id) = after.map_or((i64::MAX, i64::MAX, ""), |c| (c.top_seq, c.created_at, &c.room_id));
        let mut rooms: Vec<MyRoom> = on_pool!(self, |pool, Db| {
            let rows: Vec<MyRoomRow<<Db as Dialect>::Time>> = sqlx::query_as(MY_ROOMS)
                .bind(Db::text(user))
                .bind(top)
                .bind(created)
                .bind(Db::text(id))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
            rows.into_iter()
                .map(|r| {
                    let last_message = match (r.last_id, r.last_seq, r.last_sender, r.last_text, r.last_at) {
                        (Some(message_id), Some(seq), Some(sender_id), Some(text), Some(at)) => Some(StoredMessage {
                            message_id,
                            room_id: r.room.room_id.clone(),
                            seq,
                            sender_id,
                            text,
                            occurred_at: Db::micros(at),
                            edited: r.last_edited.unwrap_or(false),
                            deleted: r.last_deleted.unwrap_or(false),
                        }),
                        _ => None,
                    };
                    MyRoom {
                        room: r.room.into_room(Vec::new()),
                        read_seq: r.read_seq,
                        unread: count(r.unread),
                        last_message,
                    }
                })
                .collect()
        });
        let ids: Vec<String> = rooms.iter().map(|r| r.room.room_id.clone()).collect();
        let mut tags = self.tags_of(&ids).await?;
        for r in &mut rooms {
            r.room.tags = tags.remove(&r.room.room_id).unwrap_or_default();
        }
        Ok(rooms)
    }

    /// Open group rooms having every one of `tags`, by room id after `after`, at most `limit`.
    pub async fn search_rooms(
        &self,
        tags: &[String],
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Room>, StoreError> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        // The tags' binds follow the fixed ones: $1 tag count, $2 limit and, on a later page, $3 after.
        let sql = match after {
            None => with_bind_list(SEARCH_ROOMS, 3, tags.len()),
            Some(_) => with_bind_list(SEARCH_ROOMS_AFTER, 4, tags.len()),
        };
        let rows: Vec<RoomRow> = on_pool!(self, |pool, Db| {
            let mut q = sqlx::query_as(&sql).bind(tags.len() as i64).bind(i64::from(limit));
            if let Some(after) = after {
                q = q.bind(Db::text(after));
            }
            for t in tags {
                q = q.bind(Db::text(t));
            }
            q.fetch_all(pool).await?
        });
        let ids: Vec<String> = rows.iter().map(|r| r.room_id.clone()).collect();
        let mut all = self.tags_of(&ids).await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let tags = all.remove(&r.room_id).unwrap_or_default();
                r.into_room(tags)
            })
            .collect())
    }

    /// A page of `room`'s history, newest first: messages with a seq below `before` (all when
    /// `None`) and below `end` (what the caller knows to be completely stored), at most `limit`.
    pub async fn room_messages(
        &self,
        room_id: &str,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(on_pool!(self, |pool, Db| {
            let rows: Vec<MessageRow<<Db as Dialect>::Time>> = sqlx::query_as(MESSAGES)
                .bind(Db::text(room_id))
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
            rows.into_iter().map(MessageRow::into_message::<Db>).collect()
        }))
    }

    /// One stored message.
    pub async fn chat_message(&self, message_id: &str) -> Result<Option<StoredMessage>, StoreError> {
        Ok(on_pool!(self, |pool, Db| {
            let row: Option<MessageRow<<Db as Dialect>::Time>> =
                sqlx::query_as(MESSAGE).bind(Db::text(message_id)).fetch_optional(pool).await?;
            row.map(MessageRow::into_message::<Db>)
        }))
    }

    /// Moves `user`'s read position in `room` up to `seq` (never back); the position and unread count
    /// after it, or `None` when `user` is not a member.
    pub async fn mark_room_read(&self, room_id: &str, user: &str, seq: i64) -> Result<Option<(i64, u64)>, StoreError> {
        let n = on_pool!(self, |pool, Db| {
            sqlx::query(MARK_READ)
                .bind(Db::text(room_id))
                .bind(Db::text(user))
                .bind(seq)
                .execute(pool)
                .await?
                .rows_affected()
        });
        if n == 0 {
            return Ok(None);
        }
        self.room_unread(room_id, user).await
    }

    /// `user`'s read position and unread count in `room` (`None`: not a member). Unread counts
    /// others' messages after the read position that are not deleted.
    pub async fn room_unread(&self, room_id: &str, user: &str) -> Result<Option<(i64, u64)>, StoreError> {
        let row: Option<(i64, i64)> = on_pool!(self, |pool, Db| {
            sqlx::query_as(UNREAD).bind(Db::text(room_id)).bind(Db::text(user)).fetch_optional(pool).await?
        });
        Ok(row.map(|(read, unread)| (read, count(unread))))
    }
}
