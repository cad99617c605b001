//! Per-partition delivery: the gateway joins the delivery consumer group on `notifications`, keeps a
//! ring of recent events per owned partition and hands each event to the SSE connections of its
//! user. Users of partitions owned elsewhere are redirected to the owner, learned through Kafka.
//!
//! - `ring`: recent events of one partition, bounded by count and bytes, for resumes.
//! - `hub`: owned partitions, their rings and subscribers; resume (ring → backfill → store → reset), limits.
//! - `backfill`: reads a range of a partition back from Kafka into its ring, for older resumes.
//! - `consumer`: the Kafka side (assignment, rebalance, decoding) feeding the hub.
//! - `owners`: the compacted owners topic mapping each partition to its gateway's URL.
//! - `events`: a `notifications` record as the events its streams send (and the inbox's JSON).
//! - `stream`: `GET /v1/stream`, the SSE endpoint.
//! - `browser`: what a plain EventSource needs: the stream cookie (`/v1/session`) and CORS.
//! - `campaigns`: per-campaign counts of notifications written to streams, flushed to the store.

pub mod backfill;
pub mod browser;
pub mod campaigns;
pub mod config;
pub mod consumer;
pub mod events;
pub mod hub;
pub mod owners;
pub mod partitions;
pub mod ring;
pub mod stream;

use bytes::Bytes;
use std::sync::Arc;

use crate::auth::AuthConfig;
use browser::BrowserAccess;

pub use config::{spawn, DeliveryConfig, HubConfig};
pub use hub::{CloseReason, Hub};
pub use owners::Owners;

pub use tidings_core::kafka::partition_for;

/// Shared state of the stream endpoint.
#[derive(Clone)]
pub struct StreamState {
    pub hub: Arc<Hub>,
    pub owners: Arc<Owners>,
    pub auth: Arc<AuthConfig>,
    /// Session cookie and CORS settings for browsers.
    pub browser: Arc<BrowserAccess>,
}

/// One notification as delivered: its stream position, user, kind and JSON body (shared by the
/// ring and every connection queue it sits in).
#[derive(Debug)]
pub struct Event {
    pub partition: i32,
    pub offset: i64,
    /// The notification id (a UUID): the same for a notification replayed at a later offset.
    pub id: u128,
    pub user: Box<str>,
    pub kind: Box<str>,
    /// The notification as JSON (the SSE `data:`).
    pub data: Bytes,
    /// The event's `occurred_at` (ms since the epoch; a backfilled one's record timestamp), for
    /// end-to-end latency.
    pub timestamp_ms: i64,
    /// A campaign notification's delivered counter, bumped by each stream that writes it.
    pub campaign: Option<Arc<campaigns::Delivered>>,
    /// The span of the record it came from, while traced: each stream's write of it is a span.
    pub trace: Option<Traced>,
}

/// How a stream's write of an event joins the trace of the record's `process` span.
#[derive(Debug, Clone)]
pub enum Traced {
    /// A record for one user: the write is the span's child, the end of the event's trace.
    Child(tidings_core::trace::SpanRef),
    /// One recipient of a group record (a room message or campaign page for many users): the
    /// write starts a trace of its own linked to the record's span. Each recipient's write
    /// happens later on its own stream, after the record's span ended, so the link goes from the
    /// write to the record (the SDK takes links only while a span is open); and a campaign's
    /// thousands of writes neither swell one trace nor share its sampling decision.
    Linked(tidings_core::trace::SpanRef),
}

impl Event {
    pub fn new(partition: i32, offset: i64, id: u128, user: &str, kind: &str, data: Bytes, timestamp_ms: i64) -> Self {
        Event {
            partition,
            offset,
            id,
            user: user.into(),
            kind: kind.into(),
            data,
            timestamp_ms,
            campaign: None,
            trace: None,
        }
    }

    /// Approximate memory held by this event, for the byte bounds of rings and queues.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.user.len() + self.kind.len() + self.data.len()
    }
}

/// Formats a stream position as an SSE id.
pub fn position_id(partition: i32, offset: i64) -> String {
    format!("{partition}.{offset}")
}

/// Parses an SSE id `partition.offset` (offset ≥ -1, where -1 means "before the first record").
pub fn parse_position(id: &str) -> Option<(i32, i64)> {
    let (p, o) = id.trim().split_once('.')?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(p) {
        return None;
    }
    let offset = if o == "-1" {
        -1
    } else if digits(o) {
        o.parse().ok()?
    } else {
        return None;
    };
    Some((p.parse().ok()?, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn positions_round_trip_and_reject_garbage() {
        assert_eq!(parse_position(&position_id(3, 42)), Some((3, 42)));
        assert_eq!(parse_position("0.-1"), Some((0, -1)));
        for bad in
            ["", "3", "3.", ".4", "a.b", "-1.2", "3.-2", "3.4.5", "99999999999.1", "1.+2", "1.99999999999999999999"]
        {
            assert_eq!(parse_position(bad), None, "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn any_position_round_trips(p in 0i32..=i32::MAX, o in -1i64..=i64::MAX) {
            prop_assert_eq!(parse_position(&position_id(p, o)), Some((p, o)));
        }

        #[test]
        fn parse_never_panics(s in ".{0,40}") {
            let _ = parse_position(&s);
        }
    }
}
