//! Campaigns and quiet hours in the templating stage, against the in-process librdkafka mock
//! cluster and a SQLite store: the audience merged from overlapping segments and inline users,
//! opt-outs, locales, quiet-hours holds on `tidings.scheduled`, `send_at`, cancels and the resume
//! from a checkpoint.

use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::{H_DLQ_REASON, H_TRACEPARENT};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::{Notification, RegistryClient};
use tidings_pipeline::stages::templating::{self, H_RELEASED_AT, H_RELEASE_AT, H_RELEASE_ID, H_RELEASE_TO};
use tidings_store::campaign_progress::CampaignProgress;
use tidings_store::preferences::{Preferences, QuietHours};

mod common;
use common::{consumer, encoder, env_mock as env, read, spawn_templating, Env};

/// 2026-12-07T23:30:00Z: the launch records' timestamp (inside 22:00–08:00 UTC quiet hours).
const NIGHT_MS: i64 = 1_796_686_200_000;
/// 2026-12-08T08:00:00Z: when those quiet hours end.
const MORNING_MICROS: i64 = 1_796_716_800_000_000;

/// Every recipient's notification in the next records of `c` until `n` are read (a group record
/// holds several), each checked to be keyed by its user or a group record without a key.
async fn recipients(env: &Env, c: &StreamConsumer, n: usize) -> Vec<Notification> {
    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let (key, value, _, _, _) = read(c, 1).await.remove(0);
        let record =
            Notification::from_value(registry.decode(&value.unwrap(), &NOTIFICATION_SCHEMA).await.unwrap()).unwrap();
        if record.recipients.is_empty() {
            assert_eq!(key.as_deref(), Some(record.user_id.as_bytes()), "keyed by user");
        } else {
            assert_eq!(key, None, "a group record has no key");
        }
        record.for_each_recipient(|n| out.push(n.clone()));
    }
    out
}

fn launch(id: &str, payload: Value) -> Value {
    let mut p = json!({"category": "campaigns", "title": "Sale {{ campaign_id }}", "body": "Up to 30% off",
        "link": null, "default_locale": "en", "locales": [], "segments": [], "user_ids": [], "send_at": null,
        "launched_by": "ops"});
    for (k, v) in payload.as_object().unwrap() {
        p[k] = v.clone();
    }
    json!({"event_id": format!("campaign:{id}"), "occurred_at": NIGHT_MS * 1000, "campaign_id": id,
        "payload": {"CampaignLaunched": p}})
}

/// Produces campaign event `ev` to `campaigns` at `NIGHT_MS`, with `headers`.
async fn send_campaign(env: &Env, ev: &Value, headers: Option<OwnedHeaders>) {
    let (enc, schema) = encoder(env, "campaigns-value").await;
    let bytes = enc.encode(json_to_avro(schema, ev).unwrap()).unwrap();
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let key = ev["campaign_id"].as_str().unwrap();
    // One partition: campaigns of a test are handled in the order sent.
    let mut rec = FutureRecord::to("campaigns").partition(0).key(key).payload(&bytes).timestamp(NIGHT_MS);
    if let Some(h) = headers {
        rec = rec.headers(h);
    }
    producer.send(rec, Duration::from_secs(5)).await.unwrap();
}

/// An OrderPlaced (category `orders`, not critical) or OrderShipped (`delivery`, critical) of `buyer`, at `NIGHT_MS`.
async fn send_order(env: &Env, event_id: &str, buyer: &str, shipped: bool) {
    let payload = if shipped {
        json!({"OrderShipped": {"carrier": "DHL", "tracking_number": "T1"}})
    } else {
        json!({"OrderPlaced": {"amount_cents": 1250, "currency": "EUR",
            "items": [{"sku": "a", "name": "n", "quantity": 1, "unit_price_cents": 1250}]}})
    };
    let ev = json!({"event_id": event_id, "occurred_at": NIGHT_MS * 1000, "order_id": format!("o-{event_id}"),
        "buyer_id": buyer, "payload": payload});
    let (enc, schema) = encoder(env, "orders-value").await;
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    let producer: FutureProducer = env.kafka.producer().create().unwrap();
    let headers = OwnedHeaders::new().insert(Header { key: H_TRACEPARENT, value: Some("00-abc-def-01") });
    let rec = FutureRecord::to("orders").key("o").payload(&bytes).timestamp(NIGHT_MS).headers(headers);
    producer.send(rec, Duration::from_secs(5)).await.unwrap();
}

