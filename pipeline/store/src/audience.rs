//! What templating needs to know about a page of recipients before producing to them: who opted
//! out of the notification's category, and each user's locale, time zone and quiet hours, read in
//! one statement per page (both backends).

use std::collections::{HashMap, HashSet};

use super::{Dialect, Store, StoreError, GENERATED};
use crate::preferences::QuietHours;

const PAGE_PREFERENCES: &str = include_str!("sql/audience_page_preferences.sql");

/// Most user ids per page-preferences statement (each id is bound once, used twice): a 5,000-user
/// audience page is one statement, below SQLite's 32,766 and PostgreSQL's 65,535 bind limits.
pub const PAGE_PREFERENCES_CHUNK: usize = 5_000;

/// One user's saved settings that change how a notification reaches them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// Their locale tag, if they chose one.
    pub locale: Option<String>,
    /// IANA time zone name, e.g. `Asia/Seoul`.
    pub time_zone: String,
    pub quiet_hours: Option<QuietHours>,
}

/// The preferences of one page of recipients. Users in neither set have the defaults (not opted
/// out, no locale, UTC, no quiet hours).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PagePreferences {
    /// Users who opted out of the category asked about.
    pub opted_out: HashSet<String>,
    /// Users who saved preferences.
    pub saved: HashMap<String, Recipient>,
}

type Row = (String, i32, Option<String>, Option<String>, Option<i32>, Option<i32>);

impl Store {
    /// Which of `users` opted out of `category`, and the saved locale, time zone and quiet hours of
    /// each: one statement per [`PAGE_PREFERENCES_CHUNK`] users.
    pub async fn page_preferences(&self, category: &str, users: &[String]) -> Result<PagePreferences, StoreError> {
        let mut out = PagePreferences::default();
        for chunk in users.chunks(PAGE_PREFERENCES_CHUNK) {
            let sql = PAGE_PREFERENCES.replace(GENERATED, &bind_list(2, chunk.len()));
            let rows: Vec<Row> = on_pool!(self, |pool, Db| {
                let mut q = sqlx::query_as(&sql).bind(Db::text(category));
                for u in chunk {
                    q = q.bind(Db::text(u));
                }
                q.fetch_all(pool).await?
            });
            for (user, opted_out, locale, time_zone, start, end) in rows {
                if opted_out != 0 {
                    out.opted_out.insert(user);
                    continue;
                }
                let quiet_hours = match (start, end) {
                    (Some(s), Some(e)) => Some(QuietHours {
                        start_minute: u16::try_from(s).unwrap_or(0),
                        end_minute: u16::try_from(e).unwrap_or(0),
                    }),
                    _ => None,
                };
                let time_zone = time_zone.unwrap_or_else(|| "UTC".to_owned());
                out.saved.insert(user, Recipient { locale: locale.filter(|l| !l.is_empty()), time_zone, quiet_hours });
            }
        }
        Ok(out)
    }
}

/// `$first, $first + 1, …` (`n` binds), numbered so that both backends accept them twice.
fn bind_list(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preferences::Preferences;

    on_both_backends!(page_preferences_answer_opt_outs_and_settings_in_chunks);

    async fn page_preferences_answer_opt_outs_and_settings_in_chunks(store: &Store) {
        let users: Vec<String> = (0..PAGE_PREFERENCES_CHUNK + 10).map(|i| format!("user-{i:05}")).collect();
        let out = Preferences { opt_out: vec!["campaigns".into()], ..Preferences::default() };
        store.set_preferences(&users[3], &out, 1).await.unwrap();
        store.set_preferences(&users[PAGE_PREFERENCES_CHUNK + 5], &out, 1).await.unwrap();
        let quiet = Preferences {
            opt_out: vec!["coupons".into()],
            time_zone: "Asia/Seoul".into(),
            quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
        };
        store.set_preferences(&users[4], &quiet, 1).await.unwrap();
        store.set_preferences(&users[PAGE_PREFERENCES_CHUNK + 9], &quiet, 1).await.unwrap();
        on_pool!(store, |pool, _Db| sqlx::query("UPDATE user_preferences SET locale = 'ko' WHERE user_id = $1")
            .bind(&users[4])
            .execute(pool)
            .await
            .map(|_| ())
            .unwrap());
        let found = store.page_preferences("campaigns", &users).await.unwrap();
        assert_eq!(found.opted_out, HashSet::from([users[3].clone(), users[PAGE_PREFERENCES_CHUNK + 5].clone()]));
        let want = |locale: Option<&str>| Recipient {
            locale: locale.map(str::to_owned),
            time_zone: "Asia/Seoul".into(),
            quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
        };
        assert_eq!(found.saved.len(), 4, "every user who saved preferences: {:?}", found.saved);
        assert_eq!(found.saved[&users[4]], want(Some("ko")));
        assert_eq!(found.saved[&users[PAGE_PREFERENCES_CHUNK + 9]], want(None));
        // Another category: the coupon opt-outs, the campaign opt-outs' defaults are saved rows.
        let coupons = store.page_preferences("coupons", &users).await.unwrap();
        assert_eq!(coupons.opted_out, HashSet::from([users[4].clone(), users[PAGE_PREFERENCES_CHUNK + 9].clone()]));
        assert_eq!(coupons.saved[&users[3]].time_zone, "UTC");
        assert_eq!(store.page_preferences("campaigns", &[]).await.unwrap(), PagePreferences::default());
    }
}
