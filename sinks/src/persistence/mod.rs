//! The bulk-persistence stage: consumes `notifications` (and `chat` for room history), batches by
//! size and time, and writes each batch with its next offsets in one database transaction. The
//! database, not Kafka, holds the offsets: on assignment the consumer starts from them, so a crash
//! at any instant neither loses nor duplicates a row. Kafka commits only feed lag monitoring.
//! Records the database refuses are isolated by splitting their batch, and dead-lettered.

pub mod config;

use apache_avro::Schema;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message, OwnedMessage, Timestamp};
use rdkafka::producer::{DeliveryFuture, FutureProducer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidings_core::consumer::{StageContext, StartOffsets, StoredOffsets};
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::{header_str, H_DELIVERY_ONLY, H_TRACEPARENT};
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::stage::{acknowledged, DeadLetters, Processor, StageError, System};
use tidings_core::{DecodeError, Notification, RegistryClient};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

pub use config::{spawn, PersistenceConfig};

use tidings_store::chat::ChatChange;
use tidings_store::{Batch, ChatMessage, OffsetUpdate, Store, StoreError, StoredNotification};

/// Name used in dead-letter headers and logs.
pub const STAGE: &str = "persistence";

/// Timestamps the store accepts (years 1 to 9999, in microseconds since the Unix epoch). Anything
/// else would fail its whole batch on every retry, so such a record is dead-lettered instead.
const STORABLE_MICROS: std::ops::RangeInclusive<i64> = -62_135_596_800_000_000..=253_402_300_799_999_999;

type Tp = (String, i32);

/// The consumer's context: every assigned partition starts at the offset stored in the database.
type SinkContext = StageContext;

/// The next offsets stored in the database, read again on every assignment.
struct DbOffsets {
    store: Store,
    group: String,
    /// Last known next offsets, kept current after each commit; used when the database cannot be
    /// read during a rebalance (any stale value is older, and older only means re-reading rows
    /// that `ON CONFLICT DO NOTHING` then ignores).
    known: Arc<Mutex<HashMap<Tp, i64>>>,
    runtime: Handle,
}

impl DbOffsets {
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

impl StoredOffsets for DbOffsets {
    fn stored(&self, partitions: &[Tp]) -> HashMap<Tp, i64> {
        let mut topics: Vec<String> = partitions.iter().map(|(t, _)| t.clone()).collect();
        topics.sort();
        topics.dedup();
        if let Some(fresh) = self.fresh_offsets(&topics) {
            let mut known = self.known.lock().expect("lock");
            for (k, v) in fresh {
                let e = known.entry(k).or_insert(v);
                *e = (*e).max(v);
            }
        }
        // Anything not yet committed to the database by a revoked partition's last owner is
        // re-read from here.
        self.known.lock().expect("lock").clone()
    }
}

/// Runs the stage until `shutdown` on the shared skeleton, restarting after transient failures.
pub async fn run(cfg: PersistenceConfig, store: Store, shutdown: CancellationToken) -> Result<(), StageError> {
    tidings_core::stage::run(STAGE, &cfg.health, &shutdown, || start(&cfg, &store, &shutdown)).await
}

/// One attempt of the stage: the batch being built and what writing it needs.
struct Sink {
    cfg: PersistenceConfig,
    store: Store,
    registry: RegistryClient,
    chat_schema: Option<&'static Schema>,
    known: Arc<Mutex<HashMap<Tp, i64>>>,
    consumer: Arc<StreamConsumer<SinkContext>>,
    dead: DeadLetters,
    pending: Pending,
    shutdown: CancellationToken,
}

struct Pending {
    batch: Batch,
    /// The records that put rows in `batch`, in the order read.
    units: Vec<Unit>,
    /// Next offset per partition covered by the batch.
    next: HashMap<Tp, i64>,
    /// Dead-letter copies that must be acknowledged before the batch's offsets are stored.
    dead: Vec<DeliveryFuture>,
    started: Option<Instant>,
    records: usize,
    trace: BatchTrace,
}

/// A record that put rows in the batch: where it was read, and where its rows end in the batch's
/// vectors (they start where the previous unit's end). A refused batch is split by these, so a
/// record's rows (a group record's recipients) are stored or dead-lettered together.
#[derive(Debug, Clone, Copy)]
struct Unit {
    /// Read from the chat topic (else from the notifications topic).
    chat: bool,
    partition: i32,
    offset: i64,
    /// Lengths of `notifications`, `chat_messages` and `chat_changes` after this record's rows.
    ends: [usize; 3],
}

/// Most links one batch span carries (the SDK's default link limit); later records go unlinked.
const MAX_BATCH_LINKS: usize = 128;

/// The batch's `process {topic}` span (messaging conventions; the topic of its first record, as a
/// batch rarely mixes chat in): open from the batch's first record until it is stored, linked to
/// the context of each record (a batch has many parents, so links, as the conventions say).
/// Headers are only read while an OpenTelemetry layer records the span. No `commit` span: the
/// offsets are written in the batch's own transaction, and the Kafka commit after it only feeds
/// lag monitoring.
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

    fn start(m: &BorrowedMessage<'_>, group: &str) -> Self {
        // DEBUG, as every messaging span (see tidings_core::trace): nothing is built unless traced.
        let span = tracing::debug_span!(
            "process",
            otel.name = %format_args!("process {}", m.topic()),
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            messaging.system = tidings_core::trace::MESSAGING_SYSTEM,
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = m.topic(),
            messaging.consumer.group.name = group,
            messaging.batch.message_count = tracing::field::Empty,
            tidings.rows = tracing::field::Empty,
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
            units: Vec::new(),
            next: HashMap::new(),
            dead: Vec::new(),
            started: None,
            records: 0,
            trace: BatchTrace::none(),
        }
    }
    fn rows(&self) -> usize {
        self.batch.notifications.len() + self.batch.chat_messages.len() + self.batch.chat_changes.len()
    }

    fn ends(&self) -> [usize; 3] {
        [self.batch.notifications.len(), self.batch.chat_messages.len(), self.batch.chat_changes.len()]
    }

    /// Records the record just taken as a unit if it added rows.
    fn note(&mut self, chat: bool, partition: i32, offset: i64) {
        let ends = self.ends();
        if ends != self.units.last().map_or([0; 3], |u| u.ends) {
            self.units.push(Unit { chat, partition, offset, ends });
        }
    }

    /// The rows of `units` as a batch of their own, without offsets.
    fn part(&self, units: Range<usize>) -> Batch {
        let start = if units.start == 0 { [0; 3] } else { self.units[units.start - 1].ends };
        let end = self.units[units.end - 1].ends;
        let b = &self.batch;
        Batch {
            notifications: b.notifications[start[0]..end[0]].to_vec(),
            chat_messages: b.chat_messages[start[1]..end[1]].to_vec(),
            chat_changes: b.chat_changes[start[2]..end[2]].to_vec(),
            offsets: Vec::new(),
        }
    }
}

/// Finds the units of a refused batch that the store refuses on their own: splits `0..n` in
/// halves and `write`s each (first half first, so records stay in order), splitting again each
/// part that is refused, down to single units. `first` is the whole batch's refusal. Returns the
/// refused units with their errors, in order; every other unit was written exactly once. About
/// 2·k·log2(n) writes for k refused units. Stops at the first error that is not a refusal.
async fn isolate<E, F, Fut>(
    n: usize,
    first: E,
    refused: impl Fn(&E) -> bool,
    mut write: F,
) -> Result<Vec<(usize, E)>, E>
where
    F: FnMut(Range<usize>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let mut found = Vec::new();
    // A stack of parts still to write, each with its refusal if already known.
    let mut todo = vec![(0..n, Some(first))];
    while let Some((part, known)) = todo.pop() {
        let e = match known {
            Some(e) => e,
            None => match write(part.clone()).await {
                Ok(()) => continue,
                Err(e) if refused(&e) => e,
                Err(e) => return Err(e),
            },
        };
        match part.len() {
            // Nothing but offsets was refused: no record to blame.
            0 => return Err(e),
            1 => found.push((part.start, e)),
            len => {
                let mid = part.start + len / 2;
                todo.push((mid..part.end, None));
                todo.push((part.start..mid, None));
            }
        }
    }
    Ok(found)
}

async fn start(
    cfg: &PersistenceConfig,
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<(Sink, Arc<StreamConsumer<SinkContext>>), StageError> {
    let registry = RegistryClient::new(&cfg.registry)?;
    let chat_schema: Option<&'static Schema> = match (&cfg.chat_topic, &cfg.chat_schema) {
        (Some(_), Some(text)) => {
            let s = Schema::parse_str(text).map_err(|e| StageError::configuration(format!("chat schema: {e}")))?;
            // Leaked once per stage start so cached decoders can borrow it for 'static.
            Some(Box::leak(Box::new(s)))
        }
        (Some(_), None) => return Err(StageError::configuration("chat_topic needs chat_schema")),
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
    let offsets =
        DbOffsets { store: store.clone(), group: cfg.group.clone(), known: known.clone(), runtime: Handle::current() };
    let ctx =
        StageContext::new("persistence-consumer", StartOffsets::Stored(Box::new(offsets)), ()).with_group(&cfg.group);
    // The database holds the offsets, applied at every assignment.
    // Batches wait up to `linger` anyway, so fetches need not return per record: at 2,000 events/s
    // a fetch answered as soon as any data is there makes this consumer one of the broker's busiest
    // clients (about one request per produce), on the cores delivery shares.
    let wait = cfg.linger.as_millis().clamp(1, 100).to_string();
    // Partitions added to a topic are taken within this (librdkafka's default is 5 minutes).
    let refresh = tidings_core::kafka::PARTITIONS_REFRESH.as_millis().to_string();
    let cc = cfg.kafka.consumer_with(
        &cfg.group,
        &[
            ("fetch.min.bytes", "262144"),
            ("fetch.wait.max.ms", &wait),
            ("topic.metadata.refresh.interval.ms", &refresh),
        ],
        &[("enable.auto.commit", "false"), ("partition.assignment.strategy", "range,roundrobin")],
    );
    let cc = tidings_core::client_stats::reporting(cc);
    let consumer: Arc<StreamConsumer<SinkContext>> = Arc::new(cc.create_with_context(ctx)?);
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    let producer: FutureProducer = cfg.kafka.producer().create()?;
    info!(topics = ?topics, batch_size = cfg.batch_size, "Persistence stage consuming {topics:?} into the {} store.", store.backend());
    let sink = Sink {
        cfg: cfg.clone(),
        store: store.clone(),
        registry,
        chat_schema,
        known,
        consumer: consumer.clone(),
        dead: DeadLetters::new(producer, cfg.dead_letter.clone(), STAGE),
        pending: Pending::new(),
        shutdown: shutdown.clone(),
    };
    Ok((sink, consumer))
}

impl Processor for Sink {
    /// The batch's linger time is over.
    type Due = ();

    async fn process(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        self.take(m).await?;
        if self.pending.rows() >= self.cfg.batch_size || self.pending.records >= self.cfg.batch_size {
            self.flush(&self.shutdown.clone()).await?;
        }
        Ok(())
    }

    fn due(&mut self) -> impl std::future::Future<Output = ()> + Send {
        let deadline = self.pending.started.map(|s| s + self.cfg.linger);
        async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        }
    }

    async fn on_due(&mut self, (): ()) -> Result<(), StageError> {
        self.flush(&self.shutdown.clone()).await
    }

    async fn finish(mut self, ended: Result<(), StageError>) -> Result<(), StageError> {
        if ended.is_ok() && self.pending.records > 0 {
            // Shutdown: store what was consumed so a restart does not re-read it.
            self.flush(&CancellationToken::new()).await?;
            info!("Persistence stage stopped after storing its last batch.");
        }
        ended
    }
}

impl Sink {
    /// Adds one record to the pending batch (or dead-letters it).
    async fn take(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        let Sink { cfg, registry, chat_schema, known, pending, shutdown, .. } = self;
        let chat_schema = *chat_schema;
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
        // Templating marks delivery-only copies (the room's history has the message): passed by
        // undecoded. Only services write this topic; a bad record marked so is still counted and
        // logged by delivery (`tidings_gateway_undecodable_total`).
        let delivery_only = m.topic() == cfg.notifications_topic
            && m.headers().and_then(|h| header_str(h, H_DELIVERY_ONLY)) == Some("true");
        // Decided before the record joins the batch: a record left undecided at shutdown must not
        // advance its partition's offset (the next start reads it again).
        let decoded = match m.payload() {
            _ if delivery_only => Ok(None),
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
                Ok(v) => Ok(Some(v)),
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
            pending.trace = BatchTrace::start(m, &cfg.group);
        }
        pending.records += 1;
        pending.next.insert(key, m.offset() + 1);
        pending.trace.link(m);
        let value = match decoded {
            Ok(Some(v)) => v,
            Ok(None) => return Ok(()),
            Err((reason, error)) => return self.dead_letter(m, reason, &error).await,
        };
        if m.topic() == cfg.notifications_topic {
            match Notification::from_value(value) {
                // A delivery-only copy (a chat message to a member): the room's history has it.
                Ok(n) if !n.inbox => {}
                Ok(n) if !STORABLE_MICROS.contains(&n.occurred_at) => {
                    let error = format!("occurred_at {} is outside years 1-9999", n.occurred_at);
                    return self.dead_letter(m, "timestamp-out-of-range", &error).await;
                }
                // A group record is a row per recipient, all at this stream position.
                Ok(n) => n.for_each_recipient(|n| {
                    pending.batch.notifications.push(StoredNotification {
                        notification: n.clone(),
                        stream_partition: m.partition(),
                        stream_offset: m.offset(),
                    })
                }),
                Err(e) => return self.dead_letter(m, "malformed-avro", &e.to_string()).await,
            }
        } else if let Some(branch @ ("MessageEdited" | "MessageDeleted")) = union_branch_name(reader, &value, "payload")
        {
            let j = avro_to_json(&value);
            let s = |v: &serde_json::Value| v.as_str().map(str::to_string);
            let change = (|| {
                Some(ChatChange {
                    message_id: s(&j["payload"]["message_id"])?,
                    sender_id: s(&j["payload"]["sender_id"])?,
                    text: if branch == "MessageEdited" { Some(s(&j["payload"]["text"])?) } else { None },
                    at: j["occurred_at"].as_i64()?,
                })
            })();
            match change {
                Some(c) => pending.batch.chat_changes.push(c),
                None => return self.dead_letter(m, "missing-field", "an edit or delete lacks a required field").await,
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
                    return self.dead_letter(m, "timestamp-out-of-range", &error).await;
                }
                Some(c) => pending.batch.chat_messages.push(c),
                None => return self.dead_letter(m, "missing-field", "MessageSent lacks a required field").await,
            }
        }
        pending.note(m.topic() != cfg.notifications_topic, m.partition(), m.offset());
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        m: &BorrowedMessage<'_>,
        reason: &'static str,
        error: &str,
    ) -> Result<(), StageError> {
        let delivery = self.dead.send(m, reason, error).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
        self.pending.dead.push(delivery);
        Ok(())
    }

    /// Writes the pending batch and its offsets in one transaction, retrying while the database is
    /// unavailable (no offset advances meanwhile), then commits the offsets to Kafka for lag metrics.
    async fn flush(&mut self, shutdown: &CancellationToken) -> Result<(), StageError> {
        let Sink { cfg, store, known, consumer, pending, dead, .. } = self;
        if pending.records == 0 {
            pending.started = None;
            return Ok(());
        }
        for d in pending.dead.drain(..) {
            acknowledged(d).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
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
        if pending.trace.traced {
            span.record("tidings.rows", rows);
            span.record("messaging.batch.message_count", pending.records);
        }
        let batch = &pending.batch;
        let pending = &*pending;
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
                Err(GaveUp::ShutDown(e)) => Err(e.into()),
                // The data, not the database: store the batch without the records it refuses.
                Err(GaveUp::Failed(e)) if e.rejection().is_some() => {
                    store_around_refusals(cfg, store, dead, pending, e, shutdown).await
                }
                Err(GaveUp::Failed(e)) => Err(e.into()),
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
                tidings_core::lag::durable(&cfg.group, topic, *partition, *next);
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next));
            }
        }
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            debug!(error = %e, "Kafka offset commit (for lag monitoring only) failed.");
        }
        let notifications = pending.batch.notifications.iter().map(|n| n.notification.occurred_at);
        tidings_core::stage::Reached::Stored.observe(notifications);
        tidings_core::stage::batch(STAGE, pending.records);
        tidings_core::stage::records_out(STAGE, rows as u64);
        self.pending = Pending::new();
        Ok(())
    }
}

