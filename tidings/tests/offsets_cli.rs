//! `tidings offsets` on Apache Kafka and PostgreSQL: a reset is refused while a `tidings up` runs
//! the group; with the stages stopped, a dry run changes nothing, templating's group is reset to a
//! time (per partition exactly the first record at or after it, the end where there is none) and
//! reprocesses from there when restarted, and persistence's reset moves the database offsets it
//! starts from, so deleted rows come back once and only once.

mod common;

use common::{count_notifications, eventually, Tidings, Up};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::{FramedEncoder, RegistryClient};

struct Cli {
    brokers: String,
    db_url: String,
    prefix: String,
    data_dir: tempfile::TempDir,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_tidings"))
            .args(args)
            .env("TIDINGS_BROKERS", &self.brokers)
            .env("TIDINGS_DATABASE_URL", &self.db_url)
            .env("TIDINGS_TOPIC_PREFIX", &self.prefix)
            .env("TIDINGS_TOPOLOGY", common::topology_path())
            .env("TIDINGS_DATA_DIR", self.data_dir.path())
            .env("TIDINGS_LOG", "warn")
            .output()
            .expect("run tidings")
    }

    /// `offsets show --group <group> --json`: the group's view.
    fn show(&self, group: &str) -> Value {
        let o = self.run(&["offsets", "show", "--group", group, "--json"]);
        assert!(o.status.success(), "{}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
        v["groups"][0].clone()
    }

    /// (topic, partition) → committed offset (None: none) of `group`.
    fn committed(&self, group: &str) -> BTreeMap<(String, i64), Option<i64>> {
        partitions(&self.show(group), "committed")
    }
}

