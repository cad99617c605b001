//! The stage's records: a decoded `coupon-claims` record as a [`Request`] (or why it cannot be
//! decided on: its dead letter's reason), and a [`Decision`] as a `coupons` event. Both have a
//! direct codec for the schemas in `schemas/` ([`claim_record_datum`], [`encode_decision`]),
//! used when the registered schemas are those, and property-tested against the generic path.

use std::sync::LazyLock;

use apache_avro::types::Value;
use apache_avro::Schema;
use serde_json::{json, Value as Json};
use tidings_core::avro_binary::{put_long, put_string, Datum};
use tidings_core::json_avro::{avro_to_json, json_to_avro, union_branch_name};
use tidings_core::CodecError;

use super::decide::{Decision, Definition, RefuseReason, RejectReason, Request};

/// The `coupon-claims` schema the direct decoder reads.
pub const CLAIM_SCHEMA_JSON: &str = include_str!("../../../../schemas/coupon_claim.avsc");
/// The `coupons` schema the direct encoder writes.
pub const EVENT_SCHEMA_JSON: &str = include_str!("../../../../schemas/coupon_event.avsc");

static CLAIM_SCHEMA: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse_str(CLAIM_SCHEMA_JSON).expect("schemas/coupon_claim.avsc parses"));
static EVENT_SCHEMA: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse_str(EVENT_SCHEMA_JSON).expect("schemas/coupon_event.avsc parses"));

/// Whether `reader` is the `coupon-claims` schema [`claim_record_datum`] reads (canonical forms
/// equal: docs and defaults do not change the binary layout).
pub fn reads_direct(reader: &Schema) -> bool {
    reader.canonical_form() == CLAIM_SCHEMA.canonical_form()
}

/// Whether `writer` is the `coupons` schema [`encode_decision`] writes.
pub fn writes_direct(writer: &Schema) -> bool {
    writer.canonical_form() == EVENT_SCHEMA.canonical_form()
}

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
    checked_id(json.get(field).and_then(Json::as_str).ok_or_else(|| missing(field))?, field)
}

fn checked_id<'a>(s: &'a str, field: &str) -> Result<&'a str, Undecidable> {
    if s.is_empty() || s.contains('\0') {
        return Err(Undecidable { reason: "invalid-field", error: format!("`{field}` is empty or holds a NUL") });
    }
    Ok(s)
}

