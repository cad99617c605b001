//! Shared set-up of the stage tests: a topology's topics on some broker (the mock cluster or a
//! real one), the embedded registry serving its schemas, a fresh SQLite store, readers.
#![allow(dead_code)] // Each test binary uses a different subset.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidings_core::kafka::KafkaConfig;
use tidings_core::{FramedEncoder, RegistryClient};
use tidings_pipeline::registry::Registry;
use tidings_pipeline::stages::templating::{self, TemplatingConfig};
use tidings_pipeline::topology::Topology;
use tidings_store::Store;
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub kafka: KafkaConfig,
    pub registry_url: String,
    pub store: Store,
    pub topo: Arc<Topology>,
    pub token: CancellationToken,
    _dir: tempfile::TempDir,
}

/// The project's `topology.yaml`.
pub fn project_topology() -> Topology {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Topology::load(&root.join("topology.yaml")).unwrap()
}

/// An environment for the project's topology on `mock`, its topics created there.
pub async fn env_mock(mock: &rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>) -> Env {
    let topo = project_topology();
    tidings_pipeline::topology::apply::apply_mock(&topo, mock).unwrap();
    env_on(KafkaConfig::new(mock.bootstrap_servers()), topo).await
}

/// An environment for `topo`, whose topics already exist on `kafka`'s broker: the registry holds
/// each topic's schema under `<topic name>-value`.
pub async fn env_on(kafka: KafkaConfig, topo: Topology) -> Env {
    let (store, dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
    let registry = Registry::open(store.clone()).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_url = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    tokio::spawn(tidings_pipeline::registry::serve(listener, registry.clone(), token.clone()));
    for name in topo.topics.keys() {
        if let Some(text) = topo.schema_text(name) {
            registry.register(&format!("{}-value", topo.topic_name(name)), text).await.unwrap();
        }
    }
    Env { kafka, registry_url, store, topo: Arc::new(topo), token, _dir: dir }
}

pub async fn encoder(env: &Env, subject: &str) -> (FramedEncoder, &'static apache_avro::Schema) {
    let (id, schema) = RegistryClient::new(&env.registry_url).unwrap().latest(subject).await.unwrap();
    (FramedEncoder::new(id, schema).unwrap(), schema)
}

pub fn consumer(env: &Env, topic: &str) -> StreamConsumer {
    let c: StreamConsumer = env.kafka.consumer(&format!("reader-{}", uuid::Uuid::new_v4())).create().unwrap();
    c.subscribe(&[topic]).unwrap();
    c
}

/// One record as read: key, value, headers as pairs, partition, offset.
pub type Read = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, String)>, i32, i64);

/// Reads `n` records (bounded wait).
pub async fn read(c: &StreamConsumer, n: usize) -> Vec<Read> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, c.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records arrived", out.len()))
            .unwrap();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        out.push((m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec), headers, m.partition(), m.offset()));
    }
    out
}

/// An OrderShipped event of `buyer`.
pub fn order(event_id: &str, buyer: &str) -> serde_json::Value {
    json!({"event_id": event_id, "occurred_at": 1_700_000_000_000_000i64, "order_id": format!("o-{event_id}"), "buyer_id": buyer,
        "payload": {"OrderShipped": {"carrier": "DHL", "tracking_number": "T1"}}})
}

/// The templating stage of `env`.
pub fn spawn_templating(env: &Env) -> tokio::task::JoinHandle<Result<(), tidings_core::StageError>> {
    spawn_templating_with(env, Default::default())
}

/// The templating stage of `env`, reporting whether it runs (not waiting to restart) to `health`.
pub fn spawn_templating_with(
    env: &Env,
    health: tidings_core::shutdown::StageHealth,
) -> tokio::task::JoinHandle<Result<(), tidings_core::StageError>> {
    tokio::spawn(templating::run(
        TemplatingConfig {
            kafka: env.kafka.clone(),
            registry: env.registry_url.clone().into(),
            topology: env.topo.clone(),
            health,
        },
        env.store.clone(),
        env.token.clone(),
    ))
}
