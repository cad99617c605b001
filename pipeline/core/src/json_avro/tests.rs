use super::*;
use proptest::prelude::*;
use serde_json::json;

fn order_schema() -> Schema {
    Schema::parse_str(include_str!("../../../../schemas/order_event.avsc")).unwrap()
}

fn placed(quantity: Json) -> Json {
    json!({
        "event_id": "e1", "occurred_at": "2026-11-22T10:00:00Z", "order_id": "o1", "buyer_id": "u1",
        "payload": {"OrderPlaced": {"amount_cents": 1250, "currency": "EUR",
            "items": [{"sku": "s", "name": "Tea", "quantity": quantity, "unit_price_cents": 1250}]}}
    })
}

#[test]
fn converts_and_encodes_a_valid_event() {
    let schema = order_schema();
    let v = json_to_avro(&schema, &placed(json!(1))).unwrap();
    assert_eq!(union_branch_name(&schema, &v, "payload"), Some("OrderPlaced"));
    let bytes = apache_avro::writer::datum::GenericDatumWriter::builder(&schema)
        .build()
        .unwrap()
        .write_value_to_vec(v.clone())
        .unwrap();
    assert!(!bytes.is_empty());
    let back = avro_to_json(&v);
    assert_eq!(back["occurred_at"], json!(1_795_341_600_000_000i64));
    assert_eq!(back["locale"], Json::Null, "missing optional field takes its default");
    assert_eq!(back["payload"]["items"][0]["name"], "Tea");
}

#[test]
fn reports_the_path_of_a_bad_field() {
    let err = json_to_avro(&order_schema(), &placed(json!("two"))).unwrap_err();
    match err {
        CodecError::Field { path, message } => {
            assert_eq!(path, "payload.items[0].quantity");
            assert!(message.contains("integer"), "{message}");
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn reports_missing_and_unknown_fields() {
    let mut j = placed(json!(1));
    j.as_object_mut().unwrap().remove("buyer_id");
    let CodecError::Field { path, .. } = json_to_avro(&order_schema(), &j).unwrap_err() else { panic!() };
    assert_eq!(path, "buyer_id");
    let mut j = placed(json!(1));
    j["colour"] = json!("red");
    let CodecError::Field { path, message } = json_to_avro(&order_schema(), &j).unwrap_err() else { panic!() };
    assert_eq!(path, "colour");
    assert!(message.contains("unknown field"));
}

#[test]
fn bare_union_value_takes_the_first_fitting_branch() {
    let j = json!({"event_id": "e", "occurred_at": 5, "order_id": "o", "buyer_id": "u", "locale": "ko",
        "payload": {"carrier": "DHL", "tracking_number": "T1"}});
    let v = json_to_avro(&order_schema(), &j).unwrap();
    assert_eq!(union_branch_name(&order_schema(), &v, "payload"), Some("OrderShipped"));
}

#[test]
fn int_overflow_is_an_error() {
    let err = json_to_avro(&order_schema(), &placed(json!(1u64 << 40))).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
}

proptest! {
    #[test]
    fn json_avro_json_round_trips(amount in any::<i64>(), qty in any::<i32>(), name in ".*", ts in any::<i64>()) {
        let schema = order_schema();
        let j = json!({
            "event_id": "e", "occurred_at": ts, "order_id": "o", "buyer_id": "u", "locale": null,
            "payload": {"amount_cents": amount, "currency": "KRW",
                "items": [{"sku": "s", "name": name, "quantity": qty, "unit_price_cents": amount}]}
        });
        let v = json_to_avro(&schema, &j).unwrap();
        prop_assert_eq!(avro_to_json(&v), j);
    }

    #[test]
    fn arbitrary_json_never_panics(s in "\\PC{0,64}") {
        if let Ok(j) = serde_json::from_str::<Json>(&s) {
            let _ = json_to_avro(&order_schema(), &j);
        }
    }
}
