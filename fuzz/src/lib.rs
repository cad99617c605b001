//! Fuzz target bodies for everything in tidings that parses untrusted input: the Confluent wire
//! framing, JSON→Avro conversion, Avro datum decoding, `topology.yaml`, `traceparent` headers, and
//! the gateway's stream request heads and `Last-Event-ID` positions.
//! libFuzzer (fuzz_targets/*.rs, nightly) and the stable smoke tests (src/smoke.rs) run the same code.

use std::path::Path;
use std::sync::OnceLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde_json::Value as Json;
use tidings_core::json_avro;
use tidings_core::{trace, wire, CodecError};
use tidings_pipeline::topology::Topology;

#[cfg(test)]
mod smoke;

/// Cap on any single allocation while decoding Avro. apache-avro's default is 512 MiB, so a
/// 6-byte datum claiming a huge string would make it allocate that much; real records are far
/// smaller than this (Kafka's default message limit is 1 MiB).
pub const MAX_AVRO_ALLOCATION: usize = 4 * 1024 * 1024;

/// The project's schemas, by file stem.
pub const SCHEMAS: [(&str, &str); 4] = [
    ("order_event", include_str!("../../schemas/order_event.avsc")),
    ("coupon_event", include_str!("../../schemas/coupon_event.avsc")),
    ("chat_event", include_str!("../../schemas/chat_event.avsc")),
    ("notification", include_str!("../../schemas/notification.avsc")),
];

/// One schema with the reader and writer built for it, built once per process because resolving
/// a schema costs far more than decoding a small datum.
struct Codec {
    name: &'static str,
    schema: &'static Schema,
    reader: GenericDatumReader<'static>,
    writer: GenericDatumWriter<'static>,
}

fn codecs() -> &'static [Codec] {
    static CODECS: OnceLock<Vec<Codec>> = OnceLock::new();
    CODECS.get_or_init(|| {
        // First call wins (it is a OnceLock inside apache-avro), so this must run before any decode.
        let cap = apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
        assert_eq!(cap, MAX_AVRO_ALLOCATION, "the Avro allocation cap was already set elsewhere");
        SCHEMAS
            .iter()
            .map(|&(name, text)| {
                let schema: &'static Schema =
                    Box::leak(Box::new(Schema::parse_str(text).unwrap_or_else(|e| panic!("{name}: {e}"))));
                Codec {
                    name,
                    schema,
                    reader: GenericDatumReader::builder(schema).build().unwrap_or_else(|e| panic!("{name}: {e}")),
                    writer: GenericDatumWriter::builder(schema).build().unwrap_or_else(|e| panic!("{name}: {e}")),
                }
            })
            .collect()
    })
}

/// `wire::split` accepts exactly the framed records, and re-framing what it returns gives the input.
pub fn wire_split(data: &[u8]) {
    match wire::split(data) {
        Ok((id, datum)) => {
            assert_eq!(wire::frame(id, datum), data, "frame(split(x)) != x");
            let mut reused = vec![0xAA];
            wire::frame_into(id, datum, &mut reused);
            assert_eq!(&reused[1..], data, "frame_into must append, not overwrite");
        }
        Err(CodecError::TooShort(n)) => assert!(n == data.len() && n < wire::HEADER_LEN, "TooShort({n}) for {data:?}"),
        Err(CodecError::WrongMagic(b)) => {
            assert!(data.len() >= wire::HEADER_LEN && b == data[0] && b != wire::MAGIC, "WrongMagic({b}) for {data:?}")
        }
        Err(e) => panic!("split returned an unexpected error kind for {data:?}: {e}"),
    }
}

/// Any JSON document: whatever `json_to_avro` accepts for a schema must encode, decode back to the
/// same value and survive `avro_to_json` → `json_to_avro` (see [`check_value`]).
pub fn json_to_avro(data: &[u8]) {
    let Ok(json) = serde_json::from_slice::<Json>(data) else { return };
    for c in codecs() {
        if let Ok(value) = json_avro::json_to_avro(c.schema, &json) {
            check_value(c, &value, "json_to_avro");
        }
    }
}

/// Any bytes as an Avro datum of each schema: decoding must fail cleanly or give a value with the
/// same properties as a converted one. The allocation cap is checked by the smoke tests.
pub fn avro_decode(data: &[u8]) {
    notification_direct(data);
    for c in codecs() {
        let Ok(value) = c.reader.read_value(&mut &data[..]) else { continue };
        // apache-avro 0.22 decodes a string cut short by the end of input as Null instead of
        // failing, so a truncated datum can "succeed" with a value that is not of the schema.
        // Only values of the schema have the properties below; the smoke tests pin this quirk.
        if !value.validate(c.schema) {
            continue;
        }
        check_value(c, &value, "avro_decode");
    }
}

/// Delivery's hand-written notification decoder accepts exactly what the generic path (read,
/// validate, no trailing bytes, convert) accepts, and gives the same notification.
fn notification_direct(data: &[u8]) {
    let c = codecs().iter().find(|c| c.name == "notification").expect("the notification codec");
    let mut rest = data;
    let generic = c
        .reader
        .read_value(&mut rest)
        .ok()
        .filter(|v| v.validate(c.schema) && rest.is_empty())
        .and_then(|v| tidings_core::Notification::from_value(v).ok());
    let direct = tidings_core::Notification::decode_datum(data).ok();
    assert_eq!(direct, generic, "direct and generic notification decoding disagree on {data:?}");
}

