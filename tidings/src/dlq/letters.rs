//! Dead letters as read from their topic: the original record (key, value, headers) and where and
//! why it failed, read partition by partition over fixed offset ranges with no consumer group.

use std::collections::{BTreeMap, VecDeque};
use std::ops::ControlFlow;
use std::time::Duration;

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tidings_core::json_avro::avro_to_json;
use tidings_core::kafka::{
    KafkaConfig, H_DLQ_ERROR, H_DLQ_OFFSET, H_DLQ_PARTITION, H_DLQ_REASON, H_DLQ_REPLAY_COUNT, H_DLQ_STAGE,
    H_DLQ_TOPIC, H_SPRING_OFFSET, H_SPRING_PARTITION,
};
use tidings_core::RegistryClient;

/// How long a read may go without a record before the topic is reported stalled.
const STALL: Duration = Duration::from_secs(30);
const KAFKA_TIMEOUT: Duration = Duration::from_secs(15);

/// One dead letter.
#[derive(Debug, Clone)]
pub struct Letter {
    /// Where the letter is: the dead-letter topic's partition and offset.
    pub partition: i32,
    pub offset: i64,
    /// When it was dead-lettered (the letter's own timestamp), in ms since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Letter {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    pub fn reason(&self) -> Option<&str> {
        self.header(H_DLQ_REASON)
    }

    /// The topic the original record was read from.
    pub fn source_topic(&self) -> Option<&str> {
        self.header(H_DLQ_TOPIC)
    }

    pub fn source_partition(&self) -> Option<i32> {
        self.header(H_DLQ_PARTITION)?.parse().ok()
    }

    /// Re-drives so far; a count that is not a number is taken as too many (it was not written
    /// by tidings, and re-driving it could loop).
    pub fn replay_count(&self) -> u32 {
        match self.header(H_DLQ_REPLAY_COUNT) {
            None => 0,
            Some(n) => n.parse().unwrap_or(u32::MAX),
        }
    }

    /// The letter for a person: coordinates, headers, key and the value decoded through the
    /// registry when it is a framed Avro record the registry knows, else its bytes escaped.
    pub async fn describe(&self, registry: Option<&RegistryClient>) -> String {
        let when = self
            .timestamp_ms
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| "-".into());
        let mut out = format!(
            "[{}@{}] {when} {} from {}[{}]@{} by {}: {}\n",
            self.partition,
            self.offset,
            self.reason().unwrap_or("(no reason)"),
            self.source_topic().unwrap_or("?"),
            self.source_partition().map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            self.header(H_DLQ_OFFSET).unwrap_or("?"),
            self.header(H_DLQ_STAGE).unwrap_or("?"),
            self.header(H_DLQ_ERROR).unwrap_or(""),
        );
        out.push_str(&format!("  key: {}\n", self.key.as_deref().map(printable).unwrap_or_else(|| "(none)".into())));
        out.push_str("  headers:\n");
        for (k, v) in &self.headers {
            let shown = match (k.as_str(), v.as_deref()) {
                (_, None) => "(null)".to_string(),
                (H_SPRING_PARTITION, Some(b)) if b.len() == 4 => {
                    format!("{} (4-byte big-endian)", i32::from_be_bytes(b.try_into().unwrap_or_default()))
                }
                (H_SPRING_OFFSET, Some(b)) if b.len() == 8 => {
                    format!("{} (8-byte big-endian)", i64::from_be_bytes(b.try_into().unwrap_or_default()))
                }
                (_, Some(b)) => printable(b),
            };
            out.push_str(&format!("    {k}: {shown}\n"));
        }
        let value = match self.payload.as_deref() {
            None => "(none: the letter names the record's coordinates only)".to_string(),
            Some(p) => match decode(p, registry).await {
                Ok(json) => format!("(Avro, schema id {}) {json}", u32::from_be_bytes([p[1], p[2], p[3], p[4]])),
                Err(why) => format!("({why}) {}", printable(p)),
            },
        };
        out.push_str(&format!("  value: {value}"));
        out
    }
}

/// A framed Avro value as JSON, or why not.
async fn decode(p: &[u8], registry: Option<&RegistryClient>) -> Result<String, String> {
    let Some(registry) = registry else { return Err("no registry".into()) };
    if p.len() < 5 || p[0] != 0 {
        return Err("not a framed Avro record".into());
    }
    let id = u32::from_be_bytes([p[1], p[2], p[3], p[4]]);
    let schema = registry.schema_by_id(id).await.map_err(|e| format!("schema id {id}: {e}"))?;
    let value = registry.decode(p, schema).await.map_err(|e| format!("does not decode: {e}"))?;
    Ok(avro_to_json(&value).to_string())
}

/// UTF-8 text as is (control characters escaped), other bytes as hex.
fn printable(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.escape_debug().to_string(),
        Err(_) => format!("0x{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()),
    }
}

/// Which letters a command takes: every given criterion must hold. Times are absolute (ms).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filters {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    /// Physical source topic names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Filters {
    pub fn matches(&self, l: &Letter) -> bool {
        let ts = l.timestamp_ms.unwrap_or(i64::MIN);
        (self.reasons.is_empty() || l.reason().is_some_and(|r| self.reasons.iter().any(|x| x == r)))
            && (self.sources.is_empty() || l.source_topic().is_some_and(|s| self.sources.iter().any(|x| x == s)))
            && self.from_ms.is_none_or(|f| ts >= f)
            && self.to_ms.is_none_or(|t| ts < t)
            && self.key.as_ref().is_none_or(|k| l.key.as_deref() == Some(k.as_bytes()))
    }
}

