//! The record of every executed replay and dead-letter re-drive (table `replays`): the plan resolved
//! once, the filters, the progress saved after each committed batch and the outcome, so the same
//! command (same fingerprint) resumes where it stopped and `tidings replay list` shows the history.

use super::{with_bind_list, Dialect, Store, StoreError};
use std::collections::HashSet;
use uuid::Uuid;

const INSERT: &str = include_str!("sql/replays_insert.sql");
const UNFINISHED: &str = include_str!("sql/replays_unfinished.sql");
const PROGRESS: &str = include_str!("sql/replays_progress.sql");
const FINISH: &str = include_str!("sql/replays_finish.sql");
const LIST: &str = include_str!("sql/replays_list.sql");
const GET: &str = include_str!("sql/replays_get.sql");
const STORED_IDS: &str = include_str!("sql/replays_stored_ids.sql");
const TEXTS: &str = include_str!("sql/replays_texts.sql");
const REPLACE_TEXT: &str = include_str!("sql/replays_replace_text.sql");

/// A notification's texts as a templating backfill compares and replaces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotificationText {
    pub id: Uuid,
    pub title: String,
    pub body: String,
    pub link: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TextRow<Id> {
    id: Id,
    title: String,
    body: String,
    link: Option<String>,
}

/// What was replayed: a range of a topic through a stage, or dead letters re-driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayKind {
    Replay,
    Dlq,
}

impl ReplayKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayKind::Replay => "replay",
            ReplayKind::Dlq => "dlq",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "replay" => Ok(ReplayKind::Replay),
            "dlq" => Ok(ReplayKind::Dlq),
            other => Err(undecodable("kind", other)),
        }
    }
}

/// Where a replay stands: `Running` also after a crash (nothing recorded an end), `Stopped` after
/// Ctrl-C or SIGTERM. Every outcome but `Done` is resumed by the same command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    Running,
    Done,
    Stopped,
    Failed,
}

impl ReplayOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayOutcome::Running => "running",
            ReplayOutcome::Done => "done",
            ReplayOutcome::Stopped => "stopped",
            ReplayOutcome::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "running" => Ok(ReplayOutcome::Running),
            "done" => Ok(ReplayOutcome::Done),
            "stopped" => Ok(ReplayOutcome::Stopped),
            "failed" => Ok(ReplayOutcome::Failed),
            other => Err(undecodable("outcome", other)),
        }
    }
}

/// A backend's id as a uuid (generic: on PostgreSQL it is one already).
fn uuid_of<I: Into<Uuid>>(id: I) -> Uuid {
    id.into()
}

fn undecodable(column: &str, value: &str) -> StoreError {
    StoreError::Query(sqlx::Error::Decode(format!("replays.{column}: unknown value {value:?}").into()))
}

/// One recorded replay. Times are microseconds since the Unix epoch; `plan`, `filters`,
/// `progress` and `counts` are JSON text whose shape belongs to the command that wrote them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub replay_id: String,
    pub kind: ReplayKind,
    /// Identifies "the same command": a hash of topic, stage, plan and filters.
    pub fingerprint: String,
    pub started_by: String,
    pub started_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub outcome: ReplayOutcome,
    pub topic: String,
    pub stage: Option<String>,
    pub plan: String,
    pub filters: String,
    pub progress: String,
    pub counts: String,
}

#[derive(sqlx::FromRow)]
struct Row {
    replay_id: String,
    kind: String,
    fingerprint: String,
    started_by: String,
    started_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
    outcome: String,
    topic: String,
    stage: Option<String>,
    plan: String,
    filters: String,
    progress: String,
    counts: String,
}

impl TryFrom<Row> for Replay {
    type Error = StoreError;

