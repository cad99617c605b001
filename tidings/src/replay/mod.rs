//! `tidings replay`: drives a range of a topic, chosen by time or offset and resolved once, through
//! a stage's idempotent write path beside the live groups (an assign-only range source, nothing
//! committed, no stored offset written). Dry run by default; `--execute` records and resumes it.

pub mod export;
pub mod plan;

use anyhow::Context;
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidings_core::kafka::{header_str, KafkaConfig, H_DELIVERY_ONLY};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::source::{OffsetRange, RangeSource, Source};
use tidings_core::stage::{acknowledged, DeadLetters, Processor, StageError, System};
use tidings_core::{DecodeError, Notification, RegistryClient};
use tidings_pipeline::stages::templating::{Outcome, RecordMeta, RecordRef, Templater};
use tidings_sinks::persistence::PersistenceConfig;
use tidings_store::replays::{NotificationText, Replay, ReplayKind, ReplayOutcome};
use tidings_store::{Batch, Store, StoredNotification};
use tokio_util::sync::CancellationToken;

use crate::endpoints::database_url;
use crate::tools::{brokers, registry_url, topology_with_running_prefix};
use crate::Infra;
use plan::{BadInput, Bound, Plan};

/// Exit code of bad input: an unknown topic or partition, `--from` after `--to`, a range below
/// the log start (EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit code of a replay stopped by Ctrl-C or SIGTERM (run the same command to resume).
const EXIT_STOPPED: u8 = 130;
/// Timestamps the store accepts (years 1 to 9999, microseconds), as the persistence stage.
const STORABLE_MICROS: std::ops::RangeInclusive<i64> = -62_135_596_800_000_000..=253_402_300_799_999_999;
/// Most ids one already-stored lookup binds.
const LOOKUP_CHUNK: usize = 1_000;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReplayCmd {
    #[command(subcommand)]
    sub: Option<ReplaySub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum ReplaySub {
    /// The recorded (executed) replays, newest first: who, when, range, filters, outcome, counts.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[command(flatten)]
        infra: Infra,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Stage {
    /// The bulk-persistence stage: notifications into the store (rows already stored are skipped).
    Persistence,
    /// Templating, as a backfill of stored texts: each event of an input topic is rendered with
    /// the topology's templates as they are now and the stored notifications it made (same ids)
    /// get the new title, body and link in place. No new id, no new row, nothing produced or
    /// delivered; notifications not stored are left to a persistence replay.
    Templating,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Persistence => "persistence",
            Stage::Templating => "templating",
        }
    }
}

/// Replay a range of a topic through a stage, beside the running stages: their groups and the
/// offsets they store never move, and the stage's idempotent writes skip what is stored already.
///
/// The range is resolved once, when planned, to per-partition `[start, end)` offsets through the
/// broker's offsets-for-times: `--from` is inclusive (the first record at or after it), `--to`
/// exclusive; a time with no record at or after it resolves to the partition's end (never to its
/// start), so a `--from` later than every record is an empty plan. Offsets below the log's start
/// (deleted by retention) are refused. `--to` left out: the partitions' ends when planned.
///
/// Dry run by default: the plan (partitions, ranges, record counts), records whose timestamps
/// are out of order inside the range, and what the stage would do against the store: would
/// insert, already present, would dead-letter. `--execute` runs it and records it (`tidings
/// replay list`); progress is saved after each stored batch, and Ctrl-C, SIGTERM or a crash is
/// resumed by running the same command again (same arguments), from the plan stored with it.
///
/// Exit codes: 0 done (or dry run, or nothing to replay); 64 bad input (unknown topic or
/// partition, --from after --to, a range below the log start); 130 stopped (run it again to
/// resume); 1 the broker, registry or database failed.
#[derive(Args)]
#[command(group(ArgGroup::new("start").required(true).args(["from", "from_offset"])))]
struct RunArgs {
    /// The topic (its name in topology.yaml), e.g. notifications.
    #[arg(long)]
    topic: Option<String>,
    /// The stage to drive the range through.
    #[arg(long, value_enum, default_value = "persistence")]
    stage: Stage,
    /// Start (inclusive): RFC 3339 (`2026-11-20T00:00:00Z`) or relative to now (`-2h`, `-30m`, `-1d`).
    #[arg(long, allow_hyphen_values = true)]
    from: Option<String>,
    /// End (exclusive), as --from. Default: each partition's end when planned.
    #[arg(long, conflicts_with = "to_offset", allow_hyphen_values = true)]
    to: Option<String>,
    /// Start at this offset on each replayed partition (instead of --from).
    #[arg(long, conflicts_with = "from")]
    from_offset: Option<i64>,
    /// End (exclusive) at this offset on each replayed partition; past the log's end means its end.
    #[arg(long)]
    to_offset: Option<i64>,
    /// Only these partitions (repeatable or comma-separated). Default: all.
    #[arg(long, value_delimiter = ',')]
    partition: Vec<i32>,
    /// Only records of these event types (a notification's kind; repeatable or comma-separated).
    #[arg(long = "event-type", value_delimiter = ',')]
    event_type: Vec<String>,
    /// Only records with this key.
    #[arg(long)]
    key: Option<String>,
    /// Only records with this header value, `name=value` (repeatable: all must match).
    #[arg(long, value_parser = crate::parse_kafka_opt)]
    header: Vec<(String, String)>,
    /// Run it (default: a dry run that changes nothing).
    #[arg(long)]
    execute: bool,
    /// Write the range's records (after the filters), decoded, with their topic, partition,
    /// offset, timestamp, key and headers to FILE instead: JSON Lines, or an Avro object container
    /// file when FILE ends in `.avro`. Any topic of the topology with a schema; nothing is stored.
    #[arg(long, value_name = "FILE", conflicts_with = "execute")]
    export: Option<std::path::PathBuf>,
    /// Most records read per second; 0: no limit.
    #[arg(long, env = "TIDINGS_REPLAY_RATE", default_value_t = 0)]
    rate: u32,
    /// Records per stored batch (and per saved progress), 1 to 100,000.
    #[arg(long, env = "TIDINGS_REPLAY_BATCH_SIZE", default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    batch_size: u32,
    /// Who runs it, as recorded. Default: $USER.
    #[arg(long)]
    started_by: Option<String>,
    #[command(flatten)]
    infra: Infra,
}

