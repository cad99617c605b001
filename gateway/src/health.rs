//! `/healthz` answers while the process runs; `/readyz` only once every component reports ready.
//! Components either set a flag or register a check that is asked on every request (delivery is
//! ready only while it is assigned and caught up, which changes with every rebalance).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type Check = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
enum State_ {
    Flag(bool),
    Check(Check),
}

/// Named readiness flags and checks set by the stages.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeMap<String, State_>>>);

impl Readiness {
    pub fn set(&self, component: &str, ready: bool) {
        self.0.lock().expect("lock").insert(component.to_string(), State_::Flag(ready));
    }

    /// Registers a check asked on every readiness probe.
    pub fn set_check(&self, component: &str, check: impl Fn() -> bool + Send + Sync + 'static) {
        self.0.lock().expect("lock").insert(component.to_string(), State_::Check(Arc::new(check)));
    }

    pub fn is_ready(&self) -> bool {
        let s = self.snapshot();
        !s.is_empty() && s.values().all(|r| *r)
    }

    fn snapshot(&self) -> BTreeMap<String, bool> {
        let states = self.0.lock().expect("lock").clone();
        states
            .into_iter()
            .map(|(k, v)| {
                let ready = match v {
                    State_::Flag(b) => b,
                    State_::Check(c) => c(),
                };
                (k, ready)
            })
            .collect()
    }
}

pub fn router(readiness: Readiness) -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(readyz)).with_state(readiness)
}

async fn readyz(State(r): State<Readiness>) -> (StatusCode, Json<serde_json::Value>) {
    let components = r.snapshot();
    let ready = !components.is_empty() && components.values().all(|r| *r);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(serde_json::json!({ "ready": ready, "components": components })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn checks_are_asked_each_time() {
        let r = Readiness::default();
        assert!(!r.is_ready());
        r.set("a", true);
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        r.set_check("delivery", move || f.load(Ordering::Relaxed));
        assert!(!r.is_ready());
        flag.store(true, Ordering::Relaxed);
        assert!(r.is_ready());
    }
}