async fn stop(env: &Env, stage: tokio::task::JoinHandle<Result<(), tidings_core::StageError>>) {
    env.token.cancel();
    tokio::time::timeout(Duration::from_secs(20), stage).await.unwrap().unwrap().unwrap();
}

fn users(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("u-{i:05}")).collect()
}

/// Two overlapping segments (each more than a page) and inline users, one of them also in a
/// segment: every user of the union gets the campaign once, except the one who opted out; a
/// user whose locale the campaign has gets that text; the checkpoint ends finished with the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_reaches_each_user_of_overlapping_segments_and_inline_ids_once() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let page = templating::SEGMENT_PAGE as usize;
    let a = users(0..page + 1000);
    let b = users(page - 1000..2 * page);
    env.store.add_segment_members("a", &a).await.unwrap();
    env.store.add_segment_members("b", &b).await.unwrap();
    let inline = vec!["u-00001".to_string(), "v-1".into(), "v-2".into(), "v-1".into()];
    let opted_out = "u-04000";
    let prefs = Preferences { opt_out: vec!["campaigns".into()], ..Preferences::default() };
    env.store.set_preferences(opted_out, &prefs, 1).await.unwrap();
    env.store.set_preferences("u-00002", &Preferences::default(), 1).await.unwrap();
    on_sqlite(&env, "UPDATE user_preferences SET locale = 'ko-KR' WHERE user_id = 'u-00002'").await;
    let stage = spawn_templating(&env);
    let ev = launch(
        "c1",
        json!({"segments": ["a", "b"], "user_ids": inline,
            "locales": [{"locale": "ko", "title": "세일 {{ campaign_id }}", "body": "{{ locale }}"}]}),
    );
    send_campaign(&env, &ev, None).await;
    let mut want: Vec<String> = users(0..2 * page);
    want.extend(["v-1".to_string(), "v-2".into()]);
    want.retain(|u| u != opted_out);
    let got = recipients(&env, &consumer(&env, "notifications"), want.len()).await;
    let mut ids: Vec<String> = got.iter().map(|n| n.user_id.clone()).collect();
    ids.sort();
    assert!(ids == want, "every user of the union but the opted-out one, once: {} of {}", ids.len(), want.len());
    let by_user: HashMap<&str, &Notification> = got.iter().map(|n| (n.user_id.as_str(), n)).collect();
    let n = by_user["u-00003"];
    assert_eq!((n.kind.as_str(), n.category.as_str(), n.title.as_str()), ("campaign", "campaigns", "Sale c1"));
    assert_eq!((n.source_event_id.as_str(), n.link.as_deref(), n.inbox), ("campaign:c1", Some("/campaigns/c1"), true));
    assert_eq!(n.source_topic, "campaigns");
    let ko = by_user["u-00002"];
    assert_eq!((ko.title.as_str(), ko.body.as_str()), ("세일 c1", "ko"));
    let progress = wait_finished(&env, "c1").await;
    assert_eq!((progress.produced, progress.held, progress.suppressed), (want.len() as i64, 0, 1));
    assert_eq!(everything(&env, "notifications").await.len(), want.len(), "no one twice");
    assert_eq!(progress.cursor.as_deref(), Some("v-2"));
    stop(&env, stage).await;
    drop(mock);
}

