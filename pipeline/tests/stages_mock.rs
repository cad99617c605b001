//! Both stages against the in-process librdkafka mock cluster and a SQLite store: fast checks of
//! dead-lettering, fan-out and where the persistence stage starts. The same flows run against the
//! real Apache Kafka broker and PostgreSQL in `tidings/tests/`.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::{KafkaConfig, H_DELIVERY_ONLY, H_DLQ_OFFSET, H_DLQ_REASON};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::{Notification, RegistryClient};
use tidings_pipeline::stages::templating;
use tidings_pipeline::topology::apply::apply_mock;
use tidings_sinks::persistence::{self, PersistenceConfig};
use tidings_sinks::store::{Batch, OffsetUpdate};
use tidings_sinks::Store;
use tokio_util::sync::CancellationToken;

mod common;
use common::{consumer, encoder, order, read, spawn_templating, Env};

async fn env(mock: &MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> Env {
    let topo = common::project_topology();
    apply_mock(&topo, mock).unwrap();
    common::env_on(KafkaConfig::new(mock.bootstrap_servers()), topo).await
}

/// One recipient's notification as found on the notifications topic.
#[derive(Debug)]
struct Received {
    notification: Notification,
    /// The record carried several recipients (a group record, produced without a key).
    grouped: bool,
    delivery_only: bool,
}

/// Reads records until they hold `n` recipients' notifications (a group record holds several),
/// checking each is on its user's partition, a group record has no key and any other is keyed
/// by its user. Returns them and how many records carried them.
async fn read_recipients(env: &Env, c: &StreamConsumer, n: usize) -> (Vec<Received>, usize) {
    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let partitions = env.topo.topics["notifications"].partitions;
    let (mut out, mut records) = (Vec::new(), 0);
    while out.len() < n {
        let (key, value, headers, partition, _) = read(c, 1).await.remove(0);
        records += 1;
        let record =
            Notification::from_value(registry.decode(&value.unwrap(), &NOTIFICATION_SCHEMA).await.unwrap()).unwrap();
        let grouped = !record.recipients.is_empty();
        if grouped {
            assert_eq!(key, None, "a group record has no key");
            assert_eq!(record.user_id, "");
        } else {
            assert_eq!(key.as_deref(), Some(record.user_id.as_bytes()), "notifications are keyed by user");
        }
        let delivery_only = headers.iter().any(|(k, v)| k == H_DELIVERY_ONLY && v == "true");
        record.for_each_recipient(|n| {
            assert_eq!(tidings_core::kafka::partition_for(&n.user_id, partitions), partition, "{}", n.user_id);
            assert_eq!(n.notification_id, Notification::id_for(&n.source_event_id, &n.user_id));
            out.push(Received { notification: n.clone(), grouped, delivery_only });
        });
    }
    (out, records)
}

/// Notification number `i` for `user`, as the templating stage would emit it.
fn notification(i: usize, user: &str, occurred_at: i64) -> Notification {
    Notification {
        notification_id: Notification::id_for(&format!("ev-{i}"), user),
        user_id: user.into(),
        kind: "k".into(),
        title: format!("t{i}"),
        body: "b".into(),
        link: None,
        source_event_id: format!("ev-{i}"),
        occurred_at,
        source_topic: "orders".into(),
        source_partition: 0,
        source_offset: i as i64,
        data: None,
        inbox: true,
        recipients: vec![],
    }
}

/// Persistence settings for the `notifications` topic of `env` under consumer group `group`.
fn persistence_cfg(env: &Env, group: &str, batch_size: usize) -> PersistenceConfig {
    PersistenceConfig {
        kafka: env.kafka.clone(),
        registry: env.registry_url.clone().into(),
        group: group.into(),
        notifications_topic: "notifications".into(),
        chat_topic: None,
        chat_schema: None,
        dead_letter: "tidings.dlq.persistence".into(),
        batch_size,
        linger: Duration::from_millis(50),
        health: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templating_renders_dead_letters_and_keeps_going() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let stage = spawn_templating(&env);
    let (enc, schema) = encoder(&env, "orders-value").await;
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let valid = |id: &str, buyer: &str| enc.encode(json_to_avro(schema, &order(id, buyer)).unwrap()).unwrap();
    let mut unknown_id = valid("x", "u9");
    unknown_id[1..5].copy_from_slice(&999_999u32.to_be_bytes());
    let mut truncated = valid("y", "u9");
    truncated.truncate(12);
    // Cut inside the last field, a string: apache-avro alone would read it as null.
    let cancelled = json!({"event_id": "z", "occurred_at": 1, "order_id": "o-z", "buyer_id": "u9",
        "payload": {"OrderCancelled": {"reason": "changed my mind"}}});
    let mut cut_string = enc.encode(json_to_avro(schema, &cancelled).unwrap()).unwrap();
    cut_string.truncate(cut_string.len() - 3);
    let inputs: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        ("valid", valid("e1", "u1"), None),
        ("garbage", b"hello, world".to_vec(), Some("wrong-magic-byte")),
        ("short", vec![0, 0], Some("too-short")),
        ("unknown id", unknown_id, Some("unknown-schema-id")),
        ("truncated", truncated, Some("malformed-avro")),
        ("truncated trailing string", cut_string, Some("malformed-avro")),
        ("empty buyer", valid("e2", ""), Some("missing-recipient")),
        ("valid after", valid("e3", "u3"), None),
    ];
    let mut expected_dead = Vec::new();
    for (what, bytes, reason) in &inputs {
        let offset = producer
            .send(FutureRecord::to("orders").key("k").payload(bytes), Duration::from_secs(5))
            .await
            .unwrap()
            .offset;
        if let Some(r) = reason {
            expected_dead.push((what.to_string(), r.to_string(), offset));
        }
    }
    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let out = read(&consumer(&env, "notifications"), 2).await;
    let mut users = Vec::new();
    for (key, value, _, _, _) in &out {
        let n = Notification::from_value(registry.decode(value.as_ref().unwrap(), &NOTIFICATION_SCHEMA).await.unwrap())
            .unwrap();
        assert_eq!(key.as_deref(), Some(n.user_id.as_bytes()), "notifications are keyed by user");
        assert_eq!(n.notification_id, Notification::id_for(&n.source_event_id, &n.user_id));
        assert_eq!(n.kind, "order.shipped");
        users.push(n.user_id);
    }
    users.sort();
    assert_eq!(users, ["u1", "u3"]);
    let dead = read(&consumer(&env, "tidings.dlq.templating"), expected_dead.len()).await;
    for ((what, reason, offset), (key, _, headers, _, _)) in expected_dead.iter().zip(&dead) {
        let h = |k: &str| headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.clone());
        assert_eq!(h(H_DLQ_REASON).as_deref(), Some(reason.as_str()), "{what}: {headers:?}");
        assert_eq!(h(H_DLQ_OFFSET), Some(offset.to_string()), "{what}");
        assert_eq!(key.as_deref(), Some(&b"k"[..]), "{what}: original key kept");
    }
    env.token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    drop(mock);
}

