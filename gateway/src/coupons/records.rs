//! The `coupon-claims` records the coupon API produces (CouponDefined, ClaimRequested,
//! RedemptionRequested, as JSON for the topic's schema) and the checks of a coupon definition,
//! shared with `tidings coupon create` so both accept and refuse exactly the same coupons.

use serde_json::{json, Map, Value};

/// Longest coupon id, in characters (all ASCII).
pub const MAX_ID_CHARS: usize = 128;
/// Longest coupon title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;
/// Largest stock of one coupon.
pub const MAX_STOCK: i64 = 10_000_000;
/// Longest validity after issue: 10 years, so its microseconds fit the schema's long with room.
pub const MAX_VALID_FOR_SECS: i64 = 10 * 366 * 24 * 3600;
/// Longest user id, code and order id of a redemption, in bytes.
pub const MAX_REF_BYTES: usize = 256;

/// One field of a request that does not fit, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn bad(field: &str, message: impl Into<String>) -> FieldError {
    FieldError { field: field.to_string(), message: message.into() }
}

/// A checked coupon definition. Times are microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCoupon {
    pub id: String,
    pub title: String,
    pub discount_percent: i32,
    pub stock: i32,
    pub opens_at: i64,
    /// Whether the request named its opening (else it is the time of the request): a retry
    /// without one matches a stored definition whatever its opening.
    pub opens_given: bool,
    pub closes_at: i64,
    pub valid_for_secs: i64,
}

impl NewCoupon {
    pub fn valid_for_micros(&self) -> i64 {
        self.valid_for_secs * 1_000_000
    }

    /// The `CouponDefined` record of this coupon, produced at `now` (microseconds).
    pub fn record(&self, now: i64) -> Value {
        json!({
            "event_id": uuid::Uuid::new_v4().to_string(),
            "occurred_at": now,
            "coupon_id": self.id,
            "locale": null,
            "payload": {"CouponDefined": {
                "title": self.title,
                "discount_percent": self.discount_percent,
                "stock": self.stock,
                "claim_opens_at": self.opens_at,
                "claim_closes_at": self.closes_at,
                "valid_for_micros": self.valid_for_micros(),
                "per_user_limit": 1,
            }},
        })
    }
}

/// Whether `id` can name a coupon: 1..=128 characters of `[A-Za-z0-9._-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn rfc3339(field: &str, v: &Value) -> Result<i64, FieldError> {
    let s = v.as_str().ok_or_else(|| bad(field, "must be an RFC 3339 time (a string)"))?;
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_micros())
        .map_err(|e| bad(field, format!("{s:?} is not an RFC 3339 time: {e}")))
}

fn int_in(field: &str, v: Option<&Value>, range: std::ops::RangeInclusive<i64>) -> Result<i64, FieldError> {
    let msg = || format!("must be an integer from {} to {}", range.start(), range.end());
    let n =
        v.ok_or_else(|| bad(field, format!("is required; {}", msg())))?.as_i64().ok_or_else(|| bad(field, msg()))?;
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(bad(field, msg()))
    }
}

