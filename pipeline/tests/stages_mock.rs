//! The templating stage against the in-process librdkafka mock cluster and a SQLite store: fast
//! checks of dead-lettering and fan-out (persistence's are in `sinks/tests/`). The same flows run
//! against the real Apache Kafka broker and PostgreSQL in `tidings/tests/`.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::{KafkaConfig, H_DELIVERY_ONLY, H_DLQ_OFFSET, H_DLQ_REASON};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::{Notification, RegistryClient};
use tidings_pipeline::stages::templating;
use tokio_util::sync::CancellationToken;

mod common;
use common::{consumer, encoder, env_mock as env, order, read, spawn_templating, Env};

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

/// Group room `r1` ("Tea") of alice and bob, in the store.
async fn create_tea_room(env: &Env) {
    let members = ["alice".to_string(), "bob".to_string()];
    let room = tidings_store::chat::NewRoom {
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
}

/// A room's cached members are forgotten when its partition is revoked and assigned again: while
/// another instance owned the partition a member left (the store says so, the event passed
/// there), and that member no longer receives the room's messages here. Before, they did until
/// this instance itself saw a membership event of the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_moves_away_and_back_forgets_its_rooms_members() {
    use rdkafka::consumer::{BaseConsumer, ConsumerContext};
    use rdkafka::types::RDKafkaRespErr;
    use templating::rooms::TemplatingContext;
    use templating::{Outcome, RecordRef, Templater};

    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    create_tea_room(&env).await;
    let templater = Templater::new(env.topo.clone(), &env.registry_url, env.store.clone()).await.unwrap();
    // The stage's consumer context, as the stage builds it; its rebalance callback is called directly.
    let context = templating::rooms::context("test", templater.rooms());
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
                Outcome::Dead { reason, error } | Outcome::CampaignFailed { reason, error, .. } => {
                    panic!("{reason}: {error}")
                }
            }
        }
    };
    assert_eq!(recipients(0).await, ["alice", "bob"]);
    assert!(env.store.leave_room("r1", "bob").await.unwrap());
    assert_eq!(recipients(1).await, ["alice", "bob"], "cached: no membership event of the room passed here");
    let mut moved = rdkafka::TopicPartitionList::new();
    moved.add_partition("chat", 3);
    consumer.context().rebalance(&consumer, RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS, &mut moved);
    consumer.context().rebalance(&consumer, RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS, &mut moved);
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
    create_tea_room(&env).await;
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

/// A segment replaced in the middle of a campaign's fan-out: every page after the first still
/// comes from the version the first page was read from, so the audience is all old, never a mix;
/// a version deleted mid fan-out is a dead letter, not a fan-out that ends early as if complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_replaced_during_a_fan_out_does_not_change_its_audience() {
    use templating::{Outcome, RecordRef, Templater};
    use tidings_store::segments::SegmentChange;

    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let size = 2 * templating::SEGMENT_PAGE as usize + 1;
    let old: Vec<String> = (0..size).map(|i| format!("old-{i:05}")).collect();
    let new: Vec<String> = (0..size).map(|i| format!("new-{i:05}")).collect();
    let replace = |users: Vec<String>, keep: Duration| {
        let store = env.store.clone();
        async move {
            let mut load = store.begin_segment_load("everyone").await.unwrap();
            load.add(&users).await.unwrap();
            load.finish(SegmentChange::Replace, keep).await.unwrap();
        }
    };
    replace(old.clone(), Duration::from_secs(3600)).await;
    let templater = Templater::new(env.topo.clone(), &env.registry_url, env.store.clone()).await.unwrap();
    let (enc, schema) = encoder(&env, "coupons-value").await;
    let ev = json!({"event_id": "camp-swap", "occurred_at": 1, "coupon_id": "camp-swap", "payload": {"CampaignLaunched": {
        "campaign_id": "camp-swap", "title": "Sale", "discount_percent": 30, "audience": {"SegmentAudience": {"segment": "everyone"}}}}});
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    let shutdown = CancellationToken::new();
    let first =
        || templater.outcome(RecordRef { topic: "coupons", partition: 0, offset: 0, payload: Some(&bytes) }, &shutdown);

    let Outcome::Notifications(mut fanout) = first().await.unwrap() else { panic!("dead letter") };
    let mut audience = std::mem::take(&mut fanout.recipients);
    replace(new.clone(), Duration::from_secs(3600)).await;
    while let Some(outcome) = templater.next_page(&mut fanout, &shutdown).await.unwrap() {
        let Outcome::Notifications(page) = outcome else { panic!("dead letter") };
        audience.extend(page.recipients.iter().cloned());
        fanout = page;
    }
    let from_old = audience.iter().filter(|u| u.starts_with("old-")).count();
    assert!(audience == old, "{from_old} of {} recipients from the version of the first page", audience.len());

    // A new fan-out reads the new version; once the old versions are gone (kept for nothing here),
    // the next page says so.
    let Outcome::Notifications(mut fanout) = first().await.unwrap() else { panic!("dead letter") };
    assert_eq!(fanout.recipients[0], new[0]);
    replace(old.clone(), Duration::ZERO).await;
    match templater.next_page(&mut fanout, &shutdown).await.unwrap() {
        Some(Outcome::Dead { reason, .. }) => assert_eq!(reason, "segment-version-gone"),
        other => panic!("expected a dead letter, got {other:?}"),
    }
    env.token.cancel();
    drop(mock);
}

