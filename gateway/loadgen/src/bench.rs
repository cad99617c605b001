//! The gateway benchmark: starts real `tidings up` processes on a broker (Apache Kafka in practice)
//! or on the embedded mock cluster, holds SSE connections and measures memory per connection and
//! send-to-receipt latency; the same loads also run against nginx + nchan for comparison. Prints
//! one JSON line per scenario. Latency is receipt time minus the notification's `occurred_at`,
//! which the benchmark sets just before it produces or POSTs (same machine, same clock).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use eventsource_stream::Eventsource;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, Notification, RegistryClient};
use tidings_loadgen::{percentiles, Seen, Totals};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{start_clients, user_id, Fleet};

mod chat;

/// Every scenario, in the order they run (`chat` and `chat_kill` only when named: `.ci/bench-chat`).
const ALL: &str = "ingest_latency,broadcast,ingest_latency_embedded,nchan_fanout,nchan_broadcast,idle,fanout,campaign,sustained,multi";

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Kafka bootstrap servers (a real broker: several gateway processes share a consumer group).
    #[arg(long, env = "TIDINGS_TEST_BROKERS")]
    brokers: String,
    /// The `tidings` binary (default: next to this one).
    #[arg(long)]
    tidings: Option<PathBuf>,
    /// topology.yaml.
    #[arg(long, default_value = "topology.yaml")]
    topology: PathBuf,
    /// Scenarios to run, comma-separated: ingest_latency, broadcast, ingest_latency_embedded,
    /// nchan_fanout, nchan_broadcast, idle, fanout, campaign, sustained, multi, chat, chat_kill (the
    /// chat ones need PostgreSQL at TIDINGS_TEST_PG). A `comparison` line follows when a tidings
    /// scenario and its nchan counterpart both ran.
    #[arg(long, value_delimiter = ',', default_value = ALL)]
    scenarios: Vec<String>,
    /// nginx + nchan base URL for the nchan scenarios (compose/start-nchan.sh prints it).
    #[arg(long, env = "TIDINGS_BENCH_NCHAN_URL")]
    nchan: Option<String>,
    /// Seconds of the same load, unmeasured, before ingest_latency measures (whole rounds of one
    /// event per user, at least one): a freshly started broker JVM spends its first minute or so
    /// compiling its hot paths on the cores the measurement shares. At most 5 on the mock cluster.
    #[arg(long, default_value_t = 45)]
    latency_warm_secs: u64,
    /// Users (one stream and one event each) in ingest_latency and nchan_fanout.
    #[arg(long, default_value_t = 2_000)]
    latency_users: usize,
    /// Events per second POSTed in ingest_latency and nchan_fanout.
    #[arg(long, default_value_t = 2_000)]
    latency_rate: usize,
    /// Measured rounds (one event per user each, back to back at the rate) in ingest_latency and
    /// nchan_fanout: the p99 of one round is its 20th-slowest event, so one stall anywhere on the
    /// box decided it; five rounds are 10,000 events over 5 s, and each round's p99 is printed too.
    #[arg(long, default_value_t = 5)]
    latency_rounds: usize,
    /// Write each measured ingest_latency event to this CSV: POST, `orders` and `notifications`
    /// CreateTime and receipt (µs since the epoch) and its stream position `partition.offset`, to
    /// line slow events up with what else the box did then. `{scenario}` in the path becomes the
    /// scenario's name (without it, ingest_latency_embedded overwrites ingest_latency's file).
    #[arg(long)]
    timeline: Option<PathBuf>,
    /// Milliseconds between the bursts a paced load goes out in (each burst is rate × this / 1000
    /// items at once).
    #[arg(long, default_value_t = 10)]
    pace_ms: u64,
    /// Connected users, each in every campaign's audience, in broadcast and nchan_broadcast.
    #[arg(long, default_value_t = 10_000)]
    broadcast_users: usize,
    /// Campaigns (messages) in broadcast and nchan_broadcast.
    #[arg(long, default_value_t = 10)]
    campaigns: usize,
    /// Campaigns per second.
    #[arg(long, default_value_t = 10)]
    campaign_rate: usize,
    /// Measured bursts of `campaigns` in broadcast and nchan_broadcast, each after the previous
    /// one arrived and a pause (BURST_PAUSE): one burst's p99 is one sample of a noisy box (nchan
    /// alone measured 222-1160 ms here); each burst's p99 is printed too.
    #[arg(long, default_value_t = 3)]
    broadcast_rounds: usize,
    /// Seconds of unmeasured bursts (at least one) before broadcast measures, as for
    /// ingest_latency: run alone, right after the broker started, its JIT compiles through them.
    #[arg(long, default_value_t = 30)]
    broadcast_warm_secs: u64,
    /// Idle connections held by one gateway process (stay under its 20,000 open files).
    #[arg(long, default_value_t = 19_000)]
    idle: usize,
    /// Users that get one notification each in the fan-out scenario.
    #[arg(long, default_value_t = 10_000)]
    fanout_users: usize,
    /// Notifications per second in the sustained scenario.
    #[arg(long, default_value_t = 5_000)]
    rate: usize,
    /// Length of the sustained scenario in seconds.
    #[arg(long, default_value_t = 20)]
    sustain_secs: u64,
    /// Gateway processes in the multi-process scenario.
    #[arg(long, default_value_t = 6)]
    multi_gateways: usize,
    /// Connections in the multi-process scenario (spread over as many client processes).
    #[arg(long, default_value_t = 100_000)]
    multi_connections: usize,
    /// Users in the chat scenarios (one stream each, all sending).
    #[arg(long, default_value_t = 3_000)]
    chat_users: usize,
    /// Members per chat room (users / room size rooms).
    #[arg(long, default_value_t = 10)]
    chat_room_size: usize,
    /// Messages per second each chat user sends.
    #[arg(long, default_value_t = 1.0)]
    chat_rate: f64,
    /// Measured seconds of chat sending.
    #[arg(long, default_value_t = 60)]
    chat_secs: u64,
    /// Seconds of the same chat load before the measured ones.
    #[arg(long, default_value_t = 5)]
    chat_warm_secs: u64,
}

/// A child `tidings up`; killed when dropped.
struct Proc {
    name: String,
    child: Child,
    dir: PathBuf,
}

impl Proc {
    fn spawn(bin: &Path, name: &str, root: &Path, args: &[String], env: &[(&str, String)]) -> anyhow::Result<Proc> {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::File::create(dir.join("log"))?;
        let child = Command::new(bin)
            .args(args)
            .arg("--data-dir")
            .arg(&dir)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TIDINGS_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        Ok(Proc { name: name.into(), child, dir })
    }

