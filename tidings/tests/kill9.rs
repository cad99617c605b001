//! Crash safety of the persistence stage on Apache Kafka and PostgreSQL: while 100,000
//! notifications flow (in ordinary multi-record batches), the stage is SIGKILLed again and again
//! mid-stream; the table ends with exactly the 100,000 expected rows (none lost, none duplicated)
//! and the offsets stored with them reach every partition's high watermark. Each restart rejoins
//! with the same `group.instance.id` (static membership), as an orchestrator's restarted pod
//! would: Kafka hands it the dead member's partitions at once instead of after a session timeout.

mod common;

use common::{count_notifications, eventually, Tidings, Up};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, Notification, RegistryClient};

const TOTAL: usize = 100_000;
const USERS: usize = 1_000;
/// Records per pacing step, and the step length: 100 per 25 ms = 4,000/s, so about 25 s in all.
const STEP: usize = 100;
const STEP_EVERY: Duration = Duration::from_millis(25);
const STEPS_IN_FLIGHT: usize = 10;
const MIN_KILLS: usize = 8;
/// Kills of a process that stored rows during its life, sought (not required) before moving on.
const WANTED_WRITER_KILLS: usize = 3;
const EXTRA_KILLS_UNTIL: Duration = Duration::from_secs(90);

fn user(i: usize) -> String {
    format!("user-{:04}", (i * 7919) % USERS)
}

fn notification(i: usize) -> Notification {
    let event = format!("ev-{i}");
    let user = user(i);
    Notification {
        notification_id: Notification::id_for(&event, &user),
        user_id: user,
        kind: "test.kill9".into(),
        title: format!("Notification {i}"),
        body: "crash-safety test".into(),
        link: i.is_multiple_of(2).then(|| format!("/n/{i}")),
        source_event_id: event,
        occurred_at: 1_700_000_000_000_000 + i as i64,
        source_topic: "orders".into(),
        source_partition: (i % 6) as i32,
        source_offset: i as i64,
        data: None,
        inbox: true,
        category: String::new(),
        recipients: vec![],
    }
}

