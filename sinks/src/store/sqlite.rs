//! SQLite backend of the store (the embedded default). Batches are written as chunked multi-row
//! `INSERT OR IGNORE` statements inside one transaction together with the offset upsert.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use super::{Batch, InboxItem, WriteStats};
use crate::error::StoreError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const INSERT_NOTIFICATIONS: &str = include_str!("sql/sqlite_insert_notifications.sql");
const INSERT_CHAT: &str = include_str!("sql/sqlite_insert_chat.sql");
const UPSERT_OFFSET: &str = include_str!("sql/sqlite_upsert_offset.sql");
const INBOX: &str = include_str!("sql/inbox.sql");
const INBOX_BEFORE: &str = include_str!("sql/inbox_before.sql");
const NOTIFICATIONS_AFTER: &str = include_str!("sql/notifications_after.sql");

/// Rows per multi-row statement: 13 parameters each stays far below SQLite's 32766-variable limit,
/// and a fixed chunk size means all full chunks share one cached prepared statement.
const ROWS_PER_INSERT: usize = 256;
/// Rows per membership statement (2 parameters each).
const MEMBERS_PER_STATEMENT: usize = 1000;

/// Opens (creating if needed) and migrates. WAL mode lets `tidings inbox` read while `tidings up` writes.
pub async fn connect(url: &str) -> Result<SqlitePool, StoreError> {
    let opts = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Config(format!("bad SQLite URL {url:?}: {e}")))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: a committed batch (rows + offsets) survives power loss, which exactly-once relies on.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// Ids are stored as lowercase hyphenated text (the schema's `id text`), not sqlx's 16-byte blob.
fn id_text(id: &uuid::Uuid) -> String {
    id.hyphenated().to_string()
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// See [`crate::Store::write_batch`].
pub async fn write_batch(pool: &SqlitePool, consumer: &str, batch: &Batch) -> Result<WriteStats, StoreError> {
    let mut stats = WriteStats::default();
    let mut tx = pool.begin().await?;
    for chunk in batch.notifications.chunks(ROWS_PER_INSERT) {
        let mut q = QueryBuilder::<Sqlite>::new(INSERT_NOTIFICATIONS);
        q.push_values(chunk, |mut row, s| {
            let n = &s.notification;
            row.push_bind(id_text(&n.notification_id))
                .push_bind(n.user_id.as_str())
                .push_bind(n.kind.as_str())
                .push_bind(n.title.as_str())
                .push_bind(n.body.as_str())
                .push_bind(n.link.as_deref())
                .push_bind(n.source_event_id.as_str())
                .push_bind(n.occurred_at)
                .push_bind(n.source_topic.as_str())
                .push_bind(n.source_partition)
                .push_bind(n.source_offset)
                .push_bind(s.stream_partition)
                .push_bind(s.stream_offset);
        });
        stats.notifications_inserted += q.build().execute(&mut *tx).await?.rows_affected();
    }
    for chunk in batch.chat_messages.chunks(ROWS_PER_INSERT) {
        let mut q = QueryBuilder::<Sqlite>::new(INSERT_CHAT);
        q.push_values(chunk, |mut row, m| {
            row.push_bind(m.message_id.as_str())
                .push_bind(m.room_id.as_str())
                .push_bind(m.sender_id.as_str())
                .push_bind(m.text.as_str())
                .push_bind(m.occurred_at)
                .push_bind(m.source_partition)
                .push_bind(m.source_offset);
        });
        stats.chat_inserted += q.build().execute(&mut *tx).await?.rows_affected();
    }
    for (topic, partition, next_offset) in batch.merged_offsets() {
        sqlx::query(UPSERT_OFFSET)
            .bind(consumer)
            .bind(topic)
            .bind(partition)
            .bind(next_offset)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(stats)
}

/// See [`crate::Store::load_offsets`].
pub async fn load_offsets(pool: &SqlitePool, consumer: &str, topic: &str) -> Result<HashMap<i32, i64>, StoreError> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM sink_offsets WHERE consumer = $1 AND topic = $2")
            .bind(consumer)
            .bind(topic)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Inserts `(key, user)` pairs into a two-column membership table, ignoring existing ones.
async fn insert_members(
    conn: &mut SqliteConnection,
    head: &'static str,
    key: &str,
    users: &[String],
) -> Result<u64, StoreError> {
    let mut added = 0;
    for chunk in users.chunks(MEMBERS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(head);
        q.push_values(chunk, |mut row, u| {
            row.push_bind(key).push_bind(u.as_str());
        });
        added += q.build().execute(&mut *conn).await?.rows_affected();
    }
    Ok(added)
}

/// See [`crate::Store::segment_members`].
pub async fn segment_members(pool: &SqlitePool, segment: &str) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT user_id FROM audience_segments WHERE segment = $1 ORDER BY user_id")
        .bind(segment)
        .fetch_all(pool)
        .await?)
}

