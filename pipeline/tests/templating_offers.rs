//! The templating stage's hand-over at the acknowledgement on a real broker (Apache Kafka in CI):
//! offers that come ahead of their partition's next record are held and processed, in offset
//! order, once the records before them are; their fetched copies are then passed by. Needs
//! `TIDINGS_TEST_BROKERS` (see compose/start-kafka.sh); skipped when it is unset outside CI.

mod common;

use common::{consumer, encoder, env_on, order, project_topology, read, spawn_templating_with};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::KafkaConfig;
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::stage::{AckedRecord, Acknowledged, OfferSlot};
use tidings_core::{Notification, RegistryClient};
use tidings_pipeline::topology::apply::apply;

const TIMEOUT: Duration = Duration::from_secs(30);

/// The source event ids of the next `n` notifications on `c`.
async fn next_sources(c: &rdkafka::consumer::StreamConsumer, registry: &RegistryClient, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for (_, value, _, _, _) in read(c, n).await {
        let v = registry.decode(&value.unwrap(), &NOTIFICATION_SCHEMA).await.unwrap();
        out.push(Notification::from_value(v).unwrap().source_event_id);
    }
    out
}

/// The records offered are in an open transaction, so the stage's (read_committed) consumer
/// cannot fetch them: their notifications can only come from the offers, and all three come only
/// if the two held ones are taken once the first fills the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_ahead_of_the_next_record_are_held_then_processed_in_offset_order() {
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topo = project_topology().with_prefix(&format!("it-{run}-"));
    let kafka = KafkaConfig::new(&brokers);
    let admin: AdminClient<DefaultClientContext> = kafka.admin().create().unwrap();
    apply(&topo, &admin, TIMEOUT).await.expect("topics");
    let env = env_on(kafka, topo).await;
    let (orders, notifications) = (env.topo.topic_name("orders"), env.topo.topic_name("notifications"));
    let offers = OfferSlot::default();
    let stage = spawn_templating_with(&env, offers.clone());
    let (enc, schema) = encoder(&env, &format!("{orders}-value")).await;
    let event = |tag: &str| enc.encode(json_to_avro(schema, &order(&format!("{run}-{tag}"), "u1")).unwrap()).unwrap();
    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let reader = consumer(&env, &notifications);

    // A fetched record first: the stage then knows the partition and its next offset.
    let plain: FutureProducer = env.kafka.producer().create().unwrap();
    let first = plain.send(FutureRecord::to(&orders).key("k").payload(&event("a")), TIMEOUT).await.unwrap();
    assert_eq!(next_sources(&reader, &registry, 1).await, [format!("{run}-a")]);

    let txn: FutureProducer = env
        .kafka
        .producer()
        .set("transactional.id", format!("offers-{run}"))
        .set("transaction.timeout.ms", "120000") // at least tidings' message.timeout.ms
        .create()
        .unwrap();
    txn.init_transactions(TIMEOUT).unwrap();
    txn.begin_transaction().unwrap();
    let mut acked = Vec::new();
    for tag in ["b", "c", "d"] {
        let payload = event(tag);
        let d = txn.send(FutureRecord::to(&orders).key("k").payload(&payload), TIMEOUT).await.unwrap();
        assert_eq!(d.partition, first.partition, "one key, one partition");
        acked.push((d.offset, payload));
    }
    let offsets: Vec<i64> = acked.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, [first.offset + 1, first.offset + 2, first.offset + 3], "nothing else writes the partition");
    // Last first: d and c are ahead of the partition's next record (b) and must wait for it.
    for (offset, payload) in acked.iter().rev() {
        offers.acknowledged(AckedRecord {
            topic: &orders,
            partition: first.partition,
            offset: *offset,
            timestamp_ms: 0,
            key: Some(b"k"),
            headers: None,
            payload,
        });
    }
    assert_eq!(
        next_sources(&reader, &registry, 3).await,
        [format!("{run}-b"), format!("{run}-c"), format!("{run}-d")],
        "held offers processed in offset order"
    );

    // Committed, the three become fetchable: the stage passes them by, so the next notification
    // is the next event's, not a second copy.
    txn.commit_transaction(TIMEOUT).unwrap();
    plain.send(FutureRecord::to(&orders).key("k").payload(&event("e")), TIMEOUT).await.unwrap();
    assert_eq!(next_sources(&reader, &registry, 1).await, [format!("{run}-e")], "fetched copies not processed again");

    env.token.cancel();
    tokio::time::timeout(TIMEOUT, stage).await.unwrap().unwrap().unwrap();
}
