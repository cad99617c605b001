//! The bulk-persistence stage: the Kafka consumer stage that batches `notifications` and `chat`
//! into the store (`tidings-store`), rows and consumed offsets in one transaction.

pub mod persistence;
