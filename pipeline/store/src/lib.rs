//! The store (`tidings-store`): PostgreSQL in production, SQLite as the embedded default. Queries whose SQL both
//! accept are written once (`sql/`, one statement per file) and `on_pool!` compiles the same text for each pool (no
//! generic executor bounds); `postgres.rs` and `sqlite.rs` keep connecting, bulk writes (`sql/<backend>/`), types.

use sqlx::{PgPool, SqlitePool};
use std::borrow::Cow;
use std::collections::HashMap;

pub use crate::error::StoreError;

/// Runs `$body` on the pool `$store` holds, with the type `$db` naming that backend (a [`Dialect`]).
macro_rules! on_pool {
    ($store:expr, |$pool:ident, $db:ident| $body:expr) => {
        match $store {
            Store::Postgres($pool) => {
                type $db = sqlx::Postgres;
                $body
            }
            Store::Sqlite($pool) => {
                type $db = sqlx::Sqlite;
                $body
            }
        }
    };
}

// Declared before the modules whose tests use it (a macro's scope is textual).
#[cfg(test)]
/// Runs each named `async fn check(&Store)` once on PostgreSQL and once on SQLite.
macro_rules! on_both_backends {
    ($($check:ident),* $(,)?) => { $(
        mod $check {
            #[tokio::test]
            async fn postgres() {
                let (store, _url) = crate::testing::fresh_postgres().await.unwrap();
                super::$check(&store).await;
            }
            #[tokio::test]
            async fn sqlite() {
                let (store, _dir) = crate::testing::fresh_sqlite().await.unwrap();
                super::$check(&store).await;
            }
        }
    )* };
}

pub mod audience;
pub mod campaign_deliveries;
pub mod campaign_progress;
pub mod campaigns;
pub mod chat;
pub mod claims;
pub mod copy;
pub mod error;
pub mod postgres;
pub mod preferences;
pub mod replays;
pub mod scheduled;
pub mod segments;
pub mod sqlite;
pub mod testing;
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
    /// Edits and deletes, applied after the batch's messages are inserted, in order.
    pub chat_changes: Vec<chat::ChatChange>,
    pub offsets: Vec<OffsetUpdate>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.notifications.is_empty()
            && self.chat_messages.is_empty()
            && self.chat_changes.is_empty()
            && self.offsets.is_empty()
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

/// A user's unread inbox notifications: all of them, and per category.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnreadCounts {
    pub total: u64,
    pub by_category: Vec<(String, u64)>,
}

/// What the backends do differently behind the same SQL: column types, text, and bulk inserts.
trait Dialect: sqlx::Database {
    /// A notification id: `uuid` on PostgreSQL, hyphenated text on SQLite.
    type Id: From<uuid::Uuid> + Into<uuid::Uuid>;
    /// A timestamp: `timestamptz` on PostgreSQL, integer microseconds since the epoch on SQLite.
    type Time;
    /// A text value as written or compared.
    fn text(s: &str) -> Cow<'_, str>;
    fn now() -> Self::Time;
    fn micros(t: Self::Time) -> i64;
    /// Inserts the batch's notifications and chat messages, skipping stored ones (not its offsets).
    async fn insert_rows(conn: &mut Self::Connection, batch: &Batch) -> Result<WriteStats, StoreError>;
}

/// A row of `inbox.sql`, `inbox_before.sql` or `notifications_after.sql`, in a backend's id and time types.
#[derive(sqlx::FromRow)]
struct InboxRow<Id, Time> {
    id: Id,
    user_id: String,
    kind: String,
    title: String,
    body: String,
    link: Option<String>,
    source_event_id: String,
    occurred_at: Time,
    source_topic: String,
    source_partition: i32,
    source_offset: i64,
    stream_partition: i32,
    stream_offset: i64,
    read: bool,
}

type InboxRowOf<D> = InboxRow<<D as Dialect>::Id, <D as Dialect>::Time>;

fn inbox_items<D: Dialect>(rows: Vec<InboxRowOf<D>>) -> Vec<InboxItem> {
    rows.into_iter()
        .map(|r| InboxItem {
            notification: tidings_core::Notification {
                notification_id: r.id.into(),
                user_id: r.user_id,
                kind: r.kind,
                title: r.title,
                body: r.body,
                link: r.link,
                source_event_id: r.source_event_id,
                occurred_at: D::micros(r.occurred_at),
                source_topic: r.source_topic,
                source_partition: r.source_partition,
                source_offset: r.source_offset,
                data: None,
                inbox: true,
                category: String::new(),
                recipients: vec![],
            },
            stream_partition: r.stream_partition,
            stream_offset: r.stream_offset,
            read: r.read,
        })
        .collect()
}

