//! The one consumer context of every stage: where each newly assigned partition starts
//! ([`StartOffsets`]), the stage's own work on assignment and revocation ([`RebalanceHooks`]) and
//! the client's statistics. Eager and cooperative rebalancing are both handled.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, Statistics, TopicPartitionList};
use tokio::runtime::{Handle, RuntimeFlavor};
use tracing::{error, info, warn};

/// A topic and one of its partitions.
pub type Partition = (String, i32);

/// How long the watermarks of a partition may take to arrive during a rebalance.
pub const WATERMARK_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a newly assigned partition starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The group's committed offset (`auto.offset.reset` without one): the assignment is kept.
    Committed,
    /// The log's first offset (nothing stored for the partition).
    Beginning,
    /// This offset.
    Offset(i64),
    /// Up to `n` records before the log's end ([`StartOffsets::Tail`]).
    Tail(Tail),
    /// Not known now (the broker did not answer): the assignment is kept, and the stage seeks
    /// the partition once it knows (e.g. with [`tail`]).
    Unknown,
}

/// Where a partition's last `n` records start: `offset = max(high - n, low)`, with the log's first
/// offset (`low`) and its end (`high`) as they were then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    pub offset: i64,
    pub low: i64,
    pub high: i64,
}

/// A newly assigned partition and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub topic: String,
    pub partition: i32,
    pub start: Start,
}

/// Offsets a stage keeps itself (in its database, next to its output).
pub trait StoredOffsets: Send + Sync + 'static {
    /// The next offset of each of the newly assigned `partitions` that has one; the others start
    /// at their log's beginning. Called inside the rebalance callback, on the task polling the
    /// consumer: it may block briefly (with `block_in_place` on a multi-thread runtime).
    fn stored(&self, partitions: &[Partition]) -> HashMap<Partition, i64>;
}

/// Where a stage's newly assigned partitions start.
pub enum StartOffsets {
    /// The group's committed offsets.
    Committed,
    /// The offsets the stage stored itself.
    Stored(Box<dyn StoredOffsets>),
    /// The last `n` records of each partition (a ring of recent records kept in memory).
    Tail(usize),
}

/// A stage's work when partitions come and go. Both run inside the rebalance callback, so no
/// record is read meanwhile; both do nothing unless a stage says otherwise.
pub trait RebalanceHooks: Send + Sync + 'static {
    /// After the consumer took `assigned` at their starts.
    fn on_assign(&self, _assigned: &[Assigned]) {}
    /// Before the consumer gives up `revoked` (all it holds when the rebalance failed).
    fn on_revoke(&self, _revoked: &[Partition]) {}
}

impl RebalanceHooks for () {}

/// The consumer context of a stage: its [`StartOffsets`] policy applied on every assignment, its
/// [`RebalanceHooks`], and its statistics recorded under `client` (enable them with
/// [`crate::client_stats::reporting`]).
pub struct StageContext<H: RebalanceHooks = ()> {
    client: &'static str,
    /// The consumer's group, whose lag its statistics report (see [`StageContext::with_group`]).
    group: Option<String>,
    start: StartOffsets,
    hooks: H,
    /// Blocking broker calls in the callback go through `block_in_place` when the runtime allows.
    multi_thread: bool,
}

impl<H: RebalanceHooks> StageContext<H> {
    pub fn new(client: &'static str, start: StartOffsets, hooks: H) -> Self {
        let multi_thread = Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
        StageContext { client, group: None, start, hooks, multi_thread }
    }

    /// Records the lag of `group` (the consumer's `group.id`) from the statistics reports too:
    /// librdkafka's reports do not name the group.
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    pub fn hooks(&self) -> &H {
        &self.hooks
    }

    /// Keeps the lag gauges' positions of the group's partitions: a stored start (the stage's own
    /// offsets) is where its lag counts from until its work moves on; revoked ones are forgotten.
    fn lag_positions(&self, assigned: &[Assigned], revoked: &[Partition]) {
        let Some(group) = &self.group else { return };
        crate::lag::forget(group, revoked.iter().map(|(t, p)| (t.as_str(), *p)));
        if matches!(self.start, StartOffsets::Stored(_)) {
            for a in assigned {
                // Nothing stored: from the log's start (0, raised to its first offset).
                let from = match a.start {
                    Start::Offset(o) => o,
                    _ => 0,
                };
                crate::lag::durable(group, &a.topic, a.partition, from);
            }
        }
    }

    /// Where each of `partitions` starts under the policy.
    fn starts<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, partitions: &[Partition]) -> Vec<Start> {
        match &self.start {
            StartOffsets::Committed => vec![Start::Committed; partitions.len()],
            StartOffsets::Stored(stored) => {
                let next = stored.stored(partitions);
                partitions.iter().map(|p| next.get(p).map_or(Start::Beginning, |o| Start::Offset(*o))).collect()
            }
            StartOffsets::Tail(n) => partitions
                .iter()
                .map(|(topic, p)| match blocking(self.multi_thread, || tail(consumer, topic, *p, *n)) {
                    Ok(t) => Start::Tail(t),
                    Err(e) => {
                        warn!(error = %e, "Watermarks of {topic}[{p}] unavailable; the stage will seek it later.");
                        Start::Unknown
                    }
                })
                .collect(),
        }
    }
}

/// Where `partition`'s last `n` records start, from the broker's watermarks (a blocking call).
pub fn tail<X: ConsumerContext, C: Consumer<X>>(
    consumer: &C,
    topic: &str,
    partition: i32,
    n: usize,
) -> Result<Tail, KafkaError> {
    let (low, high) = consumer.fetch_watermarks(topic, partition, WATERMARK_TIMEOUT)?;
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    Ok(Tail { offset: high.saturating_sub(n).max(low), low, high })
}

