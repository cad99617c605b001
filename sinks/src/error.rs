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
                if code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
                    || code == "40001" || code == "40P01"
                    // SQLite BUSY / LOCKED
                    || code == "5" || code == "6"
                {
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

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from_sqlx(e)
    }
}
