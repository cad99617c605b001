//! The hub: the partitions this gateway owns, each with its ring and the connections of its users.
//! Appending an event and registering a connection happen under the partition's lock, so a resume
//! never misses an event that arrives while it is being served, and never sends one twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, Counter, Gauge};
use tidings_store::{Store, StoreError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::backfill::LogSource;
use super::ring::Ring;
use super::{partition_for, position_id, Event, HubConfig};

/// Why the server ends a stream. Each is sent to the client as the stream's last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The user's partition moved to another gateway: reconnect (and be redirected).
    PartitionRevoked,
    /// This gateway is stopping: reconnect to another.
    Shutdown,
    /// The user opened more streams than allowed; this was the oldest.
    TooManyConnections,
    /// The client did not read fast enough and its queue overflowed: reconnect with the last id.
    SlowConsumer,
    /// A resume was being read from the store, which failed: reconnect with the last id.
    StoreUnavailable,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::PartitionRevoked => "partition_moved",
            CloseReason::Shutdown => "shutdown",
            CloseReason::TooManyConnections => "too_many_connections",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::StoreUnavailable => "store_unavailable",
        }
    }

    /// The SSE event name: `reconnect` when the client should come back right away (to another
    /// instance), `close` otherwise.
    pub fn event_name(self) -> &'static str {
        match self {
            CloseReason::PartitionRevoked | CloseReason::Shutdown | CloseReason::StoreUnavailable => "reconnect",
            CloseReason::TooManyConnections | CloseReason::SlowConsumer => "close",
        }
    }

    const ALL: [CloseReason; 5] = [
        CloseReason::PartitionRevoked,
        CloseReason::Shutdown,
        CloseReason::TooManyConnections,
        CloseReason::SlowConsumer,
        CloseReason::StoreUnavailable,
    ];
}

/// What a connection's stream emits, in order.
#[derive(Debug, Clone)]
pub enum Frame {
    /// The first frame: the `retry:` hint, and for a fresh stream the position it starts from.
    Hello {
        id: Option<String>,
    },
    Event(Arc<Event>),
    /// The user's stored notifications with offsets in (`after`, `before`): read from the store a
    /// page at a time while the stream is written, so a long resume never sits in memory whole.
    Stored {
        after: i64,
        before: i64,
    },
    /// After a resume from the store, which holds inbox rows but not chat copies (delivery-only):
    /// refetch the rooms and open histories; the inbox rows of the range were all sent.
    Resync,
    /// The position asked for cannot be served without a gap: refetch the inbox, continue at `id`.
    Reset {
        id: String,
        reason: &'static str,
    },
    Close(CloseReason),
}

/// What goes through a connection's queue: 16 bytes, so the queue's first block of 32 slots
/// (allocated with the channel, for every stream) stays small.
#[derive(Debug, Clone)]
pub enum Queued {
    Event(Arc<Event>),
    Close(CloseReason),
}

impl From<Queued> for Frame {
    fn from(q: Queued) -> Frame {
        match q {
            Queued::Event(e) => Frame::Event(e),
            Queued::Close(r) => Frame::Close(r),
        }
    }
}

/// How a resume was served (the `outcome` label of `tidings_gateway_resumes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// No Last-Event-ID: live from the current position.
    Fresh,
    Ring,
    Store,
    Reset,
}

impl ResumeOutcome {
    const ALL: [ResumeOutcome; 4] =
        [ResumeOutcome::Fresh, ResumeOutcome::Ring, ResumeOutcome::Store, ResumeOutcome::Reset];

    pub fn as_str(self) -> &'static str {
        match self {
            ResumeOutcome::Fresh => "fresh",
            ResumeOutcome::Ring => "ring",
            ResumeOutcome::Store => "store",
            ResumeOutcome::Reset => "reset",
        }
    }
}

/// Why a stream cannot be opened here.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// Another gateway owns the user's partition (or nobody does right now).
    #[error("partition {0} is not owned by this gateway")]
    NotOwned(i32),
    /// Owned but still filling its ring, or the partition count is not known yet, or stopping.
    #[error("not ready to serve partition {0} yet")]
    NotReady(i32),
    /// The store was needed for the resume and failed; retrying later can help when retriable.
    #[error("the store could not serve the resume: {0}")]
    Store(#[from] StoreError),
}