/// What a replay selects besides its range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Filters {
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    event_types: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    key: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    headers: Vec<(String, String)>,
}

impl Filters {
    fn is_empty(&self) -> bool {
        self.event_types.is_empty() && self.key.is_none() && self.headers.is_empty()
    }

    /// The filters readable without decoding: key and headers.
    fn raw_match(&self, m: &BorrowedMessage<'_>) -> bool {
        if let Some(k) = &self.key {
            if m.key() != Some(k.as_bytes()) {
                return false;
            }
        }
        self.headers.iter().all(|(name, value)| m.headers().and_then(|h| header_str(h, name)) == Some(value.as_str()))
    }
}

/// What a replay did (or, dry, would do). Records unless named rows (a group notification is a
/// row per recipient).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub read: u64,
    /// Read but not selected by the filters.
    pub filtered_out: u64,
    /// Timestamp earlier than one read before it on the same partition.
    pub out_of_order: u64,
    /// Rows stored (dry run: would insert).
    pub written_rows: u64,
    /// Rows the store had already (skipped).
    pub present_rows: u64,
    pub dead_lettered: u64,
    /// Delivery-only records and notifications without an inbox row: nothing to store.
    pub passed_by: u64,
    /// Templating backfill: rendered notifications the store does not have (left alone).
    #[serde(default)]
    pub missing_rows: u64,
}

/// Where each partition got to: the next offset to read.
type Progress = BTreeMap<i32, i64>;

/// What the attempts of one run share, and the caller reads at the end.
#[derive(Default)]
struct State {
    counts: Counts,
    progress: Progress,
    /// Every range was read to its end.
    complete: bool,
}

pub async fn run(cmd: ReplayCmd) -> anyhow::Result<ExitCode> {
    match cmd.sub {
        Some(ReplaySub::List { limit, infra }) => list(limit, &infra).await,
        None => match replay(cmd.run).await {
            Err(e) if e.downcast_ref::<BadInput>().is_some() => {
                eprintln!("error: {e}");
                Ok(ExitCode::from(EXIT_USAGE))
            }
            other => other,
        },
    }
}

fn bad(msg: impl Into<String>) -> anyhow::Error {
    BadInput(msg.into()).into()
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The same command gives the same fingerprint: the arguments as given (a relative `-2h` too),
/// not as resolved, so a resume finds the plan stored with the first run.
fn fingerprint(topic: &str, stage: Stage, a: &RunArgs, filters: &Filters) -> String {
    let mut partitions = a.partition.clone();
    partitions.sort_unstable();
    partitions.dedup();
    let text = serde_json::json!({
        "topic": topic, "stage": stage.name(), "from": a.from, "to": a.to,
        "from_offset": a.from_offset, "to_offset": a.to_offset, "partitions": partitions, "filters": filters,
    })
    .to_string();
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, text.as_bytes()).to_string()
}

