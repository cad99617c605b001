//! The scheduler stage against the in-process librdkafka mock cluster and a SQLite store, its clock
//! a file the test writes: what is due is released once, with its key, value and headers; what is
//! not due waits for the clock; a record without valid release headers is a dead letter with its
//! reason; a restart releases nothing again, and a release whose mark was lost goes out again the same.

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::time::Duration;
use tidings_core::kafka::{H_DLQ_REASON, H_TRACEPARENT};
use tidings_pipeline::stages::scheduler::{
    self, FileClock, SchedulerConfig, H_RELEASED_AT, H_RELEASE_AT, H_RELEASE_ID, H_RELEASE_TO,
};
use tidings_store::Store;
use tokio_util::sync::CancellationToken;

mod common;
use common::{consumer, env_mock as env, read, Env};

/// The test's "now": 2027-01-15T08:00:00Z.
const T0: i64 = 1_800_000_000_000_000;
const SECOND: i64 = 1_000_000;

/// Produces one record to `tidings.scheduled` with the given release headers (`None`: left out).
async fn hold(
    producer: &FutureProducer,
    key: &str,
    value: &[u8],
    at: Option<String>,
    to: Option<&str>,
    id: Option<&str>,
) {
    let mut h =
        OwnedHeaders::new().insert(Header { key: H_TRACEPARENT, value: Some(format!("00-{key}-01").as_bytes()) });
    for (name, v) in [(H_RELEASE_AT, at.as_deref()), (H_RELEASE_TO, to), (H_RELEASE_ID, id)] {
        if let Some(v) = v {
            h = h.insert(Header { key: name, value: Some(v.as_bytes()) });
        }
    }
    let rec = FutureRecord::to("tidings.scheduled").key(key).payload(value).headers(h);
    producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| e).unwrap();
}

/// Records on `topic` so far, over its partitions.
fn records(c: &StreamConsumer, topic: &str, partitions: i32) -> i64 {
    (0..partitions).map(|p| c.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap().1).sum()
}

/// The stage, its clock the file `clock`, storing and releasing `batch` records at a time.
fn spawn(
    env: &Env,
    clock: &std::path::Path,
    token: &CancellationToken,
    batch: usize,
) -> tokio::task::JoinHandle<Result<(), tidings_core::StageError>> {
    let mut cfg =
        SchedulerConfig::new(env.kafka.clone(), &env.topo).unwrap().with_clock(Arc::new(FileClock::new(clock)));
    cfg.tick = Duration::from_millis(50);
    cfg.batch_size = batch;
    tokio::spawn(scheduler::run(cfg, env.store.clone(), token.clone()))
}

