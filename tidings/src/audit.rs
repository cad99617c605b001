//! `tidings audit`: per time bucket, what a stage did with the records of a time range: in, out,
//! delivery-only, dead-lettered, still in flight, and the rest (missing), from its input topics, its
//! dead-letter topic, its offsets and its output (templating: notifications; persistence: the rows).

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tidings_core::kafka::{header_str, H_DELIVERY_ONLY, H_DLQ_OFFSET, H_DLQ_PARTITION, H_DLQ_TOPIC};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::{Notification, RegistryClient};
use tidings_pipeline::topology::Topology;
use tidings_store::Store;

use crate::endpoints::database_url;
use crate::offsets::{at_time, blocking, REQUEST_TIMEOUT};
use crate::tools::parse_time;
use crate::tools::{brokers, registry_url, topology_with_running_prefix};
use crate::Infra;

/// Exit code when records are missing (read, not in flight, neither stored nor dead-lettered nor
/// delivery-only).
const EXIT_MISSING: u8 = 3;
/// How long reading a range may go without a record before it is given up.
const STALL: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct AuditArgs {
    /// Start of the range, inclusive (by record timestamp): RFC 3339 (`2026-11-20T00:00:00Z`) or
    /// relative to now (`-2h`, `-30m`, `-1d`).
    #[arg(long, allow_hyphen_values = true)]
    from: String,
    /// End of the range, exclusive; same forms. Default: now.
    #[arg(long, allow_hyphen_values = true)]
    to: Option<String>,
    /// The stage audited: templating (its inputs against the notifications produced from them) or
    /// persistence (`notifications` against the stored rows). Default: both.
    #[arg(long, value_enum)]
    stage: Option<AuditStage>,
    /// Width of a time bucket: `<n>s`, `<n>m`, `<n>h` or `<n>d`.
    #[arg(long, default_value = "1m")]
    bucket: String,
    /// Most buckets one report may have (the range divided by the bucket width); a larger report
    /// is refused before anything is read.
    #[arg(long, env = "TIDINGS_AUDIT_MAX_BUCKETS", default_value_t = 10_000)]
    max_buckets: u64,
    /// Most records one topic's read may hold (the range's records, or the dead letters and
    /// notifications since --from); past it the audit stops with an error: audit a shorter range.
    #[arg(long, env = "TIDINGS_AUDIT_MAX_RECORDS", default_value_t = 2_000_000)]
    max_records: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    infra: Infra,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AuditStage {
    Templating,
    Persistence,
}

/// One bucket's counts. `in` = `out` + `delivery_only` + `dead` + `in_flight` + `missing`. For
/// templating, `missing` also counts events that rightly made nothing (no template for their type,
/// every recipient opted out, held until a later time): it is reported, not an error.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
struct Counts {
    /// Records on the topic with a timestamp in the bucket.
    #[serde(rename = "in")]
    read: u64,
    /// Persistence: at least one row stored at the record's stream position. Templating: at least
    /// one notification produced from the record.
    out: u64,
    /// Delivery-only notifications: streamed, never stored, by design.
    delivery_only: u64,
    /// Copied to the stage's dead-letter topic.
    dead: u64,
    /// At or past the stage's stored offset: not processed yet.
    in_flight: u64,
    /// Processed, yet neither stored nor dead-lettered nor delivery-only.
    missing: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.read += o.read;
        self.out += o.out;
        self.delivery_only += o.delivery_only;
        self.dead += o.dead;
        self.in_flight += o.in_flight;
        self.missing += o.missing;
    }
}

#[derive(Serialize)]
struct Bucket {
    start: String,
    #[serde(flatten)]
    counts: Counts,
}

#[derive(Serialize)]
struct StageReport {
    stage: &'static str,
    topics: Vec<String>,
    buckets: Vec<Bucket>,
    total: Counts,
}

/// A record of the audited range: topic, partition, offset, timestamp (ms), delivery-only.
type Seen = (String, i32, i64, i64, bool);

/// Width of a bucket in milliseconds.
fn parse_bucket(s: &str) -> Result<i64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| format!("--bucket {s:?}: expected <number><s|m|h|d>, e.g. 1m"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("--bucket {s:?}: the unit must be s, m, h or d")),
    };
    match n.checked_mul(unit_ms) {
        Some(ms) if ms > 0 => Ok(ms),
        _ => Err(format!("--bucket {s:?} must be positive")),
    }
}

