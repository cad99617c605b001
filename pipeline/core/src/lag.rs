//! A consumer group's lag per partition, in messages and in seconds: committed offsets and
//! watermarks from the brokers, and the timestamp of the first record the group has not yet
//! consumed, read by a consumer outside the group assigned at that offset. Blocking, and bounded in time.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, Timestamp};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::KafkaConfig;

/// One partition's lag.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (the next record it will read); `None` when it has none.
    pub committed: Option<i64>,
    /// The log's first offset (records below it were removed by retention).
    pub low: i64,
    /// The log's end (the offset the next record will get).
    pub high: i64,
    /// Where the group reads next: its committed offset, or the log's first offset when it has no
    /// commit or its commit was removed by retention (every tidings group resets to earliest).
    pub position: i64,
    /// Records from `position` to the log's end.
    pub messages: i64,
    /// Now minus the timestamp of the record at `position` (0 when caught up; never negative);
    /// `None` when that record could not be read in time or carries no timestamp.
    pub seconds: Option<f64>,
}

/// Why the lag could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("Kafka client for the lag of group {group}: {source}")]
    Client { group: String, source: KafkaError },
    #[error("no metadata for topic {topic} within the lag deadline: {source}")]
    Metadata { topic: String, source: KafkaError },
    #[error("topic {topic} does not exist")]
    NoTopic { topic: String },
    #[error("the committed offsets of group {group} did not arrive in time: {source}")]
    Committed { group: String, source: KafkaError },
    #[error("the watermarks of {topic}/{partition} did not arrive in time: {source}")]
    Watermarks { topic: String, partition: i32, source: KafkaError },
}

/// Reads one group's lag; keep it to read again (its clients stay connected).
pub struct LagReader {
    group: String,
    /// Carries the group id only to fetch its committed offsets: it never subscribes, never commits.
    offsets: BaseConsumer,
    /// Outside the group: watermarks, metadata and the records at the group's positions.
    records: BaseConsumer,
}

impl LagReader {
    /// Clients for `group` with `cfg`'s brokers and security settings.
    pub fn new(cfg: &KafkaConfig, group: &str) -> Result<Self, LagError> {
        let client = |source| LagError::Client { group: group.to_string(), source };
        let mut offsets = reader_config(cfg);
        offsets.set("group.id", group);
        let offsets: BaseConsumer = offsets.create().map_err(client)?;
        // librdkafka assigns only in a consumer with a group id; this one never joins its group
        // nor commits, so the broker keeps nothing under that name.
        let mut records = reader_config(cfg);
        records.set("group.id", READER_GROUP);
        let records: BaseConsumer = records.create().map_err(client)?;
        Ok(LagReader { group: group.to_string(), offsets, records })
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// The group's lag on every partition of `topics`, from its offsets committed in Kafka.
    /// Done within about `timeout`; a record not read by then leaves its `seconds` unknown.
    pub fn read(&self, topics: &[&str], timeout: Duration) -> Result<Vec<PartitionLag>, LagError> {
        let deadline = Instant::now() + timeout;
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            for partition in self.partitions(topic, deadline)? {
                tpl.add_partition(topic, partition);
            }
        }
        if tpl.count() == 0 {
            return Ok(Vec::new());
        }
        let committed = self
            .offsets
            .committed_offsets(tpl, left(deadline))
            .map_err(|source| LagError::Committed { group: self.group.clone(), source })?;
        let positions: Vec<(String, i32, Option<i64>)> = committed
            .elements()
            .iter()
            .map(|e| {
                let at = match e.offset() {
                    Offset::Offset(n) if n >= 0 => Some(n),
                    _ => None,
                };
                (e.topic().to_string(), e.partition(), at)
            })
            .collect();
        self.read_at(&positions, left(deadline))
    }

