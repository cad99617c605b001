//! Applies the project's `topology.yaml` to a real broker (Apache Kafka in CI): twice (the second run
//! changes nothing), then with more partitions (grown) and fewer (drift). Needs
//! `TIDINGS_TEST_BROKERS` (see compose/start-kafka.sh); skipped when it is unset outside CI.

use std::path::Path;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use tidings_pipeline::topology::{apply, Grown, Topology};

const TIMEOUT: Duration = Duration::from_secs(30);

fn partition_count(admin: &AdminClient<DefaultClientContext>, topic: &str) -> Option<usize> {
    let md = admin.inner().fetch_metadata(None, TIMEOUT).ok()?;
    md.topics().iter().find(|t| t.name() == topic && t.error().is_none()).map(|t| t.partitions().len())
}

/// Metadata can lag an admin change by a moment on some brokers.
async fn wait_for_partitions(admin: &AdminClient<DefaultClientContext>, topic: &str, want: usize) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let got = partition_count(admin, topic);
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{topic}: expected {want} partitions, metadata says {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_is_idempotent_grows_and_reports_drift() {
    let Some(brokers) = tidings_core::testing::brokers_or_skip() else { return };
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
    let prefix = format!("it-{}-", uuid::Uuid::new_v4().simple());
    let topology = Topology::load(&path).unwrap_or_else(|e| panic!("{e}")).with_prefix(&prefix);
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("admin client");
    let mut all: Vec<String> = topology.topics.keys().map(|t| topology.topic_name(t)).collect();
    all.sort();

    let first = apply(&topology, &admin, TIMEOUT).await.expect("first apply");
    let mut created = first.created.clone();
    created.sort();
    assert_eq!(created, all, "first run:\n{first}");
    assert!(first.grown.is_empty() && first.unchanged.is_empty() && first.drift.is_empty());
    for (logical, spec) in &topology.topics {
        let name = topology.topic_name(logical);
        wait_for_partitions(&admin, &name, spec.partitions as usize).await;
    }

    let second = apply(&topology, &admin, TIMEOUT).await.expect("second apply");
    let mut unchanged = second.unchanged.clone();
    unchanged.sort();
    assert_eq!(unchanged, all, "second run:\n{second}");
    assert!(second.created.is_empty() && second.grown.is_empty() && second.is_clean());

    let orders = topology.topic_name("orders");
    let declared = topology.topics["orders"].partitions;
    let mut more = topology.clone();
    more.topics.get_mut("orders").expect("orders").partitions = declared + 2;
    let grown = apply(&more, &admin, TIMEOUT).await.expect("grow apply");
    assert_eq!(grown.unchanged.len(), all.len() - 1, "grow run:\n{grown}");
    assert!(grown.created.is_empty(), "grow run:\n{grown}");
    assert_eq!(
        grown.grown,
        vec![Grown { topic: orders.clone(), from: declared, to: declared + 2 }],
        "grow run:\n{grown}"
    );
    assert!(grown.is_clean(), "grow run:\n{grown}");
    wait_for_partitions(&admin, &orders, (declared + 2) as usize).await;
    let orders_now = declared + 2;

    let coupons = topology.topic_name("coupons");
    let mut fewer = topology.clone();
    fewer.topics.get_mut("coupons").expect("coupons").partitions = 3;
    let drift = apply(&fewer, &admin, TIMEOUT).await.expect("drift apply");
    let mut messages: Vec<&str> = drift.drift.iter().map(|d| d.message.as_str()).collect();
    messages.sort();
    let mut expected =
        vec![format!("topic {coupons} has 6 partitions, topology.yaml declares 3; Kafka cannot remove partitions")];
    // `orders` grew above, so it now has more partitions than the original file declares.
    expected.push(format!(
        "topic {orders} has {orders_now} partitions, topology.yaml declares {declared}; Kafka cannot remove partitions"
    ));
    expected.sort();
    assert_eq!(messages, expected, "drift run:\n{drift}");
    assert!(drift.created.is_empty() && drift.grown.is_empty());
    assert_eq!(partition_count(&admin, &coupons), Some(6));

    // Best effort: brokers without DeleteTopics keep the prefixed topics.
    let names: Vec<&str> = all.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new().operation_timeout(Some(TIMEOUT))).await;
}