/// How long reading a refused record back from Kafka (to dead-letter it) may take before the
/// stage restarts and tries the batch again.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Stores a batch the database refused (`first`) record by record where needed: every part
/// without a refused record in its own transaction (see [`isolate`]), then each refused record to
/// the dead-letter topic with the refusal as its reason, then the batch's offsets alone. Until
/// those offsets are stored a crash re-reads the whole batch, and the stored parts are skipped as
/// duplicates, so nothing is lost or stored twice; the partition then moves on.
async fn store_around_refusals(
    cfg: &PersistenceConfig,
    store: &Store,
    dead: &DeadLetters,
    pending: &Pending,
    first: StoreError,
    shutdown: &CancellationToken,
) -> Result<(), StageError> {
    let records = pending.units.len();
    warn!(error = %first, records, "The database refused a batch of {records} records; storing it in parts to find the refused records.");
    let mut writes = 0usize;
    let write = |units: Range<usize>| {
        writes += 1;
        let part = pending.part(units);
        async move {
            let rows = part.notifications.len() + part.chat_messages.len() + part.chat_changes.len();
            until_done(
                shutdown,
                || format!("Storing {rows} rows of a refused batch"),
                (Duration::from_millis(500), Duration::from_secs(30)),
                || store.write_batch(&cfg.group, &part),
                StoreError::is_retriable,
            )
            .await
            .map(|_| ())
            .map_err(|g| match g {
                GaveUp::Failed(e) | GaveUp::ShutDown(e) => e,
            })
        }
    };
    let refused = isolate(records, first, |e: &StoreError| e.rejection().is_some(), write).await?;
    if !refused.is_empty() {
        let mut copies = read_back(cfg, &refused.iter().map(|(i, _)| pending.units[*i]).collect::<Vec<_>>()).await?;
        let mut deliveries = Vec::with_capacity(refused.len());
        for ((_, e), copy) in refused.iter().zip(&mut copies) {
            let reason = e.rejection().unwrap_or("db-rejected");
            deliveries.push(
                dead.send(copy, reason, &e.to_string()).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?,
            );
        }
        for d in deliveries {
            acknowledged(d).await.map_err(|e| StageError::kafka(System::DeadLetter, e))?;
        }
    }
    let offsets = Batch { offsets: pending.batch.offsets.clone(), ..Batch::default() };
    match until_done(
        shutdown,
        || "Storing the offsets of a refused batch".to_string(),
        (Duration::from_millis(500), Duration::from_secs(30)),
        || store.write_batch(&cfg.group, &offsets),
        StoreError::is_retriable,
    )
    .await
    {
        Ok(_) => {}
        Err(GaveUp::ShutDown(e) | GaveUp::Failed(e)) => return Err(e.into()),
    }
    info!(
        records,
        refused = refused.len(),
        writes,
        "Stored a refused batch in {writes} writes; its {} refused record(s) went to the dead-letter topic {}.",
        refused.len(),
        dead.topic()
    );
    Ok(())
}

