//! SQL persistence of the registry in the `registry_*` tables of the store, for PostgreSQL and
//! SQLite alike. The statements (`sql/`) are the same text for both backends (`$n` placeholders work
//! in both); only the connection types differ, which the `on_conn!` macro papers over.

use sqlx::pool::PoolConnection;
use sqlx::{Postgres, Row, Sqlite, Transaction};
use tidings_store::{Store, StoreError};

use super::Mutation;

/// Key of the PostgreSQL advisory lock that serializes registry writes across processes
/// ("tidingsr" in ASCII), so two instances never hand out the same id or version.
const WRITE_LOCK_KEY: i64 = 0x7469_6469_6e67_7372;

const LOCK_WRITES: &str = include_str!("sql/postgres/lock_writes.sql");
const INSERT_SCHEMA: &str = include_str!("sql/insert_schema.sql");
const INSERT_VERSION: &str = include_str!("sql/insert_version.sql");
const SOFT_DELETE_VERSION: &str = include_str!("sql/soft_delete_version.sql");
const HARD_DELETE_VERSION: &str = include_str!("sql/hard_delete_version.sql");
const PUT_LEVEL: &str = include_str!("sql/put_level.sql");
const DELETE_LEVEL: &str = include_str!("sql/delete_level.sql");
const LOAD_VERSIONS: &str = include_str!("sql/load_versions.sql");
const LOAD_SCHEMAS: &str = include_str!("sql/load_schemas.sql");
const LOAD_CONFIG: &str = include_str!("sql/load_config.sql");

pub(crate) struct SchemaRow {
    pub id: u32,
    pub schema_type: String,
    pub schema: String,
}

pub(crate) struct VersionRow {
    pub subject: String,
    pub version: u32,
    pub schema_id: u32,
    pub deleted: bool,
}

pub(crate) struct ConfigRow {
    pub subject: String,
    pub compatibility: String,
}

/// The full content of the registry tables.
pub(crate) struct Snapshot {
    pub schemas: Vec<SchemaRow>,
    pub versions: Vec<VersionRow>,
    pub config: Vec<ConfigRow>,
}

/// Runs `$body` with `$conn` bound to the backend's `&mut` connection.
macro_rules! on_conn {
    ($target:expr, |$conn:ident| $body:expr) => {
        match $target {
            Conn::Postgres($conn) => $body,
            Conn::Sqlite($conn) => $body,
        }
    };
}

/// A pooled connection or an open transaction of either backend.
enum Conn<P, S> {
    Postgres(P),
    Sqlite(S),
}

/// A write transaction holding the registry write lock.
pub(crate) struct Tx(Conn<Transaction<'static, Postgres>, Transaction<'static, Sqlite>>);

/// Reads the whole registry.
pub(crate) async fn load(store: &Store) -> Result<Snapshot, StoreError> {
    let mut conn: Conn<PoolConnection<Postgres>, PoolConnection<Sqlite>> = match store {
        Store::Postgres(pool) => Conn::Postgres(pool.acquire().await?),
        Store::Sqlite(pool) => Conn::Sqlite(pool.acquire().await?),
    };
    on_conn!(&mut conn, |c| LoadConn::load(&mut **c).await)
}

/// Opens a write transaction. On PostgreSQL it takes a transaction-scoped advisory lock first;
/// SQLite serializes writers by itself.
pub(crate) async fn begin(store: &Store) -> Result<Tx, StoreError> {
    let conn = match store {
        Store::Postgres(pool) => {
            let mut tx = pool.begin().await?;
            sqlx::query(LOCK_WRITES).bind(WRITE_LOCK_KEY).execute(&mut *tx).await?;
            Conn::Postgres(tx)
        }
        Store::Sqlite(pool) => Conn::Sqlite(pool.begin().await?),
    };
    Ok(Tx(conn))
}

impl Tx {
    pub(crate) async fn load(&mut self) -> Result<Snapshot, StoreError> {
        on_conn!(&mut self.0, |c| LoadConn::load(&mut **c).await)
    }