    async fn endpoints(&mut self) -> anyhow::Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(text) = std::fs::read(self.dir.join("endpoints.json")) {
                if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                    return Ok(v);
                }
            }
            if let Some(s) = self.child.try_wait()? {
                bail!("{} exited ({s}); see {}", self.name, self.dir.join("log").display());
            }
            if Instant::now() > deadline {
                bail!("{} did not come up; see {}", self.name, self.dir.join("log").display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn term(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
    }

    /// SIGTERM, then up to 20 s for a clean exit (dropping it kills it after that).
    async fn shutdown(&mut self) {
        self.term();
        let _ = tokio::time::timeout(Duration::from_secs(20), async {
            while self.child.try_wait().ok().flatten().is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tidings up` arguments: no `brokers` runs it on the embedded mock cluster, no `prefix` on the
/// topology's own topic names.
fn up_args(brokers: Option<&str>, prefix: Option<&str>, topology: &Path, db: &str, stages: &str) -> Vec<String> {
    let mut a = vec!["up".to_string()];
    let topology = topology.to_str().unwrap_or("topology.yaml");
    let flags = [
        ("--brokers", brokers),
        ("--topic-prefix", prefix),
        ("--topology", Some(topology)),
        ("--database-url", Some(db)),
        ("--stages", Some(stages)),
        ("--http", Some("127.0.0.1:0")),
        ("--registry-listen", Some("127.0.0.1:0")),
        ("--ingest-listen", Some("127.0.0.1:0")),
    ];
    // Dev mode: the bench's users hold dev-secret tokens and it posts with the dev service token.
    a.push("--dev".to_string());
    for (flag, value) in flags {
        if let Some(v) = value {
            a.extend([flag.to_string(), v.to_string()]);
        }
    }
    a
}

/// An all-stages `tidings up` (templating, persistence and gateway in one process) on its own
/// topics and database: the latency scenarios measure one process's whole chain, and nothing else
/// joins its consumer groups.
struct Stack {
    proc: Proc,
    url: String,
    /// HTTP ingest (the dev service token posts there).
    ingest: String,
    /// What it runs on (the mock cluster's listener when embedded), from its endpoints.json.
    brokers: String,
    prefix: String,
}

impl Stack {
    async fn start(
        bin: &Path,
        root: &Path,
        name: &str,
        topology: &Path,
        brokers: Option<&str>,
        prefix: Option<&str>,
        http: &reqwest::Client,
    ) -> anyhow::Result<Stack> {
        let db = format!("sqlite://{}/{name}.db", root.display());
        let args = up_args(brokers, prefix, topology, &db, "templating,persistence,gateway");
        let mut proc = Proc::spawn(bin, name, root, &args, &[])?;
        let ep = proc.endpoints().await?;
        let field = |k: &str| ep[k].as_str().unwrap_or_default().to_string();
        let (url, ingest, brokers, prefix) = (field("http"), field("ingest"), field("brokers"), field("topic_prefix"));
        wait_ready(http, &url, Duration::from_secs(120)).await?;
        Ok(Stack { proc, url, ingest, brokers, prefix })
    }
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

async fn wait_ready(http: &reqwest::Client, url: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = http.get(format!("{url}/readyz")).send().await {
            if r.status() == 200 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} not ready within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A gauge or counter summed over its label sets, from a Prometheus text page.
async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let Some(text) = metrics_text(http, url).await else { return 0.0 };
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(sample_value)
        .sum()
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// One notification (or nchan message) as it arrived.
struct Arrival {
    received_us: i64,
    occurred_us: i64,
    source_event_id: String,
    /// The stream position `partition.offset`: the notifications record it came from.
    position: String,
}

/// Arrivals of the current phase.
#[derive(Default)]
struct Samples {
    phase: AtomicU8,
    by_phase: Mutex<HashMap<u8, Vec<Arrival>>>,
}

impl Samples {
    fn record(&self, v: &Value) {
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

    fn count(&self, phase: u8) -> usize {
        self.by_phase.lock().unwrap().get(&phase).map_or(0, Vec::len)
    }

    fn take(&self, phase: u8) -> Vec<Arrival> {
        self.by_phase.lock().unwrap().remove(&phase).unwrap_or_default()
    }

    fn summary(&self, phase: u8) -> Value {
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
fn round_p99s(arrivals: &[Arrival], rounds: usize, round: impl Fn(&Arrival) -> Option<usize>) -> Value {
    let mut per: Vec<Vec<i64>> = vec![Vec::new(); rounds];
    for a in arrivals {
        if let Some(r) = round(a).filter(|r| *r < rounds) {
            per[r].push(a.received_us - a.occurred_us);
        }
    }
    json!(per.into_iter().map(|l| percentiles(l)["p99"].clone()).collect::<Vec<_>>())
}

/// Waits until `want` arrivals of `phase` came (or `timeout`); answers whether they did.
async fn wait_samples(samples: &Samples, phase: u8, want: usize, timeout: Duration) -> bool {
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
async fn wait_connected(totals: &Totals, want: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    while (totals.connected.load(Ordering::Relaxed) as usize) < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    totals.connected.load(Ordering::Relaxed) as usize
}

/// The benchmark's SSE users (`<prefix>000000`, …) on one gateway, recording into one `Samples`.
struct Users {
    url: String,
    prefix: &'static str,
    stop: CancellationToken,
    totals: Arc<Totals>,
    samples: Arc<Samples>,
    clients: Vec<JoinHandle<Seen>>,
}

impl Users {
    fn new(url: &str, prefix: &'static str) -> Users {
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
    async fn grow(&mut self, n: usize, timeout: Duration) -> usize {
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

    fn user(&self, i: usize) -> String {
        user_id(self.prefix, i)
    }

    async fn close(self) {
        self.stop.cancel();
        for c in self.clients {
            let _ = c.await;
        }
    }
}

/// The CreateTime (ms) of every record on some topics, by topic and key, read from their start by
/// an assigned consumer (no group rebalance to wait for). Producers stamp it when they produce, so
/// it tells when each stage handed a record on. Stops when dropped.
/// The newest CreateTime per (topic, key) and per (topic, `partition.offset`), and how many
/// records each topic had.
type TimesSeen = (HashMap<(String, String), i64>, HashMap<String, usize>);

struct RecordTimes {
    /// Each topic's partition count: what the hops' request counts scale with.
    partitions: serde_json::Map<String, Value>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<TimesSeen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RecordTimes {
    fn start(brokers: &str, topics: &[&str]) -> anyhow::Result<RecordTimes> {
        let group = format!("tidings-bench-times-{}", uuid::Uuid::new_v4().simple());
        // It reads CreateTimes, not arrival times: large, slow fetches keep it off the broker's CPU.
        let consumer: BaseConsumer = KafkaConfig::new(brokers)
            .consumer_with(&group, &[("fetch.min.bytes", "1048576"), ("fetch.wait.max.ms", "200")], &[])
            .create()?;
        let (mut tpl, mut counts) = (TopicPartitionList::new(), serde_json::Map::new());
        for t in topics {
            let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
            let partitions = md.topics().first().map_or(0, |m| m.partitions().len());
            if partitions == 0 {
                bail!("topic {t} has no partitions");
            }
            counts.insert(t.to_string(), json!(partitions));
            for p in 0..partitions as i32 {
                tpl.add_partition_offset(t, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((HashMap::new(), HashMap::new())));
        let thread = std::thread::spawn({
            let (stop, seen) = (stop.clone(), seen.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else { continue };
                    let Some(ts) = m.timestamp().to_millis() else { continue };
                    let mut seen = seen.lock().unwrap();
                    if let Some(key) = m.key() {
                        seen.0.insert((m.topic().to_string(), String::from_utf8_lossy(key).into_owned()), ts);
                    }
                    // Group records have no key: found by position.
                    seen.0.insert((m.topic().to_string(), format!("{}.{}", m.partition(), m.offset())), ts);
                    *seen.1.entry(m.topic().to_string()).or_default() += 1;
                }
            }
        });
        Ok(RecordTimes { partitions: counts, stop, seen, thread: Some(thread) })
    }

    fn get(&self, topic: &str, key: &str) -> Option<i64> {
        self.seen.lock().unwrap().0.get(&(topic.to_string(), key.to_string())).copied()
    }

    /// Records of `topic` read so far.
    fn count(&self, topic: &str) -> usize {
        self.seen.lock().unwrap().1.get(topic).copied().unwrap_or(0)
    }
}

impl Drop for RecordTimes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Milliseconds between the load's bursts ([`BenchArgs::pace_ms`]).
static PACE_MS: AtomicU64 = AtomicU64::new(10);

/// Sleeps so that item `k` (from 0) goes out at `rate` per second since `start`, in bursts of
/// `PACE_MS`.
async fn pace(start: Instant, k: usize, rate: usize) {
    let step = (rate * PACE_MS.load(Ordering::Relaxed) as usize / 1000).max(1);
    if k % step == step - 1 {
        let due = start + Duration::from_secs_f64((k + 1) as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
    }
}

/// POSTs a JSON body in its own task (so a slow answer does not hold up the next send); the task
/// answers whether it was accepted and how long after `sent_us` the answer came (µs). Carries the
/// dev service token that tidings' ingest asks for (nchan ignores it).
fn post(http: &reqwest::Client, url: String, body: String, sent_us: i64) -> JoinHandle<(bool, i64)> {
    let req = http
        .post(url)
        .bearer_auth(tidings_gateway::service_auth::DEV_SERVICE_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(30))
        .send();
    tokio::spawn(async move {
        let ok = match req.await {
            // Reading the body gives the connection back to the pool.
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        (ok, now_micros() - sent_us)
    })
}

/// How many POSTs were accepted and how long their answers took.
async fn posted(posts: Vec<JoinHandle<(bool, i64)>>) -> Value {
    let done: Vec<(bool, i64)> = futures::future::join_all(posts).await.into_iter().filter_map(Result::ok).collect();
    json!({
        "accepted": done.iter().filter(|(ok, _)| *ok).count(),
        "answer_ms": percentiles(done.iter().map(|(_, us)| *us).collect()),
    })
}

/// A Prometheus text page, if it could be fetched.
async fn metrics_text(http: &reqwest::Client, url: &str) -> Option<String> {
    http.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()
}

/// The value of `key` in a sample line's label set.
fn label<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(&format!("{key}=\"")).nth(1)?.split('"').next()
}

/// A sample line's value.
fn sample_value(line: &str) -> Option<f64> {
    line.split_whitespace().last()?.parse().ok()
}

/// Per stage, the p50/p99 (ms) of `tidings_stage_record_age_seconds` from the gateway's /metrics.
async fn stage_ages(http: &reqwest::Client, url: &str) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut out = serde_json::Map::new();
    let ages = |l: &&str| {
        l.starts_with("tidings_stage_record_age_seconds{")
            || l.starts_with("tidings_gateway_event_age_at_write_seconds{")
    };
    for line in text.lines().filter(ages) {
        let stage = match line.starts_with("tidings_gateway") {
            true => Some("gateway_write"),
            false => label(line, "stage"),
        };
        let (Some(stage), Some(q), Some(v)) = (stage, label(line, "quantile"), sample_value(line)) else {
            continue;
        };
        if q == "0.5" || q == "0.99" {
            let e = out.entry(stage.to_string()).or_insert_with(|| json!({}));
            e[format!("p{}", if q == "0.5" { "50" } else { "99" })] = json!((v * 1000.0).round());
        }
    }
    Value::Object(out)
}

/// How many records each hand-over at the acknowledgement took or left to its consumer's fetch
/// (`tidings_templating_offered_total`, `tidings_gateway_acked_records_total`), over the whole run.
async fn handed_over(http: &reqwest::Client, url: &str) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut out = json!({});
    for (metric, hop) in
        [("tidings_templating_offered_total{", "templating"), ("tidings_gateway_acked_records_total{", "hub")]
    {
        for line in text.lines().filter(|l| l.starts_with(metric)) {
            if let (Some(outcome), Some(v)) = (label(line, "outcome"), sample_value(line)) {
                out[hop][outcome] = json!(v);
            }
        }
    }
    out
}

/// Requests tidings' clients sent (librdkafka's counts, its last report) per event posted in the
/// whole run, per client and kind: what the partition count costs each hop.
async fn client_requests(http: &reqwest::Client, url: &str, events: usize) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut out = json!({});
    for line in text.lines().filter(|l| l.starts_with("tidings_kafka_requests{")) {
        if let (Some(client), Some(kind), Some(v)) = (label(line, "client"), label(line, "request"), sample_value(line))
        {
            let sum = out[client][kind].as_f64().unwrap_or(0.0) + v / events.max(1) as f64;
            out[client][kind] = json!(sum);
        }
    }
    out
}

/// librdkafka's own windows from tidings' `/metrics` (its clients' last statistics report, the
/// previous 10 s): per client, each window's p50 / p99 / max in ms.
async fn client_windows(http: &reqwest::Client, url: &str) -> Value {
    let Some(text) = metrics_text(http, url).await else { return Value::Null };
    let mut out = serde_json::Map::new();
    for (metric, window) in [
        ("tidings_kafka_rtt_seconds{", "rtt"),
        ("tidings_kafka_producer_queue_seconds{", "producer_queue"),
        ("tidings_kafka_request_queue_seconds{", "request_queue"),
    ] {
        for line in text.lines().filter(|l| l.starts_with(metric)) {
            let (Some(client), Some(stat), Some(v)) = (label(line, "client"), label(line, "stat"), sample_value(line))
            else {
                continue;
            };
            let e = out.entry(client.to_string()).or_insert_with(|| json!({}));
            if e.get(window).is_none() {
                e[window] = json!({});
            }
            e[window][stat] = json!((v * 1e6).round() / 1000.0);
        }
    }
    Value::Object(out)
}

fn order_paid(event_id: &str, user: &str, at_us: i64) -> String {
    json!({"event_id": event_id, "occurred_at": at_us, "order_id": event_id, "buyer_id": user, "locale": "en",
        "payload": {"OrderPaid": {"amount_cents": 4200, "currency": "EUR", "payment_method": "card"}}})
    .to_string()
}

fn campaign(id: &str, users: &[String], at_us: i64) -> String {
    json!({
        "event_id": id, "occurred_at": at_us, "coupon_id": id,
        "payload": {"CampaignLaunched": {"campaign_id": id, "title": "Benchmark sale",
            "discount_percent": 10, "audience": {"InlineAudience": {"user_ids": users}}}}
    })
    .to_string()
}

const PHASE_WARM: u8 = 10;
const PHASE_LATENCY: u8 = 11;
const PHASE_BROADCAST: u8 = 12;
const PHASE_BROADCAST_WARM: u8 = 13;

/// The load of `ingest_latency`: `users` streams, `rate` events/s, `warm` unmeasured first, then
/// `rounds` measured rounds of one event per user.
struct LatencyLoad {
    users: usize,
    rate: usize,
    warm: Duration,
    rounds: usize,
    timeline: Option<PathBuf>,
}

/// `ingest_latency`: one OrderPaid per user at `rate`/s to `POST /v1/events/orders`; per user the
/// time from just before its POST to its notification on its stream, split into hops by the
/// CreateTime of its `orders` record (ingest produced it) and its `notifications` record
/// (templating produced it).
async fn ingest_latency(
    name: &str,
    stack: &Stack,
    users: &mut Users,
    load: LatencyLoad,
    http: &reqwest::Client,
) -> anyhow::Result<Value> {
    let LatencyLoad { users: n, rate, warm, rounds: measured_rounds, timeline } = load;
    let measured_rounds = measured_rounds.max(1);
    let (orders, notifications) = (format!("{}orders", stack.prefix), format!("{}notifications", stack.prefix));
    let times = RecordTimes::start(&stack.brokers, &[&orders, &notifications])?;
    let ingest = format!("{}/v1/events/orders", stack.ingest);
    let connected = users.grow(n, Duration::from_secs(120)).await;
    // The same load, unmeasured, for `warm` first (whole rounds): connections, group assignments,
    // schema look-ups and the broker's JIT are then warm, as in a service that has been running.
    // A freshly started JVM compiles its hot paths for about a minute, its C2 threads taking up to
    // half a core here: a bare produce → consume hop at 2,000/s (`--example kafka_hop`,
    // Shenandoah) had p99 10.4, 4.5, 2.5, 2.8, 2.6 ms in consecutive 10 s runs after a start.
    users.samples.phase.store(PHASE_WARM, Ordering::Relaxed);
    let warm_id = uuid::Uuid::new_v4().simple().to_string();
    let mut rounds = 0;
    let started = Instant::now();
    while rounds == 0 || started.elapsed() < warm {
        let t = Instant::now();
        let mut posts = Vec::with_capacity(n);
        for i in 0..n {
            let event = format!("warm-{warm_id}-{rounds}-{i}");
            posts.push(post(http, ingest.clone(), order_paid(&event, &users.user(i), now_micros()), 0));
            pace(t, i, rate).await;
        }
        posted(posts).await;
        rounds += 1;
    }
    let warmed_up = wait_samples(&users.samples, PHASE_WARM, rounds * n, Duration::from_secs(60)).await;
    users.samples.take(PHASE_WARM);

    users.samples.phase.store(PHASE_LATENCY, Ordering::Relaxed);
    wakeups_late();
    let cpu = CpuWindow::start(Some(stack.proc.pid()));
    let t = Instant::now();
    let mut posts = Vec::with_capacity(n * measured_rounds);
    for k in 0..n * measured_rounds {
        let (round, user) = (k / n, users.user(k % n));
        let at = now_micros();
        posts.push(post(http, ingest.clone(), order_paid(&format!("lat-{round}-{user}"), &user, at), at));
        pace(t, k, rate).await;
    }
    let post_secs = t.elapsed().as_secs_f64();
    let posts = posted(posts).await;
    let expected = n * measured_rounds;
    let complete = wait_samples(&users.samples, PHASE_LATENCY, expected, Duration::from_secs(60)).await;
    let late = wakeups_late();
    let cpu = cpu.end(expected);
    let wall_secs = t.elapsed().as_secs_f64();
    // The timestamp consumer may trail the streams a little; it has seen the warm-up's records
    // and the measured ones of each topic when both counts reach (rounds + measured_rounds) * n.
    let all = (rounds + measured_rounds) * n;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (times.count(&orders) < all || times.count(&notifications) < all) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut v = users.samples.summary(PHASE_LATENCY);
    let arrivals = users.samples.take(PHASE_LATENCY);
    v["round_p99_ms"] = round_p99s(&arrivals, measured_rounds, |a| {
        a.source_event_id.strip_prefix("lat-")?.split_once('-')?.0.parse().ok()
    });
    let (mut produce, mut templating, mut delivery) = (Vec::new(), Vec::new(), Vec::new());
    let mut lines = timeline
        .as_ref()
        .map(|_| String::from("post_us,orders_record_us,notifications_record_us,received_us,position\n"));
    for a in arrivals {
        // A user's notification records are keyed alike; its stream position tells them apart.
        let (Some(o), Some(nt)) = (times.get(&orders, &a.source_event_id), times.get(&notifications, &a.position))
        else {
            continue;
        };
        if let Some(lines) = lines.as_mut() {
            lines.push_str(&format!("{},{},{},{},{}\n", a.occurred_us, o * 1000, nt * 1000, a.received_us, a.position));
        }
        produce.push(o * 1000 - a.occurred_us);
        templating.push((nt - o) * 1000);
        delivery.push(a.received_us - nt * 1000);
    }
    if let (Some(path), Some(lines)) = (timeline, lines) {
        // A failed write is reported on the line; the measurement itself still counts.
        let path = path.to_string_lossy().replace("{scenario}", name);
        v["timeline"] = match std::fs::write(&path, lines) {
            Ok(()) => json!(path),
            Err(e) => json!({"path": path, "error": e.to_string()}),
        };
    }
    v["scenario"] = json!(name);
    v["partitions"] = Value::Object(times.partitions.clone());
    v["users"] = json!(n);
    v["connected"] = json!(connected);
    v["target_rate"] = json!(rate);
    v["measured_rounds"] = json!(measured_rounds);
    v["expected"] = json!(expected);
    v["achieved_rate"] = json!(expected as f64 / post_secs);
    v["posts"] = posts;
    v["warmed_up"] = json!(warmed_up);
    v["warm_rounds"] = json!(rounds);
    v["complete"] = json!(complete);
    v["wall_secs"] = json!(wall_secs);
    v["hops_ms"] = json!({
        "matched": produce.len(),
        "post_to_orders_record": percentiles(produce),
        "orders_to_notifications_record": percentiles(templating),
        "notifications_record_to_stream": percentiles(delivery),
        "note": "from Kafka CreateTime, whole milliseconds: each hop is ±1 ms",
        "consumed_after_ms": stage_ages(http, &stack.url).await,
        "consumed_after_note": "the stages' own tidings_stage_record_age_seconds (CreateTime → consumed) and, as gateway_write, tidings_gateway_event_age_at_write_seconds (notifications CreateTime → its stream takes it to write), over the whole run (warm-up included)",
        "kafka_clients_ms": client_windows(http, &stack.url).await,
        "handed_over": handed_over(http, &stack.url).await,
        "kafka_requests_per_event": client_requests(http, &stack.url, (rounds + measured_rounds) * n).await,
        "handed_over_note": "records each hand-over at the acknowledgement took, or left to its consumer's fetch, over the whole run (warm-up included)",
        "kafka_requests_note": "requests each client sent (Produce, Fetch) per event posted in the run, warm-up included, counted to its last statistics report (up to 10 s before this line, so a little low); librdkafka puts one partition in a produce request",
        "kafka_clients_note": "librdkafka's statistics of tidings' clients (tidings_kafka_*_seconds), its last 10 s report: rtt = request → response (a consumer's include fetch long-polls), producer_queue = produce() → written into a request, request_queue = request ready → handed to the socket",
    });
    v["path"] = json!("POST /v1/events/orders → orders → templating → notifications → delivery → stream");
    v["client_wakeups_late"] = late;
    v["cpu"] = cpu;
    Ok(v)
}

/// Between broadcast bursts: the store writes a burst's 100,000 inbox rows after it arrived (its
/// batches linger 1 s; about 1.4 s of SQLite), which would otherwise land in the next burst.
const BURST_PAUSE: Duration = Duration::from_secs(3);

/// `broadcast`: `campaigns` CampaignLaunched at `rate`/s, each with all `n` users as its inline
/// audience (10,000 ids are about 110 KB, under ingest's 1 MiB body limit); latency from just
/// before each POST to each user's receipt, over every receipt.
async fn broadcast(
    stack: &Stack,
    users: &mut Users,
    n: usize,
    campaigns: usize,
    (rate, rounds, warm): (usize, usize, Duration),
    http: &reqwest::Client,
) -> anyhow::Result<Value> {
    let rounds = rounds.max(1);
    let (coupons, notifications) = (format!("{}coupons", stack.prefix), format!("{}notifications", stack.prefix));
    let times = RecordTimes::start(&stack.brokers, &[&coupons, &notifications])?;
    let connected = users.grow(n, Duration::from_secs(300)).await;
    let audience: Vec<String> = (0..n).map(|i| users.user(i)).collect();
    let run = uuid::Uuid::new_v4().simple().to_string();
    let per_round = n * campaigns;
    let send_all = |round: String| {
        let t = Instant::now();
        let (audience, run) = (&audience, &run);
        async move {
            let mut posts = Vec::with_capacity(campaigns);
            for k in 0..campaigns {
                let at = now_micros();
                let body = campaign(&format!("bench-bcast-{run}-{round}-{k}"), audience, at);
                posts.push(post(http, format!("{}/v1/events/coupons", stack.ingest), body, at));
                pace(t, k, rate).await;
            }
            posts
        }
    };
    // Unmeasured bursts first, for the same reason as in `ingest_latency` (a cold broker JIT
    // compiles through its first minute: seen here as 17% of all CPU samples of one burst).
    users.samples.phase.store(PHASE_BROADCAST_WARM, Ordering::Relaxed);
    let (started, mut warm_rounds, mut warmed_up) = (Instant::now(), 0, true);
    while warm_rounds == 0 || started.elapsed() < warm {
        posted(send_all(format!("warm{warm_rounds}")).await).await;
        warm_rounds += 1;
        let want = warm_rounds * per_round;
        warmed_up &= wait_samples(&users.samples, PHASE_BROADCAST_WARM, want, Duration::from_secs(120)).await;
        tokio::time::sleep(BURST_PAUSE).await;
    }
    users.samples.take(PHASE_BROADCAST_WARM);
    users.samples.phase.store(PHASE_BROADCAST, Ordering::Relaxed);
    wakeups_late();
    let cpu = CpuWindow::start(Some(stack.proc.pid()));
    let (mut posts, mut complete, mut wall_secs) = (Vec::new(), true, Vec::new());
    for r in 0..rounds {
        if r > 0 {
            tokio::time::sleep(BURST_PAUSE).await;
        }
        let t = Instant::now();
        posts.extend(send_all(format!("m{r}")).await);
        let want = (r + 1) * per_round;
        complete &= wait_samples(&users.samples, PHASE_BROADCAST, want, Duration::from_secs(120)).await;
        wall_secs.push(t.elapsed().as_secs_f64());
    }
    let late = wakeups_late();
    let cpu = cpu.end(rounds * per_round);
    let posts = posted(posts).await;
    let expected = rounds * per_round;
    let mut v = users.samples.summary(PHASE_BROADCAST);
    v["client_wakeups_late"] = late;
    v["cpu"] = cpu;
    // Per hop, from the records' CreateTimes (the timestamp consumer may trail a little).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let arrivals = users.samples.take(PHASE_BROADCAST);
    let in_round = format!("bench-bcast-{run}-m");
    v["round_p99_ms"] =
        round_p99s(&arrivals, rounds, |a| a.source_event_id.strip_prefix(&in_round)?.split_once('-')?.0.parse().ok());
    let (mut produce, mut templating, mut delivery) = (Vec::new(), Vec::new(), Vec::new());
    for a in arrivals {
        let (Some(c), Some(nt)) = (times.get(&coupons, &a.source_event_id), times.get(&notifications, &a.position))
        else {
            continue;
        };
        produce.push(c * 1000 - a.occurred_us);
        templating.push((nt - c) * 1000);
        delivery.push(a.received_us - nt * 1000);
    }
    v["hops_ms"] = json!({
        "matched": produce.len(),
        "post_to_coupons_record": percentiles(produce),
        "coupons_to_notifications_record": percentiles(templating),
        "notifications_record_to_stream": percentiles(delivery),
        "note": "from Kafka CreateTime, whole milliseconds: each hop is ±1 ms",
    });
    v["scenario"] = json!("broadcast");
    v["users"] = json!(n);
    v["connected"] = json!(connected);
    v["campaigns"] = json!(campaigns);
    v["campaign_rate"] = json!(rate);
    v["measured_rounds"] = json!(rounds);
    v["expected"] = json!(expected);
    v["posts"] = posts;
    v["warmed_up"] = json!(warmed_up);
    v["warm_rounds"] = json!(warm_rounds);
    v["complete"] = json!(complete);
    v["wall_secs"] = json!(wall_secs);
    v["path"] = json!("POST /v1/events/coupons → coupons → templating fan-out → notifications → delivery → streams");
    Ok(v)
}

/// nchan EventSource subscribers, one task per entry of `channels` (`GET /sub/<channel>`), opened
/// at 4,000/s; each message's JSON is recorded as a notification is. They reconnect after an
/// error until `stop`.
async fn nchan_subscribe(
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
                            if let Ok(v) = serde_json::from_str::<Value>(&ev.data) {
                                samples.record(&v);
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
async fn nchan_run(
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
    let cpu = CpuWindow::start(None);
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
    let cpu = CpuWindow::end(cpu, expected);
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

/// tidings ÷ nchan latency for each pair of scenarios that both ran.
fn comparison(results: &HashMap<String, Value>) -> Option<Value> {
    let pairs = [
        ("ingest_latency", "nchan_fanout"),
        ("ingest_latency_embedded", "nchan_fanout"),
        ("broadcast", "nchan_broadcast"),
    ];
    let mut out = serde_json::Map::new();
    for (ours, theirs) in pairs {
        let (Some(a), Some(b)) = (results.get(ours), results.get(theirs)) else { continue };
        let q = |v: &Value, k: &str| v["latency_ms"][k].as_f64();
        let ratio = |k: &str| Some(q(a, k)? / q(b, k)?);
        out.insert(
            format!("{ours}/{theirs}"),
            json!({
                "p50_ratio": ratio("p50"), "p99_ratio": ratio("p99"),
                "tidings_ms": {"p50": q(a, "p50"), "p99": q(a, "p99")},
                "nchan_ms": {"p50": q(b, "p50"), "p99": q(b, "p99")},
            }),
        );
    }
    if out.is_empty() {
        return None;
    }
    out.insert("scenario".into(), json!("comparison"));
    out.insert(
        "note".into(),
        json!(
            "latency ratio tidings / nchan (> 1: tidings slower); nchan publishes straight to its subscribers, \
               tidings goes through Kafka twice (orders, notifications) plus templating"
        ),
    );
    Some(Value::Object(out))
}

fn notification(user: &str, seq: usize) -> Notification {
    let event = format!("bench-{seq}");
    Notification {
        notification_id: Notification::id_for(&event, user),
        user_id: user.to_string(),
        kind: "bench.ping".into(),
        title: "Benchmark".into(),
        body: format!("notification {seq}"),
        link: None,
        source_event_id: event,
        occurred_at: now_micros(),
        source_topic: "bench".into(),
        source_partition: 0,
        source_offset: seq as i64,
        data: None,
        inbox: true,
        recipients: vec![],
    }
}

/// Late wake-ups of a thread that sleeps 2 ms in a loop (`LATE[i]`: later than 5, 10, 20 ms).
/// Not a tokio task: it tells a box that did not run a waiting thread for milliseconds (the
/// broker, tidings and the clients share two cores) from a stall inside the measured process.
static LATE: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
static LATE_MAX_US: AtomicU64 = AtomicU64::new(0);

fn start_wakeup_probe() {
    std::thread::Builder::new()
        .name("wakeup-probe".into())
        .spawn(|| loop {
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(2));
            let late = t.elapsed().saturating_sub(Duration::from_millis(2));
            LATE_MAX_US.fetch_max(late.as_micros() as u64, Ordering::Relaxed);
            for (i, ms) in [5, 10, 20].into_iter().enumerate() {
                if late > Duration::from_millis(ms) {
                    LATE[i].fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .expect("spawning the wake-up probe");
}

/// The wake-up probe's counts since the last call: call it where a measurement starts (to drop
/// what came before) and where it ends.
fn wakeups_late() -> Value {
    let [over5, over10, over20] = LATE.each_ref().map(|c| c.swap(0, Ordering::Relaxed));
    json!({
        "over_5ms": over5, "over_10ms": over10, "over_20ms": over20,
        "max_ms": LATE_MAX_US.swap(0, Ordering::Relaxed) as f64 / 1000.0,
        "note": "wake-ups of a load-client thread sleeping 2 ms in a loop, during the measured part",
    })
}

/// CPU time over a measured part, from /proc: the whole box, the tidings process under test (if
/// any) and these clients; the rest is mostly the broker (or nginx). Less noisy than a latency
/// tail on a shared two-core box, so it shows what a change costs or saves per event.
struct CpuWindow {
    box_ticks: (u64, u64),
    server: Option<(u32, u64)>,
    clients: u64,
}

/// (busy, total) clock ticks of all cores since boot: busy leaves out idle and iowait.
fn box_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = f.iter().sum();
    (total - f.get(3).unwrap_or(&0) - f.get(4).unwrap_or(&0), total)
}

/// User plus system clock ticks of a process, all its threads.
fn proc_ticks(pid: Option<u32>) -> u64 {
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name (which may hold spaces): utime is the 12th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse::<u64>().ok()).sum()
}

impl CpuWindow {
    fn start(server: Option<u32>) -> CpuWindow {
        CpuWindow {
            box_ticks: box_ticks(),
            server: server.map(|p| (p, proc_ticks(Some(p)))),
            clients: proc_ticks(None),
        }
    }

    /// Cores used on average since `start`, and CPU µs per event (`events` of the measured part).
    fn end(self, events: usize) -> Value {
        let ((busy0, total0), (busy1, total1)) = (self.box_ticks, box_ticks());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let hz = 100.0; // USER_HZ: /proc reports clock ticks of 1/100 s on Linux
        let secs = |ticks: u64| ticks as f64 / hz;
        let busy = secs(busy1 - busy0);
        let server = self.server.map(|(p, t)| secs(proc_ticks(Some(p)).saturating_sub(t)));
        let clients = secs(proc_ticks(None) - self.clients);
        let others = (busy - clients - server.unwrap_or(0.0)).max(0.0);
        let per_event = |s: f64| (s * 1e6 / events.max(1) as f64).round();
        json!({
            "box_busy": (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64,
            "cores": cores,
            "secs": {"server": server, "clients": clients, "others": others},
            "per_event_us": {"server": server.map(per_event), "clients": per_event(clients), "others": per_event(others)},
            "note": "CPU over the measured part from /proc (10 ms ticks): server = the tidings process (absent for nchan), clients = this load generator, others = the rest of the box (the broker, or nginx)",
        })
    }
}

/// Prints a JSON line, with the 1-minute load average: the clients, broker and servers share the
/// machine, and anything else running on it shows up in the latencies.
fn emit(mut v: Value) {
    let load = std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split(' ').next()?.parse::<f64>().ok());
    v["load_avg_1m"] = json!(load);
    println!("{v}");
}

/// Prints a scenario's line (an `error` line if it failed, so the other scenarios still run) and
/// keeps it for the comparison.
fn report(results: &mut HashMap<String, Value>, name: &str, outcome: anyhow::Result<Value>) {
    let v = outcome.unwrap_or_else(|e| json!({"scenario": name, "error": format!("{e:#}")}));
    emit(v.clone());
    if v.get("error").is_none() {
        results.insert(name.to_string(), v);
    }
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    PACE_MS.store(args.pace_ms.max(1), Ordering::Relaxed);
    start_wakeup_probe();
    let bin = match &args.tidings {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("tidings"),
    };
    if !bin.exists() {
        bail!("{} not found: build it (cargo build --release -p tidings) or pass --tidings", bin.display());
    }
    let topology = std::fs::canonicalize(&args.topology).context("topology.yaml")?;
    let root = tempfile::Builder::new().prefix("tidings-bench-").tempdir()?;
    let prefix = format!("bench{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let run = |s: &str| args.scenarios.iter().any(|x| x == s);
    let http = reqwest::Client::new();
    eprintln!("bench: prefix {prefix}, work dir {}", root.path().display());
    let mut results = HashMap::new();

    // Latency through the whole chain, on one all-stages process per broker.
    if run("ingest_latency") || run("broadcast") {
        let stack_prefix = format!("{prefix}all.");
        match Stack::start(&bin, root.path(), "all-kafka", &topology, Some(&args.brokers), Some(&stack_prefix), &http)
            .await
        {
            Ok(mut stack) => {
                let mut users = Users::new(&stack.url, "l");
                if run("ingest_latency") {
                    let v = ingest_latency(
                        "ingest_latency",
                        &stack,
                        &mut users,
                        LatencyLoad {
                            users: args.latency_users,
                            rate: args.latency_rate,
                            warm: Duration::from_secs(args.latency_warm_secs),
                            rounds: args.latency_rounds,
                            timeline: args.timeline.clone(),
                        },
                        &http,
                    )
                    .await;
                    report(&mut results, "ingest_latency", v);
                }
                if run("broadcast") {
                    let v = broadcast(
                        &stack,
                        &mut users,
                        args.broadcast_users,
                        args.campaigns,
                        (args.campaign_rate, args.broadcast_rounds, Duration::from_secs(args.broadcast_warm_secs)),
                        &http,
                    )
                    .await;
                    report(&mut results, "broadcast", v);
                }
                users.close().await;
                stack.proc.shutdown().await;
            }
            Err(e) => report(&mut results, "ingest_latency", Err(e)),
        }
    }
    if run("ingest_latency_embedded") {
        let name = "ingest_latency_embedded";
        let v = async {
            let mut stack = Stack::start(&bin, root.path(), "all-embedded", &topology, None, None, &http).await?;
            let mut users = Users::new(&stack.url, "e");
            let v = ingest_latency(
                name,
                &stack,
                &mut users,
                LatencyLoad {
                    users: args.latency_users,
                    rate: args.latency_rate,
                    // No JVM to warm up, and the in-memory mock cluster got slower with more
                    // records in it: after 45 s of warm-up p50 24 / p99 77 ms, against 11 / 16 ms
                    // after 5 s (each fetch walks the partition's log from its start; README,
                    // Gateway benchmark).
                    warm: Duration::from_secs(args.latency_warm_secs.min(5)),
                    rounds: args.latency_rounds,
                    timeline: args.timeline.clone(),
                },
                &http,
            )
            .await;
            users.close().await;
            stack.proc.shutdown().await;
            v.map(|mut v| {
                v["broker"] = json!("embedded librdkafka mock cluster (`tidings up` without --brokers)");
                v
            })
        }
        .await;
        report(&mut results, name, v);
    }

    // The same loads on nginx + nchan: publish over HTTP straight to EventSource subscribers.
    for (name, fanout) in [("nchan_fanout", true), ("nchan_broadcast", false)] {
        if !run(name) {
            continue;
        }
        let Some(base) = args.nchan.as_deref() else {
            emit(json!({"scenario": name, "skipped": "no --nchan / TIDINGS_BENCH_NCHAN_URL (compose/start-nchan.sh)"}));
            continue;
        };
        let base = base.trim_end_matches('/');
        let v = if fanout {
            let channels: Vec<String> = (0..args.latency_users).map(|i| user_id("n", i)).collect();
            let rounds = args.latency_rounds.max(1);
            let publish: Vec<String> = (0..rounds).flat_map(|_| channels.iter().cloned()).collect();
            nchan_run(name, base, &channels, &publish, (rounds, None), args.latency_rate, publish.len(), &http).await
        } else {
            let channel = format!("all{}", uuid::Uuid::new_v4().simple());
            let subscribe = vec![channel.clone(); args.broadcast_users];
            let rounds = args.broadcast_rounds.max(1);
            let publish = vec![channel; args.campaigns * rounds];
            let expected = subscribe.len() * publish.len();
            let shape = (rounds, Some(BURST_PAUSE));
            nchan_run(name, base, &subscribe, &publish, shape, args.campaign_rate, expected, &http).await
        };
        report(&mut results, name, Ok(v));
    }
    if let Some(v) = comparison(&results) {
        emit(v);
    }

    for (name, kill) in [("chat", false), ("chat_kill", true)] {
        if !run(name) {
            continue;
        }
        let opts = chat::ChatOpts {
            users: args.chat_users,
            room_size: args.chat_room_size,
            rate: args.chat_rate,
            secs: args.chat_secs,
            warm_secs: args.chat_warm_secs,
            kill,
        };
        let chat_prefix = format!("{prefix}{name}.");
        let v = chat::run(name, &bin, root.path(), &topology, &args.brokers, &chat_prefix, &opts).await;
        report(&mut results, name, v);
    }

    if !["idle", "fanout", "campaign", "sustained", "multi"].iter().any(|s| run(s)) {
        return Ok(());
    }
    let db = format!("sqlite://{}/bench.db", root.path().display());
    let base = |stages: &str| up_args(Some(&args.brokers), Some(&prefix), &topology, &db, stages);

    // The pipeline (templating for the campaign, persistence) and the embedded registry.
    let mut core = Proc::spawn(&bin, "core", root.path(), &base("templating,persistence"), &[])?;
    let core_ep = core.endpoints().await?;
    let registry_url = core_ep["schema_registry_url"].as_str().unwrap_or_default().to_string();
    let mut gw_args = base("gateway");
    gw_args.extend(["--schema-registry-url".to_string(), registry_url.clone()]);

    let topic = format!("{prefix}notifications");
    let registry = RegistryClient::new(&registry_url)?;
    let (id, schema) = registry.latest(&format!("{topic}-value")).await?;
    let encoder = FramedEncoder::new(id, schema)?;
    let producer: FutureProducer = KafkaConfig::new(args.brokers.clone()).producer().create()?;
    let send = |n: Notification| {
        let payload = encoder.encode(n.to_value()).expect("encodes");
        let key = n.user_id.clone();
        let f = producer.send_result(FutureRecord::to(&topic).key(&key).payload(&payload)).map_err(|(e, _)| e);
        async move {
            match f {
                Ok(d) => d.await.ok().and_then(|r| r.ok()).is_some(),
                Err(_) => false,
            }
        }
    };

    if run("idle") || run("fanout") || run("campaign") || run("sustained") {
        let mut gw = Proc::spawn(&bin, "gateway-single", root.path(), &gw_args, &[])?;
        let gw_ep = gw.endpoints().await?;
        let url = gw_ep["http"].as_str().unwrap_or_default().to_string();
        let ingest = gw_ep["ingest"].as_str().unwrap_or_default().to_string();
        wait_ready(&http, &url, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let baseline = rss_bytes(gw.pid());

        let mut users = Users::new(&url, "b");
        let samples = users.samples.clone();
        let t = Instant::now();
        let connected = users.grow(args.idle, Duration::from_secs(300)).await;
        let connect_secs = t.elapsed().as_secs_f64();
        // Let allocations settle (heartbeat timers armed, buffers shrunk) before reading RSS.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss = rss_bytes(gw.pid());
        let server_side = metric(&http, &url, "tidings_gateway_connections").await;
        emit(json!({
            "scenario": "idle_connections",
            "gateway_processes": 1,
            "connections": connected,
            "connections_per_gateway_metric": server_side,
            "connect_secs": connect_secs,
            "rss_baseline_mib": baseline as f64 / 1048576.0,
            "rss_mib": rss as f64 / 1048576.0,
            "rss_per_connection_bytes": (rss.saturating_sub(baseline)) as f64 / connected.max(1) as f64,
            "note": "one gateway process; the clients run in the benchmark process (open-files limit 20,000 each)",
        }));

        if run("fanout") {
            samples.phase.store(1, Ordering::Relaxed);
            let users = args.fanout_users.min(connected);
            let t = Instant::now();
            let mut acks = Vec::with_capacity(users);
            for i in 0..users {
                acks.push(send(notification(&user_id("b", i), i)));
            }
            let produced_secs = t.elapsed().as_secs_f64();
            let acked = futures::future::join_all(acks).await.into_iter().filter(|ok| *ok).count();
            let complete = wait_samples(&samples, 1, users, Duration::from_secs(120)).await;
            let mut v = samples.summary(1);
            v["scenario"] = json!("fanout_one_each");
            v["users"] = json!(users);
            v["acked"] = json!(acked);
            v["produce_secs"] = json!(produced_secs);
            v["complete"] = json!(complete);
            v["wall_secs"] = json!(t.elapsed().as_secs_f64());
            emit(v);
        }

        if run("campaign") {
            samples.phase.store(2, Ordering::Relaxed);
            let audience: Vec<String> = (0..connected).map(|i| user_id("b", i)).collect();
            let id = format!("bench-camp-{}", uuid::Uuid::new_v4().simple());
            let t = Instant::now();
            let r = http
                .post(format!("{ingest}/v1/events/coupons"))
                .bearer_auth(tidings_gateway::service_auth::DEV_SERVICE_TOKEN)
                .header("content-type", "application/json")
                .body(campaign(&id, &audience, now_micros()))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("campaign ingest failed: {} {}", r.status(), r.text().await.unwrap_or_default());
            }
            let complete = wait_samples(&samples, 2, connected, Duration::from_secs(180)).await;
            let mut v = samples.summary(2);
            v["scenario"] = json!("campaign_broadcast");
            v["audience"] = json!(connected);
            v["complete"] = json!(complete);
            v["wall_secs"] = json!(t.elapsed().as_secs_f64());
            v["path"] = json!("HTTP ingest → coupons → templating fan-out → notifications → delivery");
            emit(v);
        }

        if run("sustained") {
            samples.phase.store(3, Ordering::Relaxed);
            let total = args.rate * args.sustain_secs as usize;
            let t = Instant::now();
            let mut acks = Vec::with_capacity(total);
            for k in 0..total {
                acks.push(send(notification(&user_id("b", (k * 7919) % connected.max(1)), 1_000_000 + k)));
                pace(t, k, args.rate).await;
            }
            let produce_secs = t.elapsed().as_secs_f64();
            let acked = futures::future::join_all(acks).await.into_iter().filter(|ok| *ok).count();
            let complete = wait_samples(&samples, 3, total, Duration::from_secs(120)).await;
            let mut v = samples.summary(3);
            v["scenario"] = json!("sustained");
            v["target_rate"] = json!(args.rate);
            v["achieved_produce_rate"] = json!(total as f64 / produce_secs);
            v["events"] = json!(total);
            v["acked"] = json!(acked);
            v["complete"] = json!(complete);
            v["connections"] = json!(connected);
            emit(v);
        }
        users.close().await;
        gw.shutdown().await;
    }

    if run("multi") {
        let mut gws = Vec::new();
        let mut urls = Vec::new();
        for i in 0..args.multi_gateways {
            let mut g = Proc::spawn(&bin, &format!("gateway-{i}"), root.path(), &gw_args, &[])?;
            urls.push(g.endpoints().await?["http"].as_str().unwrap_or_default().to_string());
            gws.push(g);
        }
        for u in &urls {
            wait_ready(&http, u, Duration::from_secs(180)).await?;
        }
        // Wait for the group to settle: every partition owned once.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut owned = 0.0;
            for u in &urls {
                owned += metric(&http, u, "tidings_gateway_owned_partitions").await;
            }
            let ready = futures::future::join_all(urls.iter().map(|u| http.get(format!("{u}/readyz")).send())).await;
            if owned == 12.0 && ready.iter().all(|r| r.as_ref().is_ok_and(|r| r.status() == 200)) {
                break;
            }
            if Instant::now() > deadline {
                bail!("gateways did not settle on an assignment (owned {owned})");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let me = std::env::current_exe()?;
        let per = args.multi_connections.div_ceil(args.multi_gateways);
        let mut holders = Vec::new();
        let t = Instant::now();
        for k in 0..args.multi_gateways {
            let count = per.min(args.multi_connections - k * per);
            let child = Command::new(&me)
                .args(["hold", "--gateways", &urls.join(","), "--user-prefix", "m", "--from"])
                .arg((k * per).to_string())
                .args(["--count", &count.to_string(), "--ramp", "1500"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            holders.push(child);
        }
        let mut lines: Vec<_> = holders
            .iter_mut()
            .map(|c| {
                use std::io::BufRead;
                let out = c.stdout.take().expect("piped");
                let last = Arc::new(Mutex::new(0u64));
                let l = last.clone();
                std::thread::spawn(move || {
                    for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                        if let Ok(v) = serde_json::from_str::<Value>(&line) {
                            *l.lock().unwrap() = v["connected"].as_u64().unwrap_or(0);
                        }
                    }
                });
                last
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut held = 0;
        while Instant::now() < deadline {
            held = lines.iter_mut().map(|l| *l.lock().unwrap()).sum::<u64>();
            if held as usize >= args.multi_connections {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let connect_secs = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut per_gateway = Vec::new();
        let mut server_total = 0.0;
        for (g, u) in gws.iter().zip(&urls) {
            let c = metric(&http, u, "tidings_gateway_connections").await;
            server_total += c;
            per_gateway.push(json!({"connections": c, "rss_mib": rss_bytes(g.pid()) as f64 / 1048576.0}));
        }
        emit(json!({
            "scenario": "multi_process_connections",
            "gateway_processes": args.multi_gateways,
            "client_processes": holders.len(),
            "target": args.multi_connections,
            "client_side_connected": held,
            "server_side_connections": server_total,
            "connect_secs": connect_secs,
            "per_gateway": per_gateway,
        }));
        for h in &mut holders {
            let _ = Command::new("kill").arg("-TERM").arg(h.id().to_string()).status();
        }
        for h in &mut holders {
            let _ = h.wait();
        }
        for g in &gws {
            g.term();
        }
    }
    core.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window counts this whole process as the clients, so the two tests must not overlap
    /// (the test harness runs tests on parallel threads).
    static ONE_WINDOW_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn cpu_window_counts_the_cpu_a_process_burns() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let (sleeper, pid) = {
            let c = Command::new("sleep").arg("5").spawn().expect("sleep");
            let pid = c.id();
            (c, pid)
        };
        let w = CpuWindow::start(Some(pid));
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(400) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let v = w.end(1_000);
        let mut sleeper = sleeper;
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        // This thread spun for 0.4 s; a sleeping process used none; the box was at least that busy.
        let clients = v["secs"]["clients"].as_f64().unwrap();
        assert!((0.3..2.0).contains(&clients), "{v}");
        assert!(v["secs"]["server"].as_f64().unwrap() < 0.05, "{v}");
        assert!(v["box_busy"].as_f64().unwrap() > 0.1, "{v}");
        assert!(v["per_event_us"]["clients"].as_f64().unwrap() >= 300.0, "{v}");
    }

    #[test]
    fn cpu_window_counts_a_busy_server_process() {
        let _one = ONE_WINDOW_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut spinner = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().expect("sh");
        let w = CpuWindow::start(Some(spinner.id()));
        std::thread::sleep(Duration::from_millis(600));
        let v = w.end(1);
        let _ = spinner.kill();
        let _ = spinner.wait();
        // The shell spun for 0.6 s (on a core of its own or sharing one); this thread slept.
        let server = v["secs"]["server"].as_f64().unwrap();
        assert!((0.2..1.5).contains(&server), "{v}");
        assert!(v["secs"]["clients"].as_f64().unwrap() < 0.1, "{v}");
    }
}
