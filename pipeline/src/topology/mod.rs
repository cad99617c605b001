//! `topology.yaml`: the single file that declares tidings' Kafka topics, its stages and the
//! notification templates. [`Topology::load`] parses it and runs every check in `check`, reporting
//! all problems at once; [`apply`] makes a Kafka cluster's topics match it.

pub mod apply;
mod check;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

pub use apply::{apply, apply_mock, ApplyError, ApplyReport, Drift, Grown};

/// A parsed and checked `topology.yaml`.
///
/// Topic and group names in the file are *logical*; [`Topology::topic_name`] and
/// [`Topology::group_name`] give the names used on the cluster (with `topic_prefix`).
#[derive(Debug, Clone)]
pub struct Topology {
    /// Prepended to every topic name and consumer group on the cluster. Default: `""`.
    /// Tests set a unique prefix so parallel runs share one broker without colliding.
    pub topic_prefix: String,
    /// Topics by logical name.
    pub topics: BTreeMap<String, TopicSpec>,
    /// The templating and persistence stages.
    pub stages: Stages,
    /// Notification templates, in file order.
    pub templates: Vec<TemplateSpec>,
    /// Notification categories by name (`categories`): what users opt out of. Default: none, and
    /// then each template's category is its topic's name (not critical).
    pub categories: BTreeMap<String, CategorySpec>,
    /// Problems that do not stop the pipeline, e.g. an input event type with no template
    /// (the templating stage skips such events).
    pub warnings: Vec<Diagnostic>,
    /// Loaded Avro schemas by logical topic.
    schemas: BTreeMap<String, LoadedSchema>,
}

#[derive(Debug, Clone)]
struct LoadedSchema {
    text: String,
    parsed: apache_avro::Schema,
}

/// One topic. Written as `name: { partitions: 6, replication_factor: 1, ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Number of partitions, at least 1. Required. Kafka can add partitions to an existing
    /// topic but never remove them, so start with enough.
    pub partitions: i32,
    /// Copies of each partition, at least 1. Required: 1 on a single broker, 3 in production.
    pub replication_factor: i32,
    /// Envelope field whose value producers use as the Kafka message key, so that events with
    /// the same key stay ordered (e.g. `order_id`). Default: none (raw topics such as dead
    /// letters). Must be a top-level string field of the schema when a schema is given.
    #[serde(default)]
    pub key: Option<String>,
    /// Avro schema (`.avsc`) of the message values, relative to the directory of
    /// `topology.yaml`. Default: none, meaning values are raw bytes (dead-letter topics keep the
    /// original bytes plus headers). Registered under the subject `<topic>-value`.
    #[serde(default)]
    pub schema: Option<PathBuf>,
    /// Kafka `cleanup.policy`: `delete` or `compact`. Default: `delete`.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,
    /// Kafka `retention.ms`; `-1` keeps messages forever. Default: the broker's default
    /// (7 days on stock Kafka).
    #[serde(default)]
    pub retention_ms: Option<i64>,
    /// Further topic configs passed verbatim at creation, e.g. `min.insync.replicas: 2`.
    /// Values may be strings, numbers or booleans. Default: none. `cleanup.policy` and
    /// `retention.ms` are not allowed here (use the fields above).
    #[serde(default, deserialize_with = "scalar_map")]
    pub configs: BTreeMap<String, String>,
}

impl TopicSpec {
    /// Every Kafka topic config this spec sets, as passed to CreateTopics.
    pub fn kafka_configs(&self) -> Vec<(String, String)> {
        let mut out = vec![("cleanup.policy".to_owned(), self.cleanup_policy.as_kafka().to_owned())];
        if let Some(ms) = self.retention_ms {
            out.push(("retention.ms".to_owned(), ms.to_string()));
        }
        out.extend(self.configs.iter().map(|(k, v)| (k.clone(), v.clone())));
        out
    }
}

/// Kafka `cleanup.policy` of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    /// Old segments are deleted after `retention.ms` (the default).
    #[default]
    Delete,
    /// Only the latest value per key is kept.
    Compact,
}

