//! Kafka client settings shared by every stage, the header names tidings writes, and the
//! dead-letter record builder. Every producer uses murmur2 so Java/Go producers agree on partitions.

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Header naming why a record was dead-lettered (a stable reason code, e.g. `unknown-schema-id`).
pub const H_DLQ_REASON: &str = "tidings.dlq.reason";
/// Header with the human-readable error.
pub const H_DLQ_ERROR: &str = "tidings.dlq.error";
/// Headers naming the original record's coordinates.
pub const H_DLQ_TOPIC: &str = "tidings.dlq.topic";
pub const H_DLQ_PARTITION: &str = "tidings.dlq.partition";
pub const H_DLQ_OFFSET: &str = "tidings.dlq.offset";
/// Header naming the stage that gave up on the record.
pub const H_DLQ_STAGE: &str = "tidings.dlq.stage";
/// W3C trace context header (https://www.w3.org/TR/trace-context/).
pub const H_TRACEPARENT: &str = "traceparent";

/// Where the brokers are and any extra librdkafka settings.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port,...`
    pub brokers: String,
    /// Extra librdkafka properties applied last (e.g. from `--kafka-opt k=v`).
    pub extra: Vec<(String, String)>,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig { brokers: brokers.into(), extra: Vec::new() }
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        c
    }

    fn finish(&self, mut c: ClientConfig) -> ClientConfig {
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }

    /// An idempotent producer: retries cannot duplicate or reorder within a partition.
    pub fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("compression.type", "none")
            .set("message.timeout.ms", "120000");
        self.finish(c)
    }

    /// A group consumer that stores offsets only when told to (after the work is durable).
    pub fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        c.set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("max.poll.interval.ms", "300000");
        self.finish(c)
    }

    /// An admin client.
    pub fn admin(&self) -> ClientConfig {
        self.finish(self.base())
    }
}

/// Headers for a dead-lettered copy of a record.
pub fn dlq_headers(
    original: Option<&rdkafka::message::BorrowedHeaders>,
    stage: &str,
    reason: &str,
    error: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(8);
    if let Some(orig) = original {
        for header in orig.iter() {
            if !header.key.starts_with("tidings.dlq.") {
                h = h.insert(Header { key: header.key, value: header.value });
            }
        }
    }
    let partition = partition.to_string();
    let offset = offset.to_string();
    h.insert(Header { key: H_DLQ_STAGE, value: Some(stage) })
        .insert(Header { key: H_DLQ_REASON, value: Some(reason) })
        .insert(Header { key: H_DLQ_ERROR, value: Some(error) })
        .insert(Header { key: H_DLQ_TOPIC, value: Some(topic) })
        .insert(Header { key: H_DLQ_PARTITION, value: Some(&partition) })
        .insert(Header { key: H_DLQ_OFFSET, value: Some(&offset) })
}

/// Reads a UTF-8 header value.
pub fn header_str<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.key == key).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}