/// Runs a blocking librdkafka call from async code without stalling the runtime's other tasks.
pub fn blocking<T>(multi_thread: bool, f: impl FnOnce() -> T) -> T {
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Partition> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

impl<H: RebalanceHooks> ClientContext for StageContext<H> {
    fn stats(&self, statistics: Statistics) {
        crate::client_stats::record(self.client, &statistics);
        if let Some(group) = &self.group {
            // The group's reader thread sets its lag gauges, if the process runs them.
            if !crate::lag::observe(group, &statistics) {
                crate::client_stats::record_lag(group, &statistics);
            }
        }
    }
}

impl<H: RebalanceHooks> ConsumerContext for StageContext<H> {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let parts = partitions(tpl);
                let starts = self.starts(consumer, &parts);
                let mut assigned = Vec::with_capacity(parts.len());
                for ((topic, partition), start) in parts.into_iter().zip(starts) {
                    let offset = match start {
                        Start::Committed | Start::Unknown => None,
                        Start::Beginning => Some(Offset::Beginning),
                        Start::Offset(o) | Start::Tail(Tail { offset: o, .. }) => Some(Offset::Offset(o)),
                    };
                    if let Some(offset) = offset {
                        if let Err(e) = tpl.set_partition_offset(&topic, partition, offset) {
                            error!(error = %e, "Could not set the start offset of {topic}[{partition}].");
                        }
                    }
                    assigned.push(Assigned { topic, partition, start });
                }
                let done = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = done {
                    error!(error = %e, "Assigning partitions failed.");
                }
                info!(client = self.client, partitions = assigned.len(), "Assigned {} partition(s).", assigned.len());
                self.hooks.on_assign(&assigned);
                self.lag_positions(&assigned, &[]);
                crate::status::local::assigned(self.client, assigned.iter().map(|a| (a.topic.as_str(), a.partition)));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let parts = partitions(tpl);
                info!(client = self.client, partitions = parts.len(), "{} partition(s) revoked.", parts.len());
                self.hooks.on_revoke(&parts);
                self.lag_positions(&[], &parts);
                crate::status::local::revoked(self.client, parts.iter().map(|(t, p)| (t.as_str(), *p)));
                let done = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = done {
                    error!(error = %e, "Unassigning partitions failed.");
                }
            }
            other => {
                error!(error = ?other, client = self.client, "Rebalance error; dropping the assignment.");
                let held = consumer.assignment().map(|tpl| partitions(&tpl)).unwrap_or_default();
                self.hooks.on_revoke(&held);
                self.lag_positions(&[], &held);
                crate::status::local::revoked(self.client, held.iter().map(|(t, p)| (t.as_str(), *p)));
                // As rdkafka's own callback does under each protocol.
                let _ = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::StreamConsumer;
    use rdkafka::message::Message;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use rdkafka::ClientConfig;
    use std::sync::{Arc, Mutex};

    /// Stored offsets from a map.
    struct Fixed(HashMap<Partition, i64>);

    impl StoredOffsets for Fixed {
        fn stored(&self, partitions: &[Partition]) -> HashMap<Partition, i64> {
            partitions.iter().filter_map(|p| Some((p.clone(), *self.0.get(p)?))).collect()
        }
    }

    /// Remembers what it was told.
    #[derive(Default, Clone)]
    struct Recorder(Arc<Mutex<Vec<Assigned>>>);

    impl RebalanceHooks for Recorder {
        fn on_assign(&self, assigned: &[Assigned]) {
            self.0.lock().unwrap().extend_from_slice(assigned);
        }
    }

    /// The first offset read from each of the topic's 2 partitions (10 records each) by a group
    /// member whose context has `start`, and what its hooks were told.
    async fn first_offsets(start: StartOffsets) -> (HashMap<i32, i64>, Vec<Assigned>) {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        for p in 0..2 {
            for i in 0..10 {
                producer.send(BaseRecord::<str, str>::to("t").partition(p).payload(&format!("{i}"))).unwrap();
            }
        }
        producer.flush(Duration::from_secs(5)).unwrap();

        let hooks = Recorder::default();
        let consumer: StreamConsumer<StageContext<Recorder>> = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", "g")
            .set("auto.offset.reset", "latest")
            .set("enable.auto.commit", "false")
            .create_with_context(StageContext::new("test-consumer", start, hooks.clone()))
            .unwrap();
        consumer.subscribe(&["t"]).unwrap();
        let mut first = HashMap::new();
        while first.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.unwrap().unwrap();
            first.entry(m.partition()).or_insert(m.offset());
        }
        let assigned = hooks.0.lock().unwrap().clone();
        (first, assigned)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stored_offsets_start_their_partitions_and_the_others_start_at_the_beginning() {
        let stored = Fixed([(("t".to_string(), 0), 7)].into());
        let (first, mut assigned) = first_offsets(StartOffsets::Stored(Box::new(stored))).await;
        assert_eq!(first, [(0, 7), (1, 0)].into());
        assigned.sort_by_key(|a| a.partition);
        let starts: Vec<(i32, Start)> = assigned.iter().map(|a| (a.partition, a.start)).collect();
        assert_eq!(starts, [(0, Start::Offset(7)), (1, Start::Beginning)]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tail_starts_that_many_records_before_the_end() {
        let (first, mut assigned) = first_offsets(StartOffsets::Tail(3)).await;
        assert_eq!(first, [(0, 7), (1, 7)].into());
        assigned.sort_by_key(|a| a.partition);
        let tail = Start::Tail(Tail { offset: 7, low: 0, high: 10 });
        assert_eq!(assigned.iter().map(|a| a.start).collect::<Vec<_>>(), [tail, tail]);
    }
}
