//! PostgreSQL backend of the store. Batches go through binary `COPY` into per-connection temporary
//! staging tables, then one `INSERT … SELECT … ON CONFLICT DO NOTHING` per table.

use sqlx::postgres::PgPoolOptions;
use sqlx::{Executor, PgConnection, PgPool};
use std::borrow::Cow;
use std::time::Duration;

use super::copy::{CopyEncoder, CopyError};
use super::{Batch, ChatMessage, Dialect, StoredNotification, WriteStats};
use crate::error::StoreError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const STAGING: &str = include_str!("sql/postgres/staging.sql");
const INSERT_NOTIFICATIONS: &str = include_str!("sql/postgres/insert_notifications.sql");
const INSERT_CHAT: &str = include_str!("sql/postgres/insert_chat.sql");
const COPY_NOTIFICATIONS: &str = include_str!("sql/postgres/copy_notifications_staging.sql");
const COPY_CHAT: &str = include_str!("sql/postgres/copy_chat_staging.sql");
const COPY_USERS: &str = include_str!("sql/postgres/copy_users_staging.sql");
const ADD_SEGMENT_MEMBERS: &str = include_str!("sql/postgres/add_segment_members.sql");

/// COPY data is sent whenever this much is encoded, bounding memory for any batch size.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// Connects and migrates. Every pooled connection creates its staging tables once, on connect.
pub async fn connect(url: &str) -> Result<PgPool, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                // A bare string has no arguments, so it goes through the simple-query protocol, which
                // accepts the several statements of the file (`raw_sql` trips a lifetime issue here).
                conn.execute(STAGING).await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// PostgreSQL `text` cannot hold NUL characters; storing U+FFFD instead keeps one such value from
/// failing its whole batch forever. Applied to every text written or compared, so lookups match.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// Streams `rows` into `COPY … FROM STDIN (FORMAT binary)` in ~1 MiB chunks; returns the rows copied.
async fn copy_rows<T>(
    conn: &mut PgConnection,
    statement: &str,
    rows: &[T],
    mut encode: impl FnMut(&mut CopyEncoder, &T) -> Result<(), CopyError>,
) -> Result<u64, StoreError> {
    let mut copy = conn.copy_in_raw(statement).await?;
    let mut enc = CopyEncoder::with_capacity(COPY_CHUNK_BYTES + COPY_CHUNK_BYTES / 4);
    for row in rows {
        if let Err(e) = encode(&mut enc, row) {
            // End the COPY properly so the connection stays usable; the caller's transaction rolls back.
            copy.abort(e.to_string()).await?;
            return Err(e.into());
        }
        if enc.len() >= COPY_CHUNK_BYTES {
            copy.send(enc.take()).await?;
        }
    }
    copy.send(enc.finish()).await?;
    Ok(copy.finish().await?)
}

/// One `notifications_staging` row; field order is the staging table's column order.
fn encode_notification(enc: &mut CopyEncoder, s: &StoredNotification) -> Result<(), CopyError> {
    let n = &s.notification;
    enc.begin_row(14);
    enc.uuid(&n.notification_id);
    enc.text(&pg_text(&n.user_id))?;
    enc.text(&pg_text(&n.kind))?;
    enc.text(&pg_text(&n.title))?;
    enc.text(&pg_text(&n.body))?;
    enc.opt_text(n.link.as_deref().map(pg_text).as_deref())?;
    enc.text(&pg_text(&n.source_event_id))?;
    enc.timestamptz_unix_micros(n.occurred_at);
    enc.text(&pg_text(&n.source_topic))?;
    enc.i32(n.source_partition);
    enc.i64(n.source_offset);
    enc.i32(s.stream_partition);
    enc.i64(s.stream_offset);
    enc.text(&pg_text(&n.category))?;
    Ok(())
}

/// One `chat_staging` row.
fn encode_chat(enc: &mut CopyEncoder, m: &ChatMessage) -> Result<(), CopyError> {
    enc.begin_row(7);
    enc.text(&pg_text(&m.message_id))?;
    enc.text(&pg_text(&m.room_id))?;
    enc.text(&pg_text(&m.sender_id))?;
    enc.text(&pg_text(&m.text))?;
    enc.timestamptz_unix_micros(m.occurred_at);
    enc.i32(m.source_partition);
    enc.i64(m.source_offset);
    Ok(())
}

impl Dialect for sqlx::Postgres {
    type Id = uuid::Uuid;
    type Time = chrono::DateTime<chrono::Utc>;

    fn text(s: &str) -> Cow<'_, str> {
        pg_text(s)
    }

    fn now() -> Self::Time {
        chrono::Utc::now()
    }

    fn micros(t: Self::Time) -> i64 {
        t.timestamp_micros()
    }

    async fn insert_rows(conn: &mut PgConnection, batch: &Batch) -> Result<WriteStats, StoreError> {
        let mut stats = WriteStats::default();
        if !batch.notifications.is_empty() {
            copy_rows(conn, COPY_NOTIFICATIONS, &batch.notifications, encode_notification).await?;
            stats.notifications_inserted = sqlx::query(INSERT_NOTIFICATIONS).execute(&mut *conn).await?.rows_affected();
        }
        if !batch.chat_messages.is_empty() {
            copy_rows(conn, COPY_CHAT, &batch.chat_messages, encode_chat).await?;
            stats.chat_inserted = sqlx::query(INSERT_CHAT).execute(&mut *conn).await?.rows_affected();
        }
        Ok(stats)
    }
}

/// Adds a batch of users to segment version `version` in one transaction; returns how many were
/// new. Segments can hold millions of users, hence COPY.
pub async fn add_version_members(pool: &PgPool, version: i64, users: &[String]) -> Result<u64, StoreError> {
    if users.is_empty() {
        return Ok(0);
    }
    let mut tx = pool.begin().await?;
    copy_rows(&mut tx, COPY_USERS, users, |enc, u| {
        enc.begin_row(1);
        enc.text(&pg_text(u))
    })
    .await?;
    let added = sqlx::query(ADD_SEGMENT_MEMBERS).bind(version).execute(&mut *tx).await?.rows_affected();
    tx.commit().await?;
    Ok(added)
}