/// Every recipient of every record on `topic` now (its partitions read up to their high
/// watermarks): once the inputs are handled, a duplicate or a stray notification shows here.
async fn everything(env: &Env, topic: &str) -> Vec<Notification> {
    use rdkafka::consumer::Consumer;
    let c = consumer(env, topic);
    let partitions = env.topo.topics[topic].partitions;
    let mut records = 0;
    for p in 0..partitions {
        let (low, high) = c.fetch_watermarks(topic, p, Duration::from_secs(5)).unwrap();
        assert_eq!(low, 0);
        records += high as usize;
    }
    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let mut out = Vec::new();
    for (_, value, _, _, _) in read(&c, records).await {
        let record =
            Notification::from_value(registry.decode(&value.unwrap(), &NOTIFICATION_SCHEMA).await.unwrap()).unwrap();
        record.for_each_recipient(|n| out.push(n.clone()));
    }
    out
}

/// The campaign's progress once its last page is acknowledged (bounded wait).
async fn wait_finished(env: &Env, campaign: &str) -> CampaignProgress {
    for _ in 0..200 {
        if let Some(p) = env.store.campaign_progress(campaign).await.unwrap() {
            if p.finished_at.is_some() {
                return p;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("campaign {campaign} never finished: {:?}", env.store.campaign_progress(campaign).await.unwrap());
}

async fn on_sqlite(env: &Env, sql: &str) {
    let tidings_store::Store::Sqlite(pool) = &env.store else { panic!("the mock tests use SQLite") };
    sqlx::query(sql).execute(pool).await.unwrap();
}

/// Quiet hours 22:00–08:00 UTC and records at 23:30 UTC: the campaign and an ordinary order
/// notification to that user go to `tidings.scheduled` keyed by the user, encoded as they would
/// have been produced, with release-at within the spread after 08:00, release-to the notifications
/// topic and release-id the notification id; a critical order notification and a campaign in a
/// critical category are not held, and another user outside quiet hours gets the campaign now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_inside_quiet_hours_are_held_critical_ones_are_not() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let night = Preferences {
        quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
        ..Preferences::default()
    };
    env.store.set_preferences("night", &night, 1).await.unwrap();
    // Asleep in Seoul too, but 23:30 UTC is 08:30 there: awake.
    let seoul = Preferences { time_zone: "Asia/Seoul".into(), ..night.clone() };
    env.store.set_preferences("seoul", &seoul, 1).await.unwrap();
    let stage = spawn_templating(&env);
    send_campaign(&env, &launch("c2", json!({"user_ids": ["night", "seoul", "day"]})), None).await;
    send_order(&env, "placed-1", "night", false).await;
    send_order(&env, "shipped-1", "night", true).await;
    send_campaign(&env, &launch("c-pay", json!({"user_ids": ["night"], "category": "payment"})), None).await;

    let got = recipients(&env, &consumer(&env, "notifications"), 4).await;
    let mut seen: Vec<(String, String)> = got.iter().map(|n| (n.source_event_id.clone(), n.user_id.clone())).collect();
    seen.sort();
    let want = [("campaign:c-pay", "night"), ("campaign:c2", "day"), ("campaign:c2", "seoul"), ("shipped-1", "night")];
    assert_eq!(seen, want.map(|(e, u)| (e.to_string(), u.to_string())));

    let registry = RegistryClient::new(&env.registry_url).unwrap();
    let held = read(&consumer(&env, "tidings.scheduled"), 2).await;
    let spread = env.topo.stages.scheduler.release_spread_ms as i64 * 1000;
    let mut events = Vec::new();
    for (key, value, headers, _, _) in held {
        let h = |k: &str| headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.clone());
        assert_eq!(key.as_deref(), Some(&b"night"[..]), "keyed by the user");
        let n =
            Notification::from_value(registry.decode(&value.unwrap(), &NOTIFICATION_SCHEMA).await.unwrap()).unwrap();
        assert_eq!(n.user_id, "night");
        assert!(n.recipients.is_empty(), "one user's own record, not a group");
        assert_eq!(h(H_RELEASE_TO).as_deref(), Some("notifications"));
        assert_eq!(h(H_RELEASE_ID), Some(n.notification_id.to_string()));
        assert_eq!(n.notification_id, Notification::id_for(&n.source_event_id, "night"));
        let at: i64 = h(H_RELEASE_AT).unwrap().parse().unwrap();
        assert!(
            (MORNING_MICROS..MORNING_MICROS + spread).contains(&at),
            "released at {at}, after the window, within the spread"
        );
        if n.source_event_id == "placed-1" {
            assert_eq!(h(H_TRACEPARENT).as_deref(), Some("00-abc-def-01"), "other headers are kept");
        }
        events.push(n.source_event_id);
    }
    events.sort();
    assert_eq!(events, ["campaign:c2", "placed-1"]);
    let progress = wait_finished(&env, "c2").await;
    assert_eq!((progress.produced, progress.held, progress.suppressed), (2, 1, 0));
    wait_finished(&env, "c-pay").await;
    let all: Vec<(String, String)> =
        everything(&env, "notifications").await.into_iter().map(|n| (n.source_event_id, n.user_id)).collect();
    assert_eq!(all.len(), 4, "nothing held was produced too: {all:?}");
    stop(&env, stage).await;
    drop(mock);
}

