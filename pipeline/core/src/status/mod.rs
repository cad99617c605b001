//! The state of a running system at a glance: what each `tidings up` process announces about
//! itself ([`Announcement`]), the groups' lag sampled over a window and judged as Burrow judges it
//! ([`eval`]), dead letters by reason, and the [`StatusReport`] `tidings status` and the gateway show.

pub mod collect;
pub mod eval;
pub mod local;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use collect::{report, Collector, GroupSpec, Sample, StatusError, StatusSpec};
pub use eval::State;

/// How often a process announces itself; an announcement older than [`STALE_AFTER`] intervals
/// is a process that died without its tombstone.
pub const ANNOUNCE_EVERY_MS: i64 = 3_000;
pub const STALE_AFTER: i64 = 3;

/// What one `tidings up` process says about itself, keyed by `instance` on the compacted
/// instances topic; a tombstone (no value) when it stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub instance: String,
    pub host: String,
    pub pid: u32,
    /// The `--stages` it runs.
    pub stages: Vec<String>,
    /// Per consumer group: the stage and the partitions this process owns now.
    pub groups: BTreeMap<String, Owned>,
    /// For a process running the gateway: where it is and how many streams it holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayInfo>,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    /// Its announcement interval: a reader drops it after [`STALE_AFTER`] of them.
    pub interval_ms: i64,
}

/// A group's partitions owned by one process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub stage: String,
    /// The topics the group consumes.
    pub topics: Vec<String>,
    pub partitions: Vec<TopicPartition>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayInfo {
    pub url: String,
    pub streams: u64,
}

/// The whole answer of `tidings status --json` and `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub generated_at_ms: i64,
    /// The span the samples cover, and how many there were.
    pub window_ms: i64,
    pub samples: usize,
    /// Every group is OK.
    pub ok: bool,
    /// The stages of the topology: group, inputs, output, dead-letter topic (physical names).
    pub topology: Vec<StageTopology>,
    /// Live processes (fresh announcements), by instance id.
    pub instances: Vec<Announcement>,
    pub groups: Vec<GroupStatus>,
    pub dead_letters: Vec<DeadLetterCount>,
    pub gateways: Vec<GatewayStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageTopology {
    pub stage: String,
    pub group: String,
    pub inputs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    pub stage: String,
    pub group: String,
    pub state: State,
    /// Why it is not OK, for a person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Members the broker knows in the group.
    pub members: usize,
    /// Live instances announcing this group.
    pub instances: Vec<String>,
    /// Summed over partitions (last sample); `None` for a group that commits no offsets (delivery).
    pub lag_messages: Option<i64>,
    /// The largest of the partitions' (last sample).
    pub lag_seconds: Option<f64>,
    pub partitions: Vec<PartitionStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    /// The instances announcing it (exactly one when all is well).
    pub owners: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_messages: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    pub state: State,
}

/// Letters of one dead-letter topic: all of them, and by reason those of the last
/// `counted` (a bounded read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterCount {
    pub topic: String,
    pub total: i64,
    pub counted: i64,
    pub by_reason: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub instance: String,
    pub url: String,
    pub streams: u64,
    pub partitions: usize,
}
