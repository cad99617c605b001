//! Reconnecting SSE clients as a browser's EventSource behaves, for the gateway's multi-instance
//! tests and connection benchmarks: they follow 307s to the owning instance, wait out 503 +
//! `Retry-After`, resume with `Last-Event-ID`, and record every event so tests can check that each
//! notification arrived exactly once and in order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// p50 / p99 / p999 / max in milliseconds of latencies in microseconds (NaN when there are none).
pub fn percentiles(mut v: Vec<i64>) -> serde_json::Value {
    v.sort_unstable();
    let pct = |q: f64| -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    };
    serde_json::json!({ "p50": pct(0.50), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0) })
}

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Notification ids (`data.id`) in arrival order.
    pub ids: Vec<String>,
    /// Stream positions (`id:`) in arrival order.
    pub positions: Vec<(i32, i64)>,
    /// Ids that arrived more than once.
    pub duplicates: Vec<String>,
    /// Positions that were not greater than the one before.
    pub out_of_order: Vec<(i32, i64)>,
    /// `reset` events received.
    pub resets: u32,
    /// Streams opened (first connect plus reconnects).
    pub connects: u32,
    /// Redirects followed.
    pub redirects: u32,
    /// `reconnect` / `close` events received, by reason.
    pub closes: Vec<String>,
}

/// Counters shared by many clients, for progress reports.
#[derive(Debug, Default)]
pub struct Totals {
    pub events: AtomicU64,
    pub connected: AtomicU64,
    pub errors: AtomicU64,
}

/// One simulated user's EventSource.
pub struct Client {
    pub gateways: Vec<String>,
    pub token: String,
    pub http: reqwest::Client,
    /// Stops reconnecting after a `close` event (as a browser app would call `es.close()`) when false.
    pub reconnect_after_close: bool,
}

fn parse_position(id: &str) -> Option<(i32, i64)> {
    let (p, o) = id.split_once('.')?;
    Some((p.parse().ok()?, o.parse().ok()?))
}

/// A reqwest client that never follows redirects on its own (we count and re-send headers).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .expect("reqwest client")
}

