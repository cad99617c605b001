//! The scheduler's table: records read from `tidings.scheduled`, kept until their release time,
//! then marked released (kept a while so a copy read again is not released twice) and purged.
//! Rows are looked up by the `tidings.scheduled` partition they were read from: its owner releases them.

use super::{around_generated, count, with_bind_list, Store, StoreError};

const INSERT: &str = include_str!("sql/scheduled_insert.sql");
const DUE: &str = include_str!("sql/scheduled_due.sql");
const MARK_RELEASED: &str = include_str!("sql/scheduled_mark_released.sql");
const PURGE: &str = include_str!("sql/scheduled_purge.sql");
const HELD: &str = include_str!("sql/scheduled_held.sql");

/// Rows per insert statement (9 parameters each, far below SQLite's 32,766 binds); ids per
/// mark-released statement.
const ROWS_PER_STATEMENT: usize = 1_000;

/// One held record as read from `tidings.scheduled`: when and where it goes, and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledRelease {
    /// The deterministic id (`tidings.release-id`): a record with a stored id is not kept again.
    pub release_id: String,
    /// The `tidings.scheduled` partition and offset it was read at.
    pub partition: i32,
    pub offset: i64,
    /// Microseconds since the Unix epoch.
    pub release_at: i64,
    /// The full topic name it is produced to.
    pub release_to: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// The headers produced with it, encoded by the caller (opaque to the store).
    pub headers: Vec<u8>,
}

type Row = (String, i32, i64, i64, String, Option<Vec<u8>>, Option<Vec<u8>>, Vec<u8>);

impl Store {
    /// Keeps `rows` (read at `now`), skipping ids already stored, released or not. Returns how many
    /// were new.
    pub async fn hold_releases(&self, rows: &[ScheduledRelease], now: i64) -> Result<u64, StoreError> {
        let (head, tail) = around_generated(INSERT);
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            let mut inserted = 0;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::<Db>::new(head);
                q.push_values(chunk, |mut r, x| {
                    r.push_bind(x.release_id.as_str())
                        .push_bind(x.partition)
                        .push_bind(x.offset)
                        .push_bind(x.release_at)
                        .push_bind(x.release_to.as_str())
                        .push_bind(x.key.as_deref())
                        .push_bind(x.value.as_deref())
                        .push_bind(x.headers.as_slice())
                        .push_bind(now);
                });
                q.push(tail);
                inserted += q.build().execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    /// The rows of `partitions` due at `now` and not released, oldest first, at most `limit`.
    pub async fn due_releases(
        &self,
        partitions: &[i32],
        now: i64,
        limit: usize,
    ) -> Result<Vec<ScheduledRelease>, StoreError> {
        if partitions.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let sql = with_bind_list(DUE, 3, partitions.len());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<Row> = on_pool!(self, |pool, _Db| {
            let mut q = sqlx::query_as(&sql).bind(now).bind(limit);
            for p in partitions {
                q = q.bind(*p);
            }
            q.fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .map(|(release_id, partition, offset, release_at, release_to, key, value, headers)| ScheduledRelease {
                release_id,
                partition,
                offset,
                release_at,
                release_to,
                key,
                value,
                headers,
            })
            .collect())
    }

    /// Marks the rows `ids` released at `at` (those not released yet). Returns how many it marked.
    pub async fn mark_released(&self, ids: &[&str], at: i64) -> Result<u64, StoreError> {
        let mut marked = 0;
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let sql = with_bind_list(MARK_RELEASED, 2, chunk.len());
            marked += on_pool!(self, |pool, _Db| {
                let mut q = sqlx::query(&sql).bind(at);
                for id in chunk {
                    q = q.bind(*id);
                }
                q.execute(pool).await?.rows_affected()
            });
        }
        Ok(marked)
    }

    /// Deletes at most `limit` rows released before `before`, oldest first. Returns how many.
    pub async fn purge_released(&self, before: i64, limit: usize) -> Result<u64, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_pool!(self, |pool, _Db| {
            Ok(sqlx::query(PURGE).bind(before).bind(limit).execute(pool).await?.rows_affected())
        })
    }