impl CleanupPolicy {
    /// The value Kafka expects for `cleanup.policy`.
    pub fn as_kafka(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
        }
    }
}

/// The pipeline's stages: templating and persistence are required; the claim stage's section is
/// optional (its defaults apply without it).
#[derive(Debug, Clone, PartialEq)]
pub struct Stages {
    /// Turns domain events into notifications.
    pub templating: TemplatingStage,
    /// Writes notifications (and chat messages) to the database.
    pub persistence: PersistenceStage,
    /// Decides coupon claims and redemptions (`tidings up --stages claims`).
    pub claims: ClaimsStage,
    /// Releases held notifications and scheduled campaigns at their time (`--stages scheduler`).
    pub scheduler: SchedulerStage,
}

/// `stages.templating`: consumes domain events, renders templates, produces notifications.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatingStage {
    /// Logical topics to consume; each needs a schema whose `payload` is a union of records.
    /// Required, at least one.
    pub inputs: Vec<String>,
    /// Logical topic the notifications go to; needs a schema. Required.
    pub output: String,
    /// Logical topic receiving events that cannot be decoded or rendered, with their original
    /// bytes and error headers. Required.
    pub dead_letter: String,
    /// Consumer group (prefixed with `topic_prefix`). Default: `tidings-templating`.
    #[serde(default = "default_templating_group")]
    pub group: String,
    /// Kafka records produced but not yet acknowledged by the brokers; when reached, consuming
    /// pauses until acks arrive. It counts records, not notifications: a keyed notification is one
    /// record, a group record (`group_records`) carries a partition's share of a page (a 5,000-user
    /// campaign page is about a dozen records), and a single fan-out larger than the budget takes
    /// all of it. It bounds the output bytes held by the producer; a crash re-emits at most what was
    /// not acknowledged: the unacknowledged pages of a campaign (it resumes after its last
    /// checkpoint) and the outputs of records whose offsets were not stored. Default: 20000.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Recipients of one shared text on the same output partition get one group record
    /// (`recipients` in `schemas/notification.avsc`) instead of a record each; `false` keeps one
    /// keyed record per user, for other consumers of the topic that expect that. Default: true.
    #[serde(default = "default_true")]
    pub group_records: bool,
    /// Largest rendered title or body, in bytes: a longer one is cut at a character boundary
    /// and ends with `…[truncated]` (counted in `tidings_templating_truncated_total`), so one
    /// huge event field cannot make its notifications too large for the output topic (an output
    /// the topic still refuses makes its event a dead letter, reason `output-too-large`).
    /// Default: 65536.
    #[serde(default = "default_max_rendered_bytes")]
    pub max_rendered_bytes: usize,
    /// How long a chat room's members, once read from the store, are reused before they are read
    /// again, in milliseconds. A room's cached members are also dropped when one of its
    /// membership events passes and when its partition is assigned or revoked; 0 reads the
    /// store for every message. At most 100,000 rooms are kept. Default: 60000.
    #[serde(default = "default_room_cache_ttl_ms")]
    pub room_cache_ttl_ms: u64,
}

/// `stages.persistence`: consumes notifications and chat events and bulk-writes them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistenceStage {
    /// Logical topics to consume; each needs a schema. Required, at least one.
    pub inputs: Vec<String>,
    /// Logical topic receiving records that cannot be decoded or stored. Required.
    pub dead_letter: String,
    /// Consumer group (prefixed with `topic_prefix`); must differ from the templating group.
    /// Default: `tidings-persistence`.
    #[serde(default = "default_persistence_group")]
    pub group: String,
    /// Most rows written in one database transaction. Default: 20000.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a partial batch may wait for more records before it is written. Default: 250.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
}

