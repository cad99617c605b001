//! Events produced straight to Kafka as an upstream service does: Avro in the Confluent wire
//! format with the schema id registered for the topic, by an idempotent producer (`acks=all`,
//! `linger.ms=0`) whose delivery reports give each send's acknowledgement latency.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::client::ClientContext;
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use serde_json::{json, Value};
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, RegistryClient};
use tidings_loadgen::percentiles;

use tokio::task::JoinHandle;

use super::load::{now_micros, post, posted};

/// Delivery reports not yet taken: (acknowledged, µs from send to report).
#[derive(Default)]
struct Acks(Mutex<Vec<(bool, i64)>>);

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    /// When the record was handed to the producer (µs since the epoch).
    type DeliveryOpaque = Box<i64>;

    // On the producer's polling thread as the report is served: no task wake-up in between.
    fn delivery(&self, result: &DeliveryResult<'_>, sent_us: Box<i64>) {
        let us = now_micros() - *sent_us;
        self.0.lock().unwrap().push((result.is_ok(), us));
    }
}

/// One topic's encoder: JSON of its latest registered schema → a framed record (None if it does
/// not fit the schema).
type TopicEncoder = Box<dyn Fn(&Value) -> Option<Vec<u8>> + Send + Sync>;

/// An upstream service's producer for some topics.
pub(super) struct EventProducer {
    producer: ThreadedProducer<Acks>,
    encoders: HashMap<String, TopicEncoder>,
    /// Sends that failed before reaching the producer (encoding, a full queue).
    refused: Mutex<usize>,
}

impl EventProducer {
    /// A producer for `topics` (physical names), their schemas fetched from the registry at
    /// `registry_url` (subject `<topic>-value`).
    pub(super) async fn new(brokers: &str, registry_url: &str, topics: &[&str]) -> anyhow::Result<EventProducer> {
        let registry = RegistryClient::new(registry_url)?;
        let mut encoders = HashMap::new();
        for t in topics {
            let (id, schema) =
                registry.latest(&format!("{t}-value")).await.with_context(|| format!("schema of {t}"))?;
            let enc = FramedEncoder::new(id, schema)?;
            let encode: TopicEncoder = Box::new(move |v| enc.encode(json_to_avro(schema, v).ok()?).ok());
            encoders.insert(t.to_string(), encode);
        }
        // Idempotence and acks=all come with KafkaConfig's producer; linger 0: each record is
        // sent at once, as a service producing one event at a time would.
        let producer =
            KafkaConfig::new(brokers).producer_with(&[("linger.ms", "0")]).create_with_context(Acks::default())?;
        Ok(EventProducer { producer, encoders, refused: Mutex::new(0) })
    }

    /// Encodes `event` (JSON of the topic's schema, as ingest takes it) and hands it to the
    /// producer keyed by `key`, stamped `sent_us` for its acknowledgement latency.
    pub(super) fn send(&self, topic: &str, key: &str, event: &Value, sent_us: i64) {
        let payload = self.encoders.get(topic).and_then(|encode| encode(event));
        let sent = payload.and_then(|p| {
            let record = BaseRecord::with_opaque_to(topic, Box::new(sent_us)).key(key).payload(&p);
            self.producer.send(record).ok()
        });
        if sent.is_none() {
            *self.refused.lock().unwrap() += 1;
        }
    }

    /// Waits (at most `timeout`) for the delivery reports of the `sent` records handed over since
    /// the last call; answers how many were acknowledged and how long send → report took.
    pub(super) async fn acked(&self, sent: usize, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let refused = || *self.refused.lock().unwrap();
        while self.producer.context().0.lock().unwrap().len() + refused() < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let reports = std::mem::take(&mut *self.producer.context().0.lock().unwrap());
        let refused = std::mem::take(&mut *self.refused.lock().unwrap());
        json!({
            "sent": sent,
            "acked": reports.iter().filter(|(ok, _)| *ok).count(),
            "failed": reports.iter().filter(|(ok, _)| !*ok).count() + refused,
            "ack_ms": percentiles(reports.iter().map(|(_, us)| *us).collect()),
            "note": "the producer's acknowledgement: send() → delivery report (acks=all, idempotent, linger.ms=0)",
        })
    }
}

/// How a scenario's events reach tidings.
#[derive(Clone, Copy)]
pub(super) enum Via<'a> {
    /// `POST /v1/events/{topic}` to tidings' HTTP ingest at this base URL.
    Http(&'a str, &'a reqwest::Client),
    /// Straight to the topic (`prefix` + its name), as an upstream service produces.
    Kafka(&'a EventProducer, &'a str),
}

/// The sends of one part of a run, to be settled together.
#[derive(Default)]
pub(super) struct Sent {
    posts: Vec<JoinHandle<(bool, i64)>>,
    produced: usize,
}

impl Sent {
    /// Adds `other`'s sends to these.
    pub(super) fn merge(&mut self, other: Sent) {
        self.posts.extend(other.posts);
        self.produced += other.produced;
    }
}

impl Via<'_> {
    /// "http" or "kafka", for the scenario's line.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Via::Http(..) => "http",
            Via::Kafka(..) => "kafka",
        }
    }

    /// Sends `event` (keyed by `key`) to the logical `topic`; `sent_us` is when, for the answer's
    /// or acknowledgement's latency.
    pub(super) fn send(&self, sent: &mut Sent, topic: &str, key: &str, event: &Value, sent_us: i64) {
        match *self {
            Via::Http(ingest, http) => {
                sent.posts.push(post(http, format!("{ingest}/v1/events/{topic}"), event.to_string(), sent_us));
            }
            Via::Kafka(producer, prefix) => {
                producer.send(&format!("{prefix}{topic}"), key, event, sent_us);
                sent.produced += 1;
            }
        }
    }

    /// Waits for the answers (HTTP) or delivery reports (Kafka) of `sent`.
    pub(super) async fn settle(&self, sent: Sent) -> Value {
        match *self {
            Via::Http(..) => posted(sent.posts).await,
            Via::Kafka(producer, _) => producer.acked(sent.produced, Duration::from_secs(60)).await,
        }
    }
}