async fn replay(a: RunArgs) -> anyhow::Result<ExitCode> {
    let Some(logical) = a.topic.clone() else { return Err(bad("--topic is required")) };
    let topo = topology_with_running_prefix(&a.infra)?;
    if !topo.topics.contains_key(&logical) {
        let mut known: Vec<&String> = topo.topics.keys().collect();
        known.sort();
        return Err(bad(format!("topic {logical:?} is not declared in the topology (topics: {known:?})")));
    }
    let kafka = a.infra.kafka(brokers(&a.infra)?)?;
    let registry = a.infra.registry(registry_url(&a.infra)?)?;
    let cfg = PersistenceConfig::new(kafka.clone(), registry.clone(), &topo);
    let physical = topo.topic_name(&logical);
    let templating_input = topo.stages.templating.inputs.contains(&logical);
    if a.export.is_none() && a.stage == Stage::Templating && !templating_input {
        return Err(bad(format!("templating reads {:?}, not {logical:?}", topo.stages.templating.inputs)));
    }
    if a.export.is_none() && a.stage == Stage::Persistence && physical != cfg.notifications_topic {
        return Err(bad(format!(
            "the {} stage replays its notifications topic ({}), not {logical:?}",
            a.stage.name(),
            cfg.notifications_topic
        )));
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    let time = |s: &str, flag: &str| crate::tools::parse_time(s, now_ms).map_err(|e| bad(format!("{flag}: {e}")));
    let from = match (&a.from, a.from_offset) {
        (Some(s), _) => Bound::Time(time(s, "--from")?),
        (None, Some(o)) => Bound::Offset(o),
        (None, None) => return Err(bad("--from or --from-offset is required")),
    };
    let to = match (&a.to, a.to_offset) {
        (Some(s), _) => Bound::Time(time(s, "--to")?),
        (None, Some(o)) => Bound::Offset(o),
        (None, None) => Bound::End,
    };
    plan::check_bounds(from, to).map_err(bad)?;
    let filters = Filters { event_types: a.event_type.clone(), key: a.key.clone(), headers: a.header.clone() };
    if let Some(path) = &a.export {
        let (Some(reader), Some(text)) = (topo.schema(&logical), topo.schema_text(&logical)) else {
            return Err(bad(format!("topic {logical:?} has no schema in the topology: nothing to decode it with")));
        };
        // Once per command: the decoders borrow the reader schema for 'static.
        let reader: &'static apache_avro::Schema = Box::leak(Box::new(reader.clone()));
        let plan = make_plan(&kafka, &physical, &a.partition, from, to).await?;
        println!("Export of {} to {}", plan.topic, path.display());
        print_ranges(&plan, &filters);
        if plan.offsets() == 0 {
            println!("Nothing to export: {}", empty_reason(&plan, from));
            return Ok(ExitCode::SUCCESS);
        }
        let shutdown = CancellationToken::new();
        spawn_signals(shutdown.clone());
        let show = Show::new(plan.offsets() as u64, 0);
        let counts =
            export::run(path, &plan, &kafka, RegistryClient::new(registry)?, reader, text, &filters, &show, &shutdown)
                .await;
        show.done();
        let c = counts.map_err(|e| anyhow::anyhow!("the export failed: {e}"))?;
        let exported = c.read - c.filtered_out;
        println!(
            "Exported {exported} records to {} (read {}, filtered out {}, out of order {}).",
            path.display(),
            c.read,
            c.filtered_out,
            c.out_of_order
        );
        if shutdown.is_cancelled() {
            println!("Stopped before the end of the range: the file holds what was read.");
            return Ok(ExitCode::from(EXIT_STOPPED));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let fp = fingerprint(&logical, a.stage, &a, &filters);
    let store = Store::connect(&database_url(&a.infra)).await.context("connecting to the store")?;

    // A resume reads the plan stored with the first run: never re-resolved.
    let resumed = if a.execute { store.unfinished_replay(ReplayKind::Replay, &fp).await? } else { None };
    let (plan, state) = match &resumed {
        Some(r) => {
            let plan: Plan = serde_json::from_str(&r.plan).context("the stored plan")?;
            let state = State {
                counts: serde_json::from_str(&r.counts).unwrap_or_default(),
                progress: serde_json::from_str(&r.progress).unwrap_or_default(),
                complete: false,
            };
            (plan, state)
        }
        None => (make_plan(&kafka, &physical, &a.partition, from, to).await?, State::default()),
    };
    print_plan(&plan, a.stage, a.execute, &filters);
    if let Some(r) = &resumed {
        println!(
            "Resuming replay {} (started {} by {}, {}): {}",
            r.replay_id,
            micros_rfc3339(r.started_at),
            r.started_by,
            r.outcome.as_str(),
            r.progress
        );
    }
    if plan.offsets() == 0 {
        println!("Nothing to replay: {}", empty_reason(&plan, from));
        return Ok(ExitCode::SUCCESS);
    }

    let replay_id = match (&resumed, a.execute) {
        (Some(r), _) => Some(r.replay_id.clone()),
        (None, true) => {
            let id = uuid::Uuid::new_v4().to_string();
            let at = now_micros();
            let started_by =
                a.started_by.clone().or_else(|| std::env::var("USER").ok()).unwrap_or_else(|| "unknown".into());
            store
                .create_replay(&Replay {
                    replay_id: id.clone(),
                    kind: ReplayKind::Replay,
                    fingerprint: fp.clone(),
                    started_by,
                    started_at: at,
                    updated_at: at,
                    finished_at: None,
                    outcome: ReplayOutcome::Running,
                    topic: physical.clone(),
                    stage: Some(a.stage.name().into()),
                    plan: serde_json::to_string(&plan)?,
                    filters: serde_json::to_string(&filters)?,
                    progress: "{}".into(),
                    counts: "{}".into(),
                })
                .await?;
            println!("Replay {id} recorded.");
            Some(id)
        }
        (None, false) => None,
    };

    let shutdown = CancellationToken::new();
    spawn_signals(shutdown.clone());
    let state = Arc::new(Mutex::new(state));
    let show = Show::new(plan.offsets() as u64, state.lock().expect("lock").counts.read);
    let templater = match a.stage {
        Stage::Templating => Some(
            Templater::new(Arc::new(topo.clone()), registry.clone(), store.clone())
                .await
                .map_err(|e| anyhow::anyhow!("the templates: {e}"))?,
        ),
        Stage::Persistence => None,
    };
    let job = Job {
        templater,
        execute: a.execute,
        kafka,
        registry: RegistryClient::new(registry)?,
        dead_letter: cfg.dead_letter.clone(),
        store: store.clone(),
        plan: plan.clone(),
        filters: filters.clone(),
        batch: a.batch_size as usize,
        rate: a.rate,
        replay_id: replay_id.clone(),
        state: state.clone(),
        show: show.clone(),
        shutdown: shutdown.clone(),
    };
    let health = tidings_core::shutdown::StageHealth::default();
    let ended = tidings_core::stage::run("replay", &health, &shutdown, || job.start()).await;
    show.done();
    let (complete, progress, counts) = {
        let st = state.lock().expect("lock");
        (st.complete, st.progress.clone(), st.counts.clone())
    };
    let outcome = match (&ended, complete) {
        (Err(_), _) => ReplayOutcome::Failed,
        (Ok(()), true) => ReplayOutcome::Done,
        (Ok(()), false) => ReplayOutcome::Stopped,
    };
    if let Some(id) = &replay_id {
        let (p, c) = (serde_json::to_string(&progress)?, serde_json::to_string(&counts)?);
        store.finish_replay(id, outcome, &p, &c, now_micros()).await?;
    }
    print_summary(&counts, a.stage, a.execute, &filters);
    if let Err(e) = ended {
        return Err(anyhow::anyhow!("the replay failed: {e}"));
    }
    match outcome {
        ReplayOutcome::Stopped => {
            println!("Stopped; run the same command again to resume.");
            Ok(ExitCode::from(EXIT_STOPPED))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// Resolves the plan through the broker (blocking client calls, off the runtime's workers).
async fn make_plan(kafka: &KafkaConfig, topic: &str, only: &[i32], from: Bound, to: Bound) -> anyhow::Result<Plan> {
    let client: BaseConsumer = kafka.admin().create()?;
    let (topic, only) = (topic.to_string(), only.to_vec());
    tokio::task::spawn_blocking(move || plan::make(&client, &topic, &only, from, to)).await?
}

fn micros_rfc3339(us: i64) -> String {
    plan::millis_rfc3339(us / 1_000)
}

fn empty_reason(plan: &Plan, from: Bound) -> String {
    if plan.partitions.is_empty() {
        return "no partition selected".into();
    }
    let at_end = plan.partitions.iter().all(|p| p.start == p.log_end);
    match from {
        Bound::Time(ms) if at_end => {
            format!(
                "no record at or after --from ({}): every range starts at its partition's end",
                plan::millis_rfc3339(ms)
            )
        }
        _ => "every range is empty ([start, end) with end at or before start)".into(),
    }
}

fn print_plan(plan: &Plan, stage: Stage, execute: bool, filters: &Filters) {
    let mode = if execute { "execute" } else { "dry run" };
    println!("Replay of {} through {} ({mode})", plan.topic, stage.name());
    print_ranges(plan, filters);
}

fn print_ranges(plan: &Plan, filters: &Filters) {
    println!("{:>9} {:>12} {:>12} {:>12} {:>12}", "partition", "log start", "start", "end", "records");
    for p in &plan.partitions {
        println!("{:>9} {:>12} {:>12} {:>12} {:>12}", p.partition, p.log_start, p.start, p.end, p.len());
    }
    println!("{:>9} {:>12} {:>12} {:>12} {:>12}", "total", "", "", "", plan.offsets());
    if !filters.is_empty() {
        println!("Filters: {}", serde_json::to_string(filters).unwrap_or_default());
    }
}

fn print_summary(c: &Counts, stage: Stage, execute: bool, filters: &Filters) {
    println!(
        "Read {} records; {} out of order (timestamp earlier than one before it on its partition).",
        c.read, c.out_of_order
    );
    if !filters.is_empty() {
        println!("Filtered out {} of them.", c.filtered_out);
        if c.read > 0 && c.filtered_out == c.read {
            println!("The filters matched none of the {} records read.", c.read);
        }
    }
    if stage == Stage::Templating {
        let (did, verb) =
            if execute { ("Replaced", "") } else { ("Would replace", " (nothing was changed; --execute runs it)") };
        println!(
            "{did} the texts of {} rows, already current {}, not stored {}, dead letters skipped {}{verb}.",
            c.written_rows, c.present_rows, c.missing_rows, c.dead_lettered
        );
    } else if execute {
        println!(
            "Written {} rows, already present {}, dead-lettered {} records, passed by {}.",
            c.written_rows, c.present_rows, c.dead_lettered, c.passed_by
        );
    } else {
        println!(
            "Would insert {} rows, already present {}, would dead-letter {} records, pass by {}. Nothing was changed (--execute runs it).",
            c.written_rows, c.present_rows, c.dead_lettered, c.passed_by
        );
    }
}

/// Ctrl-C and SIGTERM stop the replay after its current batch.
fn spawn_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("Stopping after the current batch…");
        shutdown.cancel();
    });
}

/// Progress: a bar with rate and ETA on a terminal, a plain line every 5 s otherwise.
#[derive(Clone)]
struct Show {
    bar: Option<ProgressBar>,
    total: u64,
    last: Arc<Mutex<Instant>>,
}

impl Show {
    fn new(total: u64, done: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} ETA {eta}")
                    .expect("a valid template"),
            );
            b.set_position(done);
            b
        });
        Show { bar, total, last: Arc::new(Mutex::new(Instant::now())) }
    }

    fn at(&self, read: u64) {
        match &self.bar {
            Some(b) => b.set_position(read),
            None => {
                let mut last = self.last.lock().expect("lock");
                if last.elapsed() >= Duration::from_secs(5) {
                    *last = Instant::now();
                    eprintln!("replay: {read}/{} records read", self.total);
                }
            }
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish();
        }
    }
}

