//! The stage's records: a decoded `coupon-claims` record as a [`Request`] (or why it cannot be
//! decided on: its dead letter's reason), and a [`Decision`] as a `coupons` event.

use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::{json, Value as Json};
use tidings_core::json_avro::{avro_to_json, json_to_avro, union_branch_name};
use tidings_core::CodecError;

use super::decide::{Decision, Definition, Request};

/// A `coupon-claims` record, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    pub coupon_id: String,
    pub locale: Option<String>,
    pub request: Request,
}

/// Why a record cannot be decided on: its dead letter's reason code and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undecidable {
    pub reason: &'static str,
    pub error: String,
}

fn missing(what: &str) -> Undecidable {
    Undecidable { reason: "missing-field", error: format!("the record has no {what}") }
}

/// Ids are keys of the store's tables and parts of derived codes: empty ones, or ones with NUL
/// (which PostgreSQL text cannot hold), would fail or blur a batch, so they are refused here.
fn id<'a>(json: &'a Json, field: &str) -> Result<&'a str, Undecidable> {
    let s = json.get(field).and_then(Json::as_str).ok_or_else(|| missing(field))?;
    if s.is_empty() || s.contains('\0') {
        return Err(Undecidable { reason: "invalid-field", error: format!("`{field}` is empty or holds a NUL") });
    }
    Ok(s)
}

fn int(json: &Json, field: &str) -> Result<i64, Undecidable> {
    json.get(field).and_then(Json::as_i64).ok_or_else(|| missing(field))
}

/// Reads a record decoded with the `coupon-claims` reader schema `reader`.
pub fn claim_record(reader: &Schema, value: &Value) -> Result<ClaimRecord, Undecidable> {
    let branch = union_branch_name(reader, value, "payload").ok_or_else(|| missing("`payload` union"))?;
    let json = avro_to_json(value);
    let coupon_id = id(&json, "coupon_id")?.to_string();
    let locale = json.get("locale").and_then(Json::as_str).map(str::to_string);
    let p = json.get("payload").ok_or_else(|| missing("payload"))?;
    let request = match branch {
        "CouponDefined" => {
            let stock = int(p, "stock")?;
            let definition = Definition {
                title: p.get("title").and_then(Json::as_str).ok_or_else(|| missing("title"))?.to_string(),
                discount_percent: i32::try_from(int(p, "discount_percent")?).unwrap_or(i32::MAX),
                stock: u32::try_from(stock).map_err(|_| Undecidable {
                    reason: "invalid-definition",
                    error: format!("stock {stock} is negative"),
                })?,
                opens_at: int(p, "claim_opens_at")?,
                closes_at: int(p, "claim_closes_at")?,
                valid_for: int(p, "valid_for_micros")?,
            };
            let limit = i32::try_from(int(p, "per_user_limit")?).unwrap_or(i32::MAX);
            definition.check(limit).map_err(|error| Undecidable { reason: "invalid-definition", error })?;
            Request::Define(definition)
        }
        "ClaimRequested" => {
            Request::Claim { claim_id: id(p, "claim_id")?.to_string(), user_id: id(p, "user_id")?.to_string() }
        }
        "RedemptionRequested" => Request::Redeem {
            user_id: id(p, "user_id")?.to_string(),
            code: id(p, "code")?.to_string(),
            order_id: id(p, "order_id")?.to_string(),
        },
        other => {
            return Err(Undecidable { reason: "unexpected-event", error: format!("no claim stage event `{other}`") })
        }
    };
    Ok(ClaimRecord { coupon_id, locale, request })
}

