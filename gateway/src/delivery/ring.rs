//! The per-partition ring of recent events that serves resumes: bounded by count and by bytes, it
//! remembers from which offset on it holds *every* consumed event of its partition, so a resume is
//! served from it only when nothing the client missed has been evicted. A backfill from Kafka can
//! prepend older events and hold off eviction for a while, so a herd of late resumes is served here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use super::Event;

/// Recent events of one partition, oldest first.
#[derive(Debug)]
pub struct Ring {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
    /// Every event of the partition with an offset ≥ this that has been consumed is in the ring.
    covered_from: i64,
    /// The offset after the last consumed event (the next one expected).
    next: i64,
    /// Larger bounds until an instant (after a backfill, while the resumes it serves arrive).
    hold: Option<Hold>,
}

#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    max_events: usize,
    max_bytes: usize,
}

impl Ring {
    /// An empty ring for a partition whose consumption starts at `start`.
    pub fn new(start: i64, max_events: usize, max_bytes: usize) -> Self {
        Ring {
            events: VecDeque::new(),
            bytes: 0,
            max_events: max_events.max(1),
            max_bytes,
            covered_from: start,
            next: start,
            hold: None,
        }
    }

    /// Keeps up to `max_events` / `max_bytes` (or the normal bounds, if larger) until `until`.
    pub fn hold(&mut self, max_events: usize, max_bytes: usize, until: Instant) {
        self.hold = Some(Hold { until, max_events, max_bytes });
    }

    /// Puts `older` (oldest first, all before what the ring covers) in front and covers from
    /// `from` (the offset the backfill read from). Past the bounds the oldest go again.
    pub fn prepend(&mut self, from: i64, older: Vec<Arc<Event>>) {
        // Non-decreasing: a group record's events share its offset.
        debug_assert!(older.windows(2).all(|w| w[0].offset <= w[1].offset));
        debug_assert!(older.last().is_none_or(|e| e.offset < self.covered_from));
        if from >= self.covered_from {
            return;
        }
        for ev in older.into_iter().rev() {
            self.bytes += ev.size();
            self.events.push_front(ev);
        }
        self.covered_from = from;
        self.evict();
    }

    /// Appends the next consumed event and evicts the oldest ones past either bound.
    pub fn push(&mut self, ev: Arc<Event>) {
        if self.events.is_empty() && ev.offset > self.covered_from {
            // The first event came later than the start offset (compaction, transaction markers or
            // a broker that resumes at the next batch): only claim what was actually seen.
            self.covered_from = ev.offset;
        }
        self.next = ev.offset.saturating_add(1);
        self.bytes += ev.size();
        self.events.push_back(ev);
        self.evict();
    }

    fn evict(&mut self) {
        let (mut max_events, mut max_bytes) = (self.max_events, self.max_bytes);
        let over = |len: usize, bytes: usize, me: usize, mb: usize| len > me || (bytes > mb && len > 1);
        if !over(self.events.len(), self.bytes, max_events, max_bytes) {
            return;
        }
        // Looked at only when over the normal bounds: no clock read per push otherwise.
        match self.hold {
            Some(h) if Instant::now() < h.until => {
                max_events = max_events.max(h.max_events);
                max_bytes = max_bytes.max(h.max_bytes);
            }
            Some(_) => self.hold = None,
            None => {}
        }
        while over(self.events.len(), self.bytes, max_events, max_bytes) {
            let old = self.events.pop_front().expect("non-empty");
            self.bytes -= old.size();
            self.covered_from = old.offset.saturating_add(1);
        }
    }

    /// True when every event after `after` that was consumed is still here. `after` comes from a
    /// client's `Last-Event-ID` (any offset up to `i64::MAX`), so no arithmetic on it may overflow.
    pub fn covers(&self, after: i64) -> bool {
        after >= self.covered_from.saturating_sub(1)
    }

    /// The lowest offset from which the ring holds every consumed event.
    pub fn covered_from(&self) -> i64 {
        self.covered_from
    }

    /// The offset of the last consumed event (`start - 1` before any).
    pub fn last(&self) -> i64 {
        self.next.saturating_sub(1)
    }

    /// `user`'s events with an offset greater than `after`, oldest first.
    pub fn after(&self, user: &str, after: i64) -> Vec<Arc<Event>> {
        let from = self.events.partition_point(|e| e.offset <= after);
        self.events.range(from..).filter(|e| &*e.user == user).cloned().collect()
    }

    /// The notification ids held.
    pub fn ids(&self) -> impl Iterator<Item = u128> + '_ {
        self.events.iter().map(|e| e.id)
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(offset: i64, user: &str, len: usize) -> Arc<Event> {
        Arc::new(Event::new(0, offset, offset as u128, user, "k", bytes::Bytes::from(vec![b'x'; len]), 0))
    }

