//! The embedded, Confluent-compatible schema registry: subjects, versions and globally unique ids
//! for Avro schemas, with compatibility enforcement. The store is the source of truth; an in-memory
//! mirror serves the hot reads (schema by id, latest version) without touching the database.

mod api;
mod storage;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use apache_avro::error::CompatibilityError;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};
use apache_avro::Schema;
use tidings_store::{Store, StoreError};

pub use api::{guarded_router, router, serve, serve_with, Access};

/// The only schema type this registry accepts.
pub const AVRO: &str = "AVRO";

/// How often at most a lookup miss may reload the mirror from the store. Misses are what another
/// registry instance writing to the same database looks like; the limit keeps a client asking for
/// unknown ids from turning every request into a full reload.
const MISS_REFRESH_INTERVAL: Duration = Duration::from_secs(1);

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryServerError {
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error("Unsupported schema type {0:?}: this registry only accepts AVRO")]
    UnsupportedSchemaType(String),
    #[error(
        "Schema being registered is incompatible with an earlier schema for subject {subject:?}, details: [{}]",
        .reasons.join("; ")
    )]
    Incompatible { subject: String, reasons: Vec<String> },
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {version} not found for subject '{subject}'.")]
    VersionNotFound { subject: String, version: String },
    #[error("Schema {0} not found")]
    SchemaNotFound(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error("Subject '{subject}' Version {version} was soft deleted. Set permanent=true to delete permanently")]
    VersionSoftDeleted { subject: String, version: u32 },
    #[error("Subject '{subject}' Version {version} was not deleted first before being permanently deleted")]
    VersionNotSoftDeleted { subject: String, version: u32 },
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectLevelNotFound(String),
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error("Invalid compatibility level {0:?}. Valid values are NONE, BACKWARD, BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE")]
    InvalidCompatibilityLevel(String),
    #[error("Error in the backend data store: {0}")]
    Store(#[from] StoreError),
}

impl RegistryServerError {
    /// Whether the same request may succeed later: only when the store was unavailable.
    pub fn is_retriable(&self) -> bool {
        matches!(self, RegistryServerError::Store(e) if e.is_retriable())
    }

    fn is_not_found(&self) -> bool {
        matches!(
            self,
            RegistryServerError::SubjectNotFound(_)
                | RegistryServerError::VersionNotFound { .. }
                | RegistryServerError::SchemaNotFound(_)
        )
    }
}

/// Confluent's compatibility levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompatibilityLevel {
    None,
    #[default]
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl CompatibilityLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            CompatibilityLevel::None => "NONE",
            CompatibilityLevel::Backward => "BACKWARD",
            CompatibilityLevel::BackwardTransitive => "BACKWARD_TRANSITIVE",
            CompatibilityLevel::Forward => "FORWARD",
            CompatibilityLevel::ForwardTransitive => "FORWARD_TRANSITIVE",
            CompatibilityLevel::Full => "FULL",
            CompatibilityLevel::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Parses a level name (case-insensitively).
    pub fn parse(name: &str) -> Result<Self, RegistryServerError> {
        let level = match name.trim().to_ascii_uppercase().as_str() {
            "NONE" => CompatibilityLevel::None,
            "BACKWARD" => CompatibilityLevel::Backward,
            "BACKWARD_TRANSITIVE" => CompatibilityLevel::BackwardTransitive,
            "FORWARD" => CompatibilityLevel::Forward,
            "FORWARD_TRANSITIVE" => CompatibilityLevel::ForwardTransitive,
            "FULL" => CompatibilityLevel::Full,
            "FULL_TRANSITIVE" => CompatibilityLevel::FullTransitive,
            _ => return Err(RegistryServerError::InvalidCompatibilityLevel(name.to_string())),
        };
        Ok(level)
    }

    /// The new schema must read data written with the old ones.
    fn backward(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::Backward
                | CompatibilityLevel::BackwardTransitive
                | CompatibilityLevel::Full
                | CompatibilityLevel::FullTransitive
        )
    }

    /// The old schemas must read data written with the new one.
    fn forward(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::Forward
                | CompatibilityLevel::ForwardTransitive
                | CompatibilityLevel::Full
                | CompatibilityLevel::FullTransitive
        )
    }

    /// Checked against every live version rather than only the latest.
    fn transitive(self) -> bool {
        matches!(
            self,
            CompatibilityLevel::BackwardTransitive
                | CompatibilityLevel::ForwardTransitive
                | CompatibilityLevel::FullTransitive
        )
    }
}