/// The `coupons` event of `decision` (`None` for decisions without one), as JSON the `coupons`
/// schema accepts: its id is [`Decision::event_id`], its time the claim record's (`at`, micros).
pub fn decision_event(rec: &ClaimRecord, decision: &Decision, discount_percent: i32, at: i64) -> Option<Json> {
    let id = decision.event_id(&rec.coupon_id)?;
    let payload = match decision {
        Decision::Defined | Decision::DefinitionRefused(_) => return None,
        Decision::Issued { user_id, issue } => json!({"CouponIssued": {
            "user_id": user_id, "code": issue.code, "discount_percent": discount_percent,
            "expires_at": issue.expires_at, "claim_id": issue.claim_id}}),
        Decision::Rejected { user_id, claim_id, reason } => json!({"ClaimRejected": {
            "user_id": user_id, "claim_id": claim_id, "reason": reason.as_str()}}),
        Decision::Redeemed { user_id, code, order_id } => json!({"RedemptionAccepted": {
            "user_id": user_id, "code": code, "order_id": order_id}}),
        Decision::Refused { user_id, code, order_id, reason } => json!({"RedemptionRefused": {
            "user_id": user_id, "code": code, "order_id": order_id, "reason": reason.as_str()}}),
    };
    Some(json!({
        "event_id": id.to_string(),
        "occurred_at": at,
        "coupon_id": rec.coupon_id,
        "locale": rec.locale,
        "payload": payload,
    }))
}

/// `event` as an Avro value of the `coupons` writer schema.
pub fn coupons_value(writer: &Schema, event: &Json) -> Result<Value, CodecError> {
    json_to_avro(writer, event)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::claims::decide::{Issue, RejectReason};

    fn schema(file: &str) -> Schema {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas").join(file);
        Schema::parse_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn record(payload: Json) -> Json {
        json!({"event_id": "e", "occurred_at": 1, "coupon_id": "c-1", "locale": "ko", "payload": payload})
    }

    #[test]
    fn every_request_decodes_and_bad_ones_say_why() {
        let reader = schema("coupon_claim.avsc");
        let read = |payload: Json| claim_record(&reader, &json_to_avro(&reader, &record(payload)).unwrap());
        let claim = read(json!({"ClaimRequested": {"claim_id": "k", "user_id": "u"}})).unwrap();
        assert_eq!(
            claim,
            ClaimRecord {
                coupon_id: "c-1".into(),
                locale: Some("ko".into()),
                request: Request::Claim { claim_id: "k".into(), user_id: "u".into() }
            }
        );
        let def = json!({"CouponDefined": {"title": "t", "discount_percent": 10, "stock": 5, "claim_opens_at": 1,
            "claim_closes_at": 9, "valid_for_micros": 3}});
        assert!(matches!(read(def.clone()).unwrap().request, Request::Define(Definition { stock: 5, .. })));
        let mut bad = def.clone();
        bad["CouponDefined"]["stock"] = json!(-1);
        assert_eq!(read(bad).unwrap_err().reason, "invalid-definition");
        let mut two = def;
        two["CouponDefined"]["per_user_limit"] = json!(2);
        assert_eq!(read(two).unwrap_err().reason, "invalid-definition");
        let redeem = read(json!({"RedemptionRequested": {"user_id": "u", "code": "C", "order_id": "o"}})).unwrap();
        assert!(matches!(redeem.request, Request::Redeem { .. }));
        let empty = read(json!({"ClaimRequested": {"claim_id": "", "user_id": "u"}})).unwrap_err();
        assert_eq!(empty.reason, "invalid-field");
    }

    #[test]
    fn every_decision_is_a_valid_coupons_event() {
        let writer = schema("coupon_event.avsc");
        let rec = ClaimRecord {
            coupon_id: "c-1".into(),
            locale: None,
            request: Request::Claim { claim_id: "k".into(), user_id: "u".into() },
        };
        let issued = Decision::Issued {
            user_id: "u".into(),
            issue: Issue { claim_id: "k".into(), code: "C".into(), expires_at: 7 },
        };
        let rejected = Decision::Rejected { user_id: "u".into(), claim_id: "k".into(), reason: RejectReason::SoldOut };
        let redeemed = Decision::Redeemed { user_id: "u".into(), code: "C".into(), order_id: "o".into() };
        for (d, branch) in [(issued, "CouponIssued"), (rejected, "ClaimRejected"), (redeemed, "RedemptionAccepted")] {
            let event = decision_event(&rec, &d, 10, 5).unwrap();
            let value = coupons_value(&writer, &event).unwrap();
            assert_eq!(union_branch_name(&writer, &value, "payload"), Some(branch));
            assert_eq!(event["event_id"], json!(d.event_id("c-1").unwrap().to_string()));
        }
        assert_eq!(decision_event(&rec, &Decision::Defined, 10, 5), None);
    }
}
