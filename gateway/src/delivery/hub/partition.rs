//! An owned partition: its ring of recent events, the streams of its users, whether it has caught
//! up, and how consumed events reach those streams (appended and queued under the partition's lock).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use metrics::{gauge, Gauge};
use tokio::sync::mpsc;

use super::conn::{CloseReason, Queued, Sub};
use super::{Hub, SubscribeError};
use crate::delivery::ring::Ring;
use crate::delivery::Event;

pub(super) struct Partition {
    pub(super) ring: Ring,
    /// Per user, oldest connection first.
    pub(super) subs: HashMap<Box<str>, Vec<Sub>>,
    /// Caught up: consumed up to the end the partition had when it was assigned.
    pub(super) live: bool,
    /// The high watermark at assignment; live once the ring reaches it.
    pub(super) target: i64,
    /// The partition's log start as last fetched (a backfill cannot read before it).
    pub(super) low: i64,
    pub(super) lag: Gauge,
    /// Recently delivered notification ids (a replay of the templating stage repeats them).
    pub(super) recent: RecentIds,
    /// Revoked or shutting down: set under this lock by whoever drained `subs`, so a subscribe
    /// that took this partition before that (and locks it after) cannot register into it.
    pub(super) closed: Option<Closed>,
}

/// The last `cap` ids seen, with O(1) membership: bounded memory, oldest forgotten first.
pub(super) struct RecentIds {
    set: std::collections::HashSet<u128>,
    order: std::collections::VecDeque<u128>,
    cap: usize,
}

impl RecentIds {
    fn new(cap: usize) -> Self {
        RecentIds { set: Default::default(), order: Default::default(), cap: cap.max(1) }
    }

    /// Records `id`; false when it was already among the recent ones.
    fn first_time(&mut self, id: u128) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

#[derive(Debug, Clone, Copy)]
pub(super) enum Closed {
    Revoked,
    ShuttingDown,
}

impl Partition {
    /// Refuses new streams once closed (the caller holds this partition's lock).
    pub(super) fn open(&self, partition: i32) -> Result<(), SubscribeError> {
        match self.closed {
            None => Ok(()),
            Some(Closed::Revoked) => Err(SubscribeError::NotOwned(partition)),
            Some(Closed::ShuttingDown) => Err(SubscribeError::NotReady(partition)),
        }
    }
}

impl Hub {
    /// Takes `partition`, consumed from `start`; it is live once offset `high - 1` is consumed.
    pub fn assign(&self, partition: i32, start: i64, high: i64) {
        let part = Partition {
            ring: Ring::new(start, self.cfg.ring_events, self.cfg.ring_bytes),
            subs: HashMap::new(),
            live: high <= start,
            target: high,
            low: start,
            lag: gauge!("tidings_gateway_partition_lag", "partition" => partition.to_string()),
            recent: RecentIds::new(self.cfg.dedupe_ids),
            closed: None,
        };
        part.lag.set((high - start).max(0) as f64);
        self.partitions.write().expect("lock").insert(partition, Arc::new(Mutex::new(part)));
        self.joined.store(true, Ordering::Relaxed);
        self.metrics.owned.set(self.partitions.read().expect("lock").len() as f64);
    }

    /// Marks that the group answered with an assignment, even an empty one.
    pub fn set_joined(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }

    /// Gives `partitions` up: their connections get `reconnect` after what is queued.
    pub fn revoke(&self, partitions: &[i32]) {
        let removed: Vec<_> = {
            let mut map = self.partitions.write().expect("lock");
            partitions.iter().filter_map(|p| map.remove(p)).collect()
        };
        for part in removed {
            let mut part = part.lock().expect("lock");
            part.closed = Some(Closed::Revoked);
            for (_, subs) in part.subs.drain() {
                for s in subs {
                    self.count_close(CloseReason::PartitionRevoked);
                    s.conn.close(CloseReason::PartitionRevoked);
                }
            }
            part.lag.set(0.0);
        }
        self.metrics.owned.set(self.partitions.read().expect("lock").len() as f64);
    }

