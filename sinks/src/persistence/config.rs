//! Settings of the persistence stage (filled from `topology.yaml` by the binary).

use std::time::Duration;
use tidings_core::kafka::KafkaConfig;
use tidings_core::RegistryEndpoint;

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