    #[test]
    fn evicts_by_count_and_tracks_coverage() {
        let mut r = Ring::new(10, 3, usize::MAX);
        assert!(r.covers(9) && !r.covers(8));
        for o in 10..15 {
            r.push(ev(o, if o % 2 == 0 { "a" } else { "b" }, 1));
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.covered_from(), 12);
        assert_eq!(r.last(), 14);
        assert!(r.covers(11) && !r.covers(10));
        let a: Vec<i64> = r.after("a", 11).iter().map(|e| e.offset).collect();
        assert_eq!(a, vec![12, 14]);
        assert!(r.after("a", 14).is_empty());
    }

    #[test]
    fn evicts_by_bytes_but_keeps_the_newest() {
        let mut r = Ring::new(0, 100, 1000);
        let one = ev(0, "a", 10).size();
        for o in 0..10 {
            r.push(ev(o, "a", 10));
        }
        assert!(r.bytes() <= 1000);
        assert_eq!(r.len(), 1000 / one);
        // One event larger than the whole budget still stays (the ring is never empty after a push).
        r.push(ev(10, "a", 5000));
        assert_eq!(r.len(), 1);
        assert_eq!(r.covered_from(), 10);
    }

    #[test]
    fn a_backfill_extends_coverage_and_is_held_until_the_hold_ends() {
        let mut r = Ring::new(100, 3, usize::MAX);
        for o in 100..105 {
            r.push(ev(o, "a", 1));
        }
        assert_eq!(r.covered_from(), 102);
        r.hold(10, usize::MAX, Instant::now() + std::time::Duration::from_secs(60));
        r.prepend(95, (95..102).filter(|o| o % 2 == 0).map(|o| ev(o, "a", 1)).collect());
        assert_eq!(r.covered_from(), 95);
        assert!(r.covers(94) && !r.covers(93));
        let got: Vec<i64> = r.after("a", 94).iter().map(|e| e.offset).collect();
        assert_eq!(got, vec![96, 98, 100, 102, 103, 104]);
        // Held: pushes evict only past the hold's 10.
        for o in 105..110 {
            r.push(ev(o, "a", 1));
        }
        assert_eq!(r.len(), 10);
        assert_eq!(r.covered_from(), 97, "the oldest (96) went once past 10");
        // A prepend that would not reach further back changes nothing.
        r.prepend(100, vec![]);
        assert_eq!(r.covered_from(), 97);
        // Hold over: back to 3 on the next push.
        r.hold(10, usize::MAX, Instant::now());
        r.push(ev(110, "a", 1));
        assert_eq!(r.len(), 3);
        assert_eq!(r.covered_from(), 108);
    }

    /// A `Last-Event-ID` offset is the client's: `i64::MAX` and its neighbours are covered (they
    /// are after everything), and asking never overflows.
    #[test]
    fn near_max_offsets_do_not_overflow() {
        let mut r = Ring::new(10, 3, usize::MAX);
        r.push(ev(10, "a", 1));
        for after in [i64::MAX, i64::MAX - 1, i64::MAX - 2] {
            assert!(r.covers(after), "{after}");
            assert!(r.after("a", after).is_empty());
        }
        assert!(!r.covers(i64::MIN) && !r.covers(-1) && r.covers(9));
        let mut top = Ring::new(i64::MAX - 2, 1, usize::MAX);
        top.push(ev(i64::MAX - 1, "a", 1));
        top.push(ev(i64::MAX, "a", 1));
        assert_eq!(top.covered_from(), i64::MAX);
        assert!(top.covers(i64::MAX) && top.covers(i64::MAX - 1) && !top.covers(i64::MAX - 2));
    }

    proptest! {
        /// `covers` is the exact comparison `after + 1 >= covered_from`, over every i64 (the top
        /// few, where `after + 1` would overflow, drawn as often as the rest).
        #[test]
        fn covers_is_exact_over_all_offsets(start in any::<i64>(), after in prop_oneof![any::<i64>(), i64::MAX - 3..=i64::MAX]) {
            let r = Ring::new(start, 1, usize::MAX);
            prop_assert_eq!(r.covers(after), i128::from(after) + 1 >= i128::from(start));
        }
    }

    #[test]
    fn first_event_past_the_start_narrows_coverage() {
        let mut r = Ring::new(5, 10, usize::MAX);
        r.push(ev(8, "a", 1));
        assert_eq!(r.covered_from(), 8);
        assert!(!r.covers(6));
        assert!(r.covers(7));
    }
}
