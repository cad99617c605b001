//! Campaign fan-out, end to end through the real `tidings up` binary: one CampaignLaunched event for
//! a stored 100,000-user segment, timed from the ingest POST until every notification is in
//! PostgreSQL (after a one-event warm-up, so group joins are not counted). Mock Kafka unless
//! TIDINGS_TEST_BROKERS names a cluster. Prints one JSON line. Env: BENCH_AUDIENCE (default 100000).

// The benches' shared `main`, kept beside tidings-core's bench (see its module documentation).
#[path = "../../pipeline/core/benches/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::BoxError;
use tidings_store::Store;
use tokio::process::{Child, Command};

const SEGMENT: &str = "bench-fanout";
/// How long `tidings up` may take to write its endpoints file and report ready.
const STARTUP_LIMIT: Duration = Duration::from_secs(120);
/// How long the fan-out may take before the bench gives up.
const FANOUT_LIMIT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_millis(100);

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Fails with the child's log if it has exited.
fn ensure_running(child: &mut Child, log: &Path) -> Result<(), BoxError> {
    if let Some(status) = child.try_wait()? {
        return Err(format!("tidings up exited early ({status}):\n{}", log_tail(log)).into());
    }
    Ok(())
}

/// Waits for `<data-dir>/endpoints.json` and returns the gateway's base URL.
/// The gateway's and the ingest listener's URLs, once `up` has written them.
async fn wait_for_gateway(child: &mut Child, data_dir: &Path, log: &Path) -> Result<(String, String), BoxError> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    let file = data_dir.join("endpoints.json");
    loop {
        ensure_running(child, log)?;
        if let Ok(text) = std::fs::read(&file) {
            // The file may be caught half-written; the next poll sees it whole.
            if let Ok(v) = serde_json::from_slice::<Value>(&text) {
                let url = |k: &str| v.get(k).and_then(Value::as_str).filter(|h| !h.is_empty()).map(str::to_string);
                if let (Some(http), Some(ingest)) = (url("http"), url("ingest")) {
                    return Ok((http, ingest));
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!("no endpoints file after {STARTUP_LIMIT:?}:\n{}", log_tail(log)).into());
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_ready(http: &reqwest::Client, base: &str, child: &mut Child, log: &Path) -> Result<(), BoxError> {
    let deadline = Instant::now() + STARTUP_LIMIT;
    loop {
        ensure_running(child, log)?;
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("not ready after {STARTUP_LIMIT:?}:\n{}", log_tail(log)).into());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// SIGTERM, then wait for a clean exit; SIGKILL if it outlives the grace period.
async fn stop(child: &mut Child) -> Result<(), BoxError> {
    let Some(pid) = child.id() else { return Ok(()) };
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    match tokio::time::timeout(Duration::from_secs(30), child.wait()).await {
        Ok(status) => {
            status?;
        }
        Err(_) => {
            child.kill().await?;
        }
    }
    Ok(())
}

/// A running `tidings up` and what the bench reaches it through.
struct Run<'a> {
    store: &'a Store,
    http: &'a reqwest::Client,
    base: &'a str,
    child: &'a mut Child,
    log: &'a Path,
}

impl Run<'_> {
    /// POSTs `event` to the ingest and polls the store every 100 ms until it holds `target`
    /// notifications; returns the seconds from just before the POST.
    async fn post_and_wait(
        &mut self,
        topic: &str,
        event: &Value,
        target: u64,
        limit: Duration,
    ) -> Result<f64, BoxError> {
        let started = Instant::now();
        let resp = self
            .http
            .post(format!("{}/v1/events/{topic}", self.base))
            .bearer_auth(tidings_gateway::service_auth::DEV_SERVICE_TOKEN)
            .json(event)
            .send()
            .await?;
        if !resp.status().is_success() {
            let status = resp.status();
            return Err(format!("POST /v1/events/{topic}: {status}: {}", resp.text().await.unwrap_or_default()).into());
        }
        loop {
            let stored = self.store.count_notifications().await?;
            if stored >= target {
                return Ok(started.elapsed().as_secs_f64());
            }
            if started.elapsed() > limit {
                return Err(format!(
                    "only {stored} of {target} notifications after {limit:?}:\n{}",
                    log_tail(self.log)
                )
                .into());
            }
            ensure_running(self.child, self.log)?;
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Starts the binary, fires the campaign, polls the store; returns the wall time in seconds.
async fn fanout(
    store: &Store,
    url: &str,
    audience: u64,
    brokers: Option<&str>,
    data_dir: &Path,
) -> Result<f64, BoxError> {
    let topology = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
    let prefix = format!("bench{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let log = data_dir.join("tidings-up.log");
    let log_file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
    cmd.arg("up")
        .arg("--database-url")
        .arg(url)
        .args(["--http", "127.0.0.1:0", "--registry-listen", "127.0.0.1:0", "--ingest-listen", "127.0.0.1:0", "--dev"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--topic-prefix")
        .arg(&prefix)
        .arg("--topology")
        .arg(&topology);
    // Settings from the caller's environment must not change what is measured or reported.
    for var in ["TIDINGS_BROKERS", "TIDINGS_SCHEMA_REGISTRY_URL", "TIDINGS_STAGES", "TIDINGS_DATABASE_URL"] {
        cmd.env_remove(var);
    }
    if let Some(b) = brokers {
        cmd.arg("--brokers").arg(b);
    }
    let mut child =
        cmd.stdin(Stdio::null()).stdout(log_file.try_clone()?).stderr(log_file).kill_on_drop(true).spawn()?;

    let result: Result<f64, BoxError> = async {
        let (gateway, base) = wait_for_gateway(&mut child, data_dir, &log).await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        wait_ready(&http, &gateway, &mut child, &log).await?;

        // Warm-up: one coupon for a user outside the segment, so consumer-group joins and the
        // first registry lookups are done before the clock starts; the figure is the fan-out itself.
        let warmup = json!({
            "event_id": uuid::Uuid::new_v4().to_string(),
            "occurred_at": chrono::Utc::now().timestamp_micros(),
            "coupon_id": format!("warmup-{prefix}"),
            "locale": "en",
            "payload": {"CouponIssued": {
                "user_id": "bench-warmup", "code": "WARMUP", "discount_percent": 5,
                "expires_at": chrono::Utc::now().timestamp_micros() + 86_400_000_000i64,
            }},
        });
        let mut run = Run { store, http: &http, base: &base, child: &mut child, log: &log };
        run.post_and_wait("coupons", &warmup, 1, STARTUP_LIMIT).await?;

        let campaign = format!("camp-{prefix}");
        let event = json!({
            "event_id": uuid::Uuid::new_v4().to_string(),
            "occurred_at": chrono::Utc::now().timestamp_micros(),
            "coupon_id": campaign,
            "locale": "en",
            "payload": {"CampaignLaunched": {
                "campaign_id": campaign,
                "title": "Weekend sale",
                "discount_percent": 20,
                "audience": {"SegmentAudience": {"segment": SEGMENT}},
            }},
        });
        run.post_and_wait("coupons", &event, 1 + audience, FANOUT_LIMIT).await
    }
    .await;
    let stopped = stop(&mut child).await;
    let wall = result?;
    stopped?;
    Ok(wall)
}

async fn bench() -> Result<Value, BoxError> {
    let audience = support::env_usize("BENCH_AUDIENCE", 100_000)? as u64;
    let brokers = std::env::var("TIDINGS_TEST_BROKERS").ok().filter(|b| !b.is_empty());
    let (store, url) = tidings_store::testing::fresh_postgres().await?;
    let data_dir: PathBuf = std::env::temp_dir().join(format!("tidings-fanout-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data_dir)?;

    let result = async {
        let users: Vec<String> = (0..audience).map(|i| format!("u{i:06}")).collect();
        let added = store.add_segment_members(SEGMENT, &users).await?;
        if added != audience {
            return Err(format!("segment holds {added} new users, expected {audience}").into());
        }
        fanout(&store, &url, audience, brokers.as_deref(), &data_dir).await
    }
    .await;
    let dropped = tidings_store::testing::drop_postgres(store, &url).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    let wall = result?;
    dropped?;
    Ok(json!({
        "bench": "campaign_fanout",
        "audience": audience,
        "wall_s": (wall * 1000.0).round() / 1000.0,
        "notifications_per_s": (audience as f64 / wall).round(),
        "broker": if brokers.is_some() { "kafka" } else { "mock" },
    }))
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread();
    support::main("fanout", include_str!("fanout.rs"), runtime, bench)
}
