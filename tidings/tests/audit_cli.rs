//! `tidings audit` on Apache Kafka and PostgreSQL: a known set of records (orders that become
//! notifications, poison orders templating dead-letters, poison notifications persistence
//! dead-letters) adds up for both stages, in = out + dead with nothing in flight or missing, bucket
//! by bucket; a deleted row shows as missing (exit 3).

mod common;

use common::{count_notifications, eventually, Tidings, Up};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use std::process::{Command, Output};
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::{FramedEncoder, RegistryClient};

fn tidings(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .envs(env.iter().copied())
        .env("TIDINGS_TOPOLOGY", common::topology_path())
        .env("TIDINGS_LOG", "warn")
        .output()
        .expect("run tidings")
}

fn text(o: &Output) -> String {
    format!("exit {:?}\n{}{}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_set_of_records_adds_up() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    let data_dir = tempfile::tempdir().unwrap();
    let data = data_dir.path().to_str().unwrap().to_string();
    let stages = Up { stages: "templating,persistence", ..Up::core(&brokers, &db_url, &prefix) };
    let mut up = Tidings::spawn("up", &stages);
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let env = [
        ("TIDINGS_BROKERS", brokers.as_str()),
        ("TIDINGS_DATABASE_URL", db_url.as_str()),
        ("TIDINGS_TOPIC_PREFIX", prefix.as_str()),
        ("TIDINGS_DATA_DIR", data.as_str()),
        ("TIDINGS_SCHEMA_REGISTRY_URL", ep.schema_registry_url.as_str()),
    ];
    let start = chrono::Utc::now().timestamp_millis();

    // Eight orders (one stored notification each), two poison orders and three poison notifications.
    let orders = format!("{prefix}orders");
    let registry = RegistryClient::new(ep.schema_registry_url.as_str()).unwrap();
    let (id, schema) = registry.latest(&format!("{orders}-value")).await.unwrap();
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
    for i in 0..8 {
        let event = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": start * 1000,
            "order_id": format!("o-audit-{i}"), "buyer_id": format!("u-audit-{i}"), "locale": null,
            "payload": {"OrderPlaced": {"amount_cents": 100, "currency": "EUR", "items": []}}});
        let bytes = encoder.encode(json_to_avro(schema, &event).unwrap()).unwrap();
        let key = format!("o-audit-{i}");
        producer.send(FutureRecord::to(&orders).key(&key).payload(&bytes), Duration::from_secs(10)).await.unwrap();
    }
    for i in 0..2 {
        let key = format!("poison-order-{i}");
        let rec = FutureRecord::to(&orders).key(&key).payload(b"not an order".as_slice());
        producer.send(rec, Duration::from_secs(10)).await.unwrap();
    }
    let notifications = format!("{prefix}notifications");
    for i in 0..3 {
        let key = format!("poison-{i}");
        let rec = FutureRecord::to(&notifications).key(&key).payload(b"not a notification".as_slice());
        producer.send(rec, Duration::from_secs(10)).await.unwrap();
    }
    eventually("8 rows stored", Duration::from_secs(60), Duration::from_millis(250), &[&up], || async {
        let n = count_notifications(&pool).await;
        if n == 8 {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    })
    .await;
    for (stage, n) in [("persistence", 3), ("templating", 2)] {
        let dlq = format!("{prefix}tidings.dlq.{stage}");
        let what = format!("{n} dead letters of {stage}");
        eventually(&what, Duration::from_secs(60), Duration::from_millis(250), &[&up], || async {
            let got: i64 = common::high_watermarks(&brokers, &dlq).await.iter().sum();
            if got == n {
                Ok(())
            } else {
                Err(format!("{got} dead letters"))
            }
        })
        .await;
    }

    // Once persistence has stored its offsets to the end, nothing is in flight and all adds up.
    let from = chrono::DateTime::from_timestamp_millis(start - 60_000).unwrap().to_rfc3339();
    let audit = |args: &[&str]| {
        let mut all = vec!["audit", "--from", from.as_str(), "--bucket", "10s", "--json"];
        all.extend_from_slice(args);
        tidings(&env, &all)
    };
    let stage = |v: &Value, name: &str| -> Value {
        let stages = v["stages"].as_array().unwrap();
        stages.iter().find(|s| s["stage"] == name).cloned().unwrap_or_else(|| panic!("no {name} in {v}"))
    };
    let report =
        eventually("nothing in flight", Duration::from_secs(60), Duration::from_millis(500), &[&up], || async {
            let o = audit(&[]);
            let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", text(&o)))?;
            let stages = v["stages"].as_array().unwrap();
            let flying: i64 = stages.iter().map(|s| s["total"]["in_flight"].as_i64().unwrap()).sum();
            if flying == 0 {
                Ok((o, v))
            } else {
                Err(v.to_string())
            }
        })
        .await;
    let (o, v) = report;
    assert!(o.status.success(), "{}", text(&o));
    // (stage, in, out, dead)
    for (name, read, out, dead) in [("templating", 10, 8, 2), ("persistence", 11, 8, 3)] {
        let s = stage(&v, name);
        let t = &s["total"];
        assert_eq!(
            (t["in"].as_i64(), t["out"].as_i64(), t["dead"].as_i64()),
            (Some(read), Some(out), Some(dead)),
            "{s}"
        );
        assert_eq!((t["missing"].as_i64(), t["delivery_only"].as_i64()), (Some(0), Some(0)), "{s}");
        for b in s["buckets"].as_array().unwrap() {
            let n = |k: &str| b[k].as_i64().unwrap();
            assert_eq!(n("in"), n("out") + n("dead") + n("delivery_only") + n("in_flight") + n("missing"), "{b}");
        }
        let sum: i64 = s["buckets"].as_array().unwrap().iter().map(|b| b["in"].as_i64().unwrap()).sum();
        assert_eq!(sum, read, "{s}");
    }

    // A row lost from the table shows as missing, and the audit fails.
    common::sigterm(&mut up).await;
    sqlx::query("DELETE FROM notifications WHERE user_id = 'u-audit-3'").execute(&pool).await.unwrap();
    let o = audit(&["--stage", "persistence"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["stages"].as_array().unwrap().len(), 1, "{v}");
    let t = &stage(&v, "persistence")["total"];
    assert_eq!((t["out"].as_i64(), t["missing"].as_i64()), (Some(7), Some(1)), "{v}");

    // More records than --max-records: stopped with an error, not held.
    let o = audit(&["--stage", "persistence", "--max-records", "5"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("more than 5 records") && text(&o).contains("--max-records"), "{}", text(&o));

    // Bad ranges are refused before anything is read.
    let o = tidings(&env, &["audit", "--from", "-1m", "--to", "-2m"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("must be before --to"), "{}", text(&o));
    let o = tidings(&env, &["audit", "--from", "-2d", "--bucket", "1s", "--max-buckets", "1000"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("--max-buckets"), "{}", text(&o));
}
