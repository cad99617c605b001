//! Makes a Kafka cluster's topics match `topology.yaml`: creates missing topics, adds partitions
//! where fewer exist than declared, and reports drift Kafka cannot fix. Safe to run repeatedly.
//! `apply_mock` does the same for librdkafka's mock cluster, which has no admin API.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::{Client, ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, Producer};

use super::{TopicSpec, Topology};

/// What [`apply`] found and did, by cluster topic name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Topics that did not exist and were created.
    pub created: Vec<String>,
    /// Topics that got more partitions.
    pub grown: Vec<Grown>,
    /// Topics that already matched.
    pub unchanged: Vec<String>,
    /// Differences that apply cannot fix; the cluster keeps working but differs from the file.
    pub drift: Vec<Drift>,
}

impl ApplyReport {
    /// True when the cluster now matches the file.
    pub fn is_clean(&self) -> bool {
        self.drift.is_empty()
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for t in &self.created {
            writeln!(f, "created   {t}")?;
        }
        for g in &self.grown {
            writeln!(f, "grown     {} ({} -> {} partitions)", g.topic, g.from, g.to)?;
        }
        for t in &self.unchanged {
            writeln!(f, "unchanged {t}")?;
        }
        for d in &self.drift {
            writeln!(f, "DRIFT     {}", d.message)?;
        }
        Ok(())
    }
}

/// A topic whose partition count was raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    /// Cluster topic name.
    pub topic: String,
    /// Partitions before.
    pub from: i32,
    /// Partitions now (as declared).
    pub to: i32,
}

/// A difference between the cluster and the file that apply leaves alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// Cluster topic name.
    pub topic: String,
    /// Human-readable explanation, e.g. why Kafka cannot fix it.
    pub message: String,
}

/// Why [`apply`] or [`apply_mock`] stopped. Topics handled before the error stay as they are;
/// running again continues from there.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Listing the cluster's topics failed, usually because no broker is reachable.
    #[error("cannot read cluster metadata: {0}")]
    Metadata(#[source] KafkaError),
    /// The broker does not implement an admin API apply needs.
    #[error(
        "the broker does not support {api} ({detail}); the librdkafka mock cluster has no admin \
         API at all: use topology::apply_mock for it"
    )]
    Unsupported {
        /// The Kafka API, e.g. `CreateTopics`.
        api: &'static str,
        /// What librdkafka said.
        detail: String,
    },
    /// The admin request as a whole failed.
    #[error("{api} request failed: {source}")]
    Request {
        /// The Kafka API, e.g. `CreateTopics`.
        api: &'static str,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The broker refused one topic.
    #[error("{api} failed for topic {topic}: {code}")]
    Topic {
        /// The Kafka API, e.g. `CreateTopics`.
        api: &'static str,
        /// Cluster topic name.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
    /// The mock cluster refused to create a topic.
    #[error("the mock cluster refused to create topic {topic}: {source}")]
    Mock {
        /// Cluster topic name.
        topic: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
}

impl ApplyError {
    /// Whether running apply again unchanged may succeed (the broker was unreachable or busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            ApplyError::Metadata(e) | ApplyError::Request { source: e, .. } => error_code(e).is_none_or(retryable_code),
            ApplyError::Topic { code, .. } => retryable_code(*code),
            ApplyError::Unsupported { .. } | ApplyError::Mock { .. } => false,
        }
    }
}

fn retryable_code(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::NotController
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::BrokerNotAvailable
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::CoordinatorLoadInProgress
    )
}

/// librdkafka names its mock clusters `mockCluster<hex>`.
const MOCK_CLUSTER_ID_PREFIX: &str = "mockCluster";

/// Partition count and replication factor of a topic on the cluster.
#[derive(Debug, Clone, Copy)]
struct Existing {
    partitions: i32,
    /// `None` when the broker reports no replica list.
    replication: Option<i32>,
}

/// Topics on the cluster. Lists all topics rather than asking for ours by name, because a
/// metadata request for a named topic auto-creates it on brokers that allow that.
fn existing_topics<C: ClientContext>(
    client: &Client<C>,
    timeout: Duration,
) -> Result<HashMap<String, Existing>, ApplyError> {
    let metadata = client.fetch_metadata(None, timeout).map_err(ApplyError::Metadata)?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .map(|t| {
            let replicas = t.partitions()[0].replicas().len();
            let existing = Existing {
                partitions: t.partitions().len() as i32,
                replication: (replicas > 0).then_some(replicas as i32),
            };
            (t.name().to_owned(), existing)
        })
        .collect())
}