/// A launch whose `send_at` is after its record's time is held whole on `tidings.scheduled`,
/// keyed by campaign, nothing produced; the same record released by the scheduler (header
/// `tidings.released-at`) fans out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_send_at_holds_the_launch_until_the_scheduler_releases_it() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let stage = spawn_templating(&env);
    let send_at = NIGHT_MS * 1000 + 3_600_000_000;
    let ev = launch("c3", json!({"user_ids": ["x", "y"], "send_at": send_at}));
    send_campaign(&env, &ev, None).await;
    let (key, value, headers, _, _) = read(&consumer(&env, "tidings.scheduled"), 1).await.remove(0);
    let h = |k: &str| headers.iter().find(|(hk, _)| hk == k).map(|(_, v)| v.clone());
    assert_eq!(key.as_deref(), Some(&b"c3"[..]));
    assert_eq!(h(H_RELEASE_AT), Some(send_at.to_string()));
    assert_eq!(h(H_RELEASE_TO).as_deref(), Some("campaigns"));
    assert_eq!(h(H_RELEASE_ID).as_deref(), Some("campaign:c3"));
    let (enc, schema) = encoder(&env, "campaigns-value").await;
    assert_eq!(value, Some(enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap()), "the launch's bytes");
    assert_eq!(env.store.campaign_progress("c3").await.unwrap(), None, "not started");

    let released = OwnedHeaders::new().insert(Header { key: H_RELEASED_AT, value: Some(&send_at.to_string()) });
    send_campaign(&env, &ev, Some(released)).await;
    let got = recipients(&env, &consumer(&env, "notifications"), 2).await;
    let mut to: Vec<&str> = got.iter().map(|n| n.user_id.as_str()).collect();
    to.sort();
    assert_eq!(to, ["x", "y"]);
    wait_finished(&env, "c3").await;
    stop(&env, stage).await;
    drop(mock);
}

