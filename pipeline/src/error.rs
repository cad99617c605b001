//! Errors of the pipeline stages, each saying whether a retry (restart of the stage) can help.

use tidings_core::RegistryError;
use tidings_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("schema registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the broker did not acknowledge an output: {0}")]
    Delivery(String),
    #[error("configuration: {0}")]
    Config(String),
}

impl StageError {
    /// Whether restarting the stage may succeed: broker and registry outages are transient,
    /// configuration mistakes are not.
    pub fn is_retriable(&self) -> bool {
        match self {
            StageError::Kafka(_) | StageError::Delivery(_) => true,
            StageError::Registry(e) => e.is_retriable(),
            StageError::Store(e) => e.is_retriable(),
            StageError::Config(_) => false,
        }
    }
}
