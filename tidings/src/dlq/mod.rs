//! `tidings dlq list|show|replay|purge`: the dead-letter topics of the topology (its `tidings.dlq.*`
//! topics) counted by reason and source, shown decoded, re-driven to their source topics after a
//! fix ([`redrive`]) and purged (the broker's DeleteRecords below an offset).

mod letters;
mod redrive;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tidings_core::RegistryClient;
use tidings_pipeline::topology::Topology;

use crate::tools::{brokers, parse_time, registry_url, topology_with_running_prefix};
use crate::Infra;
use letters::Filters;

/// Where a letter re-driven too often goes instead (logical name, declared in topology.yaml).
pub const QUARANTINE: &str = "tidings.dlq.quarantine";
/// Distinct (reason, source topic) pairs `dlq list` counts per topic; the rest are summed as one
/// line, so letters with made-up headers cannot grow the table without bound.
const MAX_GROUPS: usize = 1000;
/// How long a broker may take to answer a metadata, watermark or admin request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Subcommand)]
pub enum DlqCmd {
    /// Count the letters of each dead-letter topic by reason and source topic.
    List {
        /// Only this dead-letter topic (logical name, e.g. tidings.dlq.templating); repeatable.
        #[arg(long = "dlq")]
        dlqs: Vec<String>,
        #[command(flatten)]
        infra: Infra,
    },
    /// Print letters decoded: the original record through the schema registry when it decodes
    /// (else its bytes, escaped), with its headers.
    Show {
        #[command(flatten)]
        select: Select,
        /// Letters to print at most.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[command(flatten)]
        infra: Infra,
    },
    /// Re-drive selected letters to their source topic and partition (from their headers), in
    /// their dead-letter order, with `tidings.dlq.replay-count` incremented; a letter re-driven
    /// --max-redrives times goes to tidings.dlq.quarantine instead. Dry run unless --execute.
    /// Executed runs are recorded (kind `dlq`); the same command resumes a stopped one, and a
    /// letter an earlier run re-drove or quarantined is not re-driven again.
    Replay(redrive::ReplayArgs),
    /// Delete the letters of one dead-letter topic below a point (the broker's DeleteRecords:
    /// the log start moves up; nothing else changes). Dry run unless --execute.
    Purge {
        /// The dead-letter topic (logical name).
        #[arg(long = "dlq")]
        dlq: String,
        /// Delete the letters dead-lettered before this time (RFC 3339, or -2h / -30m / -1d).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        before: Option<String>,
        /// Delete every letter there now.
        #[arg(long)]
        all: bool,
        /// Delete; without it, only say what would be deleted.
        #[arg(long)]
        execute: bool,
        #[command(flatten)]
        infra: Infra,
    },
}

/// Which letters a command works on.
#[derive(Args, Clone, Debug)]
pub struct Select {
    /// Dead-letter topic (logical name, e.g. tidings.dlq.templating); repeatable. Default: every
    /// `tidings.dlq.*` topic of the topology but the quarantine.
    #[arg(long = "dlq")]
    pub dlqs: Vec<String>,
    /// Only letters with this reason (`tidings.dlq.reason`, e.g. unknown-schema-id); repeatable.
    #[arg(long)]
    pub reason: Vec<String>,
    /// Only letters from this source topic (logical name, e.g. orders); repeatable.
    #[arg(long)]
    pub source: Vec<String>,
    /// Only letters dead-lettered at or after this time (RFC 3339, or -2h / -30m / -1d).
    #[arg(long)]
    pub from: Option<String>,
    /// Only letters dead-lettered before this time.
    #[arg(long)]
    pub to: Option<String>,
    /// Only letters with this record key.
    #[arg(long)]
    pub key: Option<String>,
}

