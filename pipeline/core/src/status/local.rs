//! The partitions this process's consumers own now, per consumer client (`templating-consumer`,
//! `delivery-consumer`, ...), kept by every [`crate::consumer::StageContext`] on each rebalance so
//! the process can announce them. Bounded by the partitions of the topics it consumes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, OnceLock};

use super::TopicPartition;

type Held = BTreeMap<&'static str, BTreeSet<TopicPartition>>;

fn held() -> &'static Mutex<Held> {
    static HELD: OnceLock<Mutex<Held>> = OnceLock::new();
    HELD.get_or_init(Default::default)
}

/// `client` took these partitions.
pub fn assigned<'a>(client: &'static str, parts: impl IntoIterator<Item = (&'a str, i32)>) {
    let mut h = held().lock().expect("lock");
    let set = h.entry(client).or_default();
    set.extend(parts.into_iter().map(|(t, p)| TopicPartition { topic: t.to_string(), partition: p }));
}

/// `client` gave these partitions up.
pub fn revoked<'a>(client: &'static str, parts: impl IntoIterator<Item = (&'a str, i32)>) {
    let mut h = held().lock().expect("lock");
    if let Some(set) = h.get_mut(client) {
        for (t, p) in parts {
            set.remove(&TopicPartition { topic: t.to_string(), partition: p });
        }
    }
}

/// What each client owns now.
pub fn snapshot() -> BTreeMap<&'static str, Vec<TopicPartition>> {
    held().lock().expect("lock").iter().map(|(c, s)| (*c, s.iter().cloned().collect())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_and_revocations_are_tracked_per_client() {
        assigned("local-test-a", [("t", 0), ("t", 1)]);
        assigned("local-test-b", [("t", 2)]);
        revoked("local-test-a", [("t", 0)]);
        let s = snapshot();
        assert_eq!(s["local-test-a"], vec![TopicPartition { topic: "t".into(), partition: 1 }]);
        assert_eq!(s["local-test-b"].len(), 1);
    }
}
