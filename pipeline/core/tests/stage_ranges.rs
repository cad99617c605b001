//! The stage skeleton over explicit offset ranges on a real broker: exactly the records in the
//! ranges are processed, the run ends by itself, and a live consumer group on the same topic is
//! left as it was (offsets, membership) and keeps consuming. Also the same processor under a
//! group subscription, and the stage's record counter over a range whose end is a control record.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::StageHealth;
use tidings_core::stage::{self, OffsetRange, Processor, RangeSource, Source, StageError};
use tokio_util::sync::CancellationToken;

const PER_PARTITION: i64 = 10;
const WAIT: Duration = Duration::from_secs(60);

/// Records the (partition, offset) of every record it processes.
struct Recording {
    seen: Arc<Mutex<Vec<(i32, i64)>>>,
    finished: Arc<AtomicUsize>,
}

impl Processor for Recording {
    type Due = ();

    async fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
        self.seen.lock().unwrap().push((msg.partition(), msg.offset()));
        Ok(())
    }

    fn due(&mut self) -> impl Future<Output = ()> + Send {
        std::future::pending()
    }

    async fn on_due(&mut self, _: ()) -> Result<(), StageError> {
        Ok(())
    }

    async fn finish(self, ended: Result<(), StageError>) -> Result<(), StageError> {
        self.finished.fetch_add(1, Ordering::SeqCst);
        ended
    }
}

async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics([&topic], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
}

/// A topic of 3 partitions with [`PER_PARTITION`] records on each.
async fn topic_with_records(brokers: &str, name: &str) {
    create_topic(brokers, name, 3).await;
    produce(brokers, name, PER_PARTITION).await;
}

/// `n` records on each of the topic's 3 partitions.
async fn produce(brokers: &str, topic: &str, n: i64) {
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for p in 0..3 {
        for i in 0..n {
            let payload = format!("{p}-{i}");
            let rec = FutureRecord::<str, str>::to(topic).partition(p).payload(&payload);
            producer.send(rec, Duration::from_secs(30)).await.map_err(|(e, _)| e).unwrap();
        }
    }
}

/// The group's committed offsets on the topic's partitions, read without joining it.
fn committed(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, Offset> {
    let observer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition(topic, p);
    }
    let tpl = observer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    tpl.elements().iter().map(|e| (e.partition(), e.offset())).collect()
}

