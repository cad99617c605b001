//! Shared helpers for the integration tests that run the real `tidings` binary against a real
//! broker (`TIDINGS_TEST_BROKERS`: Apache Kafka in CI) and a fresh PostgreSQL database: process
//! guards that always kill their child, bounded waits that fail with the child's log, Kafka probes.
#![allow(dead_code)] // Each test binary uses a different subset.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use serde::Deserialize;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use tidings_core::testing::brokers_or_skip;

pub mod browser;

/// A topic prefix no other test run shares, so tests can run side by side on one broker.
pub fn unique_prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t{}.", &id[..8])
}

/// A fresh, migrated PostgreSQL database: its pool and URL.
pub async fn fresh_pg() -> (sqlx::PgPool, String) {
    let (store, url) = tidings_store::testing::fresh_postgres().await.unwrap_or_else(|e| {
        panic!("cannot create a test database (is PostgreSQL at TIDINGS_TEST_PG / 127.0.0.1:5432 up?): {e}")
    });
    match store {
        tidings_store::Store::Postgres(pool) => (pool, url),
        tidings_store::Store::Sqlite(_) => panic!("fresh_postgres returned a SQLite store"),
    }
}

pub fn topology_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml")
}

/// What `tidings up` wrote to `<data-dir>/endpoints.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Endpoints {
    pub brokers: String,
    pub schema_registry_url: String,
    pub database_url: String,
    pub http: String,
    /// HTTP ingest (services); post with [`ingest_token`].
    pub ingest: String,
    pub topic_prefix: String,
}

/// The service token a `tidings up --dev` accepts on its ingest listener.
pub fn ingest_token() -> &'static str {
    tidings_gateway::service_auth::DEV_SERVICE_TOKEN
}

/// How to start one `tidings up`.
pub struct Up<'a> {
    pub brokers: &'a str,
    pub database_url: &'a str,
    pub prefix: &'a str,
    pub stages: &'a str,
    /// External registry; `None` makes the process serve the embedded one.
    pub registry_url: Option<&'a str>,
}

impl<'a> Up<'a> {
    /// Every stage in one process, with its embedded registry.
    pub fn all(brokers: &'a str, database_url: &'a str, prefix: &'a str) -> Self {
        Up { brokers, database_url, prefix, stages: "templating,persistence,gateway", registry_url: None }
    }

    /// The core of a multi-gateway test: registry, topics, templating, persistence and HTTP
    /// ingest, up while gateways come and go.
    pub fn core(brokers: &'a str, database_url: &'a str, prefix: &'a str) -> Self {
        Up { brokers, database_url, prefix, stages: "templating,persistence,ingest", registry_url: None }
    }

    /// A gateway beside a [`Up::core`], using its registry.
    pub fn gateway(brokers: &'a str, database_url: &'a str, prefix: &'a str, registry_url: &'a str) -> Self {
        Up { brokers, database_url, prefix, stages: "gateway", registry_url: Some(registry_url) }
    }
}

