//! A consumer group's lag per partition in messages and in seconds, exact from the timestamp of
//! the record at its position (read by a consumer outside the group, within a deadline): for
//! `tidings status` ([`LagReader`]) and for every process's lag gauges ([`observe`]).

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
        let behind: Vec<(String, i32, i64)> =
            out.iter().filter(|l| l.seconds.is_none()).map(|l| (l.topic.clone(), l.partition, l.position)).collect();
        if !behind.is_empty() {
            let seconds = self.seconds_at(&behind, deadline);
            for l in out.iter_mut().filter(|l| l.seconds.is_none()) {
                l.seconds = seconds.get(&(l.topic.clone(), l.partition)).copied();
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

    /// Seconds behind of each of `at` (topic, partition, position): now minus the timestamp of
    /// the first record at or after the position, or 0 when there is none (only transaction
    /// markers follow it). Read until `deadline`; partitions not answered by then are missing.
    pub fn seconds_at(&self, at: &[(String, i32, i64)], deadline: Instant) -> HashMap<(String, i32), f64> {
        let mut out = HashMap::new();
        let mut topics: Vec<&str> = at.iter().map(|(t, _, _)| t.as_str()).collect();
        topics.sort_unstable();
        topics.dedup();
        let now = now_ms();
        // One topic at a time: an end-of-partition event names only the partition.
        for topic in topics {
            let want: HashMap<i32, i64> = at.iter().filter(|(t, _, _)| t == topic).map(|(_, p, o)| (*p, *o)).collect();
            for (partition, ts) in self.timestamps(topic, &want, deadline) {
                out.insert((topic.to_string(), partition), ts.map_or(0.0, |ts| (now - ts).max(0) as f64 / 1000.0));
            }
        }
        out
    }

    /// The timestamp (ms) of the first record at or after each position of `topic`'s partitions
    /// (`None`: no record there, the partition ended first), read until `deadline`; partitions not
    /// answered by then, or whose record has no timestamp, are missing from the answer.
    fn timestamps(&self, topic: &str, want: &HashMap<i32, i64>, deadline: Instant) -> HashMap<i32, Option<i64>> {
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in want {
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset));
        }
        let mut got = HashMap::new();
        if self.records.assign(&tpl).is_err() {
            return got;
        }
        let mut pending = want.len();
        while pending > 0 {
            let wait = left(deadline);
            if wait.is_zero() {
                break;
            }
            let (partition, ts) = match self.records.poll(wait.min(Duration::from_millis(100))) {
                Some(Ok(m)) => {
                    // A record fetched before this assignment (an earlier read) is older than the position.
                    if m.topic() != topic || want.get(&m.partition()).is_none_or(|&o| m.offset() < o) {
                        continue;
                    }
                    let ts = match m.timestamp() {
                        Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) if t >= 0 => Some(Some(t)),
                        _ => None,
                    };
                    (m.partition(), ts)
                }
                Some(Err(KafkaError::PartitionEOF(p))) => (p, Some(None)),
                _ => continue,
            };
            if !want.contains_key(&partition) || got.contains_key(&partition) {
                continue;
            }
            pending -= 1;
            if let Some(ts) = ts {
                got.insert(partition, ts);
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
        // The end of a partition says no record follows a position (only transaction markers).
        .set("enable.partition.eof", "true")
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

/// Where a consumer of this process stands on one partition, from its statistics report
/// (librdkafka's −1001 for "not known" is `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub topic: String,
    pub partition: i32,
    /// The offset the stage stored (for Kafka to commit).
    pub stored: Option<i64>,
    pub committed: Option<i64>,
    /// The next offset handed to the stage.
    pub consumed: Option<i64>,
    /// The log's first offset.
    pub low: Option<i64>,
    /// The last stable offset (the end a read_committed consumer sees), else the high watermark.
    pub end: Option<i64>,
}

impl Standing {
    /// The position lag counts from: the stored offset, else the one the stage made `durable`,
    /// else the committed one, else (a group that commits nothing, like delivery) the next offset
    /// handed to the stage; raised to the log's first offset (records below it are gone).
    pub fn position(&self, durable: Option<i64>) -> Option<i64> {
        let at = self.stored.or(durable).or(self.committed).or(self.consumed)?;
        Some(self.low.map_or(at, |low| at.max(low)))
    }
}

/// Next offsets that stages keeping their offsets outside Kafka (persistence, claims) made
/// durable, per group, topic and partition: only partitions this process holds (see [`forget`]).
static DURABLE: std::sync::Mutex<Option<HashMap<GroupPartition, i64>>> = std::sync::Mutex::new(None);

/// A group, a topic and one of its partitions.
type GroupPartition = (String, String, i32);

/// Says that `group`'s work on `topic`/`partition` is durable up to `next` (the next offset to
/// read): what a stage keeping its offsets in its database stored on assignment or after a batch.
/// It is the position lag is counted from, ahead of the Kafka commit that may follow it.
pub fn durable(group: &str, topic: &str, partition: i32, next: i64) {
    let mut map = DURABLE.lock().unwrap_or_else(|e| e.into_inner());
    map.get_or_insert_with(HashMap::new).insert((group.to_string(), topic.to_string(), partition), next);
}

/// Forgets the durable positions of partitions `group` no longer holds.
pub fn forget<'a>(group: &str, partitions: impl IntoIterator<Item = (&'a str, i32)>) {
    let mut map = DURABLE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(map) = map.as_mut() {
        for (topic, partition) in partitions {
            map.remove(&(group.to_string(), topic.to_string(), partition));
        }
    }
}

