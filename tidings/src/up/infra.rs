//! What the stages stand on, started in order: the data directory and the store, the schema
//! registry (embedded unless a URL is given), Kafka (an in-process mock cluster unless
//! `--brokers`) with the topology applied, and the topology's schemas registered.

use anyhow::{bail, Context};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::sync::Arc;
use std::time::Duration;
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::TaskTree;
use tidings_core::{RegistryClient, RegistryEndpoint};
use tidings_pipeline::registry::Access;
use tidings_pipeline::topology::{self, Topology};
use tidings_store::Store;
use tracing::info;

use super::UpArgs;
use crate::endpoints::registry_write_token;
use crate::settings::Settings;

/// The running infrastructure; the mock cluster, if any, lives as long as this.
pub struct Infrastructure {
    pub topology: Arc<Topology>,
    pub store: Store,
    pub database_url: String,
    /// The registry the stages use (with this process's write token for the embedded one).
    pub registry: RegistryEndpoint,
    pub registry_url: String,
    pub registry_client: RegistryClient,
    pub brokers: String,
    /// Kafka settings with the brokers filled in.
    pub kafka: KafkaConfig,
    pub mock: Option<MockCluster<'static, DefaultProducerContext>>,
}

/// Starts everything the stages need, serving the embedded registry under `tasks`.
pub async fn start(args: &UpArgs, settings: &Settings, tasks: &mut TaskTree) -> anyhow::Result<Infrastructure> {
    let topology = Arc::new(settings.topology.clone());
    std::fs::create_dir_all(&args.infra.data_dir)
        .with_context(|| format!("creating {}", args.infra.data_dir.display()))?;
    let database_url = settings.database_url.clone();
    let store = Store::connect(&database_url).await.with_context(|| format!("opening the store at {database_url}"))?;
    info!(backend = store.backend(), "Store ready at {database_url}.");
    let (registry_url, registry) = match &settings.external_registry {
        Some(endpoint) => (endpoint.url.clone(), endpoint.clone()),
        None => embedded_registry(args, settings, &store, tasks).await?,
    };
    let (brokers, mock) = match &args.infra.brokers {
        Some(b) => (b.clone(), None),
        None => {
            let m = mock_cluster(&topology, &store).await?;
            (m.bootstrap_servers(), Some(m))
        }
    };
    let mut kafka = settings.kafka.clone();
    kafka.brokers = brokers.clone();
    if mock.is_some() {
        // A fetch that finds nothing waits out its whole wait on the mock cluster, even if records
        // arrive meanwhile (Kafka answers as soon as they do), so the wait is delivery latency
        // here. Not what makes the mock slow under sustained load: each fetch that returns a batch
        // walks the partition's in-memory log from its start (README, Gateway benchmark).
        kafka.tuned.push(("fetch.wait.max.ms".into(), "5".into()));
    } else {
        apply_topology(&kafka, &topology).await?;
    }
    let registry_client = RegistryClient::new(&registry)?;
    register_schemas(&registry_client, &topology).await?;
    Ok(Infrastructure { topology, store, database_url, registry, registry_url, registry_client, brokers, kafka, mock })
}

/// The embedded registry on its own listener: (its URL, the endpoint this process writes with).
async fn embedded_registry(
    args: &UpArgs,
    settings: &Settings,
    store: &Store,
    tasks: &mut TaskTree,
) -> anyhow::Result<(String, RegistryEndpoint)> {
    let registry = tidings_pipeline::registry::Registry::open(store.clone())
        .await
        .context("opening the embedded schema registry")?;
    let listener = tokio::net::TcpListener::bind(args.registry_listen)
        .await
        .with_context(|| format!("binding the schema registry to {}", args.registry_listen))?;
    let addr = listener.local_addr()?;
    let write_token = registry_write_token(settings.registry_write_token.clone(), &args.infra.data_dir)?;
    let access = Access::new(write_token.clone(), args.registry_allow_hosts.iter().cloned());
    let (t, limits) = (tasks.token().clone(), args.http_limits("registry", args.registry_max_connections));
    tasks.spawn("schema-registry", async move {
        tidings_pipeline::registry::serve_with(listener, registry, access, limits, t).await
    });
    info!("Embedded schema registry listening on http://{addr}.");
    let url = format!("http://{addr}");
    // This process registers the topology's schemas with it like any other writer.
    let endpoint =
        RegistryEndpoint { url: url.clone(), basic_auth: None, bearer_token: Some(write_token), ca_pem: None };
    Ok((url, endpoint))
}

