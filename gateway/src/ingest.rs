//! `POST /v1/events/{topic}`, for upstream services (a service token, see `service_auth`; user
//! tokens get 403): takes one event as JSON, validates it against the latest schema
//! registered for `<topic>-value` (400 with the field path on mismatch), encodes it as Avro in the
//! Confluent wire format and produces it keyed by the topic's key field. Answers 202 once the
//! broker has acknowledged the record.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use rdkafka::message::{Header, OwnedHeaders};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use tidings_core::kafka::{header_str, H_TRACEPARENT};
use tidings_core::trace;
use tracing::Instrument;

use crate::auth::AuthConfig;
use crate::error::ApiError;
use crate::produce::EventProducer;
use crate::service_auth::{require_service, ServiceGuard, ServiceTokens};

/// Largest accepted event body.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// A topic that accepts events over HTTP.
#[derive(Debug, Clone)]
pub struct IngestTopic {
    /// Cluster name of the topic.
    pub physical: String,
    /// Top-level field whose value is the Kafka key.
    pub key_field: Option<String>,
}

/// Shared state of the ingest endpoint.
pub struct IngestState {
    pub topics: HashMap<String, IngestTopic>,
    pub events: Arc<EventProducer>,
    /// Who may produce.
    pub tokens: ServiceTokens,
    /// The gateway's user-token settings, to tell a user token (403) from a wrong one (401).
    pub users: Option<Arc<AuthConfig>>,
}

pub fn router(state: Arc<IngestState>) -> Router {
    Router::new()
        .route("/v1/events/{topic}", post(ingest))
        // The credential is checked before the body is read.
        .route_layer(axum::middleware::from_fn_with_state(
            ServiceGuard { tokens: state.tokens.clone(), users: state.users.clone() },
            require_service,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn ingest(
    State(state): State<Arc<IngestState>>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Some(t) = state.topics.get(&topic) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_topic",
            format!("topic {topic:?} does not accept events"),
        ));
    };
    let incoming =
        headers.get(H_TRACEPARENT).and_then(|v| v.to_str().ok()).filter(|v| trace::parse_traceparent(v).is_some());
    // The producer span of the messaging conventions, named after the cluster topic (only known
    // topics get here, so names stay few). DEBUG: off, with its allocations, unless traced.
    let span = tracing::debug_span!(
        "send",
        otel.name = %format_args!("send {}", t.physical),
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        messaging.system = trace::MESSAGING_SYSTEM,
        messaging.operation.type = "send",
        messaging.operation.name = "send",
        messaging.destination.name = %t.physical,
        messaging.destination.partition.id = tracing::field::Empty,
        messaging.kafka.offset = tracing::field::Empty,
    );
    if let Some(tp) = incoming {
        trace::set_span_parent(&span, trace::context_from_traceparent(tp));
    }
    // The record carries the send span's context when OpenTelemetry records it, else the
    // caller's traceparent as is, else a new trace: templating continues whichever it gets.
    let trace_headers = trace::propagation_headers(&span, incoming).unwrap_or_else(|| {
        let tp = trace::new_traceparent();
        OwnedHeaders::new().insert(Header { key: H_TRACEPARENT, value: Some(&tp) })
    });
    let result = ingest_event(&state, &topic, t, &body, trace_headers).instrument(span.clone()).await;
    if !span.is_disabled() {
        match &result {
            Ok((_, Json(answer))) => {
                span.record("messaging.destination.partition.id", tracing::field::display(&answer["partition"]));
                span.record("messaging.kafka.offset", answer["offset"].as_i64());
            }
            Err(_) => {
                span.record("otel.status_code", "ERROR");
            }
        }
    }
    result
}

async fn ingest_event(
    state: &IngestState,
    topic: &str,
    t: &IngestTopic,
    body: &[u8],
    trace_headers: OwnedHeaders,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let json: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("body is not valid JSON: {e}")))?;
    let key = t.key_field.as_ref().and_then(|k| json.get(k)).and_then(Value::as_str);
    let traceparent = header_str(&trace_headers, H_TRACEPARENT).unwrap_or_default().to_string();
    let produced = state.events.produce(&t.physical, key, &json, Some(trace_headers)).await?;
    // Events accepted per topic (its topology name: one of the few the lookup above let through).
    metrics::counter!("tidings_ingest_events_total", "topic" => topic.to_string()).increment(1);
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "topic": t.physical, "partition": produced.partition, "offset": produced.offset,
            "schema_id": produced.schema_id, "traceparent": traceparent,
        })),
    ))
}
