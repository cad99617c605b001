//! librdkafka's own statistics as gauges: per client and broker, the round trip, the producer's
//! queue wait and the request queue wait, so a slow hop can be pinned on a client's queue, the
//! network or the broker, and the requests it sent by kind (each produce request carries one
//! partition in librdkafka). Clients report every `statistics.interval.ms` (10 s unless overridden).
//! A consumer's report also gives its group's lag, under the names Kafka operators alert on.

use metrics::Label;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::statistics::{Statistics, Window};

/// How often clients report their statistics unless `--kafka-opt statistics.interval.ms` says
/// otherwise (0 turns them off). Each report is a few KB of JSON per client.
pub const STATS_INTERVAL_MS: &str = "10000";

/// `cfg` with reports every [`STATS_INTERVAL_MS`] unless the operator's settings already hold an
/// interval. Only for clients whose context records them ([`ClientStats`], or one calling
/// [`record`]): any other client would build and parse reports for nobody.
pub fn reporting(mut cfg: ClientConfig) -> ClientConfig {
    if cfg.get("statistics.interval.ms").is_none() {
        cfg.set("statistics.interval.ms", STATS_INTERVAL_MS);
    }
    cfg
}

/// A client context that records its client's statistics under the `client` label.
#[derive(Debug, Clone, Copy)]
pub struct ClientStats {
    client: &'static str,
}

impl ClientStats {
    pub fn new(client: &'static str) -> Self {
        ClientStats { client }
    }
}

impl ClientContext for ClientStats {
    fn stats(&self, statistics: Statistics) {
        record(self.client, &statistics);
    }
}

impl ConsumerContext for ClientStats {}

/// One gauge reading of a statistics report.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: f64,
}

/// Picks one window out of a broker's report.
type WindowOf = fn(&rdkafka::statistics::Broker) -> &Option<Window>;

/// Gauges of the windows in each broker's report (microseconds there, seconds here).
const WINDOWS: [(&str, WindowOf); 3] = [
    // Request sent → response read; a consumer's include its fetches' long-poll waits.
    ("tidings_kafka_rtt_seconds", |b| &b.rtt),
    // produce() → the record's request written (linger and queueing in the client).
    ("tidings_kafka_producer_queue_seconds", |b| &b.int_latency),
    // A request ready → handed to the socket (the broker thread's output queue).
    ("tidings_kafka_request_queue_seconds", |b| &b.outbuf_latency),
];

/// Request kinds counted per broker: the ones a record's path costs (librdkafka sends one produce
/// request per partition, so these show what the partition count costs a hop).
const REQUESTS: [&str; 2] = ["Produce", "Fetch"];

/// The gauges of one report: the client's queued records, and per broker with a node id (not the
/// bootstrap or coordinator aliases) the [`REQUESTS`] it sent since the client started, and per
/// window that saw samples in the last interval, its p50, p99 and max (label `stat`).
pub fn samples(client: &str, s: &Statistics) -> Vec<Sample> {
    let mut out = vec![Sample {
        name: "tidings_kafka_queued_messages",
        labels: vec![("client", client.into())],
        value: s.msg_cnt as f64,
    }];
    let mut brokers: Vec<_> = s.brokers.values().filter(|b| b.nodeid >= 0).collect();
    brokers.sort_by_key(|b| b.nodeid);
    for b in brokers {
        for kind in REQUESTS {
            let Some(&n) = b.req.get(kind).filter(|n| **n > 0) else { continue };
            out.push(Sample {
                name: "tidings_kafka_requests",
                labels: vec![("client", client.into()), ("broker", b.nodeid.to_string()), ("request", kind.into())],
                value: n as f64,
            });
        }
        for (name, window) in WINDOWS {
            let Some(w) = window(b).as_ref().filter(|w| w.cnt > 0) else { continue };
            for (stat, micros) in [("p50", w.p50), ("p99", w.p99), ("max", w.max)] {
                out.push(Sample {
                    name,
                    labels: vec![("client", client.into()), ("broker", b.nodeid.to_string()), ("stat", stat.into())],
                    value: micros as f64 / 1e6,
                });
            }
        }
    }
    out
}

/// The lag gauges of a consumer's report, for its `group`: per assigned partition
/// `kafka_consumergroup_lag` (messages from its position, see [`crate::lag::standings`], to the
/// last stable offset or high watermark), and per topic `kafka_consumergroup_lag_sum`. A partition
/// whose position or end is not known yet (librdkafka's −1001) is left out of both, so a sum never
/// counts it.
pub fn lag_samples(group: &str, s: &Statistics) -> Vec<Sample> {
    lag_samples_at(group, &crate::lag::positions(group, &crate::lag::standings(s)))
}

