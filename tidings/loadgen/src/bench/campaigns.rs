//! The campaign benchmark on Apache Kafka and PostgreSQL (`.ci/bench-campaigns`). `csv_import`:
//! `tidings segment import` of a 1,000,000-row CSV (rows/s, the importer's peak RSS and CPU) against
//! psql `\copy` of the same file; `campaign_100k` / `campaign_1m`: a CampaignLaunched to a stored
//! segment produced straight to `campaigns`, timed until all are stored and the SSE users have it.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, RegistryClient};
use tidings_loadgen::percentiles;

use super::claims::{drop_database, fresh_database, with_log};
use super::cpu::{box_ticks, CpuWindow};
use super::report::report;
use super::users::Users;
use super::{now_micros, up_args, wait_ready, Proc};

/// User ids are `c000000`, `c000001`, …: the SSE users (`Users` with this prefix) are the first ones.
pub(super) const USER_PREFIX: &str = "c";

/// The sizes issue 25 states its aims for; other sizes report their times with `met: null`.
const AIM_USERS: usize = 100_000;
const AIM_SSE_USERS: usize = 10_000;
const AIM_BIG_USERS: usize = 1_000_000;
const AIM_STORED: Duration = Duration::from_secs(2);
const AIM_DELIVERED: Duration = Duration::from_secs(3);
const AIM_BIG_STORED: Duration = Duration::from_secs(20);

/// The campaign scenarios' settings (flags of `bench`).
#[derive(Debug, Clone)]
pub struct CampaignOpts {
    /// Rows of csv_import's CSV file.
    pub import_rows: usize,
    /// campaign_100k's segment size.
    pub users: usize,
    /// Connected SSE users (the segment's first ones) during the campaigns.
    pub sse_users: usize,
    /// campaign_1m's segment size.
    pub big_users: usize,
}

/// Where the scenarios run: one fresh PostgreSQL database for the segments, the peer's tables
/// and the campaigns, one topic prefix.
pub(super) struct Env<'a> {
    pub(super) bin: &'a Path,
    pub(super) root: &'a Path,
    pub(super) topology: &'a Path,
    pub(super) brokers: &'a str,
    pub(super) prefix: &'a str,
    pub(super) db: String,
    pub(super) pool: sqlx::PgPool,
    /// Segment sizes already imported (segment `bench-<size>`).
    pub(super) imported: HashSet<usize>,
}

/// Runs the named ones of csv_import, campaign_100k and campaign_1m, reporting each line.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    bin: &Path,
    root: &Path,
    topology: &Path,
    brokers: &str,
    prefix: &str,
    wanted: &dyn Fn(&str) -> bool,
    o: &CampaignOpts,
    results: &mut std::collections::HashMap<String, Value>,
) {
    let names = ["csv_import", "campaign_100k", "campaign_1m"];
    let (pool, db) = match fresh_database(4).await {
        Ok(x) => x,
        Err(e) => {
            for n in names.into_iter().filter(|n| wanted(n)) {
                report(results, n, Err(anyhow::anyhow!("a fresh PostgreSQL database: {e:#}")));
            }
            return;
        }
    };
    let mut env = Env { bin, root, topology, brokers, prefix, db, pool, imported: HashSet::new() };
    if wanted("csv_import") {
        let v = csv_import(&mut env, o.import_rows).await;
        report(results, "csv_import", v);
    }
    let campaigns: Vec<(&str, usize)> =
        [("campaign_100k", o.users), ("campaign_1m", o.big_users)].into_iter().filter(|(n, _)| wanted(n)).collect();
    if !campaigns.is_empty() {
        if let Err(e) = campaign_scenarios(&mut env, &campaigns, o.sse_users, results).await {
            for (n, _) in &campaigns {
                if !results.contains_key(*n) {
                    report(results, n, Err(anyhow::anyhow!("{e:#}")));
                }
            }
        }
    }
    drop_database(env.pool, &env.db).await;
}

/// User `i`'s id, as the SSE users name themselves.
fn user(i: usize) -> String {
    crate::user_id(USER_PREFIX, i)
}

/// The order the CSV lists users `0..n` in: a fixed scattered permutation (a real export is not
/// sorted by id, and the segment's primary key pays for that).
fn scattered(k: usize, n: usize) -> usize {
    // 7,919 is prime: k ↦ k·7,919 mod n is a permutation unless n is a multiple of it.
    let step = if n.is_multiple_of(7_919) { 1 } else { 7_919 };
    (k as u128 * step as u128 % n.max(1) as u128) as usize
}

