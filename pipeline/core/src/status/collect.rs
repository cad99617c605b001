//! Reads what a status report needs from Kafka: the instances' announcements (latest per key,
//! stale ones dropped), each group's members and lag per sample, and the dead letters by reason.
//! Every call blocks (run it on a blocking thread) and is bounded in time and memory.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::eval::{self, Liveness, Point, State};
use super::{
    Announcement, DeadLetterCount, GatewayStatus, GroupStatus, PartitionStatus, StageTopology, StatusReport,
    TopicPartition, STALE_AFTER,
};
use crate::kafka::{header_str, KafkaConfig, H_DLQ_REASON};
use crate::lag::{LagReader, PartitionLag};

/// How long one broker request of a sample may take.
const REQUEST: Duration = Duration::from_secs(5);
/// Announcements kept at most (the topic is compacted: one per live instance, plus tombstones).
const MAX_INSTANCES: usize = 10_000;
/// Letters read per dead-letter topic to count reasons (the newest); the total is always exact.
pub const MAX_COUNTED: i64 = 10_000;
/// Distinct reasons counted per topic; the rest are summed as "(other)".
const MAX_REASONS: usize = 100;
/// Announcements read (the newest): 20 a minute per instance, so minutes of a thousand instances.
const ANNOUNCEMENTS_READ: i64 = 20_000;

/// A consumer group the report covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSpec {
    pub stage: String,
    pub group: String,
    /// Its input topics (physical names).
    pub topics: Vec<String>,
    pub output: Option<String>,
    pub dead_letter: Option<String>,
    /// Whether it commits offsets to Kafka (delivery does not: it has no lag to read).
    pub commits: bool,
    /// Its offsets are kept in the database, not Kafka (the claim stage): the caller passes them
    /// to [`Collector::sample`]; without them its lag is not read.
    pub offsets_in_store: bool,
    /// Judged even when no instance ever announced it (templating, persistence); an optional
    /// stage is only judged once some instance runs it or the broker knows its group.
    pub required: bool,
}

/// What to report on (physical names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSpec {
    pub instances_topic: String,
    pub groups: Vec<GroupSpec>,
    pub dead_letters: Vec<String>,
}

/// One look at the system.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at_ms: i64,
    pub instances: Vec<Announcement>,
    pub groups: BTreeMap<String, GroupSample>,
}

#[derive(Debug, Clone)]
pub struct GroupSample {
    pub spec: GroupSpec,
    /// `None`: the broker did not say.
    pub members: Option<usize>,
    /// Whether `lag` is its lag (else only its partitions: a group that commits nothing, or keeps
    /// its offsets in a database the caller did not read).
    pub lag_known: bool,
    /// Per partition.
    pub lag: Vec<PartitionLag>,
    pub error: Option<String>,
}

/// Why a look failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("Kafka client for the status: {0}")]
    Client(KafkaError),
    #[error("reading {topic}: {source}")]
    Read { topic: String, source: KafkaError },
}

/// Reads samples and builds reports; keep it to sample again (its clients stay connected).
pub struct Collector {
    kafka: KafkaConfig,
    spec: StatusSpec,
    /// Group-less: metadata, watermarks, group lists and the reads of the instances and letters.
    client: BaseConsumer,
    lag: Mutex<HashMap<String, LagReader>>,
}

impl Collector {
    pub fn new(kafka: &KafkaConfig, spec: StatusSpec) -> Result<Self, StatusError> {
        let mut cfg = kafka.admin();
        // librdkafka refuses to assign partitions to a consumer without a group id; this one never
        // joins it (assign only) nor commits.
        cfg.set("group.id", format!("tidings-status-reader-{}", uuid::Uuid::new_v4().simple()))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let client: BaseConsumer = cfg.create().map_err(StatusError::Client)?;
        Ok(Collector { kafka: kafka.clone(), spec, client, lag: Mutex::new(HashMap::new()) })
    }

    pub fn spec(&self) -> &StatusSpec {
        &self.spec
    }

    /// The live instances (fresh announcements, latest per instance) now.
    pub fn instances(&self) -> Result<Vec<Announcement>, StatusError> {
        let topic = &self.spec.instances_topic;
        let read = |source| StatusError::Read { topic: topic.clone(), source };
        let mut latest: BTreeMap<String, Option<Announcement>> = BTreeMap::new();
        let mut bad = 0usize;
        // Only the newest records: anything older is stale anyway, and a compacted topic's active
        // segment (every announcement since it rolled) is never compacted. By count, not by time:
        // librdkafka's mock cluster (the embedded default) answers no offsets-for-times query.
        read_to_end(&self.client, topic, ANNOUNCEMENTS_READ, |m| {
            let Some(key) = m.key().map(|k| String::from_utf8_lossy(k).into_owned()) else { return };
            if latest.len() >= MAX_INSTANCES && !latest.contains_key(&key) {
                return;
            }
            match m.payload().map(serde_json::from_slice::<Announcement>) {
                None => {
                    latest.insert(key, None);
                }
                Some(Ok(a)) => {
                    latest.insert(key, Some(a));
                }
                Some(Err(_)) => bad += 1,
            }
        })
        .map_err(read)?;
        if bad > 0 {
            tracing::debug!("Ignored {bad} malformed announcement(s) on {topic}.");
        }
        let now = now_ms();
        Ok(latest
            .into_values()
            .flatten()
            .filter(|a| now - a.updated_at_ms <= STALE_AFTER * a.interval_ms.max(1))
            .collect())
    }

