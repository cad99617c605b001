//! Errors of the store and the persistence stage, each saying whether a retry can help.

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Classifies a sqlx error: connection-level failures are retriable, the rest are not.
    pub fn from_sqlx(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_) => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => {
                // 08xxx connection exceptions, 53xxx insufficient resources, 57P0x operator intervention,
                // 40001/40P01 serialization failure and deadlock: all may succeed on retry.
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                let retriable = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    code.parse().is_ok_and(sqlite_retriable)
                } else {
                    code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57P")
                        || code == "40001"
                        || code == "40P01"
                };
                if retriable {
                    StoreError::Unavailable(e)
                } else {
                    StoreError::Query(e)
                }
            }
            _ => StoreError::Query(e),
        }
    }

    /// Whether the same operation may succeed later.
    pub fn is_retriable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// SQLite's BUSY and LOCKED, including their extended codes (BUSY_RECOVERY 261, BUSY_SNAPSHOT 517,
/// BUSY_TIMEOUT 773, LOCKED_SHAREDCACHE 262, …): the primary code is the low byte.
fn sqlite_retriable(code: i32) -> bool {
    matches!(code & 0xff, 5 | 6)
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from_sqlx(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use std::time::Duration;

    #[test]
    fn sqlite_busy_and_locked_are_retriable_with_their_extended_codes() {
        for code in [5, 6, 261, 517, 773, 262, 518] {
            assert!(sqlite_retriable(code), "{code}");
        }
        for code in [1, 19, 2067, 1555, 11] {
            assert!(!sqlite_retriable(code), "{code}");
        }
    }

    #[tokio::test]
    async fn a_write_blocked_by_another_writer_is_retriable() {
        let dir = tempfile::tempdir().unwrap();
        let opts = SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true)
            .busy_timeout(Duration::ZERO);
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(opts).await.unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER)").execute(&pool).await.unwrap();
        let mut holder = pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *holder).await.unwrap();
        let err = sqlx::query("INSERT INTO t VALUES (1)").execute(&pool).await.unwrap_err();
        let classified = StoreError::from_sqlx(err);
        assert!(classified.is_retriable(), "SQLITE_BUSY must be retried: {classified}");
        sqlx::query("ROLLBACK").execute(&mut *holder).await.unwrap();
    }
}
