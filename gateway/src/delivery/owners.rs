//! Which gateway owns which partition, learned through Kafka itself: each instance, when assigned
//! partitions, appends `partition → its URL` to a compacted one-partition owners topic, and every
//! instance reads that topic from the start. The log order decides: a new owner writes after the
//! group assigned it, which is after the previous owner gave the partition up.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tidings_core::kafka::KafkaConfig;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::consumer::DeliveryError;

/// One record of the owners topic; the key is `<notifications topic>/<partition>`, so compaction
/// keeps the latest owner of each partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerRecord {
    pub topic: String,
    pub partition: i32,
    pub url: String,
    pub instance: String,
    pub at_ms: i64,
}

/// The directory as this instance knows it.
#[derive(Debug)]
pub struct Owners {
    self_url: String,
    topic: String,
    map: RwLock<HashMap<i32, String>>,
}

impl Owners {
    /// A directory for partitions of `topic`, as seen by the instance reachable at `self_url`.
    pub fn new(self_url: &str, topic: &str) -> Arc<Owners> {
        Arc::new(Owners { self_url: self_url.to_string(), topic: topic.to_string(), map: RwLock::new(HashMap::new()) })
    }

    pub fn self_url(&self) -> &str {
        &self.self_url
    }

    /// The last announced owner of `partition`.
    pub fn owner(&self, partition: i32) -> Option<String> {
        self.map.read().expect("lock").get(&partition).cloned()
    }

    /// Applies one record read from the owners topic (records of other topics are ignored).
    pub fn apply(&self, rec: &OwnerRecord) {
        if rec.topic == self.topic {
            self.map.write().expect("lock").insert(rec.partition, rec.url.clone());
        }
    }
}

/// Appends "this instance owns `partitions`" to the owners topic and waits for the broker's ack.
pub async fn announce(
    producer: &FutureProducer,
    owners_topic: &str,
    owners: &Owners,
    instance: &str,
    partitions: &[i32],
) -> Result<(), DeliveryError> {
    for &partition in partitions {
        let rec = OwnerRecord {
            topic: owners.topic.clone(),
            partition,
            url: owners.self_url.clone(),
            instance: instance.to_string(),
            at_ms: chrono::Utc::now().timestamp_millis(),
        };
        let key = format!("{}/{}", rec.topic, partition);
        let value = serde_json::to_vec(&rec).expect("owner record serializes");
        producer
            .send(FutureRecord::to(owners_topic).key(&key).payload(&value).partition(0), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| DeliveryError::Kafka(e))?;
        // Our own reader will see it too, but redirects from this instance should not wait for that.
        owners.apply(&rec);
    }
    info!(?partitions, "Announced ownership of {} partition(s) on {owners_topic}.", partitions.len());
    Ok(())
}

/// Reads the owners topic from the beginning and keeps `owners` current until `shutdown`.
pub async fn follow(
    kafka: &KafkaConfig,
    owners_topic: &str,
    owners: Arc<Owners>,
    shutdown: CancellationToken,
) -> Result<(), DeliveryError> {
    // Assigned, not subscribed: every instance reads the whole topic, and nothing is committed.
    let cc = kafka.consumer_with(
        &format!("tidings-owners-reader-{}", uuid::Uuid::new_v4()),
        &[("auto.offset.reset", "earliest")],
        &[("enable.auto.commit", "false")],
    );
    let consumer: StreamConsumer = cc.create().map_err(DeliveryError::Kafka)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(owners_topic, 0, Offset::Beginning).map_err(DeliveryError::Kafka)?;
    consumer.assign(&tpl).map_err(DeliveryError::Kafka)?;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => match m {
                Ok(m) => match m.payload().map(serde_json::from_slice::<OwnerRecord>) {
                    Some(Ok(rec)) => {
                        debug!(partition = rec.partition, url = %rec.url, "Owner announced.");
                        owners.apply(&rec);
                    }
                    Some(Err(e)) => warn!(error = %e, offset = m.offset(), "Ignoring a malformed owners record."),
                    None => {}
                },
                Err(e) => warn!(error = %e, "Owners topic consumer error; continuing."),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_records_win_and_other_topics_are_ignored() {
        let o = Owners::new("http://a", "n");
        let rec = |url: &str, topic: &str| OwnerRecord {
            topic: topic.into(),
            partition: 3,
            url: url.into(),
            instance: "i".into(),
            at_ms: 0,
        };
        o.apply(&rec("http://b", "n"));
        o.apply(&rec("http://c", "n"));
        o.apply(&rec("http://d", "other"));
        assert_eq!(o.owner(3).as_deref(), Some("http://c"));
        assert_eq!(o.owner(4), None);
    }
}