/// What every attempt of one run needs.
struct Job {
    /// Set for a templating backfill: renders each event as the live stage would.
    templater: Option<Templater>,
    execute: bool,
    kafka: KafkaConfig,
    registry: RegistryClient,
    dead_letter: String,
    store: Store,
    plan: Plan,
    filters: Filters,
    batch: usize,
    rate: u32,
    replay_id: Option<String>,
    state: Arc<Mutex<State>>,
    show: Show,
    shutdown: CancellationToken,
}

impl Job {
    /// An attempt: the ranges from where the saved progress got to, read by an assign-only
    /// consumer with a throwaway group (nothing joined or committed).
    async fn start(&self) -> Result<(Replayer<'_>, Source), StageError> {
        let progress = self.state.lock().expect("lock").progress.clone();
        let ranges: Vec<OffsetRange> = self
            .plan
            .partitions
            .iter()
            .map(|p| {
                let from = progress.get(&p.partition).map_or(p.start, |n| (*n).max(p.start));
                OffsetRange::new(&self.plan.topic, p.partition, from, p.end)
            })
            .collect();
        let source = RangeSource::new(&self.kafka, ranges)
            .map_err(|e| StageError::external(System::Kafka, true, e.to_string()))?;
        let dead = if self.execute {
            let producer: FutureProducer = self.kafka.producer().create()?;
            Some(DeadLetters::new(producer, self.dead_letter.clone(), "persistence"))
        } else {
            None
        };
        let started = Instant::now();
        let read_before = self.state.lock().expect("lock").counts.read;
        Ok((
            Replayer {
                job: self,
                dead,
                rows: Vec::new(),
                units: Vec::new(),
                units_rows_stored: 0,
                next: BTreeMap::new(),
                dead_sent: Vec::new(),
                records: 0,
                last_ts: BTreeMap::new(),
                started,
                read_at_start: read_before,
                pend: Counts::default(),
            },
            Source::Ranges(source),
        ))
    }
}

