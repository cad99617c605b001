//! The bulk-persistence stage: consumes `notifications` (and `chat` for room history), batches by
//! size and time, and writes each batch with its next offsets in one database transaction. The
//! database, not Kafka, holds the offsets: on assignment the consumer starts from them, so a crash
//! at any instant neither loses nor duplicates a row. Kafka commits only feed lag monitoring.

pub mod config;

use apache_avro::Schema;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::{dlq_headers, header_str, H_TRACEPARENT};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::{DecodeError, Notification, RegistryClient};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

pub use config::PersistenceConfig;

use crate::store::{Batch, ChatMessage, OffsetUpdate, StoredNotification};
use crate::{Store, StoreError};

/// Name used in dead-letter headers and logs.
pub const STAGE: &str = "persistence";

/// Timestamps the store accepts (years 1 to 9999, in microseconds since the Unix epoch). Anything
/// else would fail its whole batch on every retry, so such a record is dead-lettered instead.
const STORABLE_MICROS: std::ops::RangeInclusive<i64> = -62_135_596_800_000_000..=253_402_300_799_999_999;

/// Errors that stop the stage.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("dead-letter delivery failed: {0}")]
    DeadLetter(String),
    #[error("configuration: {0}")]
    Config(String),
}

impl PersistError {
    pub fn is_retriable(&self) -> bool {
        match self {
            PersistError::Kafka(_) | PersistError::DeadLetter(_) => true,
            PersistError::Store(e) => e.is_retriable(),
            PersistError::Config(_) => false,
        }
    }
}

type Tp = (String, i32);

/// Consumer context that starts every assigned partition at the offset stored in the database.
struct SinkContext {
    store: Store,
    group: String,
    /// Last known next offsets, kept current after each commit; used when the database cannot be
    /// read during a rebalance (any stale value is older, and older only means re-reading rows
    /// that `ON CONFLICT DO NOTHING` then ignores).
    known: Arc<Mutex<HashMap<Tp, i64>>>,
    runtime: Handle,
}

impl ClientContext for SinkContext {}

impl SinkContext {
    fn fresh_offsets(&self, topics: &[String]) -> Option<HashMap<Tp, i64>> {
        // The rebalance callback runs inside `recv()` on a runtime worker; `block_in_place` lets
        // it wait for the database without stalling other tasks. Not possible on a
        // current-thread runtime, where the cache is used instead.
        if self.runtime.runtime_flavor() != RuntimeFlavor::MultiThread {
            return None;
        }
        tokio::task::block_in_place(|| {
            self.runtime.block_on(async {
                let mut all = HashMap::new();
                for t in topics {
                    let got =
                        tokio::time::timeout(Duration::from_secs(5), self.store.load_offsets(&self.group, t)).await;
                    match got {
                        Ok(Ok(m)) => all.extend(m.into_iter().map(|(p, o)| ((t.clone(), p), o))),
                        Ok(Err(e)) => {
                            warn!(error = %e, "Could not read stored offsets during rebalance; using the cached ones.");
                            return None;
                        }
                        Err(_) => {
                            warn!("Reading stored offsets timed out during rebalance; using the cached ones.");
                            return None;
                        }
                    }
                }
                Some(all)
            })
        })
    }
}

