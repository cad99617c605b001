//! The store and the bulk-persistence stage.
//!
//! - `store`: PostgreSQL (binary `COPY` into a staging table, then `INSERT … ON CONFLICT DO NOTHING`)
//!   or SQLite, always writing rows and consumed offsets in one transaction.
//! - `persistence`: the Kafka consumer stage that batches `notifications` and `chat` into the store.

pub mod error;
pub mod persistence;
pub mod store;
pub mod testing;

pub use error::StoreError;
pub use store::Store;
pub use store::{Batch, ChatMessage, InboxItem, OffsetUpdate, StoredNotification, WriteStats};
