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
/// How many times `tidings dlq replay` re-drove the record (decimal text): set on the re-driven
/// record and carried into its next dead letter, so a record that keeps failing is quarantined.
pub const H_DLQ_REPLAY_COUNT: &str = "tidings.dlq.replay-count";
/// The original coordinates and error as Kafka Connect's dead-letter queue writes them (UTF-8
/// text), for tools that read Connect's headers.
pub const H_CONNECT_TOPIC: &str = "__connect.errors.topic";
pub const H_CONNECT_PARTITION: &str = "__connect.errors.partition";
pub const H_CONNECT_OFFSET: &str = "__connect.errors.offset";
pub const H_CONNECT_MESSAGE: &str = "__connect.errors.exception.message";
/// The original coordinates as Spring Kafka's DeadLetterPublishingRecoverer writes them: the
/// topic as UTF-8, the partition as a 4-byte and the offset as an 8-byte big-endian integer.
pub const H_SPRING_TOPIC: &str = "kafka_dlt-original-topic";
pub const H_SPRING_PARTITION: &str = "kafka_dlt-original-partition";
pub const H_SPRING_OFFSET: &str = "kafka_dlt-original-offset";
/// W3C trace context header (https://www.w3.org/TR/trace-context/).
pub const H_TRACEPARENT: &str = "traceparent";
/// Set (to `true`) by templating on delivery-only notifications (chat copies, `inbox: false`), so
/// persistence passes them by without decoding them: they are 90% of the topic in a busy chat.
pub const H_DELIVERY_ONLY: &str = "tidings.delivery-only";

/// librdkafka settings tidings fixes because correctness depends on them, with the reason given
/// when `--kafka-opt` tries to change one. Everything else may be overridden and `--kafka-opt` wins.
pub const PINNED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set the brokers with --brokers"),
    ("group.id", "each stage's consumer group comes from topology.yaml"),
    ("enable.auto.offset.store", "stages store an offset only once its work is durable"),
    ("enable.auto.commit", "each stage decides whether Kafka or the database holds its offsets"),
    ("partition.assignment.strategy", "the persistence and delivery stages rewrite their assignments"),
    ("enable.idempotence", "producer retries must not duplicate or reorder a partition"),
    ("partitioner", "users are routed to the gateway owning murmur2(user id), as Java clients place them"),
];

/// `--kafka-opt` settings that tidings refuses, every one of them at once.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct KafkaOptsError(pub Vec<String>);

/// Where the brokers are, how to reach them and any extra librdkafka settings.
#[derive(Clone)]
pub struct KafkaConfig {
    /// `host:port,...`
    pub brokers: String,
    /// Defaults for this deployment (e.g. short fetch waits for the embedded mock cluster),
    /// applied after the stage defaults and before `extra`.
    pub tuned: Vec<(String, String)>,
    /// The operator's librdkafka properties (`--kafka-opt k=v`, security flags): applied after
    /// every default, so they win; keys in [`PINNED`] are refused by [`KafkaConfig::with_opts`].
    pub extra: Vec<(String, String)>,
}

