//! Delivered counts of campaigns: a campaign notification's events carry their campaign's counter,
//! which each stream writing one bumps (an atomic add, no lock); a task adds the counts to the
//! store's `campaign_deliveries` every second, and once more when the gateway stops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings_core::Notification;
use tidings_store::Store;
use tokio_util::sync::CancellationToken;

use super::events::events_from_record;
use super::{Event, Hub};

/// The notification kind templating gives a campaign's notifications.
pub const CAMPAIGN_KIND: &str = "campaign";
/// Campaigns counted at once by default (`HubConfig::max_campaigns`).
pub const DEFAULT_MAX_CAMPAIGNS: usize = 1000;
/// How often the counts go to the store.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// On shutdown, how long the last flush waits for open streams to write what they have queued.
const DRAIN_WAIT: Duration = Duration::from_secs(2);

/// The campaign a campaign notification's `source_event_id` (`campaign:<id>`) names.
pub fn campaign_id_of(source_event_id: &str) -> &str {
    source_event_id.strip_prefix("campaign:").unwrap_or(source_event_id)
}

/// This process's `instance` in `campaign_deliveries`: the gateway's URL and a random part, so
/// two processes (a restart, two hosts behind one URL) never share a row.
pub fn instance_id(advertised_url: &str) -> String {
    format!("{advertised_url}#{}", uuid::Uuid::new_v4().simple())
}

/// A campaign's notifications written to streams since its last flush.
#[derive(Debug, Default)]
pub struct Delivered(AtomicU64);

impl Delivered {
    /// A stream wrote one of the campaign's notifications.
    pub fn wrote(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }
}

/// The counters of the campaigns seen lately, at most `cap` of them: the campaign ids come from
/// Kafka records, so the least recently touched is dropped for a new one past the bound (its
/// count so far is still flushed once).
#[derive(Debug)]
pub struct CampaignCounts {
    cap: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Box<str>, Entry>,
    /// Bumped per touch: an entry's `touched` orders them by recency.
    clock: u64,
    /// Dropped from `map` with a count not flushed yet; at most `cap`.
    dropped: Vec<(Box<str>, Arc<Delivered>)>,
}

#[derive(Debug)]
struct Entry {
    delivered: Arc<Delivered>,
    touched: u64,
}

impl CampaignCounts {
    pub fn new(cap: usize) -> Self {
        CampaignCounts { cap: cap.max(1), inner: Mutex::new(Inner::default()) }
    }

    /// The counter of `campaign`, marked as touched now. Called once per consumed campaign record,
    /// not per stream. Past the bound, the least recently touched campaign is dropped (a scan of
    /// the map, only when a new campaign arrives to a full map).
    pub fn counter(&self, campaign: &str) -> Arc<Delivered> {
        let mut inner = self.inner.lock().expect("lock");
        inner.clock += 1;
        let now = inner.clock;
        if let Some(e) = inner.map.get_mut(campaign) {
            e.touched = now;
            return e.delivered.clone();
        }
        if inner.map.len() >= self.cap {
            let oldest = inner.map.iter().min_by_key(|(_, e)| e.touched).map(|(k, _)| k.clone());
            if let Some((id, e)) = oldest.and_then(|k| inner.map.remove_entry(&k)) {
                if inner.dropped.len() < self.cap {
                    inner.dropped.push((id, e.delivered));
                }
            }
        }
        let delivered = Arc::new(Delivered::default());
        inner.map.insert(campaign.into(), Entry { delivered: delivered.clone(), touched: now });
        delivered
    }