/// A group id nobody shares: the readers assign partitions and commit nothing, so it never
/// appears with members or offsets.
pub fn throwaway_group() -> String {
    format!("tidings-dlq-reader-{}", uuid::Uuid::new_v4().simple())
}

/// Each partition's letters now: `[log start, end)`.
pub fn ranges(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<BTreeMap<i32, (i64, i64)>> {
    let consumer: BaseConsumer = kafka.consumer(&throwaway_group()).create()?;
    let md = consumer.fetch_metadata(Some(topic), KAFKA_TIMEOUT)?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else { bail!("no topic {topic} on the cluster") };
    if t.error().is_some() || t.partitions().is_empty() {
        bail!("topic {topic} does not exist on the cluster (run `tidings topology apply`)");
    }
    let mut out = BTreeMap::new();
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(topic, p.id(), KAFKA_TIMEOUT)
            .with_context(|| format!("watermarks of {topic}[{}]", p.id()))?;
        out.insert(p.id(), (low, high));
    }
    Ok(out)
}

/// Reads `[start, end)` of each partition of `topic`, one partition after the other, in offset order.
pub struct Reader {
    consumer: StreamConsumer,
    topic: String,
    todo: VecDeque<(i32, i64, i64)>,
    current: Option<(i32, i64)>,
}

impl Reader {
    pub fn new(kafka: &KafkaConfig, topic: &str, ranges: &BTreeMap<i32, (i64, i64)>) -> anyhow::Result<Self> {
        Ok(Reader {
            consumer: kafka.consumer(&throwaway_group()).create()?,
            topic: topic.to_string(),
            todo: ranges.iter().filter(|(_, (s, e))| s < e).map(|(p, (s, e))| (*p, *s, *e)).collect(),
            current: None,
        })
    }

    pub async fn next(&mut self) -> anyhow::Result<Option<Letter>> {
        loop {
            let (partition, end) = match self.current {
                Some(c) => c,
                None => {
                    let Some((p, start, end)) = self.todo.pop_front() else { return Ok(None) };
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition_offset(&self.topic, p, Offset::Offset(start))?;
                    self.consumer.assign(&tpl)?;
                    self.current = Some((p, end));
                    (p, end)
                }
            };
            let m = match tokio::time::timeout(STALL, self.consumer.recv()).await {
                Ok(m) => m?,
                Err(_) => bail!("no letter from {}[{partition}] for {STALL:?} before offset {end}", self.topic),
            };
            if m.partition() != partition {
                continue;
            }
            if m.offset() + 1 >= end {
                self.current = None;
            }
            if m.offset() >= end {
                continue;
            }
            let headers = m
                .headers()
                .map(|h| h.iter().map(|x| (x.key.to_string(), x.value.map(<[u8]>::to_vec))).collect())
                .unwrap_or_default();
            return Ok(Some(Letter {
                partition,
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers,
            }));
        }
    }
}

/// Calls `each` with every letter of `ranges` until it breaks.
pub async fn read(
    kafka: &KafkaConfig,
    topic: &str,
    ranges: &BTreeMap<i32, (i64, i64)>,
    mut each: impl FnMut(Letter) -> ControlFlow<()>,
) -> anyhow::Result<()> {
    let mut reader = Reader::new(kafka, topic, ranges)?;
    while let Some(l) = reader.next().await? {
        if each(l).is_break() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(reason: &str, source: &str, ts: i64, key: &str) -> Letter {
        Letter {
            partition: 0,
            offset: 0,
            timestamp_ms: Some(ts),
            key: Some(key.as_bytes().to_vec()),
            payload: None,
            headers: vec![
                (H_DLQ_REASON.into(), Some(reason.as_bytes().to_vec())),
                (H_DLQ_TOPIC.into(), Some(source.as_bytes().to_vec())),
            ],
        }
    }

    #[test]
    fn every_given_criterion_must_hold() {
        let l = letter("unknown-schema-id", "orders", 1_000, "o-1");
        assert!(Filters::default().matches(&l));
        let f = Filters { reasons: vec!["malformed-avro".into(), "unknown-schema-id".into()], ..Default::default() };
        assert!(f.matches(&l));
        assert!(!Filters { reasons: vec!["malformed-avro".into()], ..Default::default() }.matches(&l));
        assert!(!Filters { sources: vec!["chat".into()], ..Default::default() }.matches(&l));
        // --from inclusive, --to exclusive.
        assert!(Filters { from_ms: Some(1_000), to_ms: Some(1_001), ..Default::default() }.matches(&l));
        assert!(!Filters { to_ms: Some(1_000), ..Default::default() }.matches(&l));
        assert!(!Filters { key: Some("o-2".into()), ..f.clone() }.matches(&l));
        assert!(Filters { key: Some("o-1".into()), ..f }.matches(&l));
    }

    #[test]
    fn a_count_tidings_did_not_write_counts_as_too_many() {
        let mut l = letter("r", "t", 0, "k");
        assert_eq!(l.replay_count(), 0);
        l.headers.push((H_DLQ_REPLAY_COUNT.into(), Some(b"2".to_vec())));
        assert_eq!(l.replay_count(), 2);
        l.headers.retain(|(k, _)| k != H_DLQ_REPLAY_COUNT);
        l.headers.push((H_DLQ_REPLAY_COUNT.into(), Some(b"two".to_vec())));
        assert_eq!(l.replay_count(), u32::MAX);
    }
}