impl fmt::Display for CompatibilityLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A version path segment: a number or `latest` (also spelled `-1`, as Confluent allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VersionSelector {
    Latest,
    Number(u32),
}

impl VersionSelector {
    pub(crate) fn parse(raw: &str) -> Result<Self, RegistryServerError> {
        if raw == "latest" || raw == "-1" {
            return Ok(VersionSelector::Latest);
        }
        match raw.parse::<i32>() {
            Ok(n) if n >= 1 => Ok(VersionSelector::Number(n.unsigned_abs())),
            _ => Err(RegistryServerError::InvalidVersion(raw.to_string())),
        }
    }

    fn describe(self) -> String {
        match self {
            VersionSelector::Latest => "latest".to_string(),
            VersionSelector::Number(n) => n.to_string(),
        }
    }
}

/// One version of a subject, as the REST API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubjectVersion {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub schema_type: String,
    pub schema: String,
}

/// A schema parsed and keyed for deduplication.
struct Candidate {
    parsed: Arc<Schema>,
    key: String,
}

/// Parses `text` as a schema of `schema_type` (None means AVRO, as in Confluent's API).
fn parse_candidate(text: &str, schema_type: Option<&str>) -> Result<Candidate, RegistryServerError> {
    if let Some(t) = schema_type {
        if !t.eq_ignore_ascii_case(AVRO) {
            return Err(RegistryServerError::UnsupportedSchemaType(t.to_string()));
        }
    }
    let parsed = Schema::parse_str(text).map_err(|e| RegistryServerError::InvalidSchema(e.to_string()))?;
    let key = dedup_key(&parsed)?;
    Ok(Candidate { parsed: Arc::new(parsed), key })
}

/// The identity of a schema for id reuse. Not the Parsing Canonical Form: that strips `default`,
/// `doc`, `aliases` and `logicalType`, so schemas differing only in a field default would share an
/// id (and the text served for it, which readers resolve against, would be whichever came first).
/// Like Confluent's normalized string, this is the full schema re-serialized from the parsed
/// form, so formatting and key order do not matter.
fn dedup_key(schema: &Schema) -> Result<String, RegistryServerError> {
    serde_json::to_string(schema).map_err(|e| RegistryServerError::InvalidSchema(e.to_string()))
}

