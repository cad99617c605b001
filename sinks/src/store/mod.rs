//! The store: PostgreSQL in production, SQLite as the embedded default. One enum so callers stay
//! generic without boxed async traits; each backend's SQL lives in its own module.

use sqlx::{PgPool, SqlitePool};
use std::collections::HashMap;

use crate::error::StoreError;

pub mod copy;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

/// A notification plus where it sits on the `notifications` topic (its stream position).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNotification {
    pub notification: tidings_core::Notification,
    pub stream_partition: i32,
    pub stream_offset: i64,
}

/// One chat message as read from the `chat` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub message_id: String,
    pub room_id: String,
    pub sender_id: String,
    pub text: String,
    /// Microseconds since the Unix epoch.
    pub occurred_at: i64,
    pub source_partition: i32,
    pub source_offset: i64,
}

/// Next offset to read, per topic partition, as stored with the rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetUpdate {
    pub topic: String,
    pub partition: i32,
    pub next_offset: i64,
}

/// Everything one `write_batch` call commits atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub notifications: Vec<StoredNotification>,
    pub chat_messages: Vec<ChatMessage>,
    pub offsets: Vec<OffsetUpdate>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.notifications.is_empty() && self.chat_messages.is_empty() && self.offsets.is_empty()
    }

    /// The offsets with one entry per (topic, partition), keeping the highest: one upsert statement
    /// must not touch a row twice, and offsets never move backward anyway.
    pub(crate) fn merged_offsets(&self) -> Vec<(&str, i32, i64)> {
        let mut max: HashMap<(&str, i32), i64> = HashMap::with_capacity(self.offsets.len());
        for o in &self.offsets {
            let e = max.entry((o.topic.as_str(), o.partition)).or_insert(o.next_offset);
            *e = (*e).max(o.next_offset);
        }
        let mut out: Vec<_> = max.into_iter().map(|((t, p), o)| (t, p, o)).collect();
        // A fixed order keeps concurrent writers from deadlocking on the offset rows.
        out.sort_unstable();
        out
    }
}

/// Rows actually inserted by a `write_batch` (duplicates of stored rows are skipped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    pub notifications_inserted: u64,
    pub chat_inserted: u64,
}

/// A stored notification as a user's inbox shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxItem {
    pub notification: tidings_core::Notification,
    pub stream_partition: i32,
    pub stream_offset: i64,
    pub read: bool,
}

/// A connected, migrated store.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Store {
    /// Connects to `url` (`postgres://…` or `sqlite://path`), creating a SQLite file if needed,
    /// and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Store::Postgres(postgres::connect(url).await?)
        } else if url.starts_with("sqlite:") {
            Store::Sqlite(sqlite::connect(url).await?)
        } else {
            return Err(StoreError::Config(format!("database URL {url:?} is neither postgres://… nor sqlite:…")));
        };
        Ok(store)
    }

    /// Writes the batch's rows and offsets in one transaction, skipping rows already stored (by
    /// notification id / chat message id). Stored offsets only move forward.
    pub async fn write_batch(&self, consumer: &str, batch: &Batch) -> Result<WriteStats, StoreError> {
        match self {
            Store::Postgres(p) => postgres::write_batch(p, consumer, batch).await,
            Store::Sqlite(p) => sqlite::write_batch(p, consumer, batch).await,
        }
    }

    /// The stored next offset per partition of `topic` for `consumer`.
    pub async fn load_offsets(&self, consumer: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        match self {
            Store::Postgres(p) => postgres::load_offsets(p, consumer, topic).await,
            Store::Sqlite(p) => sqlite::load_offsets(p, consumer, topic).await,
        }
    }

    /// Forgets every offset stored for `consumer`: for a broker that starts empty (the embedded
    /// mock cluster), offsets of an earlier run point past the end and would hide new records.
    pub async fn forget_offsets(&self, consumer: &str) -> Result<u64, StoreError> {
        const SQL: &str = "DELETE FROM sink_offsets WHERE consumer = $1";
        Ok(match self {
            Store::Postgres(p) => sqlx::query(SQL).bind(consumer).execute(p).await?.rows_affected(),
            Store::Sqlite(p) => sqlx::query(SQL).bind(consumer).execute(p).await?.rows_affected(),
        })
    }

    /// Users of an audience segment, sorted.
    pub async fn segment_members(&self, segment: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Postgres(p) => postgres::segment_members(p, segment).await,
            Store::Sqlite(p) => sqlite::segment_members(p, segment).await,
        }
    }

    /// Adds users to a segment (idempotent); returns how many were new.
    pub async fn add_segment_members(&self, segment: &str, users: &[String]) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(p) => postgres::add_segment_members(p, segment, users).await,
            Store::Sqlite(p) => sqlite::add_segment_members(p, segment, users).await,
        }
    }

    /// Members of a chat room, sorted.
    pub async fn room_members(&self, room: &str) -> Result<Vec<String>, StoreError> {
        match self {
            Store::Postgres(p) => postgres::room_members(p, room).await,
            Store::Sqlite(p) => sqlite::room_members(p, room).await,
        }
    }

    /// Adds then removes room members in one transaction (a user in both lists ends up removed).
    pub async fn update_room(&self, room: &str, add: &[String], remove: &[String]) -> Result<(), StoreError> {
        match self {
            Store::Postgres(p) => postgres::update_room(p, room, add, remove).await,
            Store::Sqlite(p) => sqlite::update_room(p, room, add, remove).await,
        }
    }

    /// A page of `user`'s notifications, newest first (by stream partition, then stream offset).
    /// `before` is the (partition, offset) of the last item of the previous page.
    pub async fn inbox(
        &self,
        user: &str,
        before: Option<(i32, i64)>,
        limit: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        match self {
            Store::Postgres(p) => postgres::inbox(p, user, before, limit).await,
            Store::Sqlite(p) => sqlite::inbox(p, user, before, limit).await,
        }
    }

    /// How many of `user`'s notifications are unread.
    pub async fn unread_count(&self, user: &str) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(p) => postgres::unread_count(p, user).await,
            Store::Sqlite(p) => sqlite::unread_count(p, user).await,
        }
    }

    /// Marks notification `id` read if it is `user`'s (keeping the first read time); false if there
    /// is no such notification of that user.
    pub async fn mark_read(&self, user: &str, id: uuid::Uuid) -> Result<bool, StoreError> {
        match self {
            Store::Postgres(p) => postgres::mark_read(p, user, id).await,
            Store::Sqlite(p) => sqlite::mark_read(p, user, id).await,
        }
    }

    /// Total stored notifications.
    pub async fn count_notifications(&self) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(p) => postgres::count_notifications(p).await,
            Store::Sqlite(p) => sqlite::count_notifications(p).await,
        }
    }

    /// `user`'s notifications on stream `partition` after `after_offset`, oldest first (SSE resume).
    pub async fn notifications_after(
        &self,
        user: &str,
        partition: i32,
        after_offset: i64,
        limit: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        match self {
            Store::Postgres(p) => postgres::notifications_after(p, user, partition, after_offset, limit).await,
            Store::Sqlite(p) => sqlite::notifications_after(p, user, partition, after_offset, limit).await,
        }
    }

    /// Short name of the backend for log lines.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }
}
