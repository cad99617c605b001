//! `POST /v1/events/{topic}`, for upstream services (a service token, see `service_auth`; user
//! tokens get 403): takes one event as JSON, validates it against the latest schema
//! registered for `<topic>-value` (400 with the field path on mismatch), encodes it as Avro in the
//! Confluent wire format and produces it keyed by the topic's key field. Answers 202 once the
//! broker has acknowledged the record.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tidings_core::json_avro::json_to_avro;
use tidings_core::kafka::{header_str, H_TRACEPARENT};
use tidings_core::{trace, CodecError, FramedEncoder, RegistryClient};
use tracing::Instrument;

use crate::auth::AuthConfig;
use crate::service_auth::ServiceTokens;

/// Largest accepted event body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a looked-up schema is reused before asking the registry for the latest again.
const SCHEMA_TTL: Duration = Duration::from_secs(30);

/// A topic that accepts events over HTTP.
#[derive(Debug, Clone)]
pub struct IngestTopic {
    /// Cluster name of the topic.
    pub physical: String,
    /// Top-level field whose value is the Kafka key.
    pub key_field: Option<String>,
}

/// The encoder of a topic's latest schema, and that schema (to validate JSON against).
type TopicEncoder = (FramedEncoder, &'static apache_avro::Schema);

/// Shared state of the ingest endpoint.
pub struct IngestState {
    pub topics: HashMap<String, IngestTopic>,
    pub registry: RegistryClient,
    pub producer: FutureProducer,
    /// Who may produce.
    pub tokens: ServiceTokens,
    /// The gateway's user-token settings, to tell a user token (403) from a wrong one (401).
    pub users: Option<Arc<AuthConfig>>,
    encoders: RwLock<HashMap<String, (Instant, Arc<TopicEncoder>)>>,
}

impl IngestState {
    pub fn new(
        topics: HashMap<String, IngestTopic>,
        registry: RegistryClient,
        producer: FutureProducer,
        tokens: ServiceTokens,
        users: Option<Arc<AuthConfig>>,
    ) -> Self {
        IngestState { topics, registry, producer, tokens, users, encoders: RwLock::new(HashMap::new()) }
    }

    async fn encoder(&self, physical: &str) -> Result<Arc<TopicEncoder>, ApiError> {
        if let Some((at, e)) = self.encoders.read().expect("lock").get(physical) {
            if at.elapsed() < SCHEMA_TTL {
                return Ok(e.clone());
            }
        }
        let (id, schema) = self.registry.latest(&format!("{physical}-value")).await.map_err(|e| {
            if e.is_retriable() {
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
}

/// A JSON error with a stable shape: `{"error": {"code", "message", "path"?}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    path: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), path: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({"code": self.code, "message": self.message});
        if let Some(p) = self.path {
            err["path"] = Value::String(p);
        }
        (self.status, Json(json!({ "error": err }))).into_response()
    }
}

pub fn router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route("/v1/events/{topic}", post(ingest))
        // The credential is checked before the body is read.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_service))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn require_service(
    State(state): State<Arc<IngestState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state.tokens.check(req.headers(), state.users.as_deref()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

async fn ingest(
    State(state): State<Arc<IngestState>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let incoming =
        headers.get(H_TRACEPARENT).and_then(|v| v.to_str().ok()).filter(|v| trace::parse_traceparent(v).is_some());
    let span = tracing::info_span!("ingest", topic = %topic, otel.status_code = tracing::field::Empty);
    if let Some(tp) = incoming {
        trace::set_span_parent(&span, trace::context_from_traceparent(tp));
    }
    // The record carries the ingest span's context when OpenTelemetry records it, else the
    // caller's traceparent as is, else a new trace: templating continues whichever it gets.
    let trace_headers = trace::propagation_headers(&span, incoming).unwrap_or_else(|| {
        let tp = trace::new_traceparent();
        OwnedHeaders::new().insert(Header { key: H_TRACEPARENT, value: Some(&tp) })
    });
    let result = ingest_event(&state, &topic, &body, trace_headers).instrument(span.clone()).await;
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    result
}

async fn ingest_event(
    state: &IngestState,
    topic: &str,
    body: &[u8],
    trace_headers: OwnedHeaders,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(t) = state.topics.get(topic) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_topic",
            format!("topic {topic:?} does not accept events"),
        ));
    };
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("body is not valid JSON: {e}")))?;
    let enc = state.encoder(&t.physical).await?;
    let (encoder, schema) = (&enc.0, enc.1);
    let value = json_to_avro(schema, &json).map_err(|e| match e {
        CodecError::Field { path, message } => ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "schema_mismatch",
            message: format!("{path}: {message}"),
            path: Some(path),
        },
        other => ApiError::new(StatusCode::BAD_REQUEST, "schema_mismatch", other.to_string()),
    })?;
    let payload =
        encoder.encode(value).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "schema_mismatch", e.to_string()))?;
    let key = t.key_field.as_ref().and_then(|k| json.get(k)).and_then(Value::as_str).map(str::to_string);
    let traceparent = header_str(&trace_headers, H_TRACEPARENT).unwrap_or_default().to_string();
    let mut rec: FutureRecord<'_, str, [u8]> =
        FutureRecord::to(&t.physical).payload(payload.as_slice()).headers(trace_headers);
    if let Some(k) = &key {
        rec = rec.key(k.as_str());
    }
    let delivery = state
        .producer
        .send(rec, Duration::from_secs(5))
        .await
        .map_err(|(e, _)| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", e.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "topic": t.physical, "partition": delivery.partition, "offset": delivery.offset,
            "schema_id": encoder.schema_id(), "traceparent": traceparent,
        })),
    ))
}
