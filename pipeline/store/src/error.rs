//! Errors of the store, each saying whether a retry can help and whether the data itself was
//! refused (classified by SQLSTATE on PostgreSQL and by result code on SQLite, never by message).

use tidings_core::stage::{StageError, System};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused the values written (PostgreSQL classes 22, 23 and 54, SQLite
    /// CONSTRAINT, TOOBIG and MISMATCH): the same rows fail on every retry, other rows need not.
    #[error("the database rejected the data ({reason}): {source}")]
    Rejected {
        /// Stable short name of the refusal (`db-<SQLSTATE>-<name>`, `db-sqlite-<name>`), e.g.
        /// `db-54000-program-limit-exceeded`: a dead letter's reason and a metric label.
        reason: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// Anything else: schema or privilege problems (undefined table, 42501, …) that only an
    /// operator can fix.
    #[error("database error: {0}")]
    Query(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// What a database error says about the operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// The same operation may succeed later.
    Retriable,
    /// The values themselves were refused.
    Data(&'static str),
    /// Configuration, schema, privileges or a bug: retrying or splitting cannot help.
    Fatal,
}

impl StoreError {
    /// Classifies a sqlx error: connection-level failures are retriable, refused values are
    /// [`StoreError::Rejected`], the rest are not retriable.
    pub fn from_sqlx(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_)
            | sqlx::Error::Tls(_) => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                let class = if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    code.parse().map_or(Class::Fatal, |c| sqlite_class(c, db.kind()))
                } else {
                    postgres_class(&code)
                };
                match class {
                    Class::Retriable => StoreError::Unavailable(e),
                    Class::Data(reason) => StoreError::Rejected { reason, source: e },
                    Class::Fatal => StoreError::Query(e),
                }
            }
            _ => StoreError::Query(e),
        }
    }

    /// Whether the same operation may succeed later.
    pub fn is_retriable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// The refusal's short name if the database rejected the data written (see
    /// [`StoreError::Rejected`]); such a write may succeed without some of its rows.
    pub fn rejection(&self) -> Option<&'static str> {
        match self {
            StoreError::Rejected { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// PostgreSQL by SQLSTATE (Appendix A of its manual).
fn postgres_class(code: &str) -> Class {
    match code {
        // Serialization failure, statement completion unknown, deadlock, lock not available.
        "40001" | "40003" | "40P01" | "55P03" => Class::Retriable,
        "22001" => Class::Data("db-22001-string-data-right-truncation"),
        "22003" => Class::Data("db-22003-numeric-value-out-of-range"),
        "22007" => Class::Data("db-22007-invalid-datetime-format"),
        "22008" => Class::Data("db-22008-datetime-field-overflow"),
        "22021" => Class::Data("db-22021-character-not-in-repertoire"),
        "22P02" => Class::Data("db-22P02-invalid-text-representation"),
        "22P05" => Class::Data("db-22P05-untranslatable-character"),
        "23502" => Class::Data("db-23502-not-null-violation"),
        "23503" => Class::Data("db-23503-foreign-key-violation"),
        "23505" => Class::Data("db-23505-unique-violation"),
        "23514" => Class::Data("db-23514-check-violation"),
        "23P01" => Class::Data("db-23P01-exclusion-violation"),
        "54000" => Class::Data("db-54000-program-limit-exceeded"),
        "54001" => Class::Data("db-54001-statement-too-complex"),
        _ => match code.get(..2) {
            // Connection exceptions, insufficient resources (disk full, out of memory, too many
            // connections), operator intervention (shutdown, cannot connect now).
            Some("08" | "53") => Class::Retriable,
            _ if code.starts_with("57P") => Class::Retriable,
            // Data exception, integrity constraint violation, program limit exceeded. The store's
            // own idempotent paths (`ON CONFLICT … DO NOTHING`) never raise 23505.
            Some("22") => Class::Data("db-22-data-exception"),
            Some("23") => Class::Data("db-23-integrity-constraint-violation"),
            Some("54") => Class::Data("db-54-program-limit-exceeded"),
            // 42 (undefined table or column, insufficient privilege), 3D, 28, XX, …: an operator's.
            _ => Class::Fatal,
        },
    }
}

/// SQLite by (extended) result code; the primary code is the low byte.
fn sqlite_class(code: i32, kind: sqlx::error::ErrorKind) -> Class {
    use sqlx::error::ErrorKind;
    match code & 0xff {
        // BUSY and LOCKED, including their extended codes (BUSY_RECOVERY 261, BUSY_SNAPSHOT 517,
        // BUSY_TIMEOUT 773, LOCKED_SHAREDCACHE 262, …).
        5 | 6 => Class::Retriable,
        // A string or blob over SQLITE_MAX_LENGTH.
        18 => Class::Data("db-sqlite-toobig"),
        19 => Class::Data(match kind {
            ErrorKind::UniqueViolation => "db-sqlite-constraint-unique",
            ErrorKind::ForeignKeyViolation => "db-sqlite-constraint-foreignkey",
            ErrorKind::NotNullViolation => "db-sqlite-constraint-notnull",
            ErrorKind::CheckViolation => "db-sqlite-constraint-check",
            // Trigger (RAISE), primary key, rowid, …
            _ => "db-sqlite-constraint",
        }),
        20 => Class::Data("db-sqlite-mismatch"),
        _ => Class::Fatal,
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::from_sqlx(e)
    }
}

/// To a stage, unusable store settings are configuration; anything else is the store failing,
/// retried when [`StoreError::is_retriable`] says so.
impl From<StoreError> for StageError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Config(m) => StageError::configuration(format!("store: {m}")),
            e => StageError::external(System::Store, e.is_retriable(), e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::error::ErrorKind;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use std::time::Duration;

    #[test]
    fn sqlite_busy_and_locked_are_retriable_with_their_extended_codes() {
        for code in [5, 6, 261, 517, 773, 262, 518] {
            assert_eq!(sqlite_class(code, ErrorKind::Other), Class::Retriable, "{code}");
        }
        for code in [1, 19, 2067, 1555, 11] {
            assert_ne!(sqlite_class(code, ErrorKind::Other), Class::Retriable, "{code}");
        }
        assert_eq!(sqlite_class(18, ErrorKind::Other), Class::Data("db-sqlite-toobig"));
        assert_eq!(sqlite_class(20, ErrorKind::Other), Class::Data("db-sqlite-mismatch"));
        assert_eq!(sqlite_class(2067, ErrorKind::UniqueViolation), Class::Data("db-sqlite-constraint-unique"));
        // SQLITE_ERROR (no such table, syntax) and SQLITE_CORRUPT: an operator's.
        assert_eq!(sqlite_class(1, ErrorKind::Other), Class::Fatal);
        assert_eq!(sqlite_class(11, ErrorKind::Other), Class::Fatal);
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

    #[test]
    fn sqlstates_are_sorted_into_retriable_data_and_fatal() {
        for code in ["08006", "08001", "53300", "53100", "57P01", "57P03", "40001", "40P01", "55P03"] {
            assert_eq!(postgres_class(code), Class::Retriable, "{code}");
        }
        for (code, reason) in [
            ("54000", "db-54000-program-limit-exceeded"),
            ("22001", "db-22001-string-data-right-truncation"),
            ("22021", "db-22021-character-not-in-repertoire"),
            ("22P02", "db-22P02-invalid-text-representation"),
            ("23514", "db-23514-check-violation"),
            ("23505", "db-23505-unique-violation"),
            ("22012", "db-22-data-exception"),
            ("23000", "db-23-integrity-constraint-violation"),
            ("54011", "db-54-program-limit-exceeded"),
        ] {
            assert_eq!(postgres_class(code), Class::Data(reason), "{code}");
        }
        for code in ["42P01", "42703", "42501", "3D000", "28P01", "XX000", "0A000", ""] {
            assert_eq!(postgres_class(code), Class::Fatal, "{code}");
        }
    }

    /// Real errors of a SQLite connection, classified from their result codes.
    #[tokio::test]
    async fn sqlite_constraint_errors_are_rejections_and_a_missing_table_is_fatal() {
        let pool = SqlitePoolOptions::new().connect("sqlite::memory:").await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL CHECK (length(v) < 5));
             CREATE TRIGGER t_guard BEFORE INSERT ON t WHEN NEW.v = 'no' BEGIN SELECT RAISE(ABORT, 'refused'); END;
             INSERT INTO t VALUES (1, 'a');",
        )
        .execute(&pool)
        .await
        .unwrap();
        for (sql, reason) in [
            ("INSERT INTO t VALUES (1, 'b')", "db-sqlite-constraint-unique"),
            ("INSERT INTO t VALUES (2, NULL)", "db-sqlite-constraint-notnull"),
            ("INSERT INTO t VALUES (3, 'toolong')", "db-sqlite-constraint-check"),
            ("INSERT INTO t VALUES (4, 'no')", "db-sqlite-constraint"),
        ] {
            let e = StoreError::from(sqlx::query(sql).execute(&pool).await.unwrap_err());
            assert_eq!(e.rejection(), Some(reason), "{sql}: {e}");
            assert!(!e.is_retriable());
        }
        let e = StoreError::from(sqlx::query("INSERT INTO missing VALUES (1)").execute(&pool).await.unwrap_err());
        assert!(matches!(e, StoreError::Query(_)), "{e:?}");
    }

    /// Real PostgreSQL errors: an index row over the btree limit (54000), bad text for an integer
    /// (22P02) and an over-long varchar (22001) are rejections; a missing table is fatal.
    #[tokio::test]
    async fn postgres_data_errors_are_rejections_and_a_missing_table_is_fatal() {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&crate::testing::admin_url()).await.unwrap();
        sqlx::raw_sql("CREATE TEMP TABLE t (k text, v varchar(3)); CREATE INDEX ON t (k);")
            .execute(&mut conn)
            .await
            .unwrap();
        let long: String = (0..400).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
        let e = StoreError::from(
            sqlx::query("INSERT INTO t (k) VALUES ($1)").bind(&long).execute(&mut conn).await.unwrap_err(),
        );
        assert_eq!(e.rejection(), Some("db-54000-program-limit-exceeded"), "{e}");
        let e = StoreError::from(sqlx::query("SELECT 'x1'::int").execute(&mut conn).await.unwrap_err());
        assert_eq!(e.rejection(), Some("db-22P02-invalid-text-representation"), "{e}");
        let e =
            StoreError::from(sqlx::query("INSERT INTO t (v) VALUES ('abcd')").execute(&mut conn).await.unwrap_err());
        assert_eq!(e.rejection(), Some("db-22001-string-data-right-truncation"), "{e}");
        let e = StoreError::from(sqlx::query("SELECT * FROM missing_table").execute(&mut conn).await.unwrap_err());
        assert!(matches!(e, StoreError::Query(_)) && !e.is_retriable(), "{e:?}");
    }

    /// A stage restarts on what the store says may pass, and ends on what an operator must fix.
    #[test]
    fn a_stage_retries_only_what_the_store_calls_retriable() {
        use tidings_core::stage::Domain;
        let stage = |e: StoreError| {
            let e = StageError::from(e);
            (e.domain(), e.is_retriable())
        };
        let store = Domain::External(System::Store);
        assert_eq!(stage(StoreError::Unavailable(sqlx::Error::PoolTimedOut)), (store, true));
        let undefined = StoreError::Query(sqlx::Error::RowNotFound);
        assert_eq!(stage(undefined), (store, false));
        let refused = StoreError::Rejected { reason: "db-sqlite-toobig", source: sqlx::Error::RowNotFound };
        assert_eq!(stage(refused), (store, false));
        assert_eq!(stage(StoreError::Config("unsupported URL scheme".into())), (Domain::Configuration, false));
        let kept = StageError::from(StoreError::Query(sqlx::Error::RowNotFound));
        assert!(matches!(kept.source_as::<StoreError>(), Some(StoreError::Query(_))), "{kept:?}");
    }
}