/// Preferences before producing: a segment campaign (several pages, grouped by partition) skips the
/// members who opted out of `campaigns`, wherever they are in the audience, and the pages still
/// cover everyone else once; a notification of a critical category (`delivery`) reaches a user even
/// with an opt-out row for it (a category made critical after the user opted out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opted_out_members_get_no_campaign_and_critical_notifications_still_go() {
    use tidings_store::preferences::Preferences;
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let page = templating::SEGMENT_PAGE as usize;
    let members = 2 * page + 1;
    let users: Vec<String> = (0..members).map(|i| format!("m-{i:05}")).collect();
    env.store.add_segment_members("everyone", &users).await.unwrap();
    // Opted out: on the first page, on the last member of a full page, and the very last member.
    let out = [&users[7], &users[page - 1], &users[page + 3], &users[members - 1]];
    for u in out {
        let prefs = Preferences { opt_out: vec!["campaigns".into(), "delivery".into()], ..Preferences::default() };
        env.store.set_preferences(u, &prefs, 1).await.unwrap();
    }
    // Another category's opt-out does not matter to a campaign.
    let coupons_only = Preferences { opt_out: vec!["coupons".into()], ..Preferences::default() };
    env.store.set_preferences(&users[8], &coupons_only, 1).await.unwrap();
    let stage = spawn_templating(&env);
    let (enc, schema) = encoder(&env, "coupons-value").await;
    let ev = json!({"event_id": "camp-pref", "occurred_at": 1, "coupon_id": "camp-pref", "payload": {"CampaignLaunched": {
        "campaign_id": "camp-pref", "title": "Sale", "discount_percent": 30, "audience": {"SegmentAudience": {"segment": "everyone"}}}}});
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    producer.send(FutureRecord::to("coupons").key("camp-pref").payload(&bytes), Duration::from_secs(5)).await.unwrap();
    // Then an order shipped (critical `delivery`) to an opted-out member: it follows the campaign.
    let (enc, schema) = encoder(&env, "orders-value").await;
    let bytes = enc.encode(json_to_avro(schema, &order("ship-1", out[0])).unwrap()).unwrap();
    producer.send(FutureRecord::to("orders").key("o-ship-1").payload(&bytes), Duration::from_secs(5)).await.unwrap();

    let c = consumer(&env, "notifications");
    let wanted = members - out.len() + 1;
    let (received, _) = tokio::time::timeout(Duration::from_secs(60), read_recipients(&env, &c, wanted))
        .await
        .expect("every notification but the opted-out members' arrives");
    let mut campaign: Vec<String> = received
        .iter()
        .filter(|r| r.notification.kind == "coupon.campaign")
        .map(|r| {
            assert_eq!(r.notification.category, "campaigns");
            r.notification.user_id.clone()
        })
        .collect();
    campaign.sort();
    let want: Vec<String> = users.iter().filter(|u| !out.contains(u)).cloned().collect();
    let leaked: Vec<&String> = campaign.iter().filter(|u| out.contains(u)).collect();
    assert!(leaked.is_empty(), "opted out, yet notified: {leaked:?}");
    assert!(campaign == want, "every member but the opted-out ones, once ({} of {})", campaign.len(), want.len());
    let shipped: Vec<&Notification> =
        received.iter().map(|r| &r.notification).filter(|n| n.kind == "order.shipped").collect();
    assert_eq!(shipped.len(), 1, "the critical notification is produced");
    assert_eq!((shipped[0].user_id.as_str(), shipped[0].category.as_str()), (out[0].as_str(), "delivery"));
    env.token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
    drop(c);
    drop(mock);
}
