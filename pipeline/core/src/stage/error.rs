//! The one error a stage attempt ends with: its domain (configuration, an outside system, or a
//! bug) and whether a restart may help, decided from the source error's type, code or status
//! (never its text). [`crate::stage::run`] restarts on [`StageError::is_retriable`] alone.

use std::fmt;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::RegistryError;
use crate::registry::DecodeError;
use crate::source::RangeError;

/// The error an outside system failed with, kept for its message and for [`StageError::source_as`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The outside systems a stage depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Kafka,
    SchemaRegistry,
    /// The database (PostgreSQL or SQLite).
    Store,
    /// A stage's dead-letter topic (Kafka, but where the records that could not be processed go).
    DeadLetter,
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            System::Kafka => "Kafka",
            System::SchemaRegistry => "schema registry",
            System::Store => "store",
            System::DeadLetter => "dead-letter topic",
        })
    }
}

/// Where a stage error comes from, which decides what becomes of the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// The settings: never retried; the stage ends (and `tidings up` exits non-zero).
    Configuration,
    /// An outside system: retried with backoff when its error says a later attempt may succeed.
    External(System),
    /// A bug or a broken invariant: not retried.
    Internal,
}

/// Why a stage attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Settings no restart can fix (a client setting librdkafka refuses, an input topic without a
    /// schema, an unusable registry URL).
    #[error("configuration (not retried): {0}")]
    Configuration(String),
    /// An outside system failed. `retriable` comes from the source error's kind: an outage or a
    /// timeout is, a refusal (authorization, a record too large) is not.
    #[error("{system} ({}): {}{source}", retry_hint(*.retriable), Context(.what))]
    External {
        system: System,
        retriable: bool,
        /// What the stage was doing, when the source error does not say (e.g. which record).
        what: Option<String>,
        source: BoxError,
    },
    /// A bug: an invariant broke or a task of the stage panicked.
    #[error("internal error, a bug (not retried): {0}")]
    Internal(String),
}

fn retry_hint(retriable: bool) -> &'static str {
    if retriable {
        "retriable"
    } else {
        "not retriable"
    }
}

/// `what: ` before the source's message, when there is a `what`.
struct Context<'a>(&'a Option<String>);

impl fmt::Display for Context<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(what) => write!(f, "{what}: "),
            None => Ok(()),
        }
    }
}

impl StageError {
    pub fn configuration(message: impl Into<String>) -> Self {
        StageError::Configuration(message.into())
    }

    pub fn internal(message: impl fmt::Display) -> Self {
        StageError::Internal(message.to_string())
    }

    /// An outside system's failure whose retry hint the caller knows from its kind (e.g. a topic
    /// with no partitions yet: retriable, it may be created).
    pub fn external(system: System, retriable: bool, source: impl Into<BoxError>) -> Self {
        StageError::External { system, retriable, what: None, source: source.into() }
    }

    /// A Kafka client error of `system` (Kafka itself, or the dead-letter topic), classified by its
    /// variant and code ([`kafka_domain`]).
    pub fn kafka(system: System, e: KafkaError) -> Self {
        match kafka_domain(&e) {
            KafkaDomain::Configuration => StageError::Configuration(format!("Kafka client: {e}")),
            KafkaDomain::Retriable => StageError::external(system, true, e),
            KafkaDomain::Permanent => StageError::external(system, false, e),
        }
    }

    /// Says what the stage was doing when it failed (which record, which output).
    pub fn context(self, what: impl fmt::Display) -> Self {
        match self {
            StageError::Configuration(m) => StageError::Configuration(format!("{what}: {m}")),
            StageError::Internal(m) => StageError::Internal(format!("{what}: {m}")),
            StageError::External { system, retriable, what: None, source } => {
                StageError::External { system, retriable, what: Some(what.to_string()), source }
            }
            StageError::External { system, retriable, what: Some(inner), source } => {
                StageError::External { system, retriable, what: Some(format!("{what}: {inner}")), source }
            }
        }
    }

    pub fn domain(&self) -> Domain {
        match self {
            StageError::Configuration(_) => Domain::Configuration,
            StageError::External { system, .. } => Domain::External(*system),
            StageError::Internal(_) => Domain::Internal,
        }
    }

    /// Whether restarting the stage (from its stored offsets, after a backoff) may succeed: only
    /// an outside system's failure whose error says so.
    pub fn is_retriable(&self) -> bool {
        matches!(self, StageError::External { retriable: true, .. })
    }

    /// The outside system's error as its own type, e.g. a `StoreError` to tell its kind.
    pub fn source_as<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            StageError::External { source, .. } => source.downcast_ref(),
            _ => None,
        }
    }
}

