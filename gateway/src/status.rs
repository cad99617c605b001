//! `GET /v1/status`: the status report `tidings status --json` prints, for a service credential
//! or a user listed as an admin (`--admin-user`); any other user gets 403, no credential 401.
//! Lag is sampled on request and kept for the window, so each answer judges the recent past.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use tidings_core::status::{self, Collector, Sample, StatusReport};

use crate::auth::AuthConfig;
use crate::error::ApiError;
use crate::service_auth::ServiceTokens;

/// Samples kept at most, whatever the window.
const MAX_SAMPLES: usize = 64;
/// A request within this of the last sample reuses it.
const RESAMPLE: Duration = Duration::from_secs(1);

/// Where reports come from (Kafka in a gateway; a fixed one in tests).
pub trait StatusSource: Send + Sync + 'static {
    fn report(&self) -> Pin<Box<dyn Future<Output = Result<StatusReport, String>> + Send + '_>>;
}

/// Who may read the status, and where it comes from.
#[derive(Clone)]
pub struct StatusState {
    pub source: Arc<dyn StatusSource>,
    pub services: ServiceTokens,
    pub auth: Arc<AuthConfig>,
    /// User ids (`sub`) that may read it; empty: none.
    pub admins: Arc<Vec<String>>,
}

pub fn router(state: StatusState) -> Router {
    Router::new().route("/v1/status", get(get_status)).with_state(state)
}

async fn get_status(State(s): State<StatusState>, headers: HeaderMap) -> Result<Json<StatusReport>, ApiError> {
    allowed(&s, &headers)?;
    match s.source.report().await {
        Ok(r) => Ok(Json(r)),
        Err(e) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "status_unavailable", e)),
    }
}

/// A service token, or an admin's user token.
fn allowed(s: &StatusState, headers: &HeaderMap) -> Result<(), ApiError> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let unauthorized = |code, msg| Err(ApiError::new(StatusCode::UNAUTHORIZED, code, msg));
    let Some(token) = bearer else {
        return unauthorized("missing_credential", "Authorization: Bearer <service token or admin user token>");
    };
    if s.services.accepts(token) {
        return Ok(());
    }
    match s.auth.verify(token) {
        Ok(user) if s.admins.contains(&user) => Ok(()),
        Ok(_) => Err(ApiError::new(StatusCode::FORBIDDEN, "not_admin", "the status is for services and admin users")),
        Err(_) => unauthorized("invalid_credential", "the token is not valid"),
    }
}

/// Reports from Kafka through a [`Collector`], judged over the samples of the last `window`.
pub struct LiveStatus {
    collector: Arc<Collector>,
    window: Duration,
    samples: tokio::sync::Mutex<VecDeque<Sample>>,
    /// Where the groups with `offsets_in_store` keep their offsets.
    store: Option<tidings_store::Store>,
}

impl LiveStatus {
    pub fn new(collector: Collector, window: Duration, store: Option<tidings_store::Store>) -> Self {
        LiveStatus { collector: Arc::new(collector), window, samples: Default::default(), store }
    }

    async fn sample(&self) -> Result<Sample, String> {
        let mut stored = HashMap::new();
        if let Some(store) = &self.store {
            for g in self.collector.spec().groups.iter().filter(|g| g.offsets_in_store) {
                if let Ok(rows) = store.claim_offsets(&g.group).await {
                    stored.insert(g.group.clone(), rows.into_iter().collect());
                }
            }
        }
        let c = self.collector.clone();
        tokio::task::spawn_blocking(move || c.sample(&stored))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    async fn build(&self) -> Result<StatusReport, String> {
        // One request samples at a time; the others wait and reuse its sample.
        let mut samples = self.samples.lock().await;
        let now = chrono::Utc::now().timestamp_millis();
        if samples.back().is_none_or(|s| now - s.at_ms >= RESAMPLE.as_millis() as i64) {
            samples.push_back(self.sample().await?);
        }
        if samples.len() < 2 {
            // A first request: a second look, so a stall can show at all.
            tokio::time::sleep(RESAMPLE).await;
            samples.push_back(self.sample().await?);
        }
        let newest = samples.back().map_or(now, |s| s.at_ms);
        while samples.len() > MAX_SAMPLES
            || samples.front().is_some_and(|s| newest - s.at_ms > self.window.as_millis() as i64)
        {
            samples.pop_front();
        }
        let list: Vec<Sample> = samples.iter().cloned().collect();
        drop(samples);
        let c = self.collector.clone();
        let letters = tokio::task::spawn_blocking(move || c.dead_letters()).await.map_err(|e| e.to_string())?;
        Ok(status::report(self.collector.spec(), &list, letters))
    }
}

impl StatusSource for LiveStatus {
    fn report(&self) -> Pin<Box<dyn Future<Output = Result<StatusReport, String>> + Send + '_>> {
        Box::pin(self.build())
    }
}