/// The operator's values stay out: `extra` holds SASL passwords.
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("tuned", &self.tuned)
            .field("extra_keys", &self.extra.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig { brokers: brokers.into(), tuned: Vec::new(), extra: Vec::new() }
    }

    /// `new` plus the operator's properties, refusing pinned and repeated keys (all reported).
    pub fn with_opts(brokers: impl Into<String>, opts: Vec<(String, String)>) -> Result<Self, KafkaOptsError> {
        let mut errors = Vec::new();
        for (i, (k, _)) in opts.iter().enumerate() {
            if let Some((_, why)) = PINNED.iter().find(|(p, _)| p == k) {
                errors.push(format!("--kafka-opt {k} is set by tidings itself ({why})"));
            } else if opts[..i].iter().any(|(e, _)| e == k) {
                errors.push(format!("--kafka-opt {k} is given twice (a security flag may set it too)"));
            }
        }
        if !errors.is_empty() {
            return Err(KafkaOptsError(errors));
        }
        Ok(KafkaConfig { extra: opts, ..KafkaConfig::new(brokers) })
    }

    /// Stage defaults first, then the deployment's, then the operator's, then the pinned ones.
    fn build(&self, defaults: &[(&str, &str)], pinned: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // Small records on loopback and LANs: Nagle plus delayed ACKs can hold a produce request
            // for 40 ms; latency matters more here than packet count.
            .set("socket.nagle.disable", "true");
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in self.tuned.iter().chain(&self.extra) {
            c.set(k, v);
        }
        for (k, v) in pinned {
            c.set(*k, *v);
        }
        c
    }

    /// An idempotent producer: retries cannot duplicate or reorder within a partition.
    pub fn producer(&self) -> ClientConfig {
        self.producer_with(&[])
    }

    /// `producer` with stage defaults (which `--kafka-opt` overrides).
    pub fn producer_with(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        // linger 1 ms: a record waits at most 1 ms for company; under load batches still fill
        // while earlier requests are in flight.
        let mut all =
            vec![("acks", "all"), ("linger.ms", "1"), ("compression.type", "none"), ("message.timeout.ms", "120000")];
        all.extend_from_slice(defaults);
        self.build(&all, &[("enable.idempotence", "true"), ("partitioner", "murmur2_random")])
    }

    /// A group consumer that stores offsets only when told to (after the work is durable), with
    /// Kafka committing the stored offsets (also on revoke, as auto-commit does) and cooperative
    /// rebalancing, so a member joining or leaving moves only the partitions that change owner.
    pub fn consumer(&self, group: &str) -> ClientConfig {
        self.consumer_with(group, &[], &[("partition.assignment.strategy", "cooperative-sticky")])
    }

    /// A group consumer with stage `defaults` (which `--kafka-opt` overrides) and stage `pinned`
    /// settings (which it may not: list their keys in [`PINNED`]), e.g. `enable.auto.commit=false`
    /// when the stage keeps its offsets elsewhere.
    pub fn consumer_with(&self, group: &str, defaults: &[(&str, &str)], pinned: &[(&str, &str)]) -> ClientConfig {
        let mut all = vec![
            ("auto.commit.interval.ms", "1000"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "false"),
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "1000"),
            ("max.poll.interval.ms", "300000"),
        ];
        all.extend_from_slice(defaults);
        let mut fixed =
            vec![("group.id", group), ("enable.auto.commit", "true"), ("enable.auto.offset.store", "false")];
        fixed.extend_from_slice(pinned);
        self.build(&all, &fixed)
    }

    /// An admin client.
    pub fn admin(&self) -> ClientConfig {
        self.build(&[], &[])
    }
}

/// Whether `key` is a header a dead letter writes (tidings', Kafka Connect's or Spring's): an
/// earlier dead letter's copy of it is dropped, not repeated.
pub fn is_dlq_header(key: &str) -> bool {
    key.starts_with("tidings.dlq.") || key.starts_with("__connect.errors.") || key.starts_with("kafka_dlt-")
}

