//! The partition count of the output topic (`notifications`) while templating runs: read at start,
//! then again every [`PARTITIONS_REFRESH`], so partitions added to the topic are followed without a
//! restart. Keyed and group records are both routed by this one count (see `Stage::process`).

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::{FutureProducer, Producer};
use tidings_core::client_stats::ClientStats;
use tidings_core::kafka::{partition_count, PARTITIONS_REFRESH};
use tokio::task::JoinHandle;
use tracing::{info, warn};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The output topic's partition count as last read (0: the topic is unknown to the brokers), kept
/// fresh by a task that ends with this value.
pub struct OutputPartitions {
    count: Arc<AtomicI32>,
    refresher: JoinHandle<()>,
}

impl OutputPartitions {
    /// Reads the count now (an error if the brokers cannot tell) and keeps reading it.
    pub async fn follow(producer: &FutureProducer<ClientStats>, topic: &str) -> KafkaResult<Self> {
        let first = read(producer.clone(), topic.to_string()).await?;
        gauge().set(first as f64);
        let count = Arc::new(AtomicI32::new(first));
        let refresher = tokio::spawn(refresh(producer.clone(), topic.to_string(), count.clone()));
        Ok(OutputPartitions { count, refresher })
    }

    /// The count to route the next record's outputs by.
    pub fn current(&self) -> i32 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for OutputPartitions {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

fn gauge() -> metrics::Gauge {
    metrics::gauge!("tidings_notifications_partitions", "stage" => "templating")
}

async fn read(producer: FutureProducer<ClientStats>, topic: String) -> KafkaResult<i32> {
    match tokio::task::spawn_blocking(move || partition_count(producer.client(), &topic, METADATA_TIMEOUT)).await {
        Ok(read) => read,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        // The runtime is shutting down.
        Err(_) => Err(KafkaError::Canceled),
    }
}

async fn refresh(producer: FutureProducer<ClientStats>, topic: String, count: Arc<AtomicI32>) {
    let mut tick = tokio::time::interval(PARTITIONS_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match read(producer.clone(), topic.clone()).await {
            // Kafka only ever adds partitions; 0 is a metadata answer without the topic.
            Ok(n) if n > 0 => {
                let was = count.swap(n, Ordering::Relaxed);
                if was != n {
                    info!(topic = %topic, was, partitions = n,
                        "{topic} has {n} partitions now (was {was}); templating routes every notification by {n} from its next event on.");
                    gauge().set(n as f64);
                }
            }
            Ok(_) => {
                warn!(topic = %topic, "{topic} is missing from the metadata; routing by {} partitions still.", count.load(Ordering::Relaxed))
            }
            Err(e) => {
                warn!(error = %e, "Reading the partition count of {topic} failed; trying again in {PARTITIONS_REFRESH:?}.")
            }
        }
    }
}