/// Waits (bounded) until the store holds `id`, released or not; returns whether it is released.
async fn stored(store: &Store, id: &str) -> bool {
    let Store::Sqlite(pool) = store else { unreachable!("a SQLite test store") };
    for _ in 0..300 {
        let row: Option<(Option<i64>,)> =
            sqlx::query_as("SELECT released_at FROM scheduled_releases WHERE release_id = ?")
                .bind(id)
                .fetch_optional(pool)
                .await
                .unwrap();
        if let Some((released,)) = row {
            return released.is_some();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{id} was never stored");
}

/// The value of one sample (name and labels as rendered) of `handle`'s metrics.
fn sample(handle: &PrometheusHandle, name: &str) -> Option<f64> {
    handle.render().lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_records_are_released_once_at_their_time_and_bad_ones_are_dead_letters() {
    // The stage records from its own tasks: the process-wide recorder (this binary's only test).
    let metrics = PrometheusBuilder::new().install_recorder().unwrap();
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let dir = tempfile::tempdir().unwrap();
    let clock = dir.path().join("now");
    std::fs::write(&clock, T0.to_string()).unwrap();
    let producer: FutureProducer = env.kafka.producer().create().unwrap();

    let past = (T0 - SECOND).to_string();
    let later = (T0 + 60 * SECOND).to_string();
    hold(&producer, "u1", b"n1-bytes", Some(past.clone()), Some("notifications"), Some("n1")).await;
    // The same record held twice (templating replayed): released once.
    hold(&producer, "u1", b"n1-bytes", Some(past.clone()), Some("notifications"), Some("n1")).await;
    hold(&producer, "c2", b"c2-bytes", Some(later.clone()), Some("campaigns"), Some("campaign:c2")).await;
    hold(&producer, "u3", b"no-time", None, Some("notifications"), Some("n3")).await;
    hold(&producer, "u4", b"elsewhere", Some(past.clone()), Some("orders-elsewhere"), Some("n4")).await;
    hold(&producer, "u5", b"bad-time", Some("soon".into()), Some("notifications"), Some("n5")).await;

    let token = CancellationToken::new();
    let stage = spawn(&env, &clock, &token, 1_000);
    let notifications = consumer(&env, "notifications");
    let released = read(&notifications, 1).await;
    let (key, value, headers, _, _) = &released[0];
    assert_eq!((key.as_deref(), value.as_deref()), (Some(&b"u1"[..]), Some(&b"n1-bytes"[..])));
    let header = |name: &str| headers.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone()).collect::<Vec<_>>();
    assert_eq!(header(H_TRACEPARENT), vec!["00-u1-01".to_string()], "the other headers go along");
    assert_eq!(header(H_RELEASED_AT), vec![past.clone()]);
    assert!(header(H_RELEASE_AT).is_empty() && header(H_RELEASE_ID).is_empty(), "{headers:?}");

    let dead = read(&consumer(&env, "tidings.dlq.scheduler"), 3).await;
    let mut reasons: Vec<(Vec<u8>, String)> = dead
        .iter()
        .map(|(k, _, h, _, _)| {
            let reason = h.iter().find(|(k, _)| k == H_DLQ_REASON).map(|(_, v)| v.clone()).unwrap_or_default();
            (k.clone().unwrap(), reason)
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        vec![
            (b"u3".to_vec(), "missing-release-header".to_string()),
            (b"u4".to_vec(), "unknown-release-to".to_string()),
            (b"u5".to_vec(), "bad-release-at".to_string()),
        ]
    );

    // The campaign is kept, not released, while the clock is before its time.
    assert!(!stored(&env.store, "campaign:c2").await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!stored(&env.store, "campaign:c2").await, "released before its time");
    assert_eq!(records(&notifications, "campaigns", 6), 0);
    assert_eq!(records(&notifications, "notifications", 12), 1, "n1 once");
    assert_eq!(sample(&metrics, "tidings_scheduler_held"), Some(1.0), "c2 is held");
    let dead = |reason: &str| {
        sample(&metrics, &format!(r#"tidings_dead_letters_total{{stage="scheduler",reason="{reason}"}}"#))
    };
    assert_eq!(dead("bad-release-at"), Some(1.0));
    assert_eq!(dead("missing-release-header"), Some(1.0));

    std::fs::write(&clock, "2027-01-15T08:01:00Z").unwrap();
    let campaigns = consumer(&env, "campaigns");
    let (key, value, headers, _, _) = read(&campaigns, 1).await.remove(0);
    assert_eq!((key.as_deref(), value.as_deref()), (Some(&b"c2"[..]), Some(&b"c2-bytes"[..])));
    assert!(headers.contains(&(H_RELEASED_AT.to_string(), later.clone())), "{headers:?}");
    assert!(stored(&env.store, "campaign:c2").await);

    // A restart reads nothing again and releases nothing again; new due records held meanwhile
    // go, each once, in batches of 2.
    token.cancel();
    stage.await.unwrap().unwrap();
    let later: Vec<String> = (6..12).map(|i| format!("u{i}")).collect();
    for (i, user) in later.iter().enumerate() {
        let id = format!("n{}", i + 6);
        hold(&producer, user, format!("{id}-bytes").as_bytes(), Some(past.clone()), Some("notifications"), Some(&id))
            .await;
    }
    let token = CancellationToken::new();
    let stage = spawn(&env, &clock, &token, 2);
    let mut keys: Vec<String> =
        read(&notifications, 6).await.into_iter().map(|r| String::from_utf8(r.0.unwrap()).unwrap()).collect();
    keys.sort();
    let mut want = later.clone();
    want.sort();
    assert_eq!(keys, want);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(records(&notifications, "notifications", 12), 7, "n1 and n6 to n11, each once");
    assert_eq!(records(&notifications, "campaigns", 6), 1);

    // A release produced but never marked (the process died in between) goes out again, the same.
    let Store::Sqlite(pool) = &env.store else { unreachable!() };
    sqlx::query("UPDATE scheduled_releases SET released_at = NULL WHERE release_id = 'n1'")
        .execute(pool)
        .await
        .unwrap();
    let (key, value, headers, _, _) = read(&notifications, 1).await.remove(0);
    assert_eq!((key.as_deref(), value.as_deref()), (Some(&b"u1"[..]), Some(&b"n1-bytes"[..])));
    assert!(headers.contains(&(H_RELEASED_AT.to_string(), past.clone())), "{headers:?}");
    assert!(stored(&env.store, "n1").await);

    // Released rows are kept for retain_released (7 days) after their release, then purged.
    let rows = || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM scheduled_releases").fetch_one(pool).await.unwrap();
        n
    };
    assert_eq!(rows().await, 8, "n1, c2, n6 to n11");
    std::fs::write(&clock, (T0 + 60 * SECOND + 7 * 24 * 3_600 * SECOND - SECOND).to_string()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rows().await, 8, "kept until their retention is over");
    std::fs::write(&clock, (T0 + 8 * 24 * 3_600 * SECOND).to_string()).unwrap();
    for _ in 0..100 {
        if rows().await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows().await, 0, "purged after their retention");
    token.cancel();
    stage.await.unwrap().unwrap();
    let released = |to: &str| sample(&metrics, &format!(r#"tidings_scheduler_released_total{{to="{to}"}}"#));
    assert_eq!((released("notifications"), released("campaigns")), (Some(8.0), Some(1.0)), "n1, n6-n11, n1 again; c2");
    assert_eq!(sample(&metrics, "tidings_scheduler_held"), Some(0.0));
}