    /// One sample: the instances, and every group's members and lag. `stored`: the next offset
    /// per partition of the groups whose offsets are kept in the database, by group.
    pub fn sample(&self, stored: &HashMap<String, HashMap<i32, i64>>) -> Result<Sample, StatusError> {
        let instances = self.instances()?;
        let mut specs = self.spec.groups.clone();
        // Groups only instances know of (the gateways' delivery group).
        for a in &instances {
            for (group, owned) in &a.groups {
                if !specs.iter().any(|s| &s.group == group) {
                    specs.push(GroupSpec {
                        stage: owned.stage.clone(),
                        group: group.clone(),
                        topics: owned.topics.clone(),
                        output: None,
                        dead_letter: None,
                        commits: false,
                        offsets_in_store: false,
                        required: false,
                    });
                }
            }
        }
        let mut groups = BTreeMap::new();
        for spec in specs {
            let members = self.members(&spec.group);
            let stored = stored.get(&spec.group);
            let lag_known = spec.commits && !(spec.offsets_in_store && stored.is_none());
            let (lag, error) = match self.lag_of(&spec, stored) {
                Ok(l) => (l, None),
                Err(e) => (Vec::new(), Some(e)),
            };
            groups.insert(spec.group.clone(), GroupSample { spec, members, lag_known, lag, error });
        }
        Ok(Sample { at_ms: now_ms(), instances, groups })
    }

    fn members(&self, group: &str) -> Option<usize> {
        let list = self.client.fetch_group_list(Some(group), REQUEST).ok()?;
        Some(list.groups().iter().find(|g| g.name() == group).map_or(0, |g| g.members().len()))
    }

    fn lag_of(&self, spec: &GroupSpec, stored: Option<&HashMap<i32, i64>>) -> Result<Vec<PartitionLag>, String> {
        let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
        if !spec.commits || (spec.offsets_in_store && stored.is_none()) {
            // Partitions only: a group that commits nothing has no lag to read.
            let mut out = Vec::new();
            for t in topics {
                for p in partitions(&self.client, t).map_err(|e| format!("{t}: {e}"))? {
                    let (low, high) = (0, 0);
                    out.push(PartitionLag {
                        topic: t.to_string(),
                        partition: p,
                        committed: None,
                        low,
                        high,
                        position: 0,
                        messages: 0,
                        seconds: None,
                    });
                }
            }
            return Ok(out);
        }
        let mut readers = self.lag.lock().expect("lock");
        if !readers.contains_key(&spec.group) {
            let r = LagReader::new(&self.kafka, &spec.group).map_err(|e| e.to_string())?;
            readers.insert(spec.group.clone(), r);
        }
        if let (true, Some(stored)) = (spec.offsets_in_store, stored) {
            let mut positions = Vec::new();
            for t in &topics {
                for p in partitions(&self.client, t).map_err(|e| format!("{t}: {e}"))? {
                    positions.push((t.to_string(), p, stored.get(&p).copied()));
                }
            }
            return readers[&spec.group].read_at(&positions, REQUEST * 2).map_err(|e| e.to_string());
        }
        readers[&spec.group].read(&topics, REQUEST * 2).map_err(|e| e.to_string())
    }

    /// Letters per dead-letter topic: all of them, by reason the newest [`MAX_COUNTED`].
    pub fn dead_letters(&self) -> Vec<DeadLetterCount> {
        let mut out = Vec::new();
        for topic in &self.spec.dead_letters {
            let mut by_reason: BTreeMap<String, i64> = BTreeMap::new();
            let mut counted = 0i64;
            let total = read_to_end(&self.client, topic, MAX_COUNTED, |m| {
                counted += 1;
                let reason = m.headers().and_then(|h| header_str(h, H_DLQ_REASON)).unwrap_or("(none)");
                if by_reason.len() < MAX_REASONS || by_reason.contains_key(reason) {
                    *by_reason.entry(reason.to_string()).or_default() += 1;
                } else {
                    *by_reason.entry("(other)".into()).or_default() += 1;
                }
            });
            match total {
                Ok(total) => out.push(DeadLetterCount { topic: topic.clone(), total, counted, by_reason }),
                Err(e) => tracing::debug!(error = %e, "Dead letters of {topic} unreadable."),
            }
        }
        out
    }
}

