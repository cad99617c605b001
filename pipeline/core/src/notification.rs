//! The notification record that the templating stage emits and the sinks and gateway consume.
//! Its Avro schema is `schemas/notification.avsc`; the id is deterministic so replays deduplicate.

use apache_avro::types::Value;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

use crate::avro_binary::{put_long, put_string, Datum};
use crate::error::CodecError;

/// The Avro schema of `notifications` values, compiled once.
pub static NOTIFICATION_SCHEMA: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse_str(NOTIFICATION_SCHEMA_JSON).expect("schemas/notification.avsc is valid Avro"));

/// The text of `schemas/notification.avsc`.
pub const NOTIFICATION_SCHEMA_JSON: &str = include_str!("../../../schemas/notification.avsc");

/// Namespace for deterministic notification ids (UUIDv5 of `source_event_id` + `\0` + `user_id`).
const NOTIFICATION_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f1c_2a4e_8b0d_4c55_9e3a_7d21_b4f0_c8a1);

/// A rendered notification for one recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub notification_id: uuid::Uuid,
    pub user_id: String,
    pub kind: String,
    pub title: String,
    pub body: String,
    pub link: Option<String>,
    pub source_event_id: String,
    /// Microseconds since the Unix epoch (the source event's `occurred_at`).
    pub occurred_at: i64,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    /// The source event as JSON, for deliveries read as structured data (chat events).
    pub data: Option<String>,
    /// False for delivery-only copies (chat messages to room members): streamed, never stored.
    pub inbox: bool,
    /// The template's category (`categories` in topology.yaml); empty in older records.
    pub category: String,
    /// Empty for one user's notification; else a group record standing for the notification of
    /// each of these users (see [`Notification::for_each_recipient`]).
    pub recipients: Vec<String>,
}

impl Notification {
    /// The deterministic id for the notification of `source_event_id` to `user_id`.
    pub fn id_for(source_event_id: &str, user_id: &str) -> uuid::Uuid {
        let mut name = Vec::with_capacity(source_event_id.len() + user_id.len() + 1);
        name.extend_from_slice(source_event_id.as_bytes());
        name.push(0);
        name.extend_from_slice(user_id.as_bytes());
        uuid::Uuid::new_v5(&NOTIFICATION_NAMESPACE, &name)
    }

    /// Calls `f` with each per-user notification this record stands for: itself, or for a group
    /// record each recipient's (its user id and deterministic id filled in, `recipients` empty).
    /// One struct is reused for all of them, so a group of thousands copies only the user ids.
    pub fn for_each_recipient(mut self, mut f: impl FnMut(&Notification)) {
        if self.recipients.is_empty() {
            return f(&self);
        }
        for user in std::mem::take(&mut self.recipients) {
            self.notification_id = Self::id_for(&self.source_event_id, &user);
            self.user_id = user;
            f(&self);
        }
    }