/// The persisted notifications and how far persistence has got, for resumes the ring cannot serve.
#[derive(Clone, Debug)]
pub struct StoreResume {
    pub store: Store,
    /// Persistence stage's consumer group (its offsets say how far the store is complete).
    pub group: String,
    /// Physical notifications topic.
    pub topic: String,
}

/// One stream in this many records `tidings_gateway_event_age_at_write_seconds`.
const AGE_SAMPLE: u64 = 16;

/// The longest a backfill may take before the resume falls back to the store.
const BACKFILL_TIMEOUT: Duration = Duration::from_secs(15);

/// One open stream.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    tx: mpsc::Sender<Queued>,
    queued_bytes: AtomicUsize,
    kill: CancellationToken,
    kill_reason: Mutex<Option<CloseReason>>,
}

impl Conn {
    /// Closes after what is queued has been written (if the queue has room), else right away.
    fn close(&self, reason: CloseReason) {
        if self.tx.try_send(Queued::Close(reason)).is_err() {
            self.abort(reason);
        }
    }

    /// Closes right away, dropping what is queued.
    fn abort(&self, reason: CloseReason) {
        self.kill_reason.lock().expect("lock").get_or_insert(reason);
        self.kill.cancel();
    }

    /// Resolves when the connection was aborted, with the reason.
    pub async fn aborted(&self) -> CloseReason {
        self.kill.cancelled().await;
        self.kill_reason.lock().expect("lock").unwrap_or(CloseReason::Shutdown)
    }

    fn dequeued(&self, ev: &Event) {
        self.queued_bytes.fetch_sub(ev.size(), Ordering::Relaxed);
    }
}

struct Sub {
    conn: Arc<Conn>,
    /// Only events after this offset go to this connection (everything up to it was sent or
    /// already seen by the client).
    after: i64,
}

struct Partition {
    ring: Ring,
    /// Per user, oldest connection first.
    subs: HashMap<Box<str>, Vec<Sub>>,
    /// Caught up: consumed up to the end the partition had when it was assigned.
    live: bool,
    /// The high watermark at assignment; live once the ring reaches it.
    target: i64,
    /// The partition's log start as last fetched (a backfill cannot read before it).
    low: i64,
    lag: Gauge,
    /// Recently delivered notification ids (a replay of the templating stage repeats them).
    recent: RecentIds,
    /// Revoked or shutting down: set under this lock by whoever drained `subs`, so a subscribe
    /// that took this partition before that (and locks it after) cannot register into it.
    closed: Option<Closed>,
}

/// The last `cap` ids seen, with O(1) membership: bounded memory, oldest forgotten first.
struct RecentIds {
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
enum Closed {
    Revoked,
    ShuttingDown,
}

impl Partition {
    /// Refuses new streams once closed (the caller holds this partition's lock).
    fn open(&self, partition: i32) -> Result<(), SubscribeError> {
        match self.closed {
            None => Ok(()),
            Some(Closed::Revoked) => Err(SubscribeError::NotOwned(partition)),
            Some(Closed::ShuttingDown) => Err(SubscribeError::NotReady(partition)),
        }
    }
}

/// What a look at the ring decided.
enum Registered {
    Done(Subscription),
    /// The ring starts after the asked position `after`: a backfill or the store must fill the
    /// gap, if they have it.
    Gap {
        after: i64,
    },
}

/// A registered stream: frames to send first, then the queue. Dropping it unregisters.
pub struct Subscription {
    pub conn: Arc<Conn>,
    pub rx: mpsc::Receiver<Queued>,
    pub backlog: Vec<Frame>,
    pub outcome: ResumeOutcome,
    hub: Arc<Hub>,
    partition: i32,
    user: Box<str>,
}

impl Subscription {
    pub fn partition(&self) -> i32 {
        self.partition
    }

