//! Each user's notification preferences: the categories they opted out of, their time zone and
//! quiet hours. The gateway reads and replaces them; templating asks which of a page of recipients
//! opted out of a category, one statement per page.

use std::collections::HashSet;

use super::{with_bind_list, Dialect, Store, StoreError};

const GET: &str = include_str!("sql/preferences_get.sql");
const OPT_OUTS: &str = include_str!("sql/preferences_opt_outs.sql");
const UPSERT: &str = include_str!("sql/preferences_upsert.sql");
const CLEAR_OPT_OUTS: &str = include_str!("sql/preferences_clear_opt_outs.sql");
const ADD_OPT_OUT: &str = include_str!("sql/preferences_add_opt_out.sql");
const OPTED_OUT: &str = include_str!("sql/preferences_opted_out.sql");
const SET_LOCALE: &str = include_str!("sql/preferences_set_locale.sql");
const LOCALE: &str = include_str!("sql/preferences_locale.sql");

/// User ids per opt-out look-up statement: a 5,000-user audience page is one statement, below
/// SQLite's 32,766 and PostgreSQL's 65,535 bind limits.
pub const OPTED_OUT_CHUNK: usize = 5_000;

/// A user's saved preferences. A user who never saved any has [`Preferences::default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preferences {
    /// Categories opted out of, sorted.
    pub opt_out: Vec<String>,
    /// IANA time zone name, e.g. `Asia/Seoul`.
    pub time_zone: String,
    /// Do-not-disturb window in the user's time zone; `None`: none.
    pub quiet_hours: Option<QuietHours>,
}

impl Default for Preferences {
    fn default() -> Self {
        Preferences { opt_out: Vec::new(), time_zone: "UTC".to_owned(), quiet_hours: None }
    }
}

/// A daily window in minutes after local midnight; `start > end` wraps midnight (22:00–08:00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    pub start_minute: u16,
    pub end_minute: u16,
}

impl Store {
    /// `user`'s saved preferences, or `None` if they never saved any.
    pub async fn preferences(&self, user: &str) -> Result<Option<Preferences>, StoreError> {
        on_pool!(self, |pool, Db| {
            let row: Option<(String, Option<i32>, Option<i32>)> =
                sqlx::query_as(GET).bind(Db::text(user)).fetch_optional(pool).await?;
            let opt_out: Vec<String> = sqlx::query_scalar(OPT_OUTS).bind(Db::text(user)).fetch_all(pool).await?;
            Ok(row.map(|(time_zone, start, end)| Preferences {
                opt_out,
                time_zone,
                quiet_hours: match (start, end) {
                    (Some(s), Some(e)) => Some(QuietHours {
                        start_minute: u16::try_from(s).unwrap_or(0),
                        end_minute: u16::try_from(e).unwrap_or(0),
                    }),
                    _ => None,
                },
            }))
        })
    }

    /// `user`'s saved locale (campaign texts are picked by it); `None` if none or no preferences.
    pub async fn preference_locale(&self, user: &str) -> Result<Option<String>, StoreError> {
        let row: Option<Option<String>> =
            on_pool!(self, |pool, Db| sqlx::query_scalar(LOCALE).bind(Db::text(user)).fetch_optional(pool).await?);
        Ok(row.flatten())
    }

    /// Replaces `user`'s preferences in one transaction (a reader sees the old or the new ones); a
    /// saved locale is kept.
    pub async fn set_preferences(&self, user: &str, prefs: &Preferences, now_micros: i64) -> Result<(), StoreError> {
        self.write_preferences(user, prefs, None, now_micros).await
    }

    /// Replaces `user`'s preferences and locale (`None`: the campaigns' defaults) in one transaction.
    pub async fn set_preferences_and_locale(
        &self,
        user: &str,
        prefs: &Preferences,
        locale: Option<&str>,
        now_micros: i64,
    ) -> Result<(), StoreError> {
        self.write_preferences(user, prefs, Some(locale), now_micros).await
    }

