//! The claim stage: decides the claims and redemptions of limited-stock coupons in log order, one
//! writer per `coupon-claims` partition, and writes each decision to `coupons`.
//!
//! - `decide`: the decisions, with no I/O; `records`: records in and events out; `state`: the
//!   decisions' state as stored; `ownership`: partitions taken at an epoch; `processor`: the loop.
//!
//! Exactness comes from three things. The state (definitions, holders, rejected claims,
//! redemptions; in memory only what is bounded, rejected claims looked up per batch) and the next offset of a partition are committed in one store transaction per
//! batch, so they never disagree. Every assignment bumps the partition's epoch in the store and
//! every batch's transaction first checks it, so an owner that lost the partition can never
//! commit. And decisions are a function of the committed state and the log alone (time is the
//! record's timestamp, codes and event ids are derived), so records decided again after a crash
//! or by the next owner are decided the same, with the same event ids.
//!
//! Decision events are produced *before* the batch commits and acknowledged first, not kept in a
//! decided-table and relayed after it: a crash between the two re-decides the same records into
//! the same events with the same ids, which downstream deduplicates (notification ids derive from
//! event ids), so no outbox table, relay or second write per decision is needed, and an answer
//! reaches `coupons` one produce after its batch is decided. A stale owner may also produce events
//! before its commit is fenced; they are the same events, for the same reason.

pub mod decide;
pub mod ownership;
pub mod processor;
pub mod records;
pub mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, Producer};
use tidings_core::consumer::{StageContext, StartOffsets};
use tidings_core::kafka::KafkaConfig;
use tidings_core::shutdown::StageHealth;
use tidings_core::stage::{DeadLetters, StageError};
use tidings_core::{FramedEncoder, RegistryClient, RegistryEndpoint};
use tidings_store::Store;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::topology::Topology;
use ownership::Ownership;
use processor::{Claims, ClaimsContext};

/// Name used in dead-letter headers and logs.
pub const STAGE: &str = "claims";

/// The stage's input and output topics, as named in topology.yaml.
pub const INPUT: &str = "coupon-claims";
pub const OUTPUT: &str = "coupons";
/// The default dead-letter topic and group (`stages.claims.dead_letter` / `.group`).
pub const DEAD_LETTER: &str = "tidings.dlq.claims";
pub const GROUP: &str = "tidings-claims";

/// What the claim stage consumes and how it batches.
#[derive(Debug, Clone)]
pub struct ClaimsConfig {
    pub kafka: KafkaConfig,
    pub registry: RegistryEndpoint,
    /// Consumer group; also the key of the epochs and offsets stored with the state.
    pub group: String,
    /// `coupon-claims` (cluster name).
    pub input: String,
    /// Reader schema text of `coupon-claims`.
    pub input_schema: String,
    /// `coupons` (cluster name).
    pub output: String,
    /// Writer schema text of `coupons`, registered at start.
    pub output_schema: String,
    /// Dead-letter topic (cluster name) for records that cannot be decided on.
    pub dead_letter: String,
    /// Most records decided per store transaction (default 10,000).
    pub batch_size: usize,
    /// Longest a decided record waits for its batch to commit (default 50 ms): the time an
    /// answer may wait beyond its produce.
    pub linger: Duration,
    /// Longest a record waits to be decided with the records read after it (default 5 ms): the
    /// claims read within it are decided together, their earlier rejections looked up in one
    /// store query. Their decisions are produced then, before their batch commits.
    pub decide_linger: Duration,
    /// Most coupons defined per `coupon-claims` partition (default 10,000): a partition's
    /// coupons, their holders (at most their stock) and redemptions are kept in memory; a new
    /// coupon's definition past this is a dead letter (`too-many-coupons`).
    pub max_coupons: usize,
    /// Rejected claims remembered per partition after their batch (default 100,000), so a
    /// retried claim is answered without asking the store; the store answers the others, one
    /// look-up per batch. 0 keeps none.
    pub rejection_cache: usize,
    /// Up while the stage runs (not while it waits to restart); for `/readyz`.
    pub health: StageHealth,
}

