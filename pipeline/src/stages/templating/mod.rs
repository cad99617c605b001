//! The templating stage: consumes the domain topics, decodes each event through the registry,
//! resolves its recipients, renders a notification per recipient and produces them keyed by user.
//! Offsets are stored only once every output of an event (or its dead-letter copy) is acknowledged,
//! in order, so a crash replays rather than loses; replays are harmless because notification ids
//! are deterministic.

pub mod audience;
pub mod campaigns;
pub mod config;
pub mod partitions;
pub mod quiet;
pub mod render;
pub mod rooms;

use apache_avro::Schema;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde_json::Value as Json;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidings_core::client_stats::{reporting, ClientStats};
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::{header_str, KafkaConfig, H_DELIVERY_ONLY, H_TRACEPARENT};
use tidings_core::notification::NOTIFICATION_SCHEMA_JSON;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::stage::{acknowledged, enqueue, unproducible, DeadCopy, DeadLetters, Processor, StageError, System};
use tidings_core::{
    trace, DecodeError, Notification, NotificationEncoder, RegistryClient, RegistryEndpoint, SharedFields,
};
use tidings_store::campaign_progress::CampaignProgress;
use tidings_store::Store;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::topology::{Recipients, Topology};
pub use config::spawn;
pub use render::Rendered;
use render::{Audience, RenderError, Renderer};
use rooms::{RoomCache, TemplatingContext, MAX_CACHED_ROOMS};

/// Name used in dead-letter headers and logs.
pub const STAGE: &str = "templating";

/// What the stage needs to run.
#[derive(Clone)]
pub struct TemplatingConfig {
    pub kafka: KafkaConfig,
    pub registry: RegistryEndpoint,
    pub topology: Arc<Topology>,
    /// Up while the stage runs (not while it waits to restart); for `/readyz`.
    pub health: tidings_core::shutdown::StageHealth,
}

/// Outputs of one input record (or of one page of its audience), awaiting acknowledgement before
/// its offset may be stored.
struct InFlight {
    /// The input record: its coordinates, and what its dead letter copies if an output is refused.
    input: Arc<OwnedMessage>,
    /// The record's last outputs: once they are acknowledged, its offset is stored.
    last: bool,
    deliveries: Vec<DeliveryFuture>,
    /// The record's dead-letter copy, if it has one.
    dead: Option<DeadLetter>,
    /// A campaign's progress, written once these outputs (and all before them) are acknowledged.
    checkpoint: Option<CampaignProgress>,
    _permits: Option<OwnedSemaphorePermit>,
}

/// A dead letter on its way, with what it takes to send a smaller copy if the topic refuses it.
struct DeadLetter {
    delivery: DeliveryFuture,
    reason: &'static str,
    error: String,
    copy: DeadCopy,
}

/// Runs the stage until `shutdown` on the shared skeleton, restarting it after transient failures
/// (broker or registry outages) with a capped backoff.
pub async fn run(cfg: TemplatingConfig, store: Store, shutdown: CancellationToken) -> Result<(), StageError> {
    tidings_core::stage::run(STAGE, &cfg.health, &shutdown, || start(&cfg, &store, &shutdown)).await
}

/// The per-event work of the stage without Kafka: decode through the registry, track chat
/// membership, resolve recipients, render, build and encode notifications. The stage and the
/// templating benchmark both drive this.
pub struct Templater {
    topology: Arc<Topology>,
    registry: RegistryClient,
    store: Store,
    renderer: Renderer,
    readers: HashMap<String, &'static Schema>,
    encoder: NotificationEncoder,
    /// Partitions of the output topic, when known: a shared text's recipients on one partition
    /// then go out as one group record ([`Templater::group_by_partition`]).
    output_partitions: Option<i32>,
    /// Room members as last read from the store. A room's events arrive in order on its partition
    /// and the chat API changes membership in the store before it produces the event, so a room's
    /// entry is dropped whenever one of its membership events passes, and a message reads the store
    /// only when its room changed since the last one (not once per message). Entries also expire
    /// and are dropped when their partition moves (see [`RoomCache`]).
    rooms: Arc<RoomCache>,
    /// The full name of the scheduled topic, if the topology declares it; without it nothing is
    /// held (quiet hours and `send_at` are not applied).
    scheduled: Option<String>,
    /// Logical input topics carrying campaign events (schema `tidings.campaigns.CampaignEvent`).
    campaign_topics: HashSet<String>,
}

/// Chat events after which a room's members are read from the store again.
const MEMBERSHIP_EVENTS: [&str; 4] = ["RoomCreated", "MemberJoined", "MemberLeft", "RoomClosed"];

/// One consumed record as the templater sees it.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub payload: Option<&'a [u8]>,
}

/// What the record's metadata says beyond its coordinates.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecordMeta {
    /// The record's timestamp in microseconds since the epoch: the instant quiet hours and a
    /// campaign's `send_at` are judged at (the event's `occurred_at` when the record has none).
    pub timestamp: Option<i64>,
    /// The scheduler released it (header `tidings.released-at`): it is not held again.
    pub released: bool,
}

/// Header of a record on the scheduled topic: when to release it (decimal microseconds since the epoch).
pub const H_RELEASE_AT: &str = "tidings.release-at";
/// Header of a record on the scheduled topic: the full topic name to release it to.
pub const H_RELEASE_TO: &str = "tidings.release-to";
/// Header of a record on the scheduled topic: its deterministic id (notification id or event id).
pub const H_RELEASE_ID: &str = "tidings.release-id";
/// Header the scheduler adds to a record it released (so it is not held again).
pub const H_RELEASED_AT: &str = "tidings.released-at";

/// The outcome of one record: notifications to produce, or why it goes to the dead-letter topic.
#[derive(Debug)]
pub enum Outcome {
    Notifications(Fanout),
    Dead {
        reason: &'static str,
        error: String,
    },
    /// A campaign's launch record goes to the dead-letter topic (on its first page or a later
    /// one); once the dead letter is acknowledged, `checkpoint` records the campaign finished with
    /// the reason, so it shows `failed` rather than `sending` for ever.
    CampaignFailed {
        reason: &'static str,
        error: String,
        checkpoint: CampaignProgress,
    },
}

