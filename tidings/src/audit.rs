//! `tidings audit`: per time bucket, what persistence did with the notifications records of a time
//! range (in, stored, delivery-only, dead-lettered, still in flight) and what is missing, from the
//! topic, its dead-letter topic, the stage's stored offsets and the store's rows.

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
use tidings_store::Store;

use crate::endpoints::database_url;
use crate::offsets::{at_time, blocking, parse_time, REQUEST_TIMEOUT};
use crate::tools::{brokers, topology_with_running_prefix};
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
    /// The stage audited: persistence (its input `notifications` against the store).
    #[arg(long, value_enum, default_value = "persistence")]
    stage: AuditStage,
    /// Width of a time bucket: `<n>s`, `<n>m`, `<n>h` or `<n>d`.
    #[arg(long, default_value = "1m")]
    bucket: String,
    /// Most buckets one report may have (the range divided by the bucket width); a larger report
    /// is refused before anything is read.
    #[arg(long, env = "TIDINGS_AUDIT_MAX_BUCKETS", default_value_t = 10_000)]
    max_buckets: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    infra: Infra,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum AuditStage {
    Persistence,
}

/// One bucket's counts. `in` = `out` + `delivery_only` + `dead` + `in_flight` + `missing`.
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
struct Counts {
    /// Records on the topic with a timestamp in the bucket.
    #[serde(rename = "in")]
    read: u64,
    /// Stored: at least one row at the record's stream position.
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

/// A record of the audited range: partition, offset, timestamp (ms), delivery-only.
type Seen = (i32, i64, i64, bool);

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
    let AuditStage::Persistence = args.stage;
    let topo = topology_with_running_prefix(&args.infra)?;
    let spec = &topo.stages.persistence;
    let group = topo.group_name(&spec.group);
    let topic = topo.topic_name("notifications");
    let dlq = topo.topic_name(&spec.dead_letter);

    let kafka = args.infra.kafka(brokers(&args.infra)?)?;
    let make = move || -> anyhow::Result<BaseConsumer> {
        let mut cfg = kafka.admin();
        // Assign-only and never committed: this reader joins no group.
        cfg.set("group.id", format!("tidings-audit-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        Ok(cfg.create()?)
    };
    let (seen, dead) = {
        let (topic, dlq) = (topic.clone(), dlq.clone());
        blocking(move || {
            let reader = make()?;
            let seen = read_range(&reader, &topic, from, Some(to))?;
            // Dead letters are written after their record was read, so at or after `from`.
            let dead: HashSet<(i32, i64)> = read_range(&make()?, &dlq, from, None)
                .map(|letters| letters.into_iter().filter_map(|(.., src)| src).filter(|(t, ..)| *t == topic))?
                .map(|(_, p, o)| (p, o))
                .collect();
            Ok((seen.into_iter().map(|(p, o, ts, d, _)| (p, o, ts, d)).collect::<Vec<Seen>>(), dead))
        })
        .await?
    };
    let store = Store::connect(&database_url(&args.infra)).await?;
    let stored_offsets = store.load_offsets(&group, &topic).await?;
    let (lo, hi) = seen.iter().fold((i64::MAX, i64::MIN), |(lo, hi), s| (lo.min(s.1), hi.max(s.1)));
    let stored: HashSet<(i32, i64)> =
        if seen.is_empty() { HashSet::new() } else { store.stored_positions(lo..hi + 1).await?.into_iter().collect() };

    let mut by_bucket: BTreeMap<i64, Counts> = BTreeMap::new();
    for &(p, o, ts, delivery_only) in &seen {
        let c = by_bucket.entry((ts - from) / width).or_default();
        c.read += 1;
        if stored_offsets.get(&p).is_none_or(|next| o >= *next) {
            c.in_flight += 1;
        } else if delivery_only {
            c.delivery_only += 1;
        } else if dead.contains(&(p, o)) {
            c.dead += 1;
        } else if stored.contains(&(p, o)) {
            c.out += 1;
        } else {
            c.missing += 1;
        }
    }
    let mut total = Counts::default();
    let rows: Vec<Bucket> = by_bucket
        .iter()
        .map(|(i, c)| {
            total.add(c);
            Bucket { start: rfc3339(from + i * width), counts: *c }
        })
        .collect();
    if args.json {
        let report = serde_json::json!({
            "stage": "persistence", "topic": topic, "from": rfc3339(from), "to": rfc3339(to),
            "bucket_ms": width, "buckets": rows, "total": total,
        });
        println!("{report}");
    } else {
        println!("persistence: {topic} from {} to {} in buckets of {}", rfc3339(from), rfc3339(to), args.bucket);
        let line = |label: &str, c: &Counts| {
            println!(
                "{label:<26} {:>9} {:>9} {:>13} {:>7} {:>9} {:>8}",
                c.read, c.out, c.delivery_only, c.dead, c.in_flight, c.missing
            )
        };
        println!(
            "{:<26} {:>9} {:>9} {:>13} {:>7} {:>9} {:>8}",
            "BUCKET", "IN", "OUT", "DELIVERY-ONLY", "DEAD", "IN-FLIGHT", "MISSING"
        );
        for b in &rows {
            line(&b.start, &b.counts);
        }
        line("TOTAL", &total);
    }
    if total.missing > 0 {
        eprintln!("{} record(s) missing: read and processed, yet neither stored nor dead-lettered.", total.missing);
        return Ok(ExitCode::from(EXIT_MISSING));
    }
    Ok(ExitCode::SUCCESS)
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_else(|| ms.to_string())
}

/// A record read: partition, offset, timestamp, delivery-only, and for a dead letter the
/// coordinates of the record it copies.
type Read = (i32, i64, i64, bool, Option<(String, i32, i64)>);

/// The records of `topic` from the first at or after `from` to the first at or after `to` (the log's
/// end without one), each partition's bounds resolved once; only those timestamped inside the range.
fn read_range(reader: &BaseConsumer, topic: &str, from: i64, to: Option<i64>) -> anyhow::Result<Vec<Read>> {
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
        out.push((m.partition(), m.offset(), ts, delivery_only, source));
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