    /// The record as an Avro value of [`NOTIFICATION_SCHEMA`].
    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("notification_id".into(), Value::String(self.notification_id.to_string())),
            ("user_id".into(), Value::String(self.user_id.clone())),
            ("kind".into(), Value::String(self.kind.clone())),
            ("title".into(), Value::String(self.title.clone())),
            ("body".into(), Value::String(self.body.clone())),
            ("link".into(), optional_string(self.link.as_deref())),
            ("source_event_id".into(), Value::String(self.source_event_id.clone())),
            ("occurred_at".into(), Value::TimestampMicros(self.occurred_at)),
            ("source_topic".into(), Value::String(self.source_topic.clone())),
            ("source_partition".into(), Value::Int(self.source_partition)),
            ("source_offset".into(), Value::Long(self.source_offset)),
            ("data".into(), optional_string(self.data.as_deref())),
            ("inbox".into(), Value::Boolean(self.inbox)),
            ("category".into(), Value::String(self.category.clone())),
            ("recipients".into(), Value::Array(self.recipients.iter().cloned().map(Value::String).collect())),
        ])
    }

    /// Reads the record from an Avro value (already resolved to [`NOTIFICATION_SCHEMA`]).
    pub fn from_value(value: Value) -> Result<Self, CodecError> {
        let Value::Record(fields) = value else {
            return Err(CodecError::Avro("notification is not a record".into()));
        };
        let mut n = Notification {
            notification_id: uuid::Uuid::nil(),
            user_id: String::new(),
            kind: String::new(),
            title: String::new(),
            body: String::new(),
            link: None,
            source_event_id: String::new(),
            occurred_at: 0,
            source_topic: String::new(),
            source_partition: 0,
            source_offset: 0,
            data: None,
            inbox: true,
            category: String::new(),
            recipients: Vec::new(),
        };
        for (name, v) in fields {
            let v = match v {
                Value::Union(_, inner) => *inner,
                v => v,
            };
            match (name.as_str(), v) {
                ("notification_id", Value::String(s)) => {
                    n.notification_id =
                        s.parse().map_err(|_| CodecError::Avro(format!("notification_id {s:?} is not a UUID")))?
                }
                ("user_id", Value::String(s)) => n.user_id = s,
                ("kind", Value::String(s)) => n.kind = s,
                ("title", Value::String(s)) => n.title = s,
                ("body", Value::String(s)) => n.body = s,
                ("link", Value::String(s)) => n.link = Some(s),
                ("link", Value::Null) => n.link = None,
                ("source_event_id", Value::String(s)) => n.source_event_id = s,
                ("occurred_at", Value::TimestampMicros(t) | Value::Long(t)) => n.occurred_at = t,
                ("source_topic", Value::String(s)) => n.source_topic = s,
                ("source_partition", Value::Int(p)) => n.source_partition = p,
                ("source_offset", Value::Long(o)) => n.source_offset = o,
                ("data", Value::String(s)) => n.data = Some(s),
                ("data", Value::Null) => n.data = None,
                ("inbox", Value::Boolean(b)) => n.inbox = b,
                ("category", Value::String(s)) => n.category = s,
                ("recipients", Value::Array(items)) => {
                    n.recipients = items
                        .into_iter()
                        .map(|v| match v {
                            Value::String(s) => Ok(s),
                            v => Err(CodecError::Avro(format!("recipient {v:?} is not a string"))),
                        })
                        .collect::<Result<_, _>>()?
                }
                (name, v) => return Err(CodecError::Avro(format!("unexpected notification field {name} = {v:?}"))),
            }
        }
        Ok(n)
    }
}

impl Notification {
    /// Reads a datum written with exactly [`NOTIFICATION_SCHEMA`] (Avro binary: the fields in
    /// order; strings, ints and longs as zig-zag varints, unions as a branch index). Hand-written
    /// because apache-avro decodes only into its generic `Value` tree (which `decode` then
    /// validates and [`Notification::from_value`] converts), 4.6–5 times slower per record
    /// (`bash .ci/bench decode`) on the schema of every record delivery reads. Accepts exactly what
    /// that path accepts and gives the same notification (property-tested here, fuzzed in `fuzz/`).
    pub fn decode_datum(datum: &[u8]) -> Result<Self, CodecError> {
        let mut r = Datum::new(datum);
        let id = r.string()?;
        let notification_id =
            id.parse().map_err(|_| CodecError::Avro(format!("notification_id {id:?} is not a UUID")))?;
        let n = Notification {
            notification_id,
            user_id: r.string()?.to_owned(),
            kind: r.string()?.to_owned(),
            title: r.string()?.to_owned(),
            body: r.string()?.to_owned(),
            link: r.optional_string()?.map(str::to_owned),
            source_event_id: r.string()?.to_owned(),
            occurred_at: r.long()?,
            source_topic: r.string()?.to_owned(),
            source_partition: r.int()?,
            source_offset: r.long()?,
            data: r.optional_string()?.map(str::to_owned),
            inbox: r.boolean()?,
            category: r.string()?.to_owned(),
            recipients: r.string_array()?,
        };
        r.end()?;
        Ok(n)
    }
}