    /// `locale`: `Some` replaces the saved one, `None` keeps it.
    async fn write_preferences(
        &self,
        user: &str,
        prefs: &Preferences,
        locale: Option<Option<&str>>,
        now_micros: i64,
    ) -> Result<(), StoreError> {
        on_pool!(self, |pool, Db| {
            let mut tx = pool.begin().await?;
            let (start, end) = match prefs.quiet_hours {
                Some(q) => (Some(i32::from(q.start_minute)), Some(i32::from(q.end_minute))),
                None => (None, None),
            };
            sqlx::query(UPSERT)
                .bind(Db::text(user))
                .bind(Db::text(&prefs.time_zone))
                .bind(start)
                .bind(end)
                .bind(now_micros)
                .execute(&mut *tx)
                .await?;
            sqlx::query(CLEAR_OPT_OUTS).bind(Db::text(user)).execute(&mut *tx).await?;
            for category in &prefs.opt_out {
                sqlx::query(ADD_OPT_OUT).bind(Db::text(category)).bind(Db::text(user)).execute(&mut *tx).await?;
            }
            if let Some(locale) = locale {
                sqlx::query(SET_LOCALE).bind(Db::text(user)).bind(locale.map(Db::text)).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Which of `users` opted out of `category`: one statement per [`OPTED_OUT_CHUNK`] users.
    pub async fn opted_out(&self, category: &str, users: &[String]) -> Result<HashSet<String>, StoreError> {
        let mut out = HashSet::new();
        for chunk in users.chunks(OPTED_OUT_CHUNK) {
            let sql = with_bind_list(OPTED_OUT, 2, chunk.len());
            let found: Vec<String> = on_pool!(self, |pool, Db| {
                let mut q = sqlx::query_scalar(&sql).bind(Db::text(category));
                for u in chunk {
                    q = q.bind(Db::text(u));
                }
                q.fetch_all(pool).await?
            });
            out.extend(found);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    on_both_backends!(
        preferences_round_trip,
        opted_out_answers_per_category_in_chunks,
        notifications_keep_their_category
    );

    /// Written through the bulk path (binary COPY on PostgreSQL, multi-row INSERT on SQLite).
    async fn notifications_keep_their_category(store: &Store) {
        let mut n = tidings_core::Notification {
            notification_id: tidings_core::Notification::id_for("e1", "u1"),
            user_id: "u1".into(),
            kind: "coupon.campaign".into(),
            title: "t".into(),
            body: "b".into(),
            link: None,
            source_event_id: "e1".into(),
            occurred_at: 1_700_000_000_000_000,
            source_topic: "coupons".into(),
            source_partition: 0,
            source_offset: 1,
            data: None,
            inbox: true,
            category: "campaigns".into(),
            recipients: vec![],
        };
        let mut batch = crate::Batch::default();
        batch.notifications.push(crate::StoredNotification {
            notification: n.clone(),
            stream_partition: 0,
            stream_offset: 1,
        });
        n.notification_id = tidings_core::Notification::id_for("e2", "u1");
        n.category = String::new();
        batch.notifications.push(crate::StoredNotification { notification: n, stream_partition: 0, stream_offset: 2 });
        store.write_batch("test", &batch).await.unwrap();
        let rows: Vec<(i64, String)> = on_pool!(store, |pool, _Db| sqlx::query_as(
            "SELECT stream_offset, category FROM notifications ORDER BY stream_offset"
        )
        .fetch_all(pool)
        .await
        .unwrap());
        assert_eq!(rows, vec![(1, "campaigns".to_owned()), (2, String::new())]);
    }

    async fn preferences_round_trip(store: &Store) {
        assert_eq!(store.preferences("u1").await.unwrap(), None, "nothing saved yet");
        let prefs = Preferences {
            opt_out: vec!["campaigns".into(), "coupons".into()],
            time_zone: "Asia/Seoul".into(),
            quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
        };
        store.set_preferences("u1", &prefs, 1).await.unwrap();
        assert_eq!(store.preferences("u1").await.unwrap(), Some(prefs));
        // A replace drops what the new preferences leave out.
        let fewer = Preferences { opt_out: vec!["coupons".into()], time_zone: "UTC".into(), quiet_hours: None };
        store.set_preferences("u1", &fewer, 2).await.unwrap();
        assert_eq!(store.preferences("u1").await.unwrap(), Some(fewer.clone()));
        assert_eq!(store.preferences("u2").await.unwrap(), None, "another user is untouched");
        // The locale is replaced with the preferences that name it, kept by those that do not.
        assert_eq!(store.preference_locale("u1").await.unwrap(), None);
        store.set_preferences_and_locale("u1", &fewer, Some("ko"), 3).await.unwrap();
        assert_eq!(store.preference_locale("u1").await.unwrap().as_deref(), Some("ko"));
        store.set_preferences("u1", &fewer, 4).await.unwrap();
        assert_eq!(store.preference_locale("u1").await.unwrap().as_deref(), Some("ko"));
        store.set_preferences_and_locale("u1", &fewer, None, 5).await.unwrap();
        assert_eq!(store.preference_locale("u1").await.unwrap(), None);
        assert_eq!(store.preference_locale("u2").await.unwrap(), None);
    }

    async fn opted_out_answers_per_category_in_chunks(store: &Store) {
        let out = Preferences { opt_out: vec!["campaigns".into()], ..Preferences::default() };
        // More users than one statement holds, opted out ones in several chunks.
        let users: Vec<String> = (0..OPTED_OUT_CHUNK * 2 + 10).map(|i| format!("user-{i:05}")).collect();
        for u in [&users[3], &users[OPTED_OUT_CHUNK + 5], &users[OPTED_OUT_CHUNK * 2 + 9]] {
            store.set_preferences(u, &out, 1).await.unwrap();
        }
        let other = Preferences { opt_out: vec!["coupons".into()], ..Preferences::default() };
        store.set_preferences(&users[4], &other, 1).await.unwrap();
        let found = store.opted_out("campaigns", &users).await.unwrap();
        let want: HashSet<String> =
            [&users[3], &users[OPTED_OUT_CHUNK + 5], &users[OPTED_OUT_CHUNK * 2 + 9]].into_iter().cloned().collect();
        assert_eq!(found, want);
        assert_eq!(store.opted_out("coupons", &users).await.unwrap(), HashSet::from([users[4].clone()]));
        assert!(store.opted_out("orders", &users).await.unwrap().is_empty());
        assert!(store.opted_out("campaigns", &[]).await.unwrap().is_empty());
    }
}
