//! Audience segments for services (a service token, see `service_auth`; user tokens get 403):
//! `PUT /v1/segments/{name}` replaces the members atomically, `POST` appends, `DELETE` deletes,
//! `GET /v1/segments[/{name}]` lists or shows sizes. Bodies are CSV (`text/csv`, as `tidings segment
//! import` reads) or JSON `{"user_ids": [...]}`; a bad row is a 422 naming its line and changes nothing.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tidings_store::segments::{self, Column, CsvRules, OnError, SegmentChange, SegmentError, SegmentInfo};
use tidings_store::Store;

use crate::auth::AuthConfig;
use crate::error::ApiError;
use crate::service_auth::{require_service, ServiceGuard, ServiceTokens};

/// Limits of the segment endpoints.
#[derive(Debug, Clone)]
pub struct SegmentsConfig {
    /// Largest accepted body (413 beyond); larger files go through `tidings segment import`.
    pub max_body_bytes: usize,
    /// Longest user id accepted, in bytes.
    pub max_id_bytes: usize,
    /// User ids written to the store per transaction.
    pub batch_ids: usize,
    /// Bad rows named in a 422 at most (all are counted).
    pub max_reported: usize,
    /// How long a replaced version stays readable for campaigns already reading it.
    pub keep_replaced: Duration,
}

impl Default for SegmentsConfig {
    fn default() -> Self {
        SegmentsConfig {
            max_body_bytes: 16 * 1024 * 1024,
            max_id_bytes: segments::csv::DEFAULT_MAX_ID_BYTES,
            batch_ids: 50_000,
            max_reported: 20,
            keep_replaced: segments::DEFAULT_KEEP_REPLACED,
        }
    }
}

/// Shared state of the segment endpoints.
pub struct SegmentsState {
    pub store: Store,
    /// Who may change segments.
    pub tokens: ServiceTokens,
    /// The gateway's user-token settings, to tell a user token (403) from a wrong one (401).
    pub users: Option<Arc<AuthConfig>>,
    pub config: SegmentsConfig,
}

pub fn router(state: Arc<SegmentsState>) -> Router {
    Router::new()
        .route("/v1/segments", get(list))
        .route("/v1/segments/{name}", get(show).put(replace).post(append).delete(delete))
        // The credential is checked before the body is read.
        .route_layer(axum::middleware::from_fn_with_state(
            ServiceGuard { tokens: state.tokens.clone(), users: state.users.clone() },
            require_service,
        ))
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .with_state(state)
}

fn info_json(s: &SegmentInfo) -> Value {
    let updated = chrono::DateTime::from_timestamp_micros(s.updated_at).map(|t| t.to_rfc3339()).unwrap_or_default();
    json!({"name": s.name, "size": s.size, "updated_at": updated})
}

fn checked_name(name: &str) -> Result<(), ApiError> {
    segments::check_name(name).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_segment_name", e.to_string()))
}

fn unknown(name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_segment", format!("no segment {name:?}"))
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// Segments per page at most.
const MAX_LIST: u32 = 1000;

async fn list(State(state): State<Arc<SegmentsState>>, Query(q): Query<ListQuery>) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_LIST);
    let page = state.store.segments(q.after.as_deref(), limit).await?;
    let next = (page.len() == limit as usize).then(|| page.last().map(|s| s.name.clone())).flatten();
    Ok(Json(json!({"segments": page.iter().map(info_json).collect::<Vec<_>>(), "next": next})))
}

async fn show(State(state): State<Arc<SegmentsState>>, Path(name): Path<String>) -> Result<Json<Value>, ApiError> {
    checked_name(&name)?;
    let info = state.store.segment(&name).await?.ok_or_else(|| unknown(&name))?;
    Ok(Json(info_json(&info)))
}

async fn delete(State(state): State<Arc<SegmentsState>>, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    checked_name(&name)?;
    if state.store.delete_segment(&name, state.config.keep_replaced).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(unknown(&name))
    }
}

