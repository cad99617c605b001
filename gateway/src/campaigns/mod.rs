//! Campaigns for services: `POST /v1/campaigns` (launch or dry run), `GET /v1/campaigns[/{id}]`
//! and `POST /v1/campaigns/{id}/cancel`, behind a service token. [`Campaigns`] holds the logic the
//! API and `tidings campaign` share: checks, the dry run's counts, the definition row, the records.

mod api;
pub mod dry_run;
pub mod records;
pub mod validation;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::Arc;
use tidings_store::campaigns::{CampaignRow, CampaignStatus, NewCampaign};
use tidings_store::Store;

use crate::auth::AuthConfig;
use crate::error::ApiError;
use crate::preferences::{Category, Problem};
use crate::produce::EventProducer;
use crate::service_auth::{require_service, ServiceGuard, ServiceTokens};
pub use dry_run::{DryRun, ESTIMATED_NOTIFICATIONS_PER_SEC};
pub use validation::{Definition, Launch};

/// The topology's name of the topic campaign events go to.
pub const TOPIC: &str = "campaigns";

/// Limits of campaign launches, with their defaults.
#[derive(Debug, Clone)]
pub struct CampaignsConfig {
    /// Inline user ids a launch may name at most (larger audiences are segments). Default 10,000.
    pub max_inline_users: usize,
    /// Segments a launch may name at most. Default 100.
    pub max_segments: usize,
    /// Longest inline user id, in bytes (as segments take).
    pub max_id_bytes: usize,
    /// Largest `POST /v1/campaigns` body (413 beyond). Default 4 MiB: 10,000 ids of 256 bytes fit.
    pub max_body_bytes: usize,
}

impl Default for CampaignsConfig {
    fn default() -> Self {
        CampaignsConfig {
            max_inline_users: 10_000,
            max_segments: 100,
            max_id_bytes: tidings_store::segments::csv::DEFAULT_MAX_ID_BYTES,
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Why a campaign operation did nothing (or, for `Produce`, did not finish).
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// The request is refused; every problem is named.
    #[error("invalid campaign: {}", list(.0))]
    Invalid(Vec<Problem>),
    #[error("another campaign with id {0:?} exists")]
    Exists(String),
    #[error("no campaign {0:?}")]
    Unknown(String),
    #[error("campaign {0:?} is done: there is nothing left to cancel")]
    Finished(String),
    #[error("the store failed: {0}")]
    Store(#[from] tidings_store::StoreError),
    /// Producing the campaign's record failed; the definition is stored, a retry produces it.
    #[error("producing the campaign's record failed ({0}); what was stored stays, and a retry is safe")]
    Produce(ApiError),
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("{}: {}", p.path, p.message)).collect::<Vec<_>>().join("; ")
}

impl IntoResponse for CampaignError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            CampaignError::Invalid(problems) => {
                let body =
                    json!({"error": {"code": "invalid_campaign", "message": list(problems), "problems": problems}});
                return (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response();
            }
            CampaignError::Exists(_) => (StatusCode::CONFLICT, "campaign_exists"),
            CampaignError::Unknown(_) => (StatusCode::NOT_FOUND, "unknown_campaign"),
            CampaignError::Finished(_) => (StatusCode::CONFLICT, "campaign_finished"),
            CampaignError::Store(_) => {
                let CampaignError::Store(e) = self else { unreachable!() };
                return ApiError::from(e).into_response();
            }
            CampaignError::Produce(_) => {
                let CampaignError::Produce(e) = self else { unreachable!() };
                return e.into_response();
            }
        };
        ApiError::new(status, code, self.to_string()).into_response()
    }
}

/// What a launch did.
#[derive(Debug)]
pub enum Launched {
    /// A dry run: nothing written or produced.
    DryRun(Definition, DryRun),
    /// A new campaign, stored and its launch record produced.
    Created(Definition, DryRun),
    /// The same campaign was launched before: nothing new stored.
    Retried(CampaignRow),
}

