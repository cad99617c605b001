//! `tidings replay` through persistence on Apache Kafka and PostgreSQL: a deleted slice of the
//! notifications table comes back from the covering time range while the live stage keeps
//! consuming, without duplicates and without moving the live group; the dry run's counts match
//! what the execution did; a replay SIGKILLed half-way resumes with the same command; a `--from`
//! after every record is an empty plan at the partitions' ends, and out-of-order timestamps are counted.

mod common;

use common::{count_notifications, eventually, Tidings, Up};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, Notification, RegistryClient};

const TOTAL: usize = 50_000;
/// The slice deleted and replayed: notifications `SLICE` (by their index and timestamp).
const SLICE: std::ops::Range<usize> = 20_000..30_000;
/// Record timestamps: notification `i` at `T0 + i` ms.
const T0: i64 = 1_780_000_000_000;

fn user(i: usize) -> String {
    format!("user-{:04}", (i * 7919) % 1_000)
}

fn notification(i: usize) -> Notification {
    let event = format!("ev-{i}");
    let user = user(i);
    Notification {
        notification_id: Notification::id_for(&event, &user),
        user_id: user,
        kind: if i.is_multiple_of(2) { "order.shipped".into() } else { "order.paid".into() },
        title: format!("Notification {i}"),
        body: "replay test".into(),
        link: None,
        source_event_id: event,
        occurred_at: 1_700_000_000_000_000 + i as i64,
        source_topic: "orders".into(),
        source_partition: 0,
        source_offset: i as i64,
        data: None,
        inbox: true,
        category: String::new(),
        recipients: vec![],
    }
}