    pub(crate) async fn apply(&mut self, mutation: &Mutation) -> Result<(), StoreError> {
        match mutation {
            Mutation::InsertSchema { id, schema_type, text, key, .. } => {
                let id = to_db(*id)?;
                on_conn!(&mut self.0, |c| {
                    sqlx::query(INSERT_SCHEMA)
                        .bind(id)
                        .bind(schema_type)
                        .bind(text)
                        .bind(key)
                        .execute(&mut **c)
                        .await
                        .map(|_| ())
                })?;
            }
            Mutation::InsertVersion { subject, version, schema_id } => {
                let (version, schema_id) = (to_db(*version)?, to_db(*schema_id)?);
                on_conn!(&mut self.0, |c| {
                    sqlx::query(INSERT_VERSION)
                        .bind(subject)
                        .bind(version)
                        .bind(schema_id)
                        .bind(false)
                        .execute(&mut **c)
                        .await
                        .map(|_| ())
                })?;
            }
            Mutation::SoftDeleteVersion { subject, version } => {
                let version = to_db(*version)?;
                on_conn!(&mut self.0, |c| {
                    sqlx::query(SOFT_DELETE_VERSION)
                        .bind(true)
                        .bind(subject)
                        .bind(version)
                        .execute(&mut **c)
                        .await
                        .map(|_| ())
                })?;
            }
            Mutation::HardDeleteVersion { subject, version } => {
                let version = to_db(*version)?;
                on_conn!(&mut self.0, |c| {
                    sqlx::query(HARD_DELETE_VERSION).bind(subject).bind(version).execute(&mut **c).await.map(|_| ())
                })?;
            }
            Mutation::PutLevel { subject, level } => {
                on_conn!(&mut self.0, |c| {
                    sqlx::query(PUT_LEVEL).bind(subject).bind(level.as_str()).execute(&mut **c).await.map(|_| ())
                })?;
            }
            Mutation::DeleteLevel { subject } => {
                on_conn!(&mut self.0, |c| {
                    sqlx::query(DELETE_LEVEL).bind(subject).execute(&mut **c).await.map(|_| ())
                })?;
            }
        }
        Ok(())
    }

    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        on_conn!(self.0, |tx| tx.commit().await)?;
        Ok(())
    }
}

/// Reads the three tables over one connection, written once for both backends by `impl_load!`.
/// Versions are read before schemas: a version row is committed together with (or after) its
/// schema row and schemas are never deleted, so every version read references a schema that is
/// read too, even outside a snapshot transaction.
trait LoadConn {
    async fn load(&mut self) -> Result<Snapshot, StoreError>;
}

macro_rules! impl_load {
    ($conn:ty) => {
        impl LoadConn for $conn {
            async fn load(&mut self) -> Result<Snapshot, StoreError> {
                let versions = sqlx::query(LOAD_VERSIONS)
                    .fetch_all(&mut *self)
                    .await?
                    .iter()
                    .map(|row| {
                        Ok(VersionRow {
                            subject: row.try_get("subject")?,
                            version: from_db(row.try_get("version")?)?,
                            schema_id: from_db(row.try_get("schema_id")?)?,
                            deleted: row.try_get("deleted")?,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                let schemas = sqlx::query(LOAD_SCHEMAS)
                    .fetch_all(&mut *self)
                    .await?
                    .iter()
                    .map(|row| {
                        Ok(SchemaRow {
                            id: from_db(row.try_get("id")?)?,
                            schema_type: row.try_get("schema_type")?,
                            schema: row.try_get("schema")?,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                let config = sqlx::query(LOAD_CONFIG)
                    .fetch_all(&mut *self)
                    .await?
                    .iter()
                    .map(|row| {
                        Ok(ConfigRow { subject: row.try_get("subject")?, compatibility: row.try_get("compatibility")? })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()?;
                Ok(Snapshot { schemas, versions, config })
            }
        }
    };
}

impl_load!(sqlx::PgConnection);
impl_load!(sqlx::SqliteConnection);

/// Ids and versions are `integer` columns; ours are allocated from 1 upwards, so this only fails
/// past 2^31 - 1 of them.
fn to_db(n: u32) -> Result<i32, StoreError> {
    i32::try_from(n).map_err(|_| StoreError::Config(format!("registry number {n} exceeds the integer column range")))
}

fn from_db(n: i32) -> Result<u32, StoreError> {
    u32::try_from(n).map_err(|_| StoreError::Config(format!("negative registry number {n} in the store")))
}
