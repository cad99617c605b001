//! Shared plumbing for every tidings stage: the Confluent wire format, schema-guided JSON⇄Avro
//! conversion, the cached schema-registry client, the notification record and Kafka client settings.
//! No stage logic lives here; the crate is small enough to fuzz and property-test in isolation.

pub mod avro_binary;
pub mod client_stats;
pub mod consumer;
pub mod error;
pub mod http;
pub mod json_avro;
pub mod kafka;
pub mod lag;
pub mod notification;
pub mod registry;
pub mod retry;
pub mod shutdown;
pub mod source;
pub mod stage;
pub mod status;
pub mod testing;
pub mod trace;
pub mod wire;

pub use error::{CodecError, RegistryError};
pub use notification::{Notification, NotificationEncoder, SharedFields};
pub use registry::{DecodeError, FramedEncoder, RegistryClient, RegistryEndpoint};
pub use stage::StageError;