/// `stages.claims`: the claim stage's group, dead-letter topic, batching and memory bounds. It
/// reads `coupon-claims` and writes its decisions to `coupons`. Optional: without it every field
/// takes its default, so a topology written before the claim stage still loads.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimsStage {
    /// Logical topic receiving claim records that cannot be decided on (undecodable, a coupon
    /// past `max_coupons`), with their original bytes and error headers. Must be declared, and
    /// must not be `coupon-claims` or `coupons`. Default: `tidings.dlq.claims`.
    #[serde(default = "default_claims_dead_letter")]
    pub dead_letter: String,
    /// Consumer group (prefixed with `topic_prefix`); also the key of the epochs and offsets
    /// stored with the stage's state, so changing it starts the state afresh. Must differ from
    /// the other stages' groups. Default: `tidings-claims`.
    #[serde(default = "default_claims_group")]
    pub group: String,
    /// Most records decided per store transaction, at least 1. Default: 10000.
    #[serde(default = "default_claims_batch_size")]
    pub batch_size: usize,
    /// Longest a decided record waits for its batch to commit, in milliseconds. Default: 50.
    #[serde(default = "default_claims_linger_ms")]
    pub linger_ms: u64,
    /// Longest a record waits to be decided together with the records read after it, in
    /// milliseconds (their earlier rejections are looked up in one store query). Default: 5.
    #[serde(default = "default_claims_decide_linger_ms")]
    pub decide_linger_ms: u64,
    /// Most coupons defined per `coupon-claims` partition, at least 1 (their definitions,
    /// holders and redemptions stay in memory); a definition past it is a dead letter
    /// (`too-many-coupons`). Default: 10000.
    #[serde(default = "default_claims_max_coupons")]
    pub max_coupons: usize,
    /// Rejected claims remembered per partition, so a retried claim is answered without asking
    /// the store; 0 keeps none. Default: 100000.
    #[serde(default = "default_claims_rejection_cache")]
    pub rejection_cache: usize,
}

impl Default for ClaimsStage {
    fn default() -> Self {
        ClaimsStage {
            dead_letter: default_claims_dead_letter(),
            group: default_claims_group(),
            batch_size: default_claims_batch_size(),
            linger_ms: default_claims_linger_ms(),
            decide_linger_ms: default_claims_decide_linger_ms(),
            max_coupons: default_claims_max_coupons(),
            rejection_cache: default_claims_rejection_cache(),
        }
    }
}

fn default_claims_dead_letter() -> String {
    crate::stages::claims::DEAD_LETTER.to_owned()
}
fn default_claims_group() -> String {
    crate::stages::claims::GROUP.to_owned()
}
fn default_claims_batch_size() -> usize {
    10_000
}
fn default_claims_linger_ms() -> u64 {
    50
}
fn default_claims_decide_linger_ms() -> u64 {
    5
}
fn default_claims_max_coupons() -> usize {
    10_000
}
fn default_claims_rejection_cache() -> usize {
    100_000
}

/// `stages.scheduler`: the stage that keeps records templating holds (a notification inside its
/// user's quiet hours, a campaign whose `send_at` is later) and produces each to its destination
/// at its time. Optional: without it every field takes its default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchedulerStage {
    /// Logical topic of the held records (templating writes them; the headers
    /// `tidings.release-at|release-to|release-id` say when, where and under which id). Must be
    /// declared. Default: `tidings.scheduled`.
    #[serde(default = "default_scheduler_input")]
    pub input: String,
    /// Logical topic receiving held records that cannot be kept (missing or bad release
    /// headers), with their original bytes and error headers. Default: `tidings.dlq.scheduler`.
    #[serde(default = "default_scheduler_dead_letter")]
    pub dead_letter: String,
    /// Consumer group (prefixed with `topic_prefix`); must differ from the other stages' groups.
    /// Default: `tidings-scheduler`.
    #[serde(default = "default_scheduler_group")]
    pub group: String,
    /// How often due records are looked for, in milliseconds, at least 1. Default: 1000.
    #[serde(default = "default_scheduler_tick_ms")]
    pub tick_ms: u64,
    /// Most records released per store query, at least 1. Default: 1000.
    #[serde(default = "default_scheduler_batch_size")]
    pub batch_size: usize,
    /// Notifications held for quiet hours are released over this many milliseconds after the
    /// window ends (each at a point derived from its id), not all at the window's edge.
    /// Default: 1800000 (30 minutes).
    #[serde(default = "default_scheduler_release_spread_ms")]
    pub release_spread_ms: u64,
    /// How long a released record's id is kept, in milliseconds, so a copy of it arriving later
    /// (a replay upstream) is not released again. Default: 604800000 (7 days).
    #[serde(default = "default_scheduler_retain_released_ms")]
    pub retain_released_ms: u64,
}