struct StoredSchema {
    schema_type: String,
    text: String,
    parsed: Arc<Schema>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VersionEntry {
    version: u32,
    schema_id: u32,
    deleted: bool,
}

/// A change to the registry, applied to the store first and then to the mirror.
enum Mutation {
    InsertSchema {
        id: u32,
        schema_type: String,
        text: String,
        key: String,
        parsed: Arc<Schema>,
    },
    InsertVersion {
        subject: String,
        version: u32,
        schema_id: u32,
    },
    SoftDeleteVersion {
        subject: String,
        version: u32,
    },
    HardDeleteVersion {
        subject: String,
        version: u32,
    },
    /// `subject` "" is the global level.
    PutLevel {
        subject: String,
        level: CompatibilityLevel,
    },
    DeleteLevel {
        subject: String,
    },
}

/// The in-memory mirror of the three registry tables.
#[derive(Default)]
struct State {
    schemas: HashMap<u32, StoredSchema>,
    ids_by_key: HashMap<String, u32>,
    /// Versions of each subject in ascending order, soft-deleted ones included.
    subjects: BTreeMap<String, Vec<VersionEntry>>,
    global: Option<CompatibilityLevel>,
    subject_levels: HashMap<String, CompatibilityLevel>,
}

impl State {
    fn from_snapshot(snapshot: storage::Snapshot) -> Result<State, RegistryServerError> {
        let mut state = State::default();
        let mut schemas = snapshot.schemas;
        // Lowest id first, so if two stored rows ever share a key the older id is the one reused.
        schemas.sort_by_key(|s| s.id);
        for row in schemas {
            let candidate = parse_candidate(&row.schema, Some(&row.schema_type)).map_err(|e| {
                RegistryServerError::InvalidSchema(format!("stored schema {} no longer parses: {e}", row.id))
            })?;
            state.ids_by_key.entry(candidate.key).or_insert(row.id);
            state.schemas.insert(
                row.id,
                StoredSchema { schema_type: row.schema_type, text: row.schema, parsed: candidate.parsed },
            );
        }
        for row in snapshot.versions {
            state.subjects.entry(row.subject).or_default().push(VersionEntry {
                version: row.version,
                schema_id: row.schema_id,
                deleted: row.deleted,
            });
        }
        for versions in state.subjects.values_mut() {
            versions.sort_by_key(|v| v.version);
        }
        for row in snapshot.config {
            let level = CompatibilityLevel::parse(&row.compatibility)?;
            if row.subject.is_empty() {
                state.global = Some(level);
            } else {
                state.subject_levels.insert(row.subject, level);
            }
        }
        Ok(state)
    }

    fn apply(&mut self, mutation: Mutation) {
        match mutation {
            Mutation::InsertSchema { id, schema_type, text, key, parsed } => {
                self.ids_by_key.entry(key).or_insert(id);
                self.schemas.insert(id, StoredSchema { schema_type, text, parsed });
            }
            Mutation::InsertVersion { subject, version, schema_id } => {
                let versions = self.subjects.entry(subject).or_default();
                versions.push(VersionEntry { version, schema_id, deleted: false });
                versions.sort_by_key(|v| v.version);
            }
            Mutation::SoftDeleteVersion { subject, version } => {
                if let Some(v) =
                    self.subjects.get_mut(&subject).and_then(|vs| vs.iter_mut().find(|v| v.version == version))
                {
                    v.deleted = true;
                }
            }
            Mutation::HardDeleteVersion { subject, version } => {
                if let Some(versions) = self.subjects.get_mut(&subject) {
                    versions.retain(|v| v.version != version);
                    if versions.is_empty() {
                        self.subjects.remove(&subject);
                    }
                }
            }
            Mutation::PutLevel { subject, level } => {
                if subject.is_empty() {
                    self.global = Some(level);
                } else {
                    self.subject_levels.insert(subject, level);
                }
            }
            Mutation::DeleteLevel { subject } => {
                if subject.is_empty() {
                    self.global = None;
                } else {
                    self.subject_levels.remove(&subject);
                }
            }
        }
    }

    fn global_level(&self) -> CompatibilityLevel {
        self.global.unwrap_or_default()
    }

    fn level_for(&self, subject: &str) -> CompatibilityLevel {
        self.subject_levels.get(subject).copied().unwrap_or_else(|| self.global_level())
    }

    /// The versions of `subject` visible with or without soft-deleted ones; a subject with none
    /// visible does not exist.
    fn visible(&self, subject: &str, include_deleted: bool) -> Result<Vec<VersionEntry>, RegistryServerError> {
        let versions: Vec<VersionEntry> = self
            .subjects
            .get(subject)
            .map(|vs| vs.iter().filter(|v| include_deleted || !v.deleted).copied().collect())
            .unwrap_or_default();
        if versions.is_empty() {
            return Err(RegistryServerError::SubjectNotFound(subject.to_string()));
        }
        Ok(versions)
    }