/// See [`crate::Store::add_segment_members`].
pub async fn add_segment_members(pool: &SqlitePool, segment: &str, users: &[String]) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let added =
        insert_members(&mut tx, "INSERT OR IGNORE INTO audience_segments (segment, user_id) ", segment, users).await?;
    tx.commit().await?;
    Ok(added)
}

/// See [`crate::Store::room_members`].
pub async fn room_members(pool: &SqlitePool, room: &str) -> Result<Vec<String>, StoreError> {
    Ok(sqlx::query_scalar("SELECT user_id FROM room_members WHERE room_id = $1 ORDER BY user_id")
        .bind(room)
        .fetch_all(pool)
        .await?)
}

/// See [`crate::Store::update_room`].
pub async fn update_room(pool: &SqlitePool, room: &str, add: &[String], remove: &[String]) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    insert_members(&mut tx, "INSERT OR IGNORE INTO room_members (room_id, user_id) ", room, add).await?;
    for chunk in remove.chunks(MEMBERS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new("DELETE FROM room_members WHERE room_id = ");
        q.push_bind(room).push(" AND user_id IN (");
        let mut list = q.separated(", ");
        for u in chunk {
            list.push_bind(u.as_str());
        }
        list.push_unseparated(")");
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

fn inbox_item(row: &SqliteRow) -> Result<InboxItem, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let notification_id = uuid::Uuid::parse_str(&id)
        .map_err(|e| sqlx::Error::ColumnDecode { index: "id".into(), source: Box::new(e) })?;
    Ok(InboxItem {
        notification: tidings_core::Notification {
            notification_id,
            user_id: row.try_get("user_id")?,
            kind: row.try_get("kind")?,
            title: row.try_get("title")?,
            body: row.try_get("body")?,
            link: row.try_get("link")?,
            source_event_id: row.try_get("source_event_id")?,
            occurred_at: row.try_get("occurred_at")?,
            source_topic: row.try_get("source_topic")?,
            source_partition: row.try_get("source_partition")?,
            source_offset: row.try_get("source_offset")?,
        },
        stream_partition: row.try_get("stream_partition")?,
        stream_offset: row.try_get("stream_offset")?,
        read: row.try_get("read")?,
    })
}

fn inbox_items(rows: Vec<SqliteRow>) -> Result<Vec<InboxItem>, StoreError> {
    Ok(rows.iter().map(inbox_item).collect::<Result<_, _>>()?)
}

/// See [`crate::Store::inbox`].
pub async fn inbox(
    pool: &SqlitePool,
    user: &str,
    before: Option<(i32, i64)>,
    limit: u32,
) -> Result<Vec<InboxItem>, StoreError> {
    let rows = match before {
        None => sqlx::query(INBOX).bind(user).bind(i64::from(limit)).fetch_all(pool).await?,
        Some((partition, offset)) => {
            sqlx::query(INBOX_BEFORE)
                .bind(user)
                .bind(partition)
                .bind(offset)
                .bind(i64::from(limit))
                .fetch_all(pool)
                .await?
        }
    };
    inbox_items(rows)
}

/// See [`crate::Store::unread_count`].
pub async fn unread_count(pool: &SqlitePool, user: &str) -> Result<u64, StoreError> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = $1 AND read_at IS NULL")
        .bind(user)
        .fetch_one(pool)
        .await?;
    Ok(count(n))
}

/// See [`crate::Store::mark_read`].
pub async fn mark_read(pool: &SqlitePool, user: &str, id: uuid::Uuid) -> Result<bool, StoreError> {
    let updated =
        sqlx::query("UPDATE notifications SET read_at = COALESCE(read_at, $3) WHERE id = $1 AND user_id = $2")
            .bind(id_text(&id))
            .bind(user)
            .bind(now_micros())
            .execute(pool)
            .await?
            .rows_affected();
    Ok(updated > 0)
}

/// See [`crate::Store::count_notifications`].
pub async fn count_notifications(pool: &SqlitePool) -> Result<u64, StoreError> {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications").fetch_one(pool).await?;
    Ok(count(n))
}

/// See [`crate::Store::notifications_after`].
pub async fn notifications_after(
    pool: &SqlitePool,
    user: &str,
    partition: i32,
    after_offset: i64,
    limit: u32,
) -> Result<Vec<InboxItem>, StoreError> {
    let rows = sqlx::query(NOTIFICATIONS_AFTER)
        .bind(user)
        .bind(partition)
        .bind(after_offset)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    inbox_items(rows)
}
