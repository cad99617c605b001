//! `lag::LagReader` on Apache Kafka: lag in messages and in seconds (from the record at the
//! committed offset) for a partition behind, one caught up, one never committed and one whose
//! commit fell below the log start after records were deleted.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tidings_core::kafka::KafkaConfig;
use tidings_core::lag::{group_lag, LagError, LagReader, PartitionLag};

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn lag_in_messages_and_seconds_per_partition() {
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    let cfg = KafkaConfig::new(&brokers);
    let topic = format!("lag-test-{}", uuid::Uuid::new_v4());
    let group = format!("lag-group-{}", uuid::Uuid::new_v4());
    let admin: AdminClient<DefaultClientContext> = cfg.admin().create().unwrap();
    let created = admin
        .create_topics(&[NewTopic::new(&topic, 4, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .unwrap();
    assert!(created[0].is_ok(), "{created:?}");

    // Records stamped in the past, so the lag in seconds is known to within the test's own run.
    let now = now_ms();
    let producer: BaseProducer = cfg.producer().create().unwrap();
    let send = |partition: i32, n: i64, first_age_s: i64| {
        for i in 0..n {
            let ts = now - (first_age_s - i) * 1000;
            let rec = BaseRecord::<(), str>::to(&topic).partition(partition).payload("x").timestamp(ts);
            producer.send(rec).unwrap();
        }
    };
    send(0, 5, 100); // ages 100, 99, 98, 97, 96 s
    send(1, 2, 50);
    send(2, 3, 30);
    send(3, 4, 200); // ages 200..197 s
    producer.flush(Duration::from_secs(10)).unwrap();

    let committer: BaseConsumer = cfg.consumer(&group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(2)).unwrap();
    tpl.add_partition_offset(&topic, 1, Offset::Offset(2)).unwrap();
    tpl.add_partition_offset(&topic, 3, Offset::Offset(1)).unwrap();
    committer.commit(&tpl, CommitMode::Sync).unwrap();
    // Retention stand-in: partition 3's records before offset 3 are gone, below its commit.
    let mut del = TopicPartitionList::new();
    del.add_partition_offset(&topic, 3, Offset::Offset(3)).unwrap();
    admin.delete_records(&del, &AdminOptions::new()).await.unwrap();

    let lags = tokio::task::spawn_blocking({
        let (cfg, group, topic) = (cfg.clone(), group.clone(), topic.clone());
        move || group_lag(&cfg, &group, &[&topic], Duration::from_secs(20))
    })
    .await
    .unwrap()
    .unwrap();
    let at = |p: i32| -> &PartitionLag { lags.iter().find(|l| l.partition == p).unwrap() };
    assert_eq!(lags.len(), 4, "{lags:?}");
    let near = |got: Option<f64>, want: f64| got.is_some_and(|s| s >= want && s < want + 30.0);

    // Behind by 3: the record at the commit (offset 2) is 98 s old.
    let p0 = at(0);
    assert_eq!((p0.committed, p0.low, p0.high, p0.position, p0.messages), (Some(2), 0, 5, 2, 3), "{p0:?}");
    assert!(near(p0.seconds, 98.0), "{p0:?}");
    // Caught up: 0 and 0, without reading a record.
    let p1 = at(1);
    assert_eq!((p1.committed, p1.messages, p1.seconds), (Some(2), 0, Some(0.0)), "{p1:?}");
    // Never committed: from the log start, as a group resetting to earliest reads it.
    let p2 = at(2);
    assert_eq!((p2.committed, p2.position, p2.messages), (None, 0, 3), "{p2:?}");
    assert!(near(p2.seconds, 30.0), "{p2:?}");
    // Committed at 1 but the log now starts at 3: the group resumes at 3 (197 s old), 1 behind.
    let p3 = at(3);
    assert_eq!((p3.committed, p3.low, p3.position, p3.messages), (Some(1), 3, 3, 1), "{p3:?}");
    assert!(near(p3.seconds, 197.0), "{p3:?}");

    // Positions a stage keeps itself (its database), read again with the same clients.
    let reader = LagReader::new(&cfg, &group).unwrap();
    let positions = vec![(topic.clone(), 0, Some(4)), (topic.clone(), 1, Some(0))];
    let again = tokio::task::spawn_blocking(move || {
        let first = reader.read_at(&positions, Duration::from_secs(20)).unwrap();
        let second = reader.read(&[&topic], Duration::from_secs(20)).unwrap();
        (first, second)
    })
    .await
    .unwrap();
    assert_eq!((again.0[0].messages, again.0[1].messages), (1, 2), "{again:?}");
    assert!(near(again.0[0].seconds, 96.0) && near(again.0[1].seconds, 50.0), "{again:?}");
    // A second read on the same clients sees what the first did (nothing left assigned between).
    assert_eq!(again.1.iter().find(|l| l.partition == 0).unwrap().seconds.map(|s| s >= 98.0), Some(true));

    // A topic that does not exist is an error, within the deadline.
    let missing = tokio::task::spawn_blocking(move || {
        group_lag(&cfg, &group, &["lag-test-no-such-topic"], Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert!(matches!(missing, Err(LagError::NoTopic { .. }) | Err(LagError::Metadata { .. })), "{missing:?}");
}
