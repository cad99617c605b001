//! Requests waiting for their decision on `coupons`, keyed by what the decision names: (coupon,
//! user, claim id) for a claim, (coupon, code, order id) for a redemption. Bounded: past the
//! bound a request is not registered (it answers without waiting); a waiter leaves when dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// What a decision is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum WaitKey {
    Claim { coupon: String, user: String, claim: String },
    Redemption { coupon: String, code: String, order: String },
}

/// A decision, as a waiting request needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `expires_at` in microseconds.
    Issued {
        code: String,
        expires_at: i64,
    },
    Rejected {
        reason: String,
    },
    Redeemed,
    Refused {
        reason: String,
    },
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    waiting: usize,
    by_key: HashMap<WaitKey, Vec<(u64, oneshot::Sender<Outcome>)>>,
}

/// Every waiting request of this gateway, at most `max` of them.
pub struct Waiters {
    inner: Mutex<Inner>,
    max: usize,
}

/// One registered request; dropping it (answered, timed out or cancelled) unregisters it.
pub struct Waiter {
    waiters: Arc<Waiters>,
    key: WaitKey,
    id: u64,
    rx: oneshot::Receiver<Outcome>,
}

impl Waiters {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Waiters { inner: Mutex::new(Inner::default()), max })
    }

    /// Registers a request waiting for the decision `key`; `None` when `max` already wait.
    pub fn register(self: &Arc<Self>, key: WaitKey) -> Option<Waiter> {
        let mut inner = self.inner.lock().expect("lock");
        if inner.waiting >= self.max {
            return None;
        }
        inner.waiting += 1;
        inner.next_id += 1;
        let id = inner.next_id;
        let (tx, rx) = oneshot::channel();
        inner.by_key.entry(key.clone()).or_default().push((id, tx));
        drop(inner);
        Some(Waiter { waiters: self.clone(), key, id, rx })
    }

    /// Hands `outcome` to every request waiting for `key`; how many there were.
    pub fn complete(&self, key: &WaitKey, outcome: &Outcome) -> usize {
        let senders = {
            let mut inner = self.inner.lock().expect("lock");
            let Some(senders) = inner.by_key.remove(key) else { return 0 };
            inner.waiting -= senders.len();
            senders
        };
        let n = senders.len();
        for (_, tx) in senders {
            let _ = tx.send(outcome.clone());
        }
        n
    }

    /// Requests waiting now.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("lock").waiting
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Waiter {
    /// The decision, or `None` if none came within `timeout`.
    pub async fn wait(mut self, timeout: Duration) -> Option<Outcome> {
        tokio::time::timeout(timeout, &mut self.rx).await.ok().and_then(Result::ok)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut inner = self.waiters.inner.lock().expect("lock");
        let Some(list) = inner.by_key.get_mut(&self.key) else { return };
        let Some(i) = list.iter().position(|(id, _)| *id == self.id) else { return };
        list.swap_remove(i);
        if list.is_empty() {
            inner.by_key.remove(&self.key);
        }
        inner.waiting -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(user: &str) -> WaitKey {
        WaitKey::Claim { coupon: "c".into(), user: user.into(), claim: "k".into() }
    }

    #[test]
    fn past_the_bound_nothing_is_registered_until_a_waiter_leaves() {
        let waiters = Waiters::new(2);
        let a = waiters.register(claim("a")).expect("first");
        let b = waiters.register(claim("b")).expect("second");
        assert!(waiters.register(claim("c")).is_none(), "a third past the bound of 2");
        assert!(waiters.register(claim("a")).is_none(), "a second waiter of a key counts too");
        assert_eq!(waiters.len(), 2);
        drop(a);
        assert_eq!(waiters.len(), 1);
        let c = waiters.register(claim("c")).expect("room again");
        assert_eq!(waiters.complete(&claim("c"), &Outcome::Redeemed), 1);
        assert_eq!(waiters.len(), 1, "a completed waiter no longer counts");
        drop((b, c));
        assert!(waiters.is_empty());
        assert!(waiters.inner.lock().unwrap().by_key.is_empty(), "no key is left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn every_waiter_of_a_key_gets_its_decision_and_others_time_out() {
        let waiters = Waiters::new(10);
        let (one, two) = (waiters.register(claim("a")).unwrap(), waiters.register(claim("a")).unwrap());
        let other = waiters.register(claim("b")).unwrap();
        let issued = Outcome::Issued { code: "C".into(), expires_at: 5 };
        assert_eq!(waiters.complete(&claim("a"), &issued), 2);
        assert_eq!(one.wait(Duration::from_millis(10)).await, Some(issued.clone()));
        assert_eq!(two.wait(Duration::from_millis(10)).await, Some(issued));
        assert_eq!(other.wait(Duration::from_millis(500)).await, None);
        assert!(waiters.is_empty());
        assert_eq!(waiters.complete(&claim("b"), &Outcome::Redeemed), 0, "nobody waits any more");
    }
}