impl ConsumerContext for SinkContext {
    // Eager rebalancing only (the default assignors): the assignment is rewritten with the
    // database offsets and applied with `assign`, which is what cooperative protocols forbid.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let topics: Vec<String> = {
                    let mut t: Vec<String> = tpl.elements().iter().map(|e| e.topic().to_string()).collect();
                    t.sort();
                    t.dedup();
                    t
                };
                if let Some(fresh) = self.fresh_offsets(&topics) {
                    let mut known = self.known.lock().expect("lock");
                    for (k, v) in fresh {
                        let e = known.entry(k).or_insert(v);
                        *e = (*e).max(v);
                    }
                }
                let known = self.known.lock().expect("lock").clone();
                let mut assigned = Vec::new();
                for e in tpl.elements() {
                    let key = (e.topic().to_string(), e.partition());
                    assigned.push((key.clone(), known.get(&key).copied()));
                }
                for ((topic, partition), next) in &assigned {
                    let offset = match next {
                        Some(o) => Offset::Offset(*o),
                        None => Offset::Beginning,
                    };
                    if let Err(e) = tpl.set_partition_offset(topic, *partition, offset) {
                        error!(error = %e, "Could not set the start offset of {topic}[{partition}].");
                    }
                }
                info!(
                    partitions = assigned.len(),
                    "Assigned {} partition(s); starting each at its offset stored in the database.",
                    assigned.len()
                );
                if let Err(e) = consumer.assign(tpl) {
                    error!(error = %e, "Assigning partitions failed.");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(
                    partitions = tpl.count(),
                    "Partitions revoked; anything not yet committed to the database is re-read by their next owner."
                );
                if let Err(e) = consumer.unassign() {
                    error!(error = %e, "Unassigning partitions failed.");
                }
            }
            other => {
                error!(error = ?other, "Rebalance error; keeping the current assignment.");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Runs the stage until `shutdown`, restarting after transient failures.
pub async fn run(cfg: PersistenceConfig, store: Store, shutdown: CancellationToken) -> Result<(), PersistError> {
    tidings_core::shutdown::restart_on_transient(
        "Persistence",
        &cfg.health,
        &shutdown,
        || run_once(&cfg, &store, &shutdown),
        PersistError::is_retriable,
    )
    .await
}

struct Pending {
    batch: Batch,
    /// Next offset per partition covered by the batch.
    next: HashMap<Tp, i64>,
    /// Dead-letter copies that must be acknowledged before the batch's offsets are stored.
    dead: Vec<DeliveryFuture>,
    started: Option<Instant>,
    records: usize,
    trace: BatchTrace,
}

/// Most links one batch span carries (the SDK's default link limit); later records go unlinked.
const MAX_BATCH_LINKS: usize = 128;

/// The `persistence.batch` span: open from the batch's first record until it is stored, linked
/// to the trace of each record (notifications are many traces' children, so links, not a parent).
/// Headers are only read while an OpenTelemetry layer records the span.
struct BatchTrace {
    span: tracing::Span,
    traced: bool,
    links: usize,
    /// The last linked traceparent: a fan-out's notifications share one, linked once.
    last: Vec<u8>,
}

impl BatchTrace {
    fn none() -> Self {
        BatchTrace { span: tracing::Span::none(), traced: false, links: 0, last: Vec::new() }
    }

    fn start() -> Self {
        let span = tracing::info_span!(
            "persistence.batch",
            rows = tracing::field::Empty,
            otel.status_code = tracing::field::Empty
        );
        let traced = tidings_core::trace::is_traced(&span);
        BatchTrace { span, traced, links: 0, last: Vec::new() }
    }

    fn link(&mut self, m: &BorrowedMessage<'_>) {
        if !self.traced || self.links >= MAX_BATCH_LINKS {
            return;
        }
        let Some(headers) = m.headers() else { return };
        let Some(tp) = header_str(headers, H_TRACEPARENT) else { return };
        if tp.as_bytes() == self.last.as_slice() {
            return;
        }
        self.last.clear();
        self.last.extend_from_slice(tp.as_bytes());
        tidings_core::trace::add_span_link(&self.span, &tidings_core::trace::extract_context(headers));
        self.links += 1;
    }
}

impl Pending {
    fn new() -> Self {
        Pending {
            batch: Batch::default(),
            next: HashMap::new(),
            dead: Vec::new(),
            started: None,
            records: 0,
            trace: BatchTrace::none(),
        }
    }
    fn rows(&self) -> usize {
        self.batch.notifications.len() + self.batch.chat_messages.len()
    }
}

async fn run_once(cfg: &PersistenceConfig, store: &Store, shutdown: &CancellationToken) -> Result<(), PersistError> {
    let registry = RegistryClient::new(&cfg.registry).map_err(|e| PersistError::Config(e.to_string()))?;
    let chat_schema: Option<&'static Schema> = match (&cfg.chat_topic, &cfg.chat_schema) {
        (Some(_), Some(text)) => {
            let s = Schema::parse_str(text).map_err(|e| PersistError::Config(format!("chat schema: {e}")))?;
            // Leaked once per stage start so cached decoders can borrow it for 'static.
            Some(Box::leak(Box::new(s)))
        }
        (Some(_), None) => return Err(PersistError::Config("chat_topic needs chat_schema".into())),
        _ => None,
    };
    let mut topics = vec![cfg.notifications_topic.clone()];
    topics.extend(cfg.chat_topic.clone());

    let known = Arc::new(Mutex::new(HashMap::new()));
    for t in &topics {
        for (p, o) in store.load_offsets(&cfg.group, t).await? {
            known.lock().expect("lock").insert((t.clone(), p), o);
        }
    }
    let ctx = SinkContext {
        store: store.clone(),
        group: cfg.group.clone(),
        known: known.clone(),
        runtime: Handle::current(),
    };
    // The database holds the offsets; eager assignors, because `rebalance` rewrites the assignment.
    let cc = cfg.kafka.consumer_with(
        &cfg.group,
        &[],
        &[("enable.auto.commit", "false"), ("partition.assignment.strategy", "range,roundrobin")],
    );
    let consumer: StreamConsumer<SinkContext> = cc.create_with_context(ctx)?;
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    let producer: FutureProducer = cfg.kafka.producer().create()?;
    info!(topics = ?topics, batch_size = cfg.batch_size, "Persistence stage consuming {topics:?} into the {} store.", store.backend());

    let mut pending = Pending::new();
    let linger = cfg.linger;
    let result = loop {
        let deadline = pending.started.map(|s| s + linger);
        let flush_due = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d.into()).await, None => std::future::pending().await } } => true,
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    if let Err(e) = take(&m, &mut pending, &known, &registry, chat_schema, cfg, &producer, shutdown).await {
                        break Err(e);
                    }
                    pending.rows() >= cfg.batch_size || pending.records >= cfg.batch_size
                }
                Err(e) => {
                    warn!(error = %e, "Kafka consumer error; continuing.");
                    false
                }
            },
        };
        if flush_due {
            if let Err(e) = flush(&mut pending, store, cfg, &known, &consumer, shutdown).await {
                break Err(e);
            }
        }
    };
    if result.is_ok() && pending.records > 0 {
        // Shutdown: store what was consumed so a restart does not re-read it.
        flush(&mut pending, store, cfg, &known, &consumer, &CancellationToken::new()).await?;
        info!("Persistence stage stopped after storing its last batch.");
    }
    result
}

