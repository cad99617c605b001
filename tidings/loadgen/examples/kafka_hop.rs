//! One bare Kafka hop, no tidings in between: produce at a fixed rate with tidings' producer
//! settings, consume in the same process, print one JSON line with produce() → consumer latency.
//! The floor under every hop of the pipeline:
//! `cargo run --release -p tidings-loadgen --example kafka_hop -- --brokers 127.0.0.1:9092`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::Message;
use tidings_core::kafka::KafkaConfig;
use tidings_loadgen::percentiles;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "TIDINGS_TEST_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Records per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Records in all; the first quarter is not counted (group join, connections, broker JIT).
    #[arg(long, default_value_t = 20_000)]
    records: usize,
    /// Partitions of the (new) topic.
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    /// The producer's linger.ms (tidings' default if not given).
    #[arg(long)]
    linger_ms: Option<String>,
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topic = format!("kafka-hop-{}", uuid::Uuid::new_v4().simple());
    let kafka = KafkaConfig::new(&args.brokers);
    let admin: AdminClient<DefaultClientContext> = kafka.admin().create()?;
    let new = NewTopic::new(&topic, args.partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics(&[new], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let consumer: BaseConsumer = kafka.consumer(&topic).create()?;
    consumer.subscribe(&[&topic])?;
    let joined = Instant::now() + Duration::from_secs(30);
    while consumer.assignment()?.count() == 0 {
        if Instant::now() > joined {
            bail!("no partitions assigned within 30 s");
        }
        consumer.poll(Duration::from_millis(50));
    }
    let linger: Vec<(&str, &str)> = args.linger_ms.as_deref().map(|l| ("linger.ms", l)).into_iter().collect();
    let producer: BaseProducer = kafka.producer_with(&linger).create()?;
    let (rate, n, t) = (args.rate, args.records, topic.clone());
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let start = Instant::now();
        for i in 0..n {
            let due = start + Duration::from_micros(i as u64 * 1_000_000 / rate);
            // Sleep, not poll in a loop: a spinning sender took a core from the broker (two hops
            // at once then measured p99 50-100 ms instead of 6).
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let (key, sent) = (i.to_string(), now_us().to_string());
            producer.send(BaseRecord::to(&t).key(&key).payload(&sent)).map_err(|(e, _)| e)?;
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(())
    });
    let mut us = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(n as u64 / rate + 30);
    while us.len() < n && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let sent: i64 = std::str::from_utf8(m?.payload().unwrap_or_default())?.parse().context("payload")?;
            us.push(now_us() - sent);
        }
    }
    sender.join().map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    let received = us.len();
    let counted = us.split_off(n / 4);
    if counted.is_empty() {
        bail!("received {received} of {n}");
    }
    println!(
        "{}",
        serde_json::json!({
            "scenario": "kafka_hop", "rate": rate, "linger_ms": args.linger_ms, "sent": n, "received": received,
            "latency_ms": percentiles(counted),
        })
    );
    Ok(())
}