    pub fn user(&self) -> &str {
        &self.user
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unregister(self.partition, &self.user, self.conn.id);
        // Whatever the stream did not take is released now.
        let left = self.conn.queued_bytes.load(Ordering::Relaxed);
        self.hub.metrics.queued_bytes.decrement(left as f64);
        self.hub.metrics.queued_events.decrement(self.rx.len() as f64);
        self.hub.metrics.connections.decrement(1.0);
    }
}

struct Metrics {
    connections: Gauge,
    queued_events: Gauge,
    queued_bytes: Gauge,
    owned: Gauge,
    delivered: Counter,
    /// Seconds from a live event's Kafka CreateTime to its stream taking it off its queue to
    /// write it: the whole hop through this gateway (consume, decode, queue, schedule); recorded
    /// for the streams whose id is a multiple of [`AGE_SAMPLE`].
    age_at_write: metrics::Histogram,
    closes: HashMap<&'static str, Counter>,
    resumes: HashMap<&'static str, Counter>,
}

impl Metrics {
    fn new() -> Self {
        Metrics {
            connections: gauge!("tidings_gateway_connections"),
            queued_events: gauge!("tidings_gateway_queued_events"),
            queued_bytes: gauge!("tidings_gateway_queued_bytes"),
            owned: gauge!("tidings_gateway_owned_partitions"),
            delivered: counter!("tidings_gateway_events_delivered_total"),
            age_at_write: metrics::histogram!("tidings_gateway_event_age_at_write_seconds"),
            closes: CloseReason::ALL
                .iter()
                .map(|r| (r.as_str(), counter!("tidings_gateway_closes_total", "reason" => r.as_str())))
                .collect(),
            resumes: ResumeOutcome::ALL
                .iter()
                .map(|o| (o.as_str(), counter!("tidings_gateway_resumes_total", "outcome" => o.as_str())))
                .collect(),
        }
    }
}

/// All owned partitions of one gateway and their connections.
pub struct Hub {
    cfg: HubConfig,
    partitions: RwLock<HashMap<i32, Arc<Mutex<Partition>>>>,
    partition_count: AtomicI32,
    /// The group has given this instance an assignment (possibly empty).
    joined: AtomicBool,
    closing: AtomicBool,
    next_conn: AtomicU64,
    store: Option<StoreResume>,
    /// Where backfills read from; `None`: resumes older than the ring go to the store.
    log: Option<LogSource>,
    /// One backfill at a time per partition: resumes arriving meanwhile wait and use its result.
    backfills: Mutex<HashMap<i32, Arc<tokio::sync::Mutex<()>>>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("owned", &self.owned()).finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(cfg: HubConfig, store: Option<StoreResume>) -> Arc<Hub> {
        Hub::with_log(cfg, store, None)
    }

