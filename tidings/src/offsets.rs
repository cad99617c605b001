//! `tidings offsets show|reset`: the state, members, committed offsets, log ends and lag of
//! tidings' stage groups, and moving an idle group's offsets to a time, an offset, the earliest
//! or the latest record (dry run unless `--execute`). Persistence's offsets are moved where it
//! reads them, in the database; the claim stage's live with its state and are never reset here.

use anyhow::{bail, Context};
use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;
use tidings_pipeline::topology::Topology;
use tidings_store::Store;

use crate::endpoints::database_url;
use crate::tools::parse_time;
use crate::tools::{brokers, topology_with_running_prefix};
use crate::Infra;

/// How long one broker request (metadata, watermarks, offsets, commit) may take.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Exit code of a request that names no group, topic or partition of tidings, or an offset
/// outside a partition's log (EX_USAGE), and of a reset of the claim stage.
const EXIT_USAGE: u8 = 64;
/// Exit code of a reset refused because the group has live members (EX_TEMPFAIL: stop the
/// stage, or use `tidings replay`, and run it again).
const EXIT_LIVE: u8 = 75;

#[derive(Subcommand)]
pub enum OffsetsCmd {
    /// Per stage group: its state and members, and per topic and partition the committed offset,
    /// the log's start and end and the lag. Persistence and the claim stage read from the offsets
    /// they store in the database (`stored`); their Kafka commits, if any, only feed lag monitoring.
    Show(ShowArgs),
    /// Move an idle stage group's offsets, per partition or all: to a time (the first record at or
    /// after it; the partition's end when there is none, never its start), an offset, the earliest
    /// or the latest record. Dry run by default: prints old → new per partition and changes
    /// nothing; `--execute` commits.
    ///
    /// A group with live members is refused (exit 75): a running stage would overwrite the
    /// offsets. Stop the stage first, or reprocess with `tidings replay`, which reads a range
    /// beside the running groups without moving their offsets.
    ///
    /// persistence: the stage starts from the offsets stored with its rows in the database
    /// (`sink_offsets`), so the reset writes them there (backward too) as well as committing them
    /// to Kafka (lag only). Rows read again are skipped as already stored; moving forward leaves
    /// the records skipped unstored. claims: its offsets are committed with its decisions' state
    /// (stock, holders) in one transaction, so moving them alone would decide claims against the
    /// wrong state: refused (exit 64); reprocess claims with `tidings replay`. templating and the
    /// scheduler: Kafka's committed offsets are the stage's.
    ///
    /// Exit codes: 0 done (or dry run), 64 unknown group, topic or partition, an offset outside
    /// the log, or the claim stage; 75 live members; 1 the broker or database failed.
    Reset(ResetArgs),
}

#[derive(Args)]
pub struct ShowArgs {
    /// The group: a stage name (templating, persistence, claims, scheduler) or its consumer group,
    /// with or without the topic prefix. Default: every stage's group.
    #[arg(long)]
    group: Option<String>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    infra: Infra,
}

#[derive(Args)]
#[command(group(ArgGroup::new("target").required(true).args(["to_time", "to_offset", "to"])))]
pub struct ResetArgs {
    /// The group: a stage name (templating, persistence, claims, scheduler) or its consumer group,
    /// with or without the topic prefix.
    #[arg(long)]
    group: String,
    /// To the first record at or after this time: RFC 3339 (`2026-11-20T00:00:00Z`) or relative
    /// to now (`-2h`, `-30m`, `-1d`, `-45s`). A partition with no record at or after it goes to its end.
    #[arg(long, allow_hyphen_values = true)]
    to_time: Option<String>,
    /// To this offset (inside every chosen partition's log: its start to its end).
    #[arg(long)]
    to_offset: Option<i64>,
    /// To the earliest record still in the log, or to the log's end.
    #[arg(long, value_enum)]
    to: Option<Edge>,
    /// Only this topic of the group's inputs (logical name, e.g. `orders`). Default: all of them.
    #[arg(long)]
    topic: Option<String>,
    /// Only these partitions (repeat the flag or separate with commas). Default: all.
    #[arg(long, value_delimiter = ',')]
    partition: Vec<i32>,
    /// Commit the new offsets (without it: a dry run that changes nothing).
    #[arg(long)]
    execute: bool,
    #[command(flatten)]
    infra: Infra,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Edge {
    Earliest,
    Latest,
}

/// Where a stage reads its offsets from when it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Held {
    /// Kafka's committed offsets.
    Kafka,
    /// `sink_offsets` in the database (persistence).
    Database,
    /// `claim_partitions`, committed with the claim stage's state.
    ClaimState,
}