/// Everything of a notification but its id and recipient: what every recipient of one rendered
/// text shares (a campaign's 100,000 notifications differ only in those two fields).
#[derive(Debug, Clone, Copy)]
pub struct SharedFields<'a> {
    pub kind: &'a str,
    pub title: &'a str,
    pub body: &'a str,
    pub link: Option<&'a str>,
    pub source_event_id: &'a str,
    pub occurred_at: i64,
    pub source_topic: &'a str,
    pub source_partition: i32,
    pub source_offset: i64,
    pub data: Option<&'a str>,
    pub inbox: bool,
    pub category: &'a str,
}

/// [`NOTIFICATION_SCHEMA`] without its first two fields (`notification_id`, `user_id`) and its last
/// (`recipients`), derived from the same file so the two cannot drift apart. An Avro record is the
/// concatenation of its fields' encodings, so a notification's bytes are: id, user, this record's
/// bytes, then the recipients.
static SHARED_SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let mut json: serde_json::Value =
        serde_json::from_str(NOTIFICATION_SCHEMA_JSON).expect("notification.avsc is JSON");
    let fields = json["fields"].as_array_mut().expect("notification.avsc has fields");
    assert_eq!(fields[0]["name"], "notification_id");
    assert_eq!(fields[1]["name"], "user_id");
    fields.drain(..2);
    assert_eq!(fields.pop().expect("notification.avsc has more fields")["name"], "recipients");
    json["name"] = "NotificationShared".into();
    Schema::parse(&json).expect("the shared part of notification.avsc is valid Avro")
});

/// Encodes notifications in the Confluent wire format under a registered id of
/// [`NOTIFICATION_SCHEMA`]: the shared fields once per rendered text ([`Self::shared`]), then per
/// record only the id and user id are written in front of them and the recipients after them
/// ([`Self::encode_into`]).
pub struct NotificationEncoder {
    schema_id: u32,
    shared: apache_avro::writer::datum::GenericDatumWriter<'static>,
}

impl NotificationEncoder {
    pub fn new(schema_id: u32) -> Result<Self, CodecError> {
        let shared = apache_avro::writer::datum::GenericDatumWriter::builder(&SHARED_SCHEMA)
            .build()
            .map_err(|e| CodecError::Avro(e.to_string()))?;
        Ok(NotificationEncoder { schema_id, shared })
    }

    /// The Avro bytes of the shared fields.
    pub fn shared(&self, f: &SharedFields<'_>) -> Result<Vec<u8>, CodecError> {
        let value = Value::Record(vec![
            ("kind".into(), Value::String(f.kind.to_string())),
            ("title".into(), Value::String(f.title.to_string())),
            ("body".into(), Value::String(f.body.to_string())),
            ("link".into(), optional_string(f.link)),
            ("source_event_id".into(), Value::String(f.source_event_id.to_string())),
            ("occurred_at".into(), Value::TimestampMicros(f.occurred_at)),
            ("source_topic".into(), Value::String(f.source_topic.to_string())),
            ("source_partition".into(), Value::Int(f.source_partition)),
            ("source_offset".into(), Value::Long(f.source_offset)),
            ("data".into(), optional_string(f.data)),
            ("inbox".into(), Value::Boolean(f.inbox)),
            ("category".into(), Value::String(f.category.to_string())),
        ]);
        self.shared.write_value_to_vec(value).map_err(|e| CodecError::Avro(e.to_string()))
    }

