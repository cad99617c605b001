//! Kafka CreateTimes of the records a run produced, read by an assigned consumer: when each stage
//! handed a record on, to split a latency into hops.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tidings_core::kafka::KafkaConfig;

/// The newest CreateTime per (topic, key) and per (topic, `partition.offset`), and how many
/// records each topic had.
pub(super) type TimesSeen = (HashMap<(String, String), i64>, HashMap<String, usize>);

/// The CreateTime (ms) of every record produced to some topics after it started, by topic and key,
/// read by an assigned consumer (no group rebalance to wait for). Producers stamp it when they
/// produce, so it tells when each stage handed a record on. Stops when dropped.
pub(super) struct RecordTimes {
    /// Each topic's partition count: what the hops' request counts scale with.
    pub(super) partitions: serde_json::Map<String, Value>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) seen: Arc<Mutex<TimesSeen>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl RecordTimes {
    pub(super) fn start(brokers: &str, topics: &[&str]) -> anyhow::Result<RecordTimes> {
        let group = format!("tidings-bench-times-{}", uuid::Uuid::new_v4().simple());
        // It reads CreateTimes, not arrival times: large, slow fetches keep it off the broker's CPU.
        let consumer: BaseConsumer = KafkaConfig::new(brokers)
            .consumer_with(&group, &[("fetch.min.bytes", "1048576"), ("fetch.wait.max.ms", "200")], &[])
            .create()?;
        let (mut tpl, mut counts) = (TopicPartitionList::new(), serde_json::Map::new());
        for t in topics {
            let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
            let partitions = md.topics().first().map_or(0, |m| m.partitions().len());
            if partitions == 0 {
                bail!("topic {t} has no partitions");
            }
            counts.insert(t.to_string(), json!(partitions));
            for p in 0..partitions as i32 {
                // From the end: a scenario run after another on the same topics counts its own.
                let (_, high) = consumer.fetch_watermarks(t, p, Duration::from_secs(10))?;
                tpl.add_partition_offset(t, p, Offset::Offset(high))?;
            }
        }
        consumer.assign(&tpl)?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new((HashMap::new(), HashMap::new())));
        let thread = std::thread::spawn({
            let (stop, seen) = (stop.clone(), seen.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else { continue };
                    let Some(ts) = m.timestamp().to_millis() else { continue };
                    let mut seen = seen.lock().unwrap();
                    if let Some(key) = m.key() {
                        seen.0.insert((m.topic().to_string(), String::from_utf8_lossy(key).into_owned()), ts);
                    }
                    // Group records have no key: found by position.
                    seen.0.insert((m.topic().to_string(), format!("{}.{}", m.partition(), m.offset())), ts);
                    *seen.1.entry(m.topic().to_string()).or_default() += 1;
                }
            }
        });
        Ok(RecordTimes { partitions: counts, stop, seen, thread: Some(thread) })
    }

    pub(super) fn get(&self, topic: &str, key: &str) -> Option<i64> {
        self.seen.lock().unwrap().0.get(&(topic.to_string(), key.to_string())).copied()
    }

    /// Records of `topic` read so far.
    pub(super) fn count(&self, topic: &str) -> usize {
        self.seen.lock().unwrap().1.get(topic).copied().unwrap_or(0)
    }
}

impl Drop for RecordTimes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
