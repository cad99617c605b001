//! The campaign endpoints' handlers (the service token is checked before them, by the router).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

use super::{campaign_json, launched_json, CampaignError, CampaignsState, Launched};
use crate::preferences::Problem;

/// Who a launch through the API is recorded as launched by.
const LAUNCHED_BY: &str = "api";
/// Campaigns per page at most, and by default.
const MAX_LIST: u32 = 100;
const DEFAULT_LIST: u32 = 20;

fn json_body(body: &Bytes) -> Result<Value, CampaignError> {
    serde_json::from_slice(body)
        .map_err(|e| CampaignError::Invalid(vec![Problem { path: "body".into(), message: format!("not JSON: {e}") }]))
}

/// `POST /v1/campaigns`: 201 launched, 200 for a dry run or a retried launch, 422 naming every
/// problem, 409 `campaign_exists` for another definition under the id.
pub async fn launch(State(state): State<Arc<CampaignsState>>, body: Bytes) -> Result<Response, CampaignError> {
    let body = json_body(&body)?;
    Ok(match state.campaigns.launch(&body, LAUNCHED_BY).await? {
        Launched::DryRun(def, counts) => {
            let mut v = counts.json(&def);
            v["dry_run"] = json!(true);
            (StatusCode::OK, Json(v)).into_response()
        }
        Launched::Created(def, counts) => {
            let status = def.initial_status(chrono::Utc::now().timestamp_micros());
            (StatusCode::CREATED, Json(launched_json(&def, &counts, status))).into_response()
        }
        Launched::Retried(row) => (StatusCode::OK, Json(campaign_json(&row, false))).into_response(),
    })
}

#[derive(Deserialize)]
pub struct ListQuery {
    after: Option<String>,
    limit: Option<u32>,
}

/// `GET /v1/campaigns?limit=&after=`: newest first; `next` is the `after` of the next page.
pub async fn list(
    State(state): State<Arc<CampaignsState>>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, CampaignError> {
    let limit = q.limit.unwrap_or(DEFAULT_LIST).clamp(1, MAX_LIST);
    let page = state.campaigns.store.campaigns(q.after.as_deref(), limit).await?;
    let next = (page.len() == limit as usize).then(|| page.last().map(|c| c.campaign_id.clone())).flatten();
    Ok(Json(json!({"campaigns": page.iter().map(|c| campaign_json(c, false)).collect::<Vec<_>>(), "next": next})))
}

/// `GET /v1/campaigns/{id}`: the campaign with its definition, status and counts.
pub async fn show(
    State(state): State<Arc<CampaignsState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, CampaignError> {
    Ok(Json(campaign_json(&state.campaigns.show(&id).await?, true)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    reason: Option<String>,
}

/// `POST /v1/campaigns/{id}/cancel` (body optional: `{"reason": "..."}`): 200 with the campaign,
/// 404 unknown, 409 `campaign_finished` once it is done.
pub async fn cancel(
    State(state): State<Arc<CampaignsState>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, CampaignError> {
    let body: CancelBody = if body.iter().all(u8::is_ascii_whitespace) {
        CancelBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            CampaignError::Invalid(vec![Problem {
                path: "body".into(),
                message: format!("expected {{\"reason\": \"...\"}}: {e}"),
            }])
        })?
    };
    Ok(Json(campaign_json(&state.campaigns.cancel(&id, body.reason.as_deref()).await?, false)))
}
