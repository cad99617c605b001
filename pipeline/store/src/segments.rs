//! Audience segments as versions: a load fills a version no reader sees, then one transaction makes it
//! current (replace), merges it (append) or subtracts it (remove); readers page a pinned version, so a
//! replace is seen whole or not at all. `csv` reads import files row by row into bounded batches.

use std::time::Duration;

use super::{count, Store};
use crate::error::StoreError;

pub mod csv;
pub use self::csv::{check_id, read_in_background, BadRow, Column, CsvIds, CsvRules, IdBatch};

const BEGIN: &str = include_str!("sql/segments_begin.sql");
const VERSION_EXISTS: &str = include_str!("sql/segments_version_exists.sql");
const CURRENT: &str = include_str!("sql/segments_current.sql");
const LIST: &str = include_str!("sql/segments_list.sql");
const TOUCH: &str = include_str!("sql/segments_touch.sql");
const RETIRE_CURRENT: &str = include_str!("sql/segments_retire_current.sql");
const SWITCH: &str = include_str!("sql/segments_switch.sql");
const MERGE: &str = include_str!("sql/segments_merge.sql");
const SUBTRACT: &str = include_str!("sql/segments_subtract.sql");
const RESIZE: &str = include_str!("sql/segments_resize.sql");
const DELETE: &str = include_str!("sql/segments_delete.sql");
const RETIRE: &str = include_str!("sql/segments_retire.sql");
const DROP_MEMBERS: &str = include_str!("sql/segments_drop_members.sql");
const DROP_VERSION: &str = include_str!("sql/segments_drop_version.sql");
const EXPIRED: &str = include_str!("sql/segments_expired.sql");
const VERSION_PAGE: &str = include_str!("sql/segments_version_page.sql");

/// Longest segment name accepted.
pub const MAX_NAME_BYTES: usize = 128;

/// How long a replaced or deleted version stays readable by default, for readers that pinned it
/// (a campaign's fan-out pages it for seconds; an hour leaves a wide margin).
pub const DEFAULT_KEEP_REPLACED: Duration = Duration::from_secs(3600);

/// Why a segment operation did nothing.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("bad segment name {0:?}: 1 to {MAX_NAME_BYTES} of A-Z a-z 0-9 . _ : -")]
    BadName(String),
    #[error("no segment {0:?}")]
    Unknown(String),
    /// The file's header row or first row cannot say where the user ids are.
    #[error("{0}")]
    Header(String),
    #[error("reading the CSV failed: {0}")]
    Read(String),
    /// The import was refused: nothing changed. `first` lists the first bad rows by line.
    #[error("{total} bad row(s), nothing changed; {}", list_bad(first))]
    BadRows { total: u64, first: Vec<BadRow> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for SegmentError {
    fn from(e: sqlx::Error) -> Self {
        SegmentError::Store(StoreError::from_sqlx(e))
    }
}

fn list_bad(rows: &[BadRow]) -> String {
    rows.iter().map(|r| format!("line {}: {}", r.line, r.problem)).collect::<Vec<_>>().join("; ")
}

/// Checks a segment name as given on the command line or in a URL.
pub fn check_name(name: &str) -> Result<(), SegmentError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SegmentError::BadName(name.to_string()))
    }
}

/// What a finished load does to its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentChange {
    /// The loaded users become the segment, in one switch (readers see the old or the new one).
    Replace,
    /// The loaded users join the segment (created if unknown).
    Append,
    /// The loaded users leave the segment (which must exist).
    Remove,
}

/// A segment as `list` and `show` describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub name: String,
    /// The current version, which a reader pins to page it.
    pub version: i64,
    pub size: u64,
    /// Last change, microseconds since the Unix epoch.
    pub updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct InfoRow {
    name: String,
    version: i64,
    size: i64,
    updated_at: i64,
}

impl From<InfoRow> for SegmentInfo {
    fn from(r: InfoRow) -> Self {
        SegmentInfo { name: r.name, version: r.version, size: count(r.size), updated_at: r.updated_at }
    }
}

/// The result of a finished load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentChanged {
    pub info: SegmentInfo,
    /// Members added (replace: the new size; append: new ones) or removed (remove).
    pub changed: u64,
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// A version being loaded: invisible to readers until [`SegmentLoad::finish`]. Dropped without
/// finishing (a killed import), it stays until a later finish's cleanup deletes it.
#[derive(Debug)]
pub struct SegmentLoad {
    store: Store,
    segment: String,
    version: i64,
    loaded: u64,
}

impl Store {
    /// Starts loading a new version of `segment`.
    pub async fn begin_segment_load(&self, segment: &str) -> Result<SegmentLoad, SegmentError> {
        check_name(segment)?;
        let version: i64 = on_pool!(self, |pool, _Db| sqlx::query_scalar(BEGIN)
            .bind(segment)
            .bind(now_micros())
            .fetch_one(pool)
            .await?);
        Ok(SegmentLoad { store: self.clone(), segment: segment.to_string(), version, loaded: 0 })
    }

