//! A campaign's dry run: its audience (each user once), who opted out of its category, who is in
//! quiet hours right now, and how long sending takes at a documented rate. The store counts; the
//! quiet-hours windows stream by and are judged here in each user's time zone.

use chrono::{DateTime, Timelike, Utc};
use serde_json::{json, Value};
use tidings_store::campaigns::QuietWindow;
use tidings_store::{Store, StoreError};

use super::validation::Definition;

/// The rate `estimated_send_ms` assumes, in notifications per second: the aim for a
/// campaign (100,000 users stored within 2 s), below what the stages measured in
/// docs/benchmarks.md (templating 2.3 million per core, SQLite persistence 70,000 rows per second).
pub const ESTIMATED_NOTIFICATIONS_PER_SEC: u64 = 50_000;

/// A dry run's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DryRun {
    /// Users in the audience, each once.
    pub audience: u64,
    /// Of them, opted out of the category (they get nothing).
    pub opted_out: u64,
    /// Of the others, inside their quiet hours now (their notification would be held); always 0
    /// for a critical category.
    pub in_quiet_hours_now: u64,
    /// `audience - opted_out`.
    pub will_receive: u64,
    /// How long producing and storing them takes at [`ESTIMATED_NOTIFICATIONS_PER_SEC`].
    pub estimated_send_ms: u64,
}

impl DryRun {
    pub fn json(&self, def: &Definition) -> Value {
        json!({
            "audience": self.audience,
            "opted_out": self.opted_out,
            "in_quiet_hours_now": self.in_quiet_hours_now,
            "will_receive": self.will_receive,
            "send_at": def.send_at,
            "estimated_send_ms": self.estimated_send_ms,
        })
    }
}

/// Milliseconds to send `n` notifications at [`ESTIMATED_NOTIFICATIONS_PER_SEC`], rounded up.
pub fn estimated_send_ms(n: u64) -> u64 {
    (n * 1000).div_ceil(ESTIMATED_NOTIFICATIONS_PER_SEC)
}

/// Whether `at` is inside `w` in its time zone (start > end wraps midnight); a zone that no longer
/// parses (the API accepts only known ones) counts as UTC.
pub fn in_window(w: &QuietWindow, at: DateTime<Utc>) -> bool {
    let tz: chrono_tz::Tz = w.time_zone.parse().unwrap_or(chrono_tz::UTC);
    let local = at.with_timezone(&tz);
    let minute = (local.hour() * 60 + local.minute()) as u16;
    let (s, e) = (w.start_minute, w.end_minute);
    if s <= e {
        s <= minute && minute < e
    } else {
        minute >= s || minute < e
    }
}

/// The dry run of `def` at `now`.
pub async fn count(store: &Store, def: &Definition, critical: bool, now: DateTime<Utc>) -> Result<DryRun, StoreError> {
    let (segments, users) = (&def.audience.segments, &def.audience.user_ids);
    let counted = store.campaign_audience(&def.category, segments, users).await?;
    let mut quiet = 0;
    if !critical {
        store
            .campaign_quiet_windows(&def.category, segments, users, |w| {
                if in_window(&w, now) {
                    quiet += w.users;
                }
            })
            .await?;
    }
    let will_receive = counted.audience.saturating_sub(counted.opted_out);
    Ok(DryRun {
        audience: counted.audience,
        opted_out: counted.opted_out,
        in_quiet_hours_now: quiet,
        will_receive,
        estimated_send_ms: estimated_send_ms(will_receive),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(tz: &str, start: &str, end: &str) -> QuietWindow {
        let m = |s: &str| crate::preferences::parse_hhmm(s).unwrap();
        QuietWindow { time_zone: tz.into(), start_minute: m(start), end_minute: m(end), users: 1 }
    }

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn windows_are_judged_in_the_users_zone_and_wrap_midnight() {
        let night = window("Asia/Seoul", "22:00", "08:00");
        assert!(in_window(&night, at("2026-12-07T14:00:00Z")), "23:00 in Seoul");
        assert!(in_window(&night, at("2026-12-07T22:59:00Z")), "07:59 in Seoul");
        assert!(!in_window(&night, at("2026-12-07T23:00:00Z")), "08:00 in Seoul: the window ended");
        assert!(!in_window(&night, at("2026-12-07T12:59:00Z")), "21:59 in Seoul");
        let lunch = window("Europe/Berlin", "12:00", "13:00");
        assert!(in_window(&lunch, at("2026-12-07T11:30:00Z")), "12:30 in Berlin (winter, UTC+1)");
        assert!(!in_window(&lunch, at("2026-07-07T11:30:00Z")), "13:30 in Berlin (summer, UTC+2)");
    }

    #[test]
    fn the_estimate_follows_the_documented_rate() {
        assert_eq!(estimated_send_ms(0), 0);
        assert_eq!(estimated_send_ms(1), 1);
        assert_eq!(estimated_send_ms(100_000), 2_000);
        assert_eq!(estimated_send_ms(ESTIMATED_NOTIFICATIONS_PER_SEC), 1_000);
    }
}
