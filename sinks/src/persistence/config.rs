//! Settings of the persistence stage and how it is started: its tunables are the
//! `stages.persistence` section of topology.yaml ([`PersistenceStage`], serde, unknown keys
//! refused, defaults documented there); [`spawn`] runs it under the process's task tree.

use std::time::Duration;
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::{StageHealth, TaskTree};
use tidings_core::RegistryEndpoint;
pub use tidings_pipeline::topology::PersistenceStage;
use tidings_pipeline::topology::Topology;
use tidings_store::Store;

/// What the persistence stage consumes and how it batches.
#[derive(Debug, Clone)]
pub struct PersistenceConfig {
    pub kafka: KafkaConfig,
    /// URL of the schema registry the records were written through.
    pub registry: RegistryEndpoint,
    /// Consumer group; also the key of the offsets stored with the rows.
    pub group: String,
    /// The `notifications` topic (cluster name).
    pub notifications_topic: String,
    /// The `chat` topic (cluster name) for room history, if persisted.
    pub chat_topic: Option<String>,
    /// Reader schema text of the chat topic (required with `chat_topic`).
    pub chat_schema: Option<String>,
    /// Dead-letter topic (cluster name) for records that cannot be stored.
    pub dead_letter: String,
    /// Rows per database transaction (default 20,000).
    pub batch_size: usize,
    /// Longest a record waits for its batch to fill (default 250 ms).
    pub linger: Duration,
    /// Up while the stage runs (not while it waits to restart); for `/readyz`.
    pub health: tidings_core::shutdown::StageHealth,
}

impl PersistenceConfig {
    /// The stage of `topology` (its `stages.persistence`): `chat` among its inputs is room
    /// history, the other input the notifications.
    pub fn new(kafka: KafkaConfig, registry: RegistryEndpoint, topology: &Topology) -> Self {
        let spec = &topology.stages.persistence;
        let chat = spec.inputs.iter().find(|t| t.as_str() == "chat");
        let notifications = spec.inputs.iter().find(|t| t.as_str() != "chat").map_or("notifications", String::as_str);
        PersistenceConfig {
            kafka,
            registry,
            group: topology.group_name(&spec.group),
            notifications_topic: topology.topic_name(notifications),
            chat_topic: chat.map(|c| topology.topic_name(c)),
            chat_schema: chat.and_then(|c| topology.schema_text(c)).map(str::to_string),
            dead_letter: topology.topic_name(&spec.dead_letter),
            batch_size: spec.batch_size,
            linger: Duration::from_millis(spec.linger_ms),
            health: StageHealth::default(),
        }
    }
}

/// Runs the stage under `tasks` until their shutdown. The check it returns is true while the
/// stage runs, not while it waits to restart after a broker or database outage (for `/readyz`).
pub fn spawn(tasks: &mut TaskTree, cfg: PersistenceConfig, store: Store) -> impl Fn() -> bool + Send + Sync + 'static {
    let health = cfg.health.clone();
    let shutdown = tasks.token().clone();
    tasks.spawn(super::STAGE, async move { super::run(cfg, store, shutdown).await });
    move || health.is_up()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stage's config comes from the topology's section alone: chat is room history, the
    /// other input the notifications, every name with the topic prefix.
    #[test]
    fn the_config_is_the_topologys_persistence_section() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
        let topology = Topology::load(&path).unwrap().with_prefix("t1.");
        let kafka = KafkaConfig::with_opts(String::new(), Vec::new()).unwrap();
        let registry =
            RegistryEndpoint { url: "http://127.0.0.1:1".into(), basic_auth: None, bearer_token: None, ca_pem: None };
        let cfg = PersistenceConfig::new(kafka, registry, &topology);
        let spec = &topology.stages.persistence;
        assert_eq!(cfg.notifications_topic, "t1.notifications");
        assert_eq!(cfg.chat_topic.as_deref(), Some("t1.chat"));
        assert_eq!(cfg.chat_schema.as_deref(), topology.schema_text("chat"));
        assert_eq!(cfg.group, topology.group_name(&spec.group));
        assert!(cfg.group.starts_with("t1."), "{}", cfg.group);
        assert_eq!(cfg.dead_letter, "t1.tidings.dlq.persistence");
        assert_eq!((cfg.batch_size, cfg.linger), (spec.batch_size, Duration::from_millis(spec.linger_ms)));
    }
}