/// Adds one record to the pending batch (or dead-letters it).
#[allow(clippy::too_many_arguments)]
async fn take(
    m: &BorrowedMessage<'_>,
    pending: &mut Pending,
    known: &Mutex<HashMap<Tp, i64>>,
    registry: &RegistryClient,
    chat_schema: Option<&'static Schema>,
    cfg: &PersistenceConfig,
    producer: &FutureProducer,
    shutdown: &CancellationToken,
) -> Result<(), PersistError> {
    let key = (m.topic().to_string(), m.partition());
    // Records below the stored offset were written already (fetched before the assignment applied).
    if let Some(&stored) = known.lock().expect("lock").get(&key) {
        if m.offset() < stored && !pending.next.contains_key(&key) {
            return Ok(());
        }
    }
    let reader = if m.topic() == cfg.notifications_topic {
        &*NOTIFICATION_SCHEMA
    } else {
        chat_schema.unwrap_or(&NOTIFICATION_SCHEMA)
    };
    // Decided before the record joins the batch: a record left undecided at shutdown must not
    // advance its partition's offset (the next start reads it again).
    let decoded =
        match m.payload() {
            None => Err(("empty-payload", "record has no value".to_string())),
            // The registry being down, or refusing us, says nothing about the record: retried.
            Some(payload) => match until_done(
                shutdown,
                || "Decoding through the schema registry".to_string(),
                (Duration::from_millis(200), Duration::from_secs(30)),
                || registry.decode(payload, reader),
                DecodeError::is_retriable,
            )
            .await
            {
                Ok(v) => Ok(v),
                Err(GaveUp::Failed(e)) => Err((e.reason_code(), e.to_string())),
                Err(GaveUp::ShutDown(_)) => {
                    info!(topic = m.topic(), partition = m.partition(), offset = m.offset(),
                    "Stopping while the schema registry is unavailable; this record is read again on the next start.");
                    return Ok(());
                }
            },
        };
    if pending.started.is_none() {
        pending.started = Some(Instant::now());
        pending.trace = BatchTrace::start();
    }
    pending.records += 1;
    pending.next.insert(key, m.offset() + 1);
    pending.trace.link(m);
    let value = match decoded {
        Ok(v) => v,
        Err((reason, error)) => return dead_letter(m, pending, reason, &error, cfg, producer).await,
    };
    if m.topic() == cfg.notifications_topic {
        match Notification::from_value(value) {
            Ok(n) if !STORABLE_MICROS.contains(&n.occurred_at) => {
                let error = format!("occurred_at {} is outside years 1-9999", n.occurred_at);
                return dead_letter(m, pending, "timestamp-out-of-range", &error, cfg, producer).await;
            }
            Ok(n) => pending.batch.notifications.push(StoredNotification {
                notification: n,
                stream_partition: m.partition(),
                stream_offset: m.offset(),
            }),
            Err(e) => return dead_letter(m, pending, "malformed-avro", &e.to_string(), cfg, producer).await,
        }
    } else if union_branch_name(reader, &value, "payload") == Some("MessageSent") {
        let j = avro_to_json(&value);
        let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
        let msg = (|| {
            Some(ChatMessage {
                message_id: s(&j["payload"]["message_id"])?,
                room_id: s(&j["room_id"])?,
                sender_id: s(&j["payload"]["sender_id"])?,
                text: s(&j["payload"]["text"])?,
                occurred_at: j["occurred_at"].as_i64()?,
                source_partition: m.partition(),
                source_offset: m.offset(),
            })
        })();
        match msg {
            Some(c) if !STORABLE_MICROS.contains(&c.occurred_at) => {
                let error = format!("occurred_at {} is outside years 1-9999", c.occurred_at);
                return dead_letter(m, pending, "timestamp-out-of-range", &error, cfg, producer).await;
            }
            Some(c) => pending.batch.chat_messages.push(c),
            None => {
                return dead_letter(m, pending, "missing-field", "MessageSent lacks a required field", cfg, producer)
                    .await
            }
        }
    }
    Ok(())
}

