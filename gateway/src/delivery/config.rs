//! Settings of the delivery stage: where it consumes from and how much it may buffer per
//! partition and per connection (every bound here keeps memory flat under any load), and
//! [`spawn`], which starts it under the process's task tree.

use std::sync::Arc;
use std::time::Duration;
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::{StageHealth, TaskTree};
use tidings_core::RegistryEndpoint;

use super::{Hub, Owners};

/// Bounds and timings of the hub (rings, connection queues, heartbeats).
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Events kept per owned partition for resumes. Default 4096.
    pub ring_events: usize,
    /// Bytes kept per owned partition for resumes. Default 4 MiB.
    pub ring_bytes: usize,
    /// Events queued per connection before it counts as slow and is closed. Default 256.
    pub queue_events: usize,
    /// Bytes queued per connection before it counts as slow and is closed. Default 256 KiB.
    pub queue_bytes: usize,
    /// Concurrent streams per user; the oldest is closed past it. Default 8.
    pub max_connections_per_user: usize,
    /// Interval of heartbeat comments on idle streams. Default 15 s.
    pub heartbeat: Duration,
    /// The `retry:` hint sent to clients (reconnect delay). Default 2 s.
    pub retry: Duration,
    /// Most notifications a resume may read from the store before answering `reset`. Default 5000.
    pub max_store_resume: usize,
    /// Notification ids remembered per owned partition, so a replay of the templating stage (the
    /// same id again at a later offset) reaches each stream at most once. Default 8192.
    pub dedupe_ids: usize,
    /// Most events a backfill from Kafka may add to a ring for resumes older than it (0: none;
    /// those resumes go to the store). Default 65536.
    pub backfill_events: usize,
    /// Most bytes a backfill may add to a ring (per owned partition, so 12 partitions at most
    /// 192 MiB more for a minute). Default 16 MiB: about 9 s of the 3,000-user chat benchmark.
    pub backfill_bytes: usize,
    /// How long a backfilled ring keeps the larger bounds (the reconnect herd after a gateway
    /// restart comes within seconds). Default 60 s.
    pub backfill_hold: Duration,
    /// Campaigns whose delivered counts are kept at once (campaign ids come from Kafka records);
    /// past it the least recently touched is flushed and forgotten. Default 1000.
    pub max_campaigns: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            ring_events: 4096,
            ring_bytes: 4 << 20,
            queue_events: 256,
            queue_bytes: 256 << 10,
            max_connections_per_user: 8,
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            max_store_resume: 5000,
            dedupe_ids: 8192,
            backfill_events: 65536,
            backfill_bytes: 16 << 20,
            backfill_hold: Duration::from_secs(60),
            max_campaigns: super::campaigns::DEFAULT_MAX_CAMPAIGNS,
        }
    }
}

/// The delivery stage's Kafka side.
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    pub kafka: KafkaConfig,
    pub registry: RegistryEndpoint,
    /// Up while the stage runs (not while it waits to restart); for `/readyz`.
    pub health: tidings_core::shutdown::StageHealth,
    /// Physical notifications topic.
    pub topic: String,
    /// Delivery consumer group (all gateway instances share it).
    pub group: String,
    /// Physical owners topic (compacted, one partition): partition → owning gateway URL (this
    /// instance's URL is the `Owners` directory's `self_url`).
    pub owners_topic: String,
}

impl DeliveryConfig {
    /// Delivery of the physical `topic` by `group`, announcing owned partitions on `owners_topic`.
    pub fn new(
        kafka: KafkaConfig,
        registry: RegistryEndpoint,
        topic: String,
        group: String,
        owners_topic: String,
    ) -> Self {
        DeliveryConfig { kafka, registry, health: StageHealth::default(), topic, group, owners_topic }
    }
}

/// Runs the stage under `tasks` until their shutdown, feeding `hub` and announcing ownership
/// through `owners`. The check it returns is true while the stage runs and the hub has caught
/// up with its partitions (for `/readyz`).
pub fn spawn(
    tasks: &mut TaskTree,
    cfg: DeliveryConfig,
    hub: Arc<Hub>,
    owners: Arc<Owners>,
) -> impl Fn() -> bool + Send + Sync + 'static {
    let health = cfg.health.clone();
    let (shutdown, ready) = (tasks.token().clone(), hub.clone());
    tasks.spawn(super::consumer::STAGE, async move { super::consumer::run(cfg, hub, owners, shutdown).await });
    move || health.is_up() && ready.is_ready()
}
