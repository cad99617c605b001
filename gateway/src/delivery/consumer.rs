//! The delivery consumer: joins the delivery group on the notifications topic, starts every
//! assigned partition a ring's length before its end (so resumes right after a move are served
//! from memory), feeds decoded notifications to the hub and announces ownership on the owners topic.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::Offset;
use tidings_core::consumer::{
    blocking, tail, Assigned, RebalanceHooks, StageContext, Start, StartOffsets, Tail, WATERMARK_TIMEOUT,
};
use tidings_core::kafka::PARTITIONS_REFRESH;
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::stage::{Processor, StageError, System};
use tidings_core::trace;
use tidings_core::{DecodeError, Notification, RegistryClient};
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::partitions::{self, PartitionFollow};
use super::{owners, DeliveryConfig, Hub, Owners, Traced};

/// State shared between the rebalance callback and the main loop.
#[derive(Default)]
struct Shared {
    /// Newly assigned partitions not yet announced on the owners topic.
    to_announce: Mutex<Vec<i32>>,
    /// Assigned partitions whose start could not be computed in the callback; the main loop
    /// retries and seeks them.
    pending: Mutex<BTreeSet<i32>>,
    wake: Notify,
}

/// The consumer's context: every assigned partition starts a ring's length before its end.
type DeliveryContext = StageContext<HubHooks>;

/// Tells the hub which partitions it serves, from where, and queues their announcements.
struct HubHooks {
    hub: Arc<Hub>,
    topic: String,
    shared: Arc<Shared>,
}

impl RebalanceHooks for HubHooks {
    fn on_assign(&self, assigned: &[Assigned]) {
        let mine = assigned.iter().filter(|a| a.topic == self.topic);
        let parts: Vec<i32> = mine.clone().map(|a| a.partition).collect();
        for a in mine {
            match a.start {
                Start::Tail(Tail { offset, low, high }) => {
                    self.hub.assign(a.partition, offset, high);
                    self.hub.set_low_watermark(a.partition, low);
                }
                // Watermarks unavailable: `maintain` starts it once they come.
                _ => {
                    self.shared.pending.lock().expect("lock").insert(a.partition);
                }
            }
        }
        self.hub.set_joined();
        info!(partitions = ?parts, "Delivery owns {} partition(s) now.", parts.len());
        self.shared.to_announce.lock().expect("lock").extend(parts);
        self.shared.wake.notify_one();
    }

    fn on_revoke(&self, revoked: &[(String, i32)]) {
        let parts: Vec<i32> = revoked.iter().filter(|(t, _)| *t == self.topic).map(|(_, p)| *p).collect();
        info!(partitions = ?parts, "Delivery gives up {} partition(s); their streams get `reconnect`.", parts.len());
        self.hub.revoke(&parts);
        let mut pending = self.shared.pending.lock().expect("lock");
        parts.iter().for_each(|p| {
            pending.remove(p);
        });
    }
}

/// Runs the delivery stage until `shutdown` on the shared skeleton, restarting after transient
/// failures. On shutdown, every stream gets `reconnect` and the consumer leaves the group.
pub async fn run(
    cfg: DeliveryConfig,
    hub: Arc<Hub>,
    owners: Arc<Owners>,
    shutdown: CancellationToken,
) -> Result<(), StageError> {
    let result =
        tidings_core::stage::run(STAGE, &cfg.health, &shutdown, || start(&cfg, &hub, &owners, &shutdown)).await;
    hub.close_all();
    result
}

/// Name used in logs and metrics.
pub const STAGE: &str = "delivery";

/// One attempt of the stage: the consumer feeding the hub, and its periodic upkeep.
struct Delivery {
    cfg: DeliveryConfig,
    hub: Arc<Hub>,
    owners: Arc<Owners>,
    registry: RegistryClient,
    consumer: Arc<StreamConsumer<DeliveryContext>>,
    shared: Arc<Shared>,
    producer: FutureProducer,
    instance: String,
    follower: tokio::task::JoinHandle<Result<(), StageError>>,
    tick: tokio::time::Interval,
    ticks: u64,
    refreshing: Option<tokio::task::JoinHandle<()>>,
    /// The partition count of the topic as followed while the stage runs.
    follow: Arc<Mutex<PartitionFollow>>,
    multi_thread: bool,
    shutdown: CancellationToken,
}

/// Upkeep that is due besides records.
enum Upkeep {
    /// Newly owned partitions to announce.
    Announce,
    Tick,
}