impl Default for SchedulerStage {
    fn default() -> Self {
        SchedulerStage {
            input: default_scheduler_input(),
            dead_letter: default_scheduler_dead_letter(),
            group: default_scheduler_group(),
            tick_ms: default_scheduler_tick_ms(),
            batch_size: default_scheduler_batch_size(),
            release_spread_ms: default_scheduler_release_spread_ms(),
            retain_released_ms: default_scheduler_retain_released_ms(),
        }
    }
}

fn default_scheduler_input() -> String {
    "tidings.scheduled".to_owned()
}
fn default_scheduler_dead_letter() -> String {
    "tidings.dlq.scheduler".to_owned()
}
fn default_scheduler_group() -> String {
    "tidings-scheduler".to_owned()
}
fn default_scheduler_tick_ms() -> u64 {
    1_000
}
fn default_scheduler_batch_size() -> usize {
    1_000
}
fn default_scheduler_release_spread_ms() -> u64 {
    30 * 60 * 1_000
}
fn default_scheduler_retain_released_ms() -> u64 {
    7 * 24 * 3_600 * 1_000
}

fn default_templating_group() -> String {
    "tidings-templating".to_owned()
}
fn default_persistence_group() -> String {
    "tidings-persistence".to_owned()
}
fn default_max_in_flight() -> usize {
    20_000
}
fn default_max_rendered_bytes() -> usize {
    64 * 1024
}
fn default_room_cache_ttl_ms() -> u64 {
    60_000
}
fn default_batch_size() -> usize {
    20_000
}
fn default_linger_ms() -> u64 {
    250
}

/// One entry of `categories`: a kind of notification a user may opt out of, unless it is critical.
/// Written as `name: { critical: true, description: "..." }`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CategorySpec {
    /// Critical notifications (a payment, a delivery) reach every user: they cannot be opted out
    /// of. Default: false.
    #[serde(default)]
    pub critical: bool,
    /// One line shown next to the category on the preferences page. Default: empty.
    #[serde(default)]
    pub description: String,
}

/// One entry of `templates`: how one event type on one topic becomes notifications.
///
/// Texts are minijinja templates. Their context is the decoded event as JSON (envelope fields
/// at the top level, the payload branch's fields under `payload`), plus `event_type` (the
/// payload branch name) and `recipient` (the user id being notified).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// Logical topic; must be an input of the templating stage. Required.
    pub topic: String,
    /// Branch name of the topic schema's `payload` union, e.g. `OrderPlaced`. Required.
    pub event: String,
    /// Notification kind stored with each notification, e.g. `order.placed`. Required.
    pub kind: String,
    /// Category of these notifications, one of `categories` (what preferences opt out of).
    /// Default: the template's topic name, which must then be declared when `categories` is.
    /// Preferences apply to inbox notifications only (`inbox: true`): delivery-only copies (a
    /// room's chat messages, the answer to a user's own claim) are never dropped by them.
    #[serde(default)]
    pub category: String,
    /// Who is notified. Required.
    pub recipients: Recipients,
    /// Title template. Required.
    pub title: String,
    /// Body template. Required.
    pub body: String,
    /// Link template (a path in the client app). Default: no link.
    #[serde(default)]
    pub link: Option<String>,
    /// Translations keyed by language tag, chosen by the event's `locale` field; the top-level
    /// `title`/`body` are used when the event has no locale or no translation matches.
    /// Default: none. Requires a top-level `locale` field in the topic's schema.
    #[serde(default)]
    pub locales: BTreeMap<String, LocalizedText>,
    /// Whether these notifications are inbox rows (stored, listed, counted). `false` makes them
    /// delivery-only copies, streamed to the recipients but never stored (chat messages to room
    /// members: the room's history holds each message once). Default: true.
    #[serde(default = "default_true")]
    pub inbox: bool,
    /// `event`: each notification also carries the source event as JSON (`data`), for clients that
    /// read it as structured data rather than as title and body. Default: none.
    #[serde(default)]
    pub data: Option<DataSpec>,
}

