//! The scheduler stage: keeps the records templating holds on `tidings.scheduled` (a notification
//! inside its user's quiet hours, a campaign whose send_at is later) in the store, and at their
//! time produces each unchanged to its destination under its deterministic id.
//!
//! - `clock`: where "now" comes from; `records`: the release headers and the stored headers'
//!   encoding; `processor`: the loop.
//!
//! A record is stored (`scheduled_releases`, keyed by its release id, a second copy ignored)
//! before its offset is, so none is lost. Every tick the owner of a `tidings.scheduled` partition
//! releases that partition's due rows in batches: produced, acknowledged, then marked released.
//! A crash between the produce and the mark releases the batch again with the same ids, which
//! downstream absorbs (notification ids, the campaign's event id); so does a double release by two
//! instances during a rebalance. Released rows are kept `retain_released` so a copy read again is
//! not released twice, then purged.

pub mod clock;
pub mod processor;
pub mod records;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use tidings_core::consumer::{Assigned, Partition, RebalanceHooks, StageContext, StartOffsets};
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::{StageHealth, TaskTree};
use tidings_core::stage::{DeadLetters, StageError};
use tidings_store::Store;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::topology::Topology;
pub use clock::{Clock, ClockError, FileClock, SystemClock};
use processor::Scheduler;
pub use records::{H_RELEASED_AT, H_RELEASE_AT, H_RELEASE_ID, H_RELEASE_TO};

/// Name used in dead-letter headers, logs and metrics.
pub const STAGE: &str = "scheduler";

/// What the scheduler consumes, where it may produce and how it batches.
#[derive(Clone)]
pub struct SchedulerConfig {
    pub kafka: KafkaConfig,
    /// `tidings.scheduled` (cluster name).
    pub input: String,
    /// Dead-letter topic (cluster name) for records without valid release headers.
    pub dead_letter: String,
    /// Consumer group (prefixed).
    pub group: String,
    /// The topics a record may be released to: every topic of the topology (cluster names). A
    /// `tidings.release-to` naming another is a dead letter.
    pub destinations: HashSet<String>,
    /// How often due records are looked for (default 1 s).
    pub tick: Duration,
    /// Most records stored per store transaction and released per store query (default 1,000).
    pub batch_size: usize,
    /// How long a released record's id is kept (default 7 days).
    pub retain_released: Duration,
    /// "Now": the system's time, or a test's.
    pub clock: Arc<dyn Clock>,
    /// Up while the stage runs (not while it waits to restart); for `/readyz`.
    pub health: StageHealth,
}

impl SchedulerConfig {
    /// The stage on `topology`'s `stages.scheduler` (or its defaults), with the system's clock.
    pub fn new(kafka: KafkaConfig, topology: &Topology) -> Result<Self, StageError> {
        let stage = &topology.stages.scheduler;
        for t in [&stage.input, &stage.dead_letter] {
            if !topology.topics.contains_key(t) {
                return Err(StageError::configuration(format!("topology.yaml declares no topic `{t}`")));
            }
        }
        Ok(SchedulerConfig {
            kafka,
            input: topology.topic_name(&stage.input),
            dead_letter: topology.topic_name(&stage.dead_letter),
            group: topology.group_name(&stage.group),
            destinations: topology.topics.keys().map(|t| topology.topic_name(t)).collect(),
            tick: Duration::from_millis(stage.tick_ms),
            batch_size: stage.batch_size,
            retain_released: Duration::from_millis(stage.retain_released_ms),
            clock: Arc::new(SystemClock),
            health: StageHealth::default(),
        })
    }

    /// The same with `clock` as "now".
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

/// Runs the stage under `tasks`; the returned check is its readiness.
pub fn spawn(tasks: &mut TaskTree, cfg: SchedulerConfig, store: Store) -> impl Fn() -> bool + Send + Sync + 'static {
    let health = cfg.health.clone();
    let shutdown = tasks.token().clone();
    tasks.spawn(STAGE, async move { run(cfg, store, shutdown).await });
    move || health.is_up()
}

/// Runs the stage until `shutdown` on the shared skeleton, restarting after transient failures
/// (from the committed offsets; what was stored stays stored).
pub async fn run(cfg: SchedulerConfig, store: Store, shutdown: CancellationToken) -> Result<(), StageError> {
    let health = cfg.health.clone();
    tidings_core::stage::run(STAGE, &health, &shutdown, || start(&cfg, &store)).await
}