/// Produces all notifications at a steady pace; returns, per partition, how many records the
/// broker acknowledged and the offset after the highest acknowledged one.
async fn produce_all(producer: FutureProducer, encoder: FramedEncoder, topic: String) -> BTreeMap<i32, (i64, i64)> {
    let started = Instant::now();
    let mut acked: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
    let mut ack = |d: rdkafka::producer::future_producer::Delivery| {
        let e = acked.entry(d.partition).or_default();
        e.0 += 1;
        e.1 = e.1.max(d.offset + 1);
    };
    // Steps whose acknowledgements are still awaited: a few overlap, so the broker's round trips
    // do not set the pace.
    let mut in_flight: VecDeque<Vec<DeliveryFuture>> = VecDeque::new();
    for step in 0..TOTAL.div_ceil(STEP) {
        let mut deliveries = Vec::with_capacity(STEP);
        for i in step * STEP..((step + 1) * STEP).min(TOTAL) {
            let n = notification(i);
            let payload = encoder.encode(n.to_value()).expect("notification encodes");
            let rec = FutureRecord::to(&topic).key(n.user_id.as_str()).payload(&payload[..]);
            deliveries.push(common::send_when_room(&producer, rec, &format!("notification {i}")).await);
        }
        in_flight.push_back(deliveries);
        while in_flight.len() > STEPS_IN_FLIGHT || (step + 1 == TOTAL.div_ceil(STEP) && !in_flight.is_empty()) {
            for d in in_flight.pop_front().into_iter().flatten() {
                ack(d
                    .await
                    .expect("delivery future")
                    .map_err(|(e, _)| e)
                    .expect("broker acknowledged the notification"));
            }
        }
        tokio::time::sleep_until((started + STEP_EVERY * (step as u32 + 1)).into()).await;
    }
    let n: i64 = acked.values().map(|(n, _)| n).sum();
    eprintln!("produced {n} notifications in {:.1}s", started.elapsed().as_secs_f64());
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_killed_repeatedly_stores_every_notification_exactly_once() {
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (pool, db_url) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    eprintln!("topic prefix {prefix}, database {db_url}");
    // Long-lived: serves the embedded registry and creates the topics; consumes nothing.
    let mut gateway = Tidings::spawn(
        "gateway",
        &Up { brokers: &brokers, database_url: &db_url, prefix: &prefix, stages: "gateway", registry_url: None },
    );
    let ep = gateway.endpoints(Duration::from_secs(60)).await;
    let topic = format!("{prefix}notifications");
    let registry = RegistryClient::new(&ep.schema_registry_url).unwrap();
    let (id, schema) =
        registry.latest(&format!("{topic}-value")).await.expect("notifications schema registered by `up`");
    let encoder = FramedEncoder::new(id, schema).unwrap();
    // Ordinary batching (100 records per 25 ms step): restarts resume mid-batch from stored offsets.
    let producer: FutureProducer = KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    let producing = tokio::spawn(produce_all(producer, encoder, topic.clone()));

    // TIDINGS_KILL9_SEED replays a schedule that failed.
    let seed: u64 = std::env::var("TIDINGS_KILL9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
    eprintln!("kill schedule seed {seed} (set TIDINGS_KILL9_SEED to replay)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let persistence = Up {
        brokers: &brokers,
        database_url: &db_url,
        prefix: &prefix,
        stages: "persistence",
        registry_url: Some(&ep.schema_registry_url),
    };
    let static_member = [("TIDINGS_KAFKA_OPTS", "group.instance.id=kill9-persistence")];
    let started = Instant::now();
    // (lifetime ms, rows when it started, rows right after its SIGKILL)
    let mut kills: Vec<(u64, i64, i64)> = Vec::new();
    // Keep going a little past the minimum while rows still flow, so that several kills hit a
    // process in the middle of writing.
    let writers = |kills: &[(u64, i64, i64)]| kills.iter().filter(|(_, before, after)| after > before).count();
    loop {
        let now = count_notifications(&pool).await;
        let more = !producing.is_finished()
            || kills.len() < MIN_KILLS
            || (writers(&kills) < WANTED_WRITER_KILLS
                && (now as usize) < TOTAL
                && started.elapsed() < EXTRA_KILLS_UNTIL);
        if !more {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "kill loop still running after 120 s: {kills:?}");
        let before = now;
        let mut stage = Tidings::spawn_env(&format!("persistence-{}", kills.len() + 1), &persistence, &static_member);
        let life = rng.random_range(500..=3000);
        tokio::time::sleep(Duration::from_millis(life)).await;
        if let Some(status) = stage.exited() {
            panic!("{} exited on its own ({status})\n{}", stage.name, stage.log_tail(40));
        }
        stage.kill9();
        kills.push((life, before, count_notifications(&pool).await));
    }
    let acked = producing.await.expect("producer task");
    assert_eq!(acked.values().map(|(n, _)| n).sum::<i64>(), TOTAL as i64);
    // A fresh topic: offsets start at 0 and are dense, so the next offset is the record count.
    assert!(acked.values().all(|(n, end)| n == end), "acknowledged (count, end) per partition: {acked:?}");
    eprintln!("{} kills (lifetime ms, rows at start, rows right after the kill): {kills:?}", kills.len());
    eprintln!("{} of them killed a process that had stored rows during its life", writers(&kills));
    assert!(
        kills.iter().any(|(_, _, after)| *after > 0 && (*after as usize) < TOTAL),
        "no kill landed mid-stream: {kills:?}"
    );

    // Right after the last kill: the static member's partitions pass to the new process at once.
    let last = Tidings::spawn_env("persistence-final", &persistence, &static_member);
    let t = Instant::now();
    eventually(
        "all 100,000 rows after the last restart",
        Duration::from_secs(180),
        Duration::from_millis(500),
        &[&last],
        || async {
            let n = count_notifications(&pool).await;
            if n as usize == TOTAL {
                Ok(())
            } else {
                Err(format!("{n} rows"))
            }
        },
    )
    .await;
    eprintln!("final run stored the rest in {:.1}s", t.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let total: i64 = count_notifications(&pool).await;
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT id) FROM notifications").fetch_one(&pool).await.unwrap();
    let expected: Vec<uuid::Uuid> = (0..TOTAL).map(|i| Notification::id_for(&format!("ev-{i}"), &user(i))).collect();
    let matching: i64 = sqlx::query_scalar("SELECT count(*) FROM notifications WHERE id = ANY($1)")
        .bind(&expected)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        (total, distinct, matching),
        (TOTAL as i64, TOTAL as i64, TOTAL as i64),
        "(rows, distinct ids, expected ids)"
    );

    // The offsets stored with the rows cover every acknowledged record of every partition.
    let stored: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, next_offset FROM sink_offsets WHERE topic = $1 ORDER BY partition")
            .bind(&topic)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored.iter().map(|(_, o)| o).sum::<i64>(), TOTAL as i64, "stored next offsets {stored:?}");
    let ends: Vec<(i32, i64)> = acked.iter().map(|(p, (_, end))| (*p, *end)).collect();
    assert_eq!(stored, ends, "stored next offsets vs the end of what the broker acknowledged");
    let marks = common::high_watermarks(&brokers, &topic).await;
    let stored_next: Vec<i64> =
        (0..marks.len() as i32).map(|p| stored.iter().find(|(sp, _)| *sp == p).map(|(_, o)| *o).unwrap_or(0)).collect();
    assert_eq!(stored_next, marks, "stored next offsets vs the broker's high watermarks");

    assert!(kills.len() >= MIN_KILLS);
    assert!(gateway.exited().is_none(), "the gateway process died\n{}", gateway.log_tail(40));
}