/// The lag gauges of `group` at `(topic, partition, position, end)` (sorted by topic), leaving
/// out partitions whose position or end is not known.
pub fn lag_samples_at(group: &str, at: &[(String, i32, Option<i64>, Option<i64>)]) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut topics: Vec<&str> = at.iter().map(|x| x.0.as_str()).collect();
    topics.dedup();
    for topic in topics {
        let mut sum = None;
        for (_, partition, position, end) in at.iter().filter(|x| x.0 == topic) {
            let (Some(position), Some(end)) = (position, end) else { continue };
            let lag = (end - position).max(0);
            *sum.get_or_insert(0) += lag;
            out.push(Sample {
                name: "kafka_consumergroup_lag",
                labels: vec![
                    ("consumergroup", group.into()),
                    ("topic", topic.to_string()),
                    ("partition", partition.to_string()),
                ],
                value: lag as f64,
            });
        }
        if let Some(sum) = sum {
            out.push(Sample {
                name: "kafka_consumergroup_lag_sum",
                labels: vec![("consumergroup", group.into()), ("topic", topic.to_string())],
                value: sum as f64,
            });
        }
    }
    out
}

/// Sets the lag gauges of `group` at these positions (see [`lag_samples_at`]).
pub fn set_lag(group: &str, at: &[(String, i32, Option<i64>, Option<i64>)]) {
    set(lag_samples_at(group, at));
}

/// Sets the lag gauges of a consumer's report for its `group` (see [`lag_samples`]).
pub fn record_lag(group: &str, s: &Statistics) {
    set(lag_samples(group, s));
}

/// Sets the gauges of one report (for contexts that have other work too, e.g. rebalancing).
pub fn record(client: &str, s: &Statistics) {
    set(samples(client, s));
}