    /// Replaces `out` with the framed record of `(id, user_id)` plus `shared` (from [`Self::shared`])
    /// and `recipients` (empty for one user's notification).
    pub fn encode_into(&self, id: &uuid::Uuid, user_id: &str, shared: &[u8], recipients: &[&str], out: &mut Vec<u8>) {
        out.clear();
        crate::wire::frame_into(self.schema_id, &[], out);
        let mut buf = uuid::Uuid::encode_buffer();
        put_string(id.hyphenated().encode_lower(&mut buf), out);
        put_string(user_id, out);
        out.extend_from_slice(shared);
        // One block with every item, then the zero count that ends an array.
        if !recipients.is_empty() {
            put_long(recipients.len() as i64, out);
            for r in recipients {
                put_string(r, out);
            }
        }
        out.push(0);
    }

    /// The framed group record of `recipients` (see `schemas/notification.avsc`).
    pub fn encode_group_into(&self, shared: &[u8], recipients: &[&str], out: &mut Vec<u8>) {
        self.encode_into(&uuid::Uuid::nil(), "", shared, recipients, out)
    }
}

/// A `["null", "string"]` union value.
fn optional_string(s: Option<&str>) -> Value {
    match s {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.to_string()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The shared-fields encoder writes exactly what apache-avro writes for the whole record.
        #[test]
        fn shared_encoding_equals_the_full_record(
            event in ".{0,40}", user in ".{0,200}", kind in "[a-z.]{1,20}", title in ".{0,300}",
            body in ".{0,3000}", link in proptest::option::of(".{0,50}"), occurred_at in any::<i64>(),
            topic in "[a-z.]{1,30}", partition in any::<i32>(), offset in any::<i64>(), schema_id in any::<u32>(),
            data in proptest::option::of(".{0,200}"), inbox in any::<bool>(), category in "[a-z]{0,12}",
            recipients in proptest::collection::vec(".{0,30}", 0..5), group in any::<bool>(),
        ) {
            // A group record (nil id, no user) or one user's notification.
            let recipients = if group { recipients } else { Vec::new() };
            let (id, user) = if group { (uuid::Uuid::nil(), String::new()) } else { (Notification::id_for(&event, &user), user) };
            let n = Notification {
                notification_id: id,
                user_id: user.clone(),
                kind: kind.clone(),
                title: title.clone(),
                body: body.clone(),
                link: link.clone(),
                source_event_id: event.clone(),
                occurred_at,
                source_topic: topic.clone(),
                source_partition: partition,
                source_offset: offset,
                data: data.clone(),
                inbox,
                category: category.clone(),
                recipients: recipients.clone(),
            };
            let full = crate::FramedEncoder::new(schema_id, &NOTIFICATION_SCHEMA).unwrap().encode(n.to_value()).unwrap();
            let enc = NotificationEncoder::new(schema_id).unwrap();
            let shared = enc.shared(&SharedFields {
                kind: &kind, title: &title, body: &body, link: link.as_deref(), source_event_id: &event,
                occurred_at, source_topic: &topic, source_partition: partition, source_offset: offset,
                data: data.as_deref(), inbox, category: &category,
            }).unwrap();
            let mut out = vec![1, 2, 3];
            let names: Vec<&str> = recipients.iter().map(String::as_str).collect();
            enc.encode_into(&n.notification_id, &user, &shared, &names, &mut out);
            prop_assert_eq!(&out, &full);
            // And the direct decoder reads it back as it was.
            prop_assert_eq!(Notification::decode_datum(&full[crate::wire::HEADER_LEN..]).unwrap(), n);
        }

        /// On any bytes (valid encodings with bytes changed, cut or appended), the direct decoder
        /// and apache-avro's generic path (read, validate, convert) accept the same and agree.
        #[test]
        fn direct_decoding_agrees_with_the_generic_path(
            title in ".{0,40}", data in proptest::option::of(".{0,40}"), offset in any::<i64>(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<usize>()), extra in proptest::collection::vec(any::<u8>(), 0..3),
            recipients in proptest::collection::vec("[a-z]{0,3}", 0..4),
        ) {
            let n = Notification {
                notification_id: Notification::id_for("e", "u"),
                user_id: "u".into(), kind: "k".into(), title, body: "b".into(), link: None,
                source_event_id: "e".into(), occurred_at: 7, source_topic: "t".into(), source_partition: 1,
                source_offset: offset, data, inbox: false, category: "orders".into(), recipients,
            };
            let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&NOTIFICATION_SCHEMA).build().unwrap();
            let mut bytes = writer.write_value_to_vec(n.to_value()).unwrap();
            for (at, b) in edits {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = b;
                }
            }
            if let Some(c) = cut {
                bytes.truncate(c % (bytes.len() + 1));
            }
            bytes.extend(extra);
            let generic = generic_decode(&bytes);
            let direct = Notification::decode_datum(&bytes).ok();
            prop_assert_eq!(direct, generic, "bytes {:?}", bytes);
        }
    }

    /// What delivery did before the direct decoder: read, validate against the schema, reject
    /// trailing bytes, convert.
    fn generic_decode(bytes: &[u8]) -> Option<Notification> {
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&NOTIFICATION_SCHEMA).build().unwrap();
        let mut rest = bytes;
        let value = reader.read_value(&mut rest).ok()?;
        if !value.validate(&NOTIFICATION_SCHEMA) || !rest.is_empty() {
            return None;
        }
        Notification::from_value(value).ok()
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(Notification::id_for("e1", "u1"), Notification::id_for("e1", "u1"));
        assert_ne!(Notification::id_for("e1", "u1"), Notification::id_for("e1", "u2"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(Notification::id_for("ab", "c"), Notification::id_for("a", "bc"));
    }

    #[test]
    fn avro_round_trip() {
        let n = Notification {
            notification_id: Notification::id_for("e", "u"),
            user_id: "u".into(),
            kind: "order.placed".into(),
            title: "t".into(),
            body: "b".into(),
            link: Some("/orders/1".into()),
            source_event_id: "e".into(),
            occurred_at: 1_700_000_000_000_000,
            source_topic: "orders".into(),
            source_partition: 3,
            source_offset: 42,
            data: None,
            inbox: true,
            category: String::new(),
            recipients: vec![],
        };
        let writer = apache_avro::writer::datum::GenericDatumWriter::builder(&NOTIFICATION_SCHEMA).build().unwrap();
        let bytes = writer.write_value_to_vec(n.to_value()).unwrap();
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(&NOTIFICATION_SCHEMA).build().unwrap();
        let back = reader.read_value(&mut &bytes[..]).unwrap();
        assert_eq!(Notification::from_value(back).unwrap(), n);
    }

    #[test]
    fn a_group_record_stands_for_each_recipients_notification() {
        let group = Notification {
            notification_id: uuid::Uuid::nil(),
            user_id: String::new(),
            kind: "coupon.campaign".into(),
            title: "t".into(),
            body: "b".into(),
            link: None,
            source_event_id: "c1".into(),
            occurred_at: 1,
            source_topic: "coupons".into(),
            source_partition: 0,
            source_offset: 9,
            data: None,
            inbox: true,
            category: String::new(),
            recipients: vec!["a".into(), "b".into()],
        };
        let mut seen = Vec::new();
        group.clone().for_each_recipient(|n| seen.push(n.clone()));
        assert_eq!(seen.len(), 2);
        for (n, user) in seen.iter().zip(["a", "b"]) {
            assert_eq!(n.user_id, user);
            assert_eq!(n.notification_id, Notification::id_for("c1", user));
            assert!(n.recipients.is_empty());
            assert_eq!((n.title.as_str(), n.source_offset), ("t", 9));
        }
        let single = Notification { recipients: vec![], user_id: "u".into(), ..group };
        let mut once = Vec::new();
        single.clone().for_each_recipient(|n| once.push(n.clone()));
        assert_eq!(once, vec![single]);
    }
}