/// The single key of a JSON object (a union value written as `{"branch": value}`), or "".
fn schema_name(v: &serde_json::Value) -> &str {
    v.as_object().and_then(|o| o.keys().next()).map_or("", String::as_str)
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Produces notifications `range` with timestamps `ts(i)` (partition by key unless `partition`).
async fn produce(
    producer: &FutureProducer,
    encoder: &FramedEncoder,
    topic: &str,
    range: std::ops::Range<usize>,
    ts: impl Fn(usize) -> i64,
    partition: Option<i32>,
) {
    let mut deliveries = Vec::new();
    for i in range {
        let n = notification(i);
        let payload = encoder.encode(n.to_value()).unwrap();
        let mut rec = FutureRecord::to(topic).key(n.user_id.as_str()).payload(&payload[..]).timestamp(ts(i));
        if let Some(p) = partition {
            rec = rec.partition(p);
        }
        deliveries.push(common::send_when_room(producer, rec, &format!("notification {i}")).await);
        if deliveries.len() >= 5_000 {
            for d in deliveries.drain(..) {
                d.await.unwrap().map_err(|(e, _)| e).unwrap();
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

struct Infra {
    brokers: String,
    db_url: String,
    registry: String,
    prefix: String,
}

impl Infra {
    fn replay(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidings"));
        cmd.arg("replay")
            .args(args)
            .args(["--brokers", &self.brokers, "--database-url", &self.db_url])
            .args(["--schema-registry-url", &self.registry, "--topic-prefix", &self.prefix])
            .arg("--topology")
            .arg(common::topology_path())
            .env_remove("TIDINGS_REPLAY_RATE")
            .env("TIDINGS_LOG", "warn")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> (i32, String) {
        let out: Output = self.replay(args).output().expect("running tidings replay");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        eprintln!("tidings replay {args:?} → {:?}\n{text}", out.status.code());
        (out.status.code().unwrap_or(-1), text)
    }
}

/// The numbers after `label` in the summary line starting with `line`.
fn counts(text: &str, line: &str) -> Vec<u64> {
    let l = text.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("no line {line:?} in\n{text}"));
    l.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

/// The live group's committed offsets and member ids, as `kafka-consumer-groups --describe` shows.
fn group_view(brokers: &str, group: &str, topic: &str, partitions: i32) -> (BTreeMap<i32, i64>, Vec<String>) {
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    let offsets = committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    let groups = c.fetch_group_list(Some(group), Duration::from_secs(10)).unwrap();
    let mut members: Vec<String> =
        groups.groups().iter().flat_map(|g| g.members().iter().map(|m| m.id().to_string())).collect();
    members.sort();
    (offsets, members)
}

fn groups_like(brokers: &str, part: &str) -> Vec<String> {
    let c: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", "probe-groups").create().unwrap();
    let groups = c.fetch_group_list(None, Duration::from_secs(10)).unwrap();
    groups.groups().iter().map(|g| g.name().to_string()).filter(|n| n.contains(part)).collect()
}

async fn stored_ok(pool: &sqlx::PgPool, want: usize) -> Result<(), String> {
    let total = count_notifications(pool).await;
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT id) FROM notifications").fetch_one(pool).await.unwrap();
    if total as usize == want && distinct == total {
        Ok(())
    } else {
        Err(format!("{total} rows, {distinct} distinct, want {want}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_restores_a_deleted_slice_beside_live_persistence_and_resumes_after_sigkill() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut live = Tidings::spawn(
        "live",
        &Up {
            brokers: &brokers,
            database_url: &db_url,
            prefix: &prefix,
            stages: "gateway,persistence",
            registry_url: None,
        },
    );
    let ep = live.endpoints(Duration::from_secs(60)).await;
    let topic = format!("{prefix}notifications");
    let group = format!("{prefix}tidings-persistence");
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();
    let (id, schema) = eventually(
        "the notifications schema",
        Duration::from_secs(30),
        Duration::from_millis(200),
        &[&live],
        || async { registry.latest(&format!("{topic}-value")).await.map_err(|e| e.to_string()) },
    )
    .await;
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let live_encoder = FramedEncoder::new(id, schema).unwrap();
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    produce(&producer, &encoder, &topic, 0..TOTAL, |i| T0 + i as i64, None).await;
    eventually(
        "50,000 rows stored by the live stage",
        Duration::from_secs(180),
        Duration::from_millis(500),
        &[&live],
        || stored_ok(&pool, TOTAL),
    )
    .await;
    let infra = Infra {
        brokers: brokers.clone(),
        db_url: db_url.clone(),
        registry: ep.schema_registry_url.clone(),
        prefix: prefix.clone(),
    };
    let delete = || async {
        sqlx::query("DELETE FROM notifications WHERE source_offset >= $1 AND source_offset < $2")
            .bind(SLICE.start as i64)
            .bind(SLICE.end as i64)
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected()
    };
    assert_eq!(delete().await, SLICE.len() as u64);
    let (_, members_before) = group_view(&brokers, &group, &topic, 12);
    assert!(!members_before.is_empty(), "the live persistence stage is a member of {group}");
    let sink_before: Vec<(String, i32, i64)> =
        sqlx::query_as("SELECT consumer, partition, next_offset FROM sink_offsets ORDER BY 1, 2")
            .fetch_all(&pool)
            .await
            .unwrap();

    // Covering range: 5,000 stored records either side of the slice.
    let (from, to) = (rfc3339(T0 + SLICE.start as i64 - 5_000), rfc3339(T0 + SLICE.end as i64 + 5_000));
    let args = ["--topic", "notifications", "--stage", "persistence", "--from", &from, "--to", &to];
    let (code, dry) = infra.run(&args);
    assert_eq!(code, 0);
    assert_eq!(counts(&dry, "Read "), vec![20_000, 0], "read, out of order");
    let would = counts(&dry, "Would insert");
    assert_eq!(&would[..3], &[SLICE.len() as u64, 10_000, 0], "would insert, present, dead-letter");
    assert_eq!(stored_ok(&pool, TOTAL - SLICE.len()).await, Ok(()), "a dry run changes nothing");

    // Live traffic while the replay runs: new notifications, stamped now.
    let live_traffic = {
        let (producer, encoder, topic) = (producer.clone(), live_encoder, topic.clone());
        tokio::spawn(async move {
            for step in 0..20 {
                let start = TOTAL + step * 500;
                produce(
                    &producer,
                    &encoder,
                    &topic,
                    start..start + 500,
                    |_| chrono::Utc::now().timestamp_millis(),
                    None,
                )
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut exec_args = args.to_vec();
    exec_args.push("--execute");
    let (code, done) = infra.run(&exec_args);
    assert_eq!(code, 0);
    assert_eq!(&counts(&done, "Written")[..3], &would[..3], "written, present, dead-lettered = the dry run's");
    live_traffic.await.unwrap();
    let all = TOTAL + 10_000;
    eventually("every row, once", Duration::from_secs(120), Duration::from_millis(500), &[&live], || {
        stored_ok(&pool, all)
    })
    .await;
    let expected: Vec<uuid::Uuid> = (0..all).map(|i| notification(i).notification_id).collect();
    let matching: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE id = ANY($1)")
        .bind(&expected)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(matching, all as i64);

    // The live group: the same members, its commits at the log's end (it consumed the live
    // traffic, nothing rewound it); the replay stored no offsets and joined no group.
    let marks = common::high_watermarks(&brokers, &topic).await;
    let (members_after, committed) = {
        let mut last = (vec![], BTreeMap::new());
        for _ in 0..100 {
            let (c, m) = group_view(&brokers, &group, &topic, 12);
            last = (m, c);
            if (0..12).all(|p| last.1.get(&p).copied().unwrap_or(0) == marks[p as usize]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        last
    };
    assert_eq!(members_after, members_before, "the live group's members");
    let want: BTreeMap<i32, i64> = (0..12).map(|p| (p, marks[p as usize])).filter(|(_, o)| *o > 0).collect();
    assert_eq!(committed.into_iter().filter(|(_, o)| *o > 0).collect::<BTreeMap<_, _>>(), want);
    let consumers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT consumer FROM sink_offsets").fetch_all(&pool).await.unwrap();
    assert_eq!(consumers, vec![group.clone()], "only the live stage stores offsets");
    assert!(sink_before.iter().all(|(c, _, _)| c == &group));
    assert!(groups_like(&brokers, "tidings-range-").is_empty(), "the replay's throwaway group never joined");

    // Resume: delete the slice again, execute slowly in its own process, SIGKILL it half-way.
    assert_eq!(delete().await, SLICE.len() as u64);
    let (from, to) = (rfc3339(T0 + SLICE.start as i64), rfc3339(T0 + SLICE.end as i64));
    let args = [
        "--topic",
        "notifications",
        "--from",
        &from,
        "--to",
        &to,
        "--execute",
        "--rate",
        "2000",
        "--batch-size",
        "500",
    ];
    let mut child = infra.replay(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let half = eventually(
        "a third of the slice replayed",
        Duration::from_secs(60),
        Duration::from_millis(100),
        &[&live],
        || async {
            let n = count_notifications(&pool).await as usize;
            if n >= all - SLICE.len() + SLICE.len() / 3 {
                Ok(n)
            } else {
                Err(format!("{n} rows"))
            }
        },
    )
    .await;
    Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap();
    child.wait().unwrap();
    assert!(half < all, "killed before the end ({half} rows)");
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM replays ORDER BY started_at DESC LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outcome, "running", "a SIGKILLed replay recorded no end");
    let (code, resumed) = infra.run(&args);
    assert_eq!(code, 0);
    assert!(resumed.contains("Resuming replay"), "the same command resumes:\n{resumed}");
    assert_eq!(stored_ok(&pool, all).await, Ok(()));
    let (code, listed) = infra.run(&["list"]);
    assert_eq!(code, 0);
    assert_eq!(listed.lines().filter(|l| l.contains(" done ")).count(), 2, "two done replays listed:\n{listed}");
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT outcome, counts FROM replays ORDER BY started_at").fetch_all(&pool).await.unwrap();
    let resumed_counts: serde_json::Value = serde_json::from_str(&rows[1].1).unwrap();
    assert_eq!(rows.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), ["done", "done"]);
    assert_eq!(
        resumed_counts["written_rows"].as_u64().unwrap() + resumed_counts["present_rows"].as_u64().unwrap(),
        SLICE.len() as u64,
        "every record of the range counted once across the kill: {resumed_counts}"
    );
    assert!(live.exited().is_none(), "the live process died\n{}", live.log_tail(40));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_from_after_every_record_is_an_empty_plan_at_the_end_and_out_of_order_timestamps_are_counted() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let mut gw = Tidings::spawn(
        "gateway",
        &Up { brokers: &brokers, database_url: &db_url, prefix: &prefix, stages: "gateway", registry_url: None },
    );
    let ep = gw.endpoints(Duration::from_secs(60)).await;
    let topic = format!("{prefix}notifications");
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();
    let (id, schema) =
        eventually("the notifications schema", Duration::from_secs(30), Duration::from_millis(200), &[&gw], || async {
            registry.latest(&format!("{topic}-value")).await.map_err(|e| e.to_string())
        })
        .await;
    let encoder = FramedEncoder::new(id, schema).unwrap();
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    // Partition 3: offsets 0..10 at T0 + 0..9 s, except offset 6, stamped 1 s (out of order).
    produce(&producer, &encoder, &topic, 0..10, |i| if i == 6 { T0 + 1_000 } else { T0 + i as i64 * 1_000 }, Some(3))
        .await;
    let infra = Infra { brokers: brokers.clone(), db_url, registry: ep.schema_registry_url.clone(), prefix };

    let later = rfc3339(T0 + 60_000);
    let (code, out) = infra.run(&["--topic", "notifications", "--from", &later, "--partition", "3"]);
    assert_eq!(code, 0);
    // partition, log start, start, end, records: at the end (10), never 0.
    assert_eq!(counts(&out, "        3"), vec![3, 0, 10, 10, 0], "{out}");
    assert!(out.contains("Nothing to replay: no record at or after --from"), "{out}");

    // [T0 + 2 s, T0 + 8 s): offsets 2..8; offset 6's timestamp is earlier than offset 5's.
    let (from, to) = (rfc3339(T0 + 2_000), rfc3339(T0 + 8_000));
    let (code, out) = infra.run(&["--topic", "notifications", "--from", &from, "--to", &to, "--partition", "3"]);
    assert_eq!(code, 0);
    assert_eq!(counts(&out, "        3"), vec![3, 0, 2, 8, 6], "{out}");
    assert_eq!(counts(&out, "Read "), vec![6, 1], "read, out of order: {out}");
    assert_eq!(&counts(&out, "Would insert")[..3], &[6, 0, 0]);

    // --rate: 6 records at 5/s take at least 1.2 s (the 6th is due 1.2 s after the start).
    let started = std::time::Instant::now();
    let (code, out) =
        infra.run(&["--topic", "notifications", "--from", &from, "--to", &to, "--partition", "3", "--rate", "5"]);
    assert_eq!(code, 0, "{out}");
    assert!(started.elapsed() >= Duration::from_millis(1_200), "--rate 5 read 6 records in {:?}", started.elapsed());

    // Export: the same range as JSON Lines and as an Avro container, decoded, with coordinates.
    let dir = tempfile::tempdir().unwrap();
    for name in ["range.jsonl", "range.avro"] {
        let path = dir.path().join(name);
        let file = path.to_str().unwrap();
        let (code, out) = infra.run(&[
            "--topic",
            "notifications",
            "--from",
            &from,
            "--to",
            &to,
            "--partition",
            "3",
            "--export",
            file,
        ]);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("Exported 6 records"), "{out}");
        let got: Vec<(i64, i64, String)> = if name.ends_with(".jsonl") {
            std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|l| {
                    let j: serde_json::Value = serde_json::from_str(l).unwrap();
                    assert_eq!((j["partition"].as_i64(), j["key"].as_str()), (Some(3), j["value"]["user_id"].as_str()));
                    (
                        j["offset"].as_i64().unwrap(),
                        j["timestamp_ms"].as_i64().unwrap(),
                        j["value"]["title"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        } else {
            let reader = apache_avro::Reader::new(std::fs::File::open(&path).unwrap()).unwrap();
            reader
                .map(|v| {
                    let j = tidings_core::json_avro::avro_to_json(&v.unwrap());
                    let ts = j["timestamp_ms"].as_i64().or_else(|| j["timestamp_ms"]["long"].as_i64()).unwrap();
                    let value =
                        if j["value"]["title"].is_null() { &j["value"][schema_name(&j["value"])] } else { &j["value"] };
                    (j["offset"].as_i64().unwrap(), ts, value["title"].as_str().unwrap().to_string())
                })
                .collect()
        };
        let want: Vec<(i64, i64, String)> = (2..8)
            .map(|i| (i as i64, if i == 6 { T0 + 1_000 } else { T0 + i as i64 * 1_000 }, format!("Notification {i}")))
            .collect();
        assert_eq!(got, want, "{name}");
    }

    // SIGTERM: the replay stops after its batch, records outcome stopped (exit 130), and the same
    // command resumes from the saved progress to the end.
    let args = [
        "--topic",
        "notifications",
        "--from",
        &from,
        "--to",
        &to,
        "--partition",
        "3",
        "--execute",
        "--rate",
        "2",
        "--batch-size",
        "1",
    ];
    let mut child = infra.replay(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    eventually(
        "the replay's first saved batch",
        Duration::from_secs(30),
        Duration::from_millis(20),
        &[&gw],
        || async {
            let progress: Option<String> =
                sqlx::query_scalar("SELECT progress FROM replays").fetch_optional(&pool).await.unwrap();
            match progress {
                Some(p) if p != "{}" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130), "stopped");
    let (outcome, progress): (String, String) =
        sqlx::query_as("SELECT outcome, progress FROM replays").fetch_one(&pool).await.unwrap();
    let next: serde_json::Value = serde_json::from_str(&progress).unwrap();
    assert_eq!(outcome, "stopped");
    assert!(next["3"].as_i64().unwrap() < 8, "stopped before the end: {progress}");
    let (code, out) = infra.run(&args);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Resuming replay"), "{out}");
    let (outcome, progress): (String, String) =
        sqlx::query_as("SELECT outcome, progress FROM replays").fetch_one(&pool).await.unwrap();
    assert_eq!((outcome.as_str(), progress.as_str()), ("done", r#"{"3":8}"#));
    assert_eq!(count_notifications(&pool).await, 6);

    // A record the database refuses (a user id past the inbox index's limit, PostgreSQL 54000)
    // among good ones: the others are stored, it goes to the dead-letter topic with its reason.
    let mut poison = notification(100);
    poison.user_id = (0..313).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect();
    poison.notification_id = Notification::id_for(&poison.source_event_id, &poison.user_id);
    for n in [notification(101), poison, notification(102)] {
        let payload = encoder.encode(n.to_value()).unwrap();
        let rec = FutureRecord::to(&topic).key("k").payload(&payload[..]).partition(4);
        producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
    }
    let (code, out) = infra.run(&["--topic", "notifications", "--from-offset", "0", "--partition", "4", "--execute"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(&counts(&out, "Written")[..3], &[2, 0, 1], "written, present, dead-lettered");
    let dlq = common::high_watermarks(&brokers, &format!("{}tidings.dlq.persistence", infra.prefix)).await;
    assert_eq!(dlq.iter().sum::<i64>(), 1, "one dead letter");
    assert_eq!(count_notifications(&pool).await, 8);

    // Bad input: --from after --to, an unknown topic, an offset below... (none here: log start 0).
    let (code, out) = infra.run(&["--topic", "notifications", "--from", &to, "--to", &from]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("is after --to"), "{out}");
    let (code, out) = infra.run(&["--topic", "nope", "--from", &from]);
    assert_eq!(code, 64, "{out}");
    let (code, out) = infra.run(&["--topic", "notifications", "--from", &from, "--event-type", "no.such.type"]);
    assert_eq!(code, 0);
    assert!(out.contains("The filters matched none of the 11 records read."), "{out}");
    assert!(gw.exited().is_none());
}
