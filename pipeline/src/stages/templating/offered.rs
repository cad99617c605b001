//! Inputs handed to the stage at their acknowledgement by a producer of this process (HTTP
//! ingest, the chat API; see `tidings_core::stage::OfferSlot`): which to take, and which fetched
//! records are then copies of ones already taken. Per partition, in offset order, as if fetched.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, Statistics};
use tidings_core::client_stats::ClientStats;

/// The stage consumer's context: its statistics, and a count of rebalances, after which what
/// [`Taken`] knows of a partition no longer holds (it may come back from an older commit).
pub struct TemplatingContext {
    stats: ClientStats,
    rebalances: Arc<AtomicU64>,
}

impl TemplatingContext {
    pub fn new(stats: ClientStats) -> Self {
        TemplatingContext { stats, rebalances: Arc::default() }
    }

    pub fn rebalances(&self) -> Arc<AtomicU64> {
        self.rebalances.clone()
    }
}

impl ClientContext for TemplatingContext {
    fn stats(&self, statistics: Statistics) {
        self.stats.stats(statistics);
    }
}

impl ConsumerContext for TemplatingContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Ordering::SeqCst);
    }
}

/// Offers held per partition until the records before them are taken: HTTP ingest acknowledges
/// each event in its own request's task, so two events of one partition can be offered in the
/// opposite order of their offsets. Past this many the partition's later offers go to the fetch.
pub const HELD_PER_PARTITION: usize = 64;

/// Per consumed partition, the offset after the last input taken (fetched or offered), and offers
/// that came ahead of it. Only partitions the consumer has handed a record of since the last
/// rebalance are known: an offer for any other is refused, so nothing is taken ahead of records
/// still to be fetched.
pub struct Taken<M = rdkafka::message::OwnedMessage> {
    rebalances_seen: u64,
    partitions: HashMap<String, HashMap<i32, Partition<M>>>,
}

struct Partition<M> {
    next: i64,
    held: BTreeMap<i64, M>,
}

impl<M> Default for Taken<M> {
    fn default() -> Self {
        Taken { rebalances_seen: 0, partitions: HashMap::new() }
    }
}

impl<M> Taken<M> {
    /// Forgets everything after a rebalance (held offers too: their fetched copies will come).
    pub fn sync(&mut self, rebalances: u64) {
        if rebalances != self.rebalances_seen {
            self.partitions.clear();
            self.rebalances_seen = rebalances;
        }
    }

    fn partition(&self, topic: &str, partition: i32) -> Option<&Partition<M>> {
        self.partitions.get(topic)?.get(&partition)
    }

    /// Keeps an offer that is ahead of its known partition's next offset until that offset is
    /// taken; answers it back when the partition is unknown or already holds its share.
    pub fn hold(&mut self, topic: &str, partition: i32, offset: i64, msg: M) -> Result<(), M> {
        match self.partitions.get_mut(topic).and_then(|p| p.get_mut(&partition)) {
            Some(p) if offset > p.next && p.held.len() < HELD_PER_PARTITION => {
                p.held.insert(offset, msg);
                Ok(())
            }
            _ => Err(msg),
        }
    }

    /// The held offer that is now its partition's next record, if any; held offers the partition
    /// has passed (their fetched copies were taken) are dropped, and counted in `passed`.
    pub fn take_held(&mut self, topic: &str, partition: i32, passed: &mut u64) -> Option<M> {
        let p = self.partitions.get_mut(topic)?.get_mut(&partition)?;
        while let Some(entry) = p.held.first_entry() {
            match (*entry.key()).cmp(&p.next) {
                std::cmp::Ordering::Less => {
                    entry.remove();
                    *passed += 1;
                }
                std::cmp::Ordering::Equal => return Some(entry.remove()),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }

    /// A fetched record that an offer already took (its outputs are on their way): skip it.
    pub fn has(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.partition(topic, partition).is_some_and(|p| offset < p.next)
    }

    /// Whether an offered record is the partition's next one.
    pub fn is_next(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.partition(topic, partition).is_some_and(|p| offset == p.next)
    }

    /// Records that `offset` was taken (processed).
    pub fn set(&mut self, topic: &str, partition: i32, offset: i64) {
        if !self.partitions.contains_key(topic) {
            self.partitions.insert(topic.to_string(), HashMap::new());
        }
        let parts = self.partitions.get_mut(topic).expect("inserted above");
        parts.entry(partition).or_insert_with(|| Partition { next: 0, held: BTreeMap::new() }).next = offset + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_follow_fetched_records_in_order_and_a_rebalance_forgets() {
        let mut t: Taken = Taken::default();
        t.sync(1);
        // Nothing fetched from the partition yet: no offer is next.
        assert!(!t.is_next("orders", 0, 0));
        t.set("orders", 0, 4);
        assert!(t.is_next("orders", 0, 5) && !t.is_next("orders", 0, 6) && !t.is_next("orders", 1, 5));
        t.set("orders", 0, 5);
        // The fetched copy of the offered 5 is skipped; 6 is not taken yet.
        assert!(t.has("orders", 0, 5) && t.has("orders", 0, 4) && !t.has("orders", 0, 6));
        assert!(!t.has("coupons", 0, 5));
        t.sync(1);
        assert!(t.has("orders", 0, 5), "no rebalance, nothing forgotten");
        t.sync(2);
        assert!(!t.has("orders", 0, 5) && !t.is_next("orders", 0, 6), "a rebalance forgets the partition");
    }

    #[test]
    fn offers_ahead_are_held_until_the_records_before_them_are_taken() {
        let mut t: Taken<&str> = Taken::default();
        let mut passed = 0;
        assert_eq!(t.hold("orders", 0, 7, "seven"), Err("seven"), "unknown partition: left to the fetch");
        t.set("orders", 0, 4);
        assert_eq!(t.hold("orders", 0, 5, "five"), Err("five"), "the next one is taken, not held");
        assert_eq!(t.hold("orders", 0, 7, "seven"), Ok(()));
        assert_eq!(t.hold("orders", 0, 6, "six"), Ok(()));
        // 5 comes (offered or fetched), then the held ones follow in offset order.
        t.set("orders", 0, 5);
        assert_eq!(t.take_held("orders", 0, &mut passed), Some("six"));
        assert_eq!(t.take_held("orders", 0, &mut passed), None, "6 not taken yet: 7 waits");
        t.set("orders", 0, 6);
        assert_eq!(t.take_held("orders", 0, &mut passed), Some("seven"));
        t.set("orders", 0, 7);
        assert_eq!(t.take_held("orders", 0, &mut passed), None);
        // A held offer whose fetched copy got there first is dropped, not taken twice.
        assert_eq!(t.hold("orders", 0, 9, "nine"), Ok(()));
        t.set("orders", 0, 8);
        t.set("orders", 0, 9);
        assert_eq!((t.take_held("orders", 0, &mut passed), passed), (None, 1));
        // Bounded per partition, and a rebalance forgets what is held.
        for o in 11..11 + HELD_PER_PARTITION as i64 {
            assert_eq!(t.hold("orders", 0, o, "x"), Ok(()));
        }
        assert_eq!(t.hold("orders", 0, 200, "full"), Err("full"));
        t.sync(2);
        t.set("orders", 0, 10);
        assert_eq!(t.take_held("orders", 0, &mut passed), None, "held offers forgotten on rebalance");
    }
}