/// How many members `group` has, and which of `others` the broker lists as groups.
fn groups(brokers: &str, group: &str, others: &[String]) -> (usize, Vec<String>) {
    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    let live = client.fetch_group_list(Some(group), Duration::from_secs(10)).unwrap();
    let members = live.groups().iter().find(|g| g.name() == group).map_or(0, |g| g.members().len());
    let all = client.fetch_group_list(None, Duration::from_secs(10)).unwrap();
    let listed = all.groups().iter().map(|g| g.name().to_string()).filter(|n| others.contains(n)).collect();
    (members, listed)
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_run_reads_exactly_its_ranges_ends_by_itself_and_leaves_the_live_group_alone() {
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    let id = uuid::Uuid::new_v4();
    let (topic, live_group) = (format!("stage-ranges-{id}"), format!("stage-ranges-live-{id}"));
    topic_with_records(&brokers, &topic).await;

    // The live group: one subscribed member committing every record it reads.
    let live: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &live_group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    live.subscribe(&[&topic]).unwrap();
    let live_seen = Arc::new(AtomicUsize::new(0));
    let live_stop = CancellationToken::new();
    let live_task = tokio::spawn({
        let (seen, stop) = (live_seen.clone(), live_stop.clone());
        async move {
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = live.recv() => m.unwrap(),
                };
                live.commit_message(&msg, CommitMode::Sync).unwrap();
                seen.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    wait_until("the live member read every record", || live_seen.load(Ordering::SeqCst) == 30).await;
    let all_read: BTreeMap<i32, Offset> = (0..3).map(|p| (p, Offset::Offset(PER_PARTITION))).collect();
    assert_eq!(committed(&brokers, &live_group, &topic), all_read);

    // The range run, beside it.
    let ranges = vec![
        OffsetRange::new(&topic, 0, 2, 7),
        OffsetRange::new(&topic, 1, 7, PER_PARTITION),
        OffsetRange::new(&topic, 2, 5, 5),
    ];
    let (seen, finished) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
    let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
    let kafka = KafkaConfig::new(&brokers);
    let throwaways = Mutex::new(Vec::new());
    let run = stage::run("replay", &health, &shutdown, || {
        let source = RangeSource::new(&kafka, ranges.clone()).map_err(StageError::from);
        if let Ok(s) = &source {
            throwaways.lock().unwrap().push(s.throwaway_group().to_string());
        }
        let processor = Recording { seen: seen.clone(), finished: finished.clone() };
        async move { Ok((processor, Source::Ranges(source?))) }
    });
    // Nobody cancels `shutdown`: only reading every range ends the run.
    tokio::time::timeout(WAIT, run).await.expect("the range run ended by itself").unwrap();
    let throwaways = throwaways.into_inner().unwrap();
    assert_eq!(throwaways.len(), 1, "no failed attempt");
    assert_eq!(finished.load(Ordering::SeqCst), 1, "the processor was finished");
    assert!(!shutdown.is_cancelled());

    let seen = seen.lock().unwrap().clone();
    let expected: BTreeSet<(i32, i64)> = (2..7).map(|o| (0, o)).chain((7..PER_PARTITION).map(|o| (1, o))).collect();
    assert_eq!(seen.len(), expected.len(), "each record once: {seen:?}");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected);

    // The live group is as its member left it, and no other group appeared.
    assert_eq!(committed(&brokers, &live_group, &topic), all_read, "the range run moved the live group's offsets");
    let (members, range_groups) = groups(&brokers, &live_group, &throwaways);
    assert_eq!(members, 1, "only the live member is in the live group");
    assert!(range_groups.is_empty(), "the range run left groups behind: {range_groups:?}");

    // And the live member goes on consuming.
    produce(&brokers, &topic, 5).await;
    wait_until("the live member read the new records", || live_seen.load(Ordering::SeqCst) == 45).await;
    let moved: BTreeMap<i32, Offset> = (0..3).map(|p| (p, Offset::Offset(PER_PARTITION + 5))).collect();
    assert_eq!(committed(&brokers, &live_group, &topic), moved);
    live_stop.cancel();
    live_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_processor_under_a_group_subscription_reads_until_shutdown() {
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    let id = uuid::Uuid::new_v4();
    let (topic, group) = (format!("stage-ranges-sub-{id}"), format!("stage-ranges-sub-{id}"));
    topic_with_records(&brokers, &topic).await;

    let (seen, finished) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
    let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
    let task = tokio::spawn({
        let (seen, finished, health, shutdown) = (seen.clone(), finished.clone(), health.clone(), shutdown.clone());
        async move {
            let start = || {
                let consumer: Result<StreamConsumer, _> = KafkaConfig::new(&brokers).consumer(&group).create();
                let consumer = consumer.map_err(StageError::from).and_then(|c| {
                    c.subscribe(&[&topic])?;
                    Ok(Arc::new(c))
                });
                let processor = Recording { seen: seen.clone(), finished: finished.clone() };
                async move { Ok((processor, consumer?)) }
            };
            stage::run("subscribed", &health, &shutdown, start).await
        }
    });
    wait_until("the subscribed stage read every record", || seen.lock().unwrap().len() == 30).await;
    assert_eq!(finished.load(Ordering::SeqCst), 0, "a subscription does not end by itself");
    assert!(health.is_up());
    shutdown.cancel();
    task.await.unwrap().unwrap();
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    let all: BTreeSet<(i32, i64)> = (0..3).flat_map(|p| (0..PER_PARTITION).map(move |o| (p, o))).collect();
    assert_eq!(seen.lock().unwrap().iter().copied().collect::<BTreeSet<_>>(), all);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_ending_at_a_transaction_marker_ends_and_counts_only_what_it_processed() {
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    // The only recorder of this test binary; the other tests' stages have other labels.
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder().unwrap();
    let id = uuid::Uuid::new_v4();
    let topic = format!("stage-ranges-txn-{id}");
    create_topic(&brokers, &topic, 1).await;
    // Two transactions of 3 records: offsets 0-2, its commit marker at 3, then 4-6 and 7.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("transactional.id", format!("stage-ranges-txn-{id}"))
        .create()
        .unwrap();
    let t = Duration::from_secs(30);
    tokio::task::block_in_place(|| producer.init_transactions(t)).unwrap();
    for txn in 0..2 {
        producer.begin_transaction().unwrap();
        for i in 0..3 {
            let payload = format!("{txn}-{i}");
            let rec = FutureRecord::<str, str>::to(&topic).partition(0).payload(&payload);
            producer.send(rec, t).await.map_err(|(e, _)| e).unwrap();
        }
        tokio::task::block_in_place(|| producer.commit_transaction(t)).unwrap();
    }

    // [0, 4): offset 3 holds no record, so only offset 4, past the end, closes the range.
    let (seen, finished) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
    let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
    let kafka = KafkaConfig::new(&brokers);
    let run = stage::run("metered", &health, &shutdown, || {
        let source = RangeSource::new(&kafka, vec![OffsetRange::new(&topic, 0, 0, 4)]).map_err(StageError::from);
        let processor = Recording { seen: seen.clone(), finished: finished.clone() };
        async move { Ok((processor, Source::Ranges(source?))) }
    });
    tokio::time::timeout(WAIT, run).await.expect("the range run ended by itself").unwrap();
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    assert_eq!(*seen.lock().unwrap(), [(0, 0), (0, 1), (0, 2)]);
    let text = metrics.render();
    let counted: Vec<&str> =
        text.lines().filter(|l| l.starts_with("tidings_stage_records_in_total{stage=\"metered\"}")).collect();
    assert_eq!(counted, ["tidings_stage_records_in_total{stage=\"metered\"} 3"], "{text}");
    // Each record's processing is timed (the range's end is no record).
    assert!(text.lines().any(|l| l == "tidings_stage_processing_seconds_count{stage=\"metered\"} 3"), "{text}");
}
