//! Templating's checkpoint of a campaign's fan-out (table `campaign_progress`): the last user id
//! whose notification the brokers acknowledged, the segment versions pinned at the first page and
//! the counters, so a restarted stage resumes after the cursor and a finished campaign is not sent twice.

use super::{Dialect, Store, StoreError};

const GET: &str = include_str!("sql/campaign_progress_get.sql");
const CANCELLED: &str = include_str!("sql/campaign_cancelled.sql");
const CHECKPOINT: &str = include_str!("sql/campaign_progress_checkpoint.sql");
const CANCEL: &str = include_str!("sql/campaign_progress_cancel.sql");

/// A campaign's progress as last checkpointed. Times are microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CampaignProgress {
    pub campaign_id: String,
    pub event_id: String,
    /// The audience is fanned out in user id order: every user up to this one is done.
    pub cursor: Option<String>,
    /// JSON `{segment: version}`: the versions pinned when the fan-out started.
    pub segment_versions: String,
    pub produced: i64,
    pub held: i64,
    pub suppressed: i64,
    pub started_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    /// Why the fan-out stopped short (its launch record was dead-lettered); set with `finished_at`.
    pub failed_reason: Option<String>,
}

#[derive(sqlx::FromRow)]
struct Row {
    event_id: String,
    cursor: Option<String>,
    segment_versions: String,
    produced: i64,
    held: i64,
    suppressed: i64,
    started_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
    cancelled_at: Option<i64>,
    failed_reason: Option<String>,
}

impl Store {
    /// Campaign `campaign_id`'s progress, or `None` before its first checkpoint.
    pub async fn campaign_progress(&self, campaign_id: &str) -> Result<Option<CampaignProgress>, StoreError> {
        let row: Option<Row> =
            on_pool!(self, |pool, Db| sqlx::query_as(GET).bind(Db::text(campaign_id)).fetch_optional(pool).await?);
        Ok(row.map(|r| CampaignProgress {
            campaign_id: campaign_id.to_owned(),
            event_id: r.event_id,
            cursor: r.cursor,
            segment_versions: r.segment_versions,
            produced: r.produced,
            held: r.held,
            suppressed: r.suppressed,
            started_at: r.started_at,
            updated_at: r.updated_at,
            finished_at: r.finished_at,
            cancelled_at: r.cancelled_at,
            failed_reason: r.failed_reason,
        }))
    }

    /// Whether campaign `campaign_id` was cancelled, by its definition (`campaigns.cancelled_at`)
    /// or by a consumed CampaignCancelled (`campaign_progress.cancelled_at`).
    pub async fn campaign_cancelled(&self, campaign_id: &str) -> Result<bool, StoreError> {
        let at: Vec<i64> = on_pool!(self, |pool, Db| sqlx::query_scalar(CANCELLED)
            .bind(Db::text(campaign_id))
            .fetch_all(pool)
            .await?);
        Ok(!at.is_empty())
    }