    /// Segment `name`'s current version, size and last change; `None` if there is no such segment.
    pub async fn segment(&self, name: &str) -> Result<Option<SegmentInfo>, StoreError> {
        let row: Option<InfoRow> =
            on_pool!(self, |pool, _Db| sqlx::query_as(CURRENT).bind(name).fetch_optional(pool).await?);
        Ok(row.map(Into::into))
    }

    /// Segments by name after `after` (all from the start when `None`), at most `limit`.
    pub async fn segments(&self, after: Option<&str>, limit: u32) -> Result<Vec<SegmentInfo>, StoreError> {
        let rows: Vec<InfoRow> = on_pool!(self, |pool, _Db| sqlx::query_as(LIST)
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// At most `limit` users of segment version `version`, sorted, strictly after `after`; `None`
    /// once the version is gone (deleted after it was replaced and kept for its time), so a reader
    /// never takes a vanished version for a short one.
    pub async fn segment_version_page(
        &self,
        version: i64,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let page: Vec<String> = on_pool!(self, |pool, _Db| sqlx::query_scalar(VERSION_PAGE)
            .bind(version)
            .bind(after.unwrap_or(""))
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?);
        if page.len() < limit as usize && !self.version_exists(version).await? {
            return Ok(None);
        }
        Ok(Some(page))
    }

    async fn version_exists(&self, version: i64) -> Result<bool, StoreError> {
        let n: i64 =
            on_pool!(self, |pool, _Db| sqlx::query_scalar(VERSION_EXISTS).bind(version).fetch_one(pool).await?);
        Ok(n > 0)
    }

    /// Deletes segment `name`: readers that pinned its version may finish for `keep`. False if
    /// there was no such segment.
    pub async fn delete_segment(&self, name: &str, keep: Duration) -> Result<bool, StoreError> {
        let at = now_micros();
        let gone: Option<i64> = on_pool!(self, |pool, _Db| {
            let mut tx = pool.begin().await?;
            let version: Option<i64> = sqlx::query_scalar(DELETE).bind(name).fetch_optional(&mut *tx).await?;
            if let Some(v) = version {
                sqlx::query(RETIRE).bind(v).bind(at).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            version
        });
        self.drop_expired_segment_versions(keep).await?;
        Ok(gone.is_some())
    }

    /// Deletes versions replaced or deleted more than `keep` ago, and loads started more than
    /// `keep` ago that never finished; returns how many versions went.
    pub async fn drop_expired_segment_versions(&self, keep: Duration) -> Result<u64, StoreError> {
        let cutoff = now_micros().saturating_sub(i64::try_from(keep.as_micros()).unwrap_or(i64::MAX));
        let expired: Vec<i64> =
            on_pool!(self, |pool, _Db| sqlx::query_scalar(EXPIRED).bind(cutoff).fetch_all(pool).await?);
        for &v in &expired {
            self.drop_version(v).await?;
        }
        Ok(expired.len() as u64)
    }

    /// Deletes version `v`, members first, in one transaction.
    async fn drop_version(&self, v: i64) -> Result<(), StoreError> {
        on_pool!(self, |pool, _Db| {
            let mut tx = pool.begin().await?;
            sqlx::query(DROP_MEMBERS).bind(v).execute(&mut *tx).await?;
            sqlx::query(DROP_VERSION).bind(v).execute(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Adds users to a segment (created if unknown), all or none; returns how many were new.
    pub async fn add_segment_members(&self, segment: &str, users: &[String]) -> Result<u64, SegmentError> {
        let mut load = self.begin_segment_load(segment).await?;
        if let Err(e) = load.add(users).await {
            load.abort().await?;
            return Err(e.into());
        }
        Ok(load.finish(SegmentChange::Append, DEFAULT_KEEP_REPLACED).await?.changed)
    }
}

impl SegmentLoad {
    /// Adds one batch of users to the version (duplicates count once), in its own transaction:
    /// a load of any size needs memory for one batch only. Returns how many were new.
    pub async fn add(&mut self, users: &[String]) -> Result<u64, StoreError> {
        if users.is_empty() {
            return Ok(0);
        }
        let added = match &self.store {
            Store::Postgres(p) => crate::postgres::add_version_members(p, self.version, users).await?,
            Store::Sqlite(p) => crate::sqlite::add_version_members(p, self.version, users).await?,
        };
        self.loaded += added;
        Ok(added)
    }

    /// Distinct users loaded so far.
    pub fn loaded(&self) -> u64 {
        self.loaded
    }

    /// The version being loaded.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// Forgets the loaded users: the segment is as it was.
    pub async fn abort(self) -> Result<(), StoreError> {
        self.store.drop_version(self.version).await
    }

    /// Applies the load to the segment in one transaction, then deletes versions older than `keep`
    /// that no reader may still use.
    pub async fn finish(self, change: SegmentChange, keep: Duration) -> Result<SegmentChanged, SegmentError> {
        let (store, name, loaded, staged) = (&self.store, self.segment.as_str(), self.loaded, self.version);
        let at = now_micros();
        let changed = on_pool!(store, |pool, _Db| {
            let mut tx = pool.begin().await?;
            let exists: i64 = sqlx::query_scalar(VERSION_EXISTS).bind(staged).fetch_one(&mut *tx).await?;
            if exists == 0 {
                return Err(SegmentError::Read(format!(
                    "the load of segment {name:?} took longer than it is kept ({}s) and was cleaned up",
                    keep.as_secs()
                )));
            }
            let current: Option<i64> = sqlx::query_scalar(TOUCH).bind(name).bind(at).fetch_optional(&mut *tx).await?;
            let changed = match (change, current) {
                (SegmentChange::Remove, None) => return Err(SegmentError::Unknown(name.to_string())),
                (SegmentChange::Replace, _) | (SegmentChange::Append, None) => {
                    sqlx::query(RETIRE_CURRENT).bind(name).bind(at).execute(&mut *tx).await?;
                    sqlx::query(SWITCH)
                        .bind(name)
                        .bind(staged)
                        .bind(i64::try_from(loaded).unwrap_or(i64::MAX))
                        .bind(at)
                        .execute(&mut *tx)
                        .await?;
                    loaded
                }
                (SegmentChange::Append | SegmentChange::Remove, Some(current)) => {
                    let sql = if change == SegmentChange::Append { MERGE } else { SUBTRACT };
                    let n = sqlx::query(sql).bind(current).bind(staged).execute(&mut *tx).await?.rows_affected();
                    let delta = i64::try_from(n).unwrap_or(i64::MAX);
                    let delta = if change == SegmentChange::Append { delta } else { -delta };
                    sqlx::query(RESIZE).bind(name).bind(delta).execute(&mut *tx).await?;
                    // The staged users were only a list to apply.
                    sqlx::query(DROP_MEMBERS).bind(staged).execute(&mut *tx).await?;
                    sqlx::query(DROP_VERSION).bind(staged).execute(&mut *tx).await?;
                    n
                }
            };
            tx.commit().await?;
            changed
        });
        store.drop_expired_segment_versions(keep).await?;
        let info = store.segment(name).await?.ok_or_else(|| SegmentError::Unknown(name.to_string()))?;
        Ok(SegmentChanged { info, changed })
    }
}

/// What to do with bad rows of an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Change nothing and report them (the default).
    #[default]
    Refuse,
    /// Load the good rows and report the bad ones.
    Skip,
}

/// How far an import is, for progress bars.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Rows read (good and bad).
    pub rows: u64,
    /// Bytes of the input read.
    pub bytes: u64,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    pub changed: SegmentChanged,
    /// Good rows read (an id read twice counts twice).
    pub rows: u64,
    /// Bad rows skipped, and the first of them.
    pub bad_total: u64,
    pub bad: Vec<BadRow>,
}

/// Loads the ids `batches` brings (see [`read_in_background`]) into a new version of `segment` and
/// applies it as `change` says. Bad rows refuse the whole import (nothing changed) or are skipped,
/// as `on_error` says; at most `max_reported` of them are listed.
#[allow(clippy::too_many_arguments)]
pub async fn import(
    store: &Store,
    segment: &str,
    change: SegmentChange,
    mut batches: tokio::sync::mpsc::Receiver<Result<IdBatch, SegmentError>>,
    on_error: OnError,
    max_reported: usize,
    keep: Duration,
    mut progress: impl FnMut(Progress),
) -> Result<Imported, SegmentError> {
    let mut load = store.begin_segment_load(segment).await?;
    let (mut rows, mut bad_total, mut bad) = (0u64, 0u64, Vec::new());
    let mut read = Progress::default();
    let outcome: Result<(), SegmentError> = async {
        while let Some(batch) = batches.recv().await {
            let batch = batch?;
            bad_total += batch.bad.len() as u64;
            let room = max_reported.saturating_sub(bad.len());
            bad.extend(batch.bad.into_iter().take(room));
            rows += batch.ids.len() as u64;
            // Once refused, the rest is only read for its bad rows.
            if !(on_error == OnError::Refuse && bad_total > 0) {
                load.add(&batch.ids).await?;
            }
            read.rows += batch.rows;
            read.bytes = batch.bytes;
            progress(read);
        }
        Ok(())
    }
    .await;
    let refused = on_error == OnError::Refuse && bad_total > 0;
    if outcome.is_err() || refused {
        load.abort().await?;
        outcome?;
        return Err(SegmentError::BadRows { total: bad_total, first: bad });
    }
    let changed = load.finish(change, keep).await?;
    Ok(Imported { changed, rows, bad_total, bad })
}

/// `ids`, already checked (see [`csv::check_id`]), as the batches [`import`] takes, `batch_ids` at a time.
pub fn batches_of(ids: Vec<String>, batch_ids: usize) -> tokio::sync::mpsc::Receiver<Result<IdBatch, SegmentError>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::spawn(async move {
        let mut ids = ids.into_iter();
        loop {
            let chunk: Vec<String> = ids.by_ref().take(batch_ids.max(1)).collect();
            if chunk.is_empty() {
                return;
            }
            let rows = chunk.len() as u64;
            if tx.send(Ok(IdBatch { ids: chunk, bad: Vec::new(), rows, bytes: 0 })).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests;