/// The report over `samples` (time order, one at least), with `dead_letters`.
pub fn report(topology: &StatusSpec, samples: &[Sample], dead_letters: Vec<DeadLetterCount>) -> StatusReport {
    let last = samples.last().expect("one sample at least");
    let first = &samples[0];
    let instances = last.instances.clone();
    let mut groups = Vec::new();
    for (name, g) in &last.groups {
        let announcing: Vec<&Announcement> = instances.iter().filter(|a| a.groups.contains_key(name)).collect();
        let members = g.members.unwrap_or(0);
        let known_to_broker = g.lag.iter().any(|p| p.committed.is_some()) || members > 0;
        if !g.spec.required && announcing.is_empty() && !known_to_broker {
            continue;
        }
        let mut owners: BTreeMap<TopicPartition, Vec<String>> = BTreeMap::new();
        for a in &announcing {
            for tp in &a.groups[name].partitions {
                owners.entry(tp.clone()).or_default().push(a.instance.clone());
            }
        }
        // Each partition's points through the window, from the samples that read it.
        let mut points: BTreeMap<(String, i32), Vec<Point>> = BTreeMap::new();
        let tracked = g.lag_known;
        if tracked {
            for s in samples {
                for p in s.groups.get(name).map(|g| g.lag.as_slice()).unwrap_or_default() {
                    let pt = Point { committed: p.committed, lag: p.messages };
                    points.entry((p.topic.clone(), p.partition)).or_default().push(pt);
                }
            }
        }
        let live = Liveness { instances: announcing.len(), members };
        let series: Vec<Vec<Point>> = points.values().cloned().collect();
        let (state, mut reason) = eval::group(live, &series);
        if let (Some(e), None) = (&g.error, &reason) {
            reason = Some(format!("lag unknown: {e}"));
        }
        let partitions: Vec<PartitionStatus> = g
            .lag
            .iter()
            .map(|p| {
                let key = (p.topic.clone(), p.partition);
                let pts = points.get(&key).map(Vec::as_slice).unwrap_or_default();
                let tp = TopicPartition { topic: p.topic.clone(), partition: p.partition };
                let pstate = if state == State::Stopped { State::Stopped } else { eval::partition(pts) };
                PartitionStatus {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    owners: owners.get(&tp).cloned().unwrap_or_default(),
                    committed: p.committed,
                    high: tracked.then_some(p.high),
                    lag_messages: tracked.then_some(p.messages),
                    lag_seconds: if tracked { p.seconds } else { None },
                    state: pstate,
                }
            })
            .collect();
        let lag_messages = tracked.then(|| partitions.iter().filter_map(|p| p.lag_messages).sum());
        let lag_seconds = partitions.iter().filter_map(|p| p.lag_seconds).reduce(f64::max);
        groups.push(GroupStatus {
            stage: g.spec.stage.clone(),
            group: name.clone(),
            state,
            reason,
            members,
            instances: announcing.iter().map(|a| a.instance.clone()).collect(),
            lag_messages,
            lag_seconds,
            partitions,
        });
    }
    groups.sort_by(|a, b| (stage_rank(&a.stage), &a.group).cmp(&(stage_rank(&b.stage), &b.group)));
    let gateways = instances
        .iter()
        .filter_map(|a| {
            let gw = a.gateway.as_ref()?;
            let partitions = a.groups.values().filter(|o| o.stage == "gateway").map(|o| o.partitions.len()).sum();
            Some(GatewayStatus { instance: a.instance.clone(), url: gw.url.clone(), streams: gw.streams, partitions })
        })
        .collect();
    let topo = topology
        .groups
        .iter()
        .map(|g| StageTopology {
            stage: g.stage.clone(),
            group: g.group.clone(),
            inputs: g.topics.clone(),
            output: g.output.clone(),
            dead_letter: g.dead_letter.clone(),
        })
        .collect();
    StatusReport {
        generated_at_ms: last.at_ms,
        window_ms: last.at_ms - first.at_ms,
        samples: samples.len(),
        ok: groups.iter().all(|g| g.state == State::Ok),
        topology: topo,
        instances,
        groups,
        dead_letters,
        gateways,
    }
}

fn stage_rank(stage: &str) -> usize {
    ["templating", "persistence", "scheduler", "claims", "gateway"].iter().position(|s| *s == stage).unwrap_or(9)
}

