//! The load the scenarios send: pacing, HTTP POSTs and their answers, and the events and
//! notifications they carry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, Notification, RegistryClient};
use tidings_loadgen::percentiles;
use tokio::task::JoinHandle;

pub(super) fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Milliseconds between the load's bursts ([`BenchArgs::pace_ms`]).
pub(super) static PACE_MS: AtomicU64 = AtomicU64::new(10);

/// Sleeps so that item `k` (from 0) goes out at `rate` per second since `start`, in bursts of
/// `PACE_MS`.
pub(super) async fn pace(start: Instant, k: usize, rate: usize) {
    let step = (rate * PACE_MS.load(Ordering::Relaxed) as usize / 1000).max(1);
    if k % step == step - 1 {
        let due = start + Duration::from_secs_f64((k + 1) as f64 / rate.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
    }
}

/// POSTs a JSON body in its own task (so a slow answer does not hold up the next send); the task
/// answers whether it was accepted and how long after `sent_us` the answer came (µs). Carries the
/// dev service token that tidings' ingest asks for (nchan ignores it).
pub(super) fn post(http: &reqwest::Client, url: String, body: String, sent_us: i64) -> JoinHandle<(bool, i64)> {
    let req = http
        .post(url)
        .bearer_auth(tidings_gateway::service_auth::DEV_SERVICE_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(30))
        .send();
    tokio::spawn(async move {
        let ok = match req.await {
            // Reading the body gives the connection back to the pool.
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        (ok, now_micros() - sent_us)
    })
}

/// How many POSTs were accepted and how long their answers took.
pub(super) async fn posted(posts: Vec<JoinHandle<(bool, i64)>>) -> Value {
    let done: Vec<(bool, i64)> = futures::future::join_all(posts).await.into_iter().filter_map(Result::ok).collect();
    json!({
        "accepted": done.iter().filter(|(ok, _)| *ok).count(),
        "answer_ms": percentiles(done.iter().map(|(_, us)| *us).collect()),
    })
}

/// An OrderPaid on `orders` (keyed by its order id, here its event id), as ingest takes it.
pub(super) fn order_paid(event_id: &str, user: &str, at_us: i64) -> Value {
    json!({"event_id": event_id, "occurred_at": at_us, "order_id": event_id, "buyer_id": user, "locale": "en",
        "payload": {"OrderPaid": {"amount_cents": 4200, "currency": "EUR", "payment_method": "card"}}})
}

/// A CampaignLaunched on `coupons` (keyed by its coupon id, here `id`) to `users`.
pub(super) fn campaign(id: &str, users: &[String], at_us: i64) -> Value {
    json!({
        "event_id": id, "occurred_at": at_us, "coupon_id": id,
        "payload": {"CampaignLaunched": {"campaign_id": id, "title": "Benchmark sale",
            "discount_percent": 10, "audience": {"InlineAudience": {"user_ids": users}}}}
    })
}

pub(super) fn notification(user: &str, seq: usize) -> Notification {
    let event = format!("bench-{seq}");
    Notification {
        notification_id: Notification::id_for(&event, user),
        user_id: user.to_string(),
        kind: "bench.ping".into(),
        title: "Benchmark".into(),
        body: format!("notification {seq}"),
        link: None,
        source_event_id: event,
        occurred_at: now_micros(),
        source_topic: "bench".into(),
        source_partition: 0,
        source_offset: seq as i64,
        data: None,
        inbox: true,
        category: String::new(),
        recipients: vec![],
    }
}

/// Produces notifications straight to the notifications topic, Avro-framed with its latest schema
/// (as the templating stage does).
pub(super) struct NotificationSender {
    topic: String,
    encoder: FramedEncoder,
    producer: FutureProducer,
}

impl NotificationSender {
    pub(super) async fn new(brokers: &str, registry_url: &str, topic: &str) -> anyhow::Result<NotificationSender> {
        let registry = RegistryClient::new(registry_url)?;
        let (id, schema) = registry.latest(&format!("{topic}-value")).await?;
        let encoder = FramedEncoder::new(id, schema)?;
        let producer: FutureProducer = KafkaConfig::new(brokers.to_string()).producer().create()?;
        Ok(NotificationSender { topic: topic.to_string(), encoder, producer })
    }

    /// Hands `n` to the producer now; the future answers whether it was acknowledged.
    pub(super) fn send(&self, n: Notification) -> impl std::future::Future<Output = bool> {
        let payload = self.encoder.encode(n.to_value()).expect("encodes");
        let key = n.user_id.clone();
        let f =
            self.producer.send_result(FutureRecord::to(&self.topic).key(&key).payload(&payload)).map_err(|(e, _)| e);
        async move {
            match f {
                Ok(d) => d.await.ok().and_then(|r| r.ok()).is_some(),
                Err(_) => false,
            }
        }
    }
}