impl ClaimsConfig {
    /// The stage on `topology`'s `coupon-claims` and `coupons` topics, with the group,
    /// dead-letter topic, batching and memory bounds of its `stages.claims` (or their defaults).
    pub fn new(kafka: KafkaConfig, registry: RegistryEndpoint, topology: &Topology) -> Result<Self, StageError> {
        let stage = &topology.stages.claims;
        let schema = |t: &str| {
            topology
                .schema_text(t)
                .map(str::to_string)
                .ok_or_else(|| StageError::configuration(format!("topology.yaml declares no schema for topic `{t}`")))
        };
        if !topology.topics.contains_key(&stage.dead_letter) {
            return Err(StageError::configuration(format!("topology.yaml declares no topic `{}`", stage.dead_letter)));
        }
        Ok(ClaimsConfig {
            kafka,
            registry,
            group: topology.group_name(&stage.group),
            input: topology.topic_name(INPUT),
            input_schema: schema(INPUT)?,
            output: topology.topic_name(OUTPUT),
            output_schema: schema(OUTPUT)?,
            dead_letter: topology.topic_name(&stage.dead_letter),
            batch_size: stage.batch_size,
            linger: Duration::from_millis(stage.linger_ms),
            decide_linger: Duration::from_millis(stage.decide_linger_ms),
            max_coupons: stage.max_coupons,
            rejection_cache: stage.rejection_cache,
            health: StageHealth::default(),
        })
    }
}

/// Runs the stage until `shutdown` on the shared skeleton, restarting after transient failures
/// (each attempt takes its partitions again from the store). Needs a multi-thread runtime.
pub async fn run(cfg: ClaimsConfig, store: Store, shutdown: CancellationToken) -> Result<(), StageError> {
    let health = cfg.health.clone();
    tidings_core::stage::run(STAGE, &health, &shutdown, || start(&cfg, &store, &shutdown)).await
}

/// Refuses to run if `coupon-claims` has another partition count than the one the stored state
/// was decided under (recorded on the first start): the state is kept by partition, and another
/// count would move a coupon's records to an owner that does not hold its state.
async fn check_partitions(cfg: &ClaimsConfig, store: &Store, producer: &FutureProducer) -> Result<(), StageError> {
    let (client, topic) = (producer.clone(), cfg.input.clone());
    let count = tokio::task::spawn_blocking(move || {
        tidings_core::kafka::partition_count(client.client(), &topic, Duration::from_secs(10))
    })
    .await??;
    if count == 0 {
        return Err(StageError::configuration(format!("topic {} does not exist; apply the topology first", cfg.input)));
    }
    let pinned = store.pin_claim_partitions(&cfg.group, count).await?;
    if pinned != count {
        return Err(StageError::configuration(format!(
            "topic {} has {count} partitions, but the claim stage's state was decided with {pinned}: \
             coupons would move to partitions whose owners do not hold their state",
            cfg.input
        )));
    }
    Ok(())
}