fn partitions(view: &Value, field: &str) -> BTreeMap<(String, i64), Option<i64>> {
    view["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ((p["topic"].as_str().unwrap().to_string(), p["partition"].as_i64().unwrap()), p[field].as_i64()))
        .collect()
}

fn text(o: &Output) -> String {
    format!("exit {:?}\n{}{}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339()
}

/// Whether every partition of `topic` in `view` has `field` at its log's end.
fn at_end(view: &Value, topic: &str, field: &str) -> Result<(), String> {
    let parts = view["partitions"].as_array().unwrap();
    let behind: Vec<&Value> =
        parts.iter().filter(|p| p["topic"] == topic && p[field].as_i64() != p["log_end"].as_i64()).collect();
    if behind.is_empty() {
        Ok(())
    } else {
        Err(format!("{field} behind the end: {behind:?}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_refuses_live_groups_and_moves_idle_ones_to_a_time() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    let cli = Cli {
        brokers: brokers.clone(),
        db_url: db_url.clone(),
        prefix: prefix.clone(),
        data_dir: tempfile::tempdir().unwrap(),
    };
    let stages = Up { stages: "templating,persistence", ..Up::core(&brokers, &db_url, &prefix) };
    let mut up = Tidings::spawn("up", &stages);
    let ep = up.endpoints(Duration::from_secs(60)).await;

    // Twelve orders with known timestamps, a minute apart, an hour ago.
    let orders = format!("{prefix}orders");
    let registry = RegistryClient::new(ep.schema_registry_url.as_str()).unwrap();
    let (id, schema) = registry.latest(&format!("{orders}-value")).await.unwrap();
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &brokers).set("partitioner", "murmur2_random").create().unwrap();
    let base = (chrono::Utc::now().timestamp_millis() - 3_600_000) / 1000 * 1000;
    let mut produced = Vec::new(); // (partition, offset, timestamp)
    for i in 0..12i64 {
        let ts = base + i * 60_000;
        let event = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": ts * 1000,
            "order_id": format!("o-off-{i}"), "buyer_id": format!("u-off-{i}"), "locale": null,
            "payload": {"OrderPlaced": {"amount_cents": 100 + i, "currency": "EUR", "items": []}}});
        let bytes = encoder.encode(json_to_avro(schema, &event).unwrap()).unwrap();
        let key = format!("o-off-{i}");
        let rec = FutureRecord::to(&orders).key(&key).payload(&bytes).timestamp(ts);
        let d = producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
        produced.push((d.partition, d.offset, ts));
    }
    eventually("12 notifications stored", Duration::from_secs(60), Duration::from_millis(250), &[&up], || async {
        let n = count_notifications(&pool).await;
        if n == 12 {
            Ok(())
        } else {
            Err(format!("{n} rows"))
        }
    })
    .await;
    eventually(
        "templating committed to the end of orders",
        Duration::from_secs(30),
        Duration::from_millis(250),
        &[&up],
        || async { at_end(&cli.show("templating"), &orders, "committed") },
    )
    .await;

    // While `up` runs, both groups have members: a reset is refused, even a dry run, and nothing moves.
    for group in ["templating", "persistence"] {
        let view = cli.show(group);
        assert!(!view["members"].as_array().unwrap().is_empty(), "{group}: {view}");
        let before = cli.committed(group);
        let o = cli.run(&["offsets", "reset", "--group", group, "--to", "earliest", "--execute"]);
        assert_eq!(o.status.code(), Some(75), "{}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("live member") && err.contains("tidings replay"), "{err}");
        assert_eq!(cli.committed(group), before, "{group}'s offsets moved");
    }

    common::sigterm(&mut up).await;
    for group in ["templating", "persistence"] {
        eventually(
            &format!("{group} without members"),
            Duration::from_secs(30),
            Duration::from_millis(250),
            &[],
            || async {
                let v = cli.show(group);
                if v["members"].as_array().unwrap().is_empty() {
                    Ok(())
                } else {
                    Err(v.to_string())
                }
            },
        )
        .await;
    }

    // The time: half a minute before the 7th record, so "at or after" picks it and the later ones.
    let at = base + 6 * 60_000 - 30_000;
    let mut expected: BTreeMap<(String, i64), Option<i64>> = cli.committed("templating");
    let ends: BTreeMap<(String, i64), Option<i64>> = partitions(&cli.show("templating"), "log_end");
    for (k, v) in expected.iter_mut() {
        *v = ends[k];
        if k.0 == orders {
            let first =
                produced.iter().filter(|(p, _, ts)| i64::from(*p) == k.1 && *ts >= at).map(|(_, o, _)| *o).min();
            if let Some(o) = first {
                *v = Some(o);
            }
        }
    }
    let reprocessed = produced.iter().filter(|(_, _, ts)| *ts >= at).count() as i64;
    assert_eq!(reprocessed, 6);

    // Dry runs change nothing. A time after every record resolves to each partition's end, never 0.
    let before = cli.committed("templating");
    let o = cli.run(&["offsets", "reset", "--group", "templating", "--to-time", &rfc3339(base + 3_600_000)]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Dry run: nothing changed"), "{out}");
    for ((topic, p), end) in &ends {
        let old = before[&(topic.clone(), *p)].map_or("-".to_string(), |o| o.to_string());
        let line = format!("{topic}[{p}] {old} → {}", end.unwrap());
        assert!(out.contains(&line), "no {line:?} in {out}");
    }
    let o = cli.run(&["offsets", "reset", "--group", "templating", "--to-time", &rfc3339(at)]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Dry run"), "{}", text(&o));
    assert_eq!(cli.committed("templating"), before, "a dry run moved offsets");

    // Executed: exactly the first record at or after the time, per partition (the end where none is).
    let o = cli.run(&["offsets", "reset", "--group", "templating", "--to-time", &rfc3339(at), "--execute"]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(cli.committed("templating"), expected, "{}", text(&o));
    assert!(expected.iter().any(|(k, o)| k.0 == orders && *o != ends[k]), "no partition moved back: {expected:?}");

    // Persistence starts from the database: delete the rows, reset it to the earliest record, and the
    // rows come back on restart (without the database offsets moved, they would not).
    let notifications = format!("{prefix}notifications");
    sqlx::query("DELETE FROM notifications").execute(&pool).await.unwrap();
    let o = cli.run(&[
        "offsets",
        "reset",
        "--group",
        "persistence",
        "--topic",
        "notifications",
        "--to",
        "earliest",
        "--execute",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stored: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM sink_offsets WHERE consumer = $1 AND topic = $2 ORDER BY partition",
    )
    .bind(format!("{prefix}tidings-persistence"))
    .bind(&notifications)
    .fetch_all(&pool)
    .await
    .unwrap();
    let lows = partitions(&cli.show("persistence"), "log_start");
    assert_eq!(stored.len(), 12, "{stored:?}");
    for (p, next) in &stored {
        assert_eq!(Some(*next), lows[&(notifications.clone(), i64::from(*p))], "partition {p}: {stored:?}");
    }
    let notified_before: i64 = common::high_watermarks(&brokers, &notifications).await.iter().sum();

    // Restarted: templating renders the 6 orders from the time again (same notification ids), and
    // persistence stores the 12 deleted rows once.
    let mut up = Tidings::spawn("up-again", &stages);
    up.endpoints(Duration::from_secs(60)).await;
    eventually(
        "templating at the end of orders again",
        Duration::from_secs(60),
        Duration::from_millis(250),
        &[&up],
        || async { at_end(&cli.show("templating"), &orders, "committed") },
    )
    .await;
    let notified: i64 = common::high_watermarks(&brokers, &notifications).await.iter().sum();
    assert_eq!(notified - notified_before, reprocessed, "notifications rendered again after the reset");
    eventually(
        "persistence stored to the end",
        Duration::from_secs(60),
        Duration::from_millis(250),
        &[&up],
        || async { at_end(&cli.show("persistence"), &notifications, "stored") },
    )
    .await;
    assert_eq!(count_notifications(&pool).await, 12, "the deleted rows, each once");
    common::sigterm(&mut up).await;
}

#[test]
fn claims_and_unknown_groups_are_refused_with_usage_errors() {
    let cli = Cli {
        brokers: "127.0.0.1:1".into(),
        db_url: "sqlite://unused.db".into(),
        prefix: "t0.".into(),
        data_dir: tempfile::tempdir().unwrap(),
    };
    let o = cli.run(&["offsets", "reset", "--group", "nope", "--to", "latest"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(
        text(&o).contains("templating (t0.tidings-templating), persistence (t0.tidings-persistence)"),
        "{}",
        text(&o)
    );
    let o = cli.run(&["offsets", "reset", "--group", "claims", "--to", "latest", "--execute"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(
        text(&o).contains("committed with its decisions' state") && text(&o).contains("tidings replay"),
        "{}",
        text(&o)
    );
}
