//! The hub: the partitions this gateway owns, each with its ring and the connections of its users.
//! Appending an event and registering a connection happen under the partition's lock, so a resume
//! never misses an event that arrives while it is being served, and never sends one twice.
//!
//! - `partition`: an owned partition, its ring and its streams; events in.
//! - `resume`: how a stream starts (ring → backfill → store → reset).
//! - `conn`: one open stream, its queue and its close.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use metrics::{counter, gauge, Counter, Gauge};
use tidings_store::StoreError;

use super::backfill::LogSource;
use super::campaigns::CampaignCounts;
use super::{partition_for, HubConfig};

mod conn;
mod partition;
mod resume;

pub use conn::{CloseReason, Conn, Frame, Queued, Subscription};
use partition::Partition;
pub use resume::StoreResume;

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

struct Metrics {
    connections: Gauge,
    queued_events: Gauge,
    queued_bytes: Gauge,
    owned: Gauge,
    delivered: Counter,
    /// `tidings_end_to_end_seconds{to="delivered"}`: seconds from a live event's `occurred_at`
    /// to its stream taking it off its queue to write it (every hop from the source, through
    /// this gateway's consume, decode, queue and schedule); recorded for the streams whose id is
    /// a multiple of [`conn::AGE_SAMPLE`].
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
            age_at_write: tidings_core::stage::Reached::Delivered.histogram(),
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
    /// Delivered counts of the campaigns seen lately.
    campaigns: CampaignCounts,
    /// Subscriptions not dropped yet (streams still writing, even after `close_all`).
    open_streams: AtomicUsize,
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
            campaigns: CampaignCounts::new(cfg.max_campaigns),
            open_streams: AtomicUsize::new(0),
            cfg,
        })
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    /// Delivered counts of campaigns (see `delivery::campaigns`).
    pub fn campaigns(&self) -> &CampaignCounts {
        &self.campaigns
    }

    /// Streams registered and not ended yet, including those closed but still writing their queue.
    pub fn open_streams(&self) -> usize {
        self.open_streams.load(Ordering::Relaxed)
    }

    /// Number of partitions of the notifications topic (0 until known). When a known count changes,
    /// the streams of users whose partition moved get `reconnect` (returns how many), so they come
    /// back to their new partition's owner (and, resuming from the old one, get `reset`).
    pub fn set_partition_count(&self, n: i32) -> usize {
        let was = self.partition_count.swap(n, Ordering::SeqCst);
        if was == 0 || was == n {
            return 0;
        }
        let parts: Vec<_> = self.partitions.read().expect("lock").iter().map(|(p, s)| (*p, s.clone())).collect();
        let mut moved = 0;
        for (p, part) in parts {
            part.lock().expect("lock").subs.retain(|user, subs| {
                if partition_for(user, n) == p {
                    return true;
                }
                for s in subs.drain(..) {
                    moved += 1;
                    self.count_close(CloseReason::PartitionRevoked);
                    s.conn.close(CloseReason::PartitionRevoked);
                }
                false
            });
        }
        moved
    }

    /// The user's partition, once the partition count is known.
    pub fn partition_of(&self, user: &str) -> Option<i32> {
        match self.partition_count.load(Ordering::SeqCst) {
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
}

/// What the hub's tests share: a small hub, events, and a stream's frames so far.
#[cfg(test)]
mod testkit {
    use super::*;
    use crate::delivery::Event;
    use bytes::Bytes;

    pub(super) fn cfg() -> HubConfig {
        HubConfig { ring_events: 8, queue_events: 4, max_connections_per_user: 2, ..HubConfig::default() }
    }

    pub(super) fn hub_with(user: &str, cfg: HubConfig) -> (Arc<Hub>, i32) {
        let hub = Hub::new(cfg, None);
        hub.set_partition_count(1);
        hub.assign(0, 0, 0);
        assert_eq!(hub.partition_of(user), Some(0));
        (hub, 0)
    }

    pub(super) fn ev(offset: i64, user: &str) -> Event {
        Event::new(0, offset, offset as u128, user, "k", Bytes::from(format!("{{\"n\":{offset}}}")), 0)
    }

    pub(super) fn offsets(frames: &[Frame]) -> Vec<i64> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Event(e) => Some(e.offset),
                _ => None,
            })
            .collect()
    }

    pub(super) fn drain(sub: &mut Subscription) -> Vec<Frame> {
        let mut v = std::mem::take(&mut sub.backlog);
        while let Ok(f) = sub.rx.try_recv() {
            if let Queued::Event(e) = &f {
                sub.conn.dequeued(e);
            }
            v.push(f.into());
        }
        v
    }
}