pub async fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let usage = |msg: String| {
        eprintln!("error: {msg}");
        Ok(ExitCode::from(64))
    };
    let now = chrono::Utc::now().timestamp_millis();
    let from = match parse_time(&args.from, now) {
        Ok(t) => t,
        Err(e) => return usage(format!("--from {e}")),
    };
    let to = match args.to.as_deref().map(|t| parse_time(t, now)).transpose() {
        Ok(t) => t.unwrap_or(now),
        Err(e) => return usage(format!("--to {e}")),
    };
    if from >= to {
        return usage(format!("--from ({}) must be before --to ({})", rfc3339(from), rfc3339(to)));
    }
    let width = match parse_bucket(&args.bucket) {
        Ok(w) => w,
        Err(e) => return usage(e),
    };
    let buckets = u64::try_from((to - from + width - 1) / width).unwrap_or(u64::MAX);
    if buckets > args.max_buckets {
        return usage(format!(
            "{buckets} buckets of {} in the range; at most {} (--max-buckets): choose a wider --bucket",
            args.bucket, args.max_buckets
        ));
    }
    let topo = topology_with_running_prefix(&args.infra)?;
    let stages = match args.stage {
        Some(s) => vec![s],
        None => vec![AuditStage::Templating, AuditStage::Persistence],
    };
    let range = Range { from, to, width, max_records: args.max_records };
    let mut reports = Vec::new();
    for stage in stages {
        reports.push(match stage {
            AuditStage::Templating => templating(&args.infra, &topo, range).await?,
            AuditStage::Persistence => persistence(&args.infra, &topo, range).await?,
        });
    }
    if args.json {
        let report = serde_json::json!({
            "from": rfc3339(from), "to": rfc3339(to), "bucket_ms": width, "stages": reports,
        });
        println!("{report}");
    } else {
        for r in &reports {
            print_report(r, range, &args.bucket);
        }
    }
    let lost = reports.iter().find(|r| r.stage == "persistence").map_or(0, |r| r.total.missing);
    if lost > 0 {
        eprintln!("{lost} record(s) missing: read and processed by persistence, yet neither stored nor dead-lettered.");
        return Ok(ExitCode::from(EXIT_MISSING));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Clone, Copy)]
struct Range {
    from: i64,
    to: i64,
    width: i64,
    max_records: usize,
}

fn print_report(r: &StageReport, range: Range, bucket: &str) {
    println!(
        "{}: {} from {} to {} in buckets of {bucket}",
        r.stage,
        r.topics.join(", "),
        rfc3339(range.from),
        rfc3339(range.to)
    );
    let line = |label: &str, c: &Counts| {
        println!(
            "{label:<26} {:>9} {:>9} {:>13} {:>7} {:>9} {:>8}",
            c.read, c.out, c.delivery_only, c.dead, c.in_flight, c.missing
        )
    };
    let last = if r.stage == "templating" { "NO-OUTPUT" } else { "MISSING" };
    println!(
        "{:<26} {:>9} {:>9} {:>13} {:>7} {:>9} {:>8}",
        "BUCKET", "IN", "OUT", "DELIVERY-ONLY", "DEAD", "IN-FLIGHT", last
    );
    for b in &r.buckets {
        line(&b.start, &b.counts);
    }
    line("TOTAL", &r.total);
}

/// A reader of explicit ranges: assign-only, never committed, in no group.
fn reader(kafka: &tidings_core::kafka::KafkaConfig) -> anyhow::Result<BaseConsumer> {
    let mut cfg = kafka.admin();
    cfg.set("group.id", format!("tidings-audit-{}", uuid::Uuid::new_v4().simple()))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    Ok(cfg.create()?)
}

/// The source coordinates (topic, partition, offset) of the dead letters on `dlq` since `from`.
fn dead_letters(
    kafka: &tidings_core::kafka::KafkaConfig,
    dlq: &str,
    range: Range,
) -> anyhow::Result<HashSet<(String, i32, i64)>> {
    // Dead letters are written after their record was read, so at or after `from`.
    Ok(read_range(&reader(kafka)?, dlq, range.from, None, false, range.max_records)?
        .into_iter()
        .filter_map(|r| r.source)
        .collect())
}

/// Buckets `seen` by timestamp, each record classified by `class`.
fn report(
    stage: &'static str,
    topics: Vec<String>,
    range: Range,
    seen: &[Seen],
    class: impl Fn(&Seen) -> Class,
) -> StageReport {
    let mut by_bucket: BTreeMap<i64, Counts> = BTreeMap::new();
    for s in seen {
        let c = by_bucket.entry((s.3 - range.from) / range.width).or_default();
        c.read += 1;
        match class(s) {
            Class::InFlight => c.in_flight += 1,
            Class::DeliveryOnly => c.delivery_only += 1,
            Class::Dead => c.dead += 1,
            Class::Out => c.out += 1,
            Class::Missing => c.missing += 1,
        }
    }
    let mut total = Counts::default();
    let buckets = by_bucket
        .iter()
        .map(|(i, c)| {
            total.add(c);
            Bucket { start: rfc3339(range.from + i * range.width), counts: *c }
        })
        .collect();
    StageReport { stage, topics, buckets, total }
}