impl Select {
    /// The filters, times resolved now (so a recorded run keeps absolute times).
    pub fn filters(&self, topo: &Topology) -> anyhow::Result<Filters> {
        let now = chrono::Utc::now().timestamp_millis();
        let from_ms = self
            .from
            .as_deref()
            .map(|t| parse_time(t, now))
            .transpose()
            .map_err(anyhow::Error::msg)
            .context("--from")?;
        let to_ms =
            self.to.as_deref().map(|t| parse_time(t, now)).transpose().map_err(anyhow::Error::msg).context("--to")?;
        if let (Some(f), Some(t)) = (from_ms, to_ms) {
            if f >= t {
                bail!("--from must be before --to");
            }
        }
        let mut sources = Vec::new();
        for s in &self.source {
            if !topo.topics.contains_key(s) {
                bail!("--source {s:?} is not a topic of the topology");
            }
            sources.push(topo.topic_name(s));
        }
        let mut reasons = self.reason.clone();
        reasons.sort();
        sources.sort();
        Ok(Filters { reasons, sources, from_ms, to_ms, key: self.key.clone() })
    }
}

/// The dead-letter topics by logical name: the named ones (each checked), else every
/// `tidings.dlq.*` topic of the topology, with or without the quarantine.
fn dead_letter_topics(topo: &Topology, named: &[String], with_quarantine: bool) -> anyhow::Result<Vec<String>> {
    if named.is_empty() {
        return Ok(topo
            .topics
            .keys()
            .filter(|t| t.starts_with("tidings.dlq.") && (with_quarantine || *t != QUARANTINE))
            .cloned()
            .collect());
    }
    for n in named {
        if !n.starts_with("tidings.dlq.") || !topo.topics.contains_key(n) {
            let known: Vec<&String> = topo.topics.keys().filter(|t| t.starts_with("tidings.dlq.")).collect();
            bail!("{n:?} is not a dead-letter topic of the topology (these are: {known:?})");
        }
    }
    Ok(named.to_vec())
}

pub async fn run(cmd: DlqCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCmd::List { dlqs, infra } => list(&dlqs, &infra).await,
        DlqCmd::Show { select, limit, infra } => show(&select, limit, &infra).await,
        DlqCmd::Replay(args) => redrive::run(args).await,
        DlqCmd::Purge { dlq, before, all: _, execute, infra } => purge(&dlq, before.as_deref(), execute, &infra).await,
    }
}