    fn try_from(r: Row) -> Result<Self, StoreError> {
        Ok(Replay {
            replay_id: r.replay_id,
            kind: ReplayKind::parse(&r.kind)?,
            fingerprint: r.fingerprint,
            started_by: r.started_by,
            started_at: r.started_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            outcome: ReplayOutcome::parse(&r.outcome)?,
            topic: r.topic,
            stage: r.stage,
            plan: r.plan,
            filters: r.filters,
            progress: r.progress,
            counts: r.counts,
        })
    }
}

impl Store {
    /// Records replay `r` as started.
    pub async fn create_replay(&self, r: &Replay) -> Result<(), StoreError> {
        on_pool!(self, |pool, Db| sqlx::query(INSERT)
            .bind(Db::text(&r.replay_id))
            .bind(r.kind.as_str())
            .bind(Db::text(&r.fingerprint))
            .bind(Db::text(&r.started_by))
            .bind(r.started_at)
            .bind(r.updated_at)
            .bind(r.finished_at)
            .bind(r.outcome.as_str())
            .bind(Db::text(&r.topic))
            .bind(r.stage.as_deref().map(Db::text))
            .bind(Db::text(&r.plan))
            .bind(Db::text(&r.filters))
            .bind(Db::text(&r.progress))
            .bind(Db::text(&r.counts))
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }

    /// Replay `replay_id`, if recorded.
    pub async fn replay(&self, replay_id: &str) -> Result<Option<Replay>, StoreError> {
        let row: Option<Row> =
            on_pool!(self, |pool, Db| sqlx::query_as(GET).bind(Db::text(replay_id)).fetch_optional(pool).await?);
        row.map(Replay::try_from).transpose()
    }

    /// The newest replay of `kind` with `fingerprint` that did not end done (running after a
    /// crash, stopped or failed): the one the same command resumes.
    pub async fn unfinished_replay(&self, kind: ReplayKind, fingerprint: &str) -> Result<Option<Replay>, StoreError> {
        let row: Option<Row> = on_pool!(self, |pool, Db| sqlx::query_as(UNFINISHED)
            .bind(kind.as_str())
            .bind(Db::text(fingerprint))
            .fetch_optional(pool)
            .await?);
        row.map(Replay::try_from).transpose()
    }

    /// Saves where replay `replay_id` got to after a committed batch; a resumed replay is
    /// running again.
    pub async fn save_replay_progress(
        &self,
        replay_id: &str,
        progress: &str,
        counts: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool, Db| sqlx::query(PROGRESS)
            .bind(Db::text(replay_id))
            .bind(Db::text(progress))
            .bind(Db::text(counts))
            .bind(at)
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }

    /// Ends replay `replay_id` with `outcome` and its last progress and counts.
    pub async fn finish_replay(
        &self,
        replay_id: &str,
        outcome: ReplayOutcome,
        progress: &str,
        counts: &str,
        at: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool, Db| sqlx::query(FINISH)
            .bind(Db::text(replay_id))
            .bind(outcome.as_str())
            .bind(Db::text(progress))
            .bind(Db::text(counts))
            .bind(at)
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }

    /// Replays of `kind`, the newest first, at most `limit`.
    pub async fn list_replays(&self, kind: ReplayKind, limit: i64) -> Result<Vec<Replay>, StoreError> {
        let rows: Vec<Row> =
            on_pool!(self, |pool, _Db| sqlx::query_as(LIST).bind(kind.as_str()).bind(limit).fetch_all(pool).await?);
        rows.into_iter().map(Replay::try_from).collect()
    }

    /// The ones of `ids` stored as notifications: a replay's dry run counts them as already
    /// present (the idempotent write would skip them). Ask for a bounded batch at a time.
    pub async fn stored_notification_ids(&self, ids: &[Uuid]) -> Result<HashSet<Uuid>, StoreError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let sql = with_bind_list(STORED_IDS, 1, ids.len());
        let found: Vec<Uuid> = on_pool!(self, |pool, Db| {
            let mut q = sqlx::query_scalar::<_, <Db as Dialect>::Id>(&sql);
            for id in ids {
                q = q.bind(<Db as Dialect>::Id::from(*id));
            }
            q.fetch_all(pool).await?.into_iter().map(uuid_of).collect()
        });
        Ok(found.into_iter().collect())
    }

