//! How a stream starts: live, or resumed after its `Last-Event-ID` from the ring, from a backfill
//! of the ring out of Kafka, from the store, and else with `reset` (refetch the inbox).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::counter;
use tidings_store::{Store, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::conn::{CloseReason, Conn, Frame, Sub, Subscription};
use super::partition::Partition;
use super::{Hub, ResumeOutcome, SubscribeError};
use crate::delivery::{position_id, Event};

/// The persisted notifications and how far persistence has got, for resumes the ring cannot serve.
#[derive(Clone, Debug)]
pub struct StoreResume {
    pub store: Store,
    /// Persistence stage's consumer group (its offsets say how far the store is complete).
    pub group: String,
    /// Physical notifications topic.
    pub topic: String,
}

/// The longest a backfill may take before the resume falls back to the store.
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(15);

/// What a look at the ring decided.
enum Registered {
    Done(Subscription),
    /// The ring starts after the asked position `after`: a backfill or the store must fill the
    /// gap, if they have it.
    Gap {
        after: i64,
    },
}

impl Hub {
    /// Opens a stream for `user`, resuming after `last` (a position from `Last-Event-ID`) when
    /// given: from the ring if it still holds everything after it, else from the store if that
    /// has everything up to where the ring starts, else with a `reset`.
    pub async fn subscribe(
        self: &Arc<Self>,
        user: &str,
        last: Option<(i32, i64)>,
    ) -> Result<Subscription, SubscribeError> {
        let partition = self.partition_of(user).ok_or(SubscribeError::NotReady(-1))?;
        // A position from another partition (the topic grew, so the user moved) says nothing about
        // what this partition holds for the user: start over with `reset`, never silently fresh.
        if last.is_some_and(|(p, _)| p != partition) {
            return self.reset(partition, user, "partition_changed");
        }
        // How far the store is complete (its next offset), once the ring turned out not to be enough.
        let mut stored_next: Option<i64> = None;
        let mut backfilled = false;
        for _attempt in 0..3 {
            let part = self.partition(partition).ok_or(SubscribeError::NotOwned(partition))?;
            let after = match self.register_from_ring(&part, partition, user, last, stored_next)? {
                Registered::Done(sub) => return Ok(sub),
                Registered::Gap { after } => after,
            };
            if !backfilled {
                backfilled = true;
                if self.backfill(&part, partition, after).await {
                    continue;
                }
            }
            match self.stored_next(partition).await? {
                Some(next) => stored_next = Some(next),
                None => return self.reset(partition, user, "position_too_old"),
            }
        }
        // The ring kept moving past what the store had: give up on a gapless resume.
        self.reset(partition, user, "position_too_old")
    }

    /// Under `part`'s lock: registers the stream when the ring serves everything after `last`, or
    /// the ring plus the store does (`stored_next`: the store holds every offset below it); else
    /// says the store is needed. Refuses a partition revoked or closed after the caller looked it up.
    fn register_from_ring(
        self: &Arc<Self>,
        part: &Mutex<Partition>,
        partition: i32,
        user: &str,
        last: Option<(i32, i64)>,
        stored_next: Option<i64>,
    ) -> Result<Registered, SubscribeError> {
        let mut guard = part.lock().expect("lock");
        self.check_open(&guard, partition)?;
        if !guard.live {
            return Err(SubscribeError::NotReady(partition));
        }
        let sub = match (last, stored_next) {
            (None, _) => {
                let id = Some(position_id(partition, guard.ring.last()));
                let after = guard.ring.last();
                self.register(&mut guard, partition, user, after, vec![Frame::Hello { id }], ResumeOutcome::Fresh)
            }
            (Some((_, lo)), _) if guard.ring.covers(lo) => {
                let mut backlog = vec![Frame::Hello { id: None }];
                backlog.extend(guard.ring.after(user, lo).into_iter().map(Frame::Event));
                let after = lo.max(guard.ring.last());
                self.register(&mut guard, partition, user, after, backlog, ResumeOutcome::Ring)
            }
            // The store holds everything before the ring's start: the gap from there, the rest from
            // the ring, the live events from the queue.
            (Some((_, lo)), Some(stored_next)) if guard.ring.covered_from() <= stored_next => {
                let before = guard.ring.covered_from();
                let mut backlog = vec![Frame::Hello { id: None }, Frame::Stored { after: lo, before }];
                backlog.extend(guard.ring.after(user, lo.max(before - 1)).into_iter().map(Frame::Event));
                let after = lo.max(guard.ring.last());
                self.register(&mut guard, partition, user, after, backlog, ResumeOutcome::Store)
            }
            (Some((_, lo)), _) => return Ok(Registered::Gap { after: lo }),
        };
        Ok(Registered::Done(sub))
    }

    /// New streams only while neither this partition nor the hub is closed (checked under the
    /// partition's lock, which revoke and close_all hold while they drain it).
    fn check_open(&self, part: &Partition, partition: i32) -> Result<(), SubscribeError> {
        part.open(partition)?;
        if self.closing.load(Ordering::SeqCst) {
            return Err(SubscribeError::NotReady(partition));
        }
        Ok(())
    }

    fn reset(
        self: &Arc<Self>,
        partition: i32,
        user: &str,
        reason: &'static str,
    ) -> Result<Subscription, SubscribeError> {
        let part = self.partition(partition).ok_or(SubscribeError::NotOwned(partition))?;
        self.reset_on(&part, partition, user, reason)
    }

    fn reset_on(
        self: &Arc<Self>,
        part: &Mutex<Partition>,
        partition: i32,
        user: &str,
        reason: &'static str,
    ) -> Result<Subscription, SubscribeError> {
        let mut guard = part.lock().expect("lock");
        self.check_open(&guard, partition)?;
        let after = guard.ring.last();
        let backlog = vec![Frame::Hello { id: None }, Frame::Reset { id: position_id(partition, after), reason }];
        Ok(self.register(&mut guard, partition, user, after, backlog, ResumeOutcome::Reset))
    }

    /// Extends `part`'s ring back to `after + 1` from the log (or finds that a backfill that ran
    /// meanwhile did), holding it at the backfill bounds for `backfill_hold` so the resumes of a
    /// reconnecting herd are all served from memory. True when the ring now covers `after`; false
    /// without a log, or when the gap is gone from it or longer than `backfill_events`.
    async fn backfill(&self, part: &Arc<Mutex<Partition>>, partition: i32, after: i64) -> bool {
        let Some(log) = self.log.as_ref().filter(|_| self.cfg.backfill_events > 0) else { return false };
        let lock = self.backfills.lock().expect("lock").entry(partition).or_default().clone();
        let _one_at_a_time = lock.lock().await;
        let hold_events = self.cfg.ring_events + self.cfg.backfill_events;
        let hold_bytes = self.cfg.ring_bytes + self.cfg.backfill_bytes;
        let to = {
            let mut g = part.lock().expect("lock");
            if g.closed.is_some() {
                return false;
            }
            if g.ring.covers(after) {
                return true;
            }
            // Checked now, not before waiting for another backfill: the ring moved meanwhile.
            let to = g.ring.covered_from();
            if after + 1 < g.low || to - after - 1 > self.cfg.backfill_events as i64 {
                return false;
            }
            // From now on the ring keeps what it has, so nothing between the read and it is lost.
            g.ring.hold(hold_events, hold_bytes, Instant::now() + self.cfg.backfill_hold);
            to
        };
        let t = Instant::now();
        let read = tokio::time::timeout(BACKFILL_TIMEOUT, log.read(partition, after + 1, to, &self.campaigns)).await;
        let outcome = match read {
            Ok(Ok(events)) => {
                let mut g = part.lock().expect("lock");
                if g.closed.is_some() || g.ring.covered_from() != to {
                    "overtaken"
                } else {
                    let n = events.len();
                    // A templating replay may have put a later copy of one in the ring already
                    // (when the original came before this gateway started reading).
                    let in_ring: std::collections::HashSet<u128> = g.ring.ids().collect();
                    let events: Vec<_> = events.into_iter().filter(|e| !in_ring.contains(&e.id)).collect();
                    g.ring.prepend(after + 1, events);
                    tracing::info!(
                        partition,
                        from = after + 1,
                        to,
                        events = n,
                        ms = t.elapsed().as_millis() as u64,
                        "Backfilled the ring of partition {partition} from Kafka for resumes older than it."
                    );
                    "ok"
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, partition, "Backfill from Kafka failed; the resume uses the store.");
                if matches!(e, crate::delivery::backfill::BackfillError::Gone(_)) {
                    // Retention passed `after + 1`; the next watermark refresh says by how much.
                    part.lock().expect("lock").low = after + 2;
                }
                "failed"
            }
            Err(_) => {
                tracing::warn!(partition, "Backfill from Kafka timed out; the resume uses the store.");
                "failed"
            }
        };
        counter!("tidings_gateway_backfills_total", "outcome" => outcome).increment(1);
        part.lock().expect("lock").ring.covers(after)
    }

    /// The store's next offset of `partition` (everything below it is stored); `None` without a store.
    async fn stored_next(&self, partition: i32) -> Result<Option<i64>, SubscribeError> {
        let Some(s) = &self.store else { return Ok(None) };
        Ok(Some(s.store.load_offsets(&s.group, &s.topic).await?.get(&partition).copied().unwrap_or(0)))
    }

    /// One page (at most a queue's worth) of `user`'s stored notifications on `partition` with
    /// offsets in (`after`, `before`), oldest first, and whether more may follow.
    pub async fn stored_page(
        &self,
        user: &str,
        partition: i32,
        after: i64,
        before: i64,
    ) -> Result<(Vec<Arc<Event>>, bool), StoreError> {
        let Some(s) = &self.store else { return Ok((Vec::new(), false)) };
        let limit = self.cfg.queue_events.clamp(1, 500);
        let page = s.store.notifications_after(user, partition, after, limit as u32).await?;
        let full = page.len() == limit;
        let mut events = Vec::with_capacity(page.len());
        for item in page {
            if item.stream_offset >= before {
                return Ok((events, false));
            }
            // Stored rows are one user's each: one event (a campaign's with its counter).
            events
                .extend(self.events_of(partition, item.stream_offset, item.notification, 0).into_iter().map(Arc::new));
        }
        Ok((events, full))
    }

    fn register(
        self: &Arc<Self>,
        part: &mut Partition,
        partition: i32,
        user: &str,
        after: i64,
        backlog: Vec<Frame>,
        outcome: ResumeOutcome,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(self.cfg.queue_events.max(1));
        let conn = Arc::new(Conn {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            tx,
            queued_bytes: AtomicUsize::new(0),
            kill: CancellationToken::new(),
            kill_reason: Mutex::new(None),
        });
        let subs = part.subs.entry(user.into()).or_default();
        while subs.len() >= self.cfg.max_connections_per_user.max(1) {
            let oldest = subs.remove(0);
            self.count_close(CloseReason::TooManyConnections);
            oldest.conn.close(CloseReason::TooManyConnections);
        }
        subs.push(Sub { conn: conn.clone(), after });
        // The count changed since `subscribe` looked the partition up, and `set_partition_count`
        // may have swept this partition before: this stream belongs elsewhere now.
        if self.partition_of(user).is_some_and(|home| home != partition) {
            self.count_close(CloseReason::PartitionRevoked);
            conn.close(CloseReason::PartitionRevoked);
        }
        self.metrics.connections.increment(1.0);
        self.open_streams.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = self.metrics.resumes.get(outcome.as_str()) {
            c.increment(1);
        }
        Subscription { conn, rx, backlog, outcome, hub: self.clone(), partition, user: user.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::hub::testkit::*;

    #[tokio::test]
    async fn fresh_stream_gets_only_its_users_events_after_connecting() {
        let (hub, _) = hub_with("alice", cfg());
        hub.push(ev(0, "alice"));
        let mut sub = hub.subscribe("alice", None).await.unwrap();
        assert!(matches!(&sub.backlog[0], Frame::Hello { id: Some(id) } if id == "0.0"));
        hub.push(ev(1, "bob"));
        hub.push(ev(2, "alice"));
        assert_eq!(offsets(&drain(&mut sub)), vec![2]);
        assert_eq!(sub.outcome, ResumeOutcome::Fresh);
    }

    #[tokio::test]
    async fn resume_from_ring_is_gapless_and_without_duplicates() {
        let (hub, _) = hub_with("alice", cfg());
        for o in 0..6 {
            hub.push(ev(o, if o % 2 == 0 { "alice" } else { "bob" }));
        }
        let mut sub = hub.subscribe("alice", Some((0, 0))).await.unwrap();
        hub.push(ev(6, "alice"));
        assert_eq!(offsets(&drain(&mut sub)), vec![2, 4, 6]);
        assert_eq!(sub.outcome, ResumeOutcome::Ring);
        // A client ahead of this instance (it saw offset 8 elsewhere) gets nothing twice.
        let mut ahead = hub.subscribe("alice", Some((0, 8))).await.unwrap();
        hub.push(ev(7, "alice"));
        hub.push(ev(8, "alice"));
        hub.push(ev(9, "alice"));
        assert_eq!(offsets(&drain(&mut ahead)), vec![9]);
    }

    /// The race a subscribe loses to a revoke or shutdown: it looked the partition up before the
    /// revoke/close_all drained it and locks it after. Driven step by step with that stale handle.
    #[tokio::test]
    async fn a_subscribe_that_loses_the_race_to_revoke_or_shutdown_is_refused() {
        let (hub, p) = hub_with("alice", cfg());
        let stale = hub.partition(p).unwrap();
        hub.revoke(&[p]);
        let r = hub.register_from_ring(&stale, p, "alice", None, None);
        assert!(matches!(r, Err(SubscribeError::NotOwned(_))), "registered into a revoked partition");
        assert!(matches!(hub.reset_on(&stale, p, "alice", "x"), Err(SubscribeError::NotOwned(_))));

        let (hub, p) = hub_with("alice", cfg());
        let stale = hub.partition(p).unwrap();
        hub.close_all();
        let r = hub.register_from_ring(&stale, p, "alice", None, None);
        assert!(matches!(r, Err(SubscribeError::NotReady(_))), "registered after shutdown drained the partition");
        assert!(matches!(hub.reset_on(&stale, p, "alice", "x"), Err(SubscribeError::NotReady(_))));
        // A partition assigned after shutdown began takes nothing either.
        hub.assign(p + 1, 0, 0);
        let fresh = hub.partition(p + 1).unwrap();
        assert!(matches!(hub.register_from_ring(&fresh, p + 1, "bob", None, None), Err(SubscribeError::NotReady(_))));
        assert_eq!(hub.connections(), 0);
    }

    #[tokio::test]
    async fn a_position_on_another_partition_resets() {
        let (hub, _) = hub_with("alice", cfg());
        hub.push(ev(0, "alice"));
        let other = hub.partition_of("alice").unwrap() + 1;
        let mut sub = hub.subscribe("alice", Some((other, 5))).await.unwrap();
        let frames = drain(&mut sub);
        assert!(
            matches!(&frames[1], Frame::Reset { reason: "partition_changed", .. }),
            "a position of partition {other} must reset: {frames:?}"
        );
        assert_eq!(sub.outcome, ResumeOutcome::Reset);
        hub.push(ev(1, "alice"));
        assert_eq!(offsets(&drain(&mut sub)), vec![1]);
    }

    #[tokio::test]
    async fn position_older_than_the_ring_without_store_resets() {
        let (hub, _) = hub_with("alice", cfg());
        for o in 0..20 {
            hub.push(ev(o, "alice"));
        }
        let mut sub = hub.subscribe("alice", Some((0, 3))).await.unwrap();
        let frames = drain(&mut sub);
        assert!(matches!(&frames[1], Frame::Reset { id, .. } if id == "0.19"), "{frames:?}");
        assert!(offsets(&frames).is_empty());
        assert_eq!(sub.outcome, ResumeOutcome::Reset);
        hub.push(ev(20, "alice"));
        assert_eq!(offsets(&drain(&mut sub)), vec![20]);
    }

    #[tokio::test]
    async fn too_many_connections_closes_the_oldest() {
        let (hub, _) = hub_with("alice", cfg());
        let mut first = hub.subscribe("alice", None).await.unwrap();
        let _second = hub.subscribe("alice", None).await.unwrap();
        let _third = hub.subscribe("alice", None).await.unwrap();
        let frames = drain(&mut first);
        assert!(matches!(frames.last(), Some(Frame::Close(CloseReason::TooManyConnections))), "{frames:?}");
        assert_eq!(hub.connections(), 2);
    }
}