/// The notifications of one event, one per recipient. They share the event's coordinates and,
/// unless a text mentions `recipient`, one rendered text, so nothing is copied per recipient and
/// a shared text is encoded once ([`Templater::encode_each`]).
#[derive(Debug, Default)]
pub struct Fanout {
    pub event_id: String,
    pub occurred_at: i64,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub recipients: Vec<String>,
    /// One text for every recipient, or one per recipient (same order).
    pub texts: Vec<Rendered>,
    /// Set when `recipients` is one page of an audience with more after it.
    pub rest: Option<Rest>,
    /// Not empty: these recipients are inside their quiet hours. Each one's notification goes,
    /// keyed by user, to the scheduled topic, released at the time given here (same order).
    pub hold: Vec<i64>,
    /// More outputs of the same page (another locale's text, the held recipients), produced
    /// before the next page is read.
    pub siblings: Vec<Fanout>,
    /// A campaign's progress once this page is acknowledged (moves to the page's last sibling).
    pub checkpoint: Option<CampaignProgress>,
    /// Set instead of notifications: the input record itself is held on the scheduled topic.
    pub schedule: Option<Schedule>,
}

/// What is left of an audience after a page.
#[derive(Debug)]
pub enum Rest {
    Segment(SegmentRest),
    Campaign(Box<campaigns::CampaignRest>),
}

/// The input record held whole on the scheduled topic (a campaign whose `send_at` is later).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub key: String,
    pub release_at: i64,
    pub release_to: String,
    pub release_id: String,
}

/// Recipients of a segment audience are read this many at a time, so a campaign to 100,000 users
/// never holds its whole audience (or all its notifications) in memory.
pub const SEGMENT_PAGE: u32 = 5_000;

/// The rest of a segment audience: where its next page starts and what renders its texts.
#[derive(Debug)]
pub struct SegmentRest {
    segment: String,
    /// The segment's version the first page was read from: every page reads it, so a replace
    /// during the fan-out reaches no one of this event (the whole audience is the old one).
    version: i64,
    after: String,
    logical: String,
    event: String,
    json: Json,
    /// The record's time, which quiet hours are judged at.
    at: i64,
}

impl Fanout {
    pub fn len(&self) -> usize {
        self.recipients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.recipients.is_empty()
    }

    fn text(&self, i: usize) -> &Rendered {
        if self.texts.len() == 1 {
            &self.texts[0]
        } else {
            &self.texts[i]
        }
    }

    fn shared(&self, i: usize) -> SharedFields<'_> {
        let t = self.text(i);
        SharedFields {
            kind: &t.kind,
            title: &t.title,
            body: &t.body,
            link: t.link.as_deref(),
            source_event_id: &self.event_id,
            occurred_at: self.occurred_at,
            source_topic: &self.source_topic,
            source_partition: self.source_partition,
            source_offset: self.source_offset,
            data: t.data.as_deref(),
            inbox: t.inbox,
            category: &t.category,
        }
    }

    /// Recipient `i`'s notification as a struct (tests and tools; the stage encodes without it).
    pub fn notification(&self, i: usize) -> Notification {
        let (user, t) = (&self.recipients[i], self.text(i));
        Notification {
            notification_id: Notification::id_for(&self.event_id, user),
            user_id: user.clone(),
            kind: t.kind.clone(),
            title: t.title.clone(),
            body: t.body.clone(),
            link: t.link.clone(),
            source_event_id: self.event_id.clone(),
            occurred_at: self.occurred_at,
            source_topic: self.source_topic.clone(),
            source_partition: self.source_partition,
            source_offset: self.source_offset,
            data: t.data.clone(),
            inbox: t.inbox,
            category: t.category.clone(),
            recipients: vec![],
        }
    }

    /// A fan-out of the same event (coordinates, id) to other recipients with other texts.
    fn sibling(&self, recipients: Vec<String>, texts: Vec<Rendered>, hold: Vec<i64>) -> Fanout {
        Fanout {
            event_id: self.event_id.clone(),
            occurred_at: self.occurred_at,
            source_topic: self.source_topic.clone(),
            source_partition: self.source_partition,
            source_offset: self.source_offset,
            recipients,
            texts,
            hold,
            ..Fanout::default()
        }
    }
}

/// The templater plus Kafka: one attempt of the stage.
struct Stage {
    templater: Templater,
    producer: FutureProducer<ClientStats>,
    output: String,
    dead: Arc<DeadLetters<ClientStats>>,
    consumer: Arc<StreamConsumer<TemplatingContext>>,
    shutdown: CancellationToken,
    /// Output records (a group record counts once) awaiting acknowledgement, at most `max_in_flight`.
    budget: Arc<Semaphore>,
    max_in_flight: usize,
    /// To the acknowledger, which stores each record's offset once its outputs are acknowledged.
    acks: mpsc::Sender<InFlight>,
    acker: Option<JoinHandle<Result<(), StageError>>>,
    /// The output topic's partition count, followed while the stage runs.
    partitions: partitions::OutputPartitions,
    /// The count this record's outputs are routed by (0: unknown, the producer's partitioner routes).
    routing: i32,
    group_records: bool,
    /// The consumer group, for the spans' `messaging.consumer.group.name`.
    group: String,
}

