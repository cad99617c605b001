//! Bad records produced straight to `orders` on a real broker: each lands exactly once on the
//! templating dead-letter topic with its reason and original coordinates, the valid records
//! around and after them are all stored, and no partition is blocked by a poison record.

mod common;

use common::{count_notifications, eventually, Tidings, Up};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::{
    header_str, KafkaConfig, H_DLQ_OFFSET, H_DLQ_PARTITION, H_DLQ_REASON, H_DLQ_STAGE, H_DLQ_TOPIC,
};
use tidings_core::{wire, FramedEncoder, RegistryClient};

/// A valid `orders` event as JSON (OrderPaid or OrderPlaced), one notification for `buyer`.
fn event(order_id: &str, buyer: &str, paid: bool) -> Value {
    let payload = if paid {
        json!({"OrderPaid": {"amount_cents": 4200, "currency": "EUR", "payment_method": "card"}})
    } else {
        json!({"OrderPlaced": {"amount_cents": 1400, "currency": "EUR",
                "items": [{"sku": "tea-01", "name": "Green tea", "quantity": 1, "unit_price_cents": 1400}]}})
    };
    json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
            "order_id": order_id, "buyer_id": buyer, "locale": null, "payload": payload})
}

/// A bad record: its name, its value (`None`: no value at all) and the reason it must be dead-lettered with.
type BadRecord = (&'static str, Option<Vec<u8>>, &'static str);
/// A dead letter as read back: reason, error text and value.
type DeadLetter = (String, String, Option<Vec<u8>>);

/// Produces one record and returns where it landed.
async fn send(producer: &FutureProducer, topic: &str, key: &str, payload: Option<&[u8]>) -> (i32, i64) {
    let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key);
    if let Some(p) = payload {
        rec = rec.payload(p);
    }
    let d = producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produce");
    (d.partition, d.offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_record_is_dead_lettered_once_and_nothing_blocks() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    let mut up = Tidings::spawn("up", &Up::all(&brokers, &db_url, &prefix));
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let topic = format!("{prefix}orders");
    let dlq = format!("{prefix}tidings.dlq.templating");
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();
    let (id, schema) = registry.latest(&format!("{topic}-value")).await.expect("orders schema registered by `up`");
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let encode = |json: &Value| encoder.encode(json_to_avro(schema, json).expect("valid event")).expect("encodes");
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();

    let valid_bytes = encode(&event("o-template", "u-template", false));
    let datum = &valid_bytes[5..];
    let mut wrong_magic = valid_bytes.clone();
    wrong_magic[0] = 1;
    let truncated = valid_bytes[..5 + datum.len() / 2].to_vec();
    let bad: Vec<BadRecord> = vec![
        ("garbage", Some(b"\xde\xad\xbe\xef this is not a Kafka record".to_vec()), "wrong-magic-byte"),
        ("framed-junk", Some(wire::frame(id, &[0xff; 16])), "malformed-avro"),
        ("three-bytes", Some(vec![0, 0, 0]), "too-short"),
        ("wrong-magic", Some(wrong_magic), "wrong-magic-byte"),
        ("unknown-id", Some(wire::frame(999_999, datum)), "unknown-schema-id"),
        ("no-buyer", Some(encode(&event("o-no-buyer", "", true))), "missing-recipient"),
        ("truncated", Some(truncated), "malformed-avro"),
        ("empty", None, "empty-payload"),
    ];

    // valid, bad, valid, bad, …, valid: every bad record is surrounded by good ones.
    let mut expected_rows = 0i64;
    let mut dead: BTreeMap<(i32, i64), BadRecord> = BTreeMap::new();
    let mut bad_partitions = HashSet::new();
    for (i, (name, payload, reason)) in bad.into_iter().enumerate() {
        let ev = event(&format!("o-before-{i}"), &format!("u{i}"), i % 2 == 1);
        send(&producer, &topic, &format!("o-before-{i}"), Some(&encode(&ev))).await;
        expected_rows += 1;
        // Keyed like the events sent afterwards, so those prove the same partitions move on.
        let at = send(&producer, &topic, &format!("k-{name}"), payload.as_deref()).await;
        bad_partitions.insert(at.0);
        dead.insert(at, (name, payload, reason));
    }
    send(&producer, &topic, "o-before-last", Some(&encode(&event("o-before-last", "u-last", false)))).await;
    expected_rows += 1;

    eventually(
        "the valid events' notifications",
        Duration::from_secs(60),
        Duration::from_millis(250),
        &[&up],
        || async {
            let n = count_notifications(&pool).await;
            if n == expected_rows {
                Ok(())
            } else {
                Err(format!("{n} of {expected_rows} rows"))
            }
        },
    )
    .await;

    // Read the dead-letter topic from the start with a group nobody else uses.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{prefix}dlq-reader-{}", uuid::Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[dlq.as_str()]).unwrap();
    let mut seen: BTreeMap<(i32, i64), DeadLetter> = BTreeMap::new();
    let mut extra = Vec::new();
    let started = Instant::now();
    let mut settle_until: Option<Instant> = None;
    // Until every expected record arrived, then 3 s more to catch duplicates or strays.
    while settle_until.is_none_or(|t| Instant::now() < t) {
        if started.elapsed() > Duration::from_secs(60) {
            panic!(
                "dead letters after 60 s: {seen:?}, expected at {:?}\n{}",
                dead.keys().collect::<Vec<_>>(),
                up.log_tail(40)
            );
        }
        let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await else { continue };
        let h = m.headers().expect("dead letter without headers");
        let get = |k: &str| header_str(h, k).unwrap_or_else(|| panic!("dead letter lacks header {k}")).to_string();
        assert_eq!(get(H_DLQ_TOPIC), topic);
        assert_eq!(get(H_DLQ_STAGE), "templating");
        let at: (i32, i64) = (get(H_DLQ_PARTITION).parse().unwrap(), get(H_DLQ_OFFSET).parse().unwrap());
        let entry = (get(H_DLQ_REASON), get(tidings_core::kafka::H_DLQ_ERROR), m.payload().map(<[u8]>::to_vec));
        if seen.insert(at, entry).is_some() {
            extra.push(at);
        }
        if seen.len() >= dead.len() && settle_until.is_none() {
            settle_until = Some(Instant::now() + Duration::from_secs(3));
        }
    }
    assert!(extra.is_empty(), "dead-lettered more than once: {extra:?}");
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        dead.keys().collect::<Vec<_>>(),
        "dead letters at other coordinates than the bad records"
    );
    for (at, (name, payload, reason)) in &dead {
        let (got_reason, error, got_payload) = &seen[at];
        assert_eq!(got_reason, reason, "{name} at {at:?}: error {error:?}");
        assert_eq!(got_payload, payload, "{name}: the dead letter must carry the original bytes");
        eprintln!("{name:>12} at {at:?} -> {got_reason}: {error}");
    }

    // The stage kept going: records after the poison ones, on the same partitions, are stored too.
    for (name, _, _) in dead.values() {
        let key = format!("k-{name}");
        let at = send(&producer, &topic, &key, Some(&encode(&event(&key, &format!("after-{name}"), false)))).await;
        assert!(bad_partitions.contains(&at.0));
        expected_rows += 1;
    }
    eventually(
        "notifications of the events after the bad ones",
        Duration::from_secs(60),
        Duration::from_millis(250),
        &[&up],
        || async {
            let n = count_notifications(&pool).await;
            if n == expected_rows {
                Ok(())
            } else {
                Err(format!("{n} of {expected_rows} rows"))
            }
        },
    )
    .await;
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id LIKE 'after-%'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(after, dead.len() as i64);
    // Nothing of the bad records was stored (the no-buyer OrderPaid had no recipient to store).
    let stray: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM notifications WHERE title LIKE '%o-no-buyer%' OR title LIKE '%o-template%'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(stray, 0);
}