async fn list(named: &[String], infra: &Infra) -> anyhow::Result<ExitCode> {
    let topo = topology_with_running_prefix(infra)?;
    let kafka = infra.kafka(brokers(infra)?)?;
    for logical in dead_letter_topics(&topo, named, true)? {
        let topic = topo.topic_name(&logical);
        let ranges = letters::ranges(&kafka, &topic)?;
        let mut groups: BTreeMap<(String, String), u64> = BTreeMap::new();
        let (mut total, mut other, mut redriven) = (0u64, 0u64, 0u64);
        letters::read(&kafka, &topic, &ranges, |l| {
            total += 1;
            if l.replay_count() > 0 {
                redriven += 1;
            }
            let k = (l.reason().unwrap_or("(none)").to_string(), l.source_topic().unwrap_or("(none)").to_string());
            if groups.len() < MAX_GROUPS || groups.contains_key(&k) {
                *groups.entry(k).or_default() += 1;
            } else {
                other += 1;
            }
            std::ops::ControlFlow::Continue(())
        })
        .await?;
        println!("{logical} ({topic}): {total} letter(s), {redriven} of them re-driven before");
        for ((reason, source), n) in &groups {
            println!("  {n:>8}  {reason:<28} from {source}");
        }
        if other > 0 {
            println!("  {other:>8}  (other reasons and sources past the first {MAX_GROUPS})");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(select: &Select, limit: usize, infra: &Infra) -> anyhow::Result<ExitCode> {
    let topo = topology_with_running_prefix(infra)?;
    let filters = select.filters(&topo)?;
    let kafka = infra.kafka(brokers(infra)?)?;
    let registry = match registry_url(infra).and_then(|u| infra.registry(u)) {
        Ok(endpoint) => Some(RegistryClient::new(endpoint)?),
        Err(e) => {
            eprintln!("warning: values are shown as bytes: {e:#}");
            None
        }
    };
    let mut shown = 0usize;
    for logical in dead_letter_topics(&topo, &select.dlqs, true)? {
        let topic = topo.topic_name(&logical);
        let ranges = letters::ranges(&kafka, &topic)?;
        let mut picked = Vec::new();
        letters::read(&kafka, &topic, &ranges, |l| {
            if filters.matches(&l) {
                picked.push(l);
            }
            if shown + picked.len() >= limit {
                std::ops::ControlFlow::Break(())
            } else {
                std::ops::ControlFlow::Continue(())
            }
        })
        .await?;
        for l in picked {
            shown += 1;
            println!("{}", l.describe(registry.as_ref()).await);
        }
        if shown >= limit {
            break;
        }
    }
    eprintln!("{shown} letter(s) shown.");
    Ok(ExitCode::SUCCESS)
}

/// Purge is the broker's DeleteRecords: each partition's log start moves to the first letter to
/// keep. It cannot pick letters out of the middle of a log; a reason or key filter is refused.
async fn purge(logical: &str, before: Option<&str>, execute: bool, infra: &Infra) -> anyhow::Result<ExitCode> {
    let topo = topology_with_running_prefix(infra)?;
    dead_letter_topics(&topo, &[logical.to_string()], true)?;
    let topic = topo.topic_name(logical);
    let kafka = infra.kafka(brokers(infra)?)?;
    let ranges = letters::ranges(&kafka, &topic)?;
    let cut: BTreeMap<i32, i64> = match before {
        None => ranges.iter().map(|(p, (_, end))| (*p, *end)).collect(),
        Some(t) => {
            let at =
                parse_time(t, chrono::Utc::now().timestamp_millis()).map_err(anyhow::Error::msg).context("--before")?;
            let consumer: BaseConsumer = kafka.consumer(&letters::throwaway_group()).create()?;
            let mut tpl = TopicPartitionList::new();
            for p in ranges.keys() {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(at))?;
            }
            let found = consumer.offsets_for_times(tpl, KAFKA_TIMEOUT)?;
            ranges
                .iter()
                .map(|(p, (_, end))| {
                    // No letter at or after the time: everything there is older, up to the end.
                    let o = match found.find_partition(&topic, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        _ => *end,
                    };
                    (*p, o)
                })
                .collect()
        }
    };
    let mut total = 0i64;
    for (p, (start, end)) in &ranges {
        let upto = cut[p].clamp(*start, *end);
        total += upto - start;
        println!("{topic}[{p}]: letters [{start}, {end}); would delete [{start}, {upto}): {} letter(s)", upto - start);
    }
    if !execute {
        println!("dry run: {total} letter(s) would be deleted; add --execute to delete them.");
        return Ok(ExitCode::SUCCESS);
    }
    let admin: AdminClient<DefaultClientContext> = kafka.admin().create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, (start, end)) in &ranges {
        let upto = cut[p].clamp(*start, *end);
        if upto > *start {
            tpl.add_partition_offset(&topic, *p, Offset::Offset(upto))?;
        }
    }
    if tpl.count() == 0 {
        println!("nothing to delete.");
        return Ok(ExitCode::SUCCESS);
    }
    let done = admin.delete_records(&tpl, &AdminOptions::new().operation_timeout(Some(KAFKA_TIMEOUT))).await?;
    let mut failed = false;
    for e in done.elements() {
        match e.error() {
            Ok(()) => println!("{topic}[{}]: log now starts at {:?}", e.partition(), e.offset()),
            Err(err) => {
                failed = true;
                eprintln!("{topic}[{}]: not deleted: {err}", e.partition());
            }
        }
    }
    println!("{total} letter(s) deleted{}.", if failed { " in part" } else { "" });
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}