    /// The stored texts of those of `ids` that are stored. Ask for a bounded batch at a time.
    pub async fn notification_texts(&self, ids: &[Uuid]) -> Result<Vec<NotificationText>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = with_bind_list(TEXTS, 1, ids.len());
        let texts = on_pool!(self, |pool, Db| {
            let mut q = sqlx::query_as::<_, TextRow<<Db as Dialect>::Id>>(&sql);
            for id in ids {
                q = q.bind(<Db as Dialect>::Id::from(*id));
            }
            q.fetch_all(pool)
                .await?
                .into_iter()
                .map(|r| NotificationText { id: uuid_of(r.id), title: r.title, body: r.body, link: r.link })
                .collect()
        });
        Ok(texts)
    }

    /// Replaces the texts of the stored notifications among `texts` (same ids: no row is added),
    /// in one transaction. Returns how many rows changed (rows already so, or not stored, don't).
    pub async fn replace_notification_texts(&self, texts: &[NotificationText]) -> Result<u64, StoreError> {
        let changed = on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            let mut changed = 0u64;
            for t in texts {
                changed += sqlx::query(REPLACE_TEXT)
                    .bind(<Db as Dialect>::Id::from(t.id))
                    .bind(Db::text(&t.title))
                    .bind(Db::text(&t.body))
                    .bind(t.link.as_deref().map(Db::text))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
            changed
        });
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    on_both_backends!(
        resumes_the_unfinished_one_by_fingerprint,
        lists_by_kind_newest_first,
        finds_the_stored_ones_of_a_batch_of_ids
    );

    async fn finds_the_stored_ones_of_a_batch_of_ids(store: &Store) {
        let n = |event: &str| crate::StoredNotification {
            notification: tidings_core::Notification {
                notification_id: tidings_core::Notification::id_for(event, "u1"),
                user_id: "u1".into(),
                kind: "k".into(),
                title: "t".into(),
                body: "b".into(),
                link: None,
                source_event_id: event.into(),
                occurred_at: 1_700_000_000_000_000,
                source_topic: "orders".into(),
                source_partition: 0,
                source_offset: 0,
                data: None,
                inbox: true,
                category: String::new(),
                recipients: vec![],
            },
            stream_partition: 0,
            stream_offset: 0,
        };
        let batch = crate::Batch { notifications: vec![n("e1"), n("e3")], ..Default::default() };
        store.write_batch("g", &batch).await.unwrap();
        let ids: Vec<Uuid> = ["e1", "e2", "e3"].iter().map(|e| n(e).notification.notification_id).collect();
        let got = store.stored_notification_ids(&ids).await.unwrap();
        assert_eq!(got, HashSet::from([ids[0], ids[2]]));
        assert!(store.stored_notification_ids(&[]).await.unwrap().is_empty());

        // A backfill's texts: replaced in place for stored ids, nothing added for the others.
        let text = |id: Uuid, title: &str, link: Option<&str>| NotificationText {
            id,
            title: title.into(),
            body: "b".into(),
            link: link.map(str::to_string),
        };
        let new = [text(ids[0], "t2", None), text(ids[1], "t2", None), text(ids[2], "t", Some("/x"))];
        assert_eq!(store.replace_notification_texts(&new).await.unwrap(), 2, "e1's title and e3's link");
        assert_eq!(store.replace_notification_texts(&new).await.unwrap(), 0, "already so");
        let mut got = store.notification_texts(&ids).await.unwrap();
        got.sort_by_key(|t| t.id != ids[0]);
        assert_eq!(got, vec![new[0].clone(), new[2].clone()]);
        assert_eq!(store.count_notifications().await.unwrap(), 2);
    }

    fn replay(id: &str, kind: ReplayKind, fingerprint: &str, at: i64) -> Replay {
        Replay {
            replay_id: id.into(),
            kind,
            fingerprint: fingerprint.into(),
            started_by: "ops".into(),
            started_at: at,
            updated_at: at,
            finished_at: None,
            outcome: ReplayOutcome::Running,
            topic: "notifications".into(),
            stage: Some("persistence".into()),
            plan: r#"{"0":[10,20]}"#.into(),
            filters: "{}".into(),
            progress: "{}".into(),
            counts: "{}".into(),
        }
    }

    async fn resumes_the_unfinished_one_by_fingerprint(store: &Store) {
        let fp = "f1";
        assert_eq!(store.unfinished_replay(ReplayKind::Replay, fp).await.unwrap(), None);
        store.create_replay(&replay("r1", ReplayKind::Replay, fp, 10)).await.unwrap();
        store.finish_replay("r1", ReplayOutcome::Done, r#"{"0":20}"#, r#"{"read":10}"#, 15).await.unwrap();
        // A done replay is not resumed: the same command starts a new one.
        assert_eq!(store.unfinished_replay(ReplayKind::Replay, fp).await.unwrap(), None);
        store.create_replay(&replay("r2", ReplayKind::Replay, fp, 20)).await.unwrap();
        store.create_replay(&replay("other", ReplayKind::Replay, "f2", 21)).await.unwrap();
        store.create_replay(&replay("d1", ReplayKind::Dlq, fp, 22)).await.unwrap();
        store.save_replay_progress("r2", r#"{"0":14}"#, r#"{"read":4}"#, 25).await.unwrap();
        store.finish_replay("r2", ReplayOutcome::Stopped, r#"{"0":15}"#, r#"{"read":5}"#, 30).await.unwrap();
        let got = store.unfinished_replay(ReplayKind::Replay, fp).await.unwrap().unwrap();
        assert_eq!(
            got,
            Replay {
                outcome: ReplayOutcome::Stopped,
                progress: r#"{"0":15}"#.into(),
                counts: r#"{"read":5}"#.into(),
                updated_at: 30,
                finished_at: Some(30),
                ..replay("r2", ReplayKind::Replay, fp, 20)
            }
        );
        // Resumed: running again, no end recorded until it finishes.
        store.save_replay_progress("r2", r#"{"0":18}"#, r#"{"read":8}"#, 40).await.unwrap();
        let got = store.replay("r2").await.unwrap().unwrap();
        assert_eq!((got.outcome, got.finished_at, got.updated_at), (ReplayOutcome::Running, None, 40));
        store.finish_replay("r2", ReplayOutcome::Done, r#"{"0":20}"#, r#"{"read":10}"#, 50).await.unwrap();
        assert_eq!(store.unfinished_replay(ReplayKind::Replay, fp).await.unwrap(), None);
        // The dead-letter re-drive with the same fingerprint is its own kind.
        assert_eq!(store.unfinished_replay(ReplayKind::Dlq, fp).await.unwrap().unwrap().replay_id, "d1");
        assert_eq!(store.replay("missing").await.unwrap(), None);
    }

    async fn lists_by_kind_newest_first(store: &Store) {
        for (id, at) in [("a", 1), ("b", 3), ("c", 2)] {
            store.create_replay(&replay(id, ReplayKind::Replay, id, at)).await.unwrap();
        }
        store.create_replay(&replay("d", ReplayKind::Dlq, "d", 4)).await.unwrap();
        let ids = |v: Vec<Replay>| v.into_iter().map(|r| r.replay_id).collect::<Vec<_>>();
        assert_eq!(ids(store.list_replays(ReplayKind::Replay, 10).await.unwrap()), ["b", "c", "a"]);
        assert_eq!(ids(store.list_replays(ReplayKind::Replay, 2).await.unwrap()), ["b", "c"]);
        assert_eq!(ids(store.list_replays(ReplayKind::Dlq, 10).await.unwrap()), ["d"]);
    }
}
