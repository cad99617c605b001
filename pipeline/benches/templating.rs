//! Templating throughput per core: the CPU path of the templating stage without Kafka (decode
//! through the registry client, audience, render, encode the notifications), on one
//! current-thread runtime, for a mix of order events in English and Korean, and for campaigns
//! (one event, thousands of recipients). Prints one JSON line.
//! Env: BENCH_EVENTS (default 200000), BENCH_CAMPAIGNS (20) of BENCH_AUDIENCE users (10000) each.

// The benches' shared `main`, kept beside tidings-core's bench (see its module documentation).
#[path = "../core/benches/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value as Json};
use tidings_core::json_avro::json_to_avro;
use tidings_core::{FramedEncoder, RegistryClient};
use tidings_pipeline::stages::templating::{Outcome, RecordRef, Target, Templater};
use tidings_pipeline::topology::Topology;
use tokio_util::sync::CancellationToken;

use support::{env_usize, BoxError};

/// Events run before timing starts, so the registry fetch and reader construction are not counted
/// (the stage does them once per schema id for the life of the process).
const WARMUP: usize = 2_000;

/// One consumed record as the stage sees it.
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
}

/// The stage's own per-event path (`Templater::outcome`) plus the encode of each notification.
/// A dead-letter outcome is an error here: every generated event is valid, so one would mean the
/// bench measures nothing.
/// Returns (notifications, records, bytes) so no part of the work can be optimised away.
async fn template_one(
    t: &Templater,
    rec: &Record,
    shutdown: &CancellationToken,
) -> Result<(usize, usize, usize), BoxError> {
    let r = RecordRef { topic: &rec.topic, partition: rec.partition, offset: rec.offset, payload: Some(&rec.payload) };
    match t.outcome(r, shutdown).await? {
        Outcome::Notifications(fanout) => {
            let (mut count, mut bytes) = (0, 0);
            let mut records = t.encoded(&fanout)?;
            while let Some(record) = records.next_record() {
                let (target, payload) = record?;
                count += 1;
                bytes += payload.len() + if let Target::User(u) = target { u.len() } else { 0 };
            }
            Ok((fanout.len(), count, bytes))
        }
        Outcome::Dead { reason, error } | Outcome::CampaignFailed { reason, error, .. } => {
            Err(format!("event dead-lettered ({reason}): {error}").into())
        }
    }
}

/// Campaign `i`: a CampaignLaunched with an inline audience of `audience` users.
fn campaign_event(i: usize, audience: usize) -> Json {
    json!({
        "event_id": uuid::Uuid::from_u128(0xca0c_0000_0000_0000_0000_0000_0000_0000 | i as u128).to_string(),
        "occurred_at": 1_700_000_000_000_000i64 + i as i64 * 1_000,
        "coupon_id": format!("camp-{i}"),
        "payload": {"CampaignLaunched": {"campaign_id": format!("camp-{i}"), "title": "Weekend sale",
            "discount_percent": 20, "audience": {"InlineAudience": {
                "user_ids": (0..audience).map(|u| format!("u{u:06}")).collect::<Vec<_>>()}}}},
    })
}

/// Event `i` of a realistic order stream: placed / paid / shipped, 30% Korean, 1,000 buyers.
fn order_event(i: usize) -> Json {
    let order = format!("o-{:07}", i / 3);
    let buyer = format!("u{:05}", (i.wrapping_mul(7919)) % 1_000);
    let locale = if i % 10 < 3 { "ko" } else { "en" };
    let qty = 1 + (i % 4) as i64;
    let payload = match i % 3 {
        0 => json!({"OrderPlaced": {"amount_cents": 1400 * qty, "currency": "EUR", "items": (0..qty)
            .map(|k| json!({"sku": format!("tea-{k:02}"), "name": "Green tea", "quantity": 1, "unit_price_cents": 1400}))
            .collect::<Vec<_>>()}}),
        1 => json!({"OrderPaid": {"amount_cents": 1400 * qty, "currency": "EUR", "payment_method": "card"}}),
        _ => json!({"OrderShipped": {"carrier": "DHL", "tracking_number": format!("TRK{i:010}")}}),
    };
    json!({
        "event_id": uuid::Uuid::from_u128(0xbe0c_0000_0000_0000_0000_0000_0000_0000 | i as u128).to_string(),
        "occurred_at": 1_700_000_000_000_000i64 + i as i64 * 1_000,
        "order_id": order,
        "buyer_id": buyer,
        "locale": locale,
        "payload": payload,
    })
}