async fn start(
    cfg: &DeliveryConfig,
    hub: &Arc<Hub>,
    owners: &Arc<Owners>,
    shutdown: &CancellationToken,
) -> Result<(Delivery, Arc<StreamConsumer<DeliveryContext>>), StageError> {
    let registry = RegistryClient::new(&cfg.registry)?;
    let multi_thread = Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread;
    let shared = Arc::new(Shared::default());
    let hooks = HubHooks { hub: hub.clone(), topic: cfg.topic.clone(), shared: shared.clone() };
    let ctx = StageContext::new("delivery-consumer", StartOffsets::Tail(hub.config().ring_events), hooks)
        .with_group(&cfg.group);
    // Nothing is committed: every owner starts a ring's length before the end. Partitions added
    // to the topic are taken within the metadata refresh (librdkafka's default is 5 minutes).
    let refresh_ms = PARTITIONS_REFRESH.as_millis().to_string();
    let cc = cfg.kafka.consumer_with(
        &cfg.group,
        &[("auto.offset.reset", "latest"), ("topic.metadata.refresh.interval.ms", &refresh_ms)],
        &[("enable.auto.commit", "false"), ("partition.assignment.strategy", "range,roundrobin")],
    );
    let cc = tidings_core::client_stats::reporting(cc);
    let consumer: Arc<StreamConsumer<DeliveryContext>> = Arc::new(cc.create_with_context(ctx)?);

    let count = blocking(multi_thread, || partition_count(consumer.as_ref(), &cfg.topic))?;
    if count == 0 {
        // It may be created yet (the topology is applied by another process): retried.
        let missing = format!("topic {} has no partitions (not created yet?)", cfg.topic);
        return Err(StageError::external(System::Kafka, true, missing));
    }
    hub.set_partition_count(count);
    let follow = Arc::new(Mutex::new(PartitionFollow::new(count)));
    consumer.subscribe(&[&cfg.topic])?;
    let producer: FutureProducer = cfg.kafka.producer().create()?;
    let follower = {
        let (kafka, topic, owners, token) =
            (cfg.kafka.clone(), cfg.owners_topic.clone(), owners.clone(), shutdown.child_token());
        tokio::spawn(async move { owners::follow(&kafka, &topic, owners, token).await })
    };
    info!(topic = %cfg.topic, group = %cfg.group, partitions = count, "Delivery consuming {} as {}.", cfg.topic, owners.self_url());
    let delivery = Delivery {
        cfg: cfg.clone(),
        hub: hub.clone(),
        owners: owners.clone(),
        registry,
        consumer: consumer.clone(),
        shared,
        producer,
        instance: uuid::Uuid::new_v4().to_string(),
        follower,
        tick: tokio::time::interval(Duration::from_secs(2)),
        ticks: 0,
        refreshing: None,
        follow,
        multi_thread,
        shutdown: shutdown.clone(),
    };
    Ok((delivery, consumer))
}

impl Processor for Delivery {
    type Due = Upkeep;

    async fn process(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        let span = process_span(m, &self.cfg.group);
        deliver(m, &self.registry, &self.hub, &self.shutdown, &span).instrument(span.clone()).await;
        Ok(())
    }

    fn due(&mut self) -> impl std::future::Future<Output = Upkeep> + Send {
        let (shared, tick) = (&self.shared, &mut self.tick);
        async move {
            tokio::select! {
                biased;
                _ = shared.wake.notified() => Upkeep::Announce,
                _ = tick.tick() => Upkeep::Tick,
            }
        }
    }

    async fn on_due(&mut self, due: Upkeep) -> Result<(), StageError> {
        let (cfg, hub, shared) = (&self.cfg, &self.hub, &self.shared);
        match due {
            Upkeep::Announce => {
                let parts = std::mem::take(&mut *shared.to_announce.lock().expect("lock"));
                let parts: Vec<i32> = parts
                    .into_iter()
                    .filter(|p| hub.owns(*p) || shared.pending.lock().expect("lock").contains(p))
                    .collect();
                if !parts.is_empty() {
                    if let Err(e) =
                        owners::announce(&self.producer, &cfg.owners_topic, &self.owners, &self.instance, &parts).await
                    {
                        warn!(error = %e, "Announcing ownership failed; retrying on the next tick.");
                        shared.to_announce.lock().expect("lock").extend(parts);
                    }
                }
            }
            Upkeep::Tick => {
                self.ticks += 1;
                maintain(&self.consumer, cfg, hub, shared, self.multi_thread);
                if self.ticks.is_multiple_of(5) && self.refreshing.as_ref().is_none_or(|j| j.is_finished()) {
                    let (c, h, t, f) = (self.consumer.clone(), hub.clone(), cfg.topic.clone(), self.follow.clone());
                    self.refreshing = Some(tokio::task::spawn_blocking(move || refresh(&c, &t, &h, &f)));
                }
            }
        }
        Ok(())
    }

    async fn finish(self, ended: Result<(), StageError>) -> Result<(), StageError> {
        self.hub.close_all();
        self.follower.abort();
        // Leaving the group now (instead of when the session times out) moves our partitions at once.
        self.consumer.unsubscribe();
        if let Some(job) = self.refreshing {
            let _ = job.await;
        }
        info!("Delivery left the group.");
        ended
    }
}

fn partition_count<C: Consumer<X>, X: ConsumerContext>(c: &C, topic: &str) -> Result<i32, StageError> {
    Ok(tidings_core::kafka::partition_count(c.client(), topic, Duration::from_secs(10))?)
}