const EDIT_MESSAGE: &str = include_str!("sql/chat_edit_message.sql");
const DELETE_MESSAGE: &str = include_str!("sql/chat_delete_message.sql");
const UPSERT_OFFSETS: &str = include_str!("sql/upsert_offsets.sql");
const LOAD_OFFSETS: &str = include_str!("sql/load_offsets.sql");
const FORGET_OFFSETS: &str = include_str!("sql/forget_offsets.sql");
const SET_OFFSETS: &str = include_str!("sql/set_offsets.sql");
const INBOX: &str = include_str!("sql/inbox.sql");
const INBOX_BEFORE: &str = include_str!("sql/inbox_before.sql");
const ARCHIVED: &str = include_str!("sql/archived.sql");
const ARCHIVED_BEFORE: &str = include_str!("sql/archived_before.sql");
const NOTIFICATION_POSITION: &str = include_str!("sql/notification_position.sql");
const MARK_ALL_READ: &str = include_str!("sql/mark_all_read.sql");
const ARCHIVE: &str = include_str!("sql/archive.sql");
const UNARCHIVE: &str = include_str!("sql/unarchive.sql");
const UNREAD_BY_CATEGORY: &str = include_str!("sql/unread_by_category.sql");
const NOTIFICATIONS_AFTER: &str = include_str!("sql/notifications_after.sql");
const UNREAD_COUNT: &str = include_str!("sql/unread_count.sql");
const MARK_READ: &str = include_str!("sql/mark_read.sql");
const COUNT_NOTIFICATIONS: &str = include_str!("sql/count_notifications.sql");
const STORED_POSITIONS: &str = include_str!("sql/stored_positions.sql");
const SEGMENT_PAGE: &str = include_str!("sql/segment_page.sql");
const SEGMENT_PAGE_AFTER: &str = include_str!("sql/segment_page_after.sql");
const ROOM_MEMBERS: &str = include_str!("sql/room_members.sql");

/// Marks where a statement file has a part only known at run time (VALUES rows, the binds of an
/// `IN (…)` list), which the code writes in its place; the fixed text stays in the file.
const GENERATED: &str = "/* generated */";

/// The text of statement `sql` before and after its generated part.
fn around_generated(sql: &'static str) -> (&'static str, &'static str) {
    sql.split_once(GENERATED).unwrap_or_else(|| panic!("statement without {GENERATED}: {sql}"))
}

