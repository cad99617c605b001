//! Templating throughput per core: the CPU path of the templating stage without Kafka (decode
//! through the registry client, audience, render, build and encode the notifications), on one
//! current-thread runtime, for a mix of order events in English and Korean. Prints one JSON line.
//! Env: BENCH_EVENTS (default 200000).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use apache_avro::Schema;
use serde_json::{json, Value as Json};
use tidings_core::json_avro::{avro_to_json, json_to_avro, union_branch_name};
use tidings_core::notification::{NOTIFICATION_SCHEMA, NOTIFICATION_SCHEMA_JSON};
use tidings_core::{FramedEncoder, Notification, RegistryClient};
use tidings_pipeline::stages::templating::render::{Audience, Renderer};
use tidings_pipeline::topology::Topology;
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Events run before timing starts, so the registry fetch and reader construction are not counted
/// (the stage does them once per schema id for the life of the process).
const WARMUP: usize = 2_000;

/// What the stage needs per event, as `Stage` holds it (minus Kafka).
struct Ctx {
    topology: Topology,
    registry: RegistryClient,
    renderer: Renderer,
    readers: HashMap<String, &'static Schema>,
    encoder: FramedEncoder,
}

/// One consumed record as the stage sees it.
struct Record {
    topic: String,
    partition: i32,
    offset: i64,
    payload: Vec<u8>,
}

/// Replicates `Stage::outcome` plus the per-notification encode of `Stage::process` for the
/// `Users` audiences order events have; returns the framed notifications. Any dead-letter outcome
/// is an error here: every generated event is valid, so one would mean the bench measures nothing.
async fn template_one(ctx: &Ctx, rec: &Record) -> Result<Vec<Vec<u8>>, BoxError> {
    let topic = rec.topic.as_str();
    let reader = ctx.readers.get(topic).copied().ok_or_else(|| format!("no reader schema for topic {topic}"))?;
    let value = ctx.registry.decode(&rec.payload, reader).await?;
    let event =
        union_branch_name(reader, &value, "payload").map(str::to_string).ok_or("event has no `payload` union")?;
    let json = avro_to_json(&value);
    let logical = ctx.topology.logical_topic(topic).unwrap_or(topic).to_string();
    let (Some(event_id), Some(occurred_at)) =
        (json.get("event_id").and_then(Json::as_str), json.get("occurred_at").and_then(Json::as_i64))
    else {
        return Err("event has no event_id or occurred_at".into());
    };
    let recipients = match ctx.renderer.audience(&logical, &event, &json)? {
        Some(Audience::Users(u)) => u,
        Some(other) => return Err(format!("order events have user audiences, got {other:?}").into()),
        None => return Err(format!("no template for {logical}/{event}").into()),
    };
    let texts = ctx.renderer.render(&logical, &event, &json, &recipients)?;
    let notifications: Vec<Notification> = recipients
        .into_iter()
        .enumerate()
        .filter_map(|(i, user)| {
            let t = if texts.len() == 1 { &texts[0] } else { texts.get(i)? };
            Some(Notification {
                notification_id: Notification::id_for(event_id, &user),
                user_id: user,
                kind: t.kind.clone(),
                title: t.title.clone(),
                body: t.body.clone(),
                link: t.link.clone(),
                source_event_id: event_id.to_string(),
                occurred_at,
                source_topic: topic.to_string(),
                source_partition: rec.partition,
                source_offset: rec.offset,
            })
        })
        .collect();
    let mut framed = Vec::with_capacity(notifications.len());
    for n in &notifications {
        framed.push(ctx.encoder.encode(n.to_value())?);
    }
    Ok(framed)
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
    let events: usize = match std::env::var("BENCH_EVENTS") {
        Ok(v) => v.parse::<usize>().map_err(|e| format!("BENCH_EVENTS={v:?}: {e}"))?.max(1),
        Err(_) => 200_000,
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let topology = Topology::load(&root.join("topology.yaml")).map_err(|e| e.to_string())?;

    // The embedded registry, in-process, over HTTP as the stage reaches it.
    let (store, _dir) = tidings_sinks::testing::fresh_sqlite().await?;
    let registry = tidings_pipeline::registry::Registry::open(store).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(tidings_pipeline::registry::serve(listener, registry, shutdown.clone()));
    let client = RegistryClient::new(&url)?;

    let orders_topic = topology.topic_name("orders");
    let order_text = topology.schema_text("orders").ok_or("topology has no orders schema")?;
    let order_id = client.register(&format!("{orders_topic}-value"), order_text).await?;
    let order_writer = client.schema_by_id(order_id).await?;
    let output = topology.topic_name(&topology.stages.templating.output);
    let notif_id = client.register(&format!("{output}-value"), NOTIFICATION_SCHEMA_JSON).await?;

    // Reader schemas leaked once, as the stage does, so cached decoders can borrow them.
    let mut readers = HashMap::new();
    for logical in &topology.stages.templating.inputs {
        let schema = topology.schema(logical).ok_or_else(|| format!("input {logical} has no schema"))?;
        readers.insert(topology.topic_name(logical), &*Box::leak(Box::new(schema.clone())));
    }
    let ctx = Ctx {
        renderer: Renderer::new(&topology)?,
        encoder: FramedEncoder::new(notif_id, &NOTIFICATION_SCHEMA)?,
        topology,
        registry: client,
        readers,
    };

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

    let mut bytes = 0usize;
    for rec in &records[..WARMUP] {
        bytes += template_one(&ctx, rec).await?.iter().map(Vec::len).sum::<usize>();
    }
    let mut notifications = 0usize;
    let started = Instant::now();
    for rec in &records[WARMUP..] {
        let out = template_one(&ctx, rec).await?;
        notifications += out.len();
        // Keeps the encoded output observable so no part of the work can be optimised away.
        bytes += out.iter().map(Vec::len).sum::<usize>();
    }
    let secs = started.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    if notifications != events {
        return Err(format!("{events} order events gave {notifications} notifications").into());
    }

    shutdown.cancel();
    server.await??;
    Ok(json!({
        "bench": "templating",
        "events": events,
        "events_per_s_per_core": (events as f64 / secs).round(),
        "notifications_per_s_per_core": (notifications as f64 / secs).round(),
    }))
}

fn main() -> std::process::ExitCode {
    // One thread: the figure is per core, and the stage handles one record at a time.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("templating bench: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench()) {
        Ok(json) => {
            println!("{json}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("templating bench failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
