//! The processes a scenario runs: a child `tidings up` ([`Proc`]), its arguments, and an
//! all-stages stack on its own topics and database ([`Stack`]).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// A child `tidings up`; killed when dropped.
pub(super) struct Proc {
    pub(super) name: String,
    pub(super) child: Child,
    pub(super) dir: PathBuf,
}

impl Proc {
    pub(super) fn spawn(
        bin: &Path,
        name: &str,
        root: &Path,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<Proc> {
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

    pub(super) async fn endpoints(&mut self) -> anyhow::Result<Value> {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn term(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid().to_string()).status();
    }

    /// SIGTERM, then up to 20 s for a clean exit (dropping it kills it after that).
    pub(super) async fn shutdown(&mut self) {
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
pub(super) fn up_args(
    brokers: Option<&str>,
    prefix: Option<&str>,
    topology: &Path,
    db: &str,
    stages: &str,
) -> Vec<String> {
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
pub(super) struct Stack {
    pub(super) proc: Proc,
    pub(super) url: String,
    /// HTTP ingest (the dev service token posts there).
    pub(super) ingest: String,
    /// What it runs on (the mock cluster's listener when embedded), from its endpoints.json.
    pub(super) brokers: String,
    pub(super) prefix: String,
    /// Its embedded schema registry, where upstream producers look their schemas up.
    pub(super) registry: String,
}

impl Stack {
    pub(super) async fn start(
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
        let registry = field("schema_registry_url");
        wait_ready(http, &url, Duration::from_secs(120)).await?;
        Ok(Stack { proc, url, ingest, brokers, prefix, registry })
    }
}

pub(super) fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

pub(super) async fn wait_ready(http: &reqwest::Client, url: &str, timeout: Duration) -> anyhow::Result<()> {
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