async fn start(
    cfg: &ClaimsConfig,
    store: &Store,
    shutdown: &CancellationToken,
) -> Result<(Claims, Arc<StreamConsumer<ClaimsContext>>), StageError> {
    if cfg.batch_size == 0 {
        return Err(StageError::configuration("the claim stage's batch size must be at least 1"));
    }
    if cfg.max_coupons == 0 {
        return Err(StageError::configuration("the claim stage's max coupons per partition must be at least 1"));
    }
    // Taking a partition waits for the store inside the rebalance callback (`block_in_place`).
    if Handle::current().runtime_flavor() != RuntimeFlavor::MultiThread {
        return Err(StageError::configuration("the claim stage needs a multi-thread tokio runtime"));
    }
    let parse = |text: &str, what: &str| {
        apache_avro::Schema::parse_str(text)
            .map_err(|e| StageError::configuration(format!("the {what} schema does not parse: {e}")))
    };
    // Leaked once per stage start so cached decoders can borrow it for 'static.
    let reader: &'static _ = Box::leak(Box::new(parse(&cfg.input_schema, INPUT)?));
    let registry = RegistryClient::new(cfg.registry.clone())?;
    let id = registry.register(&format!("{}-value", cfg.output), &cfg.output_schema).await?;
    let writer = registry.schema_by_id(id).await?;
    let encoder = FramedEncoder::new(id, writer)
        .map_err(|e| StageError::configuration(format!("the coupons schema (id {id}): {e}")))?;
    let held = Arc::new(Mutex::new(HashMap::new()));
    let ownership = Ownership {
        store: store.clone(),
        group: cfg.group.clone(),
        topic: cfg.input.clone(),
        held: held.clone(),
        runtime: Handle::current(),
    };
    let ctx = StageContext::new("claims-consumer", StartOffsets::Stored(Box::new(ownership.clone())), ownership)
        .with_group(&cfg.group);
    // The store holds the offsets (applied at every assignment); Kafka's would only mislead.
    let cc = cfg.kafka.consumer_with(
        &cfg.group,
        &[],
        &[("enable.auto.commit", "false"), ("partition.assignment.strategy", "range,roundrobin")],
    );
    let consumer: Arc<StreamConsumer<ClaimsContext>> =
        Arc::new(tidings_core::client_stats::reporting(cc).create_with_context(ctx)?);
    consumer.subscribe(&[cfg.input.as_str()])?;
    let producer: FutureProducer = cfg.kafka.producer().create()?;
    check_partitions(cfg, store, &producer).await?;
    info!(input = %cfg.input, output = %cfg.output, batch_size = cfg.batch_size, "Claim stage deciding {} into {}.", cfg.input, cfg.output);
    let claims = Claims {
        cfg: cfg.clone(),
        store: store.clone(),
        registry,
        reader,
        writer,
        encoder,
        direct: processor::Direct::of(reader, writer),
        producer: producer.clone(),
        dead: DeadLetters::new(producer, cfg.dead_letter.clone(), STAGE),
        held,
        parts: HashMap::new(),
        pending: 0,
        started: None,
        undecided: None,
        shutdown: shutdown.clone(),
    };
    Ok((claims, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClaimsConfig {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let topology = Topology::load(&root.join("topology.yaml")).unwrap().with_prefix("t-");
        ClaimsConfig::new(KafkaConfig::new("127.0.0.1:1"), "http://127.0.0.1:1".into(), &topology).unwrap()
    }

    #[test]
    fn the_config_names_the_topologys_topics() {
        let cfg = config();
        assert_eq!((cfg.input.as_str(), cfg.output.as_str()), ("t-coupon-claims", "t-coupons"));
        assert_eq!((cfg.dead_letter.as_str(), cfg.group.as_str()), ("t-tidings.dlq.claims", "t-tidings-claims"));
        assert!(cfg.input_schema.contains("ClaimRequested") && cfg.output_schema.contains("ClaimRejected"));
    }

    /// `stages.claims` of topology.yaml reaches the config; without it, the defaults.
    #[test]
    fn the_config_takes_the_topologys_claims_settings() {
        let cfg = config();
        assert_eq!(
            (cfg.batch_size, cfg.linger, cfg.decide_linger),
            (10_000, Duration::from_millis(50), Duration::from_millis(5))
        );
        assert_eq!((cfg.max_coupons, cfg.rejection_cache), (10_000, 100_000));
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let yaml = std::fs::read_to_string(root.join("topology.yaml")).unwrap();
        let start = yaml.find("\n  claims:\n").expect("a stages.claims section") + 1;
        let end = start + yaml[start..].find("\n\n").expect("the section ends");
        let section =
            "  claims:\n    dead_letter: tidings.dlq.persistence\n    group: other-claims\n    batch_size: 7\n    \
                       linger_ms: 9\n    decide_linger_ms: 0\n    max_coupons: 3\n    rejection_cache: 11";
        let yaml = format!("{}{section}{}", &yaml[..start], &yaml[end..]);
        let topology = Topology::from_str(&yaml, &root).unwrap_or_else(|e| panic!("{e}")).with_prefix("t-");
        let cfg = ClaimsConfig::new(KafkaConfig::new("127.0.0.1:1"), "http://127.0.0.1:1".into(), &topology).unwrap();
        assert_eq!((cfg.dead_letter.as_str(), cfg.group.as_str()), ("t-tidings.dlq.persistence", "t-other-claims"));
        assert_eq!((cfg.batch_size, cfg.linger, cfg.decide_linger), (7, Duration::from_millis(9), Duration::ZERO));
        assert_eq!((cfg.max_coupons, cfg.rejection_cache), (3, 11));
    }

    /// Refused before anything is connected, instead of a partition that can never be taken.
    #[tokio::test(flavor = "current_thread")]
    async fn a_current_thread_runtime_is_a_configuration_error() {
        let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
        let err = run(config(), store, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, StageError::Configuration(_)), "{err}");
        let mut cfg = config();
        cfg.batch_size = 0;
        let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
        assert!(matches!(run(cfg, store, CancellationToken::new()).await, Err(StageError::Configuration(_))));
        let mut cfg = config();
        cfg.max_coupons = 0;
        let (store, _dir) = tidings_store::testing::fresh_sqlite().await.unwrap();
        let err = run(cfg, store, CancellationToken::new()).await.unwrap_err();
        assert!(err.to_string().contains("max coupons"), "{err}");
    }
}