/// Headers for a dead-lettered copy of a record: the original's own headers (unless `original` is
/// `None`), then why and where from, under tidings', Kafka Connect's and Spring's names.
/// `replay_count` is the original's [`H_DLQ_REPLAY_COUNT`], kept so re-drives stay counted.
#[allow(clippy::too_many_arguments)]
pub fn dlq_headers<H: Headers>(
    original: Option<&H>,
    replay_count: Option<&str>,
    stage: &str,
    reason: &str,
    error: &str,
    topic: &str,
    partition: i32,
    offset: i64,
) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(16);
    if let Some(orig) = original {
        for header in orig.iter() {
            if !is_dlq_header(header.key) {
                h = h.insert(Header { key: header.key, value: header.value });
            }
        }
    }
    let partition_text = partition.to_string();
    let offset_text = offset.to_string();
    h = h
        .insert(Header { key: H_DLQ_STAGE, value: Some(stage) })
        .insert(Header { key: H_DLQ_REASON, value: Some(reason) })
        .insert(Header { key: H_DLQ_ERROR, value: Some(error) })
        .insert(Header { key: H_DLQ_TOPIC, value: Some(topic) })
        .insert(Header { key: H_DLQ_PARTITION, value: Some(&partition_text) })
        .insert(Header { key: H_DLQ_OFFSET, value: Some(&offset_text) });
    if let Some(n) = replay_count {
        h = h.insert(Header { key: H_DLQ_REPLAY_COUNT, value: Some(n) });
    }
    h.insert(Header { key: H_CONNECT_TOPIC, value: Some(topic) })
        .insert(Header { key: H_CONNECT_PARTITION, value: Some(&partition_text) })
        .insert(Header { key: H_CONNECT_OFFSET, value: Some(&offset_text) })
        .insert(Header { key: H_CONNECT_MESSAGE, value: Some(error) })
        .insert(Header { key: H_SPRING_TOPIC, value: Some(topic) })
        .insert(Header { key: H_SPRING_PARTITION, value: Some(&partition.to_be_bytes()[..]) })
        .insert(Header { key: H_SPRING_OFFSET, value: Some(&offset.to_be_bytes()[..]) })
}

/// Reads a UTF-8 header value.
pub fn header_str<'a, H: Headers>(headers: &'a H, key: &str) -> Option<&'a str> {
    headers.iter().find(|h| h.key == key).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

/// Why the brokers could not be reached at startup.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The brokers refused our credentials; retrying with the same ones cannot help.
    #[error("Kafka authentication failed at {brokers}: {detail} (check the SASL mechanism, user name and password)")]
    Authentication { brokers: String, detail: String },
    /// The TLS handshake failed (wrong CA, hostname, or a plaintext listener); retrying cannot help.
    #[error("TLS to Kafka at {brokers} failed: {detail} (check security.protocol and ssl.ca.location)")]
    Tls { brokers: String, detail: String },
    /// No broker answered in time; they may be starting, so a later attempt may succeed.
    #[error("no Kafka broker at {brokers} answered within {waited:?}: {detail}")]
    Unreachable { brokers: String, waited: std::time::Duration, detail: String },
    #[error("Kafka client settings are invalid: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
}

impl ConnectError {
    pub fn is_retriable(&self) -> bool {
        matches!(self, ConnectError::Unreachable { .. })
    }
}

/// Remembers the errors librdkafka reports while the probe connects.
#[derive(Default)]
struct ProbeContext {
    fatal: std::sync::Mutex<Option<(rdkafka::types::RDKafkaErrorCode, String)>>,
    last: std::sync::Mutex<Option<String>>,
}

impl rdkafka::consumer::ConsumerContext for ProbeContext {}

impl rdkafka::ClientContext for ProbeContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode as C;
        match error.rdkafka_error_code() {
            Some(code @ (C::Authentication | C::SaslAuthenticationFailed | C::SSL)) => {
                self.fatal.lock().expect("lock").get_or_insert((code, reason.to_string()));
            }
            _ => *self.last.lock().expect("lock") = Some(reason.to_string()),
        }
    }
}