/// An output larger than the producer's `message.max.bytes` is refused before it leaves: its
/// event is a dead letter (here without its payload, itself too large for that limit) and the
/// partition goes on, without a restart. Before, the refusal restarted the stage on it forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_the_producer_refuses_as_too_large_is_a_dead_letter() {
    let mock = MockCluster::new(1).unwrap();
    let mut env = env(&mock).await;
    let limit = 64 * 1024;
    env.kafka.tuned.push(("message.max.bytes".into(), limit.to_string()));
    let health = tidings_core::shutdown::StageHealth::default();
    let stage = common::spawn_templating_with(&env, health.clone());
    let (enc, schema) = encoder(&env, "orders-value").await;
    // Without the limit: the events fit their topic.
    let producer: FutureProducer = KafkaConfig::new(mock.bootstrap_servers()).producer().create().unwrap();
    let mut huge = order("huge", "u1");
    huge["order_id"] = "X".repeat(100_000).into();
    let mut offsets = Vec::new();
    for ev in [order("e1", "u1"), huge, order("e2", "u2")] {
        let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
        let rec = FutureRecord::to("orders").partition(0).key("k").payload(&bytes);
        offsets.push(producer.send(rec, Duration::from_secs(5)).await.unwrap().offset);
    }
    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let mut sources = Vec::new();
    for (_, value, _, _, _) in read(&consumer(&env, "notifications"), 2).await {
        let v = registry.decode(&value.unwrap(), &NOTIFICATION_SCHEMA).await.unwrap();
        sources.push(Notification::from_value(v).unwrap().source_event_id);
    }
    assert_eq!(sources, ["e1", "e2"]);
    let (key, payload, headers, _, _) = read(&consumer(&env, "tidings.dlq.templating"), 1).await.remove(0);
    let h = |k: &str| headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.clone());
    assert_eq!(h(H_DLQ_REASON).as_deref(), Some("output-too-large"), "{headers:?}");
    assert_eq!(h(H_DLQ_OFFSET), Some(offsets[1].to_string()));
    assert_eq!((key.as_deref(), payload), (Some(&b"k"[..]), None), "the key and coordinates, not the payload");
    assert!(health.is_up() && !stage.is_finished(), "the stage went on without a restart");
    env.token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    drop(mock);
}

