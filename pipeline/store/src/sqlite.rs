//! SQLite backend of the store (the embedded default). Batches are written as chunked multi-row
//! `INSERT OR IGNORE` statements.

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use super::{Batch, Dialect, WriteStats};
use crate::error::StoreError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const INSERT_NOTIFICATIONS: &str = include_str!("sql/sqlite/insert_notifications.sql");
const INSERT_CHAT: &str = include_str!("sql/sqlite/insert_chat.sql");
const ADD_SEGMENT_MEMBERS: &str = include_str!("sql/sqlite/add_segment_members.sql");

/// Rows per multi-row statement: 14 parameters each stays far below SQLite's 32766-variable limit,
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
        // Each multi-row INSERT keeps a statement journal of the pages it touches; on the default
        // temp_store it spills past 64 KiB into a temp file, and those pwrite calls were over a
        // third of SQLite's CPU during the broadcast benchmark (perf). In memory it is a few MiB.
        .pragma("temp_store", "memory")
        // A 32 MiB page cache (default 2 MiB, allocated as used): random notification ids touch
        // pages all over the indexes, and a small cache spills them to the WAL mid-batch.
        // `bash .ci/bench persist`, SQLite rows/s: 36-46k before these two, 58-64k with the
        // journal in memory, 70-71k with this too (78-80k with 64 MiB).
        .pragma("cache_size", "-32768")
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new().max_connections(4).connect_with(opts).await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

impl Dialect for sqlx::Sqlite {
    /// Lowercase hyphenated text (the schema's `id text`), not sqlx's 16-byte blob for a `Uuid`.
    type Id = uuid::fmt::Hyphenated;
    type Time = i64;

    fn text(s: &str) -> Cow<'_, str> {
        Cow::Borrowed(s)
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp_micros()
    }

    fn micros(t: i64) -> i64 {
        t
    }

    async fn insert_rows(conn: &mut SqliteConnection, batch: &Batch) -> Result<WriteStats, StoreError> {
        let mut stats = WriteStats::default();
        for chunk in batch.notifications.chunks(ROWS_PER_INSERT) {
            let mut q = QueryBuilder::<Sqlite>::new(INSERT_NOTIFICATIONS);
            q.push_values(chunk, |mut row, s| {
                let n = &s.notification;
                row.push_bind(n.notification_id.hyphenated())
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
                    .push_bind(s.stream_offset)
                    .push_bind(n.category.as_str());
            });
            stats.notifications_inserted += q.build().execute(&mut *conn).await?.rows_affected();
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
            stats.chat_inserted += q.build().execute(&mut *conn).await?.rows_affected();
        }
        Ok(stats)
    }
}

/// Adds a batch of users to segment version `version` in one transaction, ignoring existing ones;
/// returns how many were new.
pub async fn add_version_members(pool: &SqlitePool, version: i64, users: &[String]) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let mut added = 0;
    for chunk in users.chunks(MEMBERS_PER_STATEMENT) {
        let mut q = QueryBuilder::<Sqlite>::new(ADD_SEGMENT_MEMBERS);
        q.push_values(chunk, |mut row, u| {
            row.push_bind(version).push_bind(u.as_str());
        });
        added += q.build().execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(added)
}