impl Templater {
    /// Registers the notification schema under `<output>-value` and compiles the templates.
    pub async fn new(
        topology: Arc<Topology>,
        registry: impl Into<RegistryEndpoint>,
        store: Store,
    ) -> Result<Self, StageError> {
        let spec = &topology.stages.templating;
        let registry = RegistryClient::new(registry)?;
        let mut readers = HashMap::new();
        let mut campaign_topics = HashSet::new();
        for logical in &spec.inputs {
            let schema = topology.schema(logical).ok_or_else(|| {
                StageError::configuration(format!("input topic {logical} has no schema in topology.yaml"))
            })?;
            if campaigns::is_campaign_schema(schema) {
                campaign_topics.insert(logical.clone());
            }
            // Leaked once per stage start: decoders borrow reader schemas for 'static so they can be
            // cached per writer schema id (see tidings_core::registry).
            readers.insert(topology.topic_name(logical), &*Box::leak(Box::new(schema.clone())));
        }
        let output = topology.topic_name(&spec.output);
        let id = registry.register(&format!("{output}-value"), NOTIFICATION_SCHEMA_JSON).await?;
        let encoder = NotificationEncoder::new(id)
            .map_err(|e| StageError::configuration(format!("the notification schema (id {id}): {e}")))?;
        let renderer = Renderer::new(&topology).map_err(|e| StageError::configuration(e.to_string()))?;
        let room_ttl = Duration::from_millis(spec.room_cache_ttl_ms);
        let held = &topology.stages.scheduler.input;
        let scheduled = topology.topics.contains_key(held).then(|| topology.topic_name(held));
        if scheduled.is_none() {
            warn!(topic = %held, "topology.yaml declares no topic {held} (stages.scheduler.input): notifications inside quiet hours and campaigns with a later send_at are produced at once, not held.");
        }
        Ok(Templater {
            scheduled,
            campaign_topics,
            topology,
            registry,
            store,
            renderer,
            readers,
            encoder,
            output_partitions: None,
            rooms: Arc::new(RoomCache::new(room_ttl, MAX_CACHED_ROOMS)),
        })
    }

    /// The room-member cache, for the consumer context that clears it on rebalances.
    pub fn rooms(&self) -> Arc<RoomCache> {
        self.rooms.clone()
    }

    /// From now on, recipients of one shared text who land on the same of the output topic's
    /// `partitions` (by murmur2 of their id, as their keyed records would) share one group record.
    /// A campaign to 10,000 users is then a dozen records through Kafka instead of 10,000; the
    /// store and the streams still get one notification per user, with the same ids.
    pub fn group_by_partition(&mut self, partitions: i32) {
        self.output_partitions = (partitions > 0).then_some(partitions);
    }

    /// The wire-format records of `fanout` under the registered notification schema: a group
    /// record per partition with several recipients of a shared text (when grouping is on), one
    /// keyed record per recipient otherwise. A shared text's fields are encoded once, here.
    pub fn encoded<'a>(&'a self, fanout: &'a Fanout) -> Result<EncodedFanout<'a>, StageError> {
        let common = if fanout.texts.len() == 1 { Some(self.encode_shared(fanout, 0)?) } else { None };
        let mut singles = Vec::new();
        let mut groups = Vec::new();
        match (self.output_partitions, &common) {
            // Held notifications go one per user, keyed by the user, as the scheduler releases them.
            (Some(n), Some(_)) if fanout.len() > 1 && fanout.hold.is_empty() => {
                let mut buckets: Vec<Vec<&'a str>> = vec![Vec::new(); n as usize];
                for user in &fanout.recipients {
                    buckets[tidings_core::kafka::partition_for(user, n) as usize].push(user);
                }
                for (p, bucket) in buckets.into_iter().enumerate() {
                    match bucket.len() {
                        0 => {}
                        1 => singles.push(bucket[0]),
                        _ => groups.extend(group_chunks(bucket).map(|c| (p as i32, c))),
                    }
                }
            }
            _ => singles.extend(fanout.recipients.iter().map(String::as_str)),
        }
        singles.reverse();
        groups.reverse();
        Ok(EncodedFanout { templater: self, fanout, common, out: Vec::with_capacity(256), singles, groups })
    }

    fn encode_shared(&self, fanout: &Fanout, i: usize) -> Result<Vec<u8>, StageError> {
        // Rendered texts always fit the schema: failing here is a bug, not the event's fault.
        self.encoder
            .shared(&fanout.shared(i))
            .map_err(|e| StageError::internal(format!("encoding a notification: {e}")))
    }
}

/// A group record holds recipient ids up to about this many bytes (a 10,000-user campaign on 12
/// partitions is one record per partition; far below Kafka's 1 MB default record limit).
const GROUP_BYTES: usize = 64 * 1024;