    fn resolve(
        &self,
        subject: &str,
        selector: VersionSelector,
        include_deleted: bool,
    ) -> Result<VersionEntry, RegistryServerError> {
        let versions = self.visible(subject, include_deleted)?;
        let found = match selector {
            VersionSelector::Latest => versions.last().copied(),
            VersionSelector::Number(n) => versions.iter().find(|v| v.version == n).copied(),
        };
        found.ok_or_else(|| RegistryServerError::VersionNotFound {
            subject: subject.to_string(),
            version: selector.describe(),
        })
    }

    fn schema(&self, id: u32) -> Result<&StoredSchema, RegistryServerError> {
        self.schemas.get(&id).ok_or_else(|| RegistryServerError::SchemaNotFound(id.to_string()))
    }

    fn subject_version(&self, subject: &str, entry: VersionEntry) -> Result<SubjectVersion, RegistryServerError> {
        let stored = self.schema(entry.schema_id)?;
        Ok(SubjectVersion {
            subject: subject.to_string(),
            version: entry.version,
            id: entry.schema_id,
            schema_type: stored.schema_type.clone(),
            schema: stored.text.clone(),
        })
    }

    /// The id of `candidate` if it is already a live version of `subject`.
    fn registered_id(&self, subject: &str, candidate: &Candidate) -> Option<u32> {
        let id = *self.ids_by_key.get(&candidate.key)?;
        self.subjects.get(subject)?.iter().any(|v| !v.deleted && v.schema_id == id).then_some(id)
    }

    /// The live versions a registration under `level` is checked against.
    fn versions_to_check(&self, subject: &str, level: CompatibilityLevel) -> Vec<VersionEntry> {
        let live: Vec<VersionEntry> = self
            .subjects
            .get(subject)
            .map(|vs| vs.iter().filter(|v| !v.deleted).copied().collect())
            .unwrap_or_default();
        if level.transitive() {
            live
        } else {
            live.last().copied().into_iter().collect()
        }
    }

    /// Why `candidate` is incompatible with `against` under `level`; empty when it is compatible.
    fn problems(&self, level: CompatibilityLevel, candidate: &Schema, against: &[VersionEntry]) -> Vec<String> {
        let mut problems = Vec::new();
        for entry in against {
            let Some(old) = self.schemas.get(&entry.schema_id) else {
                continue;
            };
            if level.backward() {
                if let Some(why) = cannot_read(&old.parsed, candidate) {
                    problems.push(format!(
                        "{level}: the new schema cannot read data written with version {}: {why}",
                        entry.version
                    ));
                }
            }
            if level.forward() {
                if let Some(why) = cannot_read(candidate, &old.parsed) {
                    problems.push(format!(
                        "{level}: version {} cannot read data written with the new schema: {why}",
                        entry.version
                    ));
                }
            }
        }
        problems
    }

    fn next_schema_id(&self) -> u32 {
        self.schemas.keys().max().map_or(1, |m| m + 1)
    }

    fn next_version(&self, subject: &str) -> u32 {
        self.subjects.get(subject).and_then(|vs| vs.last()).map_or(1, |v| v.version + 1)
    }
}

/// Why a reader with `reader` cannot decode everything written with `writer`, if it cannot.
/// A partial match (some writer union branches or enum symbols unknown to the reader) counts as
/// incompatible, as in Confluent: some records written would fail to decode.
fn cannot_read(writer: &Schema, reader: &Schema) -> Option<String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => None,
        Ok(Compatibility::Partial) => Some(
            "only partially: a union branch or enum symbol of the writer has no counterpart in the reader".to_string(),
        ),
        Err(e) => Some(describe_incompatibility(&e)),
    }
}

/// Renders a compatibility error with its nested cause, without the full schema dumps
/// `WrongType` carries.
fn describe_incompatibility(error: &CompatibilityError) -> String {
    fn kind(debug_dump: &str) -> &str {
        let end = debug_dump.find(|c: char| !c.is_ascii_alphanumeric()).unwrap_or(debug_dump.len());
        &debug_dump[..end]
    }
    match error {
        CompatibilityError::FieldTypeMismatch(field, inner) => {
            format!("field '{field}' has an incompatible type: {}", describe_incompatibility(inner))
        }
        CompatibilityError::WrongType { writer_schema_type, reader_schema_type } => {
            format!("writer type {} cannot be read as {}", kind(writer_schema_type), kind(reader_schema_type))
        }
        other => other.to_string(),
    }
}