/// Drives records through persistence's write path: decoded as the live stage decodes them,
/// stored with the same idempotent batch write but without offsets (the live stage's stored
/// offsets are not touched), dead-lettered for the same reasons.
struct Replayer<'a> {
    job: &'a Job,
    dead: Option<DeadLetters>,
    rows: Vec<StoredNotification>,
    /// Execute: each record that put rows in the batch, with the end of its rows there.
    units: Vec<(OwnedMessage, usize)>,
    /// Rows of the batch being flushed that were not refused.
    units_rows_stored: u64,
    /// Next offset per partition covered by the pending batch.
    next: BTreeMap<i32, i64>,
    dead_sent: Vec<DeliveryFuture>,
    records: usize,
    last_ts: BTreeMap<i32, i64>,
    started: Instant,
    read_at_start: u64,
    /// The pending batch's counts: saved with its progress, so a resume counts from there.
    pend: Counts,
}

impl Replayer<'_> {
    fn count(&mut self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.pend);
    }

    async fn dead_letter(
        &mut self,
        m: &BorrowedMessage<'_>,
        reason: &'static str,
        error: &str,
    ) -> Result<(), StageError> {
        self.count(|c| c.dead_lettered += 1);
        if let Some(dead) = &self.dead {
            let d = dead.send(m, reason, error).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
            self.dead_sent.push(d);
        }
        Ok(())
    }

    async fn take(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        let job = self.job;
        self.records += 1;
        self.next.insert(m.partition(), m.offset() + 1);
        let ts = m.timestamp().to_millis();
        let out_of_order = match (ts, self.last_ts.get(&m.partition())) {
            (Some(t), Some(&last)) => t < last,
            _ => false,
        };
        if let Some(t) = ts {
            let e = self.last_ts.entry(m.partition()).or_insert(t);
            *e = (*e).max(t);
        }
        self.count(|c| {
            c.read += 1;
            c.out_of_order += u64::from(out_of_order);
        });
        if !job.filters.raw_match(m) {
            self.count(|c| c.filtered_out += 1);
            return Ok(());
        }
        if let Some(t) = &job.templater {
            return self.render(t, m, ts).await;
        }
        if m.headers().and_then(|h| header_str(h, H_DELIVERY_ONLY)) == Some("true") {
            self.count(|c| c.passed_by += 1);
            return Ok(());
        }
        let Some(payload) = m.payload() else {
            return self.dead_letter(m, "empty-payload", "record has no value").await;
        };
        let decoded = until_done(
            &job.shutdown,
            || "Decoding through the schema registry".to_string(),
            (Duration::from_millis(200), Duration::from_secs(30)),
            || job.registry.decode(payload, &NOTIFICATION_SCHEMA),
            DecodeError::is_retriable,
        )
        .await;
        let value = match decoded {
            Ok(v) => v,
            Err(GaveUp::Failed(e)) => return self.dead_letter(m, e.reason_code(), &e.to_string()).await,
            Err(GaveUp::ShutDown(e)) => return Err(StageError::external(System::SchemaRegistry, true, e.to_string())),
        };
        match Notification::from_value(value) {
            Ok(n) if !job.filters.event_types.is_empty() && !job.filters.event_types.contains(&n.kind) => {
                self.count(|c| c.filtered_out += 1);
            }
            Ok(n) if !n.inbox => self.count(|c| c.passed_by += 1),
            Ok(n) if !STORABLE_MICROS.contains(&n.occurred_at) => {
                let error = format!("occurred_at {} is outside years 1-9999", n.occurred_at);
                return self.dead_letter(m, "timestamp-out-of-range", &error).await;
            }
            Ok(n) => {
                let rows = &mut self.rows;
                n.for_each_recipient(|n| {
                    rows.push(StoredNotification {
                        notification: n.clone(),
                        stream_partition: m.partition(),
                        stream_offset: m.offset(),
                    })
                });
                if job.execute {
                    // Kept until the batch is stored: a record the database refuses is dead-lettered whole.
                    self.units.push((m.detach(), self.rows.len()));
                }
            }
            Err(e) => return self.dead_letter(m, "malformed-avro", &e.to_string()).await,
        }
        Ok(())
    }

    /// Templating: the notifications the event renders to now, as rows whose texts replace the stored ones.
    async fn render(&mut self, t: &Templater, m: &BorrowedMessage<'_>, ts: Option<i64>) -> Result<(), StageError> {
        let job = self.job;
        let rec = RecordRef { topic: m.topic(), partition: m.partition(), offset: m.offset(), payload: m.payload() };
        let meta = RecordMeta { timestamp: ts.map(|t| t * 1_000), released: false };
        let fanout = match t.outcome_at(rec, meta, &job.shutdown).await? {
            Outcome::Notifications(f) => f,
            // The live stage dead-lettered it already: counted, not sent again.
            Outcome::Dead { .. } | Outcome::CampaignFailed { .. } => {
                self.count(|c| c.dead_lettered += 1);
                return Ok(());
            }
        };
        let mut matched = false;
        for f in std::iter::once(&fanout).chain(fanout.siblings.iter()) {
            for i in 0..f.len() {
                let n = f.notification(i);
                if !job.filters.event_types.is_empty() && !job.filters.event_types.contains(&n.kind) {
                    continue;
                }
                matched = true;
                self.rows.push(StoredNotification {
                    notification: n,
                    stream_partition: m.partition(),
                    stream_offset: m.offset(),
                });
            }
        }
        if !matched {
            self.count(|c| if job.filters.event_types.is_empty() { c.passed_by += 1 } else { c.filtered_out += 1 });
        }
        Ok(())
    }

    /// Templating: compares (dry) or replaces the stored texts of the pending rows. Returns
    /// (replaced, already so, not stored).
    async fn backfill(&self, rows: &[StoredNotification]) -> Result<(u64, u64, u64), StageError> {
        let job = self.job;
        let (mut replaced, mut same, mut missing) = (0u64, 0u64, 0u64);
        for chunk in rows.chunks(LOOKUP_CHUNK) {
            let ids: Vec<uuid::Uuid> = chunk.iter().map(|r| r.notification.notification_id).collect();
            let stored: std::collections::HashMap<uuid::Uuid, NotificationText> =
                job.store.notification_texts(&ids).await?.into_iter().map(|t| (t.id, t)).collect();
            let mut changed = Vec::new();
            for r in chunk {
                let n = &r.notification;
                let new = NotificationText {
                    id: n.notification_id,
                    title: n.title.clone(),
                    body: n.body.clone(),
                    link: n.link.clone(),
                };
                match stored.get(&n.notification_id) {
                    None => missing += 1,
                    Some(old) if *old == new => same += 1,
                    Some(_) => changed.push(new),
                }
            }
            replaced +=
                if job.execute { job.store.replace_notification_texts(&changed).await? } else { changed.len() as u64 };
        }
        Ok((replaced, same, missing))
    }

    /// The live stage's idempotent batch write, with no offsets, retried while the database is
    /// unavailable. Returns the rows inserted (the others were stored already).
    async fn write(&self, batch: &Batch) -> Result<u64, tidings_store::StoreError> {
        let rows = batch.notifications.len();
        until_done(
            &self.job.shutdown,
            || format!("Storing a batch of {rows} replayed rows"),
            (Duration::from_millis(500), Duration::from_secs(30)),
            || self.job.store.write_batch("tidings-replay", batch),
            tidings_store::StoreError::is_retriable,
        )
        .await
        .map(|s| s.notifications_inserted)
        .map_err(|g| match g {
            GaveUp::Failed(e) | GaveUp::ShutDown(e) => e,
        })
    }

    /// A batch the database refused: each record's rows written alone; a record refused again
    /// goes to the dead-letter topic with the refusal as its reason, as in the live stage.
    /// Returns the rows inserted; `units_rows_stored` counts the rows not refused.
    async fn store_around_refusals(&mut self, rows: &[StoredNotification]) -> Result<u64, StageError> {
        let units = std::mem::take(&mut self.units);
        let (mut inserted, mut start) = (0u64, 0usize);
        self.units_rows_stored = 0;
        for (m, end) in &units {
            let part = Batch { notifications: rows[start..*end].to_vec(), ..Batch::default() };
            match self.write(&part).await {
                Ok(n) => {
                    inserted += n;
                    self.units_rows_stored += part.notifications.len() as u64;
                }
                Err(e) => match e.rejection() {
                    Some(reason) => {
                        self.count(|c| c.dead_lettered += 1);
                        if let Some(dead) = &self.dead {
                            let d = dead
                                .send(m, reason, &e.to_string())
                                .await
                                .map_err(|e| StageError::kafka(System::DeadLetter, e))?;
                            acknowledged(d).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
                        }
                    }
                    None => return Err(e.into()),
                },
            }
            start = *end;
        }
        Ok(inserted)
    }

    /// Stores (dry: looks up) the pending rows, then saves the progress they reach.
    async fn flush(&mut self) -> Result<(), StageError> {
        let job = self.job;
        if self.records == 0 {
            return Ok(());
        }
        for d in self.dead_sent.drain(..) {
            acknowledged(d).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
        }
        let rows = std::mem::take(&mut self.rows);
        self.units_rows_stored = rows.len() as u64;
        let mut missing = 0;
        let (written, present) = if job.templater.is_some() {
            let (replaced, same, absent) = self.backfill(&rows).await?;
            missing = absent;
            (replaced, same)
        } else if job.execute {
            // The live stage's idempotent batch write, with no offsets: rows already stored are skipped.
            let batch = Batch { notifications: rows, ..Batch::default() };
            let total = batch.notifications.len() as u64;
            let inserted = match self.write(&batch).await {
                Ok(inserted) => inserted,
                // The data, not the database: each record's rows alone, the refused ones dead-lettered.
                Err(e) if e.rejection().is_some() => self.store_around_refusals(&batch.notifications).await?,
                Err(e) => return Err(e.into()),
            };
            let refused = total - self.units_rows_stored;
            (inserted, total - refused - inserted)
        } else {
            let mut present = 0u64;
            for chunk in rows.chunks(LOOKUP_CHUNK) {
                let ids: Vec<uuid::Uuid> = chunk.iter().map(|r| r.notification.notification_id).collect();
                let found: HashSet<uuid::Uuid> = job.store.stored_notification_ids(&ids).await?;
                present += chunk.iter().filter(|r| found.contains(&r.notification.notification_id)).count() as u64;
            }
            (rows.len() as u64 - present, present)
        };
        let (progress, counts) = {
            let mut st = job.state.lock().expect("lock");
            let p = std::mem::take(&mut self.pend);
            let c = &mut st.counts;
            c.read += p.read;
            c.filtered_out += p.filtered_out;
            c.out_of_order += p.out_of_order;
            c.dead_lettered += p.dead_lettered;
            c.passed_by += p.passed_by;
            c.missing_rows += missing;
            c.written_rows += written;
            c.present_rows += present;
            for (p, n) in &self.next {
                st.progress.insert(*p, *n);
            }
            (
                serde_json::to_string(&st.progress).unwrap_or_default(),
                serde_json::to_string(&st.counts).unwrap_or_default(),
            )
        };
        if let Some(id) = &job.replay_id {
            job.store.save_replay_progress(id, &progress, &counts, now_micros()).await?;
        }
        self.next.clear();
        self.units.clear();
        self.records = 0;
        Ok(())
    }

    /// Records read so far, this run's pending batch included.
    fn read(&self) -> u64 {
        self.job.state.lock().expect("lock").counts.read + self.pend.read
    }

    /// Waits as long as `--rate` asks.
    async fn pace(&self) {
        if self.job.rate == 0 {
            return;
        }
        let read = self.read() - self.read_at_start;
        let due = self.started + Duration::from_secs_f64(read as f64 / f64::from(self.job.rate));
        tokio::time::sleep_until(due.into()).await;
    }
}