/// A `CouponDefined` record's fields as a definition request, or why it cannot be one.
fn define(title: &str, discount: i64, stock: i64, times: [i64; 3], limit: i64) -> Result<Request, Undecidable> {
    let [opens_at, closes_at, valid_for] = times;
    let definition = Definition {
        title: title.to_string(),
        discount_percent: i32::try_from(discount).unwrap_or(i32::MAX),
        stock: u32::try_from(stock)
            .map_err(|_| Undecidable { reason: "invalid-definition", error: format!("stock {stock} is negative") })?,
        opens_at,
        closes_at,
        valid_for,
    };
    let limit = i32::try_from(limit).unwrap_or(i32::MAX);
    definition.check(limit).map_err(|error| Undecidable { reason: "invalid-definition", error })?;
    Ok(Request::Define(definition))
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
            let title = p.get("title").and_then(Json::as_str).ok_or_else(|| missing("title"))?;
            let discount = int(p, "discount_percent")?;
            let times = [int(p, "claim_opens_at")?, int(p, "claim_closes_at")?, int(p, "valid_for_micros")?];
            define(title, discount, stock, times, int(p, "per_user_limit")?)?
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

/// A decoded `coupon-claims` record: what [`claim_record`] makes of it, or why it is not one.
pub type Claim = Result<ClaimRecord, Undecidable>;

/// [`claim_record`] of a value decoded with a reader schema for which [`reads_direct`] holds
/// (the generic path beside [`claim_record_datum`], for records of another writer schema).
pub fn claim_record_value(value: Value) -> Result<Claim, CodecError> {
    Ok(claim_record(&CLAIM_SCHEMA, &value))
}

/// Reads a datum written with exactly `schemas/coupon_claim.avsc` (the fields in order; strings,
/// ints and longs as zig-zag varints, unions as a branch index). Hand-written because the generic
/// path (apache-avro's `Value` tree, validated, then a JSON tree) was most of the stage's own work
/// per claim. Accepts exactly the datums that path accepts (`Err` for the rest) and gives the same
/// claim or dead-letter reason (property-tested below).
pub fn claim_record_datum(datum: &[u8]) -> Result<Claim, CodecError> {
    let mut r = Datum::new(datum);
    r.string()?; // event_id
    r.long()?; // occurred_at
    let coupon_id = r.string()?;
    let locale = r.optional_string()?;
    enum Raw<'a> {
        Define(&'a str, i64, i64, [i64; 3], i64),
        Claim(&'a str, &'a str),
        Redeem(&'a str, &'a str, &'a str),
    }
    let raw = match r.long()? {
        0 => {
            let (title, discount, stock) = (r.string()?, i64::from(r.int()?), i64::from(r.int()?));
            let times = [r.long()?, r.long()?, r.long()?];
            Raw::Define(title, discount, stock, times, i64::from(r.int()?))
        }
        1 => Raw::Claim(r.string()?, r.string()?),
        2 => Raw::Redeem(r.string()?, r.string()?, r.string()?),
        i => return Err(CodecError::Avro(format!("union branch {i} of payload"))),
    };
    r.end()?;
    // The datum is whole: now what it says, checked as claim_record checks it.
    let record = || -> Claim {
        let coupon_id = checked_id(coupon_id, "coupon_id")?.to_string();
        let request = match raw {
            Raw::Define(title, discount, stock, times, limit) => define(title, discount, stock, times, limit)?,
            Raw::Claim(claim_id, user_id) => Request::Claim {
                claim_id: checked_id(claim_id, "claim_id")?.to_string(),
                user_id: checked_id(user_id, "user_id")?.to_string(),
            },
            Raw::Redeem(user_id, code, order_id) => Request::Redeem {
                user_id: checked_id(user_id, "user_id")?.to_string(),
                code: checked_id(code, "code")?.to_string(),
                order_id: checked_id(order_id, "order_id")?.to_string(),
            },
        };
        Ok(ClaimRecord { coupon_id, locale: locale.map(str::to_string), request })
    };
    Ok(record())
}

/// Appends the framed `coupons` event of `decision` (schema id `schema_id`, a schema for which
/// [`writes_direct`] holds) to `out`: the bytes the generic path writes for [`decision_event`]'s
/// JSON (property-tested below), without building the JSON and Avro trees per decision. `false`
/// (nothing appended) for decisions without an event.
pub fn encode_decision(
    schema_id: u32,
    rec: &ClaimRecord,
    decision: &Decision,
    discount_percent: i32,
    at: i64,
    out: &mut Vec<u8>,
) -> bool {
    let Some(id) = decision.event_id(&rec.coupon_id) else { return false };
    tidings_core::wire::frame_into(schema_id, &[], out);
    put_string(id.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()), out);
    put_long(at, out);
    put_string(&rec.coupon_id, out);
    match &rec.locale {
        None => put_long(0, out),
        Some(l) => {
            put_long(1, out);
            put_string(l, out);
        }
    }
    // Branch indexes and enum symbols in schemas/coupon_event.avsc's order.
    match decision {
        Decision::Defined | Decision::DefinitionRefused(_) => unreachable!("no event id above"),
        Decision::Issued { user_id, issue } => {
            put_long(0, out);
            put_string(user_id, out);
            put_string(&issue.code, out);
            put_long(discount_percent.into(), out);
            put_long(issue.expires_at, out);
            put_long(1, out);
            put_string(&issue.claim_id, out);
        }
        Decision::Rejected { user_id, claim_id, reason } => {
            put_long(3, out);
            put_string(user_id, out);
            put_string(claim_id, out);
            put_long(reject_symbol(*reason), out);
        }
        Decision::Redeemed { user_id, code, order_id } => {
            put_long(4, out);
            for s in [user_id, code, order_id] {
                put_string(s, out);
            }
        }
        Decision::Refused { user_id, code, order_id, reason } => {
            put_long(5, out);
            for s in [user_id, code, order_id] {
                put_string(s, out);
            }
            put_long(refuse_symbol(*reason), out);
        }
    }
    true
}

/// `ClaimRejectReason`'s symbol index.
fn reject_symbol(r: RejectReason) -> i64 {
    match r {
        RejectReason::SoldOut => 0,
        RejectReason::AlreadyClaimed => 1,
        RejectReason::NotOpen => 2,
        RejectReason::Closed => 3,
        RejectReason::UnknownCoupon => 4,
    }
}

/// `RedemptionRefuseReason`'s symbol index.
fn refuse_symbol(r: RefuseReason) -> i64 {
    match r {
        RefuseReason::UnknownCoupon => 0,
        RefuseReason::UnknownCode => 1,
        RefuseReason::Expired => 2,
        RefuseReason::AlreadyRedeemed => 3,
    }
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

    #[test]
    fn the_direct_codecs_are_for_the_topologys_schemas() {
        assert!(reads_direct(&schema("coupon_claim.avsc")) && writes_direct(&schema("coupon_event.avsc")));
        assert!(!reads_direct(&schema("coupon_event.avsc")) && !writes_direct(&schema("coupon_claim.avsc")));
    }

    /// What the stage did before the direct decoder: read, validate against the schema, refuse
    /// trailing bytes, then [`claim_record`].
    fn generic_claim(reader: &Schema, bytes: &[u8]) -> Option<Claim> {
        let generic = apache_avro::reader::datum::GenericDatumReader::builder(reader).build().unwrap();
        let mut rest = bytes;
        let value = generic.read_value(&mut rest).ok()?;
        if !value.validate(reader) || !rest.is_empty() {
            return None;
        }
        Some(claim_record(reader, &value))
    }

    fn decision_strategy() -> impl proptest::strategy::Strategy<Value = Decision> {
        use proptest::prelude::*;
        let s = || ".{0,12}";
        let issued = (s(), s(), s(), any::<i64>()).prop_map(|(user_id, claim_id, code, expires_at)| Decision::Issued {
            user_id,
            issue: Issue { claim_id, code, expires_at },
        });
        let rejected = (s(), s(), 0..RejectReason::ALL.len()).prop_map(|(user_id, claim_id, r)| Decision::Rejected {
            user_id,
            claim_id,
            reason: RejectReason::ALL[r],
        });
        let redeemed =
            (s(), s(), s()).prop_map(|(user_id, code, order_id)| Decision::Redeemed { user_id, code, order_id });
        let refuse = [
            RefuseReason::UnknownCoupon,
            RefuseReason::UnknownCode,
            RefuseReason::Expired,
            RefuseReason::AlreadyRedeemed,
        ];
        let refused = (s(), s(), s(), 0..4usize).prop_map(move |(user_id, code, order_id, r)| Decision::Refused {
            user_id,
            code,
            order_id,
            reason: refuse[r],
        });
        prop_oneof![issued, rejected, redeemed, refused]
    }

    proptest::proptest! {
        /// The direct encoder writes exactly the bytes of the JSON path (decision_event →
        /// json_to_avro → apache-avro), so both decode to the same value.
        #[test]
        fn direct_encoding_equals_the_json_path(
            decision in decision_strategy(), coupon in ".{1,12}", locale in proptest::option::of(".{0,6}"),
            discount in proptest::prelude::any::<i32>(), at in proptest::prelude::any::<i64>(),
            schema_id in proptest::prelude::any::<u32>(),
        ) {
            let writer: &'static Schema = Box::leak(Box::new(schema("coupon_event.avsc")));
            let rec = ClaimRecord {
                coupon_id: coupon,
                locale,
                request: Request::Claim { claim_id: "k".into(), user_id: "u".into() },
            };
            let event = decision_event(&rec, &decision, discount, at).unwrap();
            let generic = tidings_core::FramedEncoder::new(schema_id, writer)
                .unwrap()
                .encode(coupons_value(writer, &event).unwrap())
                .unwrap();
            let mut direct = vec![9];
            proptest::prop_assert!(encode_decision(schema_id, &rec, &decision, discount, at, &mut direct));
            proptest::prop_assert_eq!(&direct[1..], &generic[..]);
            let read = apache_avro::reader::datum::GenericDatumReader::builder(writer).build().unwrap();
            let value = read.read_value(&mut &direct[1 + tidings_core::wire::HEADER_LEN..]).unwrap();
            proptest::prop_assert_eq!(avro_to_json(&value), avro_to_json(&coupons_value(writer, &event).unwrap()));
        }

        /// On any bytes (valid records of each branch, with bytes changed, cut or appended), the
        /// direct decoder and the generic path accept the same and give the same claim or reason.
        #[test]
        fn direct_decoding_agrees_with_the_generic_path(
            branch in 0..3usize, coupon in "[a-z\\x00]{0,3}", a in "[a-z\\x00]{0,3}", b in "[a-z\\x00]{0,3}",
            c in ".{0,4}", locale in proptest::option::of(".{0,3}"),
            ints in proptest::collection::vec(-3i32..120, 4), times in proptest::collection::vec(-2i64..5, 3),
            edits in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..3),
            cut in proptest::option::of(proptest::prelude::any::<usize>()),
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2),
        ) {
            let reader = schema("coupon_claim.avsc");
            let payload = match branch {
                0 => json!({"CouponDefined": {"title": c, "discount_percent": ints[0], "stock": ints[1],
                    "claim_opens_at": times[0], "claim_closes_at": times[1], "valid_for_micros": times[2],
                    "per_user_limit": ints[2] % 3}}),
                1 => json!({"ClaimRequested": {"claim_id": a, "user_id": b}}),
                _ => json!({"RedemptionRequested": {"user_id": a, "code": b, "order_id": c}}),
            };
            let event = json!({"event_id": "e", "occurred_at": ints[3], "coupon_id": coupon, "locale": locale, "payload": payload});
            let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&reader).build().unwrap();
            let mut bytes = writer.write_value_to_vec(json_to_avro(&reader, &event).unwrap()).unwrap();
            let valid = bytes.clone();
            for (at, byte) in edits {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = byte;
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut % (bytes.len() + 1));
            }
            bytes.extend(extra);
            proptest::prop_assert_eq!(claim_record_datum(&valid).ok(), generic_claim(&reader, &valid));
            proptest::prop_assert!(claim_record_datum(&valid).is_ok());
            proptest::prop_assert_eq!(claim_record_datum(&bytes).ok(), generic_claim(&reader, &bytes), "bytes {:?}", bytes);
        }
    }
}