/// The campaign operations, shared by the API and the CLI.
#[derive(Clone)]
pub struct Campaigns {
    pub store: Store,
    /// Produces the campaign records; `None` for dry runs and reads only (a launch or cancel
    /// then fails before it changes anything).
    pub events: Option<Arc<EventProducer>>,
    /// The physical `campaigns` topic.
    pub topic: String,
    /// The topology's categories (a campaign's must be one of them).
    pub categories: Arc<Vec<Category>>,
    pub config: CampaignsConfig,
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Campaigns {
    /// Checks a launch request received at `now` (microseconds): the request itself, and that its
    /// segments exist and have members; every problem at once. Nothing is written.
    pub async fn check(&self, body: &Value, now: i64) -> Result<Launch, CampaignError> {
        let checked = validation::check(body, &self.categories, &self.config, now);
        let mut problems = checked.as_ref().err().cloned().unwrap_or_default();
        // Whether the named segments exist and have members is reported with the other problems.
        let named = body.pointer("/audience/segments").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        for (i, name) in named.iter().enumerate().take(self.config.max_segments) {
            let Some(name) = name.as_str().filter(|n| tidings_store::segments::check_name(n).is_ok()) else {
                continue;
            };
            match self.store.segment(name).await? {
                None => problems
                    .push(Problem { path: format!("audience.segments[{i}]"), message: format!("no segment {name:?}") }),
                Some(s) if s.size == 0 => problems.push(Problem {
                    path: format!("audience.segments[{i}]"),
                    message: format!("segment {name:?} has no members"),
                }),
                Some(_) => {}
            }
        }
        match checked {
            Ok(launch) if problems.is_empty() => Ok(launch),
            _ => Err(CampaignError::Invalid(problems)),
        }
    }

    /// Checks `body` (a launch request) and, unless it is a dry run, stores and produces the
    /// campaign. The same id with the same definition is a retry: nothing new is stored, and the
    /// launch record is produced again (same event id, so absorbed downstream) while templating
    /// has not yet picked it up, in case the first answer was lost before it reached Kafka.
    pub async fn launch(&self, body: &Value, launched_by: &str) -> Result<Launched, CampaignError> {
        let now = now_micros();
        let launch = self.check(body, now).await?;
        let def = launch.definition;
        let critical = self.categories.iter().any(|c| c.name == def.category && c.critical);
        if launch.dry_run {
            // Nothing is produced: no producer is needed.
            let counts = dry_run::count(&self.store, &def, critical, chrono::Utc::now()).await?;
            return Ok(Launched::DryRun(def, counts));
        }
        if let Some(stored) = self.retry_of(&def).await? {
            return Ok(Launched::Retried(stored));
        }
        let events = self.events()?;
        let counts = dry_run::count(&self.store, &def, critical, chrono::Utc::now()).await?;
        let row = NewCampaign {
            campaign_id: def.campaign_id.clone(),
            event_id: def.event_id(),
            category: def.category.clone(),
            definition: def.canonical(),
            send_at: def.send_at_micros(),
            created_at: now,
            launched_by: launched_by.to_string(),
            audience_estimate: Some(i64::try_from(counts.will_receive).unwrap_or(i64::MAX)),
        };
        if !self.store.insert_campaign(&row).await? {
            // Another request with the id got in first.
            return match self.retry_of(&def).await? {
                Some(stored) => Ok(Launched::Retried(stored)),
                None => Err(CampaignError::Exists(def.campaign_id)),
            };
        }
        produce(events, &self.topic, &def.campaign_id, &records::launched(&def, launched_by, now)).await?;
        Ok(Launched::Created(def, counts))
    }

    /// The stored campaign if `def`'s id is taken by the same definition (re-producing its launch
    /// while templating has not started it); `Exists` if taken by another; `None` if free.
    async fn retry_of(&self, def: &Definition) -> Result<Option<CampaignRow>, CampaignError> {
        let Some(stored) = self.store.campaign(&def.campaign_id).await? else {
            return Ok(None);
        };
        if stored.definition != def.canonical() {
            return Err(CampaignError::Exists(def.campaign_id.clone()));
        }
        if stored.started_at.is_none() && stored.status(now_micros()) != CampaignStatus::Cancelled {
            let record = records::launched(def, &stored.launched_by, stored.created_at);
            produce(self.events()?, &self.topic, &def.campaign_id, &record).await?;
        }
        Ok(Some(stored))
    }

    fn events(&self) -> Result<&EventProducer, CampaignError> {
        self.events.as_deref().ok_or_else(|| {
            CampaignError::Produce(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_producer",
                "campaigns cannot be launched or cancelled here: no Kafka producer",
            ))
        })
    }

    /// Campaign `id`, or `Unknown`.
    pub async fn show(&self, id: &str) -> Result<CampaignRow, CampaignError> {
        if !validation::valid_id(id) {
            return Err(CampaignError::Unknown(id.to_string()));
        }
        self.store.campaign(id).await?.ok_or_else(|| CampaignError::Unknown(id.to_string()))
    }

    /// Cancels campaign `id`: marks it and produces CampaignCancelled (again for an already
    /// cancelled one, harmlessly, in case the first record was lost). `Finished` once it is done.
    pub async fn cancel(&self, id: &str, reason: Option<&str>) -> Result<CampaignRow, CampaignError> {
        let row = self.show(id).await?;
        let now = now_micros();
        if matches!(row.status(now), CampaignStatus::Done | CampaignStatus::Failed) {
            return Err(CampaignError::Finished(id.to_string()));
        }
        let events = self.events()?;
        self.store.cancel_campaign(id, now).await?;
        produce(events, &self.topic, id, &records::cancelled(id, reason, now)).await?;
        self.show(id).await
    }
}