async fn bench() -> Result<Json, BoxError> {
    let events = env_usize("BENCH_EVENTS", 200_000)?;
    let campaigns = env_usize("BENCH_CAMPAIGNS", 20)?;
    let audience = env_usize("BENCH_AUDIENCE", 10_000)?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let topology = Topology::load(&root.join("topology.yaml")).map_err(|e| e.to_string())?;

    // The embedded registry, in-process, over HTTP as the stage reaches it.
    let (store, _dir) = tidings_store::testing::fresh_sqlite().await?;
    let registry = tidings_pipeline::registry::Registry::open(store.clone()).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(tidings_pipeline::registry::serve(listener, registry, shutdown.clone()));
    let client = RegistryClient::new(&url)?;

    let orders_topic = topology.topic_name("orders");
    let order_text = topology.schema_text("orders").ok_or("topology has no orders schema")?;
    let order_id = client.register(&format!("{orders_topic}-value"), order_text).await?;
    let order_writer = client.schema_by_id(order_id).await?;
    let coupons_topic = topology.topic_name("coupons");
    let coupon_text = topology.schema_text("coupons").ok_or("topology has no coupons schema")?;
    let coupon_id = client.register(&format!("{coupons_topic}-value"), coupon_text).await?;
    let coupon_writer = client.schema_by_id(coupon_id).await?;
    // Grouped by the notifications topic's partitions, as the stage does by default.
    let partitions = topology.topics.get("notifications").map(|t| t.partitions).ok_or("no notifications topic")?;
    let mut templater = Templater::new(Arc::new(topology), &url, store).await?;
    templater.group_by_partition(partitions);

    // Producer side, untimed: framed Avro records as ingest writes them.
    let producer = FramedEncoder::new(order_id, order_writer)?;
    let records = (0..WARMUP + events)
        .map(|i| {
            let value = json_to_avro(order_writer, &order_event(i))?;
            Ok(Record {
                topic: orders_topic.clone(),
                partition: (i % 6) as i32,
                offset: (i / 6) as i64,
                payload: producer.encode(value)?,
            })
        })
        .collect::<Result<Vec<_>, BoxError>>()?;

    let campaign_encoder = FramedEncoder::new(coupon_id, coupon_writer)?;
    let campaign_records = (0..=campaigns)
        .map(|i| {
            let value = json_to_avro(coupon_writer, &campaign_event(i, audience))?;
            Ok(Record {
                topic: coupons_topic.clone(),
                partition: 0,
                offset: i as i64,
                payload: campaign_encoder.encode(value)?,
            })
        })
        .collect::<Result<Vec<_>, BoxError>>()?;

    let mut bytes = 0usize;
    for rec in records[..WARMUP].iter().chain(&campaign_records[..1]) {
        bytes += template_one(&templater, rec, &shutdown).await?.2;
    }
    let mut notifications = 0usize;
    let started = Instant::now();
    for rec in &records[WARMUP..] {
        let (n, _, b) = template_one(&templater, rec, &shutdown).await?;
        notifications += n;
        bytes += b;
    }
    let secs = started.elapsed().as_secs_f64();
    if notifications != events {
        return Err(format!("{events} order events gave {notifications} notifications").into());
    }
    let (mut campaign_notifications, mut campaign_records_out) = (0usize, 0usize);
    let started = Instant::now();
    for rec in &campaign_records[1..] {
        let (n, r, b) = template_one(&templater, rec, &shutdown).await?;
        campaign_notifications += n;
        campaign_records_out += r;
        bytes += b;
    }
    let campaign_secs = started.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    if campaign_notifications != campaigns * audience {
        return Err(format!("{campaigns} campaigns gave {campaign_notifications} notifications").into());
    }

    shutdown.cancel();
    server.await??;
    Ok(json!({
        "bench": "templating",
        "events": events,
        "events_per_s_per_core": (events as f64 / secs).round(),
        "notifications_per_s_per_core": (notifications as f64 / secs).round(),
        "campaigns": campaigns,
        "campaign_audience": audience,
        "campaign_notifications_per_s_per_core": (campaign_notifications as f64 / campaign_secs).round(),
        "campaign_records": campaign_records_out,
        "note": "a campaign's recipients on one of the notifications partitions share a group record",
    }))
}

fn main() -> ExitCode {
    // One thread: the figure is per core, and the stage handles one record at a time.
    let runtime = tokio::runtime::Builder::new_current_thread();
    support::main("templating", include_str!("templating.rs"), runtime, bench)
}
