//! From a `notifications` record to what its streams send: the JSON body of a notification (shared
//! by the stream's `data:` and the inbox) and the delivered events of one record, one per recipient
//! for a group record.

use tidings_core::Notification;

use super::Event;

/// The JSON body of a notification, shared by the stream (`data:`) and the inbox; borrows the
/// notification, so the per-event serialization copies nothing but the output.
#[derive(serde::Serialize)]
pub struct NotificationJson<'a> {
    pub id: String,
    pub kind: &'a str,
    pub title: &'a str,
    pub body: &'a str,
    pub link: Option<&'a str>,
    /// RFC 3339, from the source event's `occurred_at`.
    pub occurred_at: Option<String>,
    pub source_event_id: &'a str,
    /// The category it was sent under (topology.yaml `categories:`); absent when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<&'a str>,
    /// The stream position `partition.offset` (the SSE id; also a Last-Event-ID to resume from).
    pub position: String,
    /// Inbox only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read: Option<bool>,
    /// The source event, for deliveries read as structured data (chat): `room_id`, `event_type`,
    /// `payload`, …
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<EventJson<'a>>,
    /// With `event`: the source event's offset on its partition, for chat a message's seq in its room.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
}

impl<'a> NotificationJson<'a> {
    pub fn new(n: &'a Notification, partition: i32, offset: i64) -> Self {
        NotificationJson {
            id: n.notification_id.hyphenated().to_string(),
            kind: &n.kind,
            title: &n.title,
            body: &n.body,
            link: n.link.as_deref(),
            occurred_at: chrono::DateTime::from_timestamp_micros(n.occurred_at)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            source_event_id: &n.source_event_id,
            category: Some(n.category.as_str()).filter(|c| !c.is_empty()),
            position: super::position_id(partition, offset),
            read: None,
            event: n.data.as_deref().and_then(EventJson::new),
            seq: n.data.as_ref().map(|_| n.source_offset),
        }
    }
}

/// A notification's `data` as JSON in the stream and the inbox. Compact JSON (what templating
/// writes) is passed through as it is: parsing it into a tree and printing it again was in about a
/// quarter of the delivery consumer's samples (`perf`) at 30,000 chat copies/s. Anything with a line break (which would end an
/// SSE `data:` line) is re-printed compactly; anything that is not JSON is left out.
#[derive(Debug)]
pub enum EventJson<'a> {
    Raw(&'a serde_json::value::RawValue),
    Tree(serde_json::Value),
}

impl<'a> EventJson<'a> {
    fn new(data: &'a str) -> Option<Self> {
        if data.bytes().any(|b| b == b'\n' || b == b'\r') {
            return serde_json::from_str(data).ok().map(EventJson::Tree);
        }
        serde_json::from_str(data).ok().map(EventJson::Raw)
    }
}

impl serde::Serialize for EventJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EventJson::Raw(r) => r.serialize(s),
            EventJson::Tree(v) => v.serialize(s),
        }
    }
}

/// The delivered form of a notification at a stream position.
pub fn event_from_notification(partition: i32, offset: i64, n: &Notification, timestamp_ms: i64) -> Event {
    let mut data = serde_json::to_vec(&NotificationJson::new(n, partition, offset)).expect("notification serializes");
    // The vector grew by doubling; rings and queues account by length, so hold no more than that.
    data.shrink_to_fit();
    Event::new(partition, offset, n.notification_id.as_u128(), &n.user_id, &n.kind, data.into(), timestamp_ms)
}