    /// The lag of the given partitions from committed positions the caller knows (a stage that
    /// keeps its offsets in its database): `(topic, partition, next offset or None)`.
    pub fn read_at(
        &self,
        positions: &[(String, i32, Option<i64>)],
        timeout: Duration,
    ) -> Result<Vec<PartitionLag>, LagError> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(positions.len());
        for (topic, partition, committed) in positions {
            let (low, high) = self
                .records
                .fetch_watermarks(topic, *partition, left(deadline))
                .map_err(|source| LagError::Watermarks { topic: topic.clone(), partition: *partition, source })?;
            let position = match committed {
                Some(c) if *c >= low => (*c).min(high),
                _ => low,
            };
            let messages = high - position;
            let seconds = (messages == 0).then_some(0.0);
            out.push(PartitionLag {
                topic: topic.clone(),
                partition: *partition,
                committed: *committed,
                low,
                high,
                position,
                messages,
                seconds,
            });
        }
        let behind: Vec<usize> = (0..out.len()).filter(|&i| out[i].seconds.is_none()).collect();
        if !behind.is_empty() {
            let stamps =
                self.timestamps(behind.iter().map(|&i| (&out[i].topic, out[i].partition, out[i].position)), deadline);
            let now = now_ms();
            for i in behind {
                let key = (out[i].topic.clone(), out[i].partition);
                out[i].seconds = stamps.get(&key).map(|ts| (now - ts).max(0) as f64 / 1000.0);
            }
        }
        Ok(out)
    }

    fn partitions(&self, topic: &str, deadline: Instant) -> Result<Vec<i32>, LagError> {
        let md = self
            .records
            .fetch_metadata(Some(topic), left(deadline))
            .map_err(|source| LagError::Metadata { topic: topic.to_string(), source })?;
        let t = md.topics().iter().find(|t| t.name() == topic);
        match t {
            Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                Ok(t.partitions().iter().map(|p| p.id()).collect())
            }
            _ => Err(LagError::NoTopic { topic: topic.to_string() }),
        }
    }

    /// The timestamp (ms) of the first record at or after each position, read until `deadline`;
    /// partitions whose record did not arrive are missing from the answer.
    fn timestamps<'a>(
        &self,
        at: impl Iterator<Item = (&'a String, i32, i64)>,
        deadline: Instant,
    ) -> HashMap<(String, i32), i64> {
        let mut tpl = TopicPartitionList::new();
        let mut want: HashMap<(String, i32), i64> = HashMap::new();
        for (topic, partition, offset) in at {
            if tpl.add_partition_offset(topic, partition, Offset::Offset(offset)).is_ok() {
                want.insert((topic.clone(), partition), offset);
            }
        }
        let mut got = HashMap::new();
        if self.records.assign(&tpl).is_err() {
            return got;
        }
        while got.len() < want.len() {
            let wait = left(deadline);
            if wait.is_zero() {
                break;
            }
            let Some(Ok(m)) = self.records.poll(wait.min(Duration::from_millis(100))) else { continue };
            let key = (m.topic().to_string(), m.partition());
            // A record fetched before this assignment (an earlier read) is older than the position.
            if got.contains_key(&key) || want.get(&key).is_none_or(|&o| m.offset() < o) {
                continue;
            }
            let ts = match m.timestamp() {
                Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) if t >= 0 => Some(t),
                _ => None,
            };
            if let Some(ts) = ts {
                got.insert(key, ts);
            } else {
                // Unknown for good: stop waiting for it.
                want.remove(&key);
            }
        }
        // Nothing stays assigned between reads: no prefetching for nobody.
        let _ = self.records.unassign();
        got
    }
}

/// `group`'s lag on every partition of `topics` (see [`LagReader::read`]), with clients made for
/// this one call.
pub fn group_lag(
    cfg: &KafkaConfig,
    group: &str,
    topics: &[&str],
    timeout: Duration,
) -> Result<Vec<PartitionLag>, LagError> {
    LagReader::new(cfg, group)?.read(topics, timeout)
}

/// The group id of the record reader, which never joins it (it assigns partitions itself).
const READER_GROUP: &str = "tidings-lag-reader";

/// A consumer that never commits and fetches little: one record per partition is all it needs.
fn reader_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = cfg.admin();
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("queued.min.messages", "1")
        .set("max.partition.fetch.bytes", "65536");
    c
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