/// An in-process mock cluster (whose listener other clients can use) with the topology's topics.
async fn mock_cluster(
    topology: &Topology,
    store: &Store,
) -> anyhow::Result<MockCluster<'static, DefaultProducerContext>> {
    let m = MockCluster::new(1).context("starting the embedded Kafka mock cluster")?;
    // The mock cluster starts empty every time; offsets a previous run stored with its rows
    // would point past the end of the new topics and hide their first records.
    let forgotten = store.forget_offsets(&topology.group_name(&topology.stages.persistence.group)).await?;
    if forgotten > 0 {
        info!(
            "Embedded Kafka starts empty; forgot {forgotten} offset(s) stored by the previous run (stored rows stay)."
        );
    }
    let report = topology::apply::apply_mock(topology, &m)
        .map_err(|e| anyhow::anyhow!("creating topics on the mock cluster: {e}"))?;
    info!(
        "Embedded Kafka (librdkafka mock cluster, for development: it slows under sustained load, use --brokers for that) at {}; {report}",
        m.bootstrap_servers()
    );
    Ok(m)
}

/// Connects to the brokers (a wrong password or CA fails here, at once and clearly, instead of
/// in every stage) and creates or grows the declared topics.
async fn apply_topology(kafka: &KafkaConfig, topology: &Topology) -> anyhow::Result<()> {
    let probe_cfg = kafka.clone();
    tokio::task::spawn_blocking(move || tidings_core::kafka::probe(&probe_cfg, Duration::from_secs(30)))
        .await
        .context("Kafka connection probe")??;
    info!("Connected to Kafka at {}.", kafka.brokers);
    let admin: AdminClient<DefaultClientContext> = kafka.admin().create()?;
    let report = topology::apply::apply(topology, &admin, Duration::from_secs(30))
        .await
        .map_err(|e| anyhow::anyhow!("applying the topology: {e}"))?;
    info!("Topology applied: {report}");
    Ok(())
}

/// Every topic with a schema has it registered under <topic>-value, so ingest and producers find it.
async fn register_schemas(client: &RegistryClient, topology: &Topology) -> anyhow::Result<()> {
    for (logical, _) in topology.topics.iter() {
        if let Some(text) = topology.schema_text(logical) {
            let subject = format!("{}-value", topology.topic_name(logical));
            let id = register_with_retry(client, &subject, text, topology, logical).await?;
            info!("Schema for {subject} registered as id {id}.");
        }
    }
    Ok(())
}

/// The registry may be starting (embedded) or briefly unreachable (external): retry only that.
/// Without write credentials, a schema already registered as the subject's latest version will
/// do (a gateway beside the process that registered it needs only reads).
async fn register_with_retry(
    client: &RegistryClient,
    subject: &str,
    text: &str,
    topo: &Topology,
    logical: &str,
) -> anyhow::Result<u32> {
    let mut delay = Duration::from_millis(200);
    for _ in 0..10 {
        match client.register(subject, text).await {
            Ok(id) => return Ok(id),
            // Wrong credentials are a configuration error, not an outage: no retry.
            Err(e @ tidings_core::RegistryError::Unauthorized(..)) => {
                if let (Ok((id, latest)), Some(ours)) = (client.latest(subject).await, topo.schema(logical)) {
                    if latest.canonical_form() == ours.canonical_form() {
                        info!("Not allowed to register {subject} ({e}), but its latest version is this schema.");
                        return Ok(id);
                    }
                }
                return Err(anyhow::anyhow!(
                    "registering {subject}: {e}; set credentials the registry accepts for writes: {}",
                    tidings_core::registry::CREDENTIAL_SETTINGS
                ));
            }
            Err(e) if e.is_retriable() => {
                tracing::warn!(error = %e, "Schema registry not reachable; retrying in {delay:?}.");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(anyhow::anyhow!("registering {subject}: {e}")),
        }
    }
    bail!("schema registry at {} unreachable", client.url())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::sync::CancellationToken;

    /// A gateway beside the process that serves the embedded registry has no write token: the
    /// schemas that process registered will do, and only those.
    #[tokio::test]
    async fn without_write_credentials_only_an_already_registered_schema_will_do() {
        let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
        let registry = tidings_pipeline::registry::Registry::open(store).await.unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
        let topo = Topology::load(&path).unwrap();
        let subject = format!("{}-value", topo.topic_name("orders"));
        let (orders, coupons) = (topo.schema_text("orders").unwrap(), topo.schema_text("coupons").unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let (access, limits) = (Access::new("t".repeat(32), []), tidings_core::http::Limits::default());
        let server =
            tidings_pipeline::registry::serve_with(listener, registry.clone(), access, limits, shutdown.clone());
        tokio::spawn(server);
        let client = RegistryClient::new(&url).unwrap();

        let refused = register_with_retry(&client, &subject, orders, &topo, "orders").await;
        assert!(refused.is_err(), "registered without the write token: {refused:?}");
        let id = registry.register(&subject, orders).await.unwrap();
        assert_eq!(register_with_retry(&client, &subject, orders, &topo, "orders").await.unwrap(), id);
        let other = register_with_retry(&client, &subject, coupons, &topo, "coupons").await;
        assert!(other.is_err(), "another schema passed as the registered one: {other:?}");
        shutdown.cancel();
    }
}