/// A room's cached members are forgotten when its partition is revoked and assigned again: while
/// another instance owned the partition a member left (the store says so, the event passed
/// there), and that member no longer receives the room's messages here. Before, they did until
/// this instance itself saw a membership event of the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_moves_away_and_back_forgets_its_rooms_members() {
    use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
    use templating::rooms::TemplatingContext;
    use templating::{Outcome, RecordRef, Templater};

    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let members = ["alice".to_string(), "bob".to_string()];
    let room = tidings_sinks::store::chat::NewRoom {
        room_id: "r1",
        kind: "group",
        name: "Tea",
        creator_id: "alice",
        product_id: None,
        tags: &[],
        members: &members,
        created_at: 1,
    };
    assert!(env.store.create_room(&room).await.unwrap());
    let templater = Templater::new(env.topo.clone(), &env.registry_url, env.store.clone()).await.unwrap();
    // The stage's consumer context, as the stage builds it; its rebalance hook is called directly.
    let context = TemplatingContext::new(tidings_core::client_stats::ClientStats::new("test"), templater.rooms());
    let consumer: BaseConsumer<TemplatingContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("group.id", "g")
        .create_with_context(context)
        .unwrap();
    let (chat, schema) = encoder(&env, "chat-value").await;
    let shutdown = CancellationToken::new();
    let recipients = |offset: i64| {
        let sent = json!({"event_id": format!("c{offset}"), "occurred_at": 1, "room_id": "r1",
            "payload": {"MessageSent": {"message_id": format!("m{offset}"), "sender_id": "alice", "text": "hi"}}});
        let bytes = chat.encode(json_to_avro(schema, &sent).unwrap()).unwrap();
        let (templater, shutdown) = (&templater, &shutdown);
        async move {
            let rec = RecordRef { topic: "chat", partition: 3, offset, payload: Some(&bytes) };
            match templater.outcome(rec, shutdown).await.unwrap() {
                Outcome::Notifications(f) => {
                    let mut users = f.recipients;
                    users.sort();
                    users
                }
                Outcome::Dead { reason, error } => panic!("{reason}: {error}"),
            }
        }
    };
    assert_eq!(recipients(0).await, ["alice", "bob"]);
    assert!(env.store.leave_room("r1", "bob").await.unwrap());
    assert_eq!(recipients(1).await, ["alice", "bob"], "cached: no membership event of the room passed here");
    let mut moved = rdkafka::TopicPartitionList::new();
    moved.add_partition("chat", 3);
    consumer.context().post_rebalance(&consumer, &Rebalance::Revoke(&moved));
    consumer.context().post_rebalance(&consumer, &Rebalance::Assign(&moved));
    assert_eq!(recipients(2).await, ["alice"], "the member who left no longer receives");
    drop(consumer);
    env.token.cancel();
    drop(mock);
}