/// Reads `units`' records back from Kafka for their dead-letter copies: the batch keeps only the
/// rows it decoded, and a refusal is rare enough to pay a fetch. A record no longer in the log
/// (retention) is dead-lettered as its coordinates alone.
async fn read_back(cfg: &PersistenceConfig, units: &[Unit]) -> Result<Vec<OwnedMessage>, StageError> {
    // Assigned partitions only, never subscribed: this consumer does not join the stage's group.
    let reader: StreamConsumer =
        cfg.kafka.consumer_with(&cfg.group, &[], &[("enable.auto.commit", "false")]).create()?;
    let mut out = Vec::with_capacity(units.len());
    for u in units {
        let topic = match (u.chat, &cfg.chat_topic) {
            (true, Some(chat)) => chat.as_str(),
            _ => cfg.notifications_topic.as_str(),
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, u.partition, Offset::Offset(u.offset))?;
        reader.assign(&tpl)?;
        let read = async {
            loop {
                let m = reader.recv().await?;
                if m.topic() == topic && m.partition() == u.partition && m.offset() >= u.offset {
                    return Ok::<_, KafkaError>(m.detach());
                }
            }
        };
        let m = tokio::time::timeout(READ_BACK_TIMEOUT, read).await.map_err(|_| {
            // Retriable: the restart stores the batch again and isolates the same records.
            let what = format!(
                "could not read {topic}[{}] at offset {} back within {READ_BACK_TIMEOUT:?} for its dead letter",
                u.partition, u.offset
            );
            StageError::external(System::Kafka, true, what)
        })??;
        out.push(if m.offset() == u.offset {
            m
        } else {
            OwnedMessage::new(None, None, topic.to_string(), Timestamp::NotAvailable, u.partition, u.offset, None)
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Runs `isolate` over `n` units with a writer that refuses any part holding one of `bad`.
    /// Returns what it found, the parts written successfully and the number of writes.
    async fn isolate_with(n: usize, bad: &[usize]) -> (Vec<usize>, Vec<Range<usize>>, usize) {
        let bad: BTreeSet<usize> = bad.iter().copied().collect();
        let mut stored = Vec::new();
        let mut writes = 0;
        let write = |part: Range<usize>| {
            writes += 1;
            let refused = bad.range(part.clone()).next().copied();
            if refused.is_none() {
                stored.push(part);
            }
            std::future::ready(match refused {
                Some(u) => Err(Some(u)),
                None => Ok(()),
            })
        };
        let found = isolate(n, Some(usize::MAX), Option::is_some, write).await.unwrap();
        (found.into_iter().map(|(u, _)| u).collect(), stored, writes)
    }

    #[tokio::test]
    async fn isolate_finds_exactly_the_refused_units_in_about_2k_log_n_writes() {
        for (n, bad) in [
            (1000, vec![3, 517, 998]),
            (1000, vec![0]),
            (1000, vec![999]),
            (1024, vec![511, 512]),
            (7, vec![0, 1, 2, 3, 4, 5, 6]),
            (2, vec![1]),
        ] {
            let (found, stored, writes) = isolate_with(n, &bad).await;
            assert_eq!(found, bad, "n={n}");
            // Every other unit stored exactly once, in order.
            let covered: Vec<usize> = stored.iter().flat_map(|p| p.clone()).collect();
            let expected: Vec<usize> = (0..n).filter(|u| !bad.contains(u)).collect();
            assert_eq!(covered, expected, "n={n} bad={bad:?}");
            let log2 = usize::BITS - (n - 1).leading_zeros();
            let bound = 2 * bad.len() * log2 as usize;
            assert!(writes <= bound, "n={n} bad={bad:?}: {writes} writes, bound {bound}");
        }
    }

    #[tokio::test]
    async fn isolate_blames_the_single_unit_without_writing_and_stops_on_other_errors() {
        // One unit, already refused as the whole batch: no write needed.
        let found = isolate(1, "refused", |_| true, |_| async { panic!("no write expected") }).await.unwrap();
        assert_eq!(found, vec![(0, "refused")]);
        // No unit at all: the offsets themselves were refused, which no record explains.
        assert_eq!(isolate(0, "refused", |_| true, |_| async { Ok(()) }).await.unwrap_err(), "refused");
        // An error that is not a refusal (e.g. a dropped table) ends the search.
        let mut writes = 0;
        let err = isolate(
            100,
            "refused",
            |e| *e == "refused",
            |_| {
                writes += 1;
                async { Err("undefined table") }
            },
        )
        .await
        .unwrap_err();
        assert_eq!((err, writes), ("undefined table", 1));
    }

    fn notification(user: &str, i: i64) -> StoredNotification {
        StoredNotification {
            notification: Notification {
                notification_id: Notification::id_for(&format!("ev-{i}"), user),
                user_id: user.into(),
                kind: "k".into(),
                title: "t".into(),
                body: "b".into(),
                link: None,
                source_event_id: format!("ev-{i}"),
                occurred_at: 1_700_000_000_000_000,
                source_topic: "orders".into(),
                source_partition: 0,
                source_offset: i,
                data: None,
                inbox: true,
                category: String::new(),
                recipients: vec![],
            },
            stream_partition: 0,
            stream_offset: i,
        }
    }

    /// A random user id of 10,016 characters: over the btree limit of the inbox index even
    /// compressed, so PostgreSQL refuses its row with 54000.
    fn over_long_user() -> String {
        (0..313).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect()
    }

    /// The refusal the stage splits batches on, as PostgreSQL raises it for one row, and the parts
    /// of [`Pending::part`] storing the rest of such a batch.
    #[tokio::test]
    async fn postgres_refuses_a_batch_with_an_over_long_user_id_and_its_parts_store_the_rest() {
        let (store, _) = tidings_store::testing::fresh_postgres().await.unwrap();
        let mut pending = Pending::new();
        for i in 0..5 {
            let user = if i == 3 { over_long_user() } else { format!("u{i}") };
            pending.batch.notifications.push(notification(&user, i));
            pending.note(false, 0, i);
        }
        pending.batch.offsets = vec![OffsetUpdate { topic: "notifications".into(), partition: 0, next_offset: 5 }];
        let e = store.write_batch("g", &pending.batch).await.unwrap_err();
        assert_eq!(e.rejection(), Some("db-54000-program-limit-exceeded"), "{e}");
        assert!(!e.is_retriable());
        assert_eq!(store.count_notifications().await.unwrap(), 0, "a refused batch stores nothing");
        let found = isolate(
            5,
            e,
            |e| e.rejection().is_some(),
            |part| {
                let part = pending.part(part);
                let store = store.clone();
                async move { store.write_batch("g", &part).await.map(|_| ()) }
            },
        )
        .await
        .unwrap();
        assert_eq!(found.iter().map(|(u, _)| pending.units[*u].offset).collect::<Vec<_>>(), vec![3]);
        assert_eq!(store.count_notifications().await.unwrap(), 4);
        assert!(store.load_offsets("g", "notifications").await.unwrap().is_empty(), "parts carry no offsets");
    }

    #[test]
    fn a_group_record_is_one_unit_and_records_without_rows_none() {
        let mut p = Pending::new();
        p.note(false, 0, 0); // dead-lettered or passed by: no rows
        p.batch.notifications.push(notification("a", 1));
        p.batch.notifications.push(notification("b", 1));
        p.note(false, 0, 1);
        p.batch.chat_changes.push(ChatChange { message_id: "m".into(), sender_id: "s".into(), text: None, at: 1 });
        p.note(true, 2, 7);
        assert_eq!(p.units.len(), 2);
        assert_eq!(p.part(0..1).notifications.len(), 2);
        let second = p.part(1..2);
        assert_eq!((second.notifications.len(), second.chat_changes.len()), (0, 1));
        assert_eq!(p.part(0..2).notifications.len() + p.part(0..2).chat_changes.len(), 3);
    }
}