    /// Records `p` once its page's notifications are acknowledged (or, failed, once its launch's
    /// dead letter is). `started_at` is only written by the first checkpoint; a finish (with its
    /// failure, if any) or cancel already recorded stays.
    pub async fn checkpoint_campaign(&self, p: &CampaignProgress) -> Result<(), StoreError> {
        on_pool!(self, |pool, Db| sqlx::query(CHECKPOINT)
            .bind(Db::text(&p.campaign_id))
            .bind(Db::text(&p.event_id))
            .bind(p.cursor.as_deref().map(Db::text))
            .bind(Db::text(&p.segment_versions))
            .bind(p.produced)
            .bind(p.held)
            .bind(p.suppressed)
            .bind(p.started_at)
            .bind(p.updated_at)
            .bind(p.finished_at)
            .bind(p.failed_reason.as_deref().map(Db::text))
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }

    /// A CampaignCancelled: the campaign is cancelled and finished at `at` (unless it already
    /// was); its fan-out, if running, stops before its next page.
    pub async fn cancel_campaign_progress(&self, campaign_id: &str, event_id: &str, at: i64) -> Result<(), StoreError> {
        on_pool!(self, |pool, Db| sqlx::query(CANCEL)
            .bind(Db::text(campaign_id))
            .bind(Db::text(event_id))
            .bind(at)
            .execute(pool)
            .await
            .map(|_| ())?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    on_both_backends!(checkpoints_resume_and_keep_a_finish, cancels_from_either_side, a_failure_finishes_and_stays);

    fn progress(cursor: &str, produced: i64, at: i64, finished: Option<i64>) -> CampaignProgress {
        CampaignProgress {
            campaign_id: "c1".into(),
            event_id: "campaign:c1".into(),
            cursor: Some(cursor.into()),
            segment_versions: r#"{"vip":7}"#.into(),
            produced,
            held: 1,
            suppressed: 2,
            started_at: at,
            updated_at: at,
            finished_at: finished,
            cancelled_at: None,
            failed_reason: None,
        }
    }

    async fn checkpoints_resume_and_keep_a_finish(store: &Store) {
        assert_eq!(store.campaign_progress("c1").await.unwrap(), None);
        store.checkpoint_campaign(&progress("u-05000", 4997, 10, None)).await.unwrap();
        store.checkpoint_campaign(&progress("u-10000", 9990, 20, None)).await.unwrap();
        let got = store.campaign_progress("c1").await.unwrap().unwrap();
        assert_eq!(got, CampaignProgress { started_at: 10, ..progress("u-10000", 9990, 20, None) });
        store.checkpoint_campaign(&progress("u-10001", 9991, 30, Some(30))).await.unwrap();
        // A later write (a replayed page) neither un-finishes nor moves the first page's start.
        store.checkpoint_campaign(&progress("u-10001", 9991, 40, None)).await.unwrap();
        let got = store.campaign_progress("c1").await.unwrap().unwrap();
        assert_eq!((got.finished_at, got.started_at, got.updated_at), (Some(30), 10, 40));
        assert!(!store.campaign_cancelled("c1").await.unwrap());
    }

    async fn cancels_from_either_side(store: &Store) {
        // Cancelled before templating saw the launch: a finished, cancelled row.
        store.cancel_campaign_progress("c2", "campaign:c2", 5).await.unwrap();
        let got = store.campaign_progress("c2").await.unwrap().unwrap();
        assert_eq!((got.cancelled_at, got.finished_at, got.cursor), (Some(5), Some(5), None));
        assert!(store.campaign_cancelled("c2").await.unwrap());
        // Mid fan-out: the cancel keeps the cursor and counters, the first cancel time stays.
        store.checkpoint_campaign(&progress("u-5", 5, 1, None)).await.unwrap();
        store.cancel_campaign_progress("c1", "campaign:c1", 9).await.unwrap();
        store.cancel_campaign_progress("c1", "campaign:c1", 12).await.unwrap();
        let got = store.campaign_progress("c1").await.unwrap().unwrap();
        assert_eq!(
            (got.cancelled_at, got.finished_at, got.cursor.as_deref(), got.produced),
            (Some(9), Some(9), Some("u-5"), 5)
        );
        // Cancelled through its definition (the campaign API) only.
        assert!(!store.campaign_cancelled("c3").await.unwrap());
        on_pool!(store, |pool, _Db| {
            sqlx::query(
            "INSERT INTO campaigns (campaign_id, event_id, category, definition, created_at, launched_by, cancelled_at) \
             VALUES ('c3', 'campaign:c3', 'campaigns', '{}', 1, 'ops', 2)"
        )
        .execute(pool)
        .await
        .map(|_| ())
        .unwrap()
        });
        assert!(store.campaign_cancelled("c3").await.unwrap());
    }

    async fn a_failure_finishes_and_stays(store: &Store) {
        store.checkpoint_campaign(&progress("u-05000", 5000, 10, None)).await.unwrap();
        let failed = CampaignProgress {
            failed_reason: Some("template-error: title: undefined value".into()),
            ..progress("u-05000", 5000, 20, Some(20))
        };
        store.checkpoint_campaign(&failed).await.unwrap();
        let got = store.campaign_progress("c1").await.unwrap().unwrap();
        assert_eq!((got.finished_at, got.failed_reason.as_deref()), (Some(20), failed.failed_reason.as_deref()));
        // A later write (a replayed page, a finish) neither clears nor replaces the failure.
        store.checkpoint_campaign(&progress("u-10000", 9990, 30, Some(30))).await.unwrap();
        let got = store.campaign_progress("c1").await.unwrap().unwrap();
        assert_eq!((got.finished_at, got.failed_reason.as_deref()), (Some(20), failed.failed_reason.as_deref()));
    }
}