/// What a notification's `data` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSpec {
    /// The decoded source event (envelope fields, `event_type`, and the payload branch's fields under `payload`).
    Event,
}

fn default_true() -> bool {
    true
}

impl TemplateSpec {
    /// Title and body templates for `locale`: an exact match (`ko-KR`), then the primary
    /// language (`ko`), then the top-level text.
    pub fn texts(&self, locale: Option<&str>) -> (&str, &str) {
        let found = locale.and_then(|tag| {
            self.locales.get(tag).or_else(|| {
                let primary = tag.split(['-', '_']).next().unwrap_or(tag);
                self.locales.get(primary)
            })
        });
        match found {
            Some(t) => (&t.title, &t.body),
            None => (&self.title, &self.body),
        }
    }
}

/// A translation of a template's texts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalizedText {
    /// Title template in this language.
    pub title: String,
    /// Body template in this language.
    pub body: String,
}

/// Who a template notifies. Every value is a dot-separated path into the event JSON
/// (`buyer_id`, `payload.user_id`); `payload.x` names field `x` of the template's event branch.
///
/// Written as a mapping with exactly one of `user`, `users`, `audience`, `room`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// `user: <path>`: one user id (a string field).
    User(String),
    /// `users: <path>`: an array of user ids.
    Users(String),
    /// `audience: <path>`: an `InlineAudience | SegmentAudience` union; a segment is expanded
    /// from the database.
    Audience(String),
    /// `room: <path>` (+ optional `exclude: <path>`): every member of a chat room, except the
    /// user id at `exclude` (e.g. the sender).
    Room {
        /// Path of the room id.
        room: String,
        /// Path of a user id not to notify. Default: none.
        exclude: Option<String>,
    },
}

impl Recipients {
    /// The main path (user, users, audience or room).
    pub fn path(&self) -> &str {
        match self {
            Recipients::User(p) | Recipients::Users(p) | Recipients::Audience(p) => p,
            Recipients::Room { room, .. } => room,
        }
    }
}

impl<'de> Deserialize<'de> for Recipients {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The one-of check runs inside the visitor so the YAML deserializer stamps its error
        // with the position and path of `recipients` (serde's `try_from` would lose both).
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Recipients;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping with one of `user`, `users`, `audience`, `room`")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Recipients, A::Error> {
                let raw = RawRecipients::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Recipients::try_from(raw).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipients {
    user: Option<String>,
    users: Option<String>,
    audience: Option<String>,
    room: Option<String>,
    exclude: Option<String>,
}

impl TryFrom<RawRecipients> for Recipients {
    type Error = String;

    fn try_from(raw: RawRecipients) -> Result<Self, Self::Error> {
        let given: Vec<&str> = [
            ("user", raw.user.is_some()),
            ("users", raw.users.is_some()),
            ("audience", raw.audience.is_some()),
            ("room", raw.room.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| *name)
        .collect();
        if given.len() != 1 {
            return Err(format!(
                "recipients needs exactly one of `user`, `users`, `audience`, `room`; found {}",
                if given.is_empty() { "none".to_owned() } else { given.join(", ") }
            ));
        }
        if raw.exclude.is_some() && raw.room.is_none() {
            return Err("`exclude` is only allowed together with `room`".to_owned());
        }
        if let Some(p) = raw.user {
            return Ok(Recipients::User(p));
        }
        if let Some(p) = raw.users {
            return Ok(Recipients::Users(p));
        }
        if let Some(p) = raw.audience {
            return Ok(Recipients::Audience(p));
        }
        match raw.room {
            Some(room) => Ok(Recipients::Room { room, exclude: raw.exclude }),
            None => Err("recipients needs one of `user`, `users`, `audience`, `room`".to_owned()),
        }
    }
}

/// Accepts `{key: scalar}` and turns every scalar into the string Kafka expects.
fn scalar_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    use serde::de::Error;
    let raw = BTreeMap::<String, serde_yaml::Value>::deserialize(d)?;
    raw.into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                other => {
                    return Err(D::Error::custom(format!(
                        "config `{k}` must be a string, number or boolean, not {other:?}"
                    )))
                }
            };
            Ok((k, s))
        })
        .collect()
}