/// Sorts an existing topic into unchanged / needs growing / drift.
fn compare(
    name: &str,
    spec: &TopicSpec,
    existing: Existing,
    can_grow: bool,
    report: &mut ApplyReport,
    grow: &mut Vec<(String, i32, i32)>,
) {
    let mut clean = true;
    if existing.partitions < spec.partitions {
        if can_grow {
            grow.push((name.to_owned(), existing.partitions, spec.partitions));
        } else {
            report.drift.push(Drift {
                topic: name.to_owned(),
                message: format!(
                    "topic {name} has {} partitions, topology.yaml declares {}; the mock cluster cannot add partitions",
                    existing.partitions, spec.partitions
                ),
            });
        }
        clean = false;
    } else if existing.partitions > spec.partitions {
        report.drift.push(Drift {
            topic: name.to_owned(),
            message: format!(
                "topic {name} has {} partitions, topology.yaml declares {}; Kafka cannot remove partitions",
                existing.partitions, spec.partitions
            ),
        });
        clean = false;
    }
    if let Some(rf) = existing.replication {
        if rf != spec.replication_factor {
            report.drift.push(Drift {
                topic: name.to_owned(),
                message: format!(
                    "topic {name} has replication factor {rf}, topology.yaml declares {}; \
                     change it with a partition reassignment",
                    spec.replication_factor
                ),
            });
            clean = false;
        }
    }
    if clean {
        report.unchanged.push(name.to_owned());
    }
}

fn unsupported_code(code: RDKafkaErrorCode) -> bool {
    matches!(code, RDKafkaErrorCode::UnsupportedFeature | RDKafkaErrorCode::UnsupportedVersion)
}

/// librdkafka's `rdkafka_error_code` leaves out admin errors.
fn error_code(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        other => other.rdkafka_error_code(),
    }
}

fn request_error(api: &'static str, e: KafkaError) -> ApplyError {
    match error_code(&e) {
        Some(code) if unsupported_code(code) => ApplyError::Unsupported { api, detail: e.to_string() },
        _ => ApplyError::Request { api, source: e },
    }
}

fn topic_error(api: &'static str, topic: String, code: RDKafkaErrorCode) -> ApplyError {
    if unsupported_code(code) {
        ApplyError::Unsupported { api, detail: format!("topic {topic}: {code}") }
    } else {
        ApplyError::Topic { api, topic, code }
    }
}

/// A declared topic the cluster does not have, with the configs to create it with.
struct Missing<'a> {
    name: String,
    spec: &'a TopicSpec,
    configs: Vec<(String, String)>,
}

/// Creates missing topics (with their partitions, replication factor, `cleanup.policy`,
/// `retention.ms` and extra configs) and adds partitions to topics that have fewer than
/// declared. Never deletes or shrinks anything: more partitions than declared, another
/// replication factor, or fewer partitions on a broker without CreatePartitions is
/// reported as drift. Existing topics' configs are not compared.
///
/// `timeout` bounds each broker request. Reading the cluster id and metadata blocks the calling
/// thread for up to `timeout` each. Fails with [`ApplyError::Unsupported`], before changing
/// anything, against the librdkafka mock cluster (use [`apply_mock`]).
pub async fn apply(
    topology: &Topology,
    admin: &AdminClient<DefaultClientContext>,
    timeout: Duration,
) -> Result<ApplyReport, ApplyError> {
    // The mock advertises a controller that does not exist, so admin requests would only time
    // out; its cluster id gives it away.
    if let Some(id) = admin.inner().fetch_cluster_id(timeout) {
        if id.starts_with(MOCK_CLUSTER_ID_PREFIX) {
            return Err(ApplyError::Unsupported {
                api: "CreateTopics",
                detail: format!("cluster {id} is a librdkafka mock cluster"),
            });
        }
    }
    let existing = existing_topics(admin.inner(), timeout)?;
    let opts = AdminOptions::new().request_timeout(Some(timeout)).operation_timeout(Some(timeout));
    let mut report = ApplyReport::default();
    let mut grow = Vec::new();
    let mut missing: Vec<Missing<'_>> = Vec::new();
    for (logical, spec) in &topology.topics {
        let name = topology.topic_name(logical);
        match existing.get(&name) {
            Some(e) => compare(&name, spec, *e, true, &mut report, &mut grow),
            None => missing.push(Missing { configs: spec.kafka_configs(), name, spec }),
        }
    }

    if !missing.is_empty() {
        let new_topics: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|Missing { name, spec, configs }| {
                let mut t = NewTopic::new(name, spec.partitions, TopicReplication::Fixed(spec.replication_factor));
                for (k, v) in configs {
                    t = t.set(k, v);
                }
                t
            })
            .collect();
        let results =
            admin.create_topics(new_topics.iter(), &opts).await.map_err(|e| request_error("CreateTopics", e))?;
        let mut raced = Vec::new();
        for result in results {
            match result {
                Ok(name) => report.created.push(name),
                // Someone else created it since we listed topics: compare it like any other.
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => raced.push(name),
                Err((name, code)) => return Err(topic_error("CreateTopics", name, code)),
            }
        }
        if !raced.is_empty() {
            let now = existing_topics(admin.inner(), timeout)?;
            for Missing { name, spec, .. } in &missing {
                if !raced.contains(name) {
                    continue;
                }
                match now.get(name) {
                    Some(e) => compare(name, spec, *e, true, &mut report, &mut grow),
                    // Created but not yet visible in metadata: it has the declared shape.
                    None => report.unchanged.push(name.clone()),
                }
            }
        }
    }

    if !grow.is_empty() {
        let requests: Vec<NewPartitions<'_>> =
            grow.iter().map(|(name, _, to)| NewPartitions::new(name, *to as usize)).collect();
        let results = match admin.create_partitions(requests.iter(), &opts).await {
            Ok(results) => results,
            // Some Kafka-compatible brokers lack CreatePartitions: the topics stay usable, just
            // smaller than declared, so report that instead of failing the whole apply.
            Err(e) if error_code(&e).is_some_and(unsupported_code) => {
                grow.iter().map(|(name, _, _)| Err((name.clone(), RDKafkaErrorCode::UnsupportedFeature))).collect()
            }
            Err(e) => return Err(request_error("CreatePartitions", e)),
        };
        for result in results {
            let (name, outcome) = match result {
                Ok(name) => (name, None),
                Err((name, code)) if unsupported_code(code) => (name, Some(code)),
                Err((name, code)) => return Err(topic_error("CreatePartitions", name, code)),
            };
            let Some((topic, from, to)) = grow.iter().find(|(n, _, _)| *n == name) else {
                continue;
            };
            match outcome {
                None => report.grown.push(Grown { topic: topic.clone(), from: *from, to: *to }),
                Some(code) => report.drift.push(Drift {
                    topic: topic.clone(),
                    message: format!(
                        "topic {topic} has {from} partitions, topology.yaml declares {to}; the broker \
                         does not support CreatePartitions ({code}), add them with the broker's own tools"
                    ),
                }),
            }
        }
    }
    Ok(report)
}

