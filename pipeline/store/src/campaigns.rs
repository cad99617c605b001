//! Campaign definitions (written by the campaign API and `tidings campaign launch`), read back with
//! templating's fan-out progress and the stored and delivered counts; and a dry run's audience
//! counts, computed in the database (the audience is never loaded into memory).

use futures::TryStreamExt;

use super::{count, Dialect, Store, StoreError};

const INSERT: &str = include_str!("sql/campaigns_insert.sql");
const GET: &str = include_str!("sql/campaigns_get.sql");
const LIST: &str = include_str!("sql/campaigns_list.sql");
const LIST_AFTER: &str = include_str!("sql/campaigns_list_after.sql");
const CANCEL: &str = include_str!("sql/campaigns_cancel.sql");
const AUDIENCE_COUNT: &str = include_str!("sql/campaigns_audience_count.sql");
const AUDIENCE_QUIET: &str = include_str!("sql/campaigns_audience_quiet.sql");

/// A campaign to insert. Times are microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCampaign {
    pub campaign_id: String,
    /// `campaign:<campaign_id>`, the launch record's event id.
    pub event_id: String,
    pub category: String,
    /// The launch request as canonical JSON: a retry is the same campaign when this is equal.
    pub definition: String,
    pub send_at: Option<i64>,
    pub created_at: i64,
    pub launched_by: String,
    /// The dry run's count at launch (after opt-outs).
    pub audience_estimate: Option<i64>,
}

/// A stored campaign with what templating and the gateways report of it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CampaignRow {
    pub campaign_id: String,
    pub event_id: String,
    pub category: String,
    pub definition: String,
    pub send_at: Option<i64>,
    pub created_at: i64,
    pub launched_by: String,
    pub audience_estimate: Option<i64>,
    pub cancelled_at: Option<i64>,
    /// Set once templating started the fan-out (its progress row exists).
    pub started_at: Option<i64>,
    pub produced: Option<i64>,
    pub held: Option<i64>,
    pub suppressed: Option<i64>,
    pub finished_at: Option<i64>,
    /// Templating's record of a cancel it applied.
    pub progress_cancelled_at: Option<i64>,
    /// Why templating stopped the fan-out short (its launch record was dead-lettered).
    pub failed_reason: Option<String>,
    /// Notifications of the campaign in the store.
    pub stored: i64,
    /// Notifications of the campaign written to streams, summed over gateways.
    pub delivered: i64,
}

/// Where a campaign is, as the API and the CLI show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CampaignStatus {
    /// Waiting for its `send_at`.
    Scheduled,
    /// Being fanned out (or launched and not yet picked up).
    Sending,
    Done,
    Cancelled,
    /// Stopped short: its launch record was dead-lettered (see `failed_reason`).
    Failed,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Scheduled => "scheduled",
            CampaignStatus::Sending => "sending",
            CampaignStatus::Done => "done",
            CampaignStatus::Cancelled => "cancelled",
            CampaignStatus::Failed => "failed",
        }
    }
}

impl CampaignRow {
    /// Its status at `now` (microseconds): cancelled if either side recorded a cancel, failed or
    /// done once templating finished (failed: with a reason), sending once it started, else
    /// scheduled while `send_at` is ahead.
    pub fn status(&self, now: i64) -> CampaignStatus {
        if self.cancelled_at.is_some() || self.progress_cancelled_at.is_some() {
            CampaignStatus::Cancelled
        } else if self.failed_reason.is_some() {
            CampaignStatus::Failed
        } else if self.finished_at.is_some() {
            CampaignStatus::Done
        } else if self.started_at.is_some() {
            CampaignStatus::Sending
        } else if self.send_at.is_some_and(|t| t > now) {
            CampaignStatus::Scheduled
        } else {
            CampaignStatus::Sending
        }
    }
}

/// A dry run's counts of an audience for one category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AudienceCount {
    /// Users in the segments or the inline list, each once.
    pub audience: u64,
    /// Of them, users who opted out of the category.
    pub opted_out: u64,
}

/// One quiet-hours window shared by `users` users of an audience (minutes after local midnight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuietWindow {
    pub time_zone: String,
    pub start_minute: u16,
    pub end_minute: u16,
    pub users: u64,
}