/// One of tidings' stage groups.
#[derive(Clone)]
struct StageGroup {
    stage: &'static str,
    logical: String,
    group: String,
    /// (logical, cluster) topic names of its inputs.
    topics: Vec<(String, String)>,
    held: Held,
}

fn stage_groups(topo: &Topology) -> Vec<StageGroup> {
    let s = &topo.stages;
    let named = |ts: &[String]| ts.iter().map(|t| (t.clone(), topo.topic_name(t))).collect::<Vec<_>>();
    let claims_input = vec![tidings_pipeline::stages::claims::INPUT.to_string()];
    [
        ("templating", &s.templating.group, named(&s.templating.inputs), Held::Kafka),
        ("persistence", &s.persistence.group, named(&s.persistence.inputs), Held::Database),
        ("claims", &s.claims.group, named(&claims_input), Held::ClaimState),
        ("scheduler", &s.scheduler.group, named(std::slice::from_ref(&s.scheduler.input)), Held::Kafka),
    ]
    .into_iter()
    .map(|(stage, g, topics, held)| StageGroup { stage, logical: g.clone(), group: topo.group_name(g), topics, held })
    .collect()
}

/// The stage group `name` names (stage, logical or cluster group name), or the usage error listing them.
fn pick<'a>(groups: &'a [StageGroup], name: &str) -> Result<&'a StageGroup, String> {
    groups.iter().find(|g| g.stage == name || g.logical == name || g.group == name).ok_or_else(|| {
        let known: Vec<String> = groups.iter().map(|g| format!("{} ({})", g.stage, g.group)).collect();
        format!("unknown group {name:?}; tidings' stage groups are: {}", known.join(", "))
    })
}

/// A stage group as the broker and the store see it.
#[derive(Debug, Serialize)]
struct GroupView {
    stage: &'static str,
    group: String,
    /// The broker's group state (`Empty`, `Stable`, `PreparingRebalance`, `Dead` for none, …).
    state: String,
    members: Vec<MemberView>,
    offsets_held_in: Held,
    partitions: Vec<PartitionView>,
}

#[derive(Debug, Serialize)]
struct MemberView {
    id: String,
    client_id: String,
    host: String,
}

#[derive(Debug, Clone, Serialize)]
struct PartitionView {
    topic: String,
    partition: i32,
    /// Committed to Kafka (none: never committed).
    committed: Option<i64>,
    /// Stored in the database (persistence, claims; none: not stored or not kept there).
    stored: Option<i64>,
    log_start: i64,
    log_end: i64,
    /// From the offset the stage would start at (the stored one where it keeps its own, else the
    /// committed one; none: the log's start) to the log's end.
    lag: i64,
}

impl PartitionView {
    /// Where the stage would start reading this partition now (none: the log's start).
    fn current(&self, held: Held) -> Option<i64> {
        match held {
            Held::Kafka => self.committed,
            Held::Database | Held::ClaimState => self.stored,
        }
    }
}

impl GroupView {
    fn live(&self) -> bool {
        !self.members.is_empty() || matches!(self.state.as_str(), "PreparingRebalance" | "CompletingRebalance")
    }
}

/// A consumer with the group's id that never joins it: for offset reads and a commit that the
/// broker accepts only while the group has no members.
fn group_client(infra: &Infra, group: &str) -> anyhow::Result<BaseConsumer> {
    let mut cfg = infra.kafka(brokers(infra)?)?.admin();
    cfg.set("group.id", group).set("enable.auto.commit", "false").set("enable.auto.offset.store", "false");
    Ok(cfg.create()?)
}