/// Checks a coupon definition (the body of `POST /v1/coupons`) received at `now` (microseconds,
/// the default opening), naming every field that does not fit.
pub fn new_coupon(body: &Value, now: i64) -> Result<NewCoupon, Vec<FieldError>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![bad("body", "must be a JSON object")]);
    };
    let mut errors = Vec::new();
    const FIELDS: [&str; 8] = [
        "id",
        "title",
        "discount_percent",
        "stock",
        "claim_opens_at",
        "claim_closes_at",
        "valid_for_secs",
        "per_user_limit",
    ];
    for k in obj.keys().filter(|k| !FIELDS.contains(&k.as_str())) {
        errors.push(bad(k, "is not a field of a coupon"));
    }
    let id = match obj.get("id").and_then(Value::as_str) {
        Some(id) if valid_id(id) => id.to_string(),
        _ => {
            errors.push(bad("id", format!("must be 1 to {MAX_ID_CHARS} characters of A-Z, a-z, 0-9, '.', '_', '-'")));
            String::new()
        }
    };
    let title = match obj.get("title").and_then(Value::as_str) {
        Some(t) if !t.trim().is_empty() && t.chars().count() <= MAX_TITLE_CHARS && !t.contains('\0') => t.to_string(),
        _ => {
            errors.push(bad("title", format!("must be a non-empty string of at most {MAX_TITLE_CHARS} characters")));
            String::new()
        }
    };
    let mut take = |r: Result<i64, FieldError>| r.map_err(|e| errors.push(e)).unwrap_or_default();
    let discount_percent = take(int_in("discount_percent", obj.get("discount_percent"), 1..=100));
    let stock = take(int_in("stock", obj.get("stock"), 1..=MAX_STOCK));
    let valid_for_secs = take(int_in("valid_for_secs", obj.get("valid_for_secs"), 1..=MAX_VALID_FOR_SECS));
    let opens = obj.get("claim_opens_at").filter(|v| !v.is_null());
    let opens_at = match opens {
        Some(v) => rfc3339("claim_opens_at", v).map_err(|e| errors.push(e)).ok(),
        None => Some(now),
    };
    let closes_at = match obj.get("claim_closes_at") {
        Some(v) => rfc3339("claim_closes_at", v).map_err(|e| errors.push(e)).ok(),
        None => {
            errors.push(bad("claim_closes_at", "is required (an RFC 3339 time)"));
            None
        }
    };
    if let (Some(o), Some(c)) = (opens_at, closes_at) {
        if c <= o {
            let after = if opens.is_some() { "claim_opens_at" } else { "now (claim_opens_at's default)" };
            errors.push(bad("claim_closes_at", format!("must be after {after}")));
        }
    }
    if let Some(v) = obj.get("per_user_limit").filter(|v| !v.is_null()) {
        if v.as_i64() != Some(1) {
            errors.push(bad("per_user_limit", "must be 1 (the only limit supported)"));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(NewCoupon {
        id,
        title,
        discount_percent: discount_percent as i32,
        stock: stock as i32,
        opens_at: opens_at.unwrap_or(now),
        opens_given: opens.is_some(),
        closes_at: closes_at.unwrap_or_default(),
        valid_for_secs,
    })
}

/// The `ClaimRequested` record of `user_id`'s claim `claim_id` (its idempotency key).
pub fn claim_requested(coupon_id: &str, claim_id: &str, user_id: &str, now: i64) -> Value {
    json!({
        "event_id": uuid::Uuid::new_v4().to_string(),
        "occurred_at": now,
        "coupon_id": coupon_id,
        "locale": null,
        "payload": {"ClaimRequested": {"claim_id": claim_id, "user_id": user_id}},
    })
}

/// A checked redemption request (the body of `POST /v1/coupons/{id}/redemptions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redemption {
    pub user_id: String,
    pub code: String,
    pub order_id: String,
}

impl Redemption {
    /// The `RedemptionRequested` record of this redemption of a `coupon_id` code.
    pub fn record(&self, coupon_id: &str, now: i64) -> Value {
        json!({
            "event_id": uuid::Uuid::new_v4().to_string(),
            "occurred_at": now,
            "coupon_id": coupon_id,
            "locale": null,
            "payload": {"RedemptionRequested": {
                "user_id": self.user_id, "code": self.code, "order_id": self.order_id}},
        })
    }
}