impl Processor for Replayer<'_> {
    type Due = ();

    async fn process(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        self.take(m).await?;
        self.job.show.at(self.read());
        if self.records >= self.job.batch {
            self.flush().await?;
        }
        self.pace().await;
        Ok(())
    }

    fn due(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }

    async fn on_due(&mut self, (): ()) -> Result<(), StageError> {
        Ok(())
    }

    async fn finish(mut self, ended: Result<(), StageError>) -> Result<(), StageError> {
        ended?;
        self.flush().await?;
        if !self.job.shutdown.is_cancelled() {
            // The source ended by itself: every range was read (its last offsets may hold no record).
            let mut st = self.job.state.lock().expect("lock");
            for p in &self.job.plan.partitions {
                st.progress.insert(p.partition, p.end);
            }
            st.complete = true;
        }
        Ok(())
    }
}

async fn list(limit: i64, infra: &Infra) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&database_url(infra)).await.context("connecting to the store")?;
    let replays = store.list_replays(ReplayKind::Replay, limit).await?;
    if replays.is_empty() {
        println!("No replay recorded.");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<36} {:<25} {:<10} {:<8} {:<12} {:<20}", "replay", "started", "by", "outcome", "stage", "topic");
    for r in replays {
        println!(
            "{:<36} {:<25} {:<10} {:<8} {:<12} {:<20}",
            r.replay_id,
            micros_rfc3339(r.started_at),
            r.started_by,
            r.outcome.as_str(),
            r.stage.as_deref().unwrap_or("-"),
            r.topic
        );
        println!("    plan {}  filters {}  progress {}  counts {}", r.plan, r.filters, r.progress, r.counts);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn fp(args: &[&str]) -> String {
        let cli = Cli::try_parse_from(std::iter::once("replay").chain(args.iter().copied())).unwrap();
        let filters = Filters {
            event_types: cli.run.event_type.clone(),
            key: cli.run.key.clone(),
            headers: cli.run.header.clone(),
        };
        fingerprint("notifications", cli.run.stage, &cli.run, &filters)
    }

    #[test]
    fn the_same_command_has_the_same_fingerprint() {
        let base = ["--topic", "notifications", "--from", "-2h", "--partition", "1,0"];
        // --execute, --rate and the batch size do not change what is replayed.
        assert_eq!(
            fp(&base),
            fp(&[
                "--topic",
                "notifications",
                "--from",
                "-2h",
                "--partition",
                "0",
                "--partition",
                "1",
                "--execute",
                "--rate",
                "9"
            ])
        );
        assert_ne!(fp(&base), fp(&["--topic", "notifications", "--from", "-3h", "--partition", "0,1"]));
        assert_ne!(fp(&base), fp(&["--topic", "notifications", "--from", "-2h", "--partition", "0,1", "--key", "u1"]));
        assert_ne!(
            fp(&base),
            fp(&["--topic", "notifications", "--from", "-2h", "--partition", "0,1", "--stage", "templating"])
        );
    }
}
