//! The coupon API: services define coupons and redeem codes, users list coupons and claim them.
//! Every request is a record on `coupon-claims` decided by the claim stage; the answer waits a
//! bounded time for the decision, which this gateway reads from `coupons` itself (`decisions`).

mod api;
pub mod decisions;
pub mod records;
pub mod waiters;

use axum::extract::FromRef;
use axum::http::{header, HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use std::time::Duration;
use tidings_store::Store;

use crate::auth::AuthConfig;
use crate::error::ApiError;
use crate::produce::EventProducer;
use crate::service_auth::ServiceTokens;
pub use decisions::{DecisionReader, DecisionSource, DecisionsError};
pub use waiters::Waiters;

/// Coupon API settings, with their defaults.
#[derive(Debug, Clone)]
pub struct CouponConfig {
    /// Physical `coupon-claims` topic.
    pub claims_topic: String,
    /// How long a claim (and a definition) waits for its decision before answering 202. Default 500 ms.
    pub claim_wait: Duration,
    /// How long a redemption waits for its decision before answering 503. Default 5 s.
    pub redemption_wait: Duration,
    /// Requests waiting for a decision at most; past it a claim answers 202 at once and a
    /// redemption 503. Default 10,000.
    pub max_waiting: usize,
}

impl CouponConfig {
    pub fn new(claims_topic: String) -> Self {
        CouponConfig {
            claims_topic,
            claim_wait: Duration::from_millis(500),
            redemption_wait: Duration::from_secs(5),
            max_waiting: 10_000,
        }
    }
}

/// Shared state of the coupon endpoints.
#[derive(Clone)]
pub struct CouponState {
    pub store: Store,
    /// Checks user tokens (and tells them from unknown ones on service routes).
    pub auth: Arc<AuthConfig>,
    /// The service credentials that may define coupons and redeem codes.
    pub services: ServiceTokens,
    pub events: Arc<EventProducer>,
    pub cfg: Arc<CouponConfig>,
    /// The requests waiting for their decision; the decision reader completes them.
    pub waiters: Arc<Waiters>,
}

impl FromRef<CouponState> for Arc<AuthConfig> {
    fn from_ref(s: &CouponState) -> Self {
        s.auth.clone()
    }
}

impl CouponState {
    pub fn new(
        store: Store,
        auth: Arc<AuthConfig>,
        services: ServiceTokens,
        events: Arc<EventProducer>,
        cfg: CouponConfig,
    ) -> Self {
        let waiters = Waiters::new(cfg.max_waiting);
        CouponState { store, auth, services, events, cfg: Arc::new(cfg), waiters }
    }

    /// 401 without a known service token, 403 `forbidden` for a user token.
    fn check_service(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let Some(token) = token else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_credential",
                "this endpoint needs a service token: Authorization: Bearer <token>",
            ));
        };
        if self.services.accepts(token) {
            return Ok(());
        }
        if self.auth.verify(token).is_ok() {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only services may do this, not users"));
        }
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credential", "the service token is not known"))
    }
}

/// The coupon routes.
pub fn router(state: CouponState) -> Router {
    Router::new()
        .route("/v1/coupons", post(api::create).get(api::list))
        .route("/v1/coupons/{id}", get(api::get))
        .route("/v1/coupons/{id}/claims", post(api::claim))
        .route("/v1/coupons/{id}/claims/me", get(api::me))
        .route("/v1/coupons/{id}/redemptions", post(api::redeem))
        .with_state(state)
}
