//! Delivery's per-record decode, without Kafka: a chat copy and a campaign notification decoded
//! by the hand-written `Notification::decode_datum` and by the generic path it replaced
//! (apache-avro `Value`, schema validation, `from_value`), on one thread. Prints one JSON line.
//! Env: BENCH_RECORDS (default 200000).

mod support;

use std::hint::black_box;
use std::process::ExitCode;
use std::time::Instant;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use serde_json::json;
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::Notification;

fn sample(data: Option<&str>, inbox: bool) -> Notification {
    Notification {
        notification_id: Notification::id_for("ev-1", "user-00042"),
        user_id: "user-00042".into(),
        kind: if inbox { "coupon.issued".into() } else { "chat.message".into() },
        title: "A coupon for you".into(),
        body: "10% off everything in the shoe department until Sunday".into(),
        link: Some("/coupons/c-17".into()),
        source_event_id: "ev-1".into(),
        occurred_at: 1_700_000_000_000_000,
        source_topic: "coupons".into(),
        source_partition: 3,
        source_offset: 123_456,
        data: data.map(str::to_string),
        inbox,
        category: String::new(),
        recipients: vec![],
    }
}

fn main() -> ExitCode {
    // One thread, and no await inside: the figure is per core.
    let runtime = tokio::runtime::Builder::new_current_thread();
    support::main("notification_decode", include_str!("notification_decode.rs"), runtime, || async { bench() })
}

fn bench() -> Result<serde_json::Value, support::BoxError> {
    let n = support::env_usize("BENCH_RECORDS", 200_000)?;
    let chat = r#"{"event_id":"c1","occurred_at":"2026-12-01T10:00:00Z","room_id":"r-17","event_type":"MessageSent","payload":{"message_id":"m-1","sender_id":"user-00007","text":"Does it come in size 44?"}}"#;
    let writer = GenericDatumWriter::builder(&NOTIFICATION_SCHEMA).build().expect("writer");
    let reader = GenericDatumReader::builder(&NOTIFICATION_SCHEMA).build().expect("reader");
    let mut out = serde_json::Map::new();
    for (name, n0) in [("chat_copy", sample(Some(chat), false)), ("campaign", sample(None, true))] {
        let bytes = writer.write_value_to_vec(n0.to_value()).expect("encode");
        let generic = |b: &[u8]| {
            let mut rest = b;
            let v = reader.read_value(&mut rest).expect("decode");
            assert!(v.validate(&NOTIFICATION_SCHEMA) && rest.is_empty());
            Notification::from_value(v).expect("convert")
        };
        assert_eq!(generic(&bytes), n0);
        assert_eq!(Notification::decode_datum(&bytes).expect("direct"), n0);
        let timed = |f: &dyn Fn(&[u8]) -> Notification| {
            for _ in 0..n / 10 {
                black_box(f(black_box(&bytes)));
            }
            let t = Instant::now();
            for _ in 0..n {
                black_box(f(black_box(&bytes)));
            }
            n as f64 / t.elapsed().as_secs_f64()
        };
        let g = timed(&generic);
        let d = timed(&|b| Notification::decode_datum(b).expect("direct"));
        out.insert(
            name.into(),
            json!({"bytes": bytes.len(), "generic_per_sec": g.round(), "direct_per_sec": d.round(), "speedup": (d / g * 10.0).round() / 10.0}),
        );
    }
    Ok(json!({"bench": "notification_decode", "records": n, "results": out, "threads": 1}))
}