fn set(samples: Vec<Sample>) {
    for x in samples {
        let labels: Vec<Label> = x.labels.into_iter().map(|(k, v)| Label::new(k, v)).collect();
        metrics::gauge!(x.name, labels).set(x.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Keeps the last report a real client sent.
    #[derive(Default)]
    struct Keep(Mutex<Option<Statistics>>);

    impl ClientContext for Keep {
        fn stats(&self, statistics: Statistics) {
            *self.0.lock().unwrap() = Some(statistics);
        }
    }

    impl ConsumerContext for Keep {}

    impl rdkafka::producer::ProducerContext for Keep {
        type DeliveryOpaque = ();
        fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
    }

    #[test]
    fn reporting_keeps_the_operators_interval() {
        assert_eq!(reporting(ClientConfig::new()).get("statistics.interval.ms"), Some(STATS_INTERVAL_MS));
        let mut own = ClientConfig::new();
        own.set("statistics.interval.ms", "0");
        assert_eq!(reporting(own).get("statistics.interval.ms"), Some("0"));
    }

    #[test]
    fn a_producers_report_gives_its_round_trips_and_queue_waits() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let producer: BaseProducer<Keep> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("statistics.interval.ms", "100")
            .set("linger.ms", "5")
            .create_with_context(Keep::default())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let found = loop {
            producer.send(BaseRecord::<(), str>::to("t").payload("x")).unwrap();
            producer.poll(Duration::from_millis(50));
            let report = producer.context().0.lock().unwrap().clone();
            let got = report.map(|r| samples("p", &r)).unwrap_or_default();
            if got.iter().any(|x| x.name == "tidings_kafka_producer_queue_seconds")
                && got.iter().any(|x| x.name == "tidings_kafka_rtt_seconds")
            {
                break got;
            }
            assert!(Instant::now() < deadline, "no report with both windows: {got:?}");
        };
        producer.flush(Duration::from_secs(5)).unwrap();
        let rtt: Vec<&Sample> = found.iter().filter(|x| x.name == "tidings_kafka_rtt_seconds").collect();
        assert_eq!(rtt.len(), 3, "p50, p99, max of the one broker: {found:?}");
        for x in &rtt {
            assert!(x.value > 0.0 && x.value < 5.0, "{x:?}");
            assert_eq!(x.labels[0], ("client", "p".to_string()));
            assert_eq!(x.labels[1].0, "broker");
        }
        // linger.ms=5: a record waits up to 5 ms in the client before its request is written.
        let queue_max =
            found.iter().find(|x| x.name == "tidings_kafka_producer_queue_seconds" && x.labels[2].1 == "max").unwrap();
        assert!(queue_max.value >= 0.001, "{queue_max:?}");
        assert_eq!(found[0].name, "tidings_kafka_queued_messages");
        let produced = found.iter().find(|x| x.name == "tidings_kafka_requests").expect("request counts");
        assert_eq!(produced.labels[2], ("request", "Produce".to_string()));
        assert!(produced.value >= 1.0, "{produced:?}");
    }

    #[test]
    fn a_consumers_report_gives_its_groups_lag_without_unknowns() {
        use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
        use rdkafka::{Offset, TopicPartitionList};
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("t", 2, 1).unwrap();
        let producer: BaseProducer<Keep> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .create_with_context(Keep::default())
            .unwrap();
        for _ in 0..5 {
            producer.send(BaseRecord::<(), str>::to("t").partition(0).payload("x")).unwrap();
        }
        producer.send(BaseRecord::<(), str>::to("t").partition(1).payload("x")).unwrap();
        producer.flush(Duration::from_secs(5)).unwrap();
        let consumer: BaseConsumer<Keep> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("group.id", "g")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("statistics.interval.ms", "100")
            .create_with_context(Keep::default())
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(2)).unwrap();
        tpl.add_partition_offset("t", 1, Offset::Offset(0)).unwrap();
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
        // From the committed offsets, which the client then knows (an explicit start it would not).
        tpl.set_all_offsets(Offset::Stored).unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        // Committed at 2 of 5 and at 0 of 1: lags 3 and 1 once both watermarks are known.
        let (report, lags) = loop {
            let _ = consumer.poll(Duration::from_millis(50));
            let report = consumer.context().0.lock().unwrap().clone();
            if let Some(r) = report {
                let got = lag_samples("g", &r);
                if got.iter().filter(|x| x.name == "kafka_consumergroup_lag").count() == 2 {
                    break (r, got);
                }
            }
            assert!(Instant::now() < deadline, "no report with both partitions' lag");
        };
        let value = |got: &[Sample], name: &str, partition: Option<&str>| {
            got.iter()
                .find(|x| x.name == name && partition.is_none_or(|p| x.labels.get(2).is_some_and(|l| l.1 == p)))
                .map(|x| x.value)
        };
        assert_eq!(value(&lags, "kafka_consumergroup_lag", Some("0")), Some(3.0), "{lags:?}");
        assert_eq!(value(&lags, "kafka_consumergroup_lag", Some("1")), Some(1.0), "{lags:?}");
        assert_eq!(value(&lags, "kafka_consumergroup_lag_sum", None), Some(4.0), "{lags:?}");
        assert_eq!(lags[0].labels[..2], [("consumergroup", "g".to_string()), ("topic", "t".to_string())]);
        // A stage keeping its offsets in its database says where they are: that position counts,
        // ahead of the Kafka commit; once forgotten (revoked), the commit counts again.
        crate::lag::durable("g-durable", "t", 0, 1);
        let durable = lag_samples("g-durable", &report);
        assert_eq!(value(&durable, "kafka_consumergroup_lag", Some("0")), Some(4.0), "{durable:?}");
        crate::lag::forget("g-durable", [("t", 0)]);
        let committed = lag_samples("g-durable", &report);
        assert_eq!(value(&committed, "kafka_consumergroup_lag", Some("0")), Some(3.0), "{committed:?}");
        // A partition whose lag librdkafka does not know (−1) is in neither the gauges nor the sum.
        let mut unknown = report.clone();
        let p1 = unknown.topics.get_mut("t").unwrap().partitions.get_mut(&1).unwrap();
        (p1.stored_offset, p1.committed_offset, p1.app_offset) = (-1001, -1001, -1001);
        let got = lag_samples("g", &unknown);
        assert_eq!(value(&got, "kafka_consumergroup_lag", Some("1")), None, "{got:?}");
        assert_eq!(value(&got, "kafka_consumergroup_lag_sum", None), Some(3.0), "{got:?}");
        for p in unknown.topics.get_mut("t").unwrap().partitions.values_mut() {
            (p.stored_offset, p.committed_offset, p.app_offset) = (-1001, -1001, -1001);
        }
        assert!(lag_samples("g", &unknown).is_empty(), "no sum of unknowns");
    }
}
