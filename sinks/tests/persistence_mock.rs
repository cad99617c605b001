//! The persistence stage against the in-process librdkafka mock cluster and a SQLite store: where
//! it starts, database outages, what it dead-letters. The same flows run against the real Apache
//! Kafka broker and PostgreSQL in `tidings/tests/`.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidings_core::kafka::{H_DELIVERY_ONLY, H_DLQ_OFFSET, H_DLQ_REASON};
use tidings_core::Notification;
use tidings_sinks::persistence;
use tidings_store::Store;
use tidings_store::{Batch, OffsetUpdate};
use tokio_util::sync::CancellationToken;

mod support;
use support::{consumer, encoder, env, notification, persistence_cfg, read};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_starts_from_the_offsets_in_the_store_and_never_duplicates() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let (enc, _) = encoder(&env, "notifications-value").await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let mut partition = 0;
    let mut ids = Vec::new();
    let send = |i: usize| {
        let n = notification(i, "u1", 1_700_000_000_000_000);
        (n.notification_id, enc.encode(n.to_value()).unwrap())
    };
    for i in 0..10 {
        let (id, bytes) = send(i);
        ids.push(id);
        let d = producer
            .send(FutureRecord::to("notifications").key("u1").payload(&bytes), Duration::from_secs(5))
            .await
            .unwrap();
        let (p, o) = (d.partition, d.offset);
        assert_eq!(o, i as i64);
        partition = p;
    }
    // The store says offsets 0..4 of that partition are already stored: the stage must start at 4.
    let group = env.topo.group_name(&env.topo.stages.persistence.group);
    let seed = Batch {
        offsets: vec![OffsetUpdate { topic: "notifications".into(), partition, next_offset: 4 }],
        ..Batch::default()
    };
    env.store.write_batch(&group, &seed).await.unwrap();
    let cfg = persistence_cfg(&env, &group, 3, Duration::from_millis(50));
    let run = |token: CancellationToken| tokio::spawn(persistence::run(cfg.clone(), env.store.clone(), token));
    let wait_for = |n: u64| {
        let store = env.store.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let c = store.count_notifications().await.unwrap();
                if c == n {
                    return;
                }
                assert!(c < n && Instant::now() < deadline, "expected {n} stored notifications, have {c}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let t1 = CancellationToken::new();
    let stage = run(t1.clone());
    wait_for(6).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.store.count_notifications().await.unwrap(), 6, "offsets 0..4 were skipped as the store said");
    let stored: Vec<uuid::Uuid> =
        env.store.inbox("u1", None, 100).await.unwrap().into_iter().map(|i| i.notification.notification_id).collect();
    for id in &ids[..4] {
        assert!(!stored.contains(id));
    }
    t1.cancel();
    stage.await.unwrap().unwrap();
    assert_eq!(env.store.load_offsets(&group, "notifications").await.unwrap().get(&partition), Some(&10));

    // Restart: nothing is re-stored, and new records continue from offset 10.
    for i in 10..12 {
        let (_, bytes) = send(i);
        producer
            .send(FutureRecord::to("notifications").key("u1").payload(&bytes), Duration::from_secs(5))
            .await
            .unwrap();
    }
    let t2 = CancellationToken::new();
    let stage = run(t2.clone());
    wait_for(8).await;
    t2.cancel();
    stage.await.unwrap().unwrap();
    assert_eq!(env.store.load_offsets(&group, "notifications").await.unwrap().get(&partition), Some(&12));
    env.token.cancel();
    drop(mock);
}

