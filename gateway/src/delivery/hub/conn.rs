//! One open stream: its queue of events (bounded by count and bytes), how it is closed and why,
//! and the `Subscription` that unregisters it when the stream ends.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Hub, ResumeOutcome};
use crate::delivery::Event;

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

    pub(super) const ALL: [CloseReason; 5] = [
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

/// One stream in this many records `tidings_end_to_end_seconds{to="delivered"}`.
const AGE_SAMPLE: u64 = 16;

/// One open stream.
#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub(super) tx: mpsc::Sender<Queued>,
    pub(super) queued_bytes: AtomicUsize,
    pub(super) kill: CancellationToken,
    pub(super) kill_reason: Mutex<Option<CloseReason>>,
}

impl Conn {
    /// Closes after what is queued has been written (if the queue has room), else right away.
    pub(super) fn close(&self, reason: CloseReason) {
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

    pub(super) fn dequeued(&self, ev: &Event) {
        self.queued_bytes.fetch_sub(ev.size(), Ordering::Relaxed);
    }
}

pub(super) struct Sub {
    pub(super) conn: Arc<Conn>,
    /// Only events after this offset go to this connection (everything up to it was sent or
    /// already seen by the client).
    pub(super) after: i64,
}

/// A registered stream: frames to send first, then the queue. Dropping it unregisters.
pub struct Subscription {
    pub conn: Arc<Conn>,
    pub rx: mpsc::Receiver<Queued>,
    pub backlog: Vec<Frame>,
    pub outcome: ResumeOutcome,
    pub(super) hub: Arc<Hub>,
    pub(super) partition: i32,
    pub(super) user: Box<str>,
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
        self.hub.open_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hub {
    pub(super) fn count_close(&self, reason: CloseReason) {
        if let Some(c) = self.metrics.closes.get(reason.as_str()) {
            c.increment(1);
        }
    }

    pub(super) fn slow(&self, conn: &Conn) {
        self.count_close(CloseReason::SlowConsumer);
        conn.abort(CloseReason::SlowConsumer);
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
    use crate::delivery::hub::testkit::*;

    #[test]
    fn queued_items_are_two_words() {
        // Every stream's queue allocates a block of 32 of these up front.
        assert_eq!(std::mem::size_of::<Queued>(), 16);
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