/// Reads the group's state, members and, per partition of its inputs, committed offset and log bounds.
fn read_kafka(client: &BaseConsumer, g: &StageGroup) -> anyhow::Result<GroupView> {
    let list = client
        .fetch_group_list(Some(&g.group), REQUEST_TIMEOUT)
        .with_context(|| format!("describing group {}", g.group))?;
    let (state, members) = match list.groups().iter().find(|i| i.name() == g.group) {
        Some(info) => (
            info.state().to_string(),
            info.members()
                .iter()
                .map(|m| MemberView {
                    id: m.id().into(),
                    client_id: m.client_id().into(),
                    host: m.client_host().into(),
                })
                .collect(),
        ),
        None => ("Dead".to_string(), Vec::new()),
    };
    let mut tpl = TopicPartitionList::new();
    let mut bounds = Vec::new();
    for (logical, topic) in &g.topics {
        let md = client.fetch_metadata(Some(topic), REQUEST_TIMEOUT).with_context(|| format!("metadata of {topic}"))?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        let parts = match t {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => t.partitions().len(),
            _ => bail!("topic {topic} ({logical}) does not exist on the cluster; `tidings topology apply` creates it"),
        };
        for p in 0..i32::try_from(parts).unwrap_or(i32::MAX) {
            let (low, high) = client
                .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
                .with_context(|| format!("log bounds of {topic}[{p}]"))?;
            tpl.add_partition(topic, p);
            bounds.push((topic.clone(), p, low, high));
        }
    }
    let committed = client.committed_offsets(tpl, REQUEST_TIMEOUT).context("reading committed offsets")?;
    let partitions = bounds
        .into_iter()
        .map(|(topic, partition, low, high)| {
            let c = committed.find_partition(&topic, partition).and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            PartitionView { topic, partition, committed: c, stored: None, log_start: low, log_end: high, lag: 0 }
        })
        .collect();
    Ok(GroupView { stage: g.stage, group: g.group.clone(), state, members, offsets_held_in: g.held, partitions })
}

/// Fills in the offsets a stage keeps in the database, and every partition's lag.
async fn read_stored(view: &mut GroupView, infra: &Infra) -> anyhow::Result<()> {
    match view.offsets_held_in {
        Held::Kafka => {}
        Held::Database => {
            let store = Store::connect(&database_url(infra)).await?;
            let mut by_topic: BTreeMap<String, std::collections::HashMap<i32, i64>> = BTreeMap::new();
            for p in &mut view.partitions {
                if !by_topic.contains_key(&p.topic) {
                    by_topic.insert(p.topic.clone(), store.load_offsets(&view.group, &p.topic).await?);
                }
                p.stored = by_topic[&p.topic].get(&p.partition).copied();
            }
        }
        Held::ClaimState => {
            let store = Store::connect(&database_url(infra)).await?;
            let stored: std::collections::HashMap<i32, i64> =
                store.claim_offsets(&view.group).await?.into_iter().collect();
            for p in &mut view.partitions {
                p.stored = stored.get(&p.partition).copied();
            }
        }
    }
    let held = view.offsets_held_in;
    for p in &mut view.partitions {
        p.lag = (p.log_end - p.current(held).unwrap_or(p.log_start).max(p.log_start)).max(0);
    }
    Ok(())
}

async fn view_of(infra: &Infra, g: &StageGroup) -> anyhow::Result<(BaseConsumer, GroupView)> {
    let client = group_client(infra, &g.group)?;
    let g = g.clone();
    let (client, mut view) = blocking(move || read_kafka(&client, &g).map(|v| (client, v))).await?;
    read_stored(&mut view, infra).await?;
    Ok((client, view))
}

/// Runs a blocking librdkafka call on the blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.context("broker call panicked")?
}

fn opt(o: Option<i64>) -> String {
    o.map_or_else(|| "-".to_string(), |o| o.to_string())
}

fn print_view(v: &GroupView) {
    let held = match v.offsets_held_in {
        Held::Kafka => "offsets committed to Kafka",
        Held::Database => "offsets stored in the database with its rows (Kafka's commits only feed lag)",
        Held::ClaimState => "offsets stored in the database with its state (claim_partitions)",
    };
    println!("group {} (stage {}): {}, {} member(s); {held}", v.group, v.stage, v.state, v.members.len());
    for m in &v.members {
        println!("  member {} client {} host {}", m.id, m.client_id, m.host);
    }
    println!(
        "  {:<32} {:>9} {:>11} {:>11} {:>11} {:>11} {:>9}",
        "TOPIC", "PARTITION", "COMMITTED", "STORED", "LOG-START", "LOG-END", "LAG"
    );
    for p in &v.partitions {
        println!(
            "  {:<32} {:>9} {:>11} {:>11} {:>11} {:>11} {:>9}",
            p.topic,
            p.partition,
            opt(p.committed),
            opt(p.stored),
            p.log_start,
            p.log_end,
            p.lag
        );
    }
}