/// A chat message's copies to the room's members are marked delivery-only (persistence passes
/// them by undecoded); an inbox notification is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_copies_are_marked_delivery_only_and_inbox_rows_are_not() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let members = ["alice".to_string(), "bob".to_string()];
    let room = tidings_sinks::store::chat::NewRoom {
        room_id: "r1",
        kind: "group",
        name: "Tea",
        creator_id: "alice",
        product_id: None,
        tags: &[],
        members: &members,
        created_at: 1,
    };
    assert!(env.store.create_room(&room).await.unwrap());
    let stage = spawn_templating(&env);
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let (chat, chat_schema) = encoder(&env, "chat-value").await;
    let sent = json!({"event_id": "c1", "occurred_at": 1_700_000_000_000_000i64, "room_id": "r1",
        "payload": {"MessageSent": {"message_id": "m1", "sender_id": "alice", "text": "hi"}}});
    let bytes = chat.encode(json_to_avro(chat_schema, &sent).unwrap()).unwrap();
    producer.send(FutureRecord::to("chat").key("r1").payload(&bytes), Duration::from_secs(5)).await.unwrap();
    let (orders, order_schema) = encoder(&env, "orders-value").await;
    let bytes = orders.encode(json_to_avro(order_schema, &order("e1", "carol")).unwrap()).unwrap();
    producer.send(FutureRecord::to("orders").key("o-e1").payload(&bytes), Duration::from_secs(5)).await.unwrap();

    let (received, _) = read_recipients(&env, &consumer(&env, "notifications"), 3).await;
    let mut marked: Vec<(String, bool)> =
        received.into_iter().map(|r| (r.notification.user_id, r.delivery_only)).collect();
    marked.sort();
    assert_eq!(marked, [("alice".into(), true), ("bob".into(), true), ("carol".into(), false)]);
    env.token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    drop(mock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_fans_out_to_every_inline_user() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let stage = spawn_templating(&env);
    let (enc, schema) = encoder(&env, "coupons-value").await;
    let users: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    let ev = json!({"event_id": "camp-1", "occurred_at": 1, "coupon_id": "camp-1", "payload": {"CampaignLaunched": {
        "campaign_id": "camp-1", "title": "Sale", "discount_percent": 30, "audience": {"InlineAudience": {"user_ids": users}}}}});
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    producer.send(FutureRecord::to("coupons").key("camp-1").payload(&bytes), Duration::from_secs(5)).await.unwrap();
    let (received, records) = read_recipients(&env, &consumer(&env, "notifications"), 2000).await;
    let mut keys: Vec<String> = received.iter().map(|r| r.notification.user_id.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 2000, "one notification per audience member");
    // 2,000 users on 12 partitions: every partition has several, so one group record each.
    assert_eq!(records, 12, "one group record per partition, not one record per user");
    assert!(received.iter().all(|r| r.grouped && r.notification.title == received[0].notification.title));
    env.token.cancel();
    // Clients must be gone before the mock cluster is destroyed.
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    drop(mock);
}

/// A segment audience larger than a page is read and produced page by page (never whole), every
/// member gets exactly one notification, and the event's offset is committed once all are acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_campaign_is_produced_page_by_page_to_every_member() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let members = 2 * templating::SEGMENT_PAGE as usize + 1;
    let users: Vec<String> = (0..members).map(|i| format!("m-{i:05}")).collect();
    env.store.add_segment_members("everyone", &users).await.unwrap();
    let stage = spawn_templating(&env);
    let (enc, schema) = encoder(&env, "coupons-value").await;
    let ev = json!({"event_id": "camp-seg", "occurred_at": 1, "coupon_id": "camp-seg", "payload": {"CampaignLaunched": {
        "campaign_id": "camp-seg", "title": "Sale", "discount_percent": 30, "audience": {"SegmentAudience": {"segment": "everyone"}}}}});
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    let rdkafka::producer::future_producer::Delivery { partition, offset, .. } = producer
        .send(FutureRecord::to("coupons").key("camp-seg").payload(&bytes), Duration::from_secs(5))
        .await
        .unwrap();
    let (received, records) = read_recipients(&env, &consumer(&env, "notifications"), members).await;
    let mut keys: Vec<String> = received.iter().map(|r| r.notification.user_id.clone()).collect();
    keys.sort();
    assert_eq!(keys, users, "one notification per segment member, none twice");
    // Two full pages of a group record per partition, then the last member's own record.
    assert_eq!(records, 2 * 12 + 1, "pages are grouped by partition");
    env.token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    let group: StreamConsumer =
        env.kafka.consumer(&env.topo.group_name(&env.topo.stages.templating.group)).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition("coupons", partition);
    let committed = group.committed_offsets(tpl, Duration::from_secs(5)).unwrap();
    let at = committed.find_partition("coupons", partition).unwrap().offset();
    assert_eq!(at, rdkafka::Offset::Offset(offset + 1), "the campaign's offset is committed after its last page");
    drop(group);
    drop(mock);
}

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
    let cfg = persistence_cfg(&env, &group, 3);
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
    let (_, pg_url) = tidings_sinks::testing::fresh_postgres().await.unwrap();
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
    let cfg = persistence_cfg(&env, "outage-test", 50);
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
    let cfg = persistence_cfg(&env, "dlq-test", 100);
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
    let mut cfg = persistence_cfg(&env, group, 100);
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
    let stage = tokio::spawn(persistence::run(persistence_cfg(&env, group, 100), env.store.clone(), stop.clone()));
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