/// A restart after part of a fan-out (a checkpoint with a cursor and pinned versions) produces
/// only the users after the cursor, still from the pinned version although the segment was
/// replaced since; a finished campaign and a cancelled one produce nothing; a template that does
/// not render is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_fan_out_produces_only_the_rest() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let all = users(0..1000);
    env.store.add_segment_members("seg", &all).await.unwrap();
    let pinned = env.store.segment("seg").await.unwrap().unwrap().version;
    // Replaced since the first page: the resumed fan-out still reads the pinned version.
    let mut load = env.store.begin_segment_load("seg").await.unwrap();
    load.add(&users(5000..6000)).await.unwrap();
    load.finish(tidings_store::segments::SegmentChange::Replace, Duration::from_secs(3600)).await.unwrap();
    let checkpoint = CampaignProgress {
        campaign_id: "c4".into(),
        event_id: "campaign:c4".into(),
        cursor: Some("u-00599".into()),
        segment_versions: format!(r#"{{"seg":{pinned}}}"#),
        produced: 590,
        held: 0,
        suppressed: 10,
        started_at: 1,
        updated_at: 2,
        finished_at: None,
        cancelled_at: None,
        failed_reason: None,
    };
    env.store.checkpoint_campaign(&checkpoint).await.unwrap();
    let done = CampaignProgress { campaign_id: "c-done".into(), finished_at: Some(3), ..checkpoint.clone() };
    env.store.checkpoint_campaign(&done).await.unwrap();
    on_sqlite(
        &env,
        "INSERT INTO campaigns (campaign_id, event_id, category, definition, created_at, launched_by, cancelled_at) \
         VALUES ('c-off', 'campaign:c-off', 'campaigns', '{}', 1, 'ops', 2)",
    )
    .await;
    let stage = spawn_templating(&env);
    send_campaign(&env, &launch("c-done", json!({"segments": ["seg"]})), None).await;
    send_campaign(&env, &launch("c-off", json!({"user_ids": ["x"]})), None).await;
    send_campaign(&env, &launch("c-bad", json!({"user_ids": ["x"], "body": "{{ nope }}"})), None).await;
    send_campaign(&env, &launch("c4", json!({"segments": ["seg"], "user_ids": ["u-00001", "u-00999"]})), None).await;
    // All on one partition, in this order: once c4 is finished, the others were handled.
    let progress = wait_finished(&env, "c4").await;
    let got = everything(&env, "notifications").await;
    let mut to: Vec<String> = got.iter().map(|n| n.user_id.clone()).collect();
    to.sort();
    assert!(to == users(600..1000), "only the users after the cursor: {} from {:?}", to.len(), to.first());
    assert!(got.iter().all(|n| n.source_event_id == "campaign:c4"), "nothing of the finished, cancelled or bad ones");
    assert_eq!((progress.produced, progress.suppressed, progress.started_at), (990, 10, 1));
    let off = wait_finished(&env, "c-off").await;
    assert_eq!(off.produced, 0, "a cancelled campaign is finished with nothing produced");
    let (_, _, headers, _, _) = read(&consumer(&env, "tidings.dlq.templating"), 1).await.remove(0);
    let reason = headers.iter().find(|(k, _)| k == H_DLQ_REASON).map(|(_, v)| v.as_str());
    assert_eq!(reason, Some("template-error"));
    let bad = wait_finished(&env, "c-bad").await;
    assert!(bad.failed_reason.as_deref().is_some_and(|r| r.starts_with("template-error: ")), "{bad:?}");
    assert_eq!(env.store.campaign_progress("c4").await.unwrap().unwrap().failed_reason, None);
    stop(&env, stage).await;
    drop(mock);
}

/// A campaign whose text fails to render on its second page (for one user of it) is dead-lettered
/// there and finished as failed with the reason, keeping the first page's cursor and counts, so
/// its status is `failed`, not `sending` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_dead_lettered_on_a_later_page_is_finished_as_failed() {
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let page = templating::SEGMENT_PAGE as usize;
    env.store.add_segment_members("seg", &users(0..page + 10)).await.unwrap();
    let stage = spawn_templating(&env);
    let body = r#"{% if recipient == "u-05003" %}{{ nope }}{% endif %}Hi {{ recipient }}"#;
    send_campaign(&env, &launch("c8", json!({"segments": ["seg"], "body": body})), None).await;
    let (_, _, headers, _, _) = read(&consumer(&env, "tidings.dlq.templating"), 1).await.remove(0);
    let reason = headers.iter().find(|(k, _)| k == H_DLQ_REASON).map(|(_, v)| v.as_str());
    assert_eq!(reason, Some("template-error"));
    let failed = wait_finished(&env, "c8").await;
    assert!(failed.failed_reason.as_deref().is_some_and(|r| r.starts_with("template-error: ")), "{failed:?}");
    assert_eq!((failed.cursor.as_deref(), failed.produced), (Some("u-04999"), page as i64), "the first page's");
    assert_eq!(everything(&env, "notifications").await.len(), page, "the first page only");
    stop(&env, stage).await;
    drop(mock);
}