fn partitions(client: &BaseConsumer, topic: &str) -> Result<Vec<i32>, KafkaError> {
    let md = client.fetch_metadata(Some(topic), REQUEST)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// Reads the newest `newest` records of `topic` (spread over its partitions) up to the end it had
/// when called, within a bounded time; returns how many records the partitions hold in all.
fn read_to_end(
    client: &BaseConsumer,
    topic: &str,
    newest: i64,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<i64, KafkaError> {
    let parts = partitions(client, topic)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends: HashMap<i32, i64> = HashMap::new();
    let mut total = 0;
    for p in &parts {
        let (low, high) = client.fetch_watermarks(topic, *p, REQUEST)?;
        total += high - low;
        let start = (high - (newest / parts.len().max(1) as i64).max(1)).max(low);
        if high > start {
            tpl.add_partition_offset(topic, *p, Offset::Offset(start))?;
            ends.insert(*p, high);
        }
    }
    if ends.is_empty() {
        return Ok(total);
    }
    client.assign(&tpl)?;
    let deadline = Instant::now() + REQUEST * 2;
    let mut open: BTreeSet<i32> = ends.keys().copied().collect();
    while !open.is_empty() && Instant::now() < deadline {
        let Some(m) = client.poll(Duration::from_millis(200)) else { continue };
        let Ok(m) = m else { continue };
        let end = ends.get(&m.partition()).copied().unwrap_or(0);
        if m.offset() < end {
            each(&m);
        }
        if m.offset() + 1 >= end {
            open.remove(&m.partition());
        }
    }
    let _ = client.unassign();
    Ok(total)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Owned;

    fn spec(stage: &str, group: &str, required: bool) -> GroupSpec {
        GroupSpec {
            stage: stage.into(),
            group: group.into(),
            topics: vec!["t".into()],
            output: None,
            dead_letter: None,
            commits: true,
            offsets_in_store: false,
            required,
        }
    }

    fn lag(partition: i32, committed: i64, high: i64) -> PartitionLag {
        let messages = high - committed;
        let seconds = Some(if messages == 0 { 0.0 } else { 5.0 });
        PartitionLag {
            topic: "t".into(),
            partition,
            committed: Some(committed),
            low: 0,
            high,
            position: committed,
            messages,
            seconds,
        }
    }

    fn instance(id: &str, group: &str, partitions: &[i32]) -> Announcement {
        let owned = Owned {
            stage: "templating".into(),
            topics: vec!["t".into()],
            partitions: partitions.iter().map(|&p| TopicPartition { topic: "t".into(), partition: p }).collect(),
        };
        Announcement {
            instance: id.into(),
            host: "h".into(),
            pid: 1,
            stages: vec!["templating".into()],
            groups: BTreeMap::from([(group.to_string(), owned)]),
            gateway: None,
            started_at_ms: 0,
            updated_at_ms: 0,
            interval_ms: 3000,
        }
    }

    fn sample(at_ms: i64, instances: Vec<Announcement>, groups: Vec<(GroupSpec, Vec<PartitionLag>)>) -> Sample {
        let groups = groups
            .into_iter()
            .map(|(spec, lag)| {
                let g = GroupSample { spec: spec.clone(), members: Some(1), lag_known: true, lag, error: None };
                (spec.group, g)
            })
            .collect();
        Sample { at_ms, instances, groups }
    }

    /// Owners come from the announcements (two claims of one partition show both), the state
    /// from the samples, and an optional group nobody runs or knows is left out.
    #[test]
    fn a_report_from_samples() {
        let g = spec("templating", "tg", true);
        let unused = spec("claims", "cg", false);
        let topo =
            StatusSpec { instances_topic: "i".into(), groups: vec![g.clone(), unused.clone()], dead_letters: vec![] };
        let who = vec![instance("a", "tg", &[0, 1]), instance("b", "tg", &[1])];
        let no_lag = |p| PartitionLag { committed: None, ..lag(p, 0, 0) };
        let mut samples: Vec<Sample> = (0..3)
            .map(|i| {
                sample(
                    i * 1000,
                    who.clone(),
                    vec![(g.clone(), vec![lag(0, 10 + i, 10 + i), lag(1, 5, 9)]), (unused.clone(), vec![no_lag(0)])],
                )
            })
            .collect();
        // Nobody in the claims group, and nothing committed there.
        for s in &mut samples {
            s.groups.get_mut("cg").unwrap().members = Some(0);
        }
        let r = report(&topo, &samples, vec![]);
        assert_eq!(r.window_ms, 2000);
        assert_eq!(r.groups.len(), 1, "the unused claims group is left out: {:?}", r.groups);
        let tg = &r.groups[0];
        assert_eq!(tg.state, State::Stalled, "partition 1 is behind and its offset never moved");
        assert_eq!(tg.lag_messages, Some(4));
        assert_eq!(tg.lag_seconds, Some(5.0));
        assert_eq!(tg.partitions[0].owners, ["a"]);
        assert_eq!(tg.partitions[1].owners, ["a", "b"]);
        assert_eq!(tg.partitions[0].state, State::Ok);
        assert!(!r.ok);
    }
}