async fn dead_letter(
    m: &BorrowedMessage<'_>,
    pending: &mut Pending,
    reason: &str,
    error: &str,
    cfg: &PersistenceConfig,
    producer: &FutureProducer,
) -> Result<(), PersistError> {
    warn!(
        reason,
        topic = m.topic(),
        partition = m.partition(),
        offset = m.offset(),
        "Record sent to the dead-letter topic {}: {error}",
        cfg.dead_letter
    );
    let headers = dlq_headers(m.headers(), STAGE, reason, error, m.topic(), m.partition(), m.offset());
    let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&cfg.dead_letter).headers(headers);
    if let Some(p) = m.payload() {
        rec = rec.payload(p);
    }
    if let Some(k) = m.key() {
        rec = rec.key(k);
    }
    let d = producer.send_result(rec).map_err(|(e, _)| PersistError::Kafka(e))?;
    pending.dead.push(d);
    Ok(())
}

/// Writes the pending batch and its offsets in one transaction, retrying while the database is
/// unavailable (no offset advances meanwhile), then commits the offsets to Kafka for lag metrics.
async fn flush(
    pending: &mut Pending,
    store: &Store,
    cfg: &PersistenceConfig,
    known: &Mutex<HashMap<Tp, i64>>,
    consumer: &StreamConsumer<SinkContext>,
    shutdown: &CancellationToken,
) -> Result<(), PersistError> {
    if pending.records == 0 {
        pending.started = None;
        return Ok(());
    }
    for d in pending.dead.drain(..) {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(PersistError::DeadLetter(e.to_string())),
            Err(_) => return Err(PersistError::DeadLetter("producer dropped the delivery".into())),
        }
    }
    pending.batch.offsets = pending
        .next
        .iter()
        .map(|((topic, partition), next)| OffsetUpdate {
            topic: topic.clone(),
            partition: *partition,
            next_offset: *next,
        })
        .collect();
    let rows = pending.rows();
    let span = pending.trace.span.clone();
    span.record("rows", rows);
    let batch = &pending.batch;
    let write = async {
        let started = Instant::now();
        // No offset advances until the batch is stored: they are written with it.
        match until_done(
            shutdown,
            || format!("Storing a batch of {rows} rows"),
            (Duration::from_millis(500), Duration::from_secs(30)),
            || store.write_batch(&cfg.group, batch),
            StoreError::is_retriable,
        )
        .await
        {
            Ok(stats) => {
                debug!(
                    rows,
                    inserted = stats.notifications_inserted + stats.chat_inserted,
                    took_ms = started.elapsed().as_millis() as u64,
                    "Stored a batch."
                );
                Ok(())
            }
            Err(GaveUp::ShutDown(e)) => Err(PersistError::Store(e)),
            Err(GaveUp::Failed(e)) => Err(PersistError::from(e)),
        }
    };
    if let Err(e) = write.instrument(span.clone()).await {
        span.record("otel.status_code", "ERROR");
        return Err(e);
    }
    let mut tpl = TopicPartitionList::new();
    {
        let mut k = known.lock().expect("lock");
        for ((topic, partition), next) in &pending.next {
            k.insert((topic.clone(), *partition), *next);
            let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        debug!(error = %e, "Kafka offset commit (for lag monitoring only) failed.");
    }
    *pending = Pending::new();
    Ok(())
}