    /// Campaigns counted now (at most the bound).
    pub fn len(&self) -> usize {
        self.inner.lock().expect("lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes what was written since the last take: (campaign, count) for each with any, sorted.
    pub fn take(&self) -> Vec<(String, u64)> {
        let mut inner = self.inner.lock().expect("lock");
        let mut out: HashMap<&str, u64> = HashMap::new();
        for (id, e) in &inner.map {
            let n = e.delivered.take();
            if n > 0 {
                *out.entry(id).or_default() += n;
            }
        }
        for (id, d) in &inner.dropped {
            let n = d.take();
            if n > 0 {
                *out.entry(id).or_default() += n;
            }
        }
        let mut out: Vec<(String, u64)> = out.into_iter().map(|(id, n)| (id.to_string(), n)).collect();
        inner.dropped.clear();
        out.sort_unstable();
        out
    }

    /// Gives back what a failed flush took, to be flushed next time (kept within the bound).
    pub fn give_back(&self, counts: &[(String, u64)]) {
        let mut inner = self.inner.lock().expect("lock");
        for (id, n) in counts {
            if let Some(e) = inner.map.get(id.as_str()) {
                e.delivered.0.fetch_add(*n, Ordering::Relaxed);
            } else if inner.dropped.len() < self.cap {
                let d = Arc::new(Delivered(AtomicU64::new(*n)));
                inner.dropped.push((id.as_str().into(), d));
            }
        }
    }
}

impl CampaignCounts {
    /// The delivered forms of a notification at a stream position ([`events_from_record`]); a
    /// campaign's carry the campaign's counter, which the streams writing them bump. Every way an
    /// event reaches a stream goes through here: consumed, backfilled from Kafka, resumed from the store.
    pub fn events_of(&self, partition: i32, offset: i64, n: Notification, timestamp_ms: i64) -> Vec<Event> {
        let counter = (n.kind == CAMPAIGN_KIND).then(|| self.counter(campaign_id_of(&n.source_event_id)));
        let mut events = events_from_record(partition, offset, n, timestamp_ms);
        if let Some(c) = counter {
            for e in &mut events {
                e.campaign = Some(c.clone());
            }
        }
        events
    }
}

impl Hub {
    /// [`CampaignCounts::events_of`] with this hub's counts.
    pub fn events_of(&self, partition: i32, offset: i64, n: Notification, timestamp_ms: i64) -> Vec<Event> {
        self.campaigns().events_of(partition, offset, n, timestamp_ms)
    }
}

/// Adds the counts taken to `instance`'s rows; on failure gives them back for the next flush.
async fn flush(counts: &CampaignCounts, store: &Store, instance: &str) {
    let taken = counts.take();
    if taken.is_empty() {
        return;
    }
    let now = chrono::Utc::now().timestamp_micros();
    if let Err(e) = store.add_campaign_deliveries(instance, &taken, now).await {
        tracing::warn!(error = %e, "Writing campaign delivered counts failed; retrying with the next flush.");
        counts.give_back(&taken);
    }
}

/// Flushes `hub`'s campaign counts to `store` as `instance` every `every` until `shutdown`; then,
/// once the streams closed by the shutdown have written what they had queued (or after a short
/// wait), flushes a last time. A store outage is waited out: the counts are kept for the next flush.
pub async fn flush_counts(
    hub: Arc<Hub>,
    store: Store,
    instance: String,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), std::convert::Infallible> {
    // The first flush one period in: nothing was written yet at the start.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => flush(hub.campaigns(), &store, &instance).await,
        }
    }
    let deadline = tokio::time::Instant::now() + DRAIN_WAIT;
    while hub.open_streams() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    flush(hub.campaigns(), &store, &instance).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_cap_campaigns_and_the_least_recently_touched_goes() {
        let counts = CampaignCounts::new(3);
        for id in ["a", "b", "c"] {
            counts.counter(id).wrote();
        }
        counts.counter("a"); // touched again: "b" is now the least recently touched
        counts.counter("d").wrote();
        assert_eq!(counts.len(), 3);
        {
            let inner = counts.inner.lock().unwrap();
            let mut kept: Vec<&str> = inner.map.keys().map(|k| &**k).collect();
            kept.sort_unstable();
            assert_eq!(kept, ["a", "c", "d"]);
        }
        // The dropped campaign's count is flushed once, then forgotten.
        let taken = counts.take();
        assert_eq!(taken, [("a".into(), 1), ("b".into(), 1), ("c".into(), 1), ("d".into(), 1)]);
        assert!(counts.take().is_empty(), "counts taken twice");
        // Many more campaigns than the bound: the map and the dropped list stay within it.
        for i in 0..1000 {
            counts.counter(&format!("x{i}")).wrote();
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.inner.lock().unwrap().dropped.len() <= 3);
        assert!(counts.take().len() <= 6);
    }

    #[test]
    fn a_failed_flush_is_given_back() {
        let counts = CampaignCounts::new(2);
        let c = counts.counter("a");
        c.wrote();
        c.wrote();
        let taken = counts.take();
        assert_eq!(taken, [("a".to_string(), 2)]);
        c.wrote();
        counts.give_back(&taken);
        counts.give_back(&[("gone".to_string(), 4)]);
        assert_eq!(counts.take(), [("a".to_string(), 3), ("gone".to_string(), 4)]);
    }

    fn campaign_notification(user: &str, kind: &str) -> Notification {
        let mut n = crate::delivery::events::tests::with_data(None);
        n.kind = kind.into();
        n.source_event_id = "campaign:spring".into();
        n.notification_id = Notification::id_for(&n.source_event_id, user);
        n.user_id = user.into();
        n
    }

    /// Everything a stream writes until it has nothing more right now.
    async fn written(cursor: &mut crate::delivery::stream::StreamCursor) -> String {
        let mut out = Vec::new();
        while let Ok(true) = tokio::time::timeout(Duration::from_millis(50), cursor.next_chunk(&mut out)).await {}
        String::from_utf8(out).unwrap()
    }

    /// Each stream counts a campaign notification once when it writes it; the same notification
    /// again (templating replayed it at a later offset) is dropped by the hub and not counted.
    #[tokio::test]
    async fn each_stream_writing_a_campaign_notification_counts_once() {
        use crate::delivery::stream::StreamCursor;
        let hub = Hub::new(crate::delivery::HubConfig::default(), None);
        hub.set_partition_count(1);
        hub.assign(0, 0, 0);
        let mut streams = Vec::new();
        for user in ["ann", "ann", "bob", "cy"] {
            streams.push(StreamCursor::new(hub.subscribe(user, None).await.unwrap(), hub.clone()));
        }
        for (offset, user, kind) in
            [(0, "ann", CAMPAIGN_KIND), (1, "bob", CAMPAIGN_KIND), (2, "ann", CAMPAIGN_KIND), (3, "cy", "order.paid")]
        {
            hub.push_all(hub.events_of(0, offset, campaign_notification(user, kind), 0));
        }
        let mut events = 0;
        for s in &mut streams {
            events += written(s).await.matches("\nevent: ").count();
        }
        assert_eq!(events, 4, "ann's two streams, bob's and cy's (the replay at offset 2 is not written)");
        assert_eq!(hub.campaigns().take(), [("spring".to_string(), 3)]);
        assert_eq!(hub.campaigns().len(), 1, "an order notification counted as a campaign");
        drop(streams);
        assert_eq!(hub.open_streams(), 0);
    }

    #[test]
    fn campaign_ids_come_from_event_ids() {
        assert_eq!(campaign_id_of("campaign:spring-sale"), "spring-sale");
        assert_eq!(campaign_id_of("ev-7"), "ev-7");
    }
}