/// Building a campaign's pages writes no progress (only the stage's acknowledger does, once a
/// page's outputs are acknowledged), and each page's checkpoint rides on its last output batch:
/// when it is written, every user up to its cursor is in that batch or an earlier one, and no
/// later batch holds one of them. A page here is split by locale and quiet hours into siblings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pages_checkpoint_follows_all_of_its_outputs() {
    use templating::{Outcome, RecordMeta, RecordRef, Templater};
    use tokio_util::sync::CancellationToken;

    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let page = templating::SEGMENT_PAGE as usize;
    let all = users(0..page + 1);
    env.store.add_segment_members("seg", &all).await.unwrap();
    let night = Preferences {
        quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
        ..Preferences::default()
    };
    for u in ["u-00010", "u-04999", "u-05000"] {
        env.store.set_preferences(u, &night, 1).await.unwrap();
    }
    for u in ["u-00020", "u-00021"] {
        env.store.set_preferences(u, &Preferences::default(), 1).await.unwrap();
    }
    on_sqlite(&env, "UPDATE user_preferences SET locale = 'ko' WHERE user_id IN ('u-00020', 'u-00021')").await;
    let templater = Templater::new(env.topo.clone(), &env.registry_url, env.store.clone()).await.unwrap();
    let ev = launch(
        "c5",
        json!({"segments": ["seg"], "locales": [{"locale": "ko", "title": "세일", "body": "{{ recipient }}"}]}),
    );
    let (enc, schema) = encoder(&env, "campaigns-value").await;
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    let shutdown = CancellationToken::new();
    let rec = RecordRef { topic: "campaigns", partition: 0, offset: 0, payload: Some(&bytes) };
    let meta = RecordMeta { timestamp: Some(NIGHT_MS * 1000), released: false };
    let mut next = Some(templater.outcome_at(rec, meta, &shutdown).await.unwrap());
    // Per batch as the stage hands them to its acknowledger: its users (held ones too), its checkpoint.
    let mut batches: Vec<(Vec<String>, Option<CampaignProgress>)> = Vec::new();
    while let Some(outcome) = next {
        let Outcome::Notifications(mut fanout) = outcome else { panic!("dead letter: {outcome:?}") };
        let held = !fanout.hold.is_empty();
        next = templater.next_page(&mut fanout, &shutdown).await.unwrap();
        let users = fanout.recipients.clone();
        assert!(!held || users.iter().all(|u| ["u-00010", "u-04999", "u-05000"].contains(&u.as_str())));
        batches.push((users, fanout.checkpoint.take()));
    }
    assert_eq!(env.store.campaign_progress("c5").await.unwrap(), None, "nothing written before acknowledgements");
    let checkpoints: Vec<(usize, &CampaignProgress)> =
        batches.iter().enumerate().filter_map(|(i, (_, c))| c.as_ref().map(|c| (i, c))).collect();
    assert_eq!(checkpoints.len(), 2, "one per page");
    assert!(batches.len() > 3, "the first page is split by locale and quiet hours: {} batches", batches.len());
    let (first, last) = (checkpoints[0].1, checkpoints[1].1);
    assert_eq!((first.cursor.as_deref(), first.finished_at), (Some("u-04999"), None));
    assert_eq!((first.produced, first.held), (page as i64 - 2, 2));
    assert_eq!(last.cursor.as_deref(), Some("u-05000"));
    assert!(last.finished_at.is_some() && last.held == 3 && last.produced == page as i64 - 2);
    for (i, c) in &checkpoints {
        let cursor = c.cursor.as_deref().unwrap();
        let up_to: usize = batches[..=*i].iter().map(|(u, _)| u.iter().filter(|u| u.as_str() <= cursor).count()).sum();
        let later = batches[i + 1..].iter().flat_map(|(u, _)| u).filter(|u| u.as_str() <= cursor).count();
        assert_eq!((up_to, later), (all.iter().filter(|u| u.as_str() <= cursor).count(), 0), "checkpoint {cursor}");
    }
    assert!(batches.iter().any(|(u, _)| u == &["u-00020".to_string(), "u-00021".to_string()]), "ko users apart");
    env.token.cancel();
    drop(mock);
}