/// Connects with `cfg`'s settings (security included) and asks for metadata, so a wrong password
/// or CA fails at startup with a clear error instead of every stage retrying silently. Blocking:
/// call it from `spawn_blocking`.
pub fn probe(cfg: &KafkaConfig, timeout: std::time::Duration) -> Result<(), ConnectError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::types::RDKafkaErrorCode as C;
    let consumer: BaseConsumer<ProbeContext> = cfg.admin().create_with_context(ProbeContext::default())?;
    let started = std::time::Instant::now();
    loop {
        let attempt = consumer.fetch_metadata(None, std::time::Duration::from_millis(500));
        // Error events reach the context only while the client is polled.
        let _ = consumer.poll(std::time::Duration::ZERO);
        if let Some((code, detail)) = consumer.context().fatal.lock().expect("lock").take() {
            let brokers = cfg.brokers.clone();
            return Err(match code {
                C::SSL => ConnectError::Tls { brokers, detail },
                _ => ConnectError::Authentication { brokers, detail },
            });
        }
        match attempt {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() >= timeout => {
                let detail = consumer.context().last.lock().expect("lock").take().unwrap_or_else(|| e.to_string());
                return Err(ConnectError::Unreachable {
                    brokers: cfg.brokers.clone(),
                    waited: started.elapsed(),
                    detail,
                });
            }
            Err(_) => {}
        }
    }
}

/// How many partitions `topic` has (0 if the broker does not know it), from fresh metadata; a
/// blocking librdkafka call. Any client's: `consumer.client()`, `Producer::client(&producer)`.
pub fn partition_count<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    timeout: std::time::Duration,
) -> rdkafka::error::KafkaResult<i32> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    Ok(md.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32))
}

/// How often templating reads the partition count of `notifications` again while it runs, to
/// follow partitions added meanwhile. The gateways apply a new count only after twice this
/// ([`PARTITIONS_SETTLE`]), so every running templating routes by it before any user moves.
pub const PARTITIONS_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the gateways see a new partition count before they route users by it.
pub const PARTITIONS_SETTLE: std::time::Duration = std::time::Duration::from_secs(20);

/// Seconds from a record timestamp (ms since the epoch, e.g. its CreateTime) until now; 0 for one
/// ahead of this clock. For the latency histograms of the stages and the gateway.
pub fn age_secs(timestamp_ms: i64) -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    (now.as_millis() as i64 - timestamp_ms).max(0) as f64 / 1000.0
}

