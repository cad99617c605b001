//! The gateway benchmark: starts real `tidings up` processes on a broker (tansu in practice), holds
//! SSE connections and measures memory per connection and produce-to-receipt latency. Prints one
//! JSON line per scenario. Latency is receipt time minus the notification's `occurred_at`, which
//! the benchmark sets when it produces (same machine, same clock).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, Notification, RegistryClient};
use tidings_loadgen::Totals;
use tokio_util::sync::CancellationToken;

use crate::{start_clients, user_id, Fleet};

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
    /// Scenarios to run, comma-separated: idle, fanout, campaign, sustained, multi.
    #[arg(long, value_delimiter = ',', default_value = "idle,fanout,campaign,sustained,multi")]
    scenarios: Vec<String>,
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
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
    let Ok(r) = http.get(format!("{url}/metrics")).send().await else { return 0.0 };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Latency samples (µs) of the current phase.
#[derive(Default)]
struct Samples {
    phase: AtomicU8,
    by_phase: Mutex<HashMap<u8, Vec<i64>>>,
}

impl Samples {
    fn record(&self, v: &Value) {
        let Some(at) = v["occurred_at"].as_str().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()) else {
            return;
        };
        let lat = now_micros() - at.timestamp_micros();
        let phase = self.phase.load(Ordering::Relaxed);
        self.by_phase.lock().unwrap().entry(phase).or_default().push(lat);
    }

    fn count(&self, phase: u8) -> usize {
        self.by_phase.lock().unwrap().get(&phase).map_or(0, Vec::len)
    }

    fn summary(&self, phase: u8) -> Value {
        let mut v = self.by_phase.lock().unwrap().get(&phase).cloned().unwrap_or_default();
        v.sort_unstable();
        let pct = |q: f64| -> f64 {
            if v.is_empty() {
                return f64::NAN;
            }
            let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
            v[i] as f64 / 1000.0
        };
        json!({
            "received": v.len(),
            "latency_ms": { "p50": pct(0.50), "p99": pct(0.99), "p999": pct(0.999), "max": pct(1.0) },
        })
    }
}

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
    }
}

fn emit(v: Value) {
    println!("{v}");
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
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
    let db = format!("sqlite://{}/bench.db", root.path().display());
    let base = |stages: &str| -> Vec<String> {
        [
            "up",
            "--brokers",
            &args.brokers,
            "--topic-prefix",
            &prefix,
            "--topology",
            topology.to_str().unwrap_or("topology.yaml"),
            "--database-url",
            &db,
            "--stages",
            stages,
            "--http",
            "127.0.0.1:0",
            "--registry-listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let run = |s: &str| args.scenarios.iter().any(|x| x == s);
    let http = reqwest::Client::new();
    eprintln!("bench: prefix {prefix}, work dir {}", root.path().display());

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
        let url = gw.endpoints().await?["http"].as_str().unwrap_or_default().to_string();
        wait_ready(&http, &url, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let baseline = rss_bytes(gw.pid());

        let stop = CancellationToken::new();
        let totals = Arc::new(Totals::default());
        let samples = Arc::new(Samples::default());
        let cb = {
            let s = samples.clone();
            Arc::new(move |v: &Value| s.record(v)) as Arc<dyn Fn(&Value) + Send + Sync>
        };
        let n = args.idle;
        let t = Instant::now();
        let clients = start_clients(
            &Fleet {
                gateways: std::slice::from_ref(&url),
                prefix: "b",
                secret: tidings_gateway::auth::DEV_SECRET,
                ramp: 4000,
            },
            0,
            n,
            &stop,
            &totals,
            cb,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(300);
        while (totals.connected.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let connected = totals.connected.load(Ordering::Relaxed) as usize;
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
            let users: Vec<String> = (0..connected).map(|i| user_id("b", i)).collect();
            let campaign = format!("bench-camp-{}", uuid::Uuid::new_v4().simple());
            let body = json!({
                "event_id": campaign.clone(), "occurred_at": now_micros(), "coupon_id": campaign.clone(),
                "payload": {"CampaignLaunched": {"campaign_id": campaign, "title": "Benchmark sale",
                    "discount_percent": 10, "audience": {"InlineAudience": {"user_ids": users}}}}
            });
            let t = Instant::now();
            let r = http.post(format!("{url}/v1/events/coupons")).json(&body).send().await?;
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
            let step = (args.rate / 100).max(1);
            let mut acks = Vec::with_capacity(total);
            for k in 0..total {
                acks.push(send(notification(&user_id("b", (k * 7919) % connected.max(1)), 1_000_000 + k)));
                if k % step == step - 1 {
                    let due = t + Duration::from_secs_f64((k + 1) as f64 / args.rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
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
        stop.cancel();
        for c in clients {
            let _ = c.await;
        }
        gw.term();
        let _ = tokio::time::timeout(Duration::from_secs(20), async {
            while gw.child.try_wait().ok().flatten().is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
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
    core.term();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while core.child.try_wait().ok().flatten().is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    Ok(())
}
