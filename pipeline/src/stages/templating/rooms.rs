//! Chat rooms' members as last read from the store, kept per input partition so that a message
//! reads the store only when its room changed. Entries expire, and a partition's are forgotten
//! when it is assigned or revoked: while another instance owned it, members may have left.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidings_core::consumer::{Assigned, Partition, RebalanceHooks, StageContext, StartOffsets};

/// Rooms whose members are remembered at most; past it expired entries go, then all.
pub const MAX_CACHED_ROOMS: usize = 100_000;

/// Room members by input partition and room id, each with when it was read.
pub struct RoomCache {
    ttl: Duration,
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    partitions: HashMap<(String, i32), HashMap<String, Entry>>,
    len: usize,
}

struct Entry {
    members: Arc<Vec<String>>,
    read_at: Instant,
}

impl RoomCache {
    pub fn new(ttl: Duration, max: usize) -> Self {
        RoomCache { ttl, max: max.max(1), inner: Mutex::default() }
    }

    /// The members of `room` (whose events are on `topic`/`partition`) if read within the TTL.
    pub fn get(&self, topic: &str, partition: i32, room: &str, now: Instant) -> Option<Arc<Vec<String>>> {
        let inner = self.inner.lock().expect("lock");
        let entry = inner.partitions.get(&(topic.to_owned(), partition))?.get(room)?;
        (now.saturating_duration_since(entry.read_at) < self.ttl).then(|| entry.members.clone())
    }

    /// Remembers `members` of `room` as read at `now`.
    pub fn insert(&self, topic: &str, partition: i32, room: &str, members: Arc<Vec<String>>, now: Instant) {
        let mut inner = self.inner.lock().expect("lock");
        if inner.len >= self.max {
            let ttl = self.ttl;
            for rooms in inner.partitions.values_mut() {
                rooms.retain(|_, e| now.saturating_duration_since(e.read_at) < ttl);
            }
            inner.partitions.retain(|_, rooms| !rooms.is_empty());
            inner.len = inner.partitions.values().map(HashMap::len).sum();
            if inner.len >= self.max {
                inner.partitions.clear();
                inner.len = 0;
            }
        }
        let rooms = inner.partitions.entry((topic.to_owned(), partition)).or_default();
        let added = rooms.insert(room.to_owned(), Entry { members, read_at: now }).is_none();
        inner.len += usize::from(added);
    }

    /// Forgets `room` (one of its membership events passed).
    pub fn remove(&self, topic: &str, partition: i32, room: &str) {
        let mut inner = self.inner.lock().expect("lock");
        let removed = inner.partitions.get_mut(&(topic.to_owned(), partition)).and_then(|r| r.remove(room)).is_some();
        inner.len -= usize::from(removed);
    }

    /// Forgets every room of the listed partitions.
    pub fn forget<'a>(&self, partitions: impl IntoIterator<Item = &'a Partition>) {
        let mut inner = self.inner.lock().expect("lock");
        for p in partitions {
            if let Some(rooms) = inner.partitions.remove(p) {
                inner.len -= rooms.len();
            }
        }
    }

    /// Rooms remembered.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("lock").len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The stage consumer's context: the group's committed offsets, its statistics, and the hooks
/// that make the room cache forget the partitions that move.
pub type TemplatingContext = StageContext<RoomHooks>;

/// The stage consumer's context over `rooms`, recording statistics as `client`.
pub fn context(client: &'static str, rooms: Arc<RoomCache>) -> TemplatingContext {
    StageContext::new(client, StartOffsets::Committed, RoomHooks(rooms))
}

/// Assigned partitions may come back from another instance that saw their membership events;
/// revoked ones are no longer this instance's to keep.
pub struct RoomHooks(pub Arc<RoomCache>);

impl RebalanceHooks for RoomHooks {
    fn on_assign(&self, assigned: &[Assigned]) {
        let parts: Vec<Partition> = assigned.iter().map(|a| (a.topic.clone(), a.partition)).collect();
        self.0.forget(&parts);
    }

    fn on_revoke(&self, revoked: &[Partition]) {
        self.0.forget(revoked);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> Arc<Vec<String>> {
        Arc::new(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        let cache = RoomCache::new(Duration::from_secs(60), 10);
        let t0 = Instant::now();
        cache.insert("chat", 1, "r1", members(&["a"]), t0);
        assert_eq!(cache.get("chat", 1, "r1", t0 + Duration::from_secs(59)).as_deref(), Some(&vec!["a".to_string()]));
        assert_eq!(cache.get("chat", 1, "r1", t0 + Duration::from_secs(60)), None, "expired");
        assert_eq!(cache.get("chat", 2, "r1", t0), None, "another partition's room");
        cache.remove("chat", 1, "r1");
        assert_eq!((cache.get("chat", 1, "r1", t0), cache.len()), (None, 0));
    }

    #[test]
    fn moved_partitions_are_forgotten_and_the_cache_stays_bounded() {
        let cache = RoomCache::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        cache.insert("chat", 1, "r1", members(&["a"]), t0);
        cache.insert("chat", 1, "r2", members(&["b"]), t0);
        cache.insert("chat", 2, "r3", members(&["c"]), t0);
        cache.forget(&[("chat".to_string(), 1)]);
        assert_eq!(cache.len(), 1);
        assert!(cache.get("chat", 1, "r1", t0).is_none() && cache.get("chat", 2, "r3", t0).is_some());
        // Full: expired entries go first; if none have, all do.
        cache.insert("chat", 2, "r4", members(&["d"]), t0);
        cache.insert("chat", 3, "r5", members(&["e"]), t0 + Duration::from_secs(61));
        assert_eq!(cache.len(), 3);
        cache.insert("chat", 3, "r6", members(&["f"]), t0 + Duration::from_secs(61));
        assert_eq!(cache.len(), 2, "the two expired entries went");
        cache.insert("chat", 3, "r7", members(&["g"]), t0 + Duration::from_secs(61));
        cache.insert("chat", 3, "r8", members(&["h"]), t0 + Duration::from_secs(61));
        assert_eq!(cache.len(), 1, "nothing expired: started over");
    }
}
