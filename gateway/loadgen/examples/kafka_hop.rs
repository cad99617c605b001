//! One bare Kafka hop, no tidings in between: produce at a fixed rate, consume in the same process,
//! print one JSON line with produce() → consumer latency. The floor under every hop of the pipeline:
//! `cargo run --release -p tidings-loadgen --example kafka_hop -- --brokers 127.0.0.1:9092`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Message};

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
    /// The producer's linger.ms.
    #[arg(long, default_value = "1")]
    linger_ms: String,
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("socket.nagle.disable", "true");
    c
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let topic = format!("kafka-hop-{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = client(&args.brokers).create()?;
    let new = NewTopic::new(&topic, args.partitions, TopicReplication::Fixed(1));
    for r in admin.create_topics(&[new], &AdminOptions::new()).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let consumer: BaseConsumer = client(&args.brokers)
        .set("group.id", &topic)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let joined = Instant::now() + Duration::from_secs(30);
    while consumer.assignment()?.count() == 0 {
        if Instant::now() > joined {
            bail!("no partitions assigned within 30 s");
        }
        consumer.poll(Duration::from_millis(50));
    }
    let producer: BaseProducer = client(&args.brokers)
        .set("linger.ms", &args.linger_ms)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .create()?;
    let (rate, n, t) = (args.rate, args.records, topic.clone());
    let sender = std::thread::spawn(move || -> anyhow::Result<()> {
        let start = Instant::now();
        for i in 0..n {
            let due = start + Duration::from_micros(i as u64 * 1_000_000 / rate);
            while Instant::now() < due {
                producer.poll(Duration::from_micros(100));
            }
            let (key, sent) = (i.to_string(), now_us().to_string());
            producer.send(BaseRecord::to(&t).key(&key).payload(&sent)).map_err(|(e, _)| e)?;
            producer.poll(Duration::ZERO);
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(())
    });
    let mut ms = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(n as u64 / rate + 30);
    while ms.len() < n && Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            let sent: i64 = std::str::from_utf8(m?.payload().unwrap_or_default())?.parse().context("payload")?;
            ms.push((now_us() - sent) as f64 / 1000.0);
        }
    }
    sender.join().map_err(|_| anyhow::anyhow!("the producer thread panicked"))??;
    let received = ms.len();
    let mut counted = ms.split_off(n / 4);
    if counted.is_empty() {
        bail!("received {received} of {n}");
    }
    counted.sort_by(f64::total_cmp);
    let q = |f: f64| counted[((counted.len() as f64 * f) as usize).min(counted.len() - 1)];
    println!(
        "{}",
        serde_json::json!({
            "scenario": "kafka_hop", "rate": rate, "linger_ms": args.linger_ms, "sent": n, "received": received,
            "latency_ms": {"p50": q(0.5), "p99": q(0.99), "max": q(1.0)},
        })
    );
    Ok(())
}