/// How a CSV body is read: `?column=` (a header name, or a position from 1), `?header=false`,
/// `?on_error=skip`.
#[derive(Deserialize, Default)]
struct LoadQuery {
    column: Option<String>,
    header: Option<bool>,
    on_error: Option<String>,
}

async fn replace(
    State(state): State<Arc<SegmentsState>>,
    Path(name): Path<String>,
    Query(q): Query<LoadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    load(&state, &name, SegmentChange::Replace, q, &headers, body).await
}

async fn append(
    State(state): State<Arc<SegmentsState>>,
    Path(name): Path<String>,
    Query(q): Query<LoadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    load(&state, &name, SegmentChange::Append, q, &headers, body).await
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBody {
    user_ids: Vec<String>,
}

async fn load(
    state: &SegmentsState,
    name: &str,
    change: SegmentChange,
    q: LoadQuery,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    checked_name(name)?;
    let cfg = &state.config;
    let on_error = match q.on_error.as_deref() {
        None | Some("refuse") => OnError::Refuse,
        Some("skip") => OnError::Skip,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_on_error",
                format!("on_error must be refuse or skip, not {other:?}"),
            ))
        }
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let batches = match media.as_str() {
        "text/csv" => {
            let column = match q.column.as_deref() {
                None => Column::default(),
                Some(c) => match c.parse::<usize>() {
                    Ok(n) if n >= 1 => Column::Index(n - 1),
                    Ok(_) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "bad_column", "columns count from 1")),
                    Err(_) => Column::Name(c.to_string()),
                },
            };
            let rules = CsvRules { column, header: q.header.unwrap_or(true), max_id_bytes: cfg.max_id_bytes };
            segments::read_in_background(std::io::Cursor::new(body), rules, cfg.batch_ids)
        }
        "application/json" => {
            let parsed: JsonBody = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("expected {{\"user_ids\": [...]}}: {e}"))
            })?;
            let mut bad = Vec::new();
            let mut bad_total = 0usize;
            for (i, id) in parsed.user_ids.iter().enumerate() {
                if let Err(problem) = segments::check_id(id, cfg.max_id_bytes) {
                    bad_total += 1;
                    if bad.len() < cfg.max_reported {
                        bad.push(format!("user_ids[{i}]: {problem}"));
                    }
                }
            }
            if bad_total > 0 && on_error == OnError::Refuse {
                return Err(unprocessable(
                    "bad_user_ids",
                    format!("{bad_total} bad user id(s), nothing changed; {}", bad.join("; ")),
                ));
            }
            let good: Vec<String> =
                parsed.user_ids.into_iter().filter(|id| segments::check_id(id, cfg.max_id_bytes).is_ok()).collect();
            segments::batches_of(good, cfg.batch_ids)
        }
        _ => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("the body must be text/csv or application/json, not {content_type:?}"),
            ))
        }
    };
    let done =
        segments::import(&state.store, name, change, batches, on_error, cfg.max_reported, cfg.keep_replaced, |_| {})
            .await
            .map_err(|e| match e {
                SegmentError::BadRows { .. } => unprocessable("bad_rows", e.to_string()),
                SegmentError::Header(m) => unprocessable("bad_header", m),
                SegmentError::Read(m) => ApiError::new(StatusCode::BAD_REQUEST, "unreadable_csv", m),
                SegmentError::BadName(_) => ApiError::new(StatusCode::BAD_REQUEST, "bad_segment_name", e.to_string()),
                SegmentError::Unknown(n) => unknown(&n),
                SegmentError::Store(e) => e.into(),
            })?;
    let skipped: Vec<Value> = done.bad.iter().map(|b| json!({"line": b.line, "problem": b.problem})).collect();
    let changed = if change == SegmentChange::Append { "added" } else { "loaded" };
    Ok(Json(json!({
        "segment": info_json(&done.changed.info),
        changed: done.changed.changed,
        "skipped": done.bad_total,
        "skipped_rows": skipped,
    })))
}