/// Writes a CSV of users `0..n` (`user_id,email`, a header row) to `path`; answers its size.
fn write_csv(path: &Path, n: usize) -> anyhow::Result<u64> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    writeln!(w, "user_id,email")?;
    for k in 0..n {
        let u = user(scattered(k, n));
        writeln!(w, "{u},{u}@example.com")?;
    }
    w.flush()?;
    Ok(std::fs::metadata(path)?.len())
}

/// A child process watched to its end through /proc: wall time, peak RSS (VmHWM) and CPU.
pub(super) struct Watched {
    pub(super) status: ExitStatus,
    pub(super) secs: f64,
    pub(super) peak_rss_bytes: u64,
    pub(super) cpu_secs: f64,
}

/// A field of /proc/<pid>/status in kB, as bytes.
fn status_kb(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The state letter and user + system clock ticks of /proc/<pid>/stat.
fn stat_state_ticks(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((f.first()?.chars().next()?, ticks))
}

/// Runs `cmd` (output to `log`) and watches it every 10 ms until it exits: its peak RSS is the
/// last VmHWM read (a high-water mark, so at most the last 10 ms of growth are missed), its CPU
/// what /proc shows once it is a zombie (still unreaped, its times complete).
pub(super) async fn run_watched(mut cmd: Command, log: &Path) -> anyhow::Result<Watched> {
    let out = std::fs::File::create(log)?;
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id();
    let (mut peak, mut ticks) = (0u64, 0u64);
    let secs = loop {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            peak = peak.max(status_kb(&s, "VmHWM:").unwrap_or(0));
        }
        match stat_state_ticks(pid) {
            Some((state, t_now)) => {
                ticks = t_now;
                if state == 'Z' {
                    break t.elapsed().as_secs_f64();
                }
            }
            // Gone from /proc: reaped elsewhere (not expected); its CPU is what was last read.
            None => break t.elapsed().as_secs_f64(),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let status = child.wait()?;
    Ok(Watched { status, secs, peak_rss_bytes: peak, cpu_secs: ticks as f64 / 100.0 })
}

/// The CSV of users `0..n` in the work directory (written once).
fn csv_file(env: &Env<'_>, n: usize) -> anyhow::Result<(PathBuf, u64)> {
    let path = env.root.join(format!("users-{n}.csv"));
    if let Ok(m) = std::fs::metadata(&path) {
        return Ok((path, m.len()));
    }
    let t = Instant::now();
    let bytes = write_csv(&path, n)?;
    eprintln!("bench: wrote {} ({n} rows, {bytes} bytes) in {:.1} s", path.display(), t.elapsed().as_secs_f64());
    Ok((path, bytes))
}

pub(super) fn segment_name(n: usize) -> String {
    format!("bench-{n}")
}

/// `tidings segment import bench-<n>` of the CSV of users `0..n`, watched; checks the segment's
/// size afterwards.
pub(super) async fn import_segment(env: &mut Env<'_>, n: usize) -> anyhow::Result<(Watched, u64)> {
    let (file, bytes) = csv_file(env, n)?;
    let name = segment_name(n);
    let mut cmd = Command::new(env.bin);
    cmd.args(["segment", "import", &name])
        .arg(&file)
        .args(["--database-url", &env.db])
        .arg("--data-dir")
        .arg(env.root.join("segment-cli"))
        .env("TIDINGS_LOG", "warn");
    let log = env.root.join(format!("import-{n}.log"));
    let w = run_watched(cmd, &log).await?;
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    ensure!(w.status.success(), "tidings segment import exited {}: {}", w.status, out.trim());
    let (size,): (i64,) =
        sqlx::query_as("SELECT size FROM segments WHERE name = $1").bind(&name).fetch_one(&env.pool).await?;
    ensure!(size as usize == n, "segment {name} holds {size} users, not {n}: {}", out.trim());
    env.imported.insert(n);
    Ok((w, bytes))
}

/// Migrates the fresh database with the `tidings` binary under test (its own migrations, so a
/// binary of another commit runs on it too), outside any measured part.
pub(super) async fn migrate(env: &Env<'_>) -> anyhow::Result<()> {
    let mut cmd = Command::new(env.bin);
    cmd.args(["segment", "list", "--database-url", &env.db])
        .arg("--data-dir")
        .arg(env.root.join("segment-cli"))
        .env("TIDINGS_LOG", "warn");
    let w = run_watched(cmd, &env.root.join("migrate.log")).await?;
    ensure!(w.status.success(), "tidings segment list exited {}", w.status);
    Ok(())
}

/// psql `\copy` of `file` (CSV, with a header row if `header`) into `table` (made by `ddl`,
/// dropped afterwards), watched.
async fn psql_copy(
    env: &Env<'_>,
    table: &str,
    ddl: &str,
    file: &Path,
    n: usize,
    header: bool,
) -> anyhow::Result<Value> {
    sqlx::query(ddl).execute(&env.pool).await?;
    let copy = format!("\\copy {table} FROM '{}' WITH (FORMAT csv, HEADER {header})", file.display());
    let mut cmd = Command::new("psql");
    cmd.args([env.db.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &copy]);
    let w = run_watched(cmd, &env.root.join(format!("psql-{table}.log"))).await;
    let rows: Result<(i64,), _> = sqlx::query_as(&format!("SELECT count(*) FROM {table}")).fetch_one(&env.pool).await;
    sqlx::query(&format!("DROP TABLE {table}")).execute(&env.pool).await?;
    let w = w?;
    ensure!(w.status.success(), "psql \\copy into {table} exited {}", w.status);
    let (rows,) = rows?;
    ensure!(rows as usize == n, "psql \\copy stored {rows} rows, not {n}");
    Ok(json!({"table": ddl, "secs": w.secs, "rows_per_sec": (n as f64 / w.secs).round()}))
}

/// csv_import: `tidings segment import` of an `n`-row CSV on an idle box, then psql `\copy` of the
/// same file into a plain table and into one keyed by the user id.
async fn csv_import(env: &mut Env<'_>, n: usize) -> anyhow::Result<Value> {
    ensure!(n > 0, "--import-rows must be at least 1");
    migrate(env).await?;
    let (file, bytes) = csv_file(env, n)?;
    let (box0, t) = (box_ticks(), Instant::now());
    let (w, _) = import_segment(env, n).await?;
    let (box1, wall) = (box_ticks(), t.elapsed().as_secs_f64());
    let box_busy = (box1.0 - box0.0) as f64 / (box1.1 - box0.1).max(1) as f64;
    let rate = n as f64 / w.secs;
    let plain =
        psql_copy(env, "bench_peer_plain", "CREATE TABLE bench_peer_plain (user_id text, email text)", &file, n, true)
            .await
            .context("the psql \\copy peer (plain table)")?;
    let keyed = psql_copy(
        env,
        "bench_peer_keyed",
        "CREATE TABLE bench_peer_keyed (user_id text PRIMARY KEY, email text)",
        &file,
        n,
        true,
    )
    .await
    .context("the psql \\copy peer (keyed table)")?;
    let ratio = |peer: &Value| peer["rows_per_sec"].as_f64().map(|p| (rate / p * 100.0).round() / 100.0);
    Ok(json!({
        "scenario": "csv_import",
        "rows": n, "file_bytes": bytes,
        "rows_per_sec": rate.round(), "secs": w.secs,
        "peak_rss_mib": (w.peak_rss_bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
        "cpu": {"import_secs": w.cpu_secs, "import_us_per_row": (w.cpu_secs * 1e6 / n as f64 * 100.0).round() / 100.0,
            "box_busy": box_busy, "wall_secs": wall},
        "peer": {"psql_copy_plain": plain, "psql_copy_keyed": keyed},
        "ratio_to_psql_copy_plain": ratio(&plain),
        "ratio_to_psql_copy_keyed": ratio(&keyed),
        "aim": null,
        "note": "`tidings segment import bench-N users.csv --database-url …` as a child process on an idle box (the broker running, no tidings up), from spawn to exit (connect, migration check, streamed read, load, atomic switch); peak RSS = the child's VmHWM polled every 10 ms, CPU its user+system time; the CSV (user_id,email, a header row) lists users in a scattered order. Peer: psql \\copy of the same file into a plain two-column table and into one keyed by user_id (segment_members has a primary key), same PostgreSQL, same run; ratio = tidings rows/s ÷ psql rows/s. Issue 25 states no aim for the import.",
    }))
}

/// JSON of the campaigns schema → a framed record.
type Encode = Box<dyn Fn(&Value) -> anyhow::Result<Vec<u8>> + Send + Sync>;

/// The running `tidings up` the campaigns go through, and how a launch reaches it.
pub(super) struct Up {
    pub(super) proc_: Proc,
    pub(super) url: String,
    encode: Encode,
    producer: FutureProducer,
    campaigns_topic: String,
    notifications_topic: String,
    watermarks: BaseConsumer,
}

impl Up {
    pub(super) async fn start(env: &Env<'_>) -> anyhow::Result<Up> {
        let args =
            up_args(Some(env.brokers), Some(env.prefix), env.topology, &env.db, "templating,persistence,gateway");
        let mut proc_ = Proc::spawn(env.bin, "campaigns", env.root, &args, &[])?;
        let ep = proc_.endpoints().await.map_err(|e| with_log(e, &proc_))?;
        let url = ep["http"].as_str().unwrap_or_default().to_string();
        let http = reqwest::Client::new();
        wait_ready(&http, &url, Duration::from_secs(120)).await.map_err(|e| with_log(e, &proc_))?;
        let registry = RegistryClient::new(ep["schema_registry_url"].as_str().unwrap_or_default())?;
        let campaigns_topic = format!("{}campaigns", env.prefix);
        let (id, schema) = registry
            .latest(&format!("{campaigns_topic}-value"))
            .await
            .context("the campaigns schema in tidings' registry")?;
        let encoder = FramedEncoder::new(id, schema)?;
        let encode = Box::new(move |v: &Value| Ok(encoder.encode(json_to_avro(schema, v)?)?));
        let producer: FutureProducer = KafkaConfig::new(env.brokers).producer().create()?;
        let watermarks: BaseConsumer =
            KafkaConfig::new(env.brokers).consumer_with("bench-campaigns-watermarks", &[], &[]).create()?;
        Ok(Up {
            proc_,
            url,
            encode,
            producer,
            campaigns_topic,
            notifications_topic: format!("{}notifications", env.prefix),
            watermarks,
        })
    }

    /// Produces a CampaignLaunched (event id `campaign:<id>`) to `campaigns` as an upstream
    /// service would, occurred_at = `at_us`; answers once the broker acknowledged it.
    pub(super) async fn launch(
        &self,
        id: &str,
        segments: &[String],
        user_ids: &[String],
        at_us: i64,
    ) -> anyhow::Result<()> {
        let event = json!({
            "event_id": format!("campaign:{id}"), "occurred_at": at_us, "campaign_id": id,
            "payload": {"CampaignLaunched": {
                "category": "campaigns", "title": "Winter sale", "body": "Everything 20% off until Sunday.",
                "link": null, "default_locale": "en",
                "locales": [{"locale": "ko", "title": "겨울 세일", "body": "일요일까지 전 품목 20% 할인."}],
                "segments": segments, "user_ids": user_ids, "send_at": null, "launched_by": "bench",
            }},
        });
        let payload = (self.encode)(&event)?;
        self.producer
            .send(FutureRecord::to(&self.campaigns_topic).key(id).payload(&payload), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing the campaign: {e}"))?;
        Ok(())
    }

    /// The sum of the notifications topic's end offsets.
    fn notifications_end(&self) -> anyhow::Result<i64> {
        let topic = &self.notifications_topic;
        let md = self.watermarks.fetch_metadata(Some(topic), Duration::from_secs(10))?;
        let n = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
        let mut end = 0;
        for p in 0..n {
            end += self.watermarks.fetch_watermarks(topic, p, Duration::from_secs(10))?.1;
        }
        Ok(end)
    }
}

/// Starts `tidings up`, imports the segments, connects the SSE users, warms the path with a small
/// campaign, then runs each campaign scenario.
async fn campaign_scenarios(
    env: &mut Env<'_>,
    campaigns: &[(&str, usize)],
    sse: usize,
    results: &mut std::collections::HashMap<String, Value>,
) -> anyhow::Result<()> {
    if env.imported.is_empty() {
        migrate(env).await?;
    }
    for &(_, n) in campaigns {
        if !env.imported.contains(&n) {
            let (w, _) = import_segment(env, n).await.with_context(|| format!("importing a {n}-user segment"))?;
            eprintln!("bench: segment {} imported in {:.1} s", segment_name(n), w.secs);
        }
    }
    let up = Up::start(env).await?;
    let v = async {
        let mut users = Users::new(&up.url, USER_PREFIX);
        let connected = users.grow(sse, Duration::from_secs(120)).await;
        ensure!(connected >= sse, "{connected} of {sse} SSE users connected");
        eprintln!("bench: {connected} SSE users connected to {}", up.url);
        // Warm-up, unmeasured: a campaign to 1,000 users nobody is connected as (the broker's and
        // tidings' first records on these topics, the store's first pages).
        let warm: Vec<String> = (0..1_000).map(|i| format!("w{i:06}")).collect();
        let warm_id = format!("bench-warm-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        users.samples.phase.store(1, std::sync::atomic::Ordering::Relaxed);
        up.launch(&warm_id, &[], &warm, now_micros()).await?;
        wait_stored(env, &up, &warm_id, warm.len(), Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (phase, &(name, n)) in campaigns.iter().enumerate() {
            let v =
                campaign(env, &up, &users, 10 + phase as u8, name, n, sse).await.map_err(|e| with_log(e, &up.proc_));
            report(results, name, v);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        users.close().await;
        Ok(())
    }
    .await;
    let mut up = up;
    up.proc_.shutdown().await;
    v
}

/// A campaign's fan-out progress row (templating's checkpoint), times in µs.
#[derive(sqlx::FromRow, Default, Clone, Debug)]
pub(super) struct Progress {
    started_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
    produced: i64,
    held: i64,
    suppressed: i64,
}

async fn progress(pool: &sqlx::PgPool, id: &str) -> anyhow::Result<Option<Progress>> {
    Ok(sqlx::query_as(
        "SELECT started_at, updated_at, finished_at, produced, held, suppressed FROM campaign_progress WHERE campaign_id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The persistence stage's stored next offsets on the notifications topic, summed.
async fn stored_offsets(pool: &sqlx::PgPool, topic: &str) -> anyhow::Result<i64> {
    let (n,): (Option<i64>,) = sqlx::query_as("SELECT sum(next_offset)::bigint FROM sink_offsets WHERE topic = $1")
        .bind(topic)
        .fetch_one(pool)
        .await?;
    Ok(n.unwrap_or(0))
}

/// When (µs) the campaign was seen all stored: templating finished (every page acknowledged)
/// and persistence's stored offsets reached the notifications topic's end at that point. Watched
/// every 20 ms with two index lookups (counting the rows as they grow would load the database
/// being measured); `on_tick` runs at each look.
pub(super) async fn watch_stored(
    env: &Env<'_>,
    up: &Up,
    id: &str,
    timeout: Duration,
    mut on_tick: impl FnMut(Option<&Progress>),
) -> anyhow::Result<(i64, Progress)> {
    let deadline = Instant::now() + timeout;
    let mut end: Option<i64> = None;
    loop {
        let p = progress(&env.pool, id).await?;
        on_tick(p.as_ref());
        if let Some(p) = p.as_ref().filter(|p| p.finished_at.is_some()) {
            if end.is_none() {
                end = Some(up.notifications_end()?);
            }
            if end.is_some_and(|e| e > 0) {
                let stored = stored_offsets(&env.pool, &up.notifications_topic).await?;
                if stored >= end.unwrap_or(0) {
                    return Ok((now_micros(), p.clone()));
                }
            }
        }
        if Instant::now() > deadline {
            let (rows,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM notifications WHERE kind = 'campaign' AND source_event_id = $1")
                    .bind(format!("campaign:{id}"))
                    .fetch_one(&env.pool)
                    .await?;
            bail!("campaign {id} not all stored within {timeout:?}: progress {p:?}, {rows} rows stored");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) async fn wait_stored(env: &Env<'_>, up: &Up, id: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
    watch_stored(env, up, id, timeout, |_| {}).await?;
    let (rows,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM notifications WHERE kind = 'campaign' AND source_event_id = $1")
            .bind(format!("campaign:{id}"))
            .fetch_one(&env.pool)
            .await?;
    ensure!(rows as usize == n, "warm-up campaign: {rows} rows stored, not {n}");
    Ok(())
}

/// At most `max` of `items`, evenly spaced, the first and last kept.
fn thin<T: Copy>(items: &[T], max: usize) -> Vec<T> {
    if items.len() <= max || max < 2 {
        return items.to_vec();
    }
    (0..max).map(|i| items[i * (items.len() - 1) / (max - 1)]).collect()
}

/// CPU of what the tidings process waits on, beside it: every `postgres` process (the server the
/// tests share, so other databases' work counts too) and the benchmark's broker (its pid in
/// TIDINGS_BENCH_KAFKA_PID, which .ci/bench-campaigns sets).
pub(super) struct Beside {
    postgres: u64,
    kafka: Option<(u32, u64)>,
}

/// User + system ticks of every process named `postgres` (its live processes now).
fn postgres_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let comm = stat.split_once('(')?.1.rsplit_once(')')?.0;
            (comm == "postgres").then(|| stat_state_ticks(pid).map(|(_, t)| t)).flatten()
        })
        .sum()
}

impl Beside {
    pub(super) fn start() -> Beside {
        let kafka = std::env::var("TIDINGS_BENCH_KAFKA_PID").ok().and_then(|p| p.trim().parse::<u32>().ok());
        Beside { postgres: postgres_ticks(), kafka: kafka.and_then(|pid| Some((pid, stat_state_ticks(pid)?.1))) }
    }

    /// Seconds of CPU since `start` (PostgreSQL's: backends that ended in between are missed, and
    /// ones that started count whole).
    pub(super) fn end(self) -> Value {
        let postgres = postgres_ticks().saturating_sub(self.postgres) as f64 / 100.0;
        let kafka = self.kafka.and_then(|(pid, t)| Some(stat_state_ticks(pid)?.1.saturating_sub(t) as f64 / 100.0));
        json!({"postgres_secs": postgres, "kafka_broker_secs": kafka,
            "note": "CPU seconds over the same window: every postgres process of the shared server (other databases' too), the benchmark's broker"})
    }
}

/// The project's ceiling for persistence: psql `\copy` of the campaign's stored rows (exported
/// first, untimed) into a table like `notifications` with all its indexes, in one statement.
pub(super) async fn copy_peer(env: &Env<'_>, event_id: &str, n: usize) -> anyhow::Result<Value> {
    let file = env.root.join("campaign-rows.csv");
    let export = format!(
        "\\copy (SELECT * FROM notifications WHERE kind = 'campaign' AND source_event_id = '{}') TO '{}' WITH (FORMAT csv)",
        event_id.replace('\'', "''"),
        file.display()
    );
    let mut cmd = Command::new("psql");
    cmd.args([env.db.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &export]);
    let w = run_watched(cmd, &env.root.join("psql-export.log")).await?;
    ensure!(w.status.success(), "psql \\copy of the rows to a file exited {}", w.status);
    let ddl = "CREATE TABLE bench_peer_notifications (LIKE notifications INCLUDING ALL)";
    let v = psql_copy(env, "bench_peer_notifications", ddl, &file, n, false).await;
    let _ = std::fs::remove_file(&file);
    let mut v = v?;
    v["note"] = json!("psql \\copy (CSV) of the same rows into a table LIKE notifications INCLUDING ALL (its primary key and indexes), one statement, after the campaign with tidings idle");
    Ok(v)
}

/// Seconds from `from_us` to `to_us`.
fn secs(from_us: i64, to_us: i64) -> f64 {
    (to_us - from_us) as f64 / 1e6
}

fn ms(from_us: i64, to_us: i64) -> f64 {
    ((to_us - from_us) as f64 / 100.0).round() / 10.0
}

/// One measured campaign to segment `bench-<n>` while the first `sse` users are connected.
async fn campaign(
    env: &Env<'_>,
    up: &Up,
    users: &Users,
    phase: u8,
    name: &str,
    n: usize,
    sse: usize,
) -> anyhow::Result<Value> {
    let big = name == "campaign_1m";
    let id = format!("bench-{n}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let event_id = format!("campaign:{id}");
    let samples = &users.samples;
    samples.phase.store(phase, std::sync::atomic::Ordering::Relaxed);
    let cpu = CpuWindow::start(&[up.proc_.pid()]);
    let beside = Beside::start();
    let t0 = now_micros();
    up.launch(&id, &[segment_name(n)], &[], t0).await?;
    let acked = now_micros();
    let mut delivered_seen: Option<i64> = None;
    // (µs, users produced) at each change of templating's checkpoint.
    let mut produced: Vec<(i64, i64)> = Vec::new();
    let timeout = Duration::from_secs(if big { 600 } else { 120 });
    let (stored_seen, p) = watch_stored(env, up, &id, timeout, |p| {
        if delivered_seen.is_none() && samples.count(phase) >= sse {
            delivered_seen = Some(now_micros());
        }
        if let Some(p) = p.filter(|p| produced.last().is_none_or(|l| l.1 != p.produced)) {
            produced.push((now_micros(), p.produced));
        }
    })
    .await?;
    // The connected users: all of them, or up to 30 s more.
    let deadline = Instant::now() + Duration::from_secs(30);
    while samples.count(phase) < sse && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu.end(n);
    let beside = beside.end();

    let (rows, distinct, first, median, p90, last): (i64, i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT user_id), \
         (extract(epoch FROM min(stored_at)) * 1e6)::bigint, \
         (extract(epoch FROM percentile_disc(0.5) WITHIN GROUP (ORDER BY stored_at)) * 1e6)::bigint, \
         (extract(epoch FROM percentile_disc(0.9) WITHIN GROUP (ORDER BY stored_at)) * 1e6)::bigint, \
         (extract(epoch FROM max(stored_at)) * 1e6)::bigint \
         FROM notifications WHERE kind = 'campaign' AND source_event_id = $1",
    )
    .bind(&event_id)
    .fetch_one(&env.pool)
    .await?;

    // Rows by stored_at: persistence's transactions (stored_at is the transaction's start).
    let txs: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT (extract(epoch FROM stored_at) * 1e6)::bigint AS at, count(*) FROM notifications \
         WHERE kind = 'campaign' AND source_event_id = $1 GROUP BY at ORDER BY at",
    )
    .bind(&event_id)
    .fetch_all(&env.pool)
    .await?;
    let transactions: Vec<Value> = thin(&txs, 40).iter().map(|&(at, rows)| json!([ms(t0, at), rows])).collect();
    let timeline: Vec<Value> = thin(&produced, 25).iter().map(|&(at, n)| json!([ms(t0, at), n])).collect();

    let arrivals = samples.take(phase);
    let ours: Vec<i64> = arrivals.iter().filter(|a| a.source_event_id == event_id).map(|a| a.received_us).collect();
    let received = ours.len();
    let last_receipt = ours.iter().copied().max();
    let delivered_secs = (received >= sse).then(|| last_receipt.map(|r| secs(t0, r))).flatten();
    let stored_secs = secs(t0, stored_seen);
    let aimed = if big { n == AIM_BIG_USERS } else { n == AIM_USERS && sse == AIM_SSE_USERS };
    let stored_aim = if big { AIM_BIG_STORED } else { AIM_STORED };
    let stored_met = aimed.then_some(rows as usize == n && stored_secs <= stored_aim.as_secs_f64());
    let delivered_met = (!big && aimed).then(|| delivered_secs.is_some_and(|s| s <= AIM_DELIVERED.as_secs_f64()));
    let met = match (stored_met, delivered_met) {
        (Some(a), Some(b)) => Some(a && b),
        (a, None) => a,
        (None, b) => b,
    };
    let aim = if big {
        json!({"stored_secs": AIM_BIG_STORED.as_secs(), "users": AIM_BIG_USERS})
    } else {
        json!({"stored_secs": AIM_STORED.as_secs(), "delivered_secs": AIM_DELIVERED.as_secs(),
            "users": AIM_USERS, "connected": AIM_SSE_USERS})
    };
    let per_sec = |count: usize, from: i64, to: i64| (to > from).then(|| (count as f64 / secs(from, to)).round());
    // From the first transaction's start to the last one seen committed.
    let persistence_rate = per_sec(rows as usize, first, stored_seen);
    let peer = match copy_peer(env, &event_id, rows as usize).await {
        Ok(v) => v,
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    let finished = p.finished_at.unwrap_or(p.updated_at);
    let v = json!({
        "scenario": name,
        "users": n, "connected": sse, "campaign_id": id,
        "aim": aim, "met": met,
        "stored": {"secs": stored_secs, "met": stored_met, "rows": rows, "distinct_users": distinct},
        "delivered": {"secs": delivered_secs, "met": delivered_met, "received": received, "of": sse,
            "from_launch_ms": percentiles(ours.iter().map(|r| r - t0).collect())},
        "stages_ms": {
            "launch_acked": ms(t0, acked),
            "templating_started": ms(t0, p.started_at),
            "templating_finished": ms(t0, finished),
            "first_row_stored": ms(t0, first), "half_stored": ms(t0, median), "nine_tenths_stored": ms(t0, p90),
            "last_row_stored": ms(t0, last),
            "all_stored_seen": ms(t0, stored_seen),
            "note": "from the launch (just before producing): templating's campaign_progress started_at / finished_at (its clock), the stored_at (transaction start) of the first, median, 90th-percentile and last notification rows, and when the benchmark saw every row stored",
        },
        "rates": {
            "templating_users_per_sec": per_sec(n, p.started_at, finished),
            "persistence_rows_per_sec": persistence_rate,
            "psql_copy_rows_per_sec": peer["rows_per_sec"],
            "persistence_ratio_to_psql_copy": peer["rows_per_sec"].as_f64().zip(persistence_rate).map(|(p, r)| (r / p * 100.0).round() / 100.0),
        },
        "progress": {"produced": p.produced, "held": p.held, "suppressed": p.suppressed},
        "produced_timeline": {"ms_users": timeline, "note": "[ms after the launch, users produced] at each templating checkpoint the benchmark saw (every 20 ms), at most 25 shown"},
        "store_transactions": {"count": txs.len(), "ms_rows": transactions,
            "note": "[ms after the launch the transaction started, rows] per persistence transaction (rows grouped by stored_at), at most 40 shown"},
        "cpu": cpu,
        "cpu_beside": beside,
        "peer": peer,
        "note": "one `tidings up --stages templating,persistence,gateway` on Apache Kafka + PostgreSQL; the CampaignLaunched (segment bench-N imported by `tidings segment import`, templates without the recipient, a ko locale) produced straight to `campaigns` as an upstream service does, encoded with the schema tidings registered; stored = templating finished and persistence's stored offsets reached the notifications topic's end, watched every 20 ms, then the rows counted; delivered = the last of the connected SSE users (the segment's first ones, lean loadgen clients in this process) received it; cpu.per_event_us.server = tidings' CPU per notification (over launch → all stored and delivered), clients = this process's SSE clients",
    });
    ensure!(rows as usize == n && distinct == rows, "the campaign broke an invariant: {v}");
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CSV's order is a permutation: every user once, and not sorted.
    #[test]
    fn the_csv_lists_every_user_once_out_of_order() {
        for n in [1, 2, 1_000, 7_919 * 2, 100_000] {
            let order: Vec<usize> = (0..n).map(|k| scattered(k, n)).collect();
            let distinct: HashSet<usize> = order.iter().copied().collect();
            assert_eq!(distinct.len(), n, "n = {n}");
            assert!(order.iter().all(|&u| u < n));
            if n > 2 && !n.is_multiple_of(7_919) {
                assert!(order.windows(2).any(|w| w[0] > w[1]), "n = {n}: sorted");
            }
        }
    }

    #[test]
    fn the_csv_file_has_a_header_and_one_row_per_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.csv");
        let bytes = write_csv(&path, 3).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(bytes as usize, text.len());
        let mut lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.remove(0), "user_id,email");
        lines.sort_unstable();
        assert_eq!(
            lines,
            ["c000000,c000000@example.com", "c000001,c000001@example.com", "c000002,c000002@example.com"]
        );
    }

    #[test]
    fn thin_keeps_the_ends_and_at_most_max() {
        let v: Vec<usize> = (0..100).collect();
        let t = thin(&v, 5);
        assert_eq!(t, [0, 24, 49, 74, 99]);
        assert_eq!(thin(&v[..3], 5), [0, 1, 2]);
    }

    /// A child's peak RSS and CPU are read from /proc before it is reaped.
    #[tokio::test]
    async fn a_watched_child_reports_its_cpu_and_peak_memory() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sh");
        // ~0.3 s of CPU in the shell, then exit 3.
        cmd.args(["-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; exit 3"]);
        let w = run_watched(cmd, &dir.path().join("log")).await.unwrap();
        assert_eq!(w.status.code(), Some(3));
        assert!(w.cpu_secs > 0.0, "cpu {}", w.cpu_secs);
        assert!(w.peak_rss_bytes > 100 * 1024, "peak {}", w.peak_rss_bytes);
        assert!(w.secs >= w.cpu_secs * 0.5, "wall {} cpu {}", w.secs, w.cpu_secs);
    }
}