/// The delivered forms of one record: its event, or for a group record one per recipient, all at
/// its position. A group's JSON is printed once: its recipients' bodies differ only in the id,
/// which comes first and is spliced in per recipient (10,000 recipients, one serialization).
pub fn events_from_record(partition: i32, offset: i64, mut n: Notification, timestamp_ms: i64) -> Vec<Event> {
    if n.recipients.is_empty() {
        return vec![event_from_notification(partition, offset, &n, timestamp_ms)];
    }
    let recipients = std::mem::take(&mut n.recipients);
    n.notification_id = uuid::Uuid::nil();
    let template = serde_json::to_vec(&NotificationJson::new(&n, partition, offset)).expect("notification serializes");
    const PREFIX: &[u8] = br#"{"id":""#;
    let id_len = uuid::fmt::Hyphenated::LENGTH;
    assert!(template.starts_with(PREFIX) && template.len() > PREFIX.len() + id_len, "`id` leads NotificationJson");
    let rest = &template[PREFIX.len() + id_len..];
    let mut buf = uuid::Uuid::encode_buffer();
    recipients
        .into_iter()
        .map(|user| {
            let id = Notification::id_for(&n.source_event_id, &user);
            let mut data = Vec::with_capacity(template.len());
            data.extend_from_slice(PREFIX);
            data.extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
            data.extend_from_slice(rest);
            Event::new(partition, offset, id.as_u128(), &user, &n.kind, data.into(), timestamp_ms)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn with_data(data: Option<&str>) -> Notification {
        Notification {
            notification_id: uuid::Uuid::from_u128(7),
            user_id: "u".into(),
            kind: "chat.message".into(),
            title: "t".into(),
            body: "b".into(),
            link: None,
            occurred_at: 0,
            source_event_id: "e".into(),
            source_topic: "chat".into(),
            source_partition: 0,
            source_offset: 3,
            data: data.map(str::to_string),
            inbox: false,
            category: String::new(),
            recipients: vec![],
        }
    }

    fn json_of(n: &Notification) -> serde_json::Value {
        serde_json::from_slice(&event_from_notification(0, 9, n, 0).data).unwrap()
    }

    #[test]
    fn a_group_records_events_are_each_recipients_own() {
        let mut group = with_data(Some(r#"{"room_id":"r1"}"#));
        group.notification_id = uuid::Uuid::nil();
        group.user_id = String::new();
        group.recipients = vec!["ann".into(), "bo".into(), "ann".into()];
        let events = events_from_record(3, 42, group.clone(), 7);
        let mut expected = Vec::new();
        group.for_each_recipient(|n| expected.push(event_from_notification(3, 42, n, 7)));
        assert_eq!(events.len(), 3);
        for (got, want) in events.iter().zip(&expected) {
            assert_eq!(
                (&got.user, got.id, &got.data, got.offset, got.timestamp_ms),
                (&want.user, want.id, &want.data, 42, 7)
            );
        }
        let bo: serde_json::Value = serde_json::from_slice(&events[1].data).unwrap();
        assert_eq!(bo["id"], Notification::id_for("e", "bo").to_string());
        assert_eq!((bo["position"].as_str(), bo["event"]["room_id"].as_str()), (Some("3.42"), Some("r1")));
    }

    #[test]
    fn compact_data_is_passed_through_and_anything_else_is_made_safe() {
        let compact = r#"{"room_id":"r1","payload":{"text":"a\nb","n":[1,2]}}"#;
        let ev = event_from_notification(0, 9, &with_data(Some(compact)), 0);
        let text = std::str::from_utf8(&ev.data).unwrap();
        assert!(text.contains(&format!(r#""event":{compact}"#)), "{text}");
        assert_eq!(json_of(&with_data(Some(compact)))["seq"], 3);

        // A line break between tokens would end the SSE `data:` line: printed again, compactly.
        let spaced = "{\n  \"room_id\": \"r1\"\n}";
        let ev = event_from_notification(0, 9, &with_data(Some(spaced)), 0);
        assert!(!ev.data.contains(&b'\n'));
        assert_eq!(json_of(&with_data(Some(spaced)))["event"]["room_id"], "r1");

        // Not JSON: left out, the rest of the notification still delivered.
        let v = json_of(&with_data(Some("{not json")));
        assert!(v.get("event").is_none() && v["title"] == "t", "{v}");
        assert!(json_of(&with_data(None)).get("event").is_none());
    }
}
