//! Dead letters re-driven after a fix, on Apache Kafka and PostgreSQL: orders events written with a
//! schema the registry does not know yet are dead-lettered; once the schema is registered, `tidings
//! dlq replay` (a dry run first, then --execute) re-drives them and each is stored and streamed once,
//! each key's events in their order; a letter that keeps failing is quarantined after 3 re-drives.

mod common;

use common::{count_notifications, eventually, Tidings, Up};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::{KafkaConfig, H_DLQ_REPLAY_COUNT};
use tidings_core::{wire, FramedEncoder, RegistryClient, RegistryEndpoint};

const TOKEN: &str = "dlq-test-registry-write-token-0123456789abcdef";

fn event(order_id: &str, buyer: &str, step: usize) -> Value {
    let payload = match step {
        0 => json!({"OrderPlaced": {"amount_cents": 1400, "currency": "EUR",
                "items": [{"sku": "tea-01", "name": "Green tea", "quantity": 1, "unit_price_cents": 1400}]}}),
        1 => json!({"OrderPaid": {"amount_cents": 1400, "currency": "EUR", "payment_method": "card"}}),
        _ => json!({"OrderShipped": {"carrier": "DHL", "tracking_number": format!("T-{order_id}")}}),
    };
    json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
            "order_id": order_id, "buyer_id": buyer, "locale": null, "payload": payload, "note": "v2"})
}

/// `tidings dlq <args>` against the test's cluster, database and registry: (success, stdout).
fn dlq(args: &[&str], brokers: &str, db: &str, registry: &str, prefix: &str) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .arg("dlq")
        .args(args)
        .args(["--brokers", brokers, "--database-url", db, "--schema-registry-url", registry])
        .args(["--topic-prefix", prefix])
        .arg("--topology")
        .arg(common::topology_path())
        .env("TIDINGS_LOG", "warn")
        .output()
        .expect("run tidings dlq");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("$ tidings dlq {}\n{stdout}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout)
}