    /// Stops taking streams and closes every open one with `reconnect` (SIGTERM).
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let parts: Vec<_> = self.partitions.read().expect("lock").values().cloned().collect();
        for part in parts {
            let mut part = part.lock().expect("lock");
            part.closed = Some(Closed::ShuttingDown);
            for (_, subs) in part.subs.drain() {
                for s in subs {
                    self.count_close(CloseReason::Shutdown);
                    s.conn.close(CloseReason::Shutdown);
                }
            }
        }
    }

    pub(super) fn partition(&self, p: i32) -> Option<Arc<Mutex<Partition>>> {
        self.partitions.read().expect("lock").get(&p).cloned()
    }

    /// Appends a consumed event to its partition's ring and queues it for its user's streams.
    /// Streams whose queue is full (by count or bytes) are closed as slow.
    pub fn push(&self, ev: Event) {
        self.push_all(vec![ev]);
    }

    /// [`Hub::push`] for the events of one record (a group record's recipients), under one lock.
    pub fn push_all(&self, events: Vec<Event>) {
        let Some(first) = events.first() else { return };
        let Some(part) = self.partition(first.partition) else { return };
        let mut part = part.lock().expect("lock");
        for ev in events {
            self.push_locked(&mut part, ev);
        }
    }

    fn push_locked(&self, part: &mut Partition, ev: Event) {
        let ev = Arc::new(ev);
        if !part.recent.first_time(ev.id) {
            // The same notification again (templating replayed its input): consumed, not delivered.
            Self::advance(part, ev.offset);
            metrics::counter!("tidings_gateway_duplicates_dropped_total").increment(1);
            return;
        }
        part.ring.push(ev.clone());
        Self::advance(part, ev.offset);
        let Some(subs) = part.subs.get_mut(&ev.user) else { return };
        let size = ev.size();
        subs.retain(|s| {
            if ev.offset <= s.after {
                return true;
            }
            if s.conn.queued_bytes.load(Ordering::Relaxed) + size > self.cfg.queue_bytes {
                self.slow(&s.conn);
                return false;
            }
            match s.conn.tx.try_send(Queued::Event(ev.clone())) {
                Ok(()) => {
                    s.conn.queued_bytes.fetch_add(size, Ordering::Relaxed);
                    self.metrics.queued_bytes.increment(size as f64);
                    self.metrics.queued_events.increment(1.0);
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.slow(&s.conn);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
        if subs.is_empty() {
            part.subs.remove(&ev.user);
        }
    }

    /// Records that `offset` of `partition` was consumed without producing an event (a record
    /// that could not be decoded; the persistence stage dead-letters it).
    pub fn skip(&self, partition: i32, offset: i64) {
        if let Some(part) = self.partition(partition) {
            let mut part = part.lock().expect("lock");
            Self::advance(&mut part, offset);
        }
    }

    fn advance(part: &mut Partition, offset: i64) {
        if !part.live && offset + 1 >= part.target {
            part.live = true;
        }
        part.lag.set((part.target - offset - 1).max(0) as f64);
    }

    /// Records the partition's log start (fetched with the watermarks).
    pub fn set_low_watermark(&self, partition: i32, low: i64) {
        if let Some(part) = self.partition(partition) {
            part.lock().expect("lock").low = low;
        }
    }

    /// Updates the partition's lag from a fresh high watermark.
    pub fn set_high_watermark(&self, partition: i32, high: i64) {
        if let Some(part) = self.partition(partition) {
            let part = part.lock().expect("lock");
            part.lag.set((high - part.ring.last() - 1).max(0) as f64);
        }
    }

    pub(super) fn unregister(&self, partition: i32, user: &str, conn: u64) {
        let Some(part) = self.partition(partition) else { return };
        let mut part = part.lock().expect("lock");
        if let Some(subs) = part.subs.get_mut(user) {
            subs.retain(|s| s.conn.id != conn);
            if subs.is_empty() {
                part.subs.remove(user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::hub::testkit::*;
    use crate::delivery::hub::Frame;
    use crate::delivery::HubConfig;
    use bytes::Bytes;

    #[tokio::test]
    async fn a_replayed_notification_reaches_each_stream_once_within_a_bounded_window() {
        let (hub, _) = hub_with("alice", HubConfig { dedupe_ids: 3, ..cfg() });
        let mut sub = hub.subscribe("alice", None).await.unwrap();
        let with_id = |offset: i64, id: u128| {
            Event::new(0, offset, id, "alice", "k", Bytes::from(format!("{{\"n\":{offset}}}")), 0)
        };
        hub.push(with_id(0, 100));
        hub.push(with_id(1, 101));
        hub.push(with_id(2, 100)); // templating replayed notification 100 at a later offset
        assert_eq!(offsets(&drain(&mut sub)), vec![0, 1], "a replayed id was delivered twice");
        // The window is bounded: past 3 newer ids, 100 is forgotten (and delivered again).
        for (o, id) in [(3, 102), (4, 103), (5, 104), (6, 100)] {
            hub.push(with_id(o, id));
        }
        assert_eq!(offsets(&drain(&mut sub)), vec![3, 4, 5, 6]);
        let p = hub.partition(0).unwrap();
        assert!(p.lock().unwrap().recent.set.len() <= 3, "the id window grew past its bound");
    }

    #[tokio::test]
    async fn overflowing_queue_closes_only_the_slow_stream() {
        let (hub, _) = hub_with("alice", cfg());
        let slow = hub.subscribe("alice", None).await.unwrap();
        let mut fast = hub.subscribe("alice", None).await.unwrap();
        for o in 0..10 {
            hub.push(ev(o, "alice"));
            drain(&mut fast);
        }
        assert_eq!(slow.conn.aborted().await, CloseReason::SlowConsumer);
        assert!(!fast.conn.kill.is_cancelled());
        assert_eq!(hub.connections(), 1);
    }

    #[tokio::test]
    async fn byte_bound_closes_a_stream_before_the_count_bound() {
        let (hub, _) = hub_with("alice", HubConfig { queue_events: 1000, queue_bytes: 500, ..cfg() });
        let sub = hub.subscribe("alice", None).await.unwrap();
        for o in 0..10 {
            hub.push(ev(o, "alice"));
        }
        assert!(sub.rx.len() < 10);
        assert_eq!(sub.conn.aborted().await, CloseReason::SlowConsumer);
    }

    #[tokio::test]
    async fn revoke_sends_reconnect_after_queued_events_and_unowned_is_refused() {
        let (hub, _) = hub_with("alice", cfg());
        let mut sub = hub.subscribe("alice", None).await.unwrap();
        hub.push(ev(0, "alice"));
        hub.revoke(&[0]);
        let frames = drain(&mut sub);
        assert_eq!(offsets(&frames), vec![0]);
        assert!(matches!(frames.last(), Some(Frame::Close(CloseReason::PartitionRevoked))));
        assert!(matches!(hub.subscribe("alice", None).await, Err(SubscribeError::NotOwned(0))));
    }

    #[tokio::test]
    async fn not_live_until_caught_up() {
        let hub = Hub::new(cfg(), None);
        hub.set_partition_count(1);
        hub.assign(0, 5, 8);
        assert!(!hub.is_ready());
        assert!(matches!(hub.subscribe("alice", None).await, Err(SubscribeError::NotReady(0))));
        hub.push(ev(5, "x"));
        hub.skip(0, 6);
        assert!(!hub.is_ready());
        hub.push(ev(7, "x"));
        assert!(hub.is_ready());
        assert!(hub.subscribe("alice", None).await.is_ok());
    }
}
