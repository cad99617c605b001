//! The coupon endpoints' handlers: each checks its caller and input, produces its record, and
//! answers the decision if it comes within the wait, else what to ask later.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tidings_store::claims::{CouponRow, DecidedClaim};

use super::records::{self, FieldError, NewCoupon};
use super::waiters::{Outcome, WaitKey};
use super::CouponState;
use crate::auth::AuthUser;
use crate::error::ApiError;

/// Coupons `GET /v1/coupons` lists at most.
const LIST_LIMIT: u32 = 100;
/// How often a definition's wait looks in the store.
const DEFINITION_POLL: Duration = Duration::from_millis(20);
/// Longest idempotency key, in characters.
const MAX_KEY_CHARS: usize = 128;

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn rfc3339(micros: i64) -> Value {
    chrono::DateTime::from_timestamp_micros(micros)
        .map_or(Value::Null, |t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)))
}

fn unknown_coupon() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "unknown_coupon", "no such coupon")
}

/// 422 naming every field that does not fit (all of them in `path`, comma-separated).
fn invalid(code: &'static str, errors: Vec<FieldError>) -> ApiError {
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    let path = fields.join(",");
    let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message).with_path(path)
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", format!("not JSON: {e}")))
}

/// The API's coupon, with its stock left and status as of `as_of` (microseconds).
fn coupon_json(c: &CouponRow, as_of: i64) -> Value {
    let left = c.stock_left();
    let status = if as_of < c.opens_at {
        "upcoming"
    } else if as_of >= c.closes_at {
        "closed"
    } else if left == 0 {
        "sold_out"
    } else {
        "open"
    };
    json!({
        "id": c.coupon_id, "title": c.title, "discount_percent": c.discount_percent, "stock": c.stock,
        "stock_left": left, "claim_opens_at": rfc3339(c.opens_at), "claim_closes_at": rfc3339(c.closes_at),
        "valid_for_secs": c.valid_for / 1_000_000, "status": status, "as_of": rfc3339(as_of),
    })
}

/// Whether the stored coupon is the one `new` defines (a retried create): a definition without
/// its own opening matches any.
fn same(stored: &CouponRow, new: &NewCoupon) -> bool {
    stored.title == new.title
        && stored.discount_percent == new.discount_percent
        && stored.stock == new.stock
        && stored.closes_at == new.closes_at
        && stored.valid_for == new.valid_for_micros()
        && (!new.opens_given || stored.opens_at == new.opens_at)
}

fn coupon_exists() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "coupon_exists", "another coupon with this id is defined")
}

/// `POST /v1/coupons` (services): 201 once the claim stage holds the definition, 200 for a
/// retried one, 202 if it is not decided within the claim wait, 409 if the id is taken.
pub async fn create(State(state): State<CouponState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    state.check_service(&headers)?;
    let now = now_micros();
    let new = records::new_coupon(&json_body(&body)?, now).map_err(|e| invalid("invalid_coupon", e))?;
    if let Some(stored) = state.store.coupon(&new.id).await? {
        return if same(&stored, &new) {
            Ok((StatusCode::OK, Json(coupon_json(&stored, now_micros()))).into_response())
        } else {
            Err(coupon_exists())
        };
    }
    state.events.produce(&state.cfg.claims_topic, Some(&new.id), &new.record(now), None).await?;
    let started = Instant::now();
    loop {
        let as_of = now_micros();
        if let Some(stored) = state.store.coupon(&new.id).await? {
            return if same(&stored, &new) {
                Ok((StatusCode::CREATED, Json(coupon_json(&stored, as_of))).into_response())
            } else {
                Err(coupon_exists())
            };
        }
        if started.elapsed() >= state.cfg.claim_wait {
            return Ok(pending(json!({"status": "pending", "id": new.id}), &format!("/v1/coupons/{}", new.id)));
        }
        tokio::time::sleep(DEFINITION_POLL).await;
    }
}

/// 202 with `body` and `Location: location`.
fn pending(body: Value, location: &str) -> Response {
    let mut r = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// `GET /v1/coupons` (users): coupons not yet closed, newest opening first.
pub async fn list(State(state): State<CouponState>, AuthUser(_): AuthUser) -> Result<Json<Value>, ApiError> {
    let as_of = now_micros();
    let coupons = state.store.open_coupons(as_of, LIST_LIMIT).await?;
    Ok(Json(json!({
        "coupons": coupons.iter().map(|c| coupon_json(c, as_of)).collect::<Vec<_>>(),
        "as_of": rfc3339(as_of),
    })))
}

/// The stored coupon `id`, or 404 (ids that cannot name a coupon are not looked up).
async fn stored(state: &CouponState, id: &str) -> Result<CouponRow, ApiError> {
    if !records::valid_id(id) {
        return Err(unknown_coupon());
    }
    state.store.coupon(id).await?.ok_or_else(unknown_coupon)
}

/// `GET /v1/coupons/{id}` (users).
pub async fn get(
    State(state): State<CouponState>,
    AuthUser(_): AuthUser,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let as_of = now_micros();
    Ok(Json(coupon_json(&stored(&state, &id).await?, as_of)))
}

/// The request's `Idempotency-Key`: 1..=128 visible ASCII characters.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    let key = v
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_CHARS && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_string())).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_KEY_CHARS} visible ASCII characters"),
        )
    })
}