/// The partition of `user` among `partitions`, exactly as Kafka producers with the murmur2
/// partitioner (Java's default, librdkafka's `murmur2_random`) place a record keyed by it.
pub fn partition_for(user: &str, partitions: i32) -> i32 {
    let h = murmur2::murmur2(user.as_bytes(), murmur2::KAFKA_SEED);
    ((h & 0x7fff_ffff) % partitions.max(1) as u32) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_headers_carry_connect_and_spring_names_and_the_replay_count() {
        let original = OwnedHeaders::new()
            .insert(Header { key: "traceparent", value: Some("00-abc-def-01") })
            // An earlier dead letter's headers (a re-driven record): replaced, not repeated.
            .insert(Header { key: H_DLQ_REASON, value: Some("old-reason") })
            .insert(Header { key: H_DLQ_REPLAY_COUNT, value: Some("2") })
            .insert(Header { key: H_CONNECT_OFFSET, value: Some("1") })
            .insert(Header { key: H_SPRING_OFFSET, value: Some(&1i64.to_be_bytes()[..]) });
        let h =
            dlq_headers(Some(&original), Some("2"), "templating", "unknown-schema-id", "no id 7", "orders", 3, 4242);
        let all: Vec<(String, Vec<u8>)> =
            h.iter().map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec())).collect();
        let one = |k: &str| {
            let v: Vec<&Vec<u8>> = all.iter().filter(|(key, _)| key == k).map(|(_, v)| v).collect();
            assert_eq!(v.len(), 1, "{k} once in {all:?}");
            v[0].clone()
        };
        assert_eq!(one("traceparent"), b"00-abc-def-01");
        assert_eq!(one(H_DLQ_REASON), b"unknown-schema-id");
        assert_eq!(one(H_DLQ_REPLAY_COUNT), b"2");
        assert_eq!(one(H_DLQ_TOPIC), b"orders");
        assert_eq!(one(H_DLQ_PARTITION), b"3");
        assert_eq!(one(H_DLQ_OFFSET), b"4242");
        // Kafka Connect writes text.
        assert_eq!(one(H_CONNECT_TOPIC), b"orders");
        assert_eq!(one(H_CONNECT_PARTITION), b"3");
        assert_eq!(one(H_CONNECT_OFFSET), b"4242");
        assert_eq!(one(H_CONNECT_MESSAGE), b"no id 7");
        // Spring writes the partition as a 4-byte and the offset as an 8-byte big-endian integer.
        assert_eq!(one(H_SPRING_TOPIC), b"orders");
        assert_eq!(one(H_SPRING_PARTITION), [0, 0, 0, 3]);
        assert_eq!(one(H_SPRING_OFFSET), [0, 0, 0, 0, 0, 0, 0x10, 0x92]);
        // A record never re-driven has no count; a copy without the original's headers still has one.
        let fresh = dlq_headers(None::<&OwnedHeaders>, None, "persistence", "r", "e", "t", 0, 0);
        assert!(fresh.iter().all(|x| x.key != H_DLQ_REPLAY_COUNT));
        let bare = dlq_headers(None::<&OwnedHeaders>, Some("1"), "persistence", "r", "e", "t", 0, 0);
        assert_eq!(bare.iter().filter(|x| x.key == H_DLQ_REPLAY_COUNT).count(), 1);
    }

    #[test]
    fn murmur2_matches_kafka() {
        // Expected values from Apache Kafka's UtilsTest.testMurmur2 (Java's signed ints).
        let cases: [(&str, i32); 6] = [
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            ("abc", 479470107),
        ];
        for (input, want) in cases {
            assert_eq!(murmur2::murmur2(input.as_bytes(), murmur2::KAFKA_SEED) as i32, want, "{input}");
        }
        // Java: toPositive(murmur2) % n.
        assert_eq!(partition_for("foobar", 12), ((-790332482i32 & 0x7fff_ffff) % 12));
    }

    fn opts(kv: &[(&str, &str)]) -> Vec<(String, String)> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn debug_names_the_operators_keys_but_not_their_values() {
        let k = KafkaConfig::with_opts("b:9092", opts(&[("sasl.password", "hunter2"), ("linger.ms", "3")])).unwrap();
        let shown = format!("{k:?}");
        assert!(shown.contains("sasl.password") && shown.contains("b:9092"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn operator_settings_win_over_stage_and_deployment_defaults() {
        let mut k = KafkaConfig::with_opts("b:9092", opts(&[("fetch.wait.max.ms", "7"), ("linger.ms", "20")])).unwrap();
        k.tuned.push(("fetch.wait.max.ms".into(), "5".into()));
        let c = k.consumer_with("g", &[("fetch.wait.max.ms", "100")], &[("enable.auto.commit", "false")]);
        assert_eq!(c.get("fetch.wait.max.ms"), Some("7"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("group.id"), Some("g"));
        assert_eq!(k.producer().get("linger.ms"), Some("20"));
        assert_eq!(k.producer().get("partitioner"), Some("murmur2_random"));

        let mut tuned_only = KafkaConfig::new("b:9092");
        tuned_only.tuned.push(("fetch.wait.max.ms".into(), "5".into()));
        assert_eq!(
            tuned_only.consumer_with("g", &[("fetch.wait.max.ms", "100")], &[]).get("fetch.wait.max.ms"),
            Some("5")
        );
    }

    #[test]
    fn pinned_and_repeated_keys_are_refused_together() {
        let err = KafkaConfig::with_opts(
            "b:9092",
            opts(&[("group.id", "x"), ("sasl.username", "a"), ("partitioner", "random"), ("sasl.username", "b")]),
        )
        .unwrap_err();
        assert_eq!(err.0.len(), 3, "{err}");
        assert!(
            err.0[0].contains("group.id") && err.0[1].contains("partitioner") && err.0[2].contains("given twice"),
            "{err}"
        );
    }
}