/// A topology without the scheduler's topic holds nothing: a user inside quiet hours gets the
/// campaign at once and a later `send_at` fans out now (the stage warns at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_scheduled_topic_nothing_is_held() {
    use templating::{Outcome, RecordMeta, RecordRef, Templater};
    use tokio_util::sync::CancellationToken;

    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let night = Preferences {
        quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
        ..Preferences::default()
    };
    env.store.set_preferences("night", &night, 1).await.unwrap();
    let mut topo = (*env.topo).clone();
    topo.topics.remove("tidings.scheduled");
    let templater = Templater::new(std::sync::Arc::new(topo), &env.registry_url, env.store.clone()).await.unwrap();
    let ev = launch("c6", json!({"user_ids": ["night"], "send_at": NIGHT_MS * 1000 + 3_600_000_000i64}));
    let (enc, schema) = encoder(&env, "campaigns-value").await;
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    let rec = RecordRef { topic: "campaigns", partition: 0, offset: 0, payload: Some(&bytes) };
    let meta = RecordMeta { timestamp: Some(NIGHT_MS * 1000), released: false };
    let outcome = templater.outcome_at(rec, meta, &CancellationToken::new()).await.unwrap();
    let Outcome::Notifications(fanout) = outcome else { panic!("dead letter: {outcome:?}") };
    assert!(fanout.schedule.is_none() && fanout.hold.is_empty() && fanout.siblings.is_empty());
    assert_eq!(fanout.recipients, ["night"]);
    env.token.cancel();
    drop(mock);
}

/// A campaign page counts each user's outcome: `tidings_campaign_notifications_total{outcome}`,
/// plus the category's `tidings_notifications_suppressed_total` and `tidings_notifications_held_total`.
/// One thread, so the test's own recorder sees every count.
#[tokio::test(flavor = "current_thread")]
async fn a_campaign_page_counts_produced_held_and_suppressed_users() {
    use metrics_exporter_prometheus::PrometheusBuilder;
    use templating::{Outcome, RecordMeta, RecordRef, Templater};
    use tokio_util::sync::CancellationToken;

    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mock = MockCluster::new(1).unwrap();
    let env = env(&mock).await;
    let night = Preferences {
        quiet_hours: Some(QuietHours { start_minute: 22 * 60, end_minute: 8 * 60 }),
        ..Preferences::default()
    };
    env.store.set_preferences("night", &night, 1).await.unwrap();
    let out = Preferences { opt_out: vec!["campaigns".into()], ..Preferences::default() };
    env.store.set_preferences("out", &out, 1).await.unwrap();
    let templater = Templater::new(env.topo.clone(), &env.registry_url, env.store.clone()).await.unwrap();
    let ev = launch("c7", json!({"user_ids": ["night", "out", "day", "noon"]}));
    let (enc, schema) = encoder(&env, "campaigns-value").await;
    let bytes = enc.encode(json_to_avro(schema, &ev).unwrap()).unwrap();
    let rec = RecordRef { topic: "campaigns", partition: 0, offset: 0, payload: Some(&bytes) };
    let meta = RecordMeta { timestamp: Some(NIGHT_MS * 1000), released: false };
    let outcome = templater.outcome_at(rec, meta, &CancellationToken::new()).await.unwrap();
    assert!(matches!(outcome, Outcome::Notifications(_)), "{outcome:?}");
    let text = handle.render();
    for line in [
        r#"tidings_campaign_notifications_total{outcome="produced"} 2"#,
        r#"tidings_campaign_notifications_total{outcome="held"} 1"#,
        r#"tidings_campaign_notifications_total{outcome="suppressed"} 1"#,
        r#"tidings_notifications_held_total{category="campaigns"} 1"#,
        r#"tidings_notifications_suppressed_total{category="campaigns",reason="opted_out"} 1"#,
    ] {
        assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
    }
    env.token.cancel();
    drop(mock);
}