/// One problem in `topology.yaml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// File, line and column when known, then the entry path, e.g.
    /// `topology.yaml:14:5 templates[2].recipients`.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// Every problem found in `topology.yaml`. Fixing the file is the only remedy: retrying the
/// same file gives the same errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyErrors(pub Vec<Diagnostic>);

impl fmt::Display for TopologyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TopologyErrors {}

impl Topology {
    /// Reads, parses and checks the file at `path`; schema paths are resolved relative to its
    /// directory. On failure returns every problem found.
    pub fn load(path: &Path) -> Result<Topology, TopologyErrors> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            TopologyErrors(vec![Diagnostic {
                location: source.clone(),
                message: format!("cannot read the topology file: {e}"),
            }])
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new("."));
        check::parse(&text, &source, base_dir)
    }

    /// Parses and checks `yaml`; `base_dir` resolves schema paths. Diagnostics name the source
    /// `topology.yaml`.
    pub fn from_str(yaml: &str, base_dir: &Path) -> Result<Topology, TopologyErrors> {
        check::parse(yaml, "topology.yaml", base_dir)
    }

    /// The cluster name of a logical topic: `topic_prefix` + `logical`.
    pub fn topic_name(&self, logical: &str) -> String {
        format!("{}{}", self.topic_prefix, logical)
    }

    /// The cluster name of a logical consumer group: `topic_prefix` + `logical`.
    pub fn group_name(&self, logical: &str) -> String {
        format!("{}{}", self.topic_prefix, logical)
    }

    /// The logical topic for a cluster topic name, if it is one of ours.
    pub fn logical_topic(&self, physical: &str) -> Option<&str> {
        let logical = physical.strip_prefix(self.topic_prefix.as_str())?;
        self.topics.get_key_value(logical).map(|(k, _)| k.as_str())
    }

    /// The `.avsc` text of a logical topic's schema, if it has one.
    pub fn schema_text(&self, logical_topic: &str) -> Option<&str> {
        self.schemas.get(logical_topic).map(|s| s.text.as_str())
    }

    /// The parsed Avro schema of a logical topic, if it has one.
    pub fn schema(&self, logical_topic: &str) -> Option<&apache_avro::Schema> {
        self.schemas.get(logical_topic).map(|s| &s.parsed)
    }

    /// Every category a notification can have: `categories` by name, then the templates' default
    /// categories a file without `categories` gives them (not critical, no description).
    pub fn category_list(&self) -> Vec<(String, CategorySpec)> {
        let mut out: Vec<(String, CategorySpec)> =
            self.categories.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for t in &self.templates {
            if !out.iter().any(|(name, _)| *name == t.category) {
                out.push((t.category.clone(), CategorySpec::default()));
            }
        }
        out
    }

    /// Whether `category` is declared critical (a category not declared is not).
    pub fn is_critical(&self, category: &str) -> bool {
        self.categories.get(category).is_some_and(|c| c.critical)
    }

    /// The template for `event` (a payload branch name) on a logical topic.
    pub fn template(&self, logical_topic: &str, event: &str) -> Option<&TemplateSpec> {
        self.templates.iter().find(|t| t.topic == logical_topic && t.event == event)
    }

    /// The same topology with `topic_prefix` replaced by `prefix`.
    pub fn with_prefix(mut self, prefix: &str) -> Topology {
        self.topic_prefix = prefix.to_owned();
        self
    }
}
