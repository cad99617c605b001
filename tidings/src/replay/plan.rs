//! A replay's plan: `--from`/`--to` (times or offsets) resolved to per-partition `[start, end)`
//! offsets once, when the replay is planned, and stored with it, so a resume reads the same
//! ranges. The rules are in [`resolve`] and tested below.

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long one broker request (metadata, watermarks, offsets for times) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Metadata requests before a topic that answers with an error is called unknown.
const METADATA_ATTEMPTS: u32 = 4;

/// Input no broker or database state can make work (exit 64): an unknown topic or partition,
/// `--from` after `--to`, a range below the log start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// One end of the range as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// Milliseconds since the Unix epoch: the first record whose timestamp is at or after it.
    Time(i64),
    /// An offset, the same on every partition replayed.
    Offset(i64),
    /// The partition's end when planned (`--to` left out).
    End,
}

/// What the broker answered for one bound on one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// offsets-for-times: the first record at or after the time, or `None` when there is none.
    Time(Option<i64>),
    Offset(i64),
    End,
}

/// One partition's range, as planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionPlan {
    pub partition: i32,
    /// The log's first and next offsets when planned.
    pub log_start: i64,
    pub log_end: i64,
    /// `[start, end)`.
    pub start: i64,
    pub end: i64,
}

impl PartitionPlan {
    pub fn len(&self) -> i64 {
        (self.end - self.start).max(0)
    }
}

/// A resolved plan: the physical topic and each partition's range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub topic: String,
    pub partitions: Vec<PartitionPlan>,
}

impl Plan {
    pub fn offsets(&self) -> i64 {
        self.partitions.iter().map(PartitionPlan::len).sum()
    }
}

/// Refuses bounds that cannot make a range whatever the log holds: `--from` after `--to`.
pub fn check_bounds(from: Bound, to: Bound) -> Result<(), String> {
    match (from, to) {
        (Bound::Time(f), Bound::Time(t)) if f > t => {
            Err(format!("--from ({}) is after --to ({}): nothing to replay", millis_rfc3339(f), millis_rfc3339(t)))
        }
        (Bound::Offset(f), Bound::Offset(t)) if f > t => {
            Err(format!("--from-offset {f} is after --to-offset {t}: nothing to replay"))
        }
        (Bound::Offset(o), _) | (_, Bound::Offset(o)) if o < 0 => Err(format!("offset {o} is negative")),
        _ => Ok(()),
    }
}

pub fn millis_rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| ms.to_string(), |t| t.to_rfc3339())
}

/// One partition's `[start, end)` from the broker's answers, by these rules:
/// - `--from` is inclusive: the first record at or after the time (or the offset itself);
/// - `--to` is exclusive: the first record at or after that time is not replayed;
/// - a time with no record at or after it resolves to the partition's end, never to 0 (so a
///   `--from` later than every record is an empty range at the end);
/// - an offset before the log's start is refused, naming the log start (retention deleted it), as
///   is a time range that ends at or before a log start above 0;
/// - an end past the log's end is the log's end (what is there when planned).
pub fn resolve(partition: i32, log_start: i64, log_end: i64, from: Found, to: Found) -> Result<PartitionPlan, String> {
    let retention = |what: String| {
        format!(
            "partition {partition}: {what} is below the log start (offset {log_start}): those records were \
             deleted by retention and cannot be replayed"
        )
    };
    let start = match from {
        Found::Time(Some(o)) => o,
        Found::Time(None) | Found::End => log_end,
        Found::Offset(o) if o < log_start => return Err(retention(format!("--from-offset {o}"))),
        Found::Offset(o) => o.min(log_end),
    };
    let end = match to {
        Found::Time(Some(o)) => o,
        Found::Time(None) | Found::End => log_end,
        Found::Offset(o) if o < log_start => return Err(retention(format!("--to-offset {o}"))),
        Found::Offset(o) => o.min(log_end),
    };
    if matches!(to, Found::Time(_)) && log_start > 0 && end <= log_start && log_start < log_end {
        return Err(retention("the range's end (--to)".into()));
    }
    Ok(PartitionPlan { partition, log_start, log_end, start, end: end.max(start) })
}