/// Statement `sql` with its `/* segments */` and `/* inline */` markers replaced by binds numbered
/// from 2 (after the category): a name list for `IN (…)` and one `VALUES` row per id. An empty list
/// becomes a NULL that matches nothing.
fn audience_sql(sql: &'static str, segments: usize, inline: usize) -> String {
    let binds = |from: usize, n: usize, one: &dyn Fn(usize) -> String| -> String {
        (from..from + n).map(one).collect::<Vec<_>>().join(", ")
    };
    let names = if segments == 0 { "NULL".to_owned() } else { binds(2, segments, &|i| format!("${i}")) };
    let rows = if inline == 0 {
        "(CAST(NULL AS text))".to_owned()
    } else {
        binds(2 + segments, inline, &|i| format!("(CAST(${i} AS text))"))
    };
    sql.replacen("/* segments */", &names, 1).replacen("/* inline */", &rows, 1)
}

fn minute(m: i32) -> u16 {
    u16::try_from(m).unwrap_or(0)
}

impl Store {
    /// Inserts `c`; false (and nothing changed) if a campaign with its id exists.
    pub async fn insert_campaign(&self, c: &NewCampaign) -> Result<bool, StoreError> {
        let done = on_pool!(self, |pool, Db| sqlx::query(INSERT)
            .bind(Db::text(&c.campaign_id))
            .bind(Db::text(&c.event_id))
            .bind(Db::text(&c.category))
            .bind(Db::text(&c.definition))
            .bind(c.send_at)
            .bind(c.created_at)
            .bind(Db::text(&c.launched_by))
            .bind(c.audience_estimate)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(done == 1)
    }

    /// Campaign `id` with its progress and counts, or `None`.
    pub async fn campaign(&self, id: &str) -> Result<Option<CampaignRow>, StoreError> {
        Ok(on_pool!(self, |pool, Db| sqlx::query_as(GET).bind(Db::text(id)).fetch_optional(pool).await?))
    }

    /// The newest campaigns first, created before campaign `after` when given, at most `limit`.
    pub async fn campaigns(&self, after: Option<&str>, limit: u32) -> Result<Vec<CampaignRow>, StoreError> {
        Ok(on_pool!(self, |pool, Db| match after {
            None => sqlx::query_as(LIST).bind(i64::from(limit)).fetch_all(pool).await?,
            Some(a) => sqlx::query_as(LIST_AFTER).bind(i64::from(limit)).bind(Db::text(a)).fetch_all(pool).await?,
        }))
    }

    /// Marks campaign `id` cancelled at `now` unless it already is; false if nothing changed.
    pub async fn cancel_campaign(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let n = on_pool!(self, |pool, Db| sqlx::query(CANCEL)
            .bind(Db::text(id))
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(n == 1)
    }

    /// The audience of `segments` (their current versions) and `user_ids`, each user once, and how
    /// many of them opted out of `category`: one statement.
    pub async fn campaign_audience(
        &self,
        category: &str,
        segments: &[String],
        user_ids: &[String],
    ) -> Result<AudienceCount, StoreError> {
        let sql = audience_sql(AUDIENCE_COUNT, segments.len(), user_ids.len());
        let (audience, opted_out): (i64, i64) = on_pool!(self, |pool, Db| {
            let mut q = sqlx::query_as(&sql).bind(Db::text(category));
            for s in segments.iter().chain(user_ids) {
                q = q.bind(Db::text(s));
            }
            q.fetch_one(pool).await?
        });
        Ok(AudienceCount { audience: count(audience), opted_out: count(opted_out) })
    }

    /// Calls `each` with every distinct quiet-hours window of the audience (as
    /// [`Store::campaign_audience`]) who did not opt out of `category`, streamed: memory stays
    /// bounded whatever the audience.
    pub async fn campaign_quiet_windows(
        &self,
        category: &str,
        segments: &[String],
        user_ids: &[String],
        mut each: impl FnMut(QuietWindow),
    ) -> Result<(), StoreError> {
        let sql = audience_sql(AUDIENCE_QUIET, segments.len(), user_ids.len());
        on_pool!(self, |pool, Db| {
            let mut q = sqlx::query_as::<_, (String, i32, i32, i64)>(&sql).bind(Db::text(category));
            for s in segments.iter().chain(user_ids) {
                q = q.bind(Db::text(s));
            }
            let mut rows = q.fetch(pool);
            while let Some((time_zone, start, end, users)) = rows.try_next().await? {
                each(QuietWindow {
                    time_zone,
                    start_minute: minute(start),
                    end_minute: minute(end),
                    users: count(users),
                });
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preferences::{Preferences, QuietHours};
    use crate::segments::SegmentChange;

    on_both_backends!(audience_counts_each_user_once, campaigns_insert_list_cancel_and_count);

    async fn segment(store: &Store, name: &str, ids: &[&str]) {
        let batch: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        crate::segments::import(
            store,
            name,
            SegmentChange::Replace,
            crate::segments::batches_of(batch, 1000),
            crate::segments::OnError::Refuse,
            10,
            std::time::Duration::from_secs(60),
            |_| {},
        )
        .await
        .unwrap();
    }

    fn strings(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| s.to_string()).collect()
    }

    async fn audience_counts_each_user_once(store: &Store) {
        segment(store, "a", &["u1", "u2", "u3"]).await;
        segment(store, "b", &["u3", "u4"]).await;
        // A replaced version's members are not counted: only the current version is.
        segment(store, "c", &["old1", "old2"]).await;
        segment(store, "c", &["u5"]).await;
        let out = Preferences { opt_out: vec!["campaigns".into()], ..Preferences::default() };
        store.set_preferences("u2", &out, 1).await.unwrap();
        store.set_preferences("u9", &out, 1).await.unwrap();
        let quiet = Preferences {
            time_zone: "Asia/Seoul".into(),
            quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
            ..Preferences::default()
        };
        store.set_preferences("u4", &quiet, 1).await.unwrap();
        store.set_preferences("u6", &quiet, 1).await.unwrap();
        // Opted out and quiet: counted as opted out only.
        let both = Preferences { opt_out: vec!["campaigns".into()], ..quiet.clone() };
        store.set_preferences("u3", &both, 1).await.unwrap();

        let segs = strings(&["a", "b", "c"]);
        let inline = strings(&["u1", "u6", "u9", "u6"]);
        let got = store.campaign_audience("campaigns", &segs, &inline).await.unwrap();
        // u1..u6 and u9; u2, u3, u9 opted out.
        assert_eq!(got, AudienceCount { audience: 7, opted_out: 3 });
        assert_eq!(
            store.campaign_audience("orders", &segs, &[]).await.unwrap(),
            AudienceCount { audience: 5, opted_out: 0 }
        );
        assert_eq!(
            store.campaign_audience("campaigns", &[], &inline).await.unwrap(),
            AudienceCount { audience: 3, opted_out: 1 }
        );
        assert_eq!(store.campaign_audience("campaigns", &[], &[]).await.unwrap(), AudienceCount::default());

        let mut windows = Vec::new();
        store.campaign_quiet_windows("campaigns", &segs, &inline, |w| windows.push(w)).await.unwrap();
        assert_eq!(
            windows,
            [QuietWindow { time_zone: "Asia/Seoul".into(), start_minute: 22 * 60, end_minute: 8 * 60, users: 2 }]
        );
        let mut orders = Vec::new();
        store.campaign_quiet_windows("orders", &segs, &[], |w| orders.push(w.users)).await.unwrap();
        assert_eq!(orders, [2], "u3 and u4 when u3 did not opt out of the category");
    }

    fn new(id: &str, created_at: i64, send_at: Option<i64>) -> NewCampaign {
        NewCampaign {
            campaign_id: id.into(),
            event_id: format!("campaign:{id}"),
            category: "campaigns".into(),
            definition: format!("{{\"campaign_id\":\"{id}\"}}"),
            send_at,
            created_at,
            launched_by: "test".into(),
            audience_estimate: Some(10),
        }
    }

    async fn campaigns_insert_list_cancel_and_count(store: &Store) {
        assert!(store.insert_campaign(&new("c1", 100, None)).await.unwrap());
        assert!(store.insert_campaign(&new("c2", 200, Some(10_000))).await.unwrap());
        assert!(store.insert_campaign(&new("c3", 200, None)).await.unwrap());
        let mut other = new("c1", 300, None);
        other.definition = "{}".into();
        assert!(!store.insert_campaign(&other).await.unwrap(), "an existing id is kept");
        assert_eq!(store.campaign("c1").await.unwrap().unwrap().definition, "{\"campaign_id\":\"c1\"}");
        assert_eq!(store.campaign("nope").await.unwrap(), None);

        let ids = |rows: Vec<CampaignRow>| rows.into_iter().map(|r| r.campaign_id).collect::<Vec<_>>();
        assert_eq!(ids(store.campaigns(None, 10).await.unwrap()), ["c3", "c2", "c1"]);
        assert_eq!(ids(store.campaigns(None, 2).await.unwrap()), ["c3", "c2"]);
        assert_eq!(ids(store.campaigns(Some("c2"), 10).await.unwrap()), ["c1"]);

        let c2 = store.campaign("c2").await.unwrap().unwrap();
        assert_eq!(c2.status(5_000), CampaignStatus::Scheduled);
        assert_eq!(c2.status(20_000), CampaignStatus::Sending, "due and not yet picked up");
        assert_eq!((c2.stored, c2.delivered, c2.started_at), (0, 0, None));

        // Templating's progress, two gateways' deliveries and stored notifications of c1.
        on_pool!(store, |pool, _Db| {
            sqlx::query(
                "INSERT INTO campaign_progress (campaign_id, event_id, produced, held, suppressed, started_at, \
                 updated_at) VALUES ('c1', 'campaign:c1', 5, 2, 1, 1, 1)",
            )
            .execute(pool)
            .await
            .map(drop)
            .unwrap();
            for (instance, n) in [("g1", 3), ("g2", 4)] {
                sqlx::query(
                    "INSERT INTO campaign_deliveries (campaign_id, instance, delivered, updated_at) VALUES ('c1', $1, $2, 1)",
                )
                .bind(instance)
                .bind(n as i64)
                .execute(pool)
                .await
                .map(drop)
                .unwrap();
            }
        });
        let mut batch = crate::Batch::default();
        for (i, (kind, event)) in [
            ("campaign", "campaign:c1"),
            ("campaign", "campaign:c1"),
            ("order", "campaign:c1"),
            ("campaign", "campaign:c3"),
        ]
        .into_iter()
        .enumerate()
        {
            batch.notifications.push(crate::StoredNotification {
                notification: tidings_core::Notification {
                    notification_id: tidings_core::Notification::id_for(event, &format!("u{i}")),
                    user_id: format!("u{i}"),
                    kind: kind.into(),
                    title: "t".into(),
                    body: "b".into(),
                    link: None,
                    source_event_id: event.into(),
                    occurred_at: 1,
                    source_topic: "campaigns".into(),
                    source_partition: 0,
                    source_offset: i as i64,
                    data: None,
                    inbox: true,
                    category: "campaigns".into(),
                    recipients: vec![],
                },
                stream_partition: 0,
                stream_offset: i as i64,
            });
        }
        store.write_batch("test", &batch).await.unwrap();
        let c1 = store.campaign("c1").await.unwrap().unwrap();
        assert_eq!((c1.produced, c1.held, c1.suppressed, c1.stored, c1.delivered), (Some(5), Some(2), Some(1), 2, 7));
        assert_eq!(c1.status(1), CampaignStatus::Sending);
        let listed = store.campaigns(None, 10).await.unwrap();
        assert_eq!((listed[2].stored, listed[2].delivered, listed[0].stored), (2, 7, 1));

        assert!(store.cancel_campaign("c1", 50).await.unwrap());
        assert!(!store.cancel_campaign("c1", 60).await.unwrap(), "the first cancel's time stays");
        assert!(!store.cancel_campaign("nope", 60).await.unwrap());
        let c1 = store.campaign("c1").await.unwrap().unwrap();
        assert_eq!((c1.cancelled_at, c1.status(1)), (Some(50), CampaignStatus::Cancelled));
        on_pool!(store, |pool, _Db| sqlx::query(
            "UPDATE campaign_progress SET finished_at = 9 WHERE campaign_id = 'c1'"
        )
        .execute(pool)
        .await
        .map(drop)
        .unwrap());
        assert_eq!(store.campaign("c1").await.unwrap().unwrap().status(1), CampaignStatus::Cancelled);
        on_pool!(store, |pool, _Db| sqlx::query("UPDATE campaigns SET cancelled_at = NULL WHERE campaign_id = 'c1'")
            .execute(pool)
            .await
            .map(drop)
            .unwrap());
        assert_eq!(store.campaign("c1").await.unwrap().unwrap().status(1), CampaignStatus::Done);
        on_pool!(store, |pool, _Db| sqlx::query(
            "UPDATE campaign_progress SET failed_reason = 'segment-version-gone: vip' WHERE campaign_id = 'c1'"
        )
        .execute(pool)
        .await
        .map(drop)
        .unwrap());
        let c1 = store.campaign("c1").await.unwrap().unwrap();
        assert_eq!(
            (c1.status(1), c1.failed_reason.as_deref()),
            (CampaignStatus::Failed, Some("segment-version-gone: vip"))
        );
        assert_eq!(store.campaigns(None, 10).await.unwrap()[2].status(1), CampaignStatus::Failed);
    }
}