/// Properties of every value of a schema, however it was obtained.
fn check_value(c: &Codec, value: &Value, origin: &str) {
    let name = c.name;
    let bytes = c
        .writer
        .write_value_to_vec(value.clone())
        .unwrap_or_else(|e| panic!("{origin} {name}: {value:?} does not encode: {e}"));
    let decoded = c
        .reader
        .read_value(&mut &bytes[..])
        .unwrap_or_else(|e| panic!("{origin} {name}: the encoding of {value:?} does not decode: {e}"));
    assert_eq!(&decoded, value, "{origin} {name}: encode/decode changed the value");

    let json = json_avro::avro_to_json(value);
    let again = json_avro::json_to_avro(c.schema, &json)
        .unwrap_or_else(|e| panic!("{origin} {name}: avro_to_json gave {json} which json_to_avro rejects: {e}"));
    // avro_to_json drops union branch names, so a branch whose value also fits an earlier branch
    // (chat MemberLeft vs MemberJoined: both `{user_id}`) comes back as the earlier one. That loss
    // is by design; anything else that changes is a bug.
    assert!(
        same_up_to_earlier_branch(value, &again),
        "{origin} {name}: json_to_avro(avro_to_json(v)) != v\n v = {value:?}\n json = {json}\n back = {again:?}"
    );
    assert_eq!(json_avro::avro_to_json(&again), json, "{origin} {name}: avro_to_json is not a fixpoint");
}

/// `first == again`, except that a union in `again` may hold the same value in an earlier branch.
fn same_up_to_earlier_branch(first: &Value, again: &Value) -> bool {
    match (first, again) {
        (Value::Union(i, x), Value::Union(j, y)) => j <= i && same_up_to_earlier_branch(x, y),
        (Value::Record(f), Value::Record(g)) => {
            f.len() == g.len() && f.iter().zip(g).all(|((n, x), (m, y))| n == m && same_up_to_earlier_branch(x, y))
        }
        (Value::Array(f), Value::Array(g)) => {
            f.len() == g.len() && f.iter().zip(g).all(|(x, y)| same_up_to_earlier_branch(x, y))
        }
        (Value::Map(f), Value::Map(g)) => {
            f.len() == g.len() && f.iter().all(|(k, x)| g.get(k).is_some_and(|y| same_up_to_earlier_branch(x, y)))
        }
        _ => first == again,
    }
}

/// Schema paths in the fuzzed topology resolve against the checkout, so the real schemas load.
fn checkout_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Any UTF-8 as `topology.yaml`: checking must not panic; errors are non-empty; an accepted
/// topology is internally consistent.
pub fn topology_parse(data: &[u8]) {
    let Ok(yaml) = std::str::from_utf8(data) else { return };
    // The checker opens schema paths, so `schema: /dev/zero` would hang the fuzzer in a read that
    // has nothing to do with parsing.
    if ["/dev", "/proc", "/sys"].iter().any(|p| yaml.contains(p)) {
        return;
    }
    match Topology::from_str(yaml, checkout_dir()) {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "rejected without a diagnostic: {yaml:?}");
            let _ = errors.to_string();
        }
        Ok(t) => {
            for (logical, spec) in &t.topics {
                assert!(spec.partitions >= 1 && spec.replication_factor >= 1, "accepted {logical}: {spec:?}");
                assert_eq!(t.logical_topic(&t.topic_name(logical)), Some(logical.as_str()));
                let _ = spec.kafka_configs();
                if spec.schema.is_some() {
                    assert!(t.schema(logical).is_some(), "accepted {logical} without loading its schema");
                }
            }
            let stages = &t.stages;
            let named = stages.templating.inputs.iter().chain(&stages.persistence.inputs).chain([
                &stages.templating.output,
                &stages.templating.dead_letter,
                &stages.persistence.dead_letter,
            ]);
            for topic in named {
                assert!(t.topics.contains_key(topic), "accepted a stage naming unknown topic {topic:?}");
            }
            for tpl in &t.templates {
                assert!(t.topics.contains_key(&tpl.topic), "accepted a template for unknown topic {:?}", tpl.topic);
                let _ = tpl.texts(None);
                let _ = tpl.recipients.path();
            }
        }
    }
}

/// Any UTF-8 as a `traceparent` header: accepted values are exactly the W3C layout, and a child
/// context keeps the trace id and flags.
pub fn traceparent(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Some((trace_id, span_id)) = trace::parse_traceparent(s) else {
        assert!(trace::child_traceparent(s).is_none(), "child of a rejected traceparent {s:?}");
        return;
    };
    assert_eq!(s.len(), 55, "accepted {s:?}");
    assert_eq!((&s[3..35], &s[36..52]), (trace_id, span_id), "wrong slices of {s:?}");
    let child = trace::child_traceparent(s).unwrap_or_else(|| panic!("no child for accepted {s:?}"));
    let (child_trace, _) =
        trace::parse_traceparent(&child).unwrap_or_else(|| panic!("child {child:?} of {s:?} does not parse"));
    assert_eq!(child_trace, trace_id);
    assert_eq!(child[53..], s[53..], "child {child:?} lost the flags of {s:?}");
}

/// Any bytes as the head of a request to the gateway's TCP front, and as a `Last-Event-ID`: only a
/// complete `GET /v1/stream` head is taken for the direct stream path, and an accepted position is
/// one the stream could have sent (it formats back to the same value).
pub fn sse_request(data: &[u8]) {
    if let Some(parts) = tidings_gateway::front::stream_request(data) {
        assert_eq!(parts.method, "GET");
        assert_eq!(parts.uri.path(), "/v1/stream", "took {:?}", parts.uri);
    }
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some((p, o)) = tidings_gateway::delivery::parse_position(s) {
        assert!(p >= 0 && o >= -1, "{s:?} gave ({p}, {o})");
        assert_eq!(
            tidings_gateway::delivery::parse_position(&tidings_gateway::delivery::position_id(p, o)),
            Some((p, o))
        );
    }
}