pub async fn run(cmd: OffsetsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        OffsetsCmd::Show(args) => show(args).await,
        OffsetsCmd::Reset(args) => reset(args).await,
    }
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let topo = topology_with_running_prefix(&args.infra)?;
    let groups = stage_groups(&topo);
    let chosen: Vec<&StageGroup> = match &args.group {
        Some(name) => match pick(&groups, name) {
            Ok(g) => vec![g],
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
        },
        None => groups.iter().collect(),
    };
    let mut views = Vec::new();
    for g in chosen {
        views.push(view_of(&args.infra, g).await?.1);
    }
    if args.json {
        println!("{}", serde_json::json!({ "groups": views }));
    } else {
        for v in &views {
            print_view(v);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One partition's move.
struct Move {
    topic: String,
    partition: i32,
    old: Option<i64>,
    new: i64,
}

async fn reset(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(EXIT_USAGE))
    };
    let topo = topology_with_running_prefix(&args.infra)?;
    let groups = stage_groups(&topo);
    let g = match pick(&groups, &args.group) {
        Ok(g) => g,
        Err(e) => return usage(e),
    };
    if g.held == Held::ClaimState {
        return usage(format!(
            "the claim stage's offsets ({}) are not reset: they are committed with its decisions' state (stock, \
             holders, rejections) in one transaction, and moving them alone would decide claims against a state \
             that does not match. Reprocess claim records with `tidings replay`.",
            g.group
        ));
    }
    if let Some(t) = &args.topic {
        if !g.topics.iter().any(|(logical, physical)| logical == t || physical == t) {
            let inputs: Vec<&str> = g.topics.iter().map(|(l, _)| l.as_str()).collect();
            return usage(format!("{} does not read topic {t:?}; its inputs are: {}", g.stage, inputs.join(", ")));
        }
    }
    let to_time = match &args.to_time {
        Some(s) => match parse_time(s, chrono::Utc::now().timestamp_millis()) {
            Ok(ms) => Some(ms),
            Err(e) => return usage(format!("--to-time {e}")),
        },
        None => None,
    };
    let (client, view) = view_of(&args.infra, g).await?;
    if view.live() {
        eprintln!("{}", refusal(&view));
        return Ok(ExitCode::from(EXIT_LIVE));
    }
    let chosen: Vec<PartitionView> = view
        .partitions
        .iter()
        .filter(|p| args.topic.as_ref().is_none_or(|t| topo.topic_name(t) == p.topic || *t == p.topic))
        .filter(|p| args.partition.is_empty() || args.partition.contains(&p.partition))
        .cloned()
        .collect();
    for want in &args.partition {
        if !chosen.iter().any(|p| p.partition == *want) {
            return usage(format!("partition {want} is not a partition of the chosen topics"));
        }
    }
    // Every new offset is resolved first: nothing is committed unless all of them are.
    let news: Vec<i64> = match (to_time, args.to_offset, args.to) {
        (Some(ms), _, _) => {
            let wanted = chosen.iter().map(|p| (p.topic.clone(), p.partition, p.log_end)).collect::<Vec<_>>();
            let client = group_client(&args.infra, &g.group)?;
            blocking(move || at_time(&client, &wanted, ms)).await?
        }
        (_, Some(n), _) => {
            if let Some(p) = chosen.iter().find(|p| n < p.log_start || n > p.log_end) {
                return usage(format!(
                    "--to-offset {n} is outside {}[{}]'s log ({} to {}); use --to earliest or --to latest",
                    p.topic, p.partition, p.log_start, p.log_end
                ));
            }
            vec![n; chosen.len()]
        }
        (_, _, Some(Edge::Earliest)) => chosen.iter().map(|p| p.log_start).collect(),
        (_, _, Some(Edge::Latest)) => chosen.iter().map(|p| p.log_end).collect(),
        (None, None, None) => unreachable!("clap requires one of --to-time, --to-offset, --to"),
    };
    let moves: Vec<Move> = chosen
        .iter()
        .zip(news)
        .map(|(p, new)| Move { topic: p.topic.clone(), partition: p.partition, old: p.current(g.held), new })
        .collect();
    println!("group {} (stage {}), {} partition(s):", g.group, g.stage, moves.len());
    for m in &moves {
        let note = if m.old == Some(m.new) { "  (unchanged)" } else { "" };
        println!("  {}[{}] {} → {}{note}", m.topic, m.partition, opt(m.old), m.new);
    }
    if !args.execute {
        println!("Dry run: nothing changed. Add --execute to commit these offsets.");
        return Ok(ExitCode::SUCCESS);
    }
    // Kafka first: the broker refuses a commit from outside the group while it has members, so
    // a stage that started since the check above stops the reset before the database moves.
    let mut tpl = TopicPartitionList::new();
    for m in &moves {
        tpl.add_partition_offset(&m.topic, m.partition, Offset::Offset(m.new))?;
    }
    let committed = blocking(move || Ok(client.commit(&tpl, CommitMode::Sync))).await?;
    match committed {
        Ok(()) => {}
        Err(KafkaError::ConsumerCommit(
            RDKafkaErrorCode::UnknownMemberId
            | RDKafkaErrorCode::IllegalGeneration
            | RDKafkaErrorCode::RebalanceInProgress,
        )) => {
            eprintln!("{}", refusal(&view));
            return Ok(ExitCode::from(EXIT_LIVE));
        }
        Err(e) => return Err(e).context(format!("committing the offsets of {}", g.group)),
    }
    if g.held == Held::Database {
        let store = Store::connect(&database_url(&args.infra)).await?;
        let rows: Vec<(String, i32, i64)> = moves.iter().map(|m| (m.topic.clone(), m.partition, m.new)).collect();
        store.set_offsets(&g.group, &rows).await.with_context(|| {
            format!("the offsets were committed to Kafka but not stored in the database, where {} starts from; run the same command again", g.stage)
        })?;
        println!("Stored in the database (where {} starts from) and committed to Kafka.", g.stage);
    } else {
        println!("Committed.");
    }
    Ok(ExitCode::SUCCESS)
}