/// What a Kafka client error says about the work that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KafkaDomain {
    /// The client could not be built from the settings.
    Configuration,
    /// A later attempt (with a new client, after a restart) may succeed.
    Retriable,
    /// Refused for good (authorization, a record too large, an unsupported request): only an
    /// operator can fix it.
    Permanent,
}

/// Classifies a Kafka client error by variant and code. Only listed kinds are retried: broker
/// outages and moves, timeouts, rebalances, a topic or partition not there (yet), a client
/// that went away, and librdkafka's fatal state (it asks for a new client, which a restart makes).
fn kafka_domain(e: &KafkaError) -> KafkaDomain {
    match e {
        KafkaError::ClientConfig(..)
        | KafkaError::ClientCreation(_)
        | KafkaError::Nul(_)
        | KafkaError::AdminOpCreation(_)
        | KafkaError::Subscription(_) => KafkaDomain::Configuration,
        KafkaError::Canceled | KafkaError::NoMessageReceived | KafkaError::Seek(_) | KafkaError::PauseResume(_) => {
            KafkaDomain::Retriable
        }
        KafkaError::AdminOp(code) => retriable_code(*code),
        _ => e.rdkafka_error_code().map_or(KafkaDomain::Permanent, retriable_code),
    }
}

fn retriable_code(code: RDKafkaErrorCode) -> KafkaDomain {
    use RDKafkaErrorCode as C;
    match code {
        // The client's connection, its brokers, its time limits and queues.
        C::Fail
        | C::BrokerTransportFailure
        | C::Resolve
        | C::MessageTimedOut
        | C::AllBrokersDown
        | C::OperationTimedOut
        | C::QueueFull
        | C::TimedOutQueue
        | C::RequestTimedOut
        | C::NetworkException
        | C::BrokerDestroy
        | C::DestroyBroker
        | C::Interrupted
        | C::Retry
        | C::WaitCache
        | C::Fatal
        | C::ThrottlingQuotaExceeded
        // Leaders, replicas and coordinators moving or starting.
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::BrokerNotAvailable
        | C::ReplicaNotAvailable
        | C::NotEnoughReplicas
        | C::NotEnoughReplicasAfterAppend
        | C::KafkaStorageError
        | C::NotController
        | C::FencedLeaderEpoch
        | C::UnknownLeaderEpoch
        | C::OffsetNotAvailable
        | C::PreferredLeaderNotAvailable
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::WaitingForCoordinator
        | C::FetchSessionIdNotFound
        | C::InvalidFetchSessionEpoch
        | C::UnstableOffsetCommit
        // The group rebalancing under the consumer, or the consumer dropped from it.
        | C::RebalanceInProgress
        | C::IllegalGeneration
        | C::UnknownMemberId
        | C::MemberIdRequired
        | C::AssignmentLost
        | C::PollExceeded
        | C::State
        // A topic or partition not there yet (the topology may still be applied).
        | C::UnknownTopic
        | C::UnknownPartition
        | C::UnknownTopicOrPartition => KafkaDomain::Retriable,
        _ => KafkaDomain::Permanent,
    }
}

impl From<KafkaError> for StageError {
    fn from(e: KafkaError) -> Self {
        StageError::kafka(System::Kafka, e)
    }
}

/// Unusable client settings, refused credentials (401/403) and other refused requests (4xx) are
/// configuration: a restart would send the same; the rest as [`RegistryError::is_retriable`] says.
impl From<RegistryError> for StageError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Config(m) => StageError::Configuration(format!("schema registry client: {m}")),
            e @ RegistryError::Unauthorized(..) => StageError::Configuration(format!(
                "{e}; set credentials the registry accepts for this (writes need write access): {}",
                crate::registry::CREDENTIAL_SETTINGS
            )),
            e @ RegistryError::Refused(..) => StageError::Configuration(e.to_string()),
            e => StageError::external(System::SchemaRegistry, e.is_retriable(), e),
        }
    }
}

/// A decode that failed for want of the registry (retriable); a record's own fault is dead-lettered
/// by the stage and reaches here only as the last error of a retry cut short.
impl From<DecodeError> for StageError {
    fn from(e: DecodeError) -> Self {
        StageError::external(System::SchemaRegistry, e.is_retriable(), e)
    }
}

impl From<RangeError> for StageError {
    fn from(e: RangeError) -> Self {
        match e {
            RangeError::Invalid { .. } => StageError::Configuration(e.to_string()),
            RangeError::Kafka(k) => StageError::from(k).context("creating the range consumer"),
        }
    }
}