/// Records on `topic` now (every partition).
async fn count(brokers: &str, topic: &str) -> i64 {
    common::high_watermarks(brokers, topic).await.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_are_re_driven_once_in_key_order_and_a_hopeless_one_is_quarantined() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    let mut up =
        Tidings::spawn_env("up", &Up::all(&brokers, &db_url, &prefix), &[("TIDINGS_REGISTRY_WRITE_TOKEN", TOKEN)]);
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    common::await_ready(&http, &ep.http, &[&up]).await;
    let orders = format!("{prefix}orders");
    let dlq_topic = format!("{prefix}tidings.dlq.templating");
    let quarantine = format!("{prefix}tidings.dlq.quarantine");
    let registry = RegistryClient::new(RegistryEndpoint {
        url: ep.schema_registry_url.clone(),
        basic_auth: None,
        bearer_token: Some(TOKEN.into()),
        ca_pem: None,
    })
    .unwrap();

    // Version 2 of the orders schema (an optional `note`), not registered yet: the id it will get
    // is the next one, which a probe subject's registration shows.
    let text =
        std::fs::read_to_string(common::topology_path().parent().unwrap().join("schemas/order_event.avsc")).unwrap();
    let mut v2: Value = serde_json::from_str(&text).unwrap();
    v2["fields"].as_array_mut().unwrap().push(json!({"name": "note", "type": ["null", "string"], "default": null}));
    let v2_text = v2.to_string();
    let v2_schema: &'static apache_avro::Schema =
        Box::leak(Box::new(apache_avro::Schema::parse_str(&v2_text).unwrap()));
    let probe = r#"{"type":"record","name":"Probe","fields":[{"name":"x","type":"int"}]}"#;
    let future_id = registry.register(&format!("{prefix}probe-value"), probe).await.unwrap() + 1;
    let encoder = FramedEncoder::new(future_id, v2_schema).unwrap();
    let encode = |ev: &Value| encoder.encode(json_to_avro(v2_schema, ev).unwrap()).unwrap();

    let streams = [
        ("u-a", common::open_stream(&http, &ep.http, "u-a", None).await),
        ("u-b", common::open_stream(&http, &ep.http, "u-b", None).await),
    ];
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    let send = |key: String, payload: Vec<u8>| {
        let producer = producer.clone();
        let orders = orders.clone();
        async move {
            let rec: FutureRecord<'_, str, [u8]> =
                FutureRecord::to(&orders).key(key.as_str()).payload(payload.as_slice());
            producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("produce");
        }
    };
    // Three events of one order and two of another, all unknown to the registry, interleaved; and
    // one framed with an id no schema will ever have.
    for step in 0..3 {
        send("o-1".into(), encode(&event("o-1", "u-a", step))).await;
        if step < 2 {
            send("o-2".into(), encode(&event("o-2", "u-b", step))).await;
        }
    }
    let hopeless = encode(&event("o-3", "u-c", 0));
    send("o-3".into(), wire::frame(999_999, &hopeless[5..])).await;

    let dead = |n: i64| {
        let (brokers, dlq_topic) = (brokers.clone(), dlq_topic.clone());
        move || {
            let (brokers, dlq_topic) = (brokers.clone(), dlq_topic.clone());
            async move {
                let c = count(&brokers, &dlq_topic).await;
                if c == n {
                    Ok(())
                } else {
                    Err(format!("{c} of {n} dead letters"))
                }
            }
        }
    };
    eventually("6 dead letters", Duration::from_secs(60), Duration::from_millis(250), &[&up], dead(6)).await;
    assert_eq!(count_notifications(&pool).await, 0);

    // The fix: the producer's schema is registered, under the id its records carry.
    let id = registry.register(&format!("{orders}-value"), &v2_text).await.unwrap();
    assert_eq!(id, future_id, "the new schema got the id the dead-lettered records were written with");

    let run = |args: &'static [&'static str]| dlq(args, &brokers, &db_url, &ep.schema_registry_url, &prefix);
    let (ok, listed) = run(&["list"]);
    assert!(ok);
    assert!(
        listed.contains("6 letter(s)") && listed.contains(&format!("unknown-schema-id            from {orders}")),
        "{listed}"
    );
    let (ok, shown) = run(&["show", "--key", "o-1", "--limit", "1"]);
    assert!(ok);
    assert!(shown.contains("\"order_id\":\"o-1\"") && shown.contains("kafka_dlt-original-offset"), "decoded: {shown}");

    // Dry run: says what would happen and does nothing.
    let (ok, dry) = run(&["replay"]);
    assert!(ok);
    assert_eq!(dry.lines().filter(|l| l.starts_with("would re-drive ")).count(), 6, "{dry}");
    assert!(dry.contains("would re-drive 6, would quarantine 0"), "{dry}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count_notifications(&pool).await, 0, "a dry run re-drives nothing");
    assert_eq!(count(&brokers, &dlq_topic).await, 6);

    // Stopped (SIGINT) once the record shows letters done, then resumed by the same command.
    let slow = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(["dlq", "replay", "--execute", "--rate", "1"])
        .args(["--brokers", &brokers, "--database-url", &db_url, "--schema-registry-url", &ep.schema_registry_url])
        .args(["--topic-prefix", &prefix])
        .arg("--topology")
        .arg(common::topology_path())
        .env("TIDINGS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let done_so_far = || async {
        let p: Option<String> = sqlx::query_scalar("SELECT progress FROM replays WHERE kind = 'dlq' AND topic = $1")
            .bind(&dlq_topic)
            .fetch_optional(&pool)
            .await
            .unwrap();
        p.and_then(|p| serde_json::from_str::<Value>(&p).ok()).and_then(|p| p["0"].as_i64()).unwrap_or(0)
    };
    eventually("a saved progress", Duration::from_secs(30), Duration::from_millis(100), &[&up], || async {
        match done_so_far().await {
            n if n >= 1 => Ok(()),
            n => Err(format!("progress {n}")),
        }
    })
    .await;
    let kill = Command::new("kill").args(["-INT", &slow.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let stopped = slow.wait_with_output().unwrap();
    eprintln!("stopped run: {}", String::from_utf8_lossy(&stopped.stdout));
    assert_eq!(stopped.status.code(), Some(130), "a stopped re-drive exits 130");
    let (outcome, at): (String, String) =
        sqlx::query_as("SELECT outcome, progress FROM replays WHERE kind = 'dlq' AND topic = $1")
            .bind(&dlq_topic)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(outcome, "stopped", "{at}");
    assert!(done_so_far().await < 6, "stopped before the end: {at}");
    let (ok, out) = run(&["replay", "--execute"]);
    assert!(ok, "{out}");
    assert!(out.contains("6 re-driven, 0 quarantined"), "resumed and counted across both: {out}");
    eventually("5 notifications", Duration::from_secs(60), Duration::from_millis(250), &[&up], || async {
        let n = count_notifications(&pool).await;
        if n == 5 {
            Ok(())
        } else {
            Err(format!("{n} of 5 rows"))
        }
    })
    .await;
    // The hopeless one failed again and came back with its count.
    eventually("the 7th dead letter", Duration::from_secs(60), Duration::from_millis(250), &[&up], dead(7)).await;

    // It is re-driven alone each time (the others were handled by the first run), until its count
    // reaches 3: then it is quarantined, and after that nothing is left to do.
    for (round, letters) in [(2, 8), (3, 9)] {
        let (ok, out) = run(&["replay", "--execute"]);
        assert!(ok && out.contains("1 re-driven, 0 quarantined"), "round {round}: {out}");
        eventually("the next dead letter", Duration::from_secs(60), Duration::from_millis(250), &[&up], dead(letters))
            .await;
    }
    let (ok, dry) = run(&["replay"]);
    assert!(ok && dry.contains("would re-drive 0, would quarantine 1"), "{dry}");
    let (ok, out) = run(&["replay", "--execute"]);
    assert!(ok && out.contains("0 re-driven, 1 quarantined"), "{out}");
    let (ok, out) = run(&["replay", "--execute"]);
    assert!(ok && out.contains("0 re-driven, 0 quarantined"), "never looped: {out}");
    assert_eq!(count(&brokers, &quarantine).await, 1);
    let consumer: StreamConsumer =
        KafkaConfig::new(brokers.clone()).consumer(&format!("{prefix}q-reader")).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&quarantine, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let q = tokio::time::timeout(Duration::from_secs(20), consumer.recv()).await.expect("quarantined letter").unwrap();
    assert_eq!(q.key(), Some(&b"o-3"[..]));
    let count_header = q.headers().and_then(|h| h.iter().find(|x| x.key == H_DLQ_REPLAY_COUNT)).and_then(|x| x.value);
    assert_eq!(count_header, Some(&b"3"[..]));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&brokers, &dlq_topic).await, 9, "the quarantined letter is not re-driven again");

    // Purge: DeleteRecords below the end; a dry run first.
    let low = |topic: String| {
        let brokers = brokers.clone();
        let c: rdkafka::consumer::BaseConsumer = KafkaConfig::new(brokers).consumer("dlq-watermarks").create().unwrap();
        c.fetch_watermarks(&topic, 0, Duration::from_secs(10)).unwrap().0
    };
    let (ok, out) = run(&["purge", "--dlq", "tidings.dlq.quarantine", "--all"]);
    assert!(ok && out.contains("1 letter(s) would be deleted"), "{out}");
    assert_eq!(low(quarantine.clone()), 0);
    let (ok, out) = run(&["purge", "--dlq", "tidings.dlq.quarantine", "--all", "--execute"]);
    assert!(ok && out.contains("1 letter(s) deleted"), "{out}");
    assert_eq!(low(quarantine.clone()), 1);
    let (ok, out) = run(&["list", "--dlq", "tidings.dlq.quarantine"]);
    assert!(ok && out.contains("0 letter(s)"), "{out}");

    // Stored once each, streamed once each, every order's events in the order they were produced.
    assert_eq!(count_notifications(&pool).await, 5);
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT source_event_id) FROM notifications").fetch_one(&pool).await.unwrap();
    assert_eq!(distinct, 5);
    let want =
        [("u-a", vec!["order.placed", "order.paid", "order.shipped"]), ("u-b", vec!["order.placed", "order.paid"])];
    for ((user, seen), (_, kinds)) in streams.iter().zip(want) {
        let got: Vec<String> = seen.named(|e| e.starts_with("order.")).into_iter().map(|(name, _)| name).collect();
        assert_eq!(got, kinds, "{user}'s stream");
    }
    let runs: Vec<(String, String)> =
        sqlx::query_as("SELECT outcome, counts FROM replays WHERE kind = 'dlq' AND topic = $1 ORDER BY started_at")
            .bind(&dlq_topic)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(runs.len(), 5, "every executed re-drive is recorded (the stopped one resumed): {runs:?}");
    assert!(runs.iter().all(|(o, _)| o == "done"), "{runs:?}");
    assert!(runs[0].1.contains("\"redriven\":6"), "{runs:?}");
}
