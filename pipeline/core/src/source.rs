//! Where a stage attempt's records come from: the consumer a stage subscribed to its group, or
//! fixed per-partition offset ranges read by an assign-only consumer that no group ever sees
//! (a replay beside the live groups). [`crate::stage::run`] drives either.

use std::sync::Arc;

use rdkafka::consumer::{Consumer, ConsumerContext, DefaultConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::kafka::KafkaConfig;

/// The records an attempt reads.
pub enum Source<C: ConsumerContext + 'static = DefaultConsumerContext> {
    /// A consumer the stage set up (a group subscription, or its own assignment): read until
    /// shutdown or a failure.
    Consumer(Arc<StreamConsumer<C>>),
    /// Fixed offset ranges: the attempt ends by itself, cleanly, once every range is read.
    Ranges(RangeSource<C>),
}

/// What a stage's start function may hand [`crate::stage::run`]: a [`Source`], or the consumer of
/// a group subscription as before.
pub trait IntoSource {
    type Context: ConsumerContext + 'static;
    fn into_source(self) -> Source<Self::Context>;
}

impl<C: ConsumerContext + 'static> IntoSource for Source<C> {
    type Context = C;
    fn into_source(self) -> Source<C> {
        self
    }
}

impl<C: ConsumerContext + 'static> IntoSource for Arc<StreamConsumer<C>> {
    type Context = C;
    fn into_source(self) -> Source<C> {
        Source::Consumer(self)
    }
}

/// Offsets `[start, end)` of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OffsetRange {
    pub topic: String,
    pub partition: i32,
    pub start: i64,
    /// Exclusive. A range with `end <= start` is empty: read at once. A range ending past the
    /// partition's end is read once records reach its end: the run waits for them.
    pub end: i64,
}

impl OffsetRange {
    pub fn new(topic: impl Into<String>, partition: i32, start: i64, end: i64) -> Self {
        OffsetRange { topic: topic.into(), partition, start, end }
    }

    fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

/// Offset ranges that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    #[error("offset range {topic}/{partition}: {reason}")]
    Invalid { topic: String, partition: i32, reason: &'static str },
    #[error("creating the range consumer: {0}")]
    Kafka(#[from] KafkaError),
}

/// Settings no operator option may change on a range consumer: nothing is committed or stored
/// (librdkafka needs a group id to `assign`, but the throwaway one is never joined or committed
/// to), the end of a partition is reported (so a range whose last offsets are control records or
/// compacted away still ends), and a start before the log's start reads from its start.
const RANGE_PINNED: &[(&str, &str)] = &[
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "true"),
    ("auto.offset.reset", "earliest"),
];

/// Reads fixed offset ranges with its own assign-only consumer, which no stage code can reach:
/// no consumer group is joined, committed to or read from. An attempt that fails and restarts
/// reads its ranges again from their starts.
pub struct RangeSource<C: ConsumerContext + 'static = DefaultConsumerContext> {
    consumer: Arc<StreamConsumer<C>>,
    progress: Progress,
    throwaway: String,
}

/// How far each range has been read.
pub(crate) struct Progress {
    ranges: Vec<OffsetRange>,
    /// Per range: everything below its end has been read.
    done: Vec<bool>,
}

/// What the skeleton does with a record read from a [`RangeSource`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Process,
    Skip,
}

impl RangeSource<DefaultConsumerContext> {
    /// A range source with the default consumer context.
    pub fn new(kafka: &KafkaConfig, ranges: Vec<OffsetRange>) -> Result<Self, RangeError> {
        Self::with_context(kafka, ranges, DefaultConsumerContext)
    }
}

impl<C: ConsumerContext + 'static> RangeSource<C> {
    /// A range source whose consumer has `context` (e.g. for statistics). Refuses a negative
    /// start and a partition named twice.
    pub fn with_context(kafka: &KafkaConfig, ranges: Vec<OffsetRange>, context: C) -> Result<Self, RangeError> {
        let throwaway = format!("tidings-range-{}", uuid::Uuid::new_v4());
        Self::from_config(kafka.consumer_with(&throwaway, &[], RANGE_PINNED), ranges, context)
    }

    fn from_config(mut config: ClientConfig, ranges: Vec<OffsetRange>, context: C) -> Result<Self, RangeError> {
        for (i, r) in ranges.iter().enumerate() {
            let invalid = |reason| RangeError::Invalid { topic: r.topic.clone(), partition: r.partition, reason };
            if r.start < 0 {
                return Err(invalid("the start offset is negative"));
            }
            if ranges[..i].iter().any(|o| o.topic == r.topic && o.partition == r.partition) {
                return Err(invalid("the partition has two ranges"));
            }
        }
        for (k, v) in RANGE_PINNED {
            config.set(*k, *v);
        }
        let consumer: StreamConsumer<C> = config.create_with_context(context)?;
        let mut tpl = TopicPartitionList::new();
        for r in ranges.iter().filter(|r| !r.is_empty()) {
            tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.start))?;
        }
        consumer.assign(&tpl)?;
        let done = ranges.iter().map(OffsetRange::is_empty).collect();
        let throwaway = config.get("group.id").unwrap_or_default().to_string();
        Ok(RangeSource { consumer: Arc::new(consumer), progress: Progress { ranges, done }, throwaway })
    }

    /// The group id librdkafka requires for `assign`: unique to this source, never joined or
    /// committed to, so no broker ever lists it as a group.
    pub fn throwaway_group(&self) -> &str {
        &self.throwaway
    }

    /// Every range has been read.
    pub fn is_done(&self) -> bool {
        self.progress.is_done()
    }

    pub(crate) fn into_parts(self) -> (Arc<StreamConsumer<C>>, Progress) {
        (self.consumer, self.progress)
    }
}