    /// How many rows of `partitions` are not released yet.
    pub async fn held_releases(&self, partitions: &[i32]) -> Result<u64, StoreError> {
        if partitions.is_empty() {
            return Ok(0);
        }
        let sql = with_bind_list(HELD, 1, partitions.len());
        let n: i64 = on_pool!(self, |pool, _Db| {
            let mut q = sqlx::query_scalar(&sql);
            for p in partitions {
                q = q.bind(*p);
            }
            q.fetch_one(pool).await?
        });
        Ok(count(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    on_both_backends!(
        rows_are_kept_once_and_released_when_due,
        due_rows_come_by_partition_oldest_first_in_batches,
        released_rows_are_purged_after_their_retention
    );

    fn row(id: &str, partition: i32, release_at: i64) -> ScheduledRelease {
        ScheduledRelease {
            release_id: id.into(),
            partition,
            offset: release_at,
            release_at,
            release_to: "t-notifications".into(),
            key: Some(b"user-1".to_vec()),
            value: Some(vec![0, 0, 0, 0, 1, 2, 3, 0xff]),
            headers: vec![9, 8, 7],
        }
    }

    async fn rows_are_kept_once_and_released_when_due(store: &Store) {
        let a = row("a", 0, 100);
        let mut no_key = row("b", 0, 200);
        no_key.key = None;
        no_key.value = None;
        assert_eq!(store.hold_releases(&[a.clone(), no_key.clone(), a.clone()], 1).await.unwrap(), 2);
        // Read again (a replay): nothing new, the first row stays as it was.
        let mut again = a.clone();
        again.release_at = 5;
        assert_eq!(store.hold_releases(&[again], 2).await.unwrap(), 0);
        assert_eq!(store.due_releases(&[0], 99, 10).await.unwrap(), vec![]);
        assert_eq!(store.due_releases(&[0], 100, 10).await.unwrap(), vec![a.clone()]);
        assert_eq!(store.due_releases(&[0], 1_000, 10).await.unwrap(), vec![a.clone(), no_key.clone()]);
        assert_eq!(store.held_releases(&[0]).await.unwrap(), 2);
        assert_eq!(store.mark_released(&["a"], 150).await.unwrap(), 1);
        assert_eq!(store.mark_released(&["a"], 160).await.unwrap(), 0, "released once");
        assert_eq!(store.due_releases(&[0], 1_000, 10).await.unwrap(), vec![no_key]);
        assert_eq!(store.held_releases(&[0]).await.unwrap(), 1);
        // A released id read again is not kept again: it is not due a second time.
        assert_eq!(store.hold_releases(&[a], 3).await.unwrap(), 0);
        assert_eq!(store.due_releases(&[0], 1_000, 10).await.unwrap().len(), 1);
        assert_eq!(store.held_releases(&[]).await.unwrap(), 0);
        assert_eq!(store.due_releases(&[], 1_000, 10).await.unwrap(), vec![]);
    }

    async fn due_rows_come_by_partition_oldest_first_in_batches(store: &Store) {
        // More rows than one insert statement holds, on three partitions.
        let rows: Vec<ScheduledRelease> = (0..(ROWS_PER_STATEMENT as i64 * 2 + 7))
            .map(|i| row(&format!("r{i:05}"), (i % 3) as i32, 3_000 - i))
            .collect();
        assert_eq!(store.hold_releases(&rows, 1).await.unwrap(), rows.len() as u64);
        let due = store.due_releases(&[1, 2], 2_000, 5).await.unwrap();
        let times: Vec<i64> = due.iter().map(|r| r.release_at).collect();
        let mut want: Vec<i64> = rows.iter().filter(|r| r.partition != 0).map(|r| r.release_at).collect();
        want.sort();
        assert_eq!(times, want[..5].to_vec(), "the oldest first, only partitions 1 and 2");
        assert!(due.iter().all(|r| r.partition != 0));
        let ids: Vec<&str> = rows.iter().filter(|r| r.partition != 0).map(|r| r.release_id.as_str()).collect();
        assert_eq!(store.mark_released(&ids, 2_500).await.unwrap(), ids.len() as u64);
        assert_eq!(store.due_releases(&[1, 2], 10_000, 10).await.unwrap(), vec![]);
        let left = store.held_releases(&[0, 1, 2]).await.unwrap();
        assert_eq!(left, (rows.len() - ids.len()) as u64);
    }

    async fn released_rows_are_purged_after_their_retention(store: &Store) {
        let rows: Vec<ScheduledRelease> = (0..5).map(|i| row(&format!("p{i}"), 0, 10 + i)).collect();
        store.hold_releases(&rows, 1).await.unwrap();
        store.mark_released(&["p0", "p1", "p2"], 100).await.unwrap();
        store.mark_released(&["p3"], 200).await.unwrap();
        assert_eq!(store.purge_released(100, 10).await.unwrap(), 0, "none released before 100");
        assert_eq!(store.purge_released(101, 2).await.unwrap(), 2, "at most the limit");
        assert_eq!(store.purge_released(101, 10).await.unwrap(), 1);
        assert_eq!(store.purge_released(1_000, 10).await.unwrap(), 1, "p3; p4 is not released");
        assert_eq!(store.held_releases(&[0]).await.unwrap(), 1);
        // A purged id is forgotten: read again, it is kept and released again.
        assert_eq!(store.hold_releases(&rows[..1], 2).await.unwrap(), 1);
    }
}