/// The partitions a consumer holds by its statistics report, and where it stands on each.
pub fn standings(s: &rdkafka::Statistics) -> Vec<Standing> {
    let known = |o: i64| (o >= 0).then_some(o);
    let mut out = Vec::new();
    for (topic, t) in &s.topics {
        for p in t.partitions.values().filter(|p| p.partition >= 0 && p.desired) {
            out.push(Standing {
                topic: topic.clone(),
                partition: p.partition,
                stored: known(p.stored_offset),
                committed: known(p.committed_offset),
                consumed: known(p.app_offset),
                low: known(p.lo_offset),
                end: known(p.ls_offset).or(known(p.hi_offset)),
            });
        }
    }
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    out
}

/// `(topic, partition, position, end)` of each of `standings`, with `group`'s durable positions.
pub fn positions(group: &str, standings: &[Standing]) -> Vec<(String, i32, Option<i64>, Option<i64>)> {
    let map = DURABLE.lock().unwrap_or_else(|e| e.into_inner());
    standings
        .iter()
        .map(|s| {
            let kept = map.as_ref().and_then(|m| m.get(&(group.to_string(), s.topic.clone(), s.partition)).copied());
            (s.topic.clone(), s.partition, s.position(kept), s.end)
        })
        .collect()
}

/// The brokers the lag readers use; unset, no reader threads run.
static GAUGES_FROM: std::sync::OnceLock<KafkaConfig> = std::sync::OnceLock::new();
/// One reader thread per consumer group of this process (the groups of its stages: a handful).
static WORKERS: std::sync::Mutex<Option<HashMap<String, std::sync::mpsc::SyncSender<Vec<Standing>>>>> =
    std::sync::Mutex::new(None);
/// How long one refresh may read records for.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// A consumer busy in a long write is not polled, so its reports stop: once two intervals passed
/// without one, the reader refreshes by itself this often (watermarks, durable positions, records).
const IDLE_REFRESH: Duration = Duration::from_secs(3);

/// Turns on reader threads that keep `kafka_consumergroup_lag{consumergroup,topic,partition}`,
/// `kafka_consumergroup_lag_sum`, `kafka_consumergroup_lag_seconds{consumergroup,topic,partition}`
/// and `kafka_consumergroup_lag_seconds_max{consumergroup,topic}` for every group whose consumer
/// reports statistics ([`crate::consumer::StageContext::with_group`]), read with `cfg`'s brokers.
/// Once per process (the binary, at start); later calls change nothing.
pub fn enable_gauges(cfg: &KafkaConfig) {
    let _ = GAUGES_FROM.set(cfg.clone());
}

