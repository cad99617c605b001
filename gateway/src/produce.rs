//! Producing JSON events as Avro in the Confluent wire format under the latest schema of
//! `<topic>-value`: shared by HTTP ingest (services) and the chat API, which validate different
//! things first but encode and produce alike. Answers come after the broker's acknowledgement.

use axum::http::StatusCode;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tidings_core::client_stats::ClientStats;
use tidings_core::json_avro::json_to_avro;
use tidings_core::{CodecError, FramedEncoder, RegistryClient};

use crate::error::ApiError;

/// How long a looked-up schema is reused before asking the registry for the latest again.
const SCHEMA_TTL: Duration = Duration::from_secs(30);
/// How long a produce may wait for the broker before the caller gets 503.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(5);

/// The encoder of a topic's latest schema, and that schema (to validate JSON against).
type TopicEncoder = (FramedEncoder, &'static apache_avro::Schema);

/// A producer of schema-checked JSON events.
pub struct EventProducer {
    registry: RegistryClient,
    producer: FutureProducer<ClientStats>,
    encoders: RwLock<HashMap<String, (Instant, Arc<TopicEncoder>)>>,
}

/// Where a produced event landed, and the schema it was written with.
#[derive(Debug, Clone, Copy)]
pub struct Produced {
    pub partition: i32,
    pub offset: i64,
    pub schema_id: u32,
}

impl EventProducer {
    pub fn new(registry: RegistryClient, producer: FutureProducer<ClientStats>) -> Self {
        EventProducer { registry, producer, encoders: RwLock::new(HashMap::new()) }
    }

    async fn encoder(&self, physical: &str) -> Result<Arc<TopicEncoder>, ApiError> {
        if let Some((at, e)) = self.encoders.read().expect("lock").get(physical) {
            if at.elapsed() < SCHEMA_TTL {
                return Ok(e.clone());
            }
        }
        let (id, schema) = self.registry.latest(&format!("{physical}-value")).await.map_err(|e| {
            // Refused credentials are this server's configuration, not the caller's topic.
            if e.is_retriable() || matches!(e, tidings_core::RegistryError::Unauthorized(..)) {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "registry_unavailable", e.to_string())
            } else {
                ApiError::new(StatusCode::NOT_FOUND, "schema_not_found", e.to_string())
            }
        })?;
        let enc = FramedEncoder::new(id, schema)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
        let e = Arc::new((enc, schema));
        self.encoders.write().expect("lock").insert(physical.to_string(), (Instant::now(), e.clone()));
        Ok(e)
    }

    /// Validates `json` against the topic's schema (400 `schema_mismatch` with the field path),
    /// produces it keyed by `key` and waits for the acknowledgement (503 when the broker fails).
    pub async fn produce(
        &self,
        physical: &str,
        key: Option<&str>,
        json: &Value,
        headers: Option<OwnedHeaders>,
    ) -> Result<Produced, ApiError> {
        let enc = self.encoder(physical).await?;
        let (encoder, schema) = (&enc.0, enc.1);
        let value = json_to_avro(schema, json).map_err(|e| match e {
            CodecError::Field { path, message } => {
                ApiError::new(StatusCode::BAD_REQUEST, "schema_mismatch", format!("{path}: {message}")).with_path(path)
            }
            other => ApiError::new(StatusCode::BAD_REQUEST, "schema_mismatch", other.to_string()),
        })?;
        let payload = encoder
            .encode(value)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "schema_mismatch", e.to_string()))?;
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(physical).payload(payload.as_slice());
        if let Some(h) = headers {
            rec = rec.headers(h);
        }
        if let Some(k) = key {
            rec = rec.key(k);
        }
        let Delivery { partition, offset, .. } =
            self.producer.send(rec, PRODUCE_TIMEOUT).await.map_err(|(e, _)| {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", e.to_string())
            })?;
        Ok(Produced { partition, offset, schema_id: encoder.schema_id() })
    }
}
