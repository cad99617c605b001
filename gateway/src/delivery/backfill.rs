//! Reads a range of an owned partition back from Kafka for the ring: a resume older than the ring
//! (clients that were away while a gateway restarted) is then served whole from memory, chat copies
//! included, which the store does not hold. One read serves every resume of that partition.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tidings_core::kafka::KafkaConfig;
use tidings_core::notification::NOTIFICATION_SCHEMA;
use tidings_core::{DecodeError, Notification, RegistryClient};

use super::campaigns::CampaignCounts;
use super::Event;

/// Why a backfill failed (the resume then falls back to the store, or to `reset`).
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("Kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The range starts before the partition's log start (retention removed it).
    #[error("offset {0} is no longer in the log")]
    Gone(i64),
    #[error("no record arrived for {0:?}")]
    Timeout(Duration),
    #[error("decoding a notification: {0}")]
    Registry(#[from] DecodeError),
}

/// Where backfills read from: the notifications topic through an assign-only consumer.
#[derive(Clone)]
pub struct LogSource {
    pub kafka: KafkaConfig,
    pub registry: RegistryClient,
    /// Physical notifications topic.
    pub topic: String,
    /// A group id for the reader (required by librdkafka; it never joins nor commits).
    pub group: String,
}

impl std::fmt::Debug for LogSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogSource").field("topic", &self.topic).finish_non_exhaustive()
    }
}

/// The most a single fetch may wait for more records: the range is known to exist.
const IDLE: Duration = Duration::from_secs(5);

impl LogSource {
    /// Every notification of `partition` with an offset in [`from`, `to`), oldest first. Records
    /// that do not decode are left out, as delivery skips them (persistence dead-letters them).
    /// Campaign notifications carry their counter from `counts`.
    pub async fn read(
        &self,
        partition: i32,
        from: i64,
        to: i64,
        counts: &CampaignCounts,
    ) -> Result<Vec<Arc<Event>>, BackfillError> {
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        let consumer: StreamConsumer = self
            .kafka
            .consumer_with(
                &self.group,
                &[("fetch.wait.max.ms", "10")],
                &[
                    ("enable.auto.commit", "false"),
                    // A start before the log start is an error here, not a silent jump.
                    ("auto.offset.reset", "error"),
                ],
            )
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        loop {
            let m = match tokio::time::timeout(IDLE, consumer.recv()).await {
                Err(_) => return Err(BackfillError::Timeout(IDLE)),
                Ok(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    return Err(BackfillError::Gone(from))
                }
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(m)) => m,
            };
            let o = m.offset();
            if m.partition() != partition || o < from {
                continue;
            }
            if o >= to {
                break;
            }
            if let Some(payload) = m.payload() {
                let decoded = self
                    .registry
                    .decode_as(payload, &NOTIFICATION_SCHEMA, Notification::decode_datum, Notification::from_value)
                    .await;
                match decoded {
                    Ok(n) => {
                        let ts = m.timestamp().to_millis().unwrap_or(0);
                        out.extend(counts.events_of(partition, o, n, ts).into_iter().map(Arc::new));
                    }
                    Err(e) if e.is_retriable() => return Err(e.into()),
                    Err(_) => {}
                }
            }
            if o + 1 >= to {
                break;
            }
        }
        Ok(out)
    }
}
