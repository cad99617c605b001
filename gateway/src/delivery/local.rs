//! Notifications this process's templating stage produced, handed to the hub at the broker's
//! acknowledgement instead of one fetch later; the consumer then skips its fetched copy. Same
//! events, same positions, same order (see `Hub::offer`): only the hop through the fetch is gone.

use std::sync::Arc;

use tidings_core::stage::{AckedRecord, Acknowledged, HandOverCounts};
use tidings_core::{wire, Notification};

use super::stream::events_from_record;
use super::Hub;

/// The hub as the templating stage's co-located consumer of the notifications topic.
pub struct LocalAcks {
    hub: Arc<Hub>,
    topic: String,
    counts: HandOverCounts,
}

impl LocalAcks {
    pub fn new(hub: Arc<Hub>, topic: impl Into<String>) -> Self {
        LocalAcks { hub, topic: topic.into(), counts: HandOverCounts::new("tidings_gateway_acked_records_total") }
    }
}

impl Acknowledged for LocalAcks {
    fn acknowledged(&self, rec: AckedRecord<'_>) {
        if rec.topic != self.topic {
            self.counts.left.increment(1);
            return;
        }
        if !self.hub.takes_next(rec.partition, rec.offset) {
            match self.hub.has_taken(rec.partition, rec.offset) {
                true => self.counts.already_fetched.increment(1),
                false => self.counts.left.increment(1),
            }
            return;
        }
        // The templating stage wrote it with the notification schema itself (its own encoder), so
        // the direct decoder applies without asking the registry which schema the id is.
        let Ok(n) = wire::split(rec.payload).and_then(|(_, datum)| Notification::decode_datum(datum)) else {
            // Left to the consumer, whose decode reports it (and persistence dead-letters it).
            self.counts.left.increment(1);
            return;
        };
        let events = events_from_record(rec.partition, rec.offset, n, rec.timestamp_ms);
        if self.hub.offer(events) {
            self.counts.taken.increment(1);
        } else {
            self.counts.left.increment(1);
        }
    }
}