/// [`apply`] for librdkafka's mock cluster, which implements no admin API: creates missing
/// topics with `MockCluster::create_topic` (partitions and replication factor only; the mock
/// ignores topic configs). It cannot add partitions, so fewer partitions than declared is
/// reported as drift. Blocks the calling thread while reading metadata (at most 10 s).
pub fn apply_mock<C: ClientContext>(topology: &Topology, mock: &MockCluster<'_, C>) -> Result<ApplyReport, ApplyError> {
    let timeout = Duration::from_secs(10);
    let client: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .create()
        .map_err(ApplyError::Metadata)?;
    let existing = existing_topics(client.client(), timeout)?;
    let mut report = ApplyReport::default();
    let mut grow = Vec::new();
    for (logical, spec) in &topology.topics {
        let name = topology.topic_name(logical);
        match existing.get(&name) {
            Some(e) => compare(&name, spec, *e, false, &mut report, &mut grow),
            None => {
                mock.create_topic(&name, spec.partitions, spec.replication_factor)
                    .map_err(|source| ApplyError::Mock { topic: name.clone(), source })?;
                report.created.push(name);
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn project() -> Topology {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
        Topology::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    fn admin_for(bootstrap: &str) -> AdminClient<DefaultClientContext> {
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap()
    }

    fn partitions_of(bootstrap: &str, topic: &str) -> Option<usize> {
        let client: BaseProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create().unwrap();
        let md = client.client().fetch_metadata(None, Duration::from_secs(10)).unwrap();
        md.topics().iter().find(|t| t.name() == topic).map(|t| t.partitions().len())
    }

    #[test]
    fn apply_mock_creates_then_is_idempotent_and_reports_drift() {
        let mock = MockCluster::new(1).unwrap();
        let topology = project().with_prefix("mock1.");
        let first = apply_mock(&topology, &mock).unwrap();
        assert_eq!(first.created.len(), topology.topics.len(), "{first}");
        assert!(first.unchanged.is_empty() && first.drift.is_empty());
        assert_eq!(partitions_of(&mock.bootstrap_servers(), "mock1.notifications"), Some(12));

        let second = apply_mock(&topology, &mock).unwrap();
        assert!(second.created.is_empty(), "{second}");
        assert_eq!(second.unchanged.len(), topology.topics.len(), "{second}");
        assert!(second.is_clean());

        let mut fewer = topology.clone();
        fewer.topics.get_mut("orders").unwrap().partitions = 2;
        let report = apply_mock(&fewer, &mock).unwrap();
        assert_eq!(report.drift.len(), 1, "{report}");
        assert_eq!(
            report.drift[0].message,
            "topic mock1.orders has 6 partitions, topology.yaml declares 2; Kafka cannot remove partitions"
        );
        assert_eq!(report.unchanged.len(), topology.topics.len() - 1);
    }

    #[tokio::test]
    async fn apply_against_mock_says_it_is_unsupported() {
        let mock = MockCluster::new(1).unwrap();
        let admin = admin_for(&mock.bootstrap_servers());
        let topology = project().with_prefix("mock2.");
        let err = apply(&topology, &admin, Duration::from_secs(5)).await.unwrap_err();
        assert!(matches!(err, ApplyError::Unsupported { api: "CreateTopics", .. }), "{err:?}");
        assert!(err.to_string().contains("apply_mock"), "{err}");
        assert!(!err.is_retryable());
        // Nothing was created by the failed attempt.
        assert_eq!(partitions_of(&mock.bootstrap_servers(), "mock2.orders"), None);
    }
}
