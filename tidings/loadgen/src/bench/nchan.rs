//! `nchan_fanout` and `nchan_broadcast`: the same loads on nginx + nchan, published over HTTP
//! straight to EventSource subscribers, for comparison.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use tidings_loadgen::Totals;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::broadcast::BURST_PAUSE;
use super::cpu::{wakeups_late, CpuWindow};
use super::load::{now_micros, pace, post, posted};
use super::users::{round_p99s, wait_connected, wait_samples, Samples};
use super::BenchArgs;
use crate::user_id;

/// nchan EventSource subscribers, one task per entry of `channels` (`GET /sub/<channel>`), opened
/// at 4,000/s; each message's JSON is recorded as a notification is. They reconnect after an
/// error until `stop`.
pub(super) async fn nchan_subscribe(
    base: &str,
    channels: &[String],
    stop: &CancellationToken,
    totals: &Arc<Totals>,
    samples: &Arc<Samples>,
) -> Vec<JoinHandle<()>> {
    let http = tidings_loadgen::http_client();
    let started = Instant::now();
    let mut handles = Vec::with_capacity(channels.len());
    for (n, ch) in channels.iter().enumerate() {
        let url = format!("{base}/sub/{ch}");
        let (http, stop, totals, samples) = (http.clone(), stop.clone(), totals.clone(), samples.clone());
        handles.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let req = http.get(&url).header("accept", "text/event-stream").send();
                let resp = tokio::select! {
                    _ = stop.cancelled() => break,
                    r = req => r,
                };
                match resp {
                    Ok(r) if r.status() == 200 => {
                        totals.connected.fetch_add(1, Ordering::Relaxed);
                        let mut events = r.bytes_stream().eventsource();
                        loop {
                            let next = tokio::select! {
                                _ = stop.cancelled() => None,
                                e = events.next() => e,
                            };
                            let Some(Ok(ev)) = next else { break };
                            if !ev.data.is_empty() {
                                samples.record(&ev.data);
                            }
                        }
                        totals.connected.fetch_sub(1, Ordering::Relaxed);
                    }
                    _ => {
                        totals.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }));
        pace(started, n, 4000).await;
    }
    handles
}

/// An nchan scenario: subscribers on `subscribe` (one each), then one message per entry of
/// `publish` at `rate`/s by `POST /pub/<channel>`; latency from just before each POST to each
/// receipt, until `expected` receipts arrived. `publish` is `rounds` equal rounds (each one's p99
/// is printed too), published back to back or, with `pause`, each after the previous one arrived
/// and the pause (as `broadcast` does).
#[allow(clippy::too_many_arguments)]
pub(super) async fn nchan_run(
    name: &str,
    base: &str,
    subscribe: &[String],
    publish: &[String],
    (rounds, pause): (usize, Option<Duration>),
    rate: usize,
    expected: usize,
    http: &reqwest::Client,
) -> Value {
    let rounds = rounds.max(1);
    let (stop, totals, samples) = (CancellationToken::new(), Arc::<Totals>::default(), Arc::<Samples>::default());
    let subs = nchan_subscribe(base, subscribe, &stop, &totals, &samples).await;
    let connected = wait_connected(&totals, subscribe.len(), Duration::from_secs(300)).await;
    // A subscriber counts as connected when its headers arrive; give nchan's workers a moment to
    // finish registering subscriptions with the worker that owns each channel.
    tokio::time::sleep(Duration::from_secs(1)).await;
    samples.phase.store(1, Ordering::Relaxed);
    wakeups_late();
    let cpu = CpuWindow::start(&[]);
    let per_round = (publish.len() / rounds).max(1);
    let t = Instant::now();
    let (mut round_start, mut sending) = (t, Duration::ZERO);
    let mut posts = Vec::with_capacity(publish.len());
    for (k, ch) in publish.iter().enumerate() {
        if let Some(pause) = pause.filter(|_| k > 0 && k % per_round == 0) {
            sending += round_start.elapsed();
            wait_samples(&samples, 1, k / per_round * (expected / rounds), Duration::from_secs(120)).await;
            tokio::time::sleep(pause).await;
            round_start = Instant::now();
        }
        let slot = if pause.is_some() { k % per_round } else { k };
        let at = now_micros();
        let occurred = chrono::DateTime::from_timestamp_micros(at)
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
            .unwrap_or_default();
        let body = json!({"occurred_at": occurred, "source_event_id": format!("{name}-{k}")}).to_string();
        posts.push(post(http, format!("{base}/pub/{ch}"), body, at));
        pace(round_start, slot, rate).await;
    }
    let post_secs = (sending + round_start.elapsed()).as_secs_f64();
    let posts = posted(posts).await;
    let complete = wait_samples(&samples, 1, expected, Duration::from_secs(120)).await;
    let late = wakeups_late();
    let cpu = cpu.end(samples.count(1));
    let mut v = samples.summary(1);
    v["client_wakeups_late"] = late;
    v["cpu"] = cpu;
    let prefix = format!("{name}-");
    v["round_p99_ms"] = round_p99s(&samples.take(1), rounds, |a| {
        Some(a.source_event_id.strip_prefix(&prefix)?.parse::<usize>().ok()? / per_round)
    });
    v["measured_rounds"] = json!(rounds);
    v["scenario"] = json!(name);
    v["subscribers"] = json!(subscribe.len());
    v["connected"] = json!(connected);
    v["messages"] = json!(publish.len());
    v["target_rate"] = json!(rate);
    v["achieved_rate"] = json!(publish.len() as f64 / post_secs);
    v["expected"] = json!(expected);
    v["posts"] = posts;
    v["complete"] = json!(complete);
    v["wall_secs"] = json!(t.elapsed().as_secs_f64());
    v["subscriber_errors"] = json!(totals.errors.load(Ordering::Relaxed));
    stop.cancel();
    for s in subs {
        let _ = s.await;
    }
    v
}

/// `nchan_fanout` (`fanout`: one channel per user, one message each per round, as
/// `ingest_latency`) or `nchan_broadcast` (one channel all subscribe to, bursts as `broadcast`).
pub(super) async fn scenario(name: &str, fanout: bool, base: &str, args: &BenchArgs, http: &reqwest::Client) -> Value {
    if fanout {
        let channels: Vec<String> = (0..args.latency_users).map(|i| user_id("n", i)).collect();
        let rounds = args.latency_rounds.max(1);
        let publish: Vec<String> = (0..rounds).flat_map(|_| channels.iter().cloned()).collect();
        nchan_run(name, base, &channels, &publish, (rounds, None), args.latency_rate, publish.len(), http).await
    } else {
        let channel = format!("all{}", uuid::Uuid::new_v4().simple());
        let subscribe = vec![channel.clone(); args.broadcast_users];
        let rounds = args.broadcast_rounds.max(1);
        let publish = vec![channel; args.campaigns * rounds];
        let expected = subscribe.len() * publish.len();
        let shape = (rounds, Some(BURST_PAUSE));
        nchan_run(name, base, &subscribe, &publish, shape, args.campaign_rate, expected, http).await
    }
}
