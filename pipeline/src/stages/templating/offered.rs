//! Inputs handed to the stage at their acknowledgement by a producer of this process (HTTP
//! ingest, the chat API; see `tidings_core::stage::OfferSlot`): which to take, and which fetched
//! records are then copies of ones already taken. Per partition, in offset order, as if fetched.

use std::collections::HashMap;
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

/// Per consumed partition, the offset after the last input taken (fetched or offered). Only
/// partitions the consumer has handed a record of since the last rebalance are known: an offer
/// for any other is refused, so nothing is taken ahead of records still to be fetched.
#[derive(Default)]
pub struct Taken {
    rebalances_seen: u64,
    next: HashMap<String, HashMap<i32, i64>>,
}

impl Taken {
    /// Forgets everything after a rebalance.
    pub fn sync(&mut self, rebalances: u64) {
        if rebalances != self.rebalances_seen {
            self.next.clear();
            self.rebalances_seen = rebalances;
        }
    }

    /// A fetched record that an offer already took (its outputs are on their way): skip it.
    pub fn has(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.next.get(topic).and_then(|p| p.get(&partition)).is_some_and(|next| offset < *next)
    }

    /// Whether an offered record is the partition's next one.
    pub fn is_next(&self, topic: &str, partition: i32, offset: i64) -> bool {
        self.next.get(topic).and_then(|p| p.get(&partition)) == Some(&offset)
    }

    /// Records that `offset` was taken (processed).
    pub fn set(&mut self, topic: &str, partition: i32, offset: i64) {
        match self.next.get_mut(topic) {
            Some(p) => {
                p.insert(partition, offset + 1);
            }
            None => {
                self.next.insert(topic.to_string(), HashMap::from([(partition, offset + 1)]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_follow_fetched_records_in_order_and_a_rebalance_forgets() {
        let mut t = Taken::default();
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
}
