//! The templating stage on a real broker (Apache Kafka in CI) where the broker's own checks
//! matter: an output larger than the topic's `max.message.bytes` is a dead letter of its input,
//! never a stage restart. Needs `TIDINGS_TEST_BROKERS` (see compose/start-kafka.sh).

mod common;

use common::{consumer, encoder, env_on, order, project_topology, read, spawn_templating_with};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::{KafkaConfig, H_DLQ_OFFSET, H_DLQ_PARTITION, H_DLQ_REASON, H_DLQ_TOPIC};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::shutdown::StageHealth;
use tidings_core::{Notification, RegistryClient};
use tidings_pipeline::topology::apply::apply;

const TIMEOUT: Duration = Duration::from_secs(30);
/// The output and dead-letter topics' `max.message.bytes` here.
const TOPIC_LIMIT: usize = 64 * 1024;

/// An order id of 100 KB renders a title (cut to 64 KiB by default) and a link of 100 KB: a
/// notification the 64 KiB output topic refuses, while the event itself fits its topic. Before,
/// the refusal counted as a broker outage and the stage restarted on that record forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_too_large_for_its_topic_is_a_dead_letter_and_every_partition_moves_on() {
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let mut topo = project_topology().with_prefix(&format!("it-{run}-"));
    for topic in ["notifications", "tidings.dlq.templating"] {
        let spec = topo.topics.get_mut(topic).unwrap();
        spec.configs.insert("max.message.bytes".into(), TOPIC_LIMIT.to_string());
    }
    let mut kafka = KafkaConfig::new(&brokers);
    // Batches no larger than the topics take, so only the oversized record itself is refused
    // (a broker checks whole batches): operators keep batch.size within max.message.bytes.
    kafka.tuned.push(("batch.size".into(), (TOPIC_LIMIT / 2).to_string()));
    let admin: AdminClient<DefaultClientContext> = KafkaConfig::new(&brokers).admin().create().unwrap();
    apply(&topo, &admin, TIMEOUT).await.expect("topics");
    let env = env_on(kafka, topo).await;
    let (orders, notifications) = (env.topo.topic_name("orders"), env.topo.topic_name("notifications"));
    let dlq = env.topo.topic_name("tidings.dlq.templating");
    let partitions = env.topo.topics["orders"].partitions;

    let health = StageHealth::default();
    let stage = spawn_templating_with(&env, health.clone());
    // Down at any moment after the stage first came up = it failed and waits to restart.
    let went_down = Arc::new(AtomicBool::new(false));
    let watch = {
        let (health, went_down) = (health.clone(), went_down.clone());
        tokio::spawn(async move {
            while !health.is_up() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            loop {
                if !health.is_up() {
                    went_down.store(true, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    let (enc, schema) = encoder(&env, &format!("{orders}-value")).await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let send = |p: i32, value: serde_json::Value| {
        let bytes = enc.encode(json_to_avro(schema, &value).unwrap()).unwrap();
        let producer = producer.clone();
        let orders = orders.clone();
        async move {
            let rec = FutureRecord::to(&orders).partition(p).key("k").payload(&bytes);
            producer.send(rec, TIMEOUT).await.unwrap().offset
        }
    };
    // On every partition an event before and after; the huge one on partition 0 between them.
    let mut expected = BTreeSet::new();
    for p in 0..partitions {
        send(p, order(&format!("{run}-before-{p}"), &format!("u{p}"))).await;
        expected.insert(format!("{run}-before-{p}"));
    }
    let mut huge = order(&format!("{run}-huge"), "u-huge");
    huge["order_id"] = "X".repeat(100_000).into();
    let huge_offset = send(0, huge).await;
    for p in 0..partitions {
        send(p, order(&format!("{run}-after-{p}"), &format!("u{p}"))).await;
        expected.insert(format!("{run}-after-{p}"));
    }

    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let reader = consumer(&env, &notifications);
    let mut sources = BTreeSet::new();
    for (_, value, _, _, _) in read(&reader, expected.len()).await {
        let v = registry.decode(&value.unwrap(), &NOTIFICATION_SCHEMA).await.unwrap();
        sources.insert(Notification::from_value(v).unwrap().source_event_id);
    }
    assert_eq!(sources, expected, "every other event of every partition, the huge one's partition included");

    let dead = read(&consumer(&env, &dlq), 1).await.remove(0);
    let (key, payload, headers, _, _) = dead;
    let header = |k: &str| headers.iter().find(|(h, _)| h == k).map(|(_, v)| v.as_str());
    assert_eq!(header(H_DLQ_REASON), Some("output-too-large"), "{headers:?}");
    assert_eq!(header(H_DLQ_TOPIC), Some(orders.as_str()));
    assert_eq!(header(H_DLQ_PARTITION), Some("0"));
    assert_eq!(header(H_DLQ_OFFSET), Some(huge_offset.to_string().as_str()));
    // The event itself is larger than the dead-letter topic takes: its copy names it instead.
    assert_eq!(payload, None, "the copy without the payload");
    assert_eq!(key.as_deref(), Some(&b"k"[..]), "the key stays");

    assert!(!went_down.load(Ordering::SeqCst), "the stage failed and restarted");
    assert!(health.is_up() && !stage.is_finished());
    watch.abort();
    env.token.cancel();
    stage.await.unwrap().unwrap();
    // What the stage committed on stopping: past every record, the huge one's partition included
    // (its notifications alone would not show that: outputs are produced ahead of the commit).
    let group = env.topo.group_name(&env.topo.stages.templating.group);
    let committed: BaseConsumer = env.kafka.consumer(&group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&orders, p);
    }
    let tpl = committed.committed_offsets(tpl, TIMEOUT).unwrap();
    for p in 0..partitions {
        let want = if p == 0 { huge_offset + 2 } else { 2 };
        let got = tpl.find_partition(&orders, p).unwrap().offset();
        assert_eq!(got, Offset::Offset(want), "committed offset of partition {p}");
    }
}