/// Why a reset of a group with members is refused, and what to do instead.
fn refusal(view: &GroupView) -> String {
    format!(
        "error: group {} has {} live member(s) (state {}): a running {} stage would overwrite the reset offsets. \
         Stop the stage and run the reset again, or reprocess with `tidings replay`, which reads a range beside \
         the running group without moving its offsets.",
        view.group,
        view.members.len(),
        view.state,
        view.stage
    )
}

/// Per partition, the offset of the first record at or after `ms`; a partition with no such
/// record resolves to its end (`end`, read with the plan), never to its start.
pub(crate) fn at_time(client: &BaseConsumer, wanted: &[(String, i32, i64)], ms: i64) -> anyhow::Result<Vec<i64>> {
    let mut tpl = TopicPartitionList::new();
    for (topic, p, _) in wanted {
        tpl.add_partition_offset(topic, *p, Offset::Offset(ms))?;
    }
    let found = client.offsets_for_times(tpl, REQUEST_TIMEOUT).context("looking up offsets for the time")?;
    wanted
        .iter()
        .map(|(topic, p, end)| {
            let e = found.find_partition(topic, *p).with_context(|| format!("no answer for {topic}[{p}]"))?;
            if let Err(err) = e.error() {
                bail!("offsets for the time of {topic}[{p}]: {err}");
            }
            Ok(match e.offset() {
                Offset::Offset(o) if o >= 0 => o,
                // No record at or after the time (the broker answers -1).
                _ => *end,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_group_lists_the_known_ones() {
        let topo = Topology::load(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../topology.yaml")))
            .unwrap()
            .with_prefix("t1.");
        let groups = stage_groups(&topo);
        assert_eq!(pick(&groups, "templating").unwrap().group, "t1.tidings-templating");
        assert_eq!(pick(&groups, "tidings-persistence").unwrap().held, Held::Database);
        assert_eq!(
            pick(&groups, "t1.tidings-claims").unwrap().topics,
            vec![("coupon-claims".into(), "t1.coupon-claims".into())]
        );
        let err = pick(&groups, "nope").err().unwrap();
        for known in
            ["templating (t1.tidings-templating)", "persistence (t1.tidings-persistence)", "claims", "scheduler"]
        {
            assert!(err.contains(known), "{err}");
        }
    }
}
