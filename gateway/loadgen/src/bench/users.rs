//! The benchmark's SSE users and what arrived on their streams, by phase of the run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidings_loadgen::{percentiles, Seen, Totals};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::load::now_micros;
use crate::{start_clients, user_id, Fleet};

/// One notification (or nchan message) as it arrived.
pub(super) struct Arrival {
    pub(super) received_us: i64,
    pub(super) occurred_us: i64,
    pub(super) source_event_id: String,
    /// The stream position `partition.offset`: the notifications record it came from.
    pub(super) position: String,
}

/// Arrivals of the current phase.
#[derive(Default)]
pub(super) struct Samples {
    pub(super) phase: AtomicU8,
    pub(super) by_phase: Mutex<HashMap<u8, Vec<Arrival>>>,
}

impl Samples {
    pub(super) fn record(&self, v: &Value) {
        let received_us = now_micros();
        let Some(at) = v["occurred_at"].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()) else {
            return;
        };
        let arrival = Arrival {
            received_us,
            occurred_us: at.timestamp_micros(),
            source_event_id: v["source_event_id"].as_str().unwrap_or_default().to_string(),
            position: v["position"].as_str().unwrap_or_default().to_string(),
        };
        let phase = self.phase.load(Ordering::Relaxed);
        self.by_phase.lock().unwrap().entry(phase).or_default().push(arrival);
    }

    pub(super) fn count(&self, phase: u8) -> usize {
        self.by_phase.lock().unwrap().get(&phase).map_or(0, Vec::len)
    }

    pub(super) fn take(&self, phase: u8) -> Vec<Arrival> {
        self.by_phase.lock().unwrap().remove(&phase).unwrap_or_default()
    }

    pub(super) fn summary(&self, phase: u8) -> Value {
        let lat: Vec<i64> = self
            .by_phase
            .lock()
            .unwrap()
            .get(&phase)
            .map(|v| v.iter().map(|a| a.received_us - a.occurred_us).collect())
            .unwrap_or_default();
        json!({ "received": lat.len(), "latency_ms": percentiles(lat) })
    }
}

/// The p99 (ms) of each measured round's latencies; `round` tells an arrival's round.
pub(super) fn round_p99s(arrivals: &[Arrival], rounds: usize, round: impl Fn(&Arrival) -> Option<usize>) -> Value {
    let mut per: Vec<Vec<i64>> = vec![Vec::new(); rounds];
    for a in arrivals {
        if let Some(r) = round(a).filter(|r| *r < rounds) {
            per[r].push(a.received_us - a.occurred_us);
        }
    }
    json!(per.into_iter().map(|l| percentiles(l)["p99"].clone()).collect::<Vec<_>>())
}

/// Waits until `want` arrivals of `phase` came (or `timeout`); answers whether they did.
pub(super) async fn wait_samples(samples: &Samples, phase: u8, want: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while samples.count(phase) < want {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// Waits until `want` streams are open (or `timeout`); answers how many are.
pub(super) async fn wait_connected(totals: &Totals, want: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    while (totals.connected.load(Ordering::Relaxed) as usize) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    totals.connected.load(Ordering::Relaxed) as usize
}

/// The benchmark's SSE users (`<prefix>000000`, …) on one gateway, recording into one `Samples`.
pub(super) struct Users {
    pub(super) url: String,
    pub(super) prefix: &'static str,
    pub(super) stop: CancellationToken,
    pub(super) totals: Arc<Totals>,
    pub(super) samples: Arc<Samples>,
    pub(super) clients: Vec<JoinHandle<Seen>>,
}

impl Users {
    pub(super) fn new(url: &str, prefix: &'static str) -> Users {
        Users {
            url: url.to_string(),
            prefix,
            stop: CancellationToken::new(),
            totals: Arc::default(),
            samples: Arc::default(),
            clients: Vec::new(),
        }
    }

    /// Opens streams for the users up to `n` not yet started, then waits (at most `timeout`) until
    /// `n` are open; answers how many are.
    pub(super) async fn grow(&mut self, n: usize, timeout: Duration) -> usize {
        let from = self.clients.len();
        if n > from {
            let s = self.samples.clone();
            let fleet = Fleet {
                gateways: std::slice::from_ref(&self.url),
                prefix: self.prefix,
                secret: tidings_gateway::auth::DEV_SECRET,
                ramp: 4000,
            };
            let cb = Arc::new(move |v: &Value| s.record(v));
            self.clients.extend(start_clients(&fleet, from, n - from, &self.stop, &self.totals, cb).await);
        }
        wait_connected(&self.totals, n, timeout).await
    }

    pub(super) fn user(&self, i: usize) -> String {
        user_id(self.prefix, i)
    }

    pub(super) async fn close(self) {
        self.stop.cancel();
        for c in self.clients {
            let _ = c.await;
        }
    }
}