/// A stage's task panicked (or was aborted while the stage still needed it).
impl From<tokio::task::JoinError> for StageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StageError::Internal(format!("a task of the stage ended abnormally: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode as C;

    fn kafka(e: KafkaError) -> (Domain, bool) {
        let e = StageError::from(e);
        (e.domain(), e.is_retriable())
    }

    #[test]
    fn kafka_errors_are_retried_by_code_and_client_settings_are_configuration() {
        let retried = (Domain::External(System::Kafka), true);
        for e in [
            KafkaError::MessageProduction(C::MessageTimedOut),
            KafkaError::MessageProduction(C::NotLeaderForPartition),
            KafkaError::MetadataFetch(C::AllBrokersDown),
            KafkaError::MetadataFetch(C::BrokerTransportFailure),
            KafkaError::ConsumerCommit(C::RebalanceInProgress),
            KafkaError::ConsumerCommit(C::CoordinatorNotAvailable),
            KafkaError::StoreOffset(C::State),
            KafkaError::Global(C::UnknownTopicOrPartition),
            KafkaError::Canceled,
        ] {
            assert_eq!(kafka(e.clone()), retried, "{e:?}");
        }
        let refused = (Domain::External(System::Kafka), false);
        for e in [
            KafkaError::MessageProduction(C::MessageSizeTooLarge),
            KafkaError::MessageProduction(C::TopicAuthorizationFailed),
            KafkaError::ConsumerCommit(C::GroupAuthorizationFailed),
            KafkaError::MetadataFetch(C::SaslAuthenticationFailed),
            KafkaError::Global(C::UnsupportedVersion),
            KafkaError::PartitionEOF(0),
        ] {
            assert_eq!(kafka(e.clone()), refused, "{e:?}");
        }
        let creation = KafkaError::ClientCreation("ssl.ca.location: no such file".into());
        assert_eq!(kafka(creation), (Domain::Configuration, false));
        let bad_setting =
            rdkafka::ClientConfig::new().set("no.such.setting", "1").create::<rdkafka::producer::BaseProducer>();
        let Err(bad_setting) = bad_setting else { panic!("librdkafka took an unknown setting") };
        assert_eq!(kafka(bad_setting), (Domain::Configuration, false));
    }

    #[test]
    fn the_dead_letter_topic_is_classified_like_kafka_but_named_as_itself() {
        let e = StageError::kafka(System::DeadLetter, KafkaError::MessageProduction(C::MessageTimedOut))
            .context("dead letter of orders[2]@41");
        assert_eq!(e.domain(), Domain::External(System::DeadLetter));
        assert!(e.is_retriable());
        assert_eq!(
            e.to_string(),
            "dead-letter topic (retriable): dead letter of orders[2]@41: Message production error: \
             MessageTimedOut (Local: Message timed out)"
        );
        assert!(e.source_as::<KafkaError>().is_some(), "the Kafka error is kept as the source");
    }

    #[test]
    fn registry_errors_follow_the_registry_s_own_hint() {
        let registry = |e: RegistryError| {
            let e = StageError::from(e);
            (e.domain(), e.is_retriable())
        };
        let external = Domain::External(System::SchemaRegistry);
        assert_eq!(registry(RegistryError::Unavailable("connection refused".into())), (external, true));
        assert_eq!(registry(RegistryError::Throttled("slow down".into())), (external, true));
        assert_eq!(registry(RegistryError::Rejected("the answer is not JSON".into())), (external, false));
        assert_eq!(registry(RegistryError::Unauthorized(401, "no".into())), (Domain::Configuration, false));
        assert_eq!(registry(RegistryError::Unauthorized(403, "no".into())), (Domain::Configuration, false));
        assert_eq!(registry(RegistryError::Refused(409, "incompatible".into())), (Domain::Configuration, false));
        let refused = StageError::from(RegistryError::Unauthorized(401, "Unauthorized".into())).to_string();
        assert!(refused.contains("TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN"), "{refused}");
        assert_eq!(registry(RegistryError::UnknownSubject("s".into())), (external, false));
        assert_eq!(registry(RegistryError::Config("URL is not http(s)".into())), (Domain::Configuration, false));
        let decode = StageError::from(DecodeError::RegistryUnavailable("timed out".into()));
        assert_eq!((decode.domain(), decode.is_retriable()), (external, true));
    }

    #[test]
    fn only_an_external_error_that_says_so_is_retried() {
        let missing =
            StageError::external(System::Kafka, true, "topic notifications has no partitions (not created yet?)");
        assert!(missing.is_retriable());
        assert_eq!(missing.to_string(), "Kafka (retriable): topic notifications has no partitions (not created yet?)");
        assert!(!StageError::external(System::Store, false, "42501 permission denied").is_retriable());
        let config = StageError::configuration("chat_topic needs chat_schema").context("persistence");
        assert!(!config.is_retriable());
        assert_eq!(config.to_string(), "configuration (not retried): persistence: chat_topic needs chat_schema");
        assert!(!StageError::internal("acknowledger stopped").is_retriable());
        let invalid = RangeError::Invalid { topic: "t".into(), partition: 0, reason: "no such partition" };
        assert_eq!(StageError::from(invalid).domain(), Domain::Configuration);
    }
}