    /// A hub that also backfills its rings from `log` for resumes older than them.
    pub fn with_log(cfg: HubConfig, store: Option<StoreResume>, log: Option<LogSource>) -> Arc<Hub> {
        Arc::new(Hub {
            cfg,
            partitions: RwLock::new(HashMap::new()),
            partition_count: AtomicI32::new(0),
            joined: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            // From 0: the first stream is among the sampled ones (AGE_SAMPLE).
            next_conn: AtomicU64::new(0),
            store,
            log,
            backfills: Mutex::new(HashMap::new()),
            metrics: Metrics::new(),
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    /// Number of partitions of the notifications topic (0 until known).
    pub fn set_partition_count(&self, n: i32) {
        self.partition_count.store(n, Ordering::Relaxed);
    }

    /// The user's partition, once the partition count is known.
    pub fn partition_of(&self, user: &str) -> Option<i32> {
        match self.partition_count.load(Ordering::Relaxed) {
            0 => None,
            n => Some(partition_for(user, n)),
        }
    }

    /// Owned partitions, sorted.
    pub fn owned(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.partitions.read().expect("lock").keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn owns(&self, partition: i32) -> bool {
        self.partitions.read().expect("lock").contains_key(&partition)
    }

    /// Ready: assigned by the group and every owned partition caught up (and not stopping).
    pub fn is_ready(&self) -> bool {
        self.joined.load(Ordering::Relaxed)
            && !self.closing.load(Ordering::Relaxed)
            && self.partitions.read().expect("lock").values().all(|p| p.lock().expect("lock").live)
    }

    /// Open streams.
    pub fn connections(&self) -> usize {
        let parts: Vec<_> = self.partitions.read().expect("lock").values().cloned().collect();
        parts.iter().map(|p| p.lock().expect("lock").subs.values().map(Vec::len).sum::<usize>()).sum()
    }

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

    fn count_close(&self, reason: CloseReason) {
        if let Some(c) = self.metrics.closes.get(reason.as_str()) {
            c.increment(1);
        }
    }

    fn partition(&self, p: i32) -> Option<Arc<Mutex<Partition>>> {
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

    fn slow(&self, conn: &Conn) {
        self.count_close(CloseReason::SlowConsumer);
        conn.abort(CloseReason::SlowConsumer);
    }

    fn unregister(&self, partition: i32, user: &str, conn: u64) {
        let Some(part) = self.partition(partition) else { return };
        let mut part = part.lock().expect("lock");
        if let Some(subs) = part.subs.get_mut(user) {
            subs.retain(|s| s.conn.id != conn);
            if subs.is_empty() {
                part.subs.remove(user);
            }
        }
    }

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
        let read = tokio::time::timeout(BACKFILL_TIMEOUT, log.read(partition, after + 1, to)).await;
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
                if matches!(e, super::backfill::BackfillError::Gone(_)) {
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
            let e = super::events::event_from_notification(partition, item.stream_offset, &item.notification, 0);
            events.push(Arc::new(e));
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
        self.metrics.connections.increment(1.0);
        if let Some(c) = self.metrics.resumes.get(outcome.as_str()) {
            c.increment(1);
        }
        Subscription { conn, rx, backlog, outcome, hub: self.clone(), partition, user: user.into() }
    }

    /// Called by a stream for each event it writes.
    pub fn delivered(&self) {
        self.metrics.delivered.increment(1);
    }

    /// Called by a stream for each event it takes off its queue (backlog events were never queued,
    /// so they do not count here).
    pub fn dequeued(&self, conn: &Conn, ev: &Event) {
        conn.dequeued(ev);
        self.metrics.queued_events.decrement(1.0);
        self.metrics.queued_bytes.decrement(ev.size() as f64);
        // Sampled: one stream in AGE_SAMPLE keeps the clock read and the histogram off the rest.
        if conn.id.is_multiple_of(AGE_SAMPLE) {
            self.metrics.age_at_write.record(tidings_core::kafka::age_secs(ev.timestamp_ms));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn cfg() -> HubConfig {
        HubConfig { ring_events: 8, queue_events: 4, max_connections_per_user: 2, ..HubConfig::default() }
    }

    fn hub_with(user: &str, cfg: HubConfig) -> (Arc<Hub>, i32) {
        let hub = Hub::new(cfg, None);
        hub.set_partition_count(1);
        hub.assign(0, 0, 0);
        assert_eq!(hub.partition_of(user), Some(0));
        (hub, 0)
    }

    fn ev(offset: i64, user: &str) -> Event {
        Event::new(0, offset, offset as u128, user, "k", Bytes::from(format!("{{\"n\":{offset}}}")), 0)
    }

    fn offsets(frames: &[Frame]) -> Vec<i64> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Event(e) => Some(e.offset),
                _ => None,
            })
            .collect()
    }

    fn drain(sub: &mut Subscription) -> Vec<Frame> {
        let mut v = std::mem::take(&mut sub.backlog);
        while let Ok(f) = sub.rx.try_recv() {
            if let Queued::Event(e) = &f {
                sub.conn.dequeued(e);
            }
            v.push(f.into());
        }
        v
    }

    #[test]
    fn queued_items_are_two_words() {
        // Every stream's queue allocates a block of 32 of these up front.
        assert_eq!(std::mem::size_of::<Queued>(), 16);
    }

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
    async fn too_many_connections_closes_the_oldest() {
        let (hub, _) = hub_with("alice", cfg());
        let mut first = hub.subscribe("alice", None).await.unwrap();
        let _second = hub.subscribe("alice", None).await.unwrap();
        let _third = hub.subscribe("alice", None).await.unwrap();
        let frames = drain(&mut first);
        assert!(matches!(frames.last(), Some(Frame::Close(CloseReason::TooManyConnections))), "{frames:?}");
        assert_eq!(hub.connections(), 2);
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

    #[tokio::test]
    async fn dropping_a_subscription_unregisters_it() {
        let (hub, _) = hub_with("alice", cfg());
        let sub = hub.subscribe("alice", None).await.unwrap();
        assert_eq!(hub.connections(), 1);
        drop(sub);
        assert_eq!(hub.connections(), 0);
        hub.push(ev(0, "alice"));
    }
}
