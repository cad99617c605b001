//! Quiet hours: whether an instant falls inside a user's daily do-not-disturb window (minutes after
//! local midnight in their IANA time zone, wrapping midnight when start > end), when that window
//! ends, and when a notification held for it is released (spread after the end by its id).

use chrono::{DateTime, Duration, NaiveDateTime, NaiveTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use tidings_store::preferences::QuietHours;

const MINUTES_PER_DAY: u16 = 24 * 60;

/// `time_zone` as a zone; a name chrono-tz does not know (the preferences API refuses those, so
/// only a row written otherwise) counts as UTC rather than failing the page.
pub fn zone(time_zone: &str) -> Tz {
    time_zone.parse().unwrap_or(Tz::UTC)
}

/// Whether minute `m` of a local day lies in `q`: start inclusive, end exclusive; start > end
/// wraps midnight (22:00–08:00), start == end is an empty window.
pub fn covers(q: QuietHours, m: u16) -> bool {
    let (s, e) = (q.start_minute, q.end_minute);
    if s < e {
        (s..e).contains(&m)
    } else if s > e {
        m >= s || m < e
    } else {
        false
    }
}

/// If `at_micros` lies inside `q` in `tz`, the instant the window ends (microseconds since the
/// epoch, always after `at_micros`); `None` when it does not (or `q` is malformed).
pub fn window_end(at_micros: i64, tz: Tz, q: QuietHours) -> Option<i64> {
    if q.start_minute >= MINUTES_PER_DAY || q.end_minute >= MINUTES_PER_DAY {
        return None;
    }
    let at = DateTime::<Utc>::from_timestamp_micros(at_micros)?;
    let local = at.with_timezone(&tz);
    let m = (local.hour() * 60 + local.minute()) as u16;
    if !covers(q, m) {
        return None;
    }
    let end_time = NaiveTime::from_hms_opt(u32::from(q.end_minute / 60), u32::from(q.end_minute % 60), 0)?;
    // Today's end if it is still ahead (inside a window before its end on the same local day),
    // else tomorrow's: the first local end after `at`.
    let mut day = local.date_naive();
    if m >= q.end_minute {
        day = day.succ_opt()?;
    }
    let end = first_instant_at_or_after(tz, day.and_time(end_time), at)?;
    Some(end.timestamp_micros())
}

/// The instant the local wall time `wall` names in `tz`, the first one after `after`: in the hour
/// a clock falls back it names two instants, and in the hour it springs forward none (then the
/// first instant after the gap: the window ends when the wall clock passes its end).
fn first_instant_at_or_after(tz: Tz, wall: NaiveDateTime, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    use chrono::LocalResult;
    for skip in 0..=(3 * 60) {
        match tz.from_local_datetime(&(wall + Duration::minutes(skip))) {
            LocalResult::Single(t) => return Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(a, b) => {
                let a = a.with_timezone(&Utc);
                return Some(if a > after { a } else { b.with_timezone(&Utc) });
            }
            LocalResult::None => {}
        }
    }
    None
}

/// When a notification held for quiet hours is released: the window's end plus a delay taken
/// from its id (uniform over `spread_ms`, the same on every replay), so a window's holds do not
/// all arrive at its edge.
pub fn release_at(window_end_micros: i64, notification_id: uuid::Uuid, spread_ms: u64) -> i64 {
    if spread_ms == 0 {
        return window_end_micros;
    }
    let bytes = notification_id.as_bytes();
    let hash = u64::from_be_bytes(bytes[..8].try_into().expect("16 bytes"))
        ^ u64::from_be_bytes(bytes[8..].try_into().expect("16 bytes"));
    let delay_ms = hash % spread_ms;
    window_end_micros.saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q(start: (u16, u16), end: (u16, u16)) -> QuietHours {
        QuietHours { start_minute: start.0 * 60 + start.1, end_minute: end.0 * 60 + end.1 }
    }

    fn micros(rfc3339: &str) -> i64 {
        DateTime::parse_from_rfc3339(rfc3339).unwrap().timestamp_micros()
    }

    #[test]
    fn a_window_that_wraps_midnight() {
        let seoul: Tz = "Asia/Seoul".parse().unwrap();
        let night = q((22, 0), (8, 0));
        // 23:30 in Seoul: held until 08:00 the next morning there.
        assert_eq!(
            window_end(micros("2026-12-07T23:30:00+09:00"), seoul, night),
            Some(micros("2026-12-08T08:00:00+09:00"))
        );
        // 02:00 after midnight: until 08:00 the same local day.
        assert_eq!(
            window_end(micros("2026-12-08T02:00:00+09:00"), seoul, night),
            Some(micros("2026-12-08T08:00:00+09:00"))
        );
        // Edges: the start is inside, the end is not.
        assert_eq!(
            window_end(micros("2026-12-07T22:00:00+09:00"), seoul, night),
            Some(micros("2026-12-08T08:00:00+09:00"))
        );
        assert_eq!(window_end(micros("2026-12-08T08:00:00+09:00"), seoul, night), None);
        assert_eq!(window_end(micros("2026-12-08T12:00:00+09:00"), seoul, night), None);
        // The same instant is outside the window in UTC (14:30 there).
        assert_eq!(window_end(micros("2026-12-07T23:30:00+09:00"), Tz::UTC, night), None);
    }

    #[test]
    fn a_window_within_one_day_and_an_empty_one() {
        let lunch = q((12, 0), (13, 30));
        assert_eq!(window_end(micros("2026-12-07T12:10:00Z"), Tz::UTC, lunch), Some(micros("2026-12-07T13:30:00Z")));
        assert_eq!(window_end(micros("2026-12-07T11:59:59Z"), Tz::UTC, lunch), None);
        assert_eq!(window_end(micros("2026-12-07T13:30:00Z"), Tz::UTC, lunch), None);
        assert_eq!(window_end(micros("2026-12-07T12:10:00Z"), Tz::UTC, q((9, 0), (9, 0))), None, "start = end: none");
        assert_eq!(window_end(0, Tz::UTC, QuietHours { start_minute: 0, end_minute: 24 * 60 }), None, "malformed");
    }

    #[test]
    fn daylight_saving_changes_move_the_end_in_utc_not_on_the_wall() {
        let ny: Tz = "America/New_York".parse().unwrap();
        let night = q((22, 0), (8, 0));
        // The night clocks spring forward (2026-03-08 02:00 EST → 03:00 EDT): 08:00 EDT is 12:00 UTC.
        assert_eq!(
            window_end(micros("2026-03-07T23:00:00-05:00"), ny, night),
            Some(micros("2026-03-08T08:00:00-04:00"))
        );
        // The night they fall back (2026-11-01): 08:00 EST is 13:00 UTC, ten hours after 22:00 EDT.
        assert_eq!(
            window_end(micros("2026-11-01T01:30:00-04:00"), ny, night),
            Some(micros("2026-11-01T08:00:00-05:00"))
        );
        // A window ending inside the skipped hour ends when the clock passes it (03:00 EDT).
        let short = q((1, 0), (2, 30));
        assert_eq!(
            window_end(micros("2026-03-08T01:45:00-05:00"), ny, short),
            Some(micros("2026-03-08T03:00:00-04:00"))
        );
        // A window ending inside the repeated hour ends at its first 01:30 after the instant: from
        // the first 01:10 (EDT) that is 01:30 EDT; from the second 01:10 (EST) it is 01:30 EST.
        let repeated = q((0, 30), (1, 30));
        assert_eq!(
            window_end(micros("2026-11-01T01:10:00-04:00"), ny, repeated),
            Some(micros("2026-11-01T01:30:00-04:00"))
        );
        assert_eq!(
            window_end(micros("2026-11-01T01:10:00-05:00"), ny, repeated),
            Some(micros("2026-11-01T01:30:00-05:00"))
        );
    }

    #[test]
    fn an_unknown_zone_counts_as_utc() {
        assert_eq!(zone("Mars/Olympus"), Tz::UTC);
        assert_eq!(zone("Asia/Seoul"), chrono_tz::Asia::Seoul);
    }

    #[test]
    fn release_is_spread_by_id_within_the_period() {
        let end = micros("2026-12-08T08:00:00Z");
        let spread = 30 * 60 * 1000;
        let times: Vec<i64> = (0..1000)
            .map(|i| release_at(end, tidings_core::Notification::id_for("campaign:c", &format!("u{i}")), spread))
            .collect();
        assert!(times.iter().all(|&t| t >= end && t < end + spread as i64 * 1000));
        // Spread, not bunched: every sixth of the period gets some.
        for sixth in 0..6 {
            let lo = end + sixth * (spread as i64 * 1000 / 6);
            assert!(times.iter().any(|&t| t >= lo && t < lo + spread as i64 * 1000 / 6), "sixth {sixth} empty");
        }
        let id = tidings_core::Notification::id_for("e", "u");
        assert_eq!(release_at(end, id, spread), release_at(end, id, spread), "the same on every replay");
        assert_eq!(release_at(end, id, 0), end);
    }

    proptest! {
        /// For any zone, window and instant: the window covers the instant iff an end is given; the
        /// end is after the instant, at most a day (plus a DST hour) later, falls on the window's end
        /// minute of the local clock (or just after a skipped hour), and the instant just before the
        /// end is still inside the window while the end itself is not.
        #[test]
        fn window_end_is_the_next_local_end(
            at in 1_600_000_000_000_000i64..1_900_000_000_000_000i64,
            start in 0u16..1440, end in 0u16..1440,
            zone_ix in 0usize..6,
        ) {
            let zones = ["UTC", "Asia/Seoul", "America/New_York", "Europe/London", "Australia/Lord_Howe", "Asia/Kolkata"];
            let tz: Tz = zones[zone_ix].parse().unwrap();
            let window = QuietHours { start_minute: start, end_minute: end };
            let local = DateTime::<Utc>::from_timestamp_micros(at).unwrap().with_timezone(&tz);
            let m = (local.hour() * 60 + local.minute()) as u16;
            match window_end(at, tz, window) {
                None => prop_assert!(!covers(window, m)),
                Some(e) => {
                    prop_assert!(covers(window, m));
                    prop_assert!(e > at);
                    prop_assert!(e - at <= 25 * 3_600_000_000, "{} h", (e - at) / 3_600_000_000);
                    let end_local = DateTime::<Utc>::from_timestamp_micros(e).unwrap().with_timezone(&tz);
                    let end_m = (end_local.hour() * 60 + end_local.minute()) as u16;
                    prop_assert!(end_m == end || !covers(window, end_m), "ends at {end_m}, not {end}");
                    prop_assert!(window_end(e, tz, window).is_none(), "the end is outside the window");
                    // The minute before the end is inside (the window did not end earlier).
                    let before = e - 60_000_000;
                    if before > at {
                        prop_assert_eq!(window_end(before, tz, window), Some(e));
                    }
                }
            }
        }
    }
}
