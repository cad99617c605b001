//! Template-change backfill on Apache Kafka and PostgreSQL: orders notified through a running
//! `tidings up`, then a changed template and `tidings replay --stage templating` over a time
//! range: the stored notifications of exactly that range get the new text in place (same ids, no
//! new row); the dry run's count matches; a second run finds them current.

mod common;

use common::{eventually, Tidings, Up};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, RegistryClient};

const ORDERS: usize = 30;
const TOKEN: &str = "replay-test-registry-write-token";
/// Order `i` is stamped `T0 + i` seconds.
const T0: i64 = 1_780_000_000_000;
const OLD_TITLE: &str = r#"title: "Order {{ order_id }} placed""#;
const NEW_TITLE: &str = r#"title: "Order {{ order_id }} placed (v2)""#;

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// topology.yaml with the OrderPlaced title changed, beside a copy of its schemas.
fn changed_topology(dir: &Path) -> std::path::PathBuf {
    let root = common::topology_path();
    let text = std::fs::read_to_string(&root).unwrap();
    assert!(text.contains(OLD_TITLE), "topology.yaml's OrderPlaced title changed; update this test");
    let schemas = root.parent().unwrap().join("schemas");
    std::fs::create_dir(dir.join("schemas")).unwrap();
    for f in std::fs::read_dir(&schemas).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.join("schemas").join(f.file_name())).unwrap();
    }
    let path = dir.join("topology.yaml");
    std::fs::write(&path, text.replacen(OLD_TITLE, NEW_TITLE, 1)).unwrap();
    path
}

fn replay(brokers: &str, db: &str, registry: &str, prefix: &str, topology: &Path, extra: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .arg("replay")
        .args(extra)
        .args(["--brokers", brokers, "--database-url", db, "--schema-registry-url", registry, "--topic-prefix", prefix])
        .arg("--topology")
        .arg(topology)
        .env("TIDINGS_LOG", "warn")
        .env("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("tidings replay {extra:?} → {:?}\n{text}", out.status.code());
    (out.status.code().unwrap_or(-1), text)
}

fn numbers(text: &str, starts: &str) -> Vec<u64> {
    let l = text.lines().find(|l| l.starts_with(starts)).unwrap_or_else(|| panic!("no line {starts:?} in\n{text}"));
    l.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_template_replaces_the_texts_of_exactly_the_replayed_range_without_new_ids() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    // Templating registers the notification schema on start, the replay's too: both use this token.
    let mut up =
        Tidings::spawn_env("up", &Up::all(&brokers, &db_url, &prefix), &[("TIDINGS_REGISTRY_WRITE_TOKEN", TOKEN)]);
    let ep = up.endpoints(Duration::from_secs(60)).await;
    let topic = format!("{prefix}orders");
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();
    let (id, schema) =
        eventually("the orders schema", Duration::from_secs(30), Duration::from_millis(200), &[&up], || async {
            registry.latest(&format!("{topic}-value")).await.map_err(|e| e.to_string())
        })
        .await;
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    for i in 0..ORDERS {
        let order_id = format!("o-{i:02}");
        let ev = serde_json::json!({"event_id": format!("ev-{i}"), "occurred_at": 1_700_000_000_000_000i64 + i as i64,
            "order_id": order_id, "buyer_id": format!("u-{i}"), "locale": "en",
            "payload": {"OrderPlaced": {"amount_cents": 4200, "currency": "EUR",
                "items": [{"sku": "tea-01", "name": "Green tea", "quantity": 3, "unit_price_cents": 1400}]}}});
        let value = tidings_core::json_avro::json_to_avro(schema, &ev).unwrap();
        let payload = encoder.encode(value).unwrap();
        let rec =
            FutureRecord::to(&topic).key(order_id.as_str()).payload(&payload[..]).timestamp(T0 + i as i64 * 1_000);
        producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    eventually(
        "30 order notifications stored",
        Duration::from_secs(90),
        Duration::from_millis(300),
        &[&up],
        || async {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE kind = 'order.placed'")
                .fetch_one(&pool)
                .await
                .unwrap();
            if n as usize == ORDERS {
                Ok(())
            } else {
                Err(format!("{n} rows"))
            }
        },
    )
    .await;
    let ids_before: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM notifications ORDER BY id").fetch_all(&pool).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let topology = changed_topology(dir.path());
    let (from, to) = (rfc3339(T0 + 10_000), rfc3339(T0 + 20_000));
    let args = ["--topic", "orders", "--stage", "templating", "--from", &from, "--to", &to];
    let run = |extra: &[&str]| replay(&brokers, &db_url, &ep.schema_registry_url, &prefix, &topology, extra);
    let (code, dry) = run(&args);
    assert_eq!(code, 0);
    assert_eq!(numbers(&dry, "Would replace"), vec![10, 0, 0, 0], "replace, current, not stored, dead");
    let changed: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE title LIKE '%(v2)'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(changed, 0, "a dry run changes nothing");

    let mut exec = args.to_vec();
    exec.push("--execute");
    let (code, done) = run(&exec);
    assert_eq!(code, 0);
    assert_eq!(numbers(&done, "Replaced"), vec![10, 0, 0, 0]);
    let titles: Vec<(String, String)> =
        sqlx::query_as("SELECT source_event_id, title FROM notifications ORDER BY source_event_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    for (event, title) in &titles {
        let i: usize = event.trim_start_matches("ev-").parse().unwrap();
        let want = if (10..20).contains(&i) {
            format!("Order o-{i:02} placed (v2)")
        } else {
            format!("Order o-{i:02} placed")
        };
        assert_eq!(title, &want, "{event}");
    }
    let ids_after: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM notifications ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(ids_after, ids_before, "the same rows, no new id");

    // Run again: the texts are current.
    let (code, again) = run(&exec);
    assert_eq!(code, 0);
    assert_eq!(numbers(&again, "Replaced"), vec![0, 10, 0, 0]);
    assert!(up.exited().is_none(), "{}", up.log_tail(30));
}