/// Checks a redemption request, naming every field that does not fit.
pub fn redemption(body: &Value) -> Result<Redemption, Vec<FieldError>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![bad("body", "must be a JSON object")]);
    };
    let mut errors: Vec<FieldError> = obj
        .keys()
        .filter(|k| !["user_id", "code", "order_id"].contains(&k.as_str()))
        .map(|k| bad(k, "is not a field of a redemption"))
        .collect();
    let mut field = |name: &str, obj: &Map<String, Value>| match obj.get(name).and_then(Value::as_str) {
        Some(s) if !s.is_empty() && s.len() <= MAX_REF_BYTES && !s.contains('\0') => s.to_string(),
        _ => {
            errors.push(bad(name, format!("must be a non-empty string of at most {MAX_REF_BYTES} bytes")));
            String::new()
        }
    };
    let r = Redemption { user_id: field("user_id", obj), code: field("code", obj), order_id: field("order_id", obj) };
    if errors.is_empty() {
        Ok(r)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000_000;

    fn good() -> Value {
        json!({"id": "drop-1", "title": "Spring drop", "discount_percent": 20, "stock": 100,
               "claim_closes_at": "2099-01-01T00:00:00Z", "valid_for_secs": 3600})
    }

    fn fields(body: &Value) -> Vec<String> {
        new_coupon(body, NOW).unwrap_err().into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn a_good_definition_becomes_a_coupon_defined_record() {
        let c = new_coupon(&good(), NOW).unwrap();
        assert_eq!((c.opens_at, c.opens_given, c.stock, c.valid_for_micros()), (NOW, false, 100, 3_600_000_000));
        let rec = c.record(NOW);
        assert_eq!(rec["coupon_id"], "drop-1");
        assert_eq!(rec["payload"]["CouponDefined"]["claim_opens_at"], NOW);
        let mut opens = good();
        opens["claim_opens_at"] = json!("2098-01-01T00:00:00+09:00");
        let c = new_coupon(&opens, NOW).unwrap();
        assert!(c.opens_given);
        assert_eq!(
            c.opens_at,
            chrono::DateTime::parse_from_rfc3339("2097-12-31T15:00:00Z").unwrap().timestamp_micros()
        );
        opens["per_user_limit"] = json!(1);
        assert!(new_coupon(&opens, NOW).is_ok());
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let all_bad = json!({"id": "no spaces", "title": "", "discount_percent": 0, "stock": 10_000_001,
            "claim_opens_at": "tomorrow", "claim_closes_at": 5, "valid_for_secs": 0, "per_user_limit": 2,
            "colour": "red"});
        let mut got = fields(&all_bad);
        got.sort();
        let mut want = vec![
            "claim_closes_at",
            "claim_opens_at",
            "colour",
            "discount_percent",
            "id",
            "per_user_limit",
            "stock",
            "title",
            "valid_for_secs",
        ];
        want.sort();
        assert_eq!(got, want);
        assert_eq!(fields(&json!([])), ["body"]);
        let mut early = good();
        early["claim_closes_at"] = json!("2000-01-01T00:00:00Z");
        assert_eq!(fields(&early), ["claim_closes_at"], "closing before the default opening (now)");
        let mut long = good();
        long["id"] = json!("x".repeat(MAX_ID_CHARS + 1));
        assert_eq!(fields(&long), ["id"]);
        long["id"] = json!("x".repeat(MAX_ID_CHARS));
        assert!(new_coupon(&long, NOW).is_ok());
        let mut missing = good();
        missing.as_object_mut().unwrap().remove("stock");
        missing.as_object_mut().unwrap().remove("claim_closes_at");
        assert_eq!(fields(&missing), ["stock", "claim_closes_at"]);
    }

    #[test]
    fn redemptions_need_three_ids() {
        let r = redemption(&json!({"user_id": "u", "code": "C", "order_id": "o"})).unwrap();
        assert_eq!(r.record("c", NOW)["payload"]["RedemptionRequested"]["order_id"], "o");
        let errs = redemption(&json!({"user_id": "", "code": 5, "extra": 1})).unwrap_err();
        let mut got: Vec<String> = errs.into_iter().map(|e| e.field).collect();
        got.sort();
        assert_eq!(got, ["code", "extra", "order_id", "user_id"]);
    }
}
