//! How the templating stage is configured and started: its tunables are the `stages.templating`
//! section of topology.yaml ([`TemplatingStage`], serde, unknown keys refused, defaults
//! documented there); [`spawn`] runs it under the process's task tree.

use std::sync::Arc;
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::{StageHealth, TaskTree};
use tidings_core::RegistryEndpoint;
use tidings_store::Store;

pub use crate::topology::TemplatingStage;
use crate::topology::Topology;

use super::{TemplatingConfig, STAGE};

impl TemplatingConfig {
    /// The stage of `topology` (its `stages.templating`), on these Kafka and registry settings.
    pub fn new(kafka: KafkaConfig, registry: RegistryEndpoint, topology: Arc<Topology>) -> Self {
        TemplatingConfig { kafka, registry, topology, health: StageHealth::default() }
    }
}

/// Runs the stage under `tasks` until their shutdown. The check it returns is true while the
/// stage runs, not while it waits to restart after a broker or registry outage (for `/readyz`).
pub fn spawn(tasks: &mut TaskTree, cfg: TemplatingConfig, store: Store) -> impl Fn() -> bool + Send + Sync + 'static {
    let health = cfg.health.clone();
    let shutdown = tasks.token().clone();
    tasks.spawn(STAGE, async move { super::run(cfg, store, shutdown).await });
    move || health.is_up()
}
