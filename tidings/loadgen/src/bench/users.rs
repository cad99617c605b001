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
use crate::{start_data_clients, user_id, Fleet};

/// One notification (or nchan message) as it arrived.
pub(super) struct Arrival {
    pub(super) received_us: i64,
    pub(super) occurred_us: i64,
    pub(super) source_event_id: String,
    /// The stream position `partition.offset`: the notifications record it came from.
    pub(super) position: String,
}

impl Arrival {
    /// Parses an event's data received at `received_us`; None without an RFC 3339 `occurred_at`.
    fn parse(received_us: i64, data: &str) -> Option<Arrival> {
        let v: Value = serde_json::from_str(data).ok()?;
        let at = chrono::DateTime::parse_from_rfc3339(v["occurred_at"].as_str()?).ok()?;
        Some(Arrival {
            received_us,
            occurred_us: at.timestamp_micros(),
            source_event_id: v["source_event_id"].as_str().unwrap_or_default().to_string(),
            position: v["position"].as_str().unwrap_or_default().to_string(),
        })
    }
}

/// What arrived in each phase: receipt time and the event's data as received, parsed only after
/// the run ([`Samples::take`]) so that the clients spend as little CPU as they can while the box
/// is measured.
#[derive(Default)]
pub(super) struct Samples {
    pub(super) phase: AtomicU8,
    pub(super) by_phase: Mutex<HashMap<u8, Vec<(i64, String)>>>,
}

impl Samples {
    pub(super) fn record(&self, data: &str) {
        let received_us = now_micros();
        let phase = self.phase.load(Ordering::Relaxed);
        self.by_phase.lock().unwrap().entry(phase).or_default().push((received_us, data.to_owned()));
    }

    pub(super) fn count(&self, phase: u8) -> usize {
        self.by_phase.lock().unwrap().get(&phase).map_or(0, Vec::len)
    }

    /// The phase's arrivals, parsed (ones without an `occurred_at` left out), and forgotten.
    pub(super) fn take(&self, phase: u8) -> Vec<Arrival> {
        let raw = self.by_phase.lock().unwrap().remove(&phase).unwrap_or_default();
        raw.iter().filter_map(|(at, data)| Arrival::parse(*at, data)).collect()
    }

    /// How many of the phase's arrivals parsed, and their latency (receipt − `occurred_at`).
    pub(super) fn summary(&self, phase: u8) -> Value {
        let lat: Vec<i64> = {
            let by_phase = self.by_phase.lock().unwrap();
            let raw = by_phase.get(&phase).map_or(&[][..], Vec::as_slice);
            raw.iter()
                .filter_map(|(at, data)| Arrival::parse(*at, data))
                .map(|a| a.received_us - a.occurred_us)
                .collect()
        };
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
            let cb = Arc::new(move |data: &str| s.record(data));
            self.clients.extend(start_data_clients(&fleet, from, n - from, &self.stop, &self.totals, cb).await);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_what_arrived_after_the_run() {
        let samples = Samples::default();
        samples.phase.store(7, Ordering::Relaxed);
        samples.record(
            r#"{"occurred_at":"2026-12-07T01:00:00.000250Z","source_event_id":"lat-0-l000001","position":"3.41"}"#,
        );
        samples.record(r#"{"no":"occurred_at"}"#);
        samples.record("not json");
        assert_eq!(samples.count(7), 3);
        assert_eq!(samples.summary(7)["received"], 1);
        let arrivals = samples.take(7);
        assert_eq!(arrivals.len(), 1);
        let a = &arrivals[0];
        assert_eq!(
            a.occurred_us,
            chrono::DateTime::parse_from_rfc3339("2026-12-07T01:00:00.000250Z").unwrap().timestamp_micros()
        );
        assert!(a.received_us >= a.occurred_us, "received now, after the event's time");
        assert_eq!((a.source_event_id.as_str(), a.position.as_str()), ("lat-0-l000001", "3.41"));
        assert_eq!(samples.count(7), 0, "taken");
    }
}
