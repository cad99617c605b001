//! Helpers for tests in every crate: a fresh, migrated PostgreSQL database per test.
//! The server is `TIDINGS_TEST_PG` (default `postgres://postgres@127.0.0.1:5432/postgres`).

use crate::{Store, StoreError};
use sqlx::Connection;

mod drop;
pub use drop::drop_postgres;

/// The admin URL tests create their databases through.
pub fn admin_url() -> String {
    std::env::var("TIDINGS_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Creates a new empty database, migrates it and returns the store and its URL.
pub async fn fresh_postgres() -> Result<(Store, String), StoreError> {
    let admin = admin_url();
    let name = format!("tidings_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
    conn.close().await?;
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    let url = format!("{base}/{name}");
    Ok((Store::connect(&url).await?, url))
}

/// A migrated SQLite store in a fresh temporary directory (deleted when the guard drops).
pub async fn fresh_sqlite() -> Result<(Store, tempfile::TempDir), StoreError> {
    let dir = tempfile::tempdir().map_err(|e| StoreError::Config(format!("temp dir: {e}")))?;
    let url = format!("sqlite://{}/tidings.db", dir.path().display());
    Ok((Store::connect(&url).await?, dir))
}