/// A notification the database refuses (a user id too long for PostgreSQL's inbox index, SQLSTATE
/// 54000) produced among good ones straight to `notifications`: persistence dead-letters exactly
/// that record with the SQLSTATE, stores the others and keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_the_database_refuses_is_dead_lettered_and_the_rest_stored() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut up = Tidings::spawn("up", &Up::all(&brokers, &db_url, &prefix));
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let topic = format!("{prefix}notifications");
    let dlq = format!("{prefix}tidings.dlq.persistence");
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();
    let (id, schema) = registry.latest(&format!("{topic}-value")).await.expect("notifications schema registered");
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    // 10,016 random characters: over the btree index row limit (~2,700 bytes) even compressed.
    let long_user: String = (0..313).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    let mut bad_at = None;
    for i in 0..9 {
        let user = if i == 4 { long_user.clone() } else { format!("refusal-u{i}") };
        let n = tidings_core::Notification {
            notification_id: tidings_core::Notification::id_for(&format!("refusal-{i}"), &user),
            user_id: user.clone(),
            kind: "order.placed".into(),
            title: format!("refusal {i}"),
            body: "b".into(),
            link: None,
            source_event_id: format!("refusal-{i}"),
            occurred_at: chrono::Utc::now().timestamp_micros(),
            source_topic: "orders".into(),
            source_partition: 0,
            source_offset: i,
            data: None,
            inbox: true,
            category: String::new(),
            recipients: vec![],
        };
        let at = send(&producer, &topic, &user, Some(&encoder.encode(n.to_value()).unwrap())).await;
        if i == 4 {
            bad_at = Some(at);
        }
    }
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{prefix}dlq-reader-{}", uuid::Uuid::new_v4().simple()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[dlq.as_str()]).unwrap();
    let m = match tokio::time::timeout(Duration::from_secs(60), consumer.recv()).await {
        Ok(m) => m.unwrap(),
        Err(_) => panic!("no dead letter within 60 s\n{}", up.log_tail(40)),
    };
    let h = m.headers().expect("dead letter without headers");
    let get = |k: &str| header_str(h, k).unwrap_or_else(|| panic!("dead letter lacks header {k}")).to_string();
    assert_eq!(get(H_DLQ_STAGE), "persistence");
    assert_eq!(get(H_DLQ_REASON), "db-54000-program-limit-exceeded");
    assert_eq!((get(H_DLQ_PARTITION).parse().unwrap(), get(H_DLQ_OFFSET).parse().unwrap()), bad_at.unwrap());
    assert_eq!(m.key(), Some(long_user.as_bytes()), "the dead letter is a copy of the record");
    eventually("the good notifications", Duration::from_secs(60), Duration::from_millis(250), &[&up], || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE title LIKE 'refusal %'")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n == 8 {
            Ok(())
        } else {
            Err(format!("{n} of 8 rows"))
        }
    })
    .await;
    assert!(up.exited().is_none(), "tidings exited over a refused record\n{}", up.log_tail(40));
    let http = reqwest::Client::new();
    common::await_ready(&http, &ep.http, &[&up]).await;
    common::sigterm(&mut up).await;
}
