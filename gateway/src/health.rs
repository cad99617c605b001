//! `/healthz` answers while the process runs; `/readyz` only once every stage reports ready.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Named readiness flags set by the stages.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeMap<String, bool>>>);

impl Readiness {
    pub fn set(&self, component: &str, ready: bool) {
        self.0.lock().expect("lock").insert(component.to_string(), ready);
    }
    pub fn is_ready(&self) -> bool {
        let m = self.0.lock().expect("lock");
        !m.is_empty() && m.values().all(|r| *r)
    }
    fn snapshot(&self) -> BTreeMap<String, bool> {
        self.0.lock().expect("lock").clone()
    }
}

pub fn router(readiness: Readiness) -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(readyz)).with_state(readiness)
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, Json<serde_json::Value>) {
    let status = if r.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(serde_json::json!({ "ready": r.is_ready(), "components": r.snapshot() })))
}
