//! Which partitions this process owns, at which epoch: every assignment bumps the partition's
//! epoch in the store (fencing the owner before) and starts the consumer at the stored offset;
//! a revocation forgets the partition, so its records are no longer decided here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidings_core::consumer::{Partition, RebalanceHooks, StoredOffsets};
use tidings_store::Store;
use tokio::runtime::{Handle, RuntimeFlavor};
use tracing::{info, warn};

/// How long taking a partition may wait for the store inside the rebalance callback.
const ASSIGN_TIMEOUT: Duration = Duration::from_secs(10);

/// A partition as this process holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Owned at this epoch from this next offset (`None`: the log's beginning), which the
    /// consumer starts at.
    Owned { epoch: i64, next: Option<i64> },
    /// A commit found another owner's epoch: this process's consumer has not heard of the
    /// rebalance yet. Its records are not decided here until it is assigned again.
    Fenced,
    /// Assigned, but the store could not be reached to take it: its records must not be decided
    /// (the attempt fails and restarts, which joins the group again).
    Untaken,
}

/// The partitions held, shared by the consumer's context (which writes) and the stage (which reads).
pub type Holdings = Arc<Mutex<HashMap<i32, Held>>>;

/// The consumer context's part of the claim stage: the [`StoredOffsets`] that take partitions in
/// the store, and the [`RebalanceHooks`] that forget revoked ones.
#[derive(Clone)]
pub struct Ownership {
    pub store: Store,
    pub group: String,
    pub topic: String,
    pub held: Holdings,
    pub runtime: Handle,
}

impl StoredOffsets for Ownership {
    fn stored(&self, partitions: &[Partition]) -> HashMap<Partition, i64> {
        let mut next = HashMap::new();
        for (topic, p) in partitions.iter().filter(|(t, _)| *t == self.topic) {
            // The rebalance callback runs inside `recv()` on a runtime worker: `block_in_place`
            // lets it wait for the store without stalling other tasks (the stage needs a
            // multi-thread runtime; on another the partition stays untaken).
            let taken = if self.runtime.runtime_flavor() == RuntimeFlavor::MultiThread {
                tokio::task::block_in_place(|| {
                    self.runtime.block_on(tokio::time::timeout(
                        ASSIGN_TIMEOUT,
                        self.store.assign_claim_partition(&self.group, *p),
                    ))
                })
            } else {
                warn!("The claim stage needs a multi-thread runtime to take partitions.");
                Ok(Err(tidings_store::StoreError::Config("not on a multi-thread runtime".into())))
            };
            let held = match taken {
                Ok(Ok(owned)) => {
                    info!(partition = p, epoch = owned.epoch, next_offset = ?owned.next_offset, "Took claim partition {p} at epoch {}.", owned.epoch);
                    if let Some(o) = owned.next_offset {
                        next.insert((topic.clone(), *p), o);
                    }
                    Held::Owned { epoch: owned.epoch, next: owned.next_offset }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, partition = p, "Could not take claim partition {p} in the store; the stage restarts.");
                    Held::Untaken
                }
                Err(_) => {
                    warn!(partition = p, "Taking claim partition {p} in the store timed out; the stage restarts.");
                    Held::Untaken
                }
            };
            self.held.lock().expect("lock").insert(*p, held);
        }
        next
    }
}

impl RebalanceHooks for Ownership {
    fn on_revoke(&self, revoked: &[Partition]) {
        let mut held = self.held.lock().expect("lock");
        for (_, p) in revoked.iter().filter(|(t, _)| *t == self.topic) {
            held.remove(p);
        }
    }
}
