//! The persistence stage when the database refuses part of a batch (the librdkafka mock cluster and
//! a fresh PostgreSQL or SQLite store): the refused records go to the dead-letter topic with their
//! SQLSTATE, the rest are stored and the offsets move on; a schema problem still stops the stage.

use rdkafka::consumer::Consumer;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::{Duration, Instant};
use tidings_core::kafka::{H_DLQ_ERROR, H_DLQ_OFFSET, H_DLQ_PARTITION, H_DLQ_REASON, H_DLQ_TOPIC};
use tidings_sinks::persistence;
use tidings_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

mod support;
use support::{consumer, encoder, env, notification, persistence_cfg, read, Env};

const DLQ: &str = "tidings.dlq.persistence";

/// A random user id of 10,016 characters: its inbox index row is over PostgreSQL's btree limit
/// (about 2,700 bytes) even compressed, so the database refuses it with SQLSTATE 54000.
fn over_long_user() -> String {
    (0..313).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect()
}

/// Produces `users[i]`'s notification `i` for each i (keyed by user); returns (partition, offset, payload) of each.
async fn produce(env: &Env, users: &[String]) -> Vec<(i32, i64, Vec<u8>)> {
    let (enc, _) = encoder(env, "notifications-value").await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let mut out = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let bytes = enc.encode(notification(i, user, 1_700_000_000_000_000).to_value()).unwrap();
        let d = producer
            .send(FutureRecord::to("notifications").key(user).payload(&bytes), Duration::from_secs(5))
            .await
            .unwrap();
        out.push((d.partition, d.offset, bytes));
    }
    out
}

/// Runs the stage over `users`' notifications into `store`, expects the records at `bad` (indexes
/// into `users`) dead-lettered with `reason` and every other one stored, with the stage still up.
async fn refused_records_are_dead_lettered(env: &Env, store: Store, users: Vec<String>, bad: &[usize], reason: &str) {
    let sent = produce(env, &users).await;
    let cfg = persistence_cfg(env, "refusals", 1000, Duration::from_millis(200));
    let health = cfg.health.clone();
    let token = CancellationToken::new();
    let stage = tokio::spawn(persistence::run(cfg, store.clone(), token.clone()));

    let dead = read(&consumer(env, DLQ), bad.len()).await;
    let mut dead_offsets = Vec::new();
    for (_, payload, headers, _, _) in &dead {
        let h = |k: &str| headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.clone()).unwrap_or_default();
        assert_eq!(h(H_DLQ_REASON), reason, "{headers:?}");
        assert_eq!(h(H_DLQ_TOPIC), "notifications");
        assert!(h(H_DLQ_ERROR).contains(reason), "the error names the refusal: {}", h(H_DLQ_ERROR));
        let coords = (h(H_DLQ_PARTITION).parse::<i32>().unwrap(), h(H_DLQ_OFFSET).parse::<i64>().unwrap());
        let original = sent.iter().find(|(p, o, _)| (*p, *o) == coords).expect("coordinates of a produced record");
        assert_eq!(payload.as_deref(), Some(original.2.as_slice()), "the dead letter is a copy of the record");
        dead_offsets.push(coords);
    }
    dead_offsets.sort();
    let mut expected: Vec<(i32, i64)> = bad.iter().map(|&i| (sent[i].0, sent[i].1)).collect();
    expected.sort();
    assert_eq!(dead_offsets, expected, "exactly the refused records are dead-lettered");

    let good = (users.len() - bad.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.count_notifications().await.unwrap() < good {
        assert!(Instant::now() < deadline, "the records around the refused ones were not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Offsets are stored after the rows and the dead letters: wait for them to cover every record.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let next: i64 = store.load_offsets("refusals", "notifications").await.unwrap().values().sum();
        if next == users.len() as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "the stored offsets stopped at {next} of {}", users.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.count_notifications().await.unwrap(), good);
    let mut stored = std::collections::BTreeSet::new();
    for user in &users {
        stored.extend(store.inbox(user, None, 100).await.unwrap().into_iter().map(|i| i.notification.notification_id));
    }
    for (i, user) in users.iter().enumerate() {
        let id = notification(i, user, 1_700_000_000_000_000).notification_id;
        assert_eq!(stored.contains(&id), !bad.contains(&i), "notification {i}");
    }
    assert!(!stage.is_finished(), "the stage stopped over a refused record");
    assert!(health.is_up(), "the stage is down over a refused record");
    let (_, high) = consumer(env, DLQ).fetch_watermarks(DLQ, 0, Duration::from_secs(5)).unwrap();
    assert_eq!(high, bad.len() as i64, "each refused record is dead-lettered once");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_refusing_an_over_long_user_id_dead_letters_that_record_and_stores_the_rest() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let (store, _) = tidings_store::testing::fresh_postgres().await.unwrap();
    let bad = [5, 17];
    let users: Vec<String> =
        (0..40).map(|i| if bad.contains(&i) { over_long_user() } else { format!("u{}", i % 9) }).collect();
    refused_records_are_dead_lettered(&env, store, users, &bad, "db-54000-program-limit-exceeded").await;
    env.token.cancel();
    drop(mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refusing_a_record_by_constraint_dead_letters_it_and_stores_the_rest() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let Store::Sqlite(pool) = &env.store else { panic!("the test env's store is SQLite") };
    // A rule the data breaks: SQLite raises SQLITE_CONSTRAINT_TRIGGER for the refused rows.
    sqlx::raw_sql(
        "CREATE TRIGGER refuse_long_users BEFORE INSERT ON notifications WHEN length(NEW.user_id) > 1000
         BEGIN SELECT RAISE(ABORT, 'user id too long'); END",
    )
    .execute(pool)
    .await
    .unwrap();
    let bad = [0, 11, 12];
    let users: Vec<String> =
        (0..30).map(|i| if bad.contains(&i) { over_long_user() } else { format!("u{}", i % 5) }).collect();
    refused_records_are_dead_lettered(&env, env.store.clone(), users, &bad, "db-sqlite-constraint").await;
    env.token.cancel();
    drop(mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_still_stops_the_stage_with_an_error() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let (store, url) = tidings_store::testing::fresh_postgres().await.unwrap();
    sqlx::query("DROP TABLE notifications").execute(&sqlx::PgPool::connect(&url).await.unwrap()).await.unwrap();
    produce(&env, &["u1".to_string(), "u2".to_string()]).await;
    let cfg = persistence_cfg(&env, "no-table", 1000, Duration::from_millis(200));
    let token = CancellationToken::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), persistence::run(cfg, store.clone(), token))
        .await
        .expect("the stage kept running without its table");
    let err = ended.expect_err("the stage ends");
    assert!(!err.is_retriable(), "{err}");
    assert!(matches!(err.source_as::<StoreError>(), Some(StoreError::Query(_))), "{err:?}");
    let (_, high) = consumer(&env, DLQ).fetch_watermarks(DLQ, 0, Duration::from_secs(5)).unwrap();
    assert_eq!(high, 0, "a schema problem is not the records' fault: nothing is dead-lettered");
    assert!(store.load_offsets("no-table", "notifications").await.unwrap().is_empty());
    env.token.cancel();
    drop(mock);
}