impl Progress {
    pub(crate) fn is_done(&self) -> bool {
        self.done.iter().all(|d| *d)
    }

    /// Whether a record at `offset` is processed; a record at or past its range's end ends the
    /// range (a fetch returns whole batches, so records past the end do arrive).
    pub(crate) fn verdict<C: ConsumerContext>(
        &mut self,
        consumer: &StreamConsumer<C>,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Verdict {
        let Some(i) = self.index(topic, partition) else { return Verdict::Skip };
        if self.done[i] {
            return Verdict::Skip;
        }
        let r = &self.ranges[i];
        if offset >= r.end {
            self.close(consumer, i);
            return Verdict::Skip;
        }
        if offset < r.start {
            return Verdict::Skip;
        }
        if offset + 1 >= r.end {
            self.close(consumer, i);
        }
        Verdict::Process
    }

    /// The consumer reached the end of `partition`'s log: the ranges on it whose end is at or
    /// below the position are read, even if their last offsets held no record to return.
    pub(crate) fn at_end_of<C: ConsumerContext>(&mut self, consumer: &StreamConsumer<C>, partition: i32) {
        let Ok(positions) = consumer.position() else { return };
        for i in 0..self.ranges.len() {
            let r = &self.ranges[i];
            if self.done[i] || r.partition != partition {
                continue;
            }
            let position = positions.find_partition(&r.topic, r.partition).map(|p| p.offset());
            if let Some(Offset::Offset(pos)) = position {
                if pos >= r.end {
                    self.close(consumer, i);
                }
            }
        }
    }

    fn index(&self, topic: &str, partition: i32) -> Option<usize> {
        self.ranges.iter().position(|r| r.partition == partition && r.topic == topic)
    }

    /// Marks range `i` read and stops fetching its partition.
    fn close<C: ConsumerContext>(&mut self, consumer: &StreamConsumer<C>, i: usize) {
        self.done[i] = true;
        let r = &self.ranges[i];
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&r.topic, r.partition);
        if let Err(e) = consumer.pause(&tpl) {
            // Only wasted fetches: records past the end are skipped anyway.
            tracing::debug!(error = %e, topic = r.topic, partition = r.partition, "Pausing a read range failed.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range source's consumer and progress; the consumer never connects (nothing listens
    /// there): the verdicts need no broker.
    fn source(ranges: Vec<OffsetRange>) -> (Arc<StreamConsumer>, Progress) {
        let kafka = KafkaConfig::new("127.0.0.1:1");
        RangeSource::new(&kafka, ranges).unwrap().into_parts()
    }

    #[tokio::test]
    async fn records_outside_a_range_are_skipped_and_its_end_closes_it() {
        let (c, mut s) = source(vec![OffsetRange::new("t", 0, 2, 5), OffsetRange::new("t", 1, 4, 4)]);
        assert!(!s.is_done(), "partition 0 is still open");
        assert_eq!(s.verdict(&c, "t", 0, 1), Verdict::Skip, "before the start");
        assert_eq!(s.verdict(&c, "t", 0, 2), Verdict::Process);
        assert_eq!(s.verdict(&c, "t", 0, 3), Verdict::Process);
        assert_eq!(s.verdict(&c, "t", 2, 3), Verdict::Skip, "no range on that partition");
        assert_eq!(s.verdict(&c, "t", 0, 4), Verdict::Process);
        assert!(s.is_done(), "the last offset of the range was read");
        assert_eq!(s.verdict(&c, "t", 0, 5), Verdict::Skip, "at the end");
        assert_eq!(s.verdict(&c, "t", 1, 4), Verdict::Skip, "an empty range");
    }

    #[tokio::test]
    async fn a_record_past_the_end_closes_a_range_with_a_gap() {
        let (c, mut s) = source(vec![OffsetRange::new("t", 0, 0, 3)]);
        assert_eq!(s.verdict(&c, "t", 0, 0), Verdict::Process);
        // Offsets 1 and 2 were compacted away.
        assert_eq!(s.verdict(&c, "t", 0, 7), Verdict::Skip);
        assert!(s.is_done());
    }

    #[tokio::test]
    async fn bad_ranges_are_refused() {
        let kafka = KafkaConfig::new("127.0.0.1:1");
        let twice = vec![OffsetRange::new("t", 0, 0, 3), OffsetRange::new("t", 0, 5, 9)];
        assert!(matches!(RangeSource::new(&kafka, twice), Err(RangeError::Invalid { partition: 0, .. })));
        let negative = vec![OffsetRange::new("t", 1, -2, 3)];
        assert!(matches!(RangeSource::new(&kafka, negative), Err(RangeError::Invalid { partition: 1, .. })));
        assert!(RangeSource::new(&kafka, vec![]).unwrap().is_done(), "nothing to read");
    }
}