/// Statement `sql` with `n` binds `$first, $first + 1, …` as its generated part: numbered after the
/// statement's fixed ones, as both backends accept (`QueryBuilder` writes `?` on SQLite, which
/// does not mix with `$n`).
fn with_bind_list(sql: &'static str, first: usize, n: usize) -> String {
    let (head, tail) = around_generated(sql);
    let mut out = String::with_capacity(sql.len() + 6 * n);
    out.push_str(head);
    for i in 0..n {
        if i > 0 {
            out.push_str(", ");
        }
        out.push('$');
        out.push_str(&(first + i).to_string());
    }
    out.push_str(tail);
    out
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
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
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            let stats = Db::insert_rows(&mut tx, batch).await?;
            for c in &batch.chat_changes {
                let q = match &c.text {
                    Some(text) => sqlx::query(EDIT_MESSAGE).bind(Db::text(text)),
                    None => sqlx::query(DELETE_MESSAGE),
                };
                q.bind(c.at).bind(Db::text(&c.message_id)).bind(Db::text(&c.sender_id)).execute(&mut *tx).await?;
            }
            let offsets = batch.merged_offsets();
            if !offsets.is_empty() {
                let (head, tail) = around_generated(UPSERT_OFFSETS);
                let mut q = sqlx::QueryBuilder::<Db>::new(head);
                q.push_values(&offsets, |mut row, &(topic, partition, next_offset)| {
                    row.push_bind(Db::text(consumer))
                        .push_bind(Db::text(topic))
                        .push_bind(partition)
                        .push_bind(next_offset);
                });
                q.push(tail);
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(stats)
        })
    }

    /// The stored next offset per partition of `topic` for `consumer`.
    pub async fn load_offsets(&self, consumer: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
        let rows: Vec<(i32, i64)> = on_pool!(self, |pool, Db| {
            sqlx::query_as(LOAD_OFFSETS).bind(Db::text(consumer)).bind(Db::text(topic)).fetch_all(pool).await?
        });
        Ok(rows.into_iter().collect())
    }

    /// Forgets every offset stored for `consumer`: for a broker that starts empty (the embedded
    /// mock cluster), offsets of an earlier run point past the end and would hide new records.
    pub async fn forget_offsets(&self, consumer: &str) -> Result<u64, StoreError> {
        Ok(on_pool!(self, |pool, Db| sqlx::query(FORGET_OFFSETS)
            .bind(Db::text(consumer))
            .execute(pool)
            .await?
            .rows_affected()))
    }

    /// Sets the stored next offsets of `consumer` to `offsets` (topic, partition, next offset), backward
    /// too, in one transaction: for `tidings offsets reset` while the stage is stopped.
    pub async fn set_offsets(&self, consumer: &str, offsets: &[(String, i32, i64)]) -> Result<(), StoreError> {
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            for (topic, partition, next_offset) in offsets {
                sqlx::query(SET_OFFSETS)
                    .bind(Db::text(consumer))
                    .bind(Db::text(topic))
                    .bind(*partition)
                    .bind(*next_offset)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// At most `limit` users of an audience segment's current version, sorted, strictly after `after`
    /// (the last user of the previous page): a large audience in pages, each one index range scan. A
    /// reader that must not see a replace midway pages a pinned version ([`Store::segment_version_page`]).
    pub async fn segment_members_page(
        &self,
        segment: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        Ok(on_pool!(self, |pool, Db| {
            let query = match after {
                None => sqlx::query_scalar(SEGMENT_PAGE).bind(Db::text(segment)),
                Some(after) => sqlx::query_scalar(SEGMENT_PAGE_AFTER).bind(Db::text(segment)).bind(Db::text(after)),
            };
            query.bind(i64::from(limit)).fetch_all(pool).await?
        }))
    }

    /// Members of a chat room, sorted.
    pub async fn room_members(&self, room: &str) -> Result<Vec<String>, StoreError> {
        self.user_ids(ROOM_MEMBERS, room).await
    }

    /// The user ids `sql` selects for its one text parameter `key`.
    async fn user_ids(&self, sql: &'static str, key: &str) -> Result<Vec<String>, StoreError> {
        Ok(on_pool!(self, |pool, Db| sqlx::query_scalar(sql).bind(Db::text(key)).fetch_all(pool).await?))
    }

    /// A page of `user`'s inbox (archived notifications left out), newest first (by stream partition,
    /// then stream offset). `before` is the (partition, offset) of the last item of the previous page.
    pub async fn inbox(
        &self,
        user: &str,
        before: Option<(i32, i64)>,
        limit: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        self.page(INBOX, INBOX_BEFORE, user, before, limit).await
    }

    /// A page of `user`'s archived notifications, in the inbox's order and with its cursor.
    pub async fn archived(
        &self,
        user: &str,
        before: Option<(i32, i64)>,
        limit: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        self.page(ARCHIVED, ARCHIVED_BEFORE, user, before, limit).await
    }

    /// A page of `first` (binds: user, limit) or, after a cursor, of `after_cursor` (binds: user,
    /// partition, offset, limit).
    async fn page(
        &self,
        first: &'static str,
        after_cursor: &'static str,
        user: &str,
        before: Option<(i32, i64)>,
        limit: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        Ok(on_pool!(self, |pool, Db| {
            let query = match before {
                None => sqlx::query_as::<_, InboxRowOf<Db>>(first).bind(Db::text(user)),
                Some((partition, offset)) => {
                    sqlx::query_as(after_cursor).bind(Db::text(user)).bind(partition).bind(offset)
                }
            };
            inbox_items::<Db>(query.bind(i64::from(limit)).fetch_all(pool).await?)
        }))
    }

    /// Marks read every unread inbox notification of `user` at or before notification `up_to` in
    /// the inbox's order (the newest one the client showed), so one stored meanwhile stays unread;
    /// archived ones are left as they are. Answers how many were marked, or `None` if `up_to` is
    /// not a notification of `user`.
    pub async fn mark_all_read(&self, user: &str, up_to: uuid::Uuid) -> Result<Option<u64>, StoreError> {
        Ok(on_pool!(self, |pool, Db| {
            let position: Option<(i32, i64)> = sqlx::query_as(NOTIFICATION_POSITION)
                .bind(<Db as Dialect>::Id::from(up_to))
                .bind(Db::text(user))
                .fetch_optional(pool)
                .await?;
            match position {
                None => None,
                Some((partition, offset)) => Some(
                    sqlx::query(MARK_ALL_READ)
                        .bind(Db::text(user))
                        .bind(partition)
                        .bind(offset)
                        .bind(Db::now())
                        .execute(pool)
                        .await?
                        .rows_affected(),
                ),
            }
        }))
    }

    /// Moves notification `id` out of `user`'s inbox into their archive (keeping the first archive
    /// time); false if there is no such notification of that user.
    pub async fn archive(&self, user: &str, id: uuid::Uuid) -> Result<bool, StoreError> {
        let updated = on_pool!(self, |pool, Db| {
            sqlx::query(ARCHIVE)
                .bind(<Db as Dialect>::Id::from(id))
                .bind(Db::text(user))
                .bind(Db::now())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// Moves notification `id` back into `user`'s inbox; false if there is no such notification of
    /// that user.
    pub async fn unarchive(&self, user: &str, id: uuid::Uuid) -> Result<bool, StoreError> {
        let updated = on_pool!(self, |pool, Db| {
            sqlx::query(UNARCHIVE)
                .bind(<Db as Dialect>::Id::from(id))
                .bind(Db::text(user))
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// How many of `user`'s inbox notifications (archived ones left out) are unread.
    pub async fn unread_count(&self, user: &str) -> Result<u64, StoreError> {
        Ok(count(on_pool!(self, |pool, Db| sqlx::query_scalar(UNREAD_COUNT)
            .bind(Db::text(user))
            .fetch_one(pool)
            .await?)))
    }

    /// How many of `user`'s inbox notifications are unread, in all and per category (sorted by
    /// category); one query. Those stored before categories existed (the empty category) count in
    /// the total only.
    pub async fn unread_counts(&self, user: &str) -> Result<UnreadCounts, StoreError> {
        let rows: Vec<(String, i64)> =
            on_pool!(self, |pool, Db| sqlx::query_as(UNREAD_BY_CATEGORY).bind(Db::text(user)).fetch_all(pool).await?);
        let total = rows.iter().map(|(_, n)| count(*n)).sum();
        let by_category = rows.into_iter().filter(|(c, _)| !c.is_empty()).map(|(c, n)| (c, count(n))).collect();
        Ok(UnreadCounts { total, by_category })
    }

    /// Marks notification `id` read if it is `user`'s (keeping the first read time); false if there
    /// is no such notification of that user.
    pub async fn mark_read(&self, user: &str, id: uuid::Uuid) -> Result<bool, StoreError> {
        let updated = on_pool!(self, |pool, Db| {
            sqlx::query(MARK_READ)
                .bind(<Db as Dialect>::Id::from(id))
                .bind(Db::text(user))
                .bind(Db::now())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(updated > 0)
    }

    /// Total stored notifications.
    pub async fn count_notifications(&self) -> Result<u64, StoreError> {
        Ok(count(on_pool!(self, |pool, _Db| sqlx::query_scalar(COUNT_NOTIFICATIONS).fetch_one(pool).await?)))
    }

    /// The stream positions (partition, offset) in `offsets` with at least one stored notification.
    pub async fn stored_positions(&self, offsets: std::ops::Range<i64>) -> Result<Vec<(i32, i64)>, StoreError> {
        Ok(on_pool!(self, |pool, _Db| sqlx::query_as(STORED_POSITIONS)
            .bind(offsets.start)
            .bind(offsets.end)
            .fetch_all(pool)
            .await?))
    }

    /// `user`'s notifications on stream `partition` after `after_offset`, oldest first (SSE resume).
    pub async fn notifications_after(
        &self,
        user: &str,
        partition: i32,
        after_offset: i64,
        limit: u32,
    ) -> Result<Vec<InboxItem>, StoreError> {
        Ok(on_pool!(self, |pool, Db| {
            let rows = sqlx::query_as(NOTIFICATIONS_AFTER)
                .bind(Db::text(user))
                .bind(partition)
                .bind(after_offset)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?;
            inbox_items::<Db>(rows)
        }))
    }

    /// Short name of the backend for log lines.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }
}