async fn produce(events: &EventProducer, topic: &str, key: &str, record: &Value) -> Result<(), CampaignError> {
    events.produce(topic, Some(key), record, None).await.map_err(CampaignError::Produce)?;
    Ok(())
}

fn rfc3339(micros: Option<i64>) -> Value {
    micros
        .and_then(chrono::DateTime::from_timestamp_micros)
        .map_or(Value::Null, |t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
}

/// A campaign as the API and `tidings campaign show --json` give it; `definition` adds the
/// launch request as stored.
pub fn campaign_json(c: &CampaignRow, definition: bool) -> Value {
    let mut v = json!({
        "campaign_id": c.campaign_id,
        "category": c.category,
        "send_at": rfc3339(c.send_at),
        "created_at": rfc3339(Some(c.created_at)),
        "status": c.status(now_micros()).as_str(),
        "audience_estimate": c.audience_estimate,
        "launched_by": c.launched_by,
        "cancelled_at": rfc3339(c.cancelled_at.or(c.progress_cancelled_at)),
        "finished_at": rfc3339(c.finished_at),
        // Set with status `failed`: why the fan-out stopped short (its launch was dead-lettered).
        "failed_reason": c.failed_reason,
        "counts": {
            "produced": c.produced.unwrap_or(0),
            "held": c.held.unwrap_or(0),
            "suppressed": c.suppressed.unwrap_or(0),
            "stored": c.stored,
            "delivered": c.delivered,
        },
    });
    if definition {
        v["definition"] = serde_json::from_str(&c.definition).unwrap_or(Value::Null);
    }
    v
}

/// A launch's answer: the campaign's id and status with the dry run's counts.
pub fn launched_json(def: &Definition, counts: &DryRun, status: &str) -> Value {
    let mut v = counts.json(def);
    v["campaign_id"] = json!(def.campaign_id);
    v["status"] = json!(status);
    v
}

/// Shared state of the campaign endpoints.
pub struct CampaignsState {
    pub campaigns: Campaigns,
    /// Who may launch, list and cancel campaigns.
    pub tokens: ServiceTokens,
    /// The gateway's user-token settings, to tell a user token (403) from a wrong one (401).
    pub users: Option<Arc<AuthConfig>>,
}

pub fn router(state: Arc<CampaignsState>) -> Router {
    Router::new()
        .route("/v1/campaigns", post(api::launch).get(api::list))
        .route("/v1/campaigns/{id}", get(api::show))
        .route("/v1/campaigns/{id}/cancel", post(api::cancel))
        // The credential is checked before the body is read.
        .route_layer(axum::middleware::from_fn_with_state(
            ServiceGuard { tokens: state.tokens.clone(), users: state.users.clone() },
            require_service,
        ))
        .layer(DefaultBodyLimit::max(state.campaigns.config.max_body_bytes))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row() -> CampaignRow {
        CampaignRow {
            campaign_id: "c1".into(),
            event_id: "campaign:c1".into(),
            category: "campaigns".into(),
            definition: "{}".into(),
            send_at: None,
            created_at: 1,
            launched_by: "ops".into(),
            audience_estimate: Some(10),
            cancelled_at: None,
            started_at: Some(2),
            produced: Some(5000),
            held: Some(0),
            suppressed: Some(0),
            finished_at: None,
            progress_cancelled_at: None,
            failed_reason: None,
            stored: 5000,
            delivered: 0,
        }
    }

    /// A fan-out that stopped short (its launch dead-lettered on a later page) shows `failed` with
    /// its reason, not `sending` or `done`; a cancel still wins.
    #[test]
    fn a_failed_fan_out_shows_failed_with_its_reason() {
        let sending = campaign_json(&row(), false);
        assert_eq!((sending["status"].as_str(), &sending["failed_reason"]), (Some("sending"), &Value::Null));
        let done = campaign_json(&CampaignRow { finished_at: Some(3), ..row() }, false);
        assert_eq!(done["status"], "done");
        let reason = "segment-version-gone: segment \"vip\" version 7 was deleted during the fan-out";
        let failed = CampaignRow { finished_at: Some(3), failed_reason: Some(reason.into()), ..row() };
        let v = campaign_json(&failed, false);
        assert_eq!((v["status"].as_str(), v["failed_reason"].as_str()), (Some("failed"), Some(reason)));
        assert_eq!(v["counts"]["produced"], 5000, "what the pages before it produced");
        let cancelled = CampaignRow { cancelled_at: Some(4), ..failed };
        assert_eq!(campaign_json(&cancelled, false)["status"], "cancelled");
    }
}