/// Refreshes per-partition lag and the partition count. Runs on a blocking thread beside the
/// poll loop: a dozen broker round trips inline would hold up delivery every time.
fn refresh(consumer: &StreamConsumer<DeliveryContext>, topic: &str, hub: &Hub, follow: &Mutex<PartitionFollow>) {
    for p in hub.owned() {
        if let Ok((low, high)) = consumer.fetch_watermarks(topic, p, WATERMARK_TIMEOUT) {
            hub.set_low_watermark(p, low);
            hub.set_high_watermark(p, high);
        }
    }
    if let Ok(n) = partition_count(consumer, topic) {
        if let Some(n) = follow.lock().expect("lock").observe(n, std::time::Instant::now()) {
            partitions::apply(hub, n);
        }
    }
}

/// Periodic work: start partitions whose watermarks were unavailable and re-announce ownership
/// that failed to send.
fn maintain(
    consumer: &StreamConsumer<DeliveryContext>,
    cfg: &DeliveryConfig,
    hub: &Hub,
    shared: &Shared,
    multi_thread: bool,
) {
    let pending: Vec<i32> = shared.pending.lock().expect("lock").iter().copied().collect();
    for p in pending {
        let started = blocking(multi_thread, || {
            let Tail { offset, low, high } = tail(consumer, &cfg.topic, p, hub.config().ring_events)?;
            consumer.seek(&cfg.topic, p, Offset::Offset(offset), WATERMARK_TIMEOUT)?;
            Ok::<_, KafkaError>((offset, low, high))
        });
        match started {
            Ok((start, low, high)) => {
                hub.assign(p, start, high);
                hub.set_low_watermark(p, low);
                shared.pending.lock().expect("lock").remove(&p);
                shared.to_announce.lock().expect("lock").push(p);
                shared.wake.notify_one();
            }
            Err(e) => warn!(error = %e, "Partition {p} still cannot be started; retrying."),
        }
    }
    if !shared.to_announce.lock().expect("lock").is_empty() {
        shared.wake.notify_one();
    }
}

/// The record's consumer span (messaging conventions), the child of its producer span. DEBUG, as
/// every messaging span (see tidings_core::trace): nothing is built unless traced.
fn process_span(m: &BorrowedMessage<'_>, group: &str) -> tracing::Span {
    let span = tracing::debug_span!(
        "process",
        otel.name = %format_args!("process {}", m.topic()),
        otel.kind = "consumer",
        messaging.system = trace::MESSAGING_SYSTEM,
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = m.topic(),
        messaging.destination.partition.id = %m.partition(),
        messaging.kafka.offset = m.offset(),
        messaging.consumer.group.name = group,
    );
    if let (false, Some(h)) = (span.is_disabled(), m.headers()) {
        trace::set_span_parent(&span, trace::extract_context(h));
    }
    span
}

/// Decodes one notification and hands it to the hub. Undecodable records are skipped here (the
/// persistence stage dead-letters the same record with its reason); a registry outage is waited out.
/// While `span` is traced, each event carries it for the streams' write spans.
async fn deliver(
    m: &BorrowedMessage<'_>,
    registry: &RegistryClient,
    hub: &Hub,
    shutdown: &CancellationToken,
    span: &tracing::Span,
) {
    let (p, o) = (m.partition(), m.offset());
    let Some(payload) = m.payload() else {
        hub.skip(p, o);
        return;
    };
    let what = || format!("Decoding notification {p}@{o} through the schema registry");
    let window = (Duration::from_millis(200), Duration::from_secs(5));
    let decode =
        || registry.decode_as(payload, &NOTIFICATION_SCHEMA, Notification::decode_datum, Notification::from_value);
    let n = match until_done(shutdown, what, window, decode, DecodeError::is_retriable).await {
        Ok(n) => n,
        // Stopping: the streams end with `reconnect` and the next owner delivers it.
        Err(GaveUp::ShutDown(_)) => return,
        Err(GaveUp::Failed(e)) => {
            warn!(error = %e, reason = e.reason_code(), "Skipping undecodable notification {p}@{o} (dead-lettered by persistence).");
            metrics::counter!("tidings_gateway_undecodable_total").increment(1);
            hub.skip(p, o);
            return;
        }
    };
    let ts = if n.occurred_at > 0 { n.occurred_at / 1000 } else { m.timestamp().to_millis().unwrap_or(0) };
    // A group record is one event per recipient, all at this position.
    let mut events = hub.events_of(p, o, n, ts);
    if let Some(r) = trace::SpanRef::of(span) {
        let group = events.len() > 1;
        for e in &mut events {
            e.trace = Some(if group { Traced::Linked(r.clone()) } else { Traced::Child(r.clone()) });
        }
    }
    for e in &events {
        if let Some(home) = hub.partition_of(&e.user).filter(|home| *home != p) {
            // Keyed by something other than the user id with murmur2 (or grouped by another
            // partition count): the user's stream lives on another partition and never sees this.
            metrics::counter!("tidings_gateway_misrouted_total").increment(1);
            warn!(user = %e.user, "Notification {p}@{o} is not on its user's partition {home}.");
        }
    }
    hub.push_all(events);
}