enum Class {
    InFlight,
    DeliveryOnly,
    Dead,
    Out,
    Missing,
}

/// Templating: its inputs' records against its committed offsets, its dead letters and the source
/// coordinates of the notifications produced since `from`.
async fn templating(infra: &Infra, topo: &Topology, range: Range) -> anyhow::Result<StageReport> {
    let spec = &topo.stages.templating;
    let group = topo.group_name(&spec.group);
    let topics: Vec<String> = spec.inputs.iter().map(|t| topo.topic_name(t)).collect();
    let output = topo.topic_name(&spec.output);
    let dlq = topo.topic_name(&spec.dead_letter);
    let kafka = infra.kafka(brokers(infra)?)?;
    let (seen, committed, dead, produced) = {
        let topics = topics.clone();
        blocking(move || {
            let r = reader(&kafka)?;
            let mut seen = Vec::new();
            for t in &topics {
                seen.extend(
                    read_range(&r, t, range.from, Some(range.to), false, range.max_records)?
                        .into_iter()
                        .map(Read::seen),
                );
            }
            let mut tpl = TopicPartitionList::new();
            for s in &seen {
                if tpl.find_partition(&s.0, s.1).is_none() {
                    tpl.add_partition(&s.0, s.1);
                }
            }
            let mut cfg = kafka.admin();
            cfg.set("group.id", &group).set("enable.auto.commit", "false");
            let client: BaseConsumer = cfg.create()?;
            let committed: HashMap<(String, i32), i64> = client
                .committed_offsets(tpl, REQUEST_TIMEOUT)
                .context("reading templating's committed offsets")?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect();
            let dead = dead_letters(&kafka, &dlq, range)?;
            let produced = read_range(&reader(&kafka)?, &output, range.from, None, true, range.max_records)?;
            Ok((seen, committed, dead, produced))
        })
        .await?
    };
    let registry = RegistryClient::new(infra.registry(registry_url(infra)?)?)?;
    let mut sources: HashSet<(String, i32, i64)> = HashSet::new();
    for r in produced {
        let Some(payload) = r.payload else { continue };
        // A record that does not decode is persistence's to dead-letter; it names no source here.
        if let Ok(n) = registry
            .decode_as(&payload, &NOTIFICATION_SCHEMA, Notification::decode_datum, Notification::from_value)
            .await
        {
            sources.insert((n.source_topic, n.source_partition, n.source_offset));
        }
    }
    Ok(report("templating", topics, range, &seen, |s| {
        let key = (s.0.clone(), s.1, s.2);
        if committed.get(&(s.0.clone(), s.1)).is_none_or(|next| s.2 >= *next) {
            Class::InFlight
        } else if dead.contains(&key) {
            Class::Dead
        } else if sources.contains(&key) {
            Class::Out
        } else {
            Class::Missing
        }
    }))
}

/// Persistence: `notifications` against its stored offsets, its dead letters and the stored rows'
/// stream positions.
async fn persistence(infra: &Infra, topo: &Topology, range: Range) -> anyhow::Result<StageReport> {
    let spec = &topo.stages.persistence;
    let group = topo.group_name(&spec.group);
    let topic = topo.topic_name("notifications");
    let dlq = topo.topic_name(&spec.dead_letter);
    let kafka = infra.kafka(brokers(infra)?)?;
    let (seen, dead) = {
        let topic = topic.clone();
        blocking(move || {
            let seen: Vec<Seen> =
                read_range(&reader(&kafka)?, &topic, range.from, Some(range.to), false, range.max_records)?
                    .into_iter()
                    .map(Read::seen)
                    .collect();
            Ok((seen, dead_letters(&kafka, &dlq, range)?))
        })
        .await?
    };
    let store = Store::connect(&database_url(infra)).await?;
    let stored_offsets = store.load_offsets(&group, &topic).await?;
    let (lo, hi) = seen.iter().fold((i64::MAX, i64::MIN), |(lo, hi), s| (lo.min(s.2), hi.max(s.2)));
    let stored: HashSet<(i32, i64)> =
        if seen.is_empty() { HashSet::new() } else { store.stored_positions(lo..hi + 1).await?.into_iter().collect() };
    Ok(report("persistence", vec![topic.clone()], range, &seen, |s| {
        if stored_offsets.get(&s.1).is_none_or(|next| s.2 >= *next) {
            Class::InFlight
        } else if s.4 {
            Class::DeliveryOnly
        } else if dead.contains(&(s.0.clone(), s.1, s.2)) {
            Class::Dead
        } else if stored.contains(&(s.1, s.2)) {
            Class::Out
        } else {
            Class::Missing
        }
    }))
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_else(|| ms.to_string())
}

