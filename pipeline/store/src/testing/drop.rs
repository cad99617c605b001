//! The end of a database `fresh_postgres` made: the benchmarks drop theirs when they finish (tests
//! leave theirs to `.ci/test`, which drops every `tidings_t_*` database after the run).

use crate::{Store, StoreError};
use sqlx::Connection;

/// Closes `store`'s pool and drops the database `url` names, through [`super::admin_url`].
/// `WITH (FORCE)`: a connection the store's pool has not yet returned must not block the drop.
pub async fn drop_postgres(store: Store, url: &str) -> Result<(), StoreError> {
    if let Store::Postgres(pool) = &store {
        pool.close().await;
    }
    let name = url
        .rsplit('/')
        .next()
        .and_then(|n| n.split('?').next())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| StoreError::Config(format!("database URL {url:?} names no database")))?;
    let mut admin = sqlx::PgConnection::connect(&super::admin_url()).await?;
    // The name cannot be a bind parameter; quoted as an identifier so it is only ever a name.
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::raw_sql(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")).execute(&mut admin).await?;
    admin.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drops_the_database_fresh_postgres_made() {
        let (store, url) = super::super::fresh_postgres().await.unwrap();
        let name = url.rsplit('/').next().unwrap().to_string();
        let mut admin = sqlx::PgConnection::connect(&super::super::admin_url()).await.unwrap();
        let exists = "SELECT count(*) FROM pg_database WHERE datname = $1";
        let before: i64 = sqlx::query_scalar(exists).bind(&name).fetch_one(&mut admin).await.unwrap();
        assert_eq!(before, 1);
        drop_postgres(store, &url).await.unwrap();
        let after: i64 = sqlx::query_scalar(exists).bind(&name).fetch_one(&mut admin).await.unwrap();
        assert_eq!(after, 0, "{name} is still there");
    }
}