struct Inner {
    store: Store,
    state: RwLock<State>,
    /// Serializes writes (and reloads) in this process so the mirror is replaced in commit order.
    writer: tokio::sync::Mutex<()>,
    last_refresh: std::sync::Mutex<Instant>,
}

/// The registry: cheap to clone, shared by the HTTP handlers and in-process producers.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").field("store", &self.inner.store.backend()).finish_non_exhaustive()
    }
}

impl Registry {
    /// Loads the registry from `store` (already migrated).
    pub async fn open(store: Store) -> Result<Registry, RegistryServerError> {
        let state = State::from_snapshot(storage::load(&store).await?)?;
        Ok(Registry {
            inner: Arc::new(Inner {
                store,
                state: RwLock::new(state),
                writer: tokio::sync::Mutex::new(()),
                last_refresh: std::sync::Mutex::new(Instant::now()),
            }),
        })
    }

    /// Registers (idempotently) `schema` under `subject`, enforcing compatibility; returns the id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryServerError> {
        self.register_typed(subject, schema, None).await
    }

    /// The schema text registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryServerError> {
        self.read(|s| s.schema(id).map(|stored| stored.text.clone())).await
    }

    pub(crate) async fn register_typed(
        &self,
        subject: &str,
        schema: &str,
        schema_type: Option<&str>,
    ) -> Result<u32, RegistryServerError> {
        let candidate = parse_candidate(schema, schema_type)?;
        if let Some(id) = self.with_state(|s| s.registered_id(subject, &candidate)) {
            return Ok(id);
        }
        self.write(|state| {
            if let Some(id) = state.registered_id(subject, &candidate) {
                return Ok((Vec::new(), id));
            }
            let level = state.level_for(subject);
            let problems = state.problems(level, &candidate.parsed, &state.versions_to_check(subject, level));
            if !problems.is_empty() {
                return Err(RegistryServerError::Incompatible { subject: subject.to_string(), reasons: problems });
            }
            let mut mutations = Vec::new();
            let id = match state.ids_by_key.get(&candidate.key) {
                Some(id) => *id,
                None => {
                    let id = state.next_schema_id();
                    mutations.push(Mutation::InsertSchema {
                        id,
                        schema_type: AVRO.to_string(),
                        text: schema.to_string(),
                        key: candidate.key.clone(),
                        parsed: candidate.parsed.clone(),
                    });
                    id
                }
            };
            mutations.push(Mutation::InsertVersion {
                subject: subject.to_string(),
                version: state.next_version(subject),
                schema_id: id,
            });
            Ok((mutations, id))
        })
        .await
    }

    /// The version of `subject` holding `schema`, the latest live one if several do.
    pub(crate) async fn lookup(
        &self,
        subject: &str,
        schema: &str,
        schema_type: Option<&str>,
        include_deleted: bool,
    ) -> Result<SubjectVersion, RegistryServerError> {
        let candidate = parse_candidate(schema, schema_type)?;
        self.read(|s| {
            let versions = s.visible(subject, include_deleted)?;
            let id = s.ids_by_key.get(&candidate.key).copied();
            let newest_first = || versions.iter().rev().filter(|v| Some(v.schema_id) == id);
            let best = newest_first().find(|v| !v.deleted).or_else(|| newest_first().next());
            match best {
                Some(entry) => s.subject_version(subject, *entry),
                None => Err(RegistryServerError::SchemaNotFound(format!("under subject '{subject}'"))),
            }
        })
        .await
    }

    pub(crate) async fn schema_with_type(&self, id: u32) -> Result<(String, String), RegistryServerError> {
        self.read(|s| s.schema(id).map(|stored| (stored.schema_type.clone(), stored.text.clone()))).await
    }

    /// The subject/version pairs using schema `id`.
    pub(crate) async fn usages(
        &self,
        id: u32,
        include_deleted: bool,
    ) -> Result<Vec<(String, u32)>, RegistryServerError> {
        self.read(|s| {
            s.schema(id)?;
            Ok(s.subjects
                .iter()
                .flat_map(|(subject, versions)| {
                    versions
                        .iter()
                        .filter(|v| v.schema_id == id && (include_deleted || !v.deleted))
                        .map(|v| (subject.clone(), v.version))
                })
                .collect())
        })
        .await
    }

    pub(crate) fn subjects(&self, include_deleted: bool) -> Vec<String> {
        self.with_state(|s| {
            s.subjects
                .iter()
                .filter(|(_, vs)| vs.iter().any(|v| include_deleted || !v.deleted))
                .map(|(subject, _)| subject.clone())
                .collect()
        })
    }

    pub(crate) async fn versions(&self, subject: &str, include_deleted: bool) -> Result<Vec<u32>, RegistryServerError> {
        self.read(|s| Ok(s.visible(subject, include_deleted)?.iter().map(|v| v.version).collect())).await
    }

    pub(crate) async fn version(
        &self,
        subject: &str,
        selector: VersionSelector,
        include_deleted: bool,
    ) -> Result<SubjectVersion, RegistryServerError> {
        self.read(|s| s.subject_version(subject, s.resolve(subject, selector, include_deleted)?)).await
    }

    /// Problems `schema` has against `subject` under its level: against one version, or (None)
    /// against the versions a registration would be checked against. Empty means compatible.
    pub(crate) async fn check_compatibility(
        &self,
        subject: &str,
        selector: Option<VersionSelector>,
        schema: &str,
        schema_type: Option<&str>,
    ) -> Result<Vec<String>, RegistryServerError> {
        let candidate = parse_candidate(schema, schema_type)?;
        self.read(|s| {
            let level = s.level_for(subject);
            let against = match selector {
                Some(selector) => vec![s.resolve(subject, selector, false)?],
                None => s.versions_to_check(subject, level),
            };
            Ok(s.problems(level, &candidate.parsed, &against))
        })
        .await
    }

    /// Soft-deletes (or, when `permanent`, removes an already soft-deleted) version; returns it.
    pub(crate) async fn delete_version(
        &self,
        subject: &str,
        selector: VersionSelector,
        permanent: bool,
    ) -> Result<u32, RegistryServerError> {
        self.write(|s| {
            let entry = s.resolve(subject, selector, permanent)?;
            let (subject, version) = (subject.to_string(), entry.version);
            match (permanent, entry.deleted) {
                (false, _) => Ok((vec![Mutation::SoftDeleteVersion { subject, version }], version)),
                (true, true) => Ok((vec![Mutation::HardDeleteVersion { subject, version }], version)),
                (true, false) => Err(RegistryServerError::VersionNotSoftDeleted { subject, version }),
            }
        })
        .await
        .map_err(|e| match e {
            // Soft-deleting a soft-deleted version resolves to "not found"; Confluent says why.
            RegistryServerError::VersionNotFound { .. } if !permanent => match selector {
                VersionSelector::Number(version) if self.is_soft_deleted(subject, version) => {
                    RegistryServerError::VersionSoftDeleted { subject: subject.to_string(), version }
                }
                _ => e,
            },
            other => other,
        })
    }

    fn is_soft_deleted(&self, subject: &str, version: u32) -> bool {
        self.with_state(|s| {
            s.subjects.get(subject).is_some_and(|vs| vs.iter().any(|v| v.version == version && v.deleted))
        })
    }

    /// Soft-deletes every live version (or, when `permanent`, removes a fully soft-deleted
    /// subject); returns the versions affected.
    pub(crate) async fn delete_subject(&self, subject: &str, permanent: bool) -> Result<Vec<u32>, RegistryServerError> {
        self.write(|s| {
            let versions = s.visible(subject, permanent)?;
            if permanent && versions.iter().any(|v| !v.deleted) {
                return Err(RegistryServerError::SubjectNotSoftDeleted(subject.to_string()));
            }
            let numbers: Vec<u32> = versions.iter().map(|v| v.version).collect();
            let mutations = numbers
                .iter()
                .map(|&version| {
                    let subject = subject.to_string();
                    if permanent {
                        Mutation::HardDeleteVersion { subject, version }
                    } else {
                        Mutation::SoftDeleteVersion { subject, version }
                    }
                })
                .collect();
            Ok((mutations, numbers))
        })
        .await
    }

    pub(crate) fn global_level(&self) -> CompatibilityLevel {
        self.with_state(State::global_level)
    }

    /// The subject's own level, if it has one.
    pub(crate) fn subject_level(&self, subject: &str) -> Option<CompatibilityLevel> {
        self.with_state(|s| s.subject_levels.get(subject).copied())
    }

    /// Sets the level of `subject`, or the global level when `subject` is None.
    pub(crate) async fn set_level(
        &self,
        subject: Option<&str>,
        level: CompatibilityLevel,
    ) -> Result<(), RegistryServerError> {
        let subject = subject.unwrap_or_default().to_string();
        self.write(|_| Ok((vec![Mutation::PutLevel { subject, level }], ()))).await
    }

    /// Removes the level of `subject` (or resets the global one); returns the level it had.
    pub(crate) async fn delete_level(&self, subject: Option<&str>) -> Result<CompatibilityLevel, RegistryServerError> {
        self.write(|s| {
            let previous = match subject {
                None => s.global_level(),
                Some(name) => *s
                    .subject_levels
                    .get(name)
                    .ok_or_else(|| RegistryServerError::SubjectLevelNotFound(name.to_string()))?,
            };
            let subject = subject.unwrap_or_default().to_string();
            Ok((vec![Mutation::DeleteLevel { subject }], previous))
        })
        .await
    }

    fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let guard = self.inner.state.read().unwrap_or_else(PoisonError::into_inner);
        f(&guard)
    }

    fn replace_state(&self, state: State) {
        *self.inner.state.write().unwrap_or_else(PoisonError::into_inner) = state;
        *self.inner.last_refresh.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// Answers from the mirror; on a "not found", reloads it once (rate-limited) in case another
    /// registry instance sharing the store wrote it, and answers again.
    async fn read<T>(&self, f: impl Fn(&State) -> Result<T, RegistryServerError>) -> Result<T, RegistryServerError> {
        match self.with_state(&f) {
            Err(e) if e.is_not_found() => {
                let due = self.inner.last_refresh.lock().unwrap_or_else(PoisonError::into_inner).elapsed()
                    >= MISS_REFRESH_INTERVAL;
                if !due {
                    return Err(e);
                }
                let _writer = self.inner.writer.lock().await;
                let state = State::from_snapshot(storage::load(&self.inner.store).await?)?;
                self.replace_state(state);
                self.with_state(&f)
            }
            other => other,
        }
    }

    /// Runs a write: under the store's registry lock, reloads the tables (another instance may
    /// have written), lets `decide` plan the mutations on that fresh state, commits them and
    /// only then publishes the new state to readers.
    async fn write<T>(
        &self,
        decide: impl FnOnce(&State) -> Result<(Vec<Mutation>, T), RegistryServerError>,
    ) -> Result<T, RegistryServerError> {
        let _writer = self.inner.writer.lock().await;
        let mut tx = storage::begin(&self.inner.store).await?;
        let mut state = State::from_snapshot(tx.load().await?)?;
        let (mutations, value) = match decide(&state) {
            Ok(planned) => planned,
            Err(e) => {
                self.replace_state(state);
                return Err(e);
            }
        };
        for mutation in &mutations {
            tx.apply(mutation).await?;
        }
        tx.commit().await?;
        for mutation in mutations {
            state.apply(mutation);
        }
        self.replace_state(state);
        Ok(value)
    }
}