/// A record read.
struct Read {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp: i64,
    delivery_only: bool,
    /// For a dead letter: the coordinates of the record it copies.
    source: Option<(String, i32, i64)>,
    /// Kept only when asked for.
    payload: Option<Vec<u8>>,
}

impl Read {
    fn seen(self) -> Seen {
        (self.topic, self.partition, self.offset, self.timestamp, self.delivery_only)
    }
}

/// The records of `topic` from the first at or after `from` to the first at or after `to` (the log's
/// end without one), each partition's bounds resolved once; only those timestamped inside the range.
fn read_range(
    reader: &BaseConsumer,
    topic: &str,
    from: i64,
    to: Option<i64>,
    keep_payload: bool,
    limit: usize,
) -> anyhow::Result<Vec<Read>> {
    let md = reader.fetch_metadata(Some(topic), REQUEST_TIMEOUT).with_context(|| format!("metadata of {topic}"))?;
    let parts = match md.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => t.partitions().len(),
        _ => bail!("topic {topic} does not exist on the cluster"),
    };
    let mut ends = Vec::new();
    for p in 0..i32::try_from(parts).unwrap_or(i32::MAX) {
        let (_, high) = reader.fetch_watermarks(topic, p, REQUEST_TIMEOUT)?;
        ends.push((topic.to_string(), p, high));
    }
    let starts = at_time(reader, &ends, from)?;
    let stops = match to {
        Some(to) => at_time(reader, &ends, to)?,
        None => ends.iter().map(|e| e.2).collect(),
    };
    let mut want: HashMap<i32, (i64, i64)> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for ((_, p, _), (start, stop)) in ends.iter().zip(starts.into_iter().zip(stops)) {
        if start < stop {
            want.insert(*p, (start, stop));
            tpl.add_partition_offset(topic, *p, Offset::Offset(start))?;
        }
    }
    let mut out = Vec::new();
    if want.is_empty() {
        return Ok(out);
    }
    reader.assign(&tpl)?;
    let mut last = Instant::now();
    while !want.is_empty() {
        if last.elapsed() > STALL {
            bail!(
                "reading {topic} stalled for {STALL:?} with partitions {:?} unfinished",
                want.keys().collect::<Vec<_>>()
            );
        }
        let Some(m) = reader.poll(Duration::from_millis(500)) else { continue };
        let m = m.with_context(|| format!("reading {topic}"))?;
        last = Instant::now();
        let Some(&(_, stop)) = want.get(&m.partition()) else { continue };
        if m.offset() >= stop {
            want.remove(&m.partition());
            continue;
        }
        if m.offset() + 1 >= stop {
            want.remove(&m.partition());
        }
        let ts = m.timestamp().to_millis().unwrap_or(i64::MIN);
        if ts < from || to.is_some_and(|to| ts >= to) {
            continue;
        }
        let headers = m.headers();
        let h = |k: &str| headers.and_then(|h| header_str(h, k));
        let delivery_only = h(H_DELIVERY_ONLY) == Some("true");
        let source = match (
            h(H_DLQ_TOPIC),
            h(H_DLQ_PARTITION).and_then(|p| p.parse().ok()),
            h(H_DLQ_OFFSET).and_then(|o| o.parse().ok()),
        ) {
            (Some(t), Some(p), Some(o)) => Some((t.to_string(), p, o)),
            _ => None,
        };
        if out.len() >= limit {
            bail!("more than {limit} records to read on {topic} (--max-records): audit a shorter range");
        }
        out.push(Read {
            topic: topic.to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp: ts,
            delivery_only,
            source,
            payload: if keep_payload { m.payload().map(<[u8]>::to_vec) } else { None },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_parse() {
        assert_eq!(parse_bucket("1m"), Ok(60_000));
        assert_eq!(parse_bucket("30s"), Ok(30_000));
        assert_eq!(parse_bucket("2h"), Ok(7_200_000));
        assert!(parse_bucket("0m").is_err());
        assert!(parse_bucket("1y").unwrap_err().contains("unit"));
        assert!(parse_bucket("m").is_err());
    }
}