/// The `tidings.scheduled` partitions this process owns, kept by the consumer's rebalance hooks:
/// only their rows are released here.
#[derive(Clone, Default)]
pub struct Owned {
    topic: String,
    partitions: Arc<Mutex<BTreeSet<i32>>>,
}

impl Owned {
    pub fn partitions(&self) -> Vec<i32> {
        self.partitions.lock().expect("lock").iter().copied().collect()
    }
}

impl RebalanceHooks for Owned {
    fn on_assign(&self, assigned: &[Assigned]) {
        let mut owned = self.partitions.lock().expect("lock");
        owned.extend(assigned.iter().filter(|a| a.topic == self.topic).map(|a| a.partition));
    }

    fn on_revoke(&self, revoked: &[Partition]) {
        let mut owned = self.partitions.lock().expect("lock");
        for (_, p) in revoked.iter().filter(|(t, _)| *t == self.topic) {
            owned.remove(p);
        }
    }
}

/// The consumer context: the group's committed offsets, the owned partitions.
pub type SchedulerContext = StageContext<Owned>;

async fn start(
    cfg: &SchedulerConfig,
    store: &Store,
) -> Result<(Scheduler, Arc<StreamConsumer<SchedulerContext>>), StageError> {
    if cfg.batch_size == 0 {
        return Err(StageError::configuration("the scheduler's batch size must be at least 1"));
    }
    if cfg.tick.is_zero() {
        return Err(StageError::configuration("the scheduler's tick must be at least 1 ms"));
    }
    let owned = Owned { topic: cfg.input.clone(), partitions: Arc::default() };
    let ctx = StageContext::new("scheduler-consumer", StartOffsets::Committed, owned.clone()).with_group(&cfg.group);
    let consumer: Arc<StreamConsumer<SchedulerContext>> =
        Arc::new(tidings_core::client_stats::reporting(cfg.kafka.consumer(&cfg.group)).create_with_context(ctx)?);
    consumer.subscribe(&[cfg.input.as_str()])?;
    let producer: FutureProducer = cfg.kafka.producer().create()?;
    info!(input = %cfg.input, tick_ms = cfg.tick.as_millis() as u64, "Scheduler keeping {} and releasing what is due.", cfg.input);
    let scheduler = Scheduler {
        cfg: cfg.clone(),
        store: store.clone(),
        producer: producer.clone(),
        dead: DeadLetters::new(producer, cfg.dead_letter.clone(), STAGE),
        consumer: consumer.clone(),
        owned,
        read: Vec::new(),
        next: Default::default(),
        dead_letters: Vec::new(),
        next_tick: Instant::now(),
    };
    Ok((scheduler, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Topology::load(&root.join("topology.yaml")).unwrap().with_prefix("t-")
    }

    #[test]
    fn the_config_names_the_topologys_topics_and_settings() {
        let cfg = SchedulerConfig::new(KafkaConfig::new("127.0.0.1:1"), &topology()).unwrap();
        assert_eq!((cfg.input.as_str(), cfg.dead_letter.as_str()), ("t-tidings.scheduled", "t-tidings.dlq.scheduler"));
        assert_eq!(cfg.group, "t-tidings-scheduler");
        assert_eq!((cfg.tick, cfg.batch_size), (Duration::from_secs(1), 1_000));
        assert_eq!(cfg.retain_released, Duration::from_secs(7 * 24 * 3_600));
        assert!(cfg.destinations.contains("t-notifications") && cfg.destinations.contains("t-campaigns"));
        assert!(!cfg.destinations.contains("notifications"), "cluster names only");
    }

    /// Refused before anything is connected.
    #[tokio::test]
    async fn a_zero_batch_or_tick_is_a_configuration_error() {
        let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
        let mut cfg = SchedulerConfig::new(KafkaConfig::new("127.0.0.1:1"), &topology()).unwrap();
        cfg.batch_size = 0;
        let err = run(cfg, store.clone(), CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, StageError::Configuration(_)) && err.to_string().contains("batch size"), "{err}");
        let mut cfg = SchedulerConfig::new(KafkaConfig::new("127.0.0.1:1"), &topology()).unwrap();
        cfg.tick = Duration::ZERO;
        let err = run(cfg, store, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("tick"), "{err}");
    }
}