/// `Ok` once the gateway at `url` answers `/readyz` with 200; else what it answered.
pub async fn ready(http: &reqwest::Client, url: &str) -> Result<(), String> {
    match http.get(format!("{url}/readyz")).send().await {
        Ok(r) if r.status() == 200 => Ok(()),
        Ok(r) => Err(format!("{url}: {} {}", r.status(), r.text().await.unwrap_or_default())),
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// Waits (60 s at most) until the gateway at `url` is ready.
pub async fn await_ready(http: &reqwest::Client, url: &str, procs: &[&Tidings]) {
    eventually("the gateway to be ready", Duration::from_secs(60), Duration::from_millis(200), procs, || {
        ready(http, url)
    })
    .await;
}

/// SIGTERM, and the process must exit 0 within 20 s.
pub async fn sigterm(g: &mut Tidings) {
    g.signal("TERM");
    let status = g.wait_exit(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{} did not exit 0 after SIGTERM: {status:?}\n{}",
        g.name,
        g.log_tail(40)
    );
}

/// The value of one sample of the gateway's `/metrics`: `sample` is its name with any labels as
/// written there, e.g. `tidings_stage_records_in_total{stage="templating"}`.
pub async fn metric(http: &reqwest::Client, url: &str, sample: &str) -> Result<f64, String> {
    let text = http.get(format!("{url}/metrics")).send().await.map_err(|e| format!("{url}: {e}"))?;
    let text = text.text().await.map_err(|e| format!("{url}: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("{url}: no {sample} in /metrics"))
}

/// A running `tidings up`. Dropping it SIGKILLs the process if it is still alive, so a failing
/// test never leaves children behind.
pub struct Tidings {
    pub name: String,
    child: Child,
    log: PathBuf,
    data_dir: tempfile::TempDir,
}

impl Tidings {
    pub fn spawn(name: &str, up: &Up<'_>) -> Tidings {
        Self::spawn_env(name, up, &[])
    }

    /// Like `spawn`, with extra environment variables (the `TIDINGS_*` settings of `up`).
    pub fn spawn_env(name: &str, up: &Up<'_>, env: &[(&str, &str)]) -> Tidings {
        Self::spawn_at(name, up, env, "127.0.0.1:0")
    }

    /// Like `spawn_env`, with the gateway on `http` (a fixed port, for a restart on the same URL).
    pub fn spawn_at(name: &str, up: &Up<'_>, env: &[(&str, &str)], http: &str) -> Tidings {
        let data_dir = tempfile::Builder::new().prefix(&format!("tidings-{name}-")).tempdir().expect("temp dir");
        let log = data_dir.path().join("tidings.log");
        let out = File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
        cmd.arg("up")
            .args(["--brokers", up.brokers])
            .args(["--database-url", up.database_url])
            .args(["--topic-prefix", up.prefix])
            .args(["--http", http, "--registry-listen", "127.0.0.1:0", "--ingest-listen", "127.0.0.1:0"])
            // The dev user secret and the dev ingest token (`DEV_SERVICE_TOKEN`); a test of the
            // refusals outside dev mode passes TIDINGS_DEV=false.
            .env("TIDINGS_DEV", "true")
            .arg("--data-dir")
            .arg(data_dir.path())
            .args(["--stages", up.stages])
            .arg("--topology")
            .arg(topology_path())
            .env("TIDINGS_LOG", "info,librdkafka=warn,rdkafka=warn,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if let Some(r) = up.registry_url {
            cmd.args(["--schema-registry-url", r]);
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {}: {e}", env!("CARGO_BIN_EXE_tidings")));
        Tidings { name: name.to_string(), child, log, data_dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last `lines` lines of the process's combined stdout/stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("---- last {lines} log lines of {} (pid {}) ----\n{tail}\n----", self.name, self.pid())
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (bounded) until the process has written its endpoints file, i.e. it is up.
    pub async fn endpoints(&mut self, timeout: Duration) -> Endpoints {
        let path = self.data_dir.path().join("endpoints.json");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(text) = std::fs::read(&path) {
                if let Ok(e) = serde_json::from_slice::<Endpoints>(&text) {
                    return e;
                }
            }
            if let Some(status) = self.exited() {
                panic!("{} exited ({status}) before writing {}\n{}", self.name, path.display(), self.log_tail(40));
            }
            if Instant::now() > deadline {
                panic!("{} did not write {} within {timeout:?}\n{}", self.name, path.display(), self.log_tail(40));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends a signal with the `kill` command (`TERM`, `KILL`, …).
    pub fn signal(&self, sig: &str) {
        let status =
            Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status().expect("running kill");
        assert!(status.success(), "kill -{sig} {} failed: {status}", self.pid());
    }

    /// `kill -9`, then reaps the process.
    pub fn kill9(&mut self) {
        if self.exited().is_none() {
            self.signal("KILL");
        }
        let _ = self.child.wait();
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tidings {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Polls `check` every `every` until it yields `Ok`, or panics after `timeout` with the last
/// observed state and the tails of the given processes' logs.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    procs: &[&Tidings],
    mut check: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(v) => return v,
            Err(state) => state,
        };
        if Instant::now() > deadline {
            let logs: Vec<String> = procs.iter().map(|p| p.log_tail(40)).collect();
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}\n{}", logs.join("\n"));
        }
        tokio::time::sleep(every).await;
    }
}

/// Enqueues `rec` on `producer`, waiting while librdkafka's queue is full; panics on any other
/// error (with `what` in the message).
pub async fn send_when_room(
    producer: &rdkafka::producer::FutureProducer,
    mut rec: rdkafka::producer::FutureRecord<'_, str, [u8]>,
    what: &str,
) -> rdkafka::producer::DeliveryFuture {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    loop {
        match producer.send_result(rec) {
            Ok(d) => return d,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => panic!("producing {what}: {e}"),
        }
    }
}

pub async fn count_notifications(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM notifications").fetch_one(pool).await.expect("count notifications")
}

/// Per-partition high watermarks of `topic` (partition index = position).
pub async fn high_watermarks(brokers: &str, topic: &str) -> Vec<i64> {
    let (brokers, topic) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", format!("probe-{}", uuid::Uuid::new_v4().simple()))
            .create()
            .expect("probe consumer");
        let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).expect("metadata");
        let parts = md.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
        assert!(parts > 0, "topic {topic} has no partitions");
        (0..parts as i32)
            .map(|p| consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)).expect("watermarks").1)
            .collect()
    })
    .await
    .expect("watermark probe")
}

/// The topics on the broker whose names start with `prefix`.
pub fn topics_with_prefix(brokers: &str, prefix: &str) -> Vec<String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("probe-{}", uuid::Uuid::new_v4().simple()))
        .create()
        .expect("probe consumer");
    let md = consumer.fetch_metadata(None, Duration::from_secs(10)).expect("metadata");
    md.topics().iter().map(|t| t.name().to_string()).filter(|n| n.starts_with(prefix)).collect()
}

/// Debian's Chromium (or `CHROMIUM`), for the browser tests.
pub fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| "/usr/bin/chromium".into())
}