/// Hands a consumer's statistics to its group's reader thread, which sets the group's lag gauges
/// (reading the records at the positions of the partitions behind). Never blocks: a report that
/// comes while the previous one is still being read is skipped (the next one is as good). `false`
/// when no reader runs ([`enable_gauges`] was not called): the caller sets the gauges in messages.
pub fn observe(group: &str, s: &rdkafka::Statistics) -> bool {
    let Some(cfg) = GAUGES_FROM.get() else { return false };
    let mut workers = WORKERS.lock().unwrap_or_else(|e| e.into_inner());
    let workers = workers.get_or_insert_with(HashMap::new);
    if !workers.contains_key(group) {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Standing>>(1);
        let (cfg, name) = (cfg.clone(), group.to_string());
        let spawned =
            std::thread::Builder::new().name(format!("lag-{group}")).spawn(move || gauge_loop(&cfg, &name, rx));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "No thread for the lag of group {group}; its gauges come from the reports alone.");
            return false;
        }
        workers.insert(group.to_string(), tx);
    }
    if let Some(tx) = workers.get(group) {
        let _ = tx.try_send(standings(s));
    }
    true
}

fn gauge_loop(cfg: &KafkaConfig, group: &str, rx: std::sync::mpsc::Receiver<Vec<Standing>>) {
    let reader = match LagReader::new(cfg, group) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "No lag in seconds for group {group}: its reader could not start.");
            return;
        }
    };
    let mut last: Vec<Standing> = Vec::new();
    // When the last report came, and the time between the last two (the statistics interval;
    // tidings' default, client_stats::STATS_INTERVAL_MS, until two reports tell).
    let (mut reported, mut interval): (Option<Instant>, Duration) = (None, Duration::from_secs(10));
    loop {
        match rx.recv_timeout(IDLE_REFRESH) {
            Ok(report) => {
                if let Some(r) = reported {
                    interval = r.elapsed();
                }
                (last, reported) = (report, Some(Instant::now()));
            }
            // Reports are due: a refresh now would pair old positions with a newer end.
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if reported.is_none_or(|r| r.elapsed() < 2 * interval) => {
                continue
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // No report: the log's end moved on without the consumer knowing.
                let deadline = Instant::now() + REFRESH_TIMEOUT;
                for s in &mut last {
                    if let Ok((low, high)) = reader.records.fetch_watermarks(&s.topic, s.partition, left(deadline)) {
                        (s.low, s.end) = (Some(low), Some(high));
                    }
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let at = positions(group, &last);
        crate::client_stats::set_lag(group, &at);
        let lags = seconds_of(&reader, &at, Instant::now() + REFRESH_TIMEOUT);
        let mut max: HashMap<&str, f64> = HashMap::new();
        for (topic, partition, seconds) in &lags {
            let labels =
                [("consumergroup", group.to_string()), ("topic", topic.clone()), ("partition", partition.to_string())];
            metrics::gauge!("kafka_consumergroup_lag_seconds", &labels).set(*seconds);
            let m = max.entry(topic.as_str()).or_insert(0.0);
            *m = m.max(*seconds);
        }
        for (topic, max) in max {
            let labels = [("consumergroup", group.to_string()), ("topic", topic.to_string())];
            metrics::gauge!("kafka_consumergroup_lag_seconds_max", &labels).set(max);
        }
    }
}

/// Seconds behind per partition of `at` (`(topic, partition, position, end)`, see [`positions`])
/// whose position and end are known: 0 when caught up (no record read), else from the record at
/// the position; partitions not read in time are left out (unknown), so neither a gauge nor a
/// maximum counts them.
pub fn seconds_of(
    reader: &LagReader,
    at: &[(String, i32, Option<i64>, Option<i64>)],
    deadline: Instant,
) -> Vec<(String, i32, f64)> {
    let mut out = Vec::new();
    let mut behind = Vec::new();
    for (topic, partition, position, end) in at {
        let (Some(position), Some(end)) = (*position, *end) else { continue };
        if position >= end {
            out.push((topic.clone(), *partition, 0.0));
        } else {
            behind.push((topic.clone(), *partition, position));
        }
    }
    if !behind.is_empty() {
        let seconds = reader.seconds_at(&behind, deadline);
        for (topic, partition, _) in behind {
            if let Some(&x) = seconds.get(&(topic.clone(), partition)) {
                out.push((topic, partition, x));
            }
        }
    }
    out
}
