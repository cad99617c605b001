//! How a gateway follows the partition count of `notifications` while it runs: a new count read
//! from the metadata is applied once it has been seen for [`PARTITIONS_SETTLE`], by when every
//! running templating routes by it (it refreshes every `PARTITIONS_REFRESH`, half of that).

use std::time::Instant;

use tidings_core::kafka::PARTITIONS_SETTLE;
use tracing::info;

use super::Hub;

/// The count a gateway routes users by, and a different one seen since.
#[derive(Debug)]
pub struct PartitionFollow {
    applied: i32,
    seen: Option<(i32, Instant)>,
}

impl PartitionFollow {
    /// Following from `applied`, the count read at start.
    pub fn new(applied: i32) -> Self {
        gauge(applied);
        PartitionFollow { applied, seen: None }
    }

    /// Takes a count read from the metadata at `now`; returns it when it is time to route by it:
    /// it differs from the applied count and was read for [`PARTITIONS_SETTLE`] since first seen.
    /// Applying earlier would move users to a partition that templating does not write them to
    /// yet, and their streams would miss those events.
    pub fn observe(&mut self, n: i32, now: Instant) -> Option<i32> {
        if n <= 0 || n == self.applied {
            self.seen = None;
            return None;
        }
        let since = match self.seen {
            Some((seen, at)) if seen == n => at,
            _ => {
                info!(partitions = n, was = self.applied, "The notifications topic has {n} partitions now (was {}); this gateway routes users by {n} in {PARTITIONS_SETTLE:?}.", self.applied);
                self.seen = Some((n, now));
                now
            }
        };
        if now.duration_since(since) < PARTITIONS_SETTLE {
            return None;
        }
        self.applied = n;
        self.seen = None;
        Some(n)
    }
}

/// Routes users by `n` partitions from now on: streams of users whose partition moved get
/// `reconnect` and come back to their new partition's owner.
pub fn apply(hub: &Hub, n: i32) {
    let moved = hub.set_partition_count(n);
    gauge(n);
    info!(partitions = n, moved, "This gateway routes users by {n} partitions now; {moved} stream(s) of users whose partition moved got `reconnect`.");
}

fn gauge(n: i32) {
    metrics::gauge!("tidings_notifications_partitions", "stage" => "delivery").set(n as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::hub::{CloseReason, Queued};
    use crate::delivery::{partition_for, HubConfig};
    use std::time::Duration;

    #[tokio::test]
    async fn applying_a_new_count_sends_reconnect_to_the_users_who_moved_only() {
        let hub = Hub::new(HubConfig::default(), None);
        hub.set_partition_count(2);
        hub.assign(0, 0, 0);
        hub.assign(1, 0, 0);
        let users = (0..).map(|i| format!("u{i}"));
        let stays = users.clone().find(|u| partition_for(u, 4) == partition_for(u, 2)).unwrap();
        let moves = users.clone().find(|u| partition_for(u, 4) != partition_for(u, 2)).unwrap();
        let mut staying = hub.subscribe(&stays, None).await.unwrap();
        let mut moving = hub.subscribe(&moves, None).await.unwrap();
        apply(&hub, 4);
        assert!(matches!(moving.rx.try_recv(), Ok(Queued::Close(CloseReason::PartitionRevoked))));
        assert!(staying.rx.try_recv().is_err(), "{stays} stays on partition {}", partition_for(&stays, 2));
        assert_eq!(hub.partition_of(&moves), Some(partition_for(&moves, 4)));
    }

    #[test]
    fn a_new_count_is_applied_only_after_it_settled() {
        let t0 = Instant::now();
        let mut f = PartitionFollow::new(2);
        assert_eq!(f.observe(2, t0), None);
        assert_eq!(f.observe(4, t0), None);
        assert_eq!(f.observe(4, t0 + PARTITIONS_SETTLE - Duration::from_millis(1)), None);
        assert_eq!(f.observe(4, t0 + PARTITIONS_SETTLE), Some(4));
        // Applied once; the same count again is nothing new.
        assert_eq!(f.observe(4, t0 + PARTITIONS_SETTLE * 2), None);
    }

    #[test]
    fn a_count_that_changes_again_starts_settling_anew() {
        let t0 = Instant::now();
        let mut f = PartitionFollow::new(2);
        assert_eq!(f.observe(4, t0), None);
        let t1 = t0 + PARTITIONS_SETTLE / 2;
        assert_eq!(f.observe(6, t1), None);
        assert_eq!(f.observe(6, t0 + PARTITIONS_SETTLE), None);
        assert_eq!(f.observe(6, t1 + PARTITIONS_SETTLE), Some(6));
        // A metadata answer without the topic changes nothing.
        assert_eq!(f.observe(0, t1 + PARTITIONS_SETTLE * 3), None);
    }
}