/// The topic's partitions (all, or `only`), each with its log bounds.
pub fn partitions(client: &BaseConsumer, topic: &str, only: &[i32]) -> anyhow::Result<Vec<(i32, i64, i64)>> {
    // A broker may answer a topic's metadata with a transient error (a leader election): asked
    // again a few times before the topic is called unknown.
    let mut all: Vec<i32> = Vec::new();
    for attempt in 0..METADATA_ATTEMPTS {
        let md = client.fetch_metadata(Some(topic), REQUEST_TIMEOUT).context("reading the topic's metadata")?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        match t.map(|t| (t.error(), t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())) {
            Some((None, ids)) if !ids.is_empty() => {
                all = ids;
                break;
            }
            Some((Some(e), _)) if attempt + 1 == METADATA_ATTEMPTS => {
                let code = e;
                if code != rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART {
                    anyhow::bail!("the metadata of topic {topic}: {}", rdkafka::error::RDKafkaErrorCode::from(code));
                }
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    if all.is_empty() {
        return Err(BadInput(format!("topic {topic} does not exist on the cluster")).into());
    }
    let mut out = Vec::new();
    let wanted: Vec<i32> = if only.is_empty() { all.clone() } else { only.to_vec() };
    for p in wanted {
        if !all.contains(&p) {
            return Err(BadInput(format!("topic {topic} has no partition {p} (it has {})", all.len())).into());
        }
        let (low, high) = client
            .fetch_watermarks(topic, p, REQUEST_TIMEOUT)
            .with_context(|| format!("reading the log bounds of {topic}[{p}]"))?;
        out.push((p, low, high));
    }
    out.sort_unstable();
    Ok(out)
}

/// Asks the broker once for each partition's answer to `bound`.
pub fn find(client: &BaseConsumer, topic: &str, parts: &[(i32, i64, i64)], bound: Bound) -> anyhow::Result<Vec<Found>> {
    let ms = match bound {
        Bound::Time(ms) => ms,
        Bound::Offset(o) => return Ok(vec![Found::Offset(o); parts.len()]),
        Bound::End => return Ok(vec![Found::End; parts.len()]),
    };
    let mut tpl = TopicPartitionList::new();
    for (p, _, _) in parts {
        tpl.add_partition_offset(topic, *p, Offset::Offset(ms))?;
    }
    let got = client.offsets_for_times(tpl, REQUEST_TIMEOUT).context("looking up offsets for the time")?;
    parts
        .iter()
        .map(|(p, _, _)| {
            let e = got.find_partition(topic, *p).with_context(|| format!("no answer for {topic}[{p}]"))?;
            if let Err(e) = e.error() {
                anyhow::bail!("offsets for times of {topic}[{p}]: {e}");
            }
            // The broker answers -1 (End) when no record is at or after the time.
            Ok(match e.offset() {
                Offset::Offset(o) if o >= 0 => Found::Time(Some(o)),
                _ => Found::Time(None),
            })
        })
        .collect()
}

/// Resolves `[from, to)` on the topic's partitions, asking the broker once per bound.
pub fn make(client: &BaseConsumer, topic: &str, only: &[i32], from: Bound, to: Bound) -> anyhow::Result<Plan> {
    check_bounds(from, to).map_err(BadInput)?;
    let parts = partitions(client, topic, only)?;
    let froms = find(client, topic, &parts, from)?;
    let tos = find(client, topic, &parts, to)?;
    let partitions = parts
        .iter()
        .zip(froms.into_iter().zip(tos))
        .map(|(&(p, low, high), (f, t))| resolve(p, low, high, f, t))
        .collect::<Result<Vec<_>, String>>()
        .map_err(BadInput)?;
    Ok(Plan { topic: topic.to_string(), partitions })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_with_no_record_after_it_resolves_to_the_end_never_to_zero() {
        // --from later than every record: an empty range at the end.
        let p = resolve(0, 0, 500, Found::Time(None), Found::End).unwrap();
        assert_eq!((p.start, p.end, p.len()), (500, 500, 0));
        let p = resolve(1, 0, 500, Found::Time(None), Found::Time(None)).unwrap();
        assert_eq!((p.start, p.end), (500, 500));
        // --to later than every record: up to the end.
        let p = resolve(0, 0, 500, Found::Time(Some(120)), Found::Time(None)).unwrap();
        assert_eq!((p.start, p.end), (120, 500));
    }

    #[test]
    fn from_is_inclusive_and_to_exclusive() {
        // offsets-for-times gives the first record at or after each time: the record at --from's
        // offset is replayed, the one at --to's is not.
        let p = resolve(0, 0, 100, Found::Time(Some(10)), Found::Time(Some(20))).unwrap();
        assert_eq!((p.start, p.end, p.len()), (10, 20, 10));
        let p = resolve(0, 0, 100, Found::Offset(10), Found::Offset(20)).unwrap();
        assert_eq!((p.start, p.end), (10, 20));
        // An offset end past the log's end is the log's end.
        let p = resolve(0, 0, 100, Found::Offset(90), Found::Offset(1_000)).unwrap();
        assert_eq!((p.start, p.end), (90, 100));
    }

    #[test]
    fn below_the_log_start_is_refused_naming_it() {
        let e = resolve(3, 40, 100, Found::Offset(10), Found::End).unwrap_err();
        assert!(e.contains("partition 3") && e.contains("log start (offset 40)") && e.contains("retention"), "{e}");
        let e = resolve(3, 40, 100, Found::Offset(40), Found::Offset(39)).unwrap_err();
        assert!(e.contains("--to-offset 39"), "{e}");
        // A time range ending at the log start: every record it covered was deleted.
        let e = resolve(0, 40, 100, Found::Time(Some(40)), Found::Time(Some(40))).unwrap_err();
        assert!(e.contains("log start (offset 40)"), "{e}");
        // From the log start on: fine.
        assert_eq!(resolve(0, 40, 100, Found::Time(Some(40)), Found::Time(Some(41))).unwrap().len(), 1);
    }

    #[test]
    fn from_after_to_is_refused_before_asking_the_broker() {
        assert!(check_bounds(Bound::Time(2_000), Bound::Time(1_000)).unwrap_err().contains("is after --to"));
        assert!(check_bounds(Bound::Offset(5), Bound::Offset(4)).is_err());
        assert!(check_bounds(Bound::Offset(-1), Bound::End).is_err());
        assert!(check_bounds(Bound::Time(1_000), Bound::Time(1_000)).is_ok(), "an empty range, not an error");
        assert!(check_bounds(Bound::Time(1_000), Bound::End).is_ok());
    }
}