impl Client {
    /// Runs until `stop`, reconnecting like EventSource; `on_event` sees each delivered
    /// notification's JSON and its receive time. Returns what was seen.
    pub async fn run(
        &self,
        first: usize,
        stop: CancellationToken,
        totals: Arc<Totals>,
        on_event: impl Fn(&serde_json::Value, Instant) + Send + Sync,
    ) -> Seen {
        let mut seen_ids: HashSet<String> = HashSet::new();
        self.drive(first, stop, totals, |ev, now, seen| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&ev.data) else { return false };
            on_event(&v, now);
            let mut s = seen.lock().unwrap();
            let nid = v["id"].as_str().unwrap_or_default().to_string();
            if !seen_ids.insert(nid.clone()) {
                s.duplicates.push(nid.clone());
            }
            if let Some(pos) = parse_position(&ev.id) {
                if s.positions.last().is_some_and(|last| *last >= pos) {
                    s.out_of_order.push(pos);
                }
                s.positions.push(pos);
            }
            s.ids.push(nid);
            true
        })
        .await
    }

    /// Like [`Client::run`] for a caller that checks what arrived itself: `on_data` gets each
    /// delivered event's `data` text unparsed, and nothing per event is kept (a benchmark with
    /// millions of deliveries on the machine it measures spends its cores on the server, not here).
    pub async fn run_data(
        &self,
        first: usize,
        stop: CancellationToken,
        totals: Arc<Totals>,
        on_data: impl Fn(&str, Instant) + Send + Sync,
    ) -> Seen {
        self.drive(first, stop, totals, |ev, now, _| {
            on_data(&ev.data, now);
            true
        })
        .await
    }

    async fn drive(
        &self,
        first: usize,
        stop: CancellationToken,
        totals: Arc<Totals>,
        // Handles one delivered event; false when it did not count (its data was not JSON).
        mut deliver: impl FnMut(&eventsource_stream::Event, Instant, &Mutex<Seen>) -> bool + Send,
    ) -> Seen {
        let seen = Mutex::new(Seen::default());
        let mut last_id: Option<String> = None;
        let mut retry = Duration::from_millis(500);
        let mut gw = first % self.gateways.len().max(1);
        let mut url = format!("{}/v1/stream", self.gateways[gw]);
        let mut hops = 0;
        while !stop.is_cancelled() {
            let mut req = self.http.get(&url).bearer_auth(&self.token).header("accept", "text/event-stream");
            if let Some(id) = &last_id {
                req = req.header("last-event-id", id);
            }
            let resp = tokio::select! {
                _ = stop.cancelled() => break,
                r = req.send() => r,
            };
            let resp = match resp {
                Ok(r) => r,
                Err(_) => {
                    // Instance down: try the next one, as a load balancer would.
                    totals.errors.fetch_add(1, Ordering::Relaxed);
                    gw = (gw + 1) % self.gateways.len();
                    url = format!("{}/v1/stream", self.gateways[gw]);
                    sleep_or_stop(&stop, retry).await;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            if status == 307 || status == 302 || status == 301 || status == 308 {
                seen.lock().unwrap().redirects += 1;
                hops += 1;
                match resp.headers().get("location").and_then(|v| v.to_str().ok()) {
                    Some(loc) if hops <= 5 => url = loc.to_string(),
                    _ => {
                        hops = 0;
                        url = format!("{}/v1/stream", self.gateways[gw]);
                        sleep_or_stop(&stop, retry).await;
                    }
                }
                continue;
            }
            hops = 0;
            // A 200 with Retry-After is a transient state answered for EventSource (a `retry:`
            // and an `unavailable` event, then the end): waited out like a 503, not a stream.
            if status != 200 || resp.headers().contains_key("retry-after") {
                totals.errors.fetch_add(1, Ordering::Relaxed);
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(retry);
                if status == 401 || status == 403 || status == 422 {
                    break;
                }
                url = format!("{}/v1/stream", self.gateways[gw]);
                sleep_or_stop(&stop, wait.min(Duration::from_secs(2))).await;
                continue;
            }
            seen.lock().unwrap().connects += 1;
            totals.connected.fetch_add(1, Ordering::Relaxed);
            let mut events = resp.bytes_stream().eventsource();
            let mut closed_for_good = false;
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => break,
                    n = events.next() => n,
                };
                let Some(Ok(ev)) = next else { break };
                if let Some(r) = ev.retry {
                    retry = r;
                }
                if !ev.id.is_empty() {
                    last_id = Some(ev.id.clone());
                }
                match ev.event.as_str() {
                    "reconnect" | "close" => {
                        let reason = serde_json::from_str::<serde_json::Value>(&ev.data)
                            .ok()
                            .and_then(|v| v["reason"].as_str().map(str::to_string))
                            .unwrap_or_default();
                        seen.lock().unwrap().closes.push(reason);
                        closed_for_good = ev.event == "close" && !self.reconnect_after_close;
                    }
                    "reset" => seen.lock().unwrap().resets += 1,
                    // A transient state answered as a stream that ends (as EventSource needs):
                    // nothing delivered; the reconnect below waits its `retry:`.
                    "unavailable" => {}
                    "message" if ev.data.is_empty() => {}
                    _ if ev.data.is_empty() => {}
                    _ => {
                        if deliver(&ev, Instant::now(), &seen) {
                            totals.events.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            totals.connected.fetch_sub(1, Ordering::Relaxed);
            if closed_for_good {
                break;
            }
            // Like EventSource: reconnect after the retry delay to the same URL (which redirects
            // if the partition moved); a dead instance fails fast and rotates above.
            url = format!("{}/v1/stream", self.gateways[gw]);
            sleep_or_stop(&stop, retry).await;
        }
        seen.into_inner().unwrap()
    }
}

async fn sleep_or_stop(stop: &CancellationToken, d: Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}