/// A TCP proxy in front of PostgreSQL that can be cut (every connection dropped, new ones
/// refused) and restored, to play a database outage without touching the shared server.
struct PgProxy {
    addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl PgProxy {
    async fn start(target: &str) -> PgProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (up2, cut2, target) = (up.clone(), cut.clone(), target.to_string());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let mut cut_rx = cut2.subscribe();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        PgProxy { addr, up, cut }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, std::sync::atomic::Ordering::SeqCst);
        if !up {
            self.cut.send_modify(|n| *n += 1);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_waits_out_a_database_outage_without_losing_or_duplicating() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let (_, pg_url) = tidings_store::testing::fresh_postgres().await.unwrap();
    let proxy = PgProxy::start("127.0.0.1:5432").await;
    let db = pg_url.rsplit('/').next().unwrap();
    let proxied = Store::connect(&format!("postgres://postgres@{}/{db}", proxy.addr)).await.unwrap();
    let direct = Store::connect(&pg_url).await.unwrap();
    let (enc, _) = encoder(&env, "notifications-value").await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let produce = |range: std::ops::Range<usize>| {
        let mut recs = Vec::new();
        for i in range {
            let user = format!("u{}", i % 7);
            let n = notification(i, &user, 1_700_000_000_000_000);
            recs.push((user, enc.encode(n.to_value()).unwrap()));
        }
        recs
    };
    let send_all = |recs: Vec<(String, Vec<u8>)>| {
        let producer = producer.clone();
        async move {
            for (user, bytes) in recs {
                producer
                    .send(FutureRecord::to("notifications").key(&user).payload(&bytes), Duration::from_secs(5))
                    .await
                    .unwrap();
            }
        }
    };
    let cfg = persistence_cfg(&env, "outage-test", 50, Duration::from_millis(50));
    let token = CancellationToken::new();
    let stage = tokio::spawn(persistence::run(cfg, proxied, token.clone()));
    send_all(produce(0..100)).await;
    let wait_for = |n: u64, secs: u64| {
        let direct = direct.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            loop {
                let c = direct.count_notifications().await.unwrap();
                if c == n {
                    return;
                }
                assert!(c < n && Instant::now() < deadline, "expected {n} stored notifications, have {c}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(100, 30).await;

    // Outage: the next 200 records cannot be stored; nothing may be lost or stored twice.
    proxy.set_up(false);
    send_all(produce(100..300)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(direct.count_notifications().await.unwrap(), 100, "nothing is stored while the database is down");
    assert!(!stage.is_finished(), "the stage waits for the database instead of failing");
    proxy.set_up(true);
    wait_for(300, 60).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(direct.count_notifications().await.unwrap(), 300);
    let next: i64 = direct.load_offsets("outage-test", "notifications").await.unwrap().values().sum();
    assert_eq!(next, 300, "stored offsets cover every record exactly");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    env.token.cancel();
    drop(mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_dead_letters_what_it_cannot_store_and_keeps_going() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let (enc, _) = encoder(&env, "notifications-value").await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let copy = Notification { inbox: false, ..notification(3, "u1", 1_700_000_000_000_002) };
    // (payload, marked delivery-only by templating, dead-letter reason)
    let inputs: Vec<(Vec<u8>, bool, Option<&str>)> = vec![
        (enc.encode(notification(0, "u1", 1_700_000_000_000_000).to_value()).unwrap(), false, None),
        (b"not avro at all".to_vec(), false, Some("wrong-magic-byte")),
        (enc.encode(notification(1, "u1", i64::MIN).to_value()).unwrap(), false, Some("timestamp-out-of-range")),
        // Delivery-only copies are neither stored nor dead-lettered: marked ones pass undecoded,
        // unmarked ones are decoded and passed by.
        (b"marked: not even decoded".to_vec(), true, None),
        (enc.encode(copy.to_value()).unwrap(), false, None),
        (enc.encode(notification(2, "u1", 1_700_000_000_000_001).to_value()).unwrap(), false, None),
    ];
    let mut expected = Vec::new();
    for (bytes, marked, reason) in &inputs {
        let mut rec = FutureRecord::to("notifications").key("u1").payload(bytes);
        if *marked {
            rec = rec.headers(OwnedHeaders::new().insert(Header { key: H_DELIVERY_ONLY, value: Some("true") }));
        }
        let d = producer.send(rec, Duration::from_secs(5)).await.unwrap();
        if let Some(r) = reason {
            expected.push((r.to_string(), d.offset));
        }
    }
    let token = CancellationToken::new();
    let cfg = persistence_cfg(&env, "dlq-test", 100, Duration::from_millis(50));
    let stage = tokio::spawn(persistence::run(cfg, env.store.clone(), token.clone()));
    let dead = read(&consumer(&env, "tidings.dlq.persistence"), expected.len()).await;
    for ((reason, offset), (_, _, headers, _, _)) in expected.iter().zip(&dead) {
        let h = |k: &str| headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.clone());
        assert_eq!(h(H_DLQ_REASON).as_deref(), Some(reason.as_str()), "{headers:?}");
        assert_eq!(h(H_DLQ_OFFSET), Some(offset.to_string()));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.store.count_notifications().await.unwrap() < 2 {
        assert!(Instant::now() < deadline, "the valid notifications around the bad ones were not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.store.count_notifications().await.unwrap(), 2);
    let next: i64 = env.store.load_offsets("dlq-test", "notifications").await.unwrap().values().sum();
    assert_eq!(next, 6, "the dead-lettered and passed-by records' offsets advance with the batch");
    // Offsets are stored only after the dead letters are acknowledged: exactly the two bad ones
    // are there, not the marked copy.
    let (_, dead_high) = consumer(&env, "tidings.dlq.persistence")
        .fetch_watermarks("tidings.dlq.persistence", 0, Duration::from_secs(5))
        .unwrap();
    assert_eq!(dead_high, expected.len() as i64, "a marked delivery-only copy was dead-lettered");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    env.token.cancel();
    drop(mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_during_a_registry_outage_dead_letters_nothing_and_stores_no_offset() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let (enc, _) = encoder(&env, "notifications-value").await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    for i in 0..3 {
        let bytes = enc.encode(notification(i, "u-outage", 1_700_000_000_000_000).to_value()).unwrap();
        producer
            .send(FutureRecord::to("notifications").key("u-outage").payload(&bytes), Duration::from_secs(5))
            .await
            .unwrap();
    }
    // The registry is down for this run: its address takes connections and drops them, counting
    // them, so the test knows when the stage is in its retry loop.
    let down = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_registry = format!("http://{}", down.local_addr().unwrap());
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attempts.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = down.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(sock);
        }
    });
    let group = "outage-group";
    let mut cfg = persistence_cfg(&env, group, 100, Duration::from_millis(50));
    cfg.registry = dead_registry.as_str().into();
    let stop = CancellationToken::new();
    let stage = tokio::spawn(persistence::run(cfg, env.store.clone(), stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while attempts.load(std::sync::atomic::Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "the stage never asked the registry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), stage)
        .await
        .expect("the stage slept through shutdown while retrying")
        .unwrap()
        .unwrap();
    eprintln!("stopped {:?} after shutdown was asked", asked.elapsed());

    // Nothing was dead-lettered and no offset advanced: the records are good, only unread.
    let probe: StreamConsumer = env.kafka.consumer("probe").create().unwrap();
    let (_, dlq_high) = probe.fetch_watermarks("tidings.dlq.persistence", 0, Duration::from_secs(5)).unwrap();
    assert_eq!(dlq_high, 0, "good records were dead-lettered because the stage stopped during an outage");
    assert!(
        env.store.load_offsets(group, "notifications").await.unwrap().values().all(|o| *o == 0),
        "an offset advanced past records that were never stored"
    );

    // With the registry back, the next start stores all three.
    let stop = CancellationToken::new();
    let stage = tokio::spawn(persistence::run(
        persistence_cfg(&env, group, 100, Duration::from_millis(50)),
        env.store.clone(),
        stop.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.store.count_notifications().await.unwrap() < 3 {
        assert!(Instant::now() < deadline, "the records were not stored after the registry came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    env.token.cancel();
    drop(mock);
}