/// `bucket` cut into runs of at most [`GROUP_BYTES`] of user ids (each at least one recipient).
fn group_chunks(bucket: Vec<&str>) -> impl Iterator<Item = Vec<&str>> {
    let mut chunks = vec![Vec::new()];
    let mut bytes = 0;
    for user in bucket {
        let last = chunks.last_mut().expect("one chunk");
        if !last.is_empty() && bytes + user.len() + 2 > GROUP_BYTES {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += user.len() + 2;
        chunks.last_mut().expect("one chunk").push(user);
    }
    chunks.into_iter()
}

/// Where one output record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// One user's notification, keyed by the user (the producer's murmur2 picks the partition).
    User(&'a str),
    /// A group record for several users of this partition, produced to it without a key.
    Partition(i32),
}

/// Yields the records of one [`Fanout`] into one reused buffer: per user record only its id and
/// user id are written in front of the shared fields, per group record its recipients after them.
pub struct EncodedFanout<'a> {
    templater: &'a Templater,
    fanout: &'a Fanout,
    common: Option<Vec<u8>>,
    out: Vec<u8>,
    /// Recipients still to get a record of their own, last first.
    singles: Vec<&'a str>,
    /// Group records still to write, last first.
    groups: Vec<(i32, Vec<&'a str>)>,
}

impl<'a> EncodedFanout<'a> {
    /// How many records are left to yield.
    pub fn remaining(&self) -> usize {
        self.singles.len() + self.groups.len()
    }

    /// The next record's target and framed bytes (valid until the next call), or `None` at the end.
    pub fn next_record(&mut self) -> Option<Result<(Target<'a>, &[u8]), StageError>> {
        if let Some((p, users)) = self.groups.pop() {
            let shared = self.common.as_ref().expect("groups only with a shared text");
            self.templater.encoder.encode_group_into(shared, &users, &mut self.out);
            return Some(Ok((Target::Partition(p), &self.out)));
        }
        let user = self.singles.pop()?;
        let own;
        let shared = match &self.common {
            Some(c) => c,
            None => {
                // Per-recipient texts: `singles` holds every recipient in order, so the index is
                // how many were taken.
                let i = self.fanout.len() - self.singles.len() - 1;
                match self.templater.encode_shared(self.fanout, i) {
                    Ok(v) => {
                        own = v;
                        &own
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
        };
        let id = Notification::id_for(&self.fanout.event_id, user);
        self.templater.encoder.encode_into(&id, user, shared, &[], &mut self.out);
        Some(Ok((Target::User(user), &self.out)))
    }
}

async fn start(
    cfg: &TemplatingConfig,
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<(Stage, Arc<StreamConsumer<TemplatingContext>>), StageError> {
    let topo = cfg.topology.clone();
    let spec = &topo.stages.templating;
    let mut templater = Templater::new(topo.clone(), &cfg.registry, store.clone()).await?;
    let output = topo.topic_name(&spec.output);
    let producer: FutureProducer<ClientStats> =
        reporting(cfg.kafka.producer()).create_with_context(ClientStats::new("templating-producer"))?;
    // Keyed and group records are routed by this one count, followed while the stage runs: a user's
    // outputs never split between two counts, and the gateways move users only after it (see
    // `tidings_core::kafka::PARTITIONS_SETTLE`).
    let partitions = partitions::OutputPartitions::follow(&producer, &output).await?;
    let routing = partitions.current();
    if spec.group_records {
        templater.group_by_partition(routing);
    }
    let group = topo.group_name(&spec.group);
    let context = rooms::context("templating-consumer", templater.rooms()).with_group(&group);
    let consumer: Arc<StreamConsumer<TemplatingContext>> =
        Arc::new(reporting(cfg.kafka.consumer(&group)).create_with_context(context)?);
    let topics: Vec<String> = spec.inputs.iter().map(|t| topo.topic_name(t)).collect();
    consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    info!(topics = ?topics, output = %output, "Templating stage consuming {topics:?} into {output}.");
    let max_in_flight = spec.max_in_flight.max(1);
    let (acks, rx) = mpsc::channel::<InFlight>(1024);
    let dead = Arc::new(DeadLetters::new(producer.clone(), topo.topic_name(&spec.dead_letter), STAGE));
    let acker = tokio::spawn(ack_in_order(rx, consumer.clone(), dead.clone(), store.clone(), shutdown.clone()));
    let stage = Stage {
        templater,
        dead,
        producer,
        output,
        consumer: consumer.clone(),
        shutdown: shutdown.clone(),
        budget: Arc::new(Semaphore::new(max_in_flight)),
        max_in_flight,
        acks,
        acker: Some(acker),
        partitions,
        routing,
        group_records: spec.group_records,
        group,
    };
    Ok((stage, consumer))
}

impl Processor for Stage {
    /// How the acknowledger ended (only on a failed delivery or a dropped producer).
    type Due = Result<(), StageError>;

    async fn process(&mut self, msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
        // Between records only, so all outputs (and pages) of one event use the same count.
        let n = self.partitions.current();
        if n != self.routing {
            self.routing = n;
            if self.group_records {
                self.templater.group_by_partition(n);
            }
        }
        self.process_traced_record(msg).await
    }

    async fn due(&mut self) -> Self::Due {
        match self.acker.as_mut() {
            Some(acker) => acker.await.unwrap_or_else(|e| Err(e.into())),
            None => std::future::pending().await,
        }
    }

    async fn on_due(&mut self, ended: Self::Due) -> Result<(), StageError> {
        self.acker = None;
        // It ends by itself only on a failure: its sender lives as long as this attempt.
        Err(ended.err().unwrap_or_else(|| StageError::internal("the acknowledger stopped while the stage ran")))
    }

    /// Lets every produced output be acknowledged and its offset stored, then commits what was
    /// stored (only fully acknowledged records ever are, so committing is always safe).
    async fn finish(self, ended: Result<(), StageError>) -> Result<(), StageError> {
        let Stage { acks, acker, consumer, shutdown, .. } = self;
        drop(acks);
        let drained = match acker {
            Some(acker) => acker.await.unwrap_or_else(|e| Err(e.into())),
            None => Ok(()),
        };
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit is not an error.
            if e.rdkafka_error_code() != Some(RDKafkaErrorCode::NoOffset) {
                warn!(error = %e, "Final offset commit failed; the next start replays from the previous commit.");
            }
        }
        if shutdown.is_cancelled() {
            info!("Templating stage stopped after committing its offsets.");
            return Ok(());
        }
        // The acknowledger's failure first: a record's hand-over fails when it stopped, and its
        // error (a refused or timed-out output) is the cause that decides the restart.
        drained.and(ended)
    }
}

/// Awaits each record's outputs in consumption order and only then stores its offset (and a
/// campaign page's checkpoint). An output the brokers refuse for good ([`unproducible`]: too
/// large, invalid) makes its record a dead letter instead of a stage failure, so the partition
/// moves on.
async fn ack_in_order(
    mut rx: mpsc::Receiver<InFlight>,
    consumer: Arc<StreamConsumer<TemplatingContext>>,
    dead: Arc<DeadLetters<ClientStats>>,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    // The last record dead-lettered for a refused output: the later pages of a segment campaign
    // share its input and are refused alike, but it is one dead letter.
    let mut refused_input: Option<Arc<OwnedMessage>> = None;
    let records_out = tidings_core::stage::records_out_counter(STAGE);
    while let Some(f) = rx.recv().await {
        let input = &f.input;
        let mut refused = None;
        let produced = f.deliveries.len() as u64;
        for d in f.deliveries {
            if let Err(e) = acknowledged(d).await {
                match unproducible(&e) {
                    Some(reason) => {
                        refused.get_or_insert((reason, e));
                    }
                    None => return Err(StageError::from(e).context(format!("an output of {}", at(input)))),
                }
            }
        }
        records_out.increment(produced);
        if let Some(d) = f.dead {
            settle_dead(&dead, input, d).await?;
        }
        if let Some((reason, e)) = refused {
            if !refused_input.as_ref().is_some_and(|r| Arc::ptr_eq(r, input)) {
                let error = format!("the brokers refused a notification of this event: {e}");
                let d = send_dead(&dead, &**input, reason, error, DeadCopy::Whole).await?;
                settle_dead(&dead, input, d).await?;
                refused_input = Some(input.clone());
            }
        }
        if let Some(p) = &f.checkpoint {
            // Every output of this page and of all before it is acknowledged: a restart resumes after it.
            retry(&shutdown, "campaign checkpoint", || store.checkpoint_campaign(p), |e| e.is_retriable()).await??;
        }
        if !f.last {
            continue;
        }
        // The next offset to read, stated exactly: `store_offset` (librdkafka's legacy
        // rd_kafka_offset_store) adds one itself, which skipped a record on every restart.
        let mut next = rdkafka::TopicPartitionList::with_capacity(1);
        next.add_partition_offset(input.topic(), input.partition(), rdkafka::Offset::Offset(input.offset() + 1))?;
        if let Err(e) = consumer.store_offsets(&next) {
            // The partition was revoked meanwhile; its new owner replays from the last commit.
            debug!(error = %e, topic = %input.topic(), partition = input.partition(), "Offset not stored (partition no longer assigned).");
        }
    }
    Ok(())
}

/// `headers` plus the three a record on the scheduled topic carries.
fn release_headers(headers: Option<OwnedHeaders>, at: i64, to: &str, id: &str) -> OwnedHeaders {
    headers
        .unwrap_or_else(|| OwnedHeaders::new_with_capacity(3))
        .insert(Header { key: H_RELEASE_AT, value: Some(&at.to_string()) })
        .insert(Header { key: H_RELEASE_TO, value: Some(to) })
        .insert(Header { key: H_RELEASE_ID, value: Some(id) })
}

fn at(m: &OwnedMessage) -> String {
    format!("{}[{}]@{}", m.topic(), m.partition(), m.offset())
}

/// Sends `msg`'s dead-letter copy, as `copy` or, while the topic can never take that, smaller.
async fn send_dead<M: Message + Sync>(
    dead: &DeadLetters<ClientStats>,
    msg: &M,
    reason: &'static str,
    error: String,
    mut copy: DeadCopy,
) -> Result<DeadLetter, StageError> {
    loop {
        match dead.send_copy(msg, reason, &error, copy).await {
            Ok(delivery) => return Ok(DeadLetter { delivery, reason, error, copy }),
            Err(e) => match (unproducible(&e), copy.smaller()) {
                (Some(_), Some(smaller)) => copy = smaller,
                _ => return Err(StageError::kafka(System::DeadLetter, e)),
            },
        }
    }
}

/// Awaits a dead letter's acknowledgement; a copy the brokers refuse for good (a record too large
/// for the dead-letter topic) is sent again smaller, down to its coordinates.
async fn settle_dead(
    dead: &DeadLetters<ClientStats>,
    input: &OwnedMessage,
    mut d: DeadLetter,
) -> Result<(), StageError> {
    loop {
        match acknowledged(d.delivery).await {
            Ok(_) => return Ok(()),
            Err(e) => match (unproducible(&e), d.copy.smaller()) {
                (Some(_), Some(smaller)) => d = send_dead(dead, input, d.reason, d.error, smaller).await?,
                _ => {
                    return Err(
                        StageError::kafka(System::DeadLetter, e).context(format!("the dead letter of {}", at(input)))
                    )
                }
            },
        }
    }
}

impl Stage {
    async fn process_traced_record(&self, msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
        let topic = msg.topic().to_string();
        let traceparent = msg.headers().and_then(|h| header_str(h, H_TRACEPARENT));
        // The consumer span of the messaging conventions, the child of the record's producer span.
        // DEBUG, as every messaging span (see tidings_core::trace): nothing is built unless traced.
        let span = tracing::debug_span!(
            "process",
            otel.name = %format_args!("process {topic}"),
            otel.kind = "consumer",
            messaging.system = trace::MESSAGING_SYSTEM,
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %topic,
            messaging.destination.partition.id = %msg.partition(),
            messaging.kafka.offset = msg.offset(),
            messaging.consumer.group.name = %self.group,
        );
        if let (false, Some(h)) = (span.is_disabled(), msg.headers()) {
            trace::set_span_parent(&span, trace::extract_context(h));
        }
        // Instrumented rather than entered: a guard held across awaits would leak this span into
        // whatever else runs on the worker meanwhile.
        self.process_traced(msg, topic, traceparent).instrument(span).await
    }

    /// Produces the outputs of one record and hands them to the acknowledger: one batch per page
    /// of a segment audience (only the last one lets the record's offset be stored), else one.
    async fn process_traced(
        &self,
        msg: &BorrowedMessage<'_>,
        topic: String,
        traceparent: Option<&str>,
    ) -> Result<(), StageError> {
        let rec = RecordRef { topic: &topic, partition: msg.partition(), offset: msg.offset(), payload: msg.payload() };
        let meta = RecordMeta {
            timestamp: msg.timestamp().to_millis().map(|ms| ms.saturating_mul(1000)),
            released: msg.headers().is_some_and(|h| header_str(h, H_RELEASED_AT).is_some()),
        };
        let mut outcome = self.templater.outcome_at(rec, meta, &self.shutdown).await?;
        // The producer span of this record's outputs (all pages of a fan-out), the child of the
        // process span; the outputs carry its context, or without OpenTelemetry the incoming
        // traceparent as is. Ends when the last output is handed to the producer.
        let send = match &outcome {
            Outcome::Notifications(f) if !f.is_empty() || f.schedule.is_some() => tracing::debug_span!(
                "send",
                otel.name = %format_args!("send {}", self.output),
                otel.kind = "producer",
                messaging.system = trace::MESSAGING_SYSTEM,
                messaging.operation.type = "send",
                messaging.operation.name = "send",
                messaging.destination.name = %self.output,
                messaging.batch.message_count = tracing::field::Empty,
            ),
            _ => tracing::Span::none(),
        };
        let headers = trace::propagation_headers(&send, traceparent);
        let mut sent = 0usize;
        let input = Arc::new(msg.detach());
        loop {
            let mut deliveries = Vec::new();
            let mut dead = None;
            let mut notifications = match outcome {
                Outcome::Dead { reason, error } => {
                    dead = Some(send_dead(&self.dead, msg, reason, error, DeadCopy::Whole).await?);
                    Fanout::default()
                }
                Outcome::CampaignFailed { reason, error, checkpoint } => {
                    dead = Some(send_dead(&self.dead, msg, reason, error, DeadCopy::Whole).await?);
                    Fanout { checkpoint: Some(checkpoint), ..Fanout::default() }
                }
                Outcome::Notifications(f) => f,
            };
            // librdkafka copies key and payload on send, so one buffer serves every record.
            let mut records = self.templater.encoded(&notifications)?;
            // Bound the outputs awaiting acknowledgement; a fan-out larger than the budget takes all of it.
            let permits = match records.remaining() {
                0 => None,
                n => {
                    let n = n.min(self.max_in_flight) as u32;
                    let permits = self.budget.clone().acquire_many_owned(n).await;
                    Some(permits.map_err(StageError::internal)?)
                }
            };
            deliveries.reserve(records.remaining());
            // A template's copies are all inbox rows or all delivery-only.
            let delivery_only = notifications.texts.first().is_some_and(|t| !t.inbox);
            let headers = match (&headers, delivery_only) {
                (h, false) => h.clone(),
                (h, true) => Some(
                    h.clone()
                        .unwrap_or_else(|| OwnedHeaders::new_with_capacity(1))
                        .insert(Header { key: H_DELIVERY_ONLY, value: Some("true") }),
                ),
            };
            let mut refused = None;
            // The input itself, held on the scheduled topic until its `send_at`.
            if let (Some(s), Some(to)) = (&notifications.schedule, self.templater.scheduled.as_deref()) {
                let h = release_headers(headers.clone(), s.release_at, &s.release_to, &s.release_id);
                let rec = FutureRecord::to(to).key(&s.key).payload(msg.payload().unwrap_or_default()).headers(h);
                match enqueue(&self.producer, rec).await {
                    Ok(d) => deliveries.push(d),
                    Err(e) => match unproducible(&e) {
                        Some(reason) => refused = Some((reason, e)),
                        None => return Err(e.into()),
                    },
                }
            }
            let held_to = match (notifications.hold.is_empty(), self.templater.scheduled.as_deref()) {
                (false, Some(to)) => Some(to),
                _ => None,
            };
            let mut i = 0;
            while let Some(record) = records.next_record() {
                let (target, payload) = record?;
                let mut rec = match (target, held_to) {
                    // Held: one record per user (no group records, see `encoded`), in recipient order.
                    (Target::User(user), Some(to)) => FutureRecord::to(to).key(user),
                    (Target::User(user), None) if self.routing > 0 => FutureRecord::to(&self.output)
                        .key(user)
                        .partition(tidings_core::kafka::partition_for(user, self.routing)),
                    (Target::User(user), None) => FutureRecord::to(&self.output).key(user),
                    (Target::Partition(p), _) => FutureRecord::to(&self.output).partition(p),
                }
                .payload(payload);
                match (target, held_to) {
                    (Target::User(user), Some(_)) => {
                        let id = Notification::id_for(&notifications.event_id, user).to_string();
                        let at = notifications.hold[i];
                        rec = rec.headers(release_headers(headers.clone(), at, &self.output, &id));
                    }
                    _ => {
                        if let Some(h) = &headers {
                            rec = rec.headers(h.clone());
                        }
                    }
                }
                i += 1;
                match enqueue(&self.producer, rec).await {
                    Ok(d) => deliveries.push(d),
                    // Refused before it left (larger than the producer's `message.max.bytes`):
                    // the record is a dead letter, its remaining outputs are not produced.
                    Err(e) => match unproducible(&e) {
                        Some(reason) => {
                            refused = Some((reason, e));
                            break;
                        }
                        None => return Err(e.into()),
                    },
                }
            }
            drop(records);
            if let Some((reason, e)) = refused {
                let error = format!("a notification of this event cannot be produced: {e}");
                dead = Some(send_dead(&self.dead, msg, reason, error, DeadCopy::Whole).await?);
                notifications.rest = None;
            }
            if !notifications.is_empty() {
                debug!(
                    count = notifications.len(),
                    records = deliveries.len(),
                    "Produced {} notification(s).",
                    notifications.len()
                );
            }
            sent += deliveries.len();
            let next = self.templater.next_page(&mut notifications, &self.shutdown).await?;
            let inflight = InFlight {
                input: input.clone(),
                last: next.is_none(),
                deliveries,
                dead,
                checkpoint: notifications.checkpoint.take(),
                _permits: permits,
            };
            // Fails only once the acknowledger stopped on a failure, which `finish` reports.
            self.acks.send(inflight).await.map_err(|_| StageError::internal("the acknowledger stopped"))?;
            match next {
                Some(o) => outcome = o,
                None => {
                    // The conventions count batches only: one record is not a batch.
                    if sent != 1 {
                        send.record("messaging.batch.message_count", sent);
                    }
                    return Ok(());
                }
            }
        }
    }
}

impl Templater {
    /// What one record turns into. `Err` only for failures a retry of the whole stage can fix.
    pub async fn outcome(&self, rec: RecordRef<'_>, shutdown: &CancellationToken) -> Result<Outcome, StageError> {
        self.outcome_at(rec, RecordMeta::default(), shutdown).await
    }

    /// [`Templater::outcome`] of a record whose timestamp and headers `meta` gives (quiet hours
    /// and a campaign's `send_at` are judged at its timestamp).
    pub async fn outcome_at(
        &self,
        rec: RecordRef<'_>,
        meta: RecordMeta,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, StageError> {
        let topic = rec.topic;
        let Some(reader) = self.readers.get(topic).copied() else {
            return Ok(Outcome::Dead {
                reason: "unexpected-topic",
                error: format!("no reader schema for topic {topic}"),
            });
        };
        let Some(payload) = rec.payload else {
            return Ok(Outcome::Dead { reason: "empty-payload", error: "record has no value".into() });
        };
        let value = match retry(shutdown, "decode", || self.registry.decode(payload, reader), DecodeError::is_retriable)
            .await?
        {
            Ok(v) => v,
            Err(e) => return Ok(Outcome::Dead { reason: e.reason_code(), error: e.to_string() }),
        };
        let Some(event) = union_branch_name(reader, &value, "payload").map(str::to_string) else {
            return Ok(Outcome::Dead { reason: "missing-field", error: "event has no `payload` union".into() });
        };
        let json = avro_to_json(&value);
        let logical = self.topology.logical_topic(topic).unwrap_or(topic);
        let (Some(event_id), Some(occurred_at)) =
            (json.get("event_id").and_then(Json::as_str), json.get("occurred_at").and_then(Json::as_i64))
        else {
            return Ok(Outcome::Dead { reason: "missing-field", error: "event has no event_id or occurred_at".into() });
        };
        let at = meta.timestamp.unwrap_or(occurred_at);
        if self.campaign_topics.contains(logical) {
            let source = campaigns::Source { rec, at, released: meta.released, event_id, occurred_at };
            return self.campaign(source, &event, &json, shutdown).await;
        }
        let audience = match self.renderer.audience(logical, &event, &json) {
            Ok(Some(a)) => a,
            Ok(None) => return Ok(Outcome::Notifications(Fanout::default())),
            Err(e) => return Ok(dead(e)),
        };
        let mut rest = None;
        let recipients = match audience {
            Audience::Users(u) => u,
            Audience::Segment(seg) => {
                let members = self.segment_page(&seg, None, shutdown).await?;
                match members {
                    Ok(Some((version, m))) if !m.is_empty() => {
                        if m.len() == SEGMENT_PAGE as usize {
                            rest = Some(SegmentRest {
                                after: m.last().cloned().unwrap_or_default(),
                                segment: seg,
                                version,
                                logical: logical.to_string(),
                                event: event.clone(),
                                json: json.clone(),
                                at,
                            });
                        }
                        m
                    }
                    Ok(_) => {
                        return Ok(dead(RenderError::MissingRecipient(format!(
                            "audience segment {seg:?} is unknown or has no members"
                        ))))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Audience::Room { room, exclude } => {
                if MEMBERSHIP_EVENTS.contains(&event.as_str()) {
                    self.rooms.remove(topic, rec.partition, &room);
                }
                let cached = self.rooms.get(topic, rec.partition, &room, Instant::now());
                let members = match cached {
                    Some(m) => Ok(m),
                    None => retry(shutdown, "room lookup", || self.store.room_members(&room), |e| e.is_retriable())
                        .await?
                        .map(|m| {
                            let m = Arc::new(m);
                            self.rooms.insert(topic, rec.partition, &room, m.clone(), Instant::now());
                            m
                        }),
                };
                match members {
                    Ok(m) if !m.is_empty() => m.iter().filter(|u| Some(*u) != exclude.as_ref()).cloned().collect(),
                    Ok(_) => {
                        return Ok(dead(RenderError::MissingRecipient(format!(
                            "chat room {room:?} has no known members"
                        ))))
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let fanout = Fanout {
            event_id: event_id.to_string(),
            occurred_at,
            source_topic: topic.to_string(),
            source_partition: rec.partition,
            source_offset: rec.offset,
            rest: rest.map(Rest::Segment),
            ..Fanout::default()
        };
        self.page(fanout, logical, &event, &json, recipients, at, shutdown).await
    }

    /// `fanout` (an event's coordinates) to the page `recipients` after preferences: the users who
    /// opted out dropped, those inside quiet hours in a held sibling, texts rendered for each.
    #[allow(clippy::too_many_arguments)]
    async fn page(
        &self,
        mut fanout: Fanout,
        logical: &str,
        event: &str,
        json: &Json,
        recipients: Vec<String>,
        at: i64,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, StageError> {
        let (recipients, held) =
            self.apply_preferences(logical, event, &fanout.event_id, recipients, at, shutdown).await?;
        let texts = match self.renderer.render(logical, event, json, &recipients) {
            Ok(t) => t,
            Err(e) => return Ok(dead(e)),
        };
        if !held.is_empty() {
            let (users, release): (Vec<String>, Vec<i64>) = held.into_iter().unzip();
            let held_texts = match self.renderer.render(logical, event, json, &users) {
                Ok(t) => t,
                Err(e) => return Ok(dead(e)),
            };
            fanout.siblings.push(fanout.sibling(users, held_texts, release));
        }
        fanout.recipients = recipients;
        fanout.texts = texts;
        Ok(Outcome::Notifications(fanout))
    }

    /// What follows `fanout` (same event, same coordinates): its next sibling, else the next page
    /// of its audience, or `None` once the event is done; a page whose texts fail to render
    /// dead-letters the event.
    pub async fn next_page(
        &self,
        fanout: &mut Fanout,
        shutdown: &CancellationToken,
    ) -> Result<Option<Outcome>, StageError> {
        if let Some(mut sibling) = fanout.siblings.pop() {
            sibling.siblings = std::mem::take(&mut fanout.siblings);
            sibling.rest = fanout.rest.take();
            sibling.checkpoint = fanout.checkpoint.take();
            return Ok(Some(Outcome::Notifications(sibling)));
        }
        let next = Fanout {
            event_id: std::mem::take(&mut fanout.event_id),
            occurred_at: fanout.occurred_at,
            source_topic: std::mem::take(&mut fanout.source_topic),
            source_partition: fanout.source_partition,
            source_offset: fanout.source_offset,
            ..Fanout::default()
        };
        let rest = match fanout.rest.take() {
            None => return Ok(None),
            Some(Rest::Campaign(c)) => return self.campaign_page(next, c, shutdown).await.map(Some),
            Some(Rest::Segment(r)) => r,
        };
        let recipients = match self.segment_page(&rest.segment, Some((rest.version, &rest.after)), shutdown).await? {
            Ok(Some((_, m))) if m.is_empty() => return Ok(None),
            Ok(Some((_, m))) => m,
            // Kept far longer than a fan-out takes; if it went, the rest of this audience is lost
            // and the dead letter says so rather than ending the fan-out as if complete.
            Ok(None) => {
                return Ok(Some(Outcome::Dead {
                    reason: "segment-version-gone",
                    error: format!(
                        "segment {:?} version {} was deleted during the fan-out, after user {:?}",
                        rest.segment, rest.version, rest.after
                    ),
                }))
            }
            Err(e) => return Err(e.into()),
        };
        // Where the next page starts is the whole page's last member, whoever of it opted out.
        let more = recipients.len() == SEGMENT_PAGE as usize;
        let after = recipients.last().cloned().unwrap_or_default();
        let (logical, event, json, at) = (rest.logical.clone(), rest.event.clone(), rest.json.clone(), rest.at);
        let next = Fanout { rest: more.then(|| Rest::Segment(SegmentRest { after, ..rest })), ..next };
        Ok(Some(self.page(next, &logical, &event, &json, recipients, at, shutdown).await?))
    }

    /// `recipients` without the users who opted out of the template's category, and those inside
    /// their quiet hours at `at` apart with their release times; the page's preferences come from
    /// one store query (counted in `tidings_notifications_suppressed_total` and
    /// `tidings_notifications_held_total`). A critical category, a delivery-only copy (chat
    /// messages to a room, the answer to a user's claim) and a room's members are never filtered:
    /// preferences govern inbox notifications only.
    async fn apply_preferences(
        &self,
        logical: &str,
        event: &str,
        event_id: &str,
        recipients: Vec<String>,
        at: i64,
        shutdown: &CancellationToken,
    ) -> Result<(Vec<String>, Vec<(String, i64)>), StageError> {
        let Some(t) = self.topology.template(logical, event) else { return Ok((recipients, Vec::new())) };
        let exempt =
            !t.inbox || matches!(t.recipients, Recipients::Room { .. }) || self.topology.is_critical(&t.category);
        if exempt || recipients.is_empty() {
            return Ok((recipients, Vec::new()));
        }
        let prefs = self.page_preferences(&t.category, &recipients, shutdown).await?;
        let before = recipients.len();
        let mut held = Vec::new();
        let mut kept = Vec::with_capacity(recipients.len());
        for user in recipients {
            if prefs.opted_out.contains(&user) {
                continue;
            }
            match self.hold_until(prefs.saved.get(&user), at, event_id, &user) {
                Some(release) => held.push((user, release)),
                None => kept.push(user),
            }
        }
        let dropped = before - kept.len() - held.len();
        if dropped > 0 {
            metrics::counter!("tidings_notifications_suppressed_total", "category" => t.category.clone(), "reason" => "opted_out")
                .increment(dropped as u64);
        }
        if !held.is_empty() {
            metrics::counter!("tidings_notifications_held_total", "category" => t.category.clone())
                .increment(held.len() as u64);
        }
        Ok((kept, held))
    }

    /// The preferences of a page of recipients, in one store query (retried while retriable).
    async fn page_preferences(
        &self,
        category: &str,
        users: &[String],
        shutdown: &CancellationToken,
    ) -> Result<tidings_store::audience::PagePreferences, StageError> {
        Ok(retry(shutdown, "preferences lookup", || self.store.page_preferences(category, users), |e| e.is_retriable())
            .await??)
    }

    /// When `user`'s notification of `event_id` is released if their quiet hours hold it at `at`;
    /// `None`: it goes now (no quiet hours then, or nowhere to hold it).
    fn hold_until(
        &self,
        saved: Option<&tidings_store::audience::Recipient>,
        at: i64,
        event_id: &str,
        user: &str,
    ) -> Option<i64> {
        self.scheduled.as_ref()?;
        let saved = saved?;
        let end = quiet::window_end(at, quiet::zone(&saved.time_zone), saved.quiet_hours?)?;
        let spread = self.topology.stages.scheduler.release_spread_ms;
        Some(quiet::release_at(end, Notification::id_for(event_id, user), spread))
    }

    /// A page of `segment`: the first of its current version (which it returns to pin), or the one
    /// after `(version, user)`. `None`: no such segment, or the pinned version is gone.
    async fn segment_page(
        &self,
        segment: &str,
        after: Option<(i64, &str)>,
        shutdown: &CancellationToken,
    ) -> Result<Result<Option<(i64, Vec<String>)>, tidings_store::StoreError>, StageError> {
        retry(
            shutdown,
            "segment lookup",
            || async move {
                let (version, after) = match after {
                    Some((version, user)) => (version, Some(user)),
                    None => match self.store.segment(segment).await? {
                        Some(info) => (info.version, None),
                        None => return Ok(None),
                    },
                };
                let page = self.store.segment_version_page(version, after, SEGMENT_PAGE).await?;
                Ok(page.map(|p| (version, p)))
            },
            |e: &tidings_store::StoreError| e.is_retriable(),
        )
        .await
    }
}

fn dead(e: RenderError) -> Outcome {
    Outcome::Dead { reason: e.reason_code(), error: e.to_string() }
}

/// Retries `op` while its error is retriable (200 ms doubling to 30 s, the partition waits);
/// the final result, or its last error as a [`StageError`] when shutdown begins first.
async fn retry<T, E, F, Fut>(
    shutdown: &CancellationToken,
    what: &str,
    op: F,
    retriable: impl Fn(&E) -> bool,
) -> Result<Result<T, E>, StageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
    E: std::fmt::Display,
    StageError: From<E>,
{
    match until_done(
        shutdown,
        || what.to_string(),
        (Duration::from_millis(200), Duration::from_secs(30)),
        op,
        retriable,
    )
    .await
    {
        Ok(v) => Ok(Ok(v)),
        Err(GaveUp::Failed(e)) => Ok(Err(e)),
        Err(GaveUp::ShutDown(e)) => Err(StageError::from(e).context(format!("shut down while retrying {what}"))),
    }
}