/// The API error of a claim rejected for `reason`.
fn rejected(reason: &str) -> ApiError {
    let (code, message) = match reason {
        "sold_out" => ("sold_out", "all coupons are taken"),
        "already_claimed" => ("already_claimed", "you already hold this coupon"),
        "not_open" => ("not_open", "claiming has not opened yet"),
        "closed" => ("closed", "claiming has closed"),
        "unknown_coupon" => ("unknown_coupon", "no such coupon"),
        _ => ("rejected", "the claim was rejected"),
    };
    ApiError::new(StatusCode::CONFLICT, code, message)
}

fn issued(coupon_id: &str, claim_id: &str, code: &str, expires_at: i64) -> Response {
    let body = json!({"status": "issued", "coupon_id": coupon_id, "claim_id": claim_id, "code": code,
        "expires_at": rfc3339(expires_at)});
    (StatusCode::CREATED, Json(body)).into_response()
}

/// `POST /v1/coupons/{id}/claims` (users, `Idempotency-Key` required): 201 issued, 409 with the
/// reason, or 202 pending when no decision came within the claim wait (or too many wait).
pub async fn claim(
    State(state): State<CouponState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "idempotency_key_required",
            "a claim needs an Idempotency-Key header; the same key again is the same claim",
        )
    })?;
    if !body.iter().all(u8::is_ascii_whitespace) && !json_body(&body)?.as_object().is_some_and(|o| o.is_empty()) {
        return Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", "a claim's body is empty or {}"));
    }
    stored(&state, &id).await?;
    // Registered before the claim is produced, so its decision cannot pass unseen.
    let waiter = state.waiters.register(WaitKey::Claim { coupon: id.clone(), user: user.clone(), claim: key.clone() });
    let record = records::claim_requested(&id, &key, &user, now_micros());
    state.events.produce(&state.cfg.claims_topic, Some(&id), &record, None).await?;
    let outcome = match waiter {
        Some(w) => w.wait(state.cfg.claim_wait).await,
        None => None,
    };
    match outcome {
        Some(Outcome::Issued { code, expires_at }) => Ok(issued(&id, &key, &code, expires_at)),
        Some(Outcome::Rejected { reason }) => Err(rejected(&reason)),
        _ => Ok(pending(json!({"status": "pending", "claim_id": key}), &format!("/v1/coupons/{id}/claims/me"))),
    }
}

/// `GET /v1/coupons/{id}/claims/me` (users): the coupon they hold, else their most final
/// rejection; with an `Idempotency-Key`, that claim's decision. 404 `no_decided_claim` if none.
pub async fn me(
    State(state): State<CouponState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let key = idempotency_key(&headers)?;
    let none = || ApiError::new(StatusCode::NOT_FOUND, "no_decided_claim", "no claim of yours is decided yet");
    if !records::valid_id(&id) {
        return Err(none());
    }
    match state.store.decided_claim(&id, &user, key.as_deref()).await? {
        Some(DecidedClaim::Issued(h)) => Ok(Json(json!({"status": "issued", "claim_id": h.claim_id, "code": h.code,
            "expires_at": rfc3339(h.expires_at), "redeemed": h.redeemed}))),
        Some(DecidedClaim::Rejected { claim_id, reason }) => {
            Ok(Json(json!({"status": "rejected", "claim_id": claim_id, "reason": reason})))
        }
        None => Err(none()),
    }
}

/// The API error of a redemption refused for `reason`.
fn refused(reason: &str) -> ApiError {
    let (code, message) = match reason {
        "already_redeemed" => ("already_redeemed", "the coupon was already redeemed for another order"),
        "expired" => ("expired", "the coupon has expired"),
        "unknown_code" => ("unknown_code", "no such code was issued to this user for this coupon"),
        "unknown_coupon" => ("unknown_coupon", "no such coupon"),
        _ => ("refused", "the redemption was refused"),
    };
    ApiError::new(StatusCode::CONFLICT, code, message)
}

fn decision_pending() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "decision_pending",
        "the redemption is not decided yet; retry with the same code and order_id for its decision",
    )
    .with_retry_after(1)
}

/// `POST /v1/coupons/{id}/redemptions` (services): 200 redeemed or 409 with the reason, once
/// decided; 503 `decision_pending` if not within the redemption wait (a retry with the same code
/// and order gets the same decision) or, with nothing produced, when too many requests wait.
pub async fn redeem(
    State(state): State<CouponState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    state.check_service(&headers)?;
    let r = records::redemption(&json_body(&body)?).map_err(|e| invalid("invalid_redemption", e))?;
    if !records::valid_id(&id) {
        return Err(unknown_coupon());
    }
    let key = WaitKey::Redemption { coupon: id.clone(), code: r.code.clone(), order: r.order_id.clone() };
    let waiter = state.waiters.register(key).ok_or_else(decision_pending)?;
    state.events.produce(&state.cfg.claims_topic, Some(&id), &r.record(&id, now_micros()), None).await?;
    match waiter.wait(state.cfg.redemption_wait).await {
        Some(Outcome::Redeemed) => Ok(Json(json!({"status": "redeemed", "order_id": r.order_id})).into_response()),
        Some(Outcome::Refused { reason }) => Err(refused(&reason)),
        _ => Err(decision_pending()),
    }
}
