//! Per-user budgets of the chat API: token buckets keyed by user id (from a valid token), kept in a
//! map of bounded size that forgets the idle and, past its capacity, the least recently used users.
//! Written here rather than taken from `governor`: its keyed limiters keep every key until the
//! caller prunes them, with no bound on their number; these maps have a fixed capacity.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate: `burst` tokens at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    /// `n` per second, sustained, and `burst` at once.
    pub fn per_second(n: f64, burst: u32) -> Self {
        Rate { per_second: n.max(1e-9), burst: f64::from(burst.max(1)) }
    }

    /// `n` per `window`, all of them at once, refilled evenly over the window.
    pub fn per_window(n: u32, window: Duration) -> Self {
        let n = n.max(1);
        Rate { per_second: f64::from(n) / window.as_secs_f64().max(1e-3), burst: f64::from(n) }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets keyed by user (or user pair), at most `capacity` of them.
#[derive(Debug)]
pub struct Buckets {
    rate: Rate,
    capacity: usize,
    map: Mutex<HashMap<String, Bucket>>,
}

impl Buckets {
    pub fn new(rate: Rate, capacity: usize) -> Self {
        Buckets { rate, capacity: capacity.max(1), map: Mutex::new(HashMap::new()) }
    }

    /// Takes `cost` tokens from `key`'s bucket (a cost above the burst costs the whole burst, so
    /// nothing is refused forever), or says how long until it could.
    pub fn take(&self, key: &str, cost: f64) -> Result<(), Duration> {
        self.take_at(key, cost, Instant::now())
    }

    /// [`Self::take`] at `now`.
    pub fn take_at(&self, key: &str, cost: f64, now: Instant) -> Result<(), Duration> {
        let mut map = self.map.lock().expect("lock");
        self.check(&mut map, key, cost, now)?;
        self.commit(&mut map, key, cost, now);
        Ok(())
    }

    /// Takes from `a`'s bucket here and `b`'s in `other` only if both have enough: a refused
    /// request costs neither.
    pub fn take_both(&self, a: &str, other: &Buckets, b: &str, cost: f64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut first = self.map.lock().expect("lock");
        let mut second = other.map.lock().expect("lock");
        let wait_a = self.check(&mut first, a, cost, now).err();
        let wait_b = other.check(&mut second, b, cost, now).err();
        if let Some(wait) = wait_a.max(wait_b) {
            return Err(wait);
        }
        self.commit(&mut first, a, cost, now);
        other.commit(&mut second, b, cost, now);
        Ok(())
    }

    /// How many users the map holds now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().expect("lock").len()
    }

    fn refilled(&self, b: Option<&Bucket>, now: Instant) -> f64 {
        match b {
            None => self.rate.burst,
            Some(b) => {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                (b.tokens + elapsed * self.rate.per_second).min(self.rate.burst)
            }
        }
    }

    fn check(&self, map: &mut HashMap<String, Bucket>, key: &str, cost: f64, now: Instant) -> Result<(), Duration> {
        let cost = cost.min(self.rate.burst);
        let tokens = self.refilled(map.get(key), now);
        if tokens + 1e-9 >= cost {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((cost - tokens) / self.rate.per_second))
        }
    }

    fn commit(&self, map: &mut HashMap<String, Bucket>, key: &str, cost: f64, now: Instant) {
        let cost = cost.min(self.rate.burst);
        let tokens = self.refilled(map.get(key), now) - cost;
        if let Some(b) = map.get_mut(key) {
            *b = Bucket { tokens, at: now };
            return;
        }
        if map.len() >= self.capacity {
            self.evict(map, now);
        }
        map.insert(key.to_string(), Bucket { tokens, at: now });
    }

    /// Forgets every full bucket (a user idle long enough to be back at the burst: the same as
    /// a new one), then, if the map is still above 90% of its capacity, the least recently used
    /// users down to it. Runs only when the map is full, so its cost spreads over many inserts.
    fn evict(&self, map: &mut HashMap<String, Bucket>, now: Instant) {
        map.retain(|_, b| self.refilled(Some(b), now) < self.rate.burst);
        let keep = self.capacity * 9 / 10;
        if map.len() > keep {
            let mut ages: Vec<Instant> = map.values().map(|b| b.at).collect();
            let cut = map.len() - keep;
            let (_, nth, _) = ages.select_nth_unstable(cut - 1);
            let oldest_kept = *nth;
            let mut over = cut;
            map.retain(|_, b| {
                if over > 0 && b.at <= oldest_kept {
                    over -= 1;
                    false
                } else {
                    true
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_a_wait_that_says_when() {
        let b = Buckets::new(Rate::per_second(2.0, 3), 10);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take_at("u", 1.0, t0).unwrap();
        }
        let wait = b.take_at("u", 1.0, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-6, "{wait:?}");
        b.take_at("u", 1.0, t0 + Duration::from_millis(500)).unwrap();
        assert!(b.take_at("v", 1.0, t0).is_ok(), "another user has their own budget");
        // A cost above the burst costs the whole burst, once full.
        assert!(b.take_at("w", 50.0, t0).is_ok());
        assert!(b.take_at("w", 1.0, t0).is_err());
    }

    #[test]
    fn both_or_neither() {
        let (buyer, pair) = (Buckets::new(Rate::per_second(1.0, 5), 10), Buckets::new(Rate::per_second(1.0, 1), 10));
        buyer.take_both("b", &pair, "b>s", 1.0).unwrap();
        assert!(buyer.take_both("b", &pair, "b>s", 1.0).is_err(), "the pair's budget is spent");
        buyer.take_both("b", &pair, "b>t", 1.0).unwrap();
        // The refused one cost the buyer nothing: 5 - 2 left.
        for _ in 0..3 {
            buyer.take("b", 1.0).unwrap();
        }
        assert!(buyer.take("b", 1.0).is_err());
    }

    #[test]
    fn the_map_stays_bounded_and_forgets_the_least_recent() {
        let b = Buckets::new(Rate::per_second(0.001, 2), 100);
        let t0 = Instant::now();
        for i in 0..1_000 {
            b.take_at(&format!("u{i}"), 1.0, t0 + Duration::from_millis(i)).unwrap();
            assert!(b.len() <= 100, "{} users held", b.len());
        }
        // The most recent users are remembered (their budget is spent), the oldest forgotten.
        let now = t0 + Duration::from_millis(1_000);
        b.take_at("u999", 1.0, now).unwrap();
        assert!(b.take_at("u999", 1.0, now).is_err(), "a recent user's spending is remembered");
        b.take_at("u0", 1.0, now).unwrap();
        b.take_at("u0", 1.0, now).unwrap();
    }
}