/// The node project of the browser tests' drivers (playwright-core, `compose/install-browser.sh`).
pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Whether Chromium and playwright-core are installed; under CI their absence is a failure.
pub fn browser_or_skip() -> bool {
    let missing: Vec<String> = [chromium(), browser_dir().join("node_modules/playwright-core/package.json")]
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("missing {missing:?} but CI is set: run `bash compose/install-browser.sh` (as .ci/test does)");
    }
    eprintln!("skipped: missing {missing:?} (bash compose/install-browser.sh installs them)");
    false
}

/// `tidings up --dev` on its embedded defaults (mock Kafka, SQLite, embedded registry) in the data
/// directory `data`, every listener on a port of its choosing (see `endpoints.json`); stdin and
/// stdout closed, stderr to `log`.
pub fn embedded_up(data: &Path, log: File) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
    cmd.env("TIDINGS_DATA_DIR", data)
        .env_remove("TIDINGS_BROKERS")
        .env_remove("TIDINGS_DATABASE_URL")
        .args(["up", "--dev", "--http", "127.0.0.1:0", "--registry-listen", "127.0.0.1:0"])
        .args(["--ingest-listen", "127.0.0.1:0", "--topology"])
        .arg(topology_path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    cmd
}

/// A [`embedded_up`] in a temporary directory of its own, killed on drop.
pub struct Embedded {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Embedded {
    /// Starts one (`prefix` names its directory) and waits (60 s at most) for its
    /// `endpoints.json`: the process and what that file says.
    pub async fn start(prefix: &str) -> (Embedded, serde_json::Value) {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let log = File::create(dir.path().join("up.log")).unwrap();
        let child = embedded_up(dir.path(), log).spawn().unwrap();
        let mut up = Embedded { child, dir };
        let path = up.dir.path().join("endpoints.json");
        for _ in 0..600 {
            if let Ok(Ok(ep)) = std::fs::read(&path).map(|t| serde_json::from_slice::<serde_json::Value>(&t)) {
                return (up, ep);
            }
            if let Some(status) = up.child.try_wait().unwrap() {
                panic!("tidings up exited ({status}):\n{}", up.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("tidings up did not start within 60 s:\n{}", up.log());
    }

    /// Its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }
}

/// The JSON answer of a GET of `url` with the bearer `token`; an error unless it succeeded.
pub async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> Result<serde_json::Value, String> {
    let r = http.get(url).bearer_auth(token).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("{url}: {}", r.status()));
    }
    r.json().await.map_err(|e| e.to_string())
}

/// The `source_event_id`s of `user`'s stored inbox (`GET /v1/notifications` on the gateway at `url`).
pub async fn stored_sources(http: &reqwest::Client, url: &str, user: &str) -> Result<Vec<String>, String> {
    let body = get_json(http, &format!("{url}/v1/notifications"), &user_token(user)).await?;
    Ok(body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["source_event_id"].as_str().map(str::to_owned))
        .collect())
}

/// A port free right now (a gateway restarted on the same URL binds it again).
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768-60999 by default): a port it hands out for a `:0`
    // bind or an outgoing connection can be taken by another test between this check and the
    // process under test binding it (seen in CI: "Address already in use").
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id();
    loop {
        let port = 20_000 + (seed.wrapping_mul(7919).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000);
        let port = u16::try_from(port).expect("under 32,000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A user token signed with the dev secret (what `tidings up --dev` accepts).
pub fn user_token(user: &str) -> String {
    let secret = tidings_gateway::auth::DEV_SECRET.as_bytes();
    tidings_gateway::auth::mint_hs256(secret, user, Duration::from_secs(3600), None, None).unwrap()
}

/// The events of one user's stream, collected in the background: (event name, data, SSE id).
/// A block with an id and no event (the stream's opening position) is kept with an empty name.
#[derive(Clone, Default)]
pub struct Seen(pub std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value, String)>>>);

impl Seen {
    /// The chat events (`chat.*`) with their data.
    pub fn chat(&self) -> Vec<(String, serde_json::Value)> {
        self.named(|e| e.starts_with("chat."))
    }

    /// The events whose name passes `keep`, with their data.
    pub fn named(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, serde_json::Value)> {
        let seen = self.0.lock().unwrap();
        seen.iter().filter(|(e, ..)| keep(e)).map(|(e, v, _)| (e.clone(), v.clone())).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.0.lock().unwrap().iter().filter(|(e, ..)| !e.is_empty()).map(|(e, ..)| e.clone()).collect()
    }

    /// The id of the last event that had one (what EventSource sends as Last-Event-ID).
    pub fn last_id(&self) -> Option<String> {
        self.0.lock().unwrap().iter().rev().find(|(.., id)| !id.is_empty()).map(|(.., id)| id.clone())
    }
}

/// Opens `user`'s `GET /v1/stream` on the gateway at `base` (from `last_event_id`, if given) and
/// collects its events in the background. A 503 (a rebalance right after the group formed) is
/// waited out, as EventSource does.
pub async fn open_stream(http: &reqwest::Client, base: &str, user: &str, last_event_id: Option<&str>) -> Seen {
    let seen = Seen::default();
    let mut tries = 0;
    let mut resp = loop {
        let mut req = http.get(format!("{base}/v1/stream")).bearer_auth(user_token(user));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.unwrap();
        tries += 1;
        if resp.status() == 503 && tries < 20 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        break resp;
    };
    assert_eq!(resp.status(), 200, "stream of {user}");
    let out = seen.clone();
    tokio::spawn(async move {
        let mut buf = String::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let (mut event, mut data, mut id) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.to_string();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = v.to_string();
                    }
                }
                if !event.is_empty() || !id.is_empty() {
                    out.0.lock().unwrap().push((
                        event,
                        serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
                        id,
                    ));
                }
            }
        }
    });
    seen
}

/// POSTs `body` to ingest's `/v1/events/{topic}` at `base` with the dev service token: the status
/// and the JSON answer (null if none).
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    topic: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let resp = http
        .post(format!("{base}/v1/events/{topic}"))
        .bearer_auth(ingest_token())
        .json(body)
        .send()
        .await
        .expect("POST to ingest");
    let status = resp.status().as_u16();
    let body = resp.json::<serde_json::Value>().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// [`post`], which must be accepted (202); else fails with the answer and `proc_`'s log.
pub async fn accept(http: &reqwest::Client, base: &str, topic: &str, body: &serde_json::Value, proc_: &Tidings) {
    let (status, resp) = post(http, base, topic, body).await;
    assert_eq!(status, 202, "POST /v1/events/{topic} answered {status}: {resp}\n{}", proc_.log_tail(30));
}
