//! Parsing and checking of `topology.yaml`. Each topic, stage and template is deserialized on its
//! own and then cross-checked against the others and the Avro schemas, so one mistake never hides
//! another. Positions come from re-reading the text with a serde walk directed at one YAML path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use apache_avro::Schema;
use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;
use serde_yaml::Value;

use super::{
    CategorySpec, ClaimsStage, Diagnostic, LoadedSchema, PersistenceStage, Recipients, SchedulerStage, Stages,
    TemplateSpec, TemplatingStage, TopicSpec, Topology, TopologyErrors,
};
use crate::stages::claims::{INPUT as CLAIMS_INPUT, OUTPUT as CLAIMS_OUTPUT};

/// The logical topic of campaigns: its events carry their own title and body templates, so the
/// templates of `topology.yaml` need none for it.
pub const CAMPAIGNS_TOPIC: &str = "campaigns";

/// Kafka's limit on topic name length.
const MAX_TOPIC_NAME: usize = 249;
/// Names minijinja resolves as globals, so they are not event fields.
const JINJA_GLOBALS: [&str; 4] = ["range", "dict", "namespace", "debug"];
/// Context variables the templating stage adds next to the event fields.
const EXTRA_CONTEXT: [&str; 2] = ["event_type", "recipient"];
const ROOT_KEYS: [&str; 5] = ["topic_prefix", "topics", "stages", "categories", "templates"];

/// Parses and checks a topology; `source` names the file in diagnostics.
pub(super) fn parse(text: &str, source: &str, base_dir: &Path) -> Result<Topology, TopologyErrors> {
    let root: Value = match serde_yaml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let location = match e.location() {
                Some(l) => format!("{source}:{}:{}", l.line(), l.column()),
                None => source.to_owned(),
            };
            return Err(TopologyErrors(vec![Diagnostic { location, message: format!("YAML syntax error: {e}") }]));
        }
    };
    let mut checker = Checker { text, source, errors: Vec::new(), warnings: Vec::new() };
    let parsed = checker.structure(&root);
    let schemas = checker.load_schemas(&parsed, base_dir);
    checker.semantics(&parsed, &schemas);
    sort_by_position(&mut checker.errors);
    sort_by_position(&mut checker.warnings);
    if !checker.errors.is_empty() {
        return Err(TopologyErrors(checker.errors));
    }
    let (Some(templating), Some(persistence)) = (parsed.templating, parsed.persistence) else {
        // Missing stages are always reported by `structure`; this keeps the invariant explicit.
        return Err(TopologyErrors(vec![Diagnostic {
            location: source.to_owned(),
            message: "`stages` needs both `templating` and `persistence`".to_owned(),
        }]));
    };
    Ok(Topology {
        topic_prefix: parsed.topic_prefix,
        topics: parsed.topics,
        // Without a `stages.claims` section the claim stage runs with its defaults.
        stages: Stages {
            templating,
            persistence,
            claims: parsed.claims.unwrap_or_default(),
            scheduler: parsed.scheduler.unwrap_or_default(),
        },
        templates: parsed
            .templates
            .into_iter()
            .map(|(_, mut t)| {
                // A template without a category is in its topic's (documented default).
                if t.category.is_empty() {
                    t.category = t.topic.clone();
                }
                t
            })
            .collect(),
        categories: parsed.categories,
        warnings: checker.warnings,
        schemas,
    })
}

/// File order, so the report reads top to bottom; entries without a line go last.
fn sort_by_position(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by_key(|d| {
        let mut parts = d.location.split(' ').next().unwrap_or("").rsplitn(3, ':');
        let col = parts.next().and_then(|c| c.parse::<usize>().ok());
        let line = parts.next().and_then(|l| l.parse::<usize>().ok());
        match (line, col) {
            (Some(l), Some(c)) => (l, c),
            _ => (usize::MAX, usize::MAX),
        }
    });
}

/// One step of a YAML path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// A path from the document root, displayed like serde_norway does: `templates[2].recipients`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct YamlPath(Vec<Seg>);

impl YamlPath {
    fn key(&self, k: &str) -> YamlPath {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(k.to_owned()));
        YamlPath(segs)
    }

    fn index(&self, i: usize) -> YamlPath {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(i));
        YamlPath(segs)
    }
}

impl fmt::Display for YamlPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(top level)");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// What happens at the end of a [`Walk`].
trait Terminal {
    fn run<'de, D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error>;
}

/// Deserializes the node into `T`.
struct Extract<'s, T>(&'s mut Option<T>);

impl<T: DeserializeOwned> Terminal for Extract<'_, T> {
    fn run<'de, D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        *self.0 = Some(T::deserialize(d)?);
        Ok(())
    }
}

/// Fails on the node with a marker error; the deserializer stamps it with the node's position.
struct Locate;

const LOCATE_MARKER: &str = "\u{1}tidings-locate\u{1}";

impl Terminal for Locate {
    fn run<'de, D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        struct Fail;
        impl<'de> Visitor<'de> for Fail {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // Every default `visit_*` fails with "invalid type ..., expected <this>".
                f.write_str(LOCATE_MARKER)
            }
        }
        d.deserialize_any(Fail)
    }
}

/// Follows `path` through the document, skipping everything else, and runs `term` on the node.
struct Walk<'p, X> {
    path: &'p [Seg],
    term: X,
}

impl<'de, X: Terminal> DeserializeSeed<'de> for Walk<'_, X> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        match self.path.split_first() {
            None => self.term.run(d),
            Some((seg, rest)) => d.deserialize_any(WalkVisitor { seg, rest, term: self.term }),
        }
    }
}

struct WalkVisitor<'p, X> {
    seg: &'p Seg,
    rest: &'p [Seg],
    term: X,
}

impl<'de, X: Terminal> Visitor<'de> for WalkVisitor<'_, X> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping or sequence")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut term = Some(self.term);
        while let Some(key) = map.next_key::<Value>()? {
            let hit = matches!((&key, self.seg), (Value::String(k), Seg::Key(want)) if k == want);
            if hit {
                if let Some(t) = term.take() {
                    map.next_value_seed(Walk { path: self.rest, term: t })?;
                    continue;
                }
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let want = match self.seg {
            Seg::Index(i) => Some(*i),
            Seg::Key(_) => None,
        };
        let mut term = Some(self.term);
        let mut i = 0;
        loop {
            if Some(i) == want {
                if let Some(t) = term.take() {
                    let found = seq.next_element_seed(Walk { path: self.rest, term: t })?;
                    if found.is_none() {
                        return Ok(());
                    }
                    i += 1;
                    continue;
                }
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    // Scalars on the way mean the path does not exist; nothing to find.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

/// 1-based line and column of the node at `path`, if it exists.
fn locate(text: &str, path: &YamlPath) -> Option<(usize, usize)> {
    let de = serde_yaml::Deserializer::from_str(text);
    let err = Walk { path: &path.0, term: Locate }.deserialize(de).err()?;
    if !err.to_string().contains(LOCATE_MARKER) {
        return None;
    }
    err.location().map(|l| (l.line(), l.column()))
}

/// Everything that deserialized, entry by entry.
#[derive(Default)]
struct Parsed {
    topic_prefix: String,
    /// Every key under `topics`, including entries that failed to deserialize, so references
    /// to them are not reported a second time as undeclared.
    declared: BTreeSet<String>,
    topics: BTreeMap<String, TopicSpec>,
    templating: Option<TemplatingStage>,
    persistence: Option<PersistenceStage>,
    /// `stages.claims`, when the file has it (it is optional).
    claims: Option<ClaimsStage>,
    /// `stages.scheduler`, when the file has it (it is optional).
    scheduler: Option<SchedulerStage>,
    /// With their index in the file.
    templates: Vec<(usize, TemplateSpec)>,
    categories: BTreeMap<String, CategorySpec>,
}

struct Checker<'a> {
    text: &'a str,
    source: &'a str,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn diagnostic(&self, path: &YamlPath, message: String) -> Diagnostic {
        let location = match locate(self.text, path) {
            Some((line, col)) => format!("{}:{line}:{col} {path}", self.source),
            None => format!("{} {path}", self.source),
        };
        Diagnostic { location, message }
    }

    fn error(&mut self, path: &YamlPath, message: impl Into<String>) {
        let d = self.diagnostic(path, message.into());
        self.errors.push(d);
    }

    fn warn(&mut self, path: &YamlPath, message: impl Into<String>) {
        let d = self.diagnostic(path, message.into());
        self.warnings.push(d);
    }

    /// Deserializes the node at `path` into `T`, recording serde's error (with the nested path
    /// and position serde_norway reports) on failure.
    fn extract<T: DeserializeOwned>(&mut self, path: &YamlPath) -> Option<T> {
        let mut slot = None;
        let de = serde_yaml::Deserializer::from_str(self.text);
        let walked = Walk { path: &path.0, term: Extract(&mut slot) }.deserialize(de);
        match walked {
            Ok(()) if slot.is_some() => slot,
            Ok(()) => {
                self.error(path, "entry not found when re-reading the file");
                None
            }
            Err(e) => {
                let d = self.serde_diagnostic(path, &e);
                self.errors.push(d);
                None
            }
        }
    }

    fn serde_diagnostic(&self, entry: &YamlPath, err: &serde_yaml::Error) -> Diagnostic {
        let mut message = err.to_string();
        let location = err.location();
        if let Some(l) = &location {
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            if let Some(pos) = message.rfind(&suffix) {
                message.replace_range(pos..pos + suffix.len(), "");
            }
        }
        let entry_text = entry.to_string();
        // serde_norway prefixes the message with the path of the failing node.
        let (path_text, message) = match message.split_once(": ") {
            Some((p, rest)) if p.starts_with(&entry_text) && !p.contains(' ') => (p.to_owned(), rest.to_owned()),
            _ => (entry_text, message),
        };
        let location = match location {
            Some(l) => format!("{}:{}:{} {path_text}", self.source, l.line(), l.column()),
            None => format!("{} {path_text}", self.source),
        };
        Diagnostic { location, message }
    }

    /// Splits the document into entries and deserializes each one separately.
    fn structure(&mut self, root: &Value) -> Parsed {
        let mut parsed = Parsed::default();
        let top = YamlPath::default();
        let Value::Mapping(map) = root else {
            self.error(&top, "expected a mapping with `topics`, `stages` and `templates`");
            return parsed;
        };
        for (key, value) in map {
            let Value::String(key) = key else {
                self.error(&top, format!("keys must be strings, found {key:?}"));
                continue;
            };
            let path = top.key(key);
            match key.as_str() {
                "topic_prefix" => {
                    if let Some(prefix) = self.extract::<Option<String>>(&path) {
                        parsed.topic_prefix = prefix.unwrap_or_default();
                    }
                }
                "topics" => self.structure_topics(&path, value, &mut parsed),
                "stages" => self.structure_stages(&path, value, &mut parsed),
                "templates" => self.structure_templates(&path, value, &mut parsed),
                "categories" => self.structure_categories(&path, value, &mut parsed),
                other => self.error(&path, format!("unknown key `{other}`; expected one of {}", ROOT_KEYS.join(", "))),
            }
        }
        for required in ["topics", "stages"] {
            if !map.contains_key(required) {
                self.error(&top, format!("missing `{required}`"));
            }
        }
        parsed
    }

    fn structure_topics(&mut self, path: &YamlPath, value: &Value, parsed: &mut Parsed) {
        let Value::Mapping(topics) = value else {
            self.error(path, "`topics` must be a mapping from topic name to its settings");
            return;
        };
        for (name, _) in topics {
            let Value::String(name) = name else {
                self.error(path, format!("topic names must be strings, found {name:?}"));
                continue;
            };
            parsed.declared.insert(name.clone());
            if let Some(spec) = self.extract::<TopicSpec>(&path.key(name)) {
                parsed.topics.insert(name.clone(), spec);
            }
        }
    }

    fn structure_categories(&mut self, path: &YamlPath, value: &Value, parsed: &mut Parsed) {
        let categories = match value {
            Value::Mapping(m) => m,
            Value::Null => return,
            _ => {
                self.error(path, "`categories` must be a mapping from category name to its settings");
                return;
            }
        };
        for (name, _) in categories {
            let Value::String(name) = name else {
                self.error(path, format!("category names must be strings, found {name:?}"));
                continue;
            };
            // Kept even when its settings are wrong, so templates naming it are not reported too.
            let spec = self.extract::<Option<CategorySpec>>(&path.key(name)).flatten().unwrap_or_default();
            parsed.categories.insert(name.clone(), spec);
        }
    }

    fn structure_stages(&mut self, path: &YamlPath, value: &Value, parsed: &mut Parsed) {
        let Value::Mapping(stages) = value else {
            self.error(path, "`stages` must be a mapping with `templating` and `persistence`");
            return;
        };
        for (name, _) in stages {
            match name {
                Value::String(n) if n == "templating" => {
                    parsed.templating = self.extract(&path.key(n));
                }
                Value::String(n) if n == "persistence" => {
                    parsed.persistence = self.extract(&path.key(n));
                }
                Value::String(n) if n == "claims" => {
                    parsed.claims = self.extract(&path.key(n));
                }
                Value::String(n) if n == "scheduler" => {
                    parsed.scheduler = self.extract(&path.key(n));
                }
                other => self.error(
                    path,
                    format!(
                        "unknown stage {other:?}; the stages are `templating`, `persistence`, `claims` and `scheduler`"
                    ),
                ),
            }
        }
        for required in ["templating", "persistence"] {
            if !stages.contains_key(required) {
                self.error(path, format!("missing stage `{required}`"));
            }
        }
    }

    fn structure_templates(&mut self, path: &YamlPath, value: &Value, parsed: &mut Parsed) {
        let entries = match value {
            Value::Sequence(s) => s.len(),
            Value::Null => 0,
            _ => {
                self.error(path, "`templates` must be a list");
                return;
            }
        };
        for i in 0..entries {
            if let Some(t) = self.extract::<TemplateSpec>(&path.index(i)) {
                parsed.templates.push((i, t));
            }
        }
    }

    /// Reads and parses every topic's `.avsc`.
    fn load_schemas(&mut self, parsed: &Parsed, base_dir: &Path) -> BTreeMap<String, LoadedSchema> {
        let mut out = BTreeMap::new();
        for (name, spec) in &parsed.topics {
            let Some(rel) = &spec.schema else { continue };
            let path = YamlPath::default().key("topics").key(name).key("schema");
            let file = base_dir.join(rel);
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => {
                    self.error(&path, format!("cannot read schema file {}: {e}", file.display()));
                    continue;
                }
            };
            match Schema::parse_str(&text) {
                Ok(parsed) => {
                    out.insert(name.clone(), LoadedSchema { text, parsed });
                }
                Err(e) => self.error(&path, format!("{} is not a valid Avro schema: {e}", file.display())),
            }
        }
        out
    }

    fn semantics(&mut self, parsed: &Parsed, schemas: &BTreeMap<String, LoadedSchema>) {
        let views: BTreeMap<&str, SchemaView<'_>> =
            schemas.iter().map(|(name, s)| (name.as_str(), SchemaView::new(&s.parsed))).collect();
        let top = YamlPath::default();
        if !parsed.topic_prefix.chars().all(valid_topic_char) {
            self.error(&top.key("topic_prefix"), "may only contain ASCII letters, digits, `.`, `_` and `-`");
        }
        for (name, spec) in &parsed.topics {
            self.check_topic(parsed, name, spec, views.get(name.as_str()));
        }
        for name in parsed.categories.keys() {
            // Names travel in URLs, JSON and metric labels.
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                self.error(
                    &top.key("categories").key(name),
                    "category names may only contain ASCII letters, digits, `_` and `-`",
                );
            }
        }
        if let Some(stage) = &parsed.templating {
            self.check_templating(parsed, stage, &views);
        }
        if let Some(stage) = &parsed.persistence {
            self.check_persistence(parsed, stage);
        }
        if let Some(stage) = &parsed.claims {
            self.check_claims(parsed, stage);
        }
        if let Some(stage) = &parsed.scheduler {
            self.check_scheduler(parsed, stage);
        }
        let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
        for (i, t) in &parsed.templates {
            let path = top.key("templates").index(*i);
            if let Some(first) = seen.insert((t.topic.as_str(), t.event.as_str()), *i) {
                self.error(
                    &path,
                    format!(
                        "second template for event `{}` on topic `{}` (the first is templates[{first}])",
                        t.event, t.topic
                    ),
                );
            }
            self.check_template(parsed, &path, t, &views);
        }
        // Events the templating stage will see but cannot render.
        if let Some(stage) = &parsed.templating {
            for (i, input) in stage.inputs.iter().enumerate() {
                // A campaign carries its own templates (see the templating stage's campaigns).
                if input == CAMPAIGNS_TOPIC {
                    continue;
                }
                let Some(Ok(branches)) = views.get(input.as_str()).map(SchemaView::branches) else {
                    continue;
                };
                for (event, _) in branches {
                    if !parsed.templates.iter().any(|(_, t)| t.topic == *input && t.event == event) {
                        self.warn(
                            &top.key("stages").key("templating").key("inputs").index(i),
                            format!(
                                "event `{event}` on topic `{input}` has no template; the templating stage skips it"
                            ),
                        );
                    }
                }
            }
        }
    }

    fn check_topic(&mut self, parsed: &Parsed, name: &str, spec: &TopicSpec, view: Option<&SchemaView<'_>>) {
        let path = YamlPath::default().key("topics").key(name);
        let full_len = parsed.topic_prefix.len() + name.len();
        if name.is_empty() || !name.chars().all(valid_topic_char) || name == "." || name == ".." {
            self.error(&path, "topic names may only contain ASCII letters, digits, `.`, `_` and `-`");
        } else if full_len > MAX_TOPIC_NAME {
            self.error(
                &path,
                format!("with its prefix the topic name is {full_len} characters; Kafka allows {MAX_TOPIC_NAME}"),
            );
        }
        if spec.partitions < 1 {
            self.error(&path.key("partitions"), format!("partitions must be at least 1, got {}", spec.partitions));
        }
        if spec.replication_factor < 1 {
            self.error(
                &path.key("replication_factor"),
                format!("replication_factor must be at least 1, got {}", spec.replication_factor),
            );
        }
        if let Some(ms) = spec.retention_ms {
            if ms < -1 {
                self.error(
                    &path.key("retention_ms"),
                    format!("retention_ms must be -1 (forever) or positive, got {ms}"),
                );
            }
        }
        for key in ["cleanup.policy", "retention.ms"] {
            if spec.configs.contains_key(key) {
                self.error(
                    &path.key("configs").key(key),
                    format!("set `{key}` with the topic's own `{}` field", key.replace('.', "_")),
                );
            }
        }
        if let (Some(key), Some(view)) = (&spec.key, view) {
            match view.field_of(view.root, key) {
                Some(s) if view.is_string(s) => {}
                Some(_) => self.error(&path.key("key"), format!("envelope field `{key}` is not a string")),
                None => self.error(
                    &path.key("key"),
                    format!(
                        "the schema has no top-level field `{key}` (it has: {})",
                        view.field_names(view.root).join(", ")
                    ),
                ),
            }
        }
    }

    /// Checks a stage's reference to a topic: declared, and (optionally) with a schema.
    fn check_topic_ref(&mut self, parsed: &Parsed, path: &YamlPath, topic: &str, needs_schema: Option<&str>) -> bool {
        if !parsed.declared.contains(topic) {
            self.error(
                path,
                format!(
                    "topic `{topic}` is not declared under `topics` (declared: {})",
                    parsed.declared.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            );
            return false;
        }
        if let (Some(why), Some(spec)) = (needs_schema, parsed.topics.get(topic)) {
            if spec.schema.is_none() {
                self.error(path, format!("topic `{topic}` has no schema; {why}"));
                return false;
            }
        }
        true
    }

    fn check_templating(&mut self, parsed: &Parsed, stage: &TemplatingStage, views: &BTreeMap<&str, SchemaView<'_>>) {
        let path = YamlPath::default().key("stages").key("templating");
        self.check_inputs(parsed, &path, &stage.inputs, "the templating stage decodes its inputs with it");
        for (i, input) in stage.inputs.iter().enumerate() {
            if let Some(Err(why)) = views.get(input.as_str()).map(SchemaView::branches) {
                self.error(&path.key("inputs").index(i), format!("topic `{input}`: {why}"));
            }
        }
        let output = path.key("output");
        if self.check_topic_ref(
            parsed,
            &output,
            &stage.output,
            Some("the templating stage encodes notifications with it"),
        ) && stage.inputs.contains(&stage.output)
        {
            self.error(&output, "the output topic is also an input; notifications would loop");
        }
        let dlq = path.key("dead_letter");
        if self.check_topic_ref(parsed, &dlq, &stage.dead_letter, None)
            && (stage.inputs.contains(&stage.dead_letter) || stage.dead_letter == stage.output)
        {
            self.error(&dlq, "the dead-letter topic must not be an input or the output");
        }
        if stage.group.is_empty() {
            self.error(&path.key("group"), "the consumer group must not be empty");
        }
        if stage.max_in_flight == 0 {
            self.error(&path.key("max_in_flight"), "max_in_flight must be at least 1");
        }
    }

    fn check_persistence(&mut self, parsed: &Parsed, stage: &PersistenceStage) {
        let path = YamlPath::default().key("stages").key("persistence");
        self.check_inputs(parsed, &path, &stage.inputs, "the persistence stage decodes its inputs with it");
        let dlq = path.key("dead_letter");
        if self.check_topic_ref(parsed, &dlq, &stage.dead_letter, None) && stage.inputs.contains(&stage.dead_letter) {
            self.error(&dlq, "the dead-letter topic must not be an input");
        }
        if stage.group.is_empty() {
            self.error(&path.key("group"), "the consumer group must not be empty");
        }
        if parsed.templating.as_ref().is_some_and(|t| t.group == stage.group) {
            self.error(
                &path.key("group"),
                "both stages use the same consumer group; they would take partitions from each other",
            );
        }
        if stage.batch_size == 0 {
            self.error(&path.key("batch_size"), "batch_size must be at least 1");
        }
    }

    /// Only when the file has `stages.claims`: a topology without the claim stage's topics still
    /// loads, and `tidings up --stages claims` refuses it then.
    fn check_claims(&mut self, parsed: &Parsed, stage: &ClaimsStage) {
        let path = YamlPath::default().key("stages").key("claims");
        for (topic, why) in [
            (CLAIMS_INPUT, "the claim stage decodes its input with it"),
            (CLAIMS_OUTPUT, "the claim stage encodes its decisions with it"),
        ] {
            self.check_topic_ref(parsed, &path, topic, Some(why));
        }
        let dlq = path.key("dead_letter");
        if self.check_topic_ref(parsed, &dlq, &stage.dead_letter, None)
            && [CLAIMS_INPUT, CLAIMS_OUTPUT].contains(&stage.dead_letter.as_str())
        {
            self.error(&dlq, "the dead-letter topic must not be the claim stage's input or output");
        }
        let group = path.key("group");
        if stage.group.is_empty() {
            self.error(&group, "the consumer group must not be empty");
        }
        let others = [parsed.templating.as_ref().map(|t| &t.group), parsed.persistence.as_ref().map(|p| &p.group)];
        if others.into_iter().flatten().any(|g| *g == stage.group) {
            self.error(
                &group,
                "another stage uses the same consumer group; they would take partitions from each other",
            );
        }
        if stage.batch_size == 0 {
            self.error(&path.key("batch_size"), "batch_size must be at least 1");
        }
        if stage.max_coupons == 0 {
            self.error(&path.key("max_coupons"), "max_coupons must be at least 1");
        }
    }

    /// Only when the file has `stages.scheduler`: a topology without its topics still loads (no
    /// notification is then held), and `tidings up --stages scheduler` refuses it.
    fn check_scheduler(&mut self, parsed: &Parsed, stage: &SchedulerStage) {
        let path = YamlPath::default().key("stages").key("scheduler");
        self.check_topic_ref(parsed, &path.key("input"), &stage.input, None);
        let dlq = path.key("dead_letter");
        if self.check_topic_ref(parsed, &dlq, &stage.dead_letter, None) && stage.dead_letter == stage.input {
            self.error(&dlq, "the dead-letter topic must not be the scheduler's input");
        }
        let group = path.key("group");
        if stage.group.is_empty() {
            self.error(&group, "the consumer group must not be empty");
        }
        let others = [
            parsed.templating.as_ref().map(|t| &t.group),
            parsed.persistence.as_ref().map(|p| &p.group),
            parsed.claims.as_ref().map(|c| &c.group),
        ];
        if others.into_iter().flatten().any(|g| *g == stage.group) {
            self.error(
                &group,
                "another stage uses the same consumer group; they would take partitions from each other",
            );
        }
        if stage.tick_ms == 0 {
            self.error(&path.key("tick_ms"), "tick_ms must be at least 1");
        }
        if stage.batch_size == 0 {
            self.error(&path.key("batch_size"), "batch_size must be at least 1");
        }
    }

    fn check_inputs(&mut self, parsed: &Parsed, stage: &YamlPath, inputs: &[String], why: &str) {
        let path = stage.key("inputs");
        if inputs.is_empty() {
            self.error(&path, "a stage needs at least one input topic");
        }
        for (i, input) in inputs.iter().enumerate() {
            if inputs[..i].contains(input) {
                self.error(&path.index(i), format!("topic `{input}` is listed twice"));
                continue;
            }
            self.check_topic_ref(parsed, &path.index(i), input, Some(why));
        }
    }

    fn check_template(
        &mut self,
        parsed: &Parsed,
        path: &YamlPath,
        t: &TemplateSpec,
        views: &BTreeMap<&str, SchemaView<'_>>,
    ) {
        // Syntax is checked even when the topic or event is wrong.
        let mut texts: Vec<(YamlPath, &str)> = vec![(path.key("title"), &t.title), (path.key("body"), &t.body)];
        if let Some(link) = &t.link {
            texts.push((path.key("link"), link));
        }
        for (lang, text) in &t.locales {
            let base = path.key("locales").key(lang);
            texts.push((base.key("title"), &text.title));
            texts.push((base.key("body"), &text.body));
        }
        let env = minijinja::Environment::new();
        let mut variables: Vec<(YamlPath, String)> = Vec::new();
        for (text_path, text) in &texts {
            match env.template_from_str(text) {
                Ok(tmpl) => {
                    let mut vars: Vec<String> = tmpl.undeclared_variables(true).into_iter().collect();
                    vars.sort();
                    variables.extend(vars.into_iter().map(|v| (text_path.clone(), v)));
                }
                Err(e) => {
                    let what = match e.detail() {
                        Some(d) => format!("{}: {d}", e.kind()),
                        None => e.kind().to_string(),
                    };
                    let line = e.line().map(|l| format!(" (line {l} of the template)")).unwrap_or_default();
                    self.error(text_path, format!("template does not compile: {what}{line}"));
                }
            }
        }
        if t.kind.trim().is_empty() {
            self.error(&path.key("kind"), "kind must not be empty");
        }
        self.check_category(parsed, path, t);

        let topic_path = path.key("topic");
        if !parsed.declared.contains(&t.topic) {
            self.error(&topic_path, format!("topic `{}` is not declared under `topics`", t.topic));
            return;
        }
        if let Some(stage) = &parsed.templating {
            if !stage.inputs.contains(&t.topic) {
                self.error(
                    &topic_path,
                    format!(
                        "topic `{}` is not an input of stages.templating, so this template would never be used",
                        t.topic
                    ),
                );
            }
        }
        let Some(view) = views.get(t.topic.as_str()) else {
            if parsed.topics.get(&t.topic).is_some_and(|s| s.schema.is_none()) {
                self.error(&topic_path, format!("topic `{}` has no schema, so it has no event types", t.topic));
            }
            return;
        };
        let Ok(branches) = view.branches() else {
            // Reported at the stage input, or the topic is not an input (reported above).
            return;
        };
        let Some(branch) = branches.iter().find(|(name, _)| *name == t.event).map(|(_, s)| *s) else {
            self.error(
                &path.key("event"),
                format!(
                    "`{}` is not an event of topic `{}`; its payload branches are: {}",
                    t.event,
                    t.topic,
                    branches.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ),
            );
            return;
        };

        if !t.locales.is_empty() && view.field_of(view.root, "locale").is_none() {
            self.error(
                &path.key("locales"),
                format!("topic `{}` has no top-level `locale` field, so a translation can never be chosen", t.topic),
            );
        }

        for (text_path, var) in variables {
            if let Err(why) = view.check_variable(branch, &var) {
                self.error(&text_path, format!("unknown variable `{var}`: {why}"));
            }
        }

        let rpath = path.key("recipients");
        let (key, want): (&str, &str) = match &t.recipients {
            Recipients::User(_) => ("user", "a string (one user id)"),
            Recipients::Users(_) => ("users", "an array of strings (user ids)"),
            Recipients::Audience(_) => ("audience", "an InlineAudience | SegmentAudience union"),
            Recipients::Room { .. } => ("room", "a string (a room id)"),
        };
        let main = t.recipients.path();
        match view.walk(branch, main) {
            Err(why) => self.error(&rpath.key(key), format!("path `{main}`: {why}")),
            Ok(s) => {
                let ok = match &t.recipients {
                    Recipients::User(_) | Recipients::Room { .. } => view.is_string(s),
                    Recipients::Users(_) => view.is_string_array(s),
                    Recipients::Audience(_) => view.is_audience(s),
                };
                if !ok {
                    self.error(&rpath.key(key), format!("path `{main}` is not {want}"));
                }
            }
        }
        if let Recipients::Room { exclude: Some(exclude), .. } = &t.recipients {
            match view.walk(branch, exclude) {
                Err(why) => self.error(&rpath.key("exclude"), format!("path `{exclude}`: {why}")),
                Ok(s) if !view.is_string(s) => {
                    self.error(&rpath.key("exclude"), format!("path `{exclude}` is not a string (a user id)"))
                }
                Ok(_) => {}
            }
        }
    }
}

impl Checker<'_> {
    /// An explicit category must be declared under `categories`; so must a template's default
    /// (its topic's name) once the file declares categories at all.
    fn check_category(&mut self, parsed: &Parsed, path: &YamlPath, t: &TemplateSpec) {
        let declared = || parsed.categories.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
        if !t.category.is_empty() {
            if !parsed.categories.contains_key(&t.category) {
                let known = if parsed.categories.is_empty() { "none".to_owned() } else { declared() };
                self.error(
                    &path.key("category"),
                    format!("unknown category `{}`; the categories declared are: {known}", t.category),
                );
            }
        } else if !parsed.categories.is_empty() && !parsed.categories.contains_key(&t.topic) {
            self.error(
                path,
                format!(
                    "no `category`, and its default (the topic name `{}`) is not declared under `categories` ({})",
                    t.topic,
                    declared()
                ),
            );
        }
    }
}

fn valid_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// An Avro schema with its named types indexed, for walking field paths.
struct SchemaView<'a> {
    root: &'a Schema,
    names: HashMap<&'a str, &'a Schema>,
}

impl<'a> SchemaView<'a> {
    fn new(root: &'a Schema) -> Self {
        let mut names = HashMap::new();
        collect_names(root, &mut names);
        SchemaView { root, names }
    }

    fn resolve(&self, s: &'a Schema) -> &'a Schema {
        match s {
            Schema::Ref { name } => self.names.get(name.name()).copied().unwrap_or(s),
            _ => s,
        }
    }

    /// `["null", T]` is read as `T`: the JSON value is either null or a `T`.
    fn non_null(&self, s: &'a Schema) -> &'a Schema {
        let s = self.resolve(s);
        if let Schema::Union(u) = s {
            let mut rest = u.variants().iter().filter(|v| !matches!(v, Schema::Null));
            if let (Some(only), None) = (rest.next(), rest.next()) {
                return self.resolve(only);
            }
        }
        s
    }

    fn field_of(&self, s: &'a Schema, field: &str) -> Option<&'a Schema> {
        match self.non_null(s) {
            Schema::Record(r) => r.lookup.get(field).and_then(|&i| r.fields.get(i)).map(|f| &f.schema),
            // A field of any record branch may be present at run time.
            Schema::Union(u) => u.variants().iter().find_map(|v| self.field_of(v, field)),
            _ => None,
        }
    }

    fn field_names(&self, s: &'a Schema) -> Vec<&'a str> {
        match self.non_null(s) {
            Schema::Record(r) => r.fields.iter().map(|f| f.name.as_str()).collect(),
            Schema::Union(u) => {
                let mut all: Vec<&str> = u.variants().iter().flat_map(|v| self.field_names(v)).collect();
                all.dedup();
                all
            }
            _ => Vec::new(),
        }
    }

    /// The `payload` union's record branches, by short name.
    fn branches(&self) -> Result<Vec<(&'a str, &'a Schema)>, String> {
        let Schema::Record(_) = self.resolve(self.root) else {
            return Err("the schema is not a record".to_owned());
        };
        let payload = self
            .field_of(self.root, "payload")
            .ok_or_else(|| "the schema has no `payload` field (a union with one record per event type)".to_owned())?;
        let Schema::Union(u) = self.resolve(payload) else {
            return Err("`payload` must be a union with one record per event type".to_owned());
        };
        u.variants()
            .iter()
            .map(|v| match self.resolve(v) {
                s @ Schema::Record(r) => Ok((r.name.name(), s)),
                other => Err(format!("`payload` branch {other:?} is not a record")),
            })
            .collect()
    }

    /// Follows a dot-separated path; `payload` first means the template's event branch.
    fn walk(&self, branch: &'a Schema, path: &str) -> Result<&'a Schema, String> {
        let mut current = self.root;
        let mut walked = String::new();
        for (i, seg) in path.split('.').enumerate() {
            if seg.is_empty() {
                return Err("empty segment in path".to_owned());
            }
            if i == 0 && seg == "payload" {
                current = branch;
            } else {
                current = match self.field_of(current, seg) {
                    Some(s) => s,
                    None => {
                        let owner = if walked.is_empty() { "the event" } else { walked.as_str() };
                        let fields = self.field_names(current);
                        let hint = if fields.is_empty() {
                            " (it is not a record)".to_owned()
                        } else {
                            format!(" (it has: {})", fields.join(", "))
                        };
                        return Err(format!("{owner} has no field `{seg}`{hint}"));
                    }
                };
            }
            if !walked.is_empty() {
                walked.push('.');
            }
            walked.push_str(seg);
        }
        Ok(current)
    }

    fn check_variable(&self, branch: &'a Schema, var: &str) -> Result<(), String> {
        let root = var.split('.').next().unwrap_or(var);
        if EXTRA_CONTEXT.contains(&root) || JINJA_GLOBALS.contains(&root) {
            return Ok(());
        }
        self.walk(branch, var).map(|_| ())
    }

    fn is_string(&self, s: &'a Schema) -> bool {
        matches!(self.non_null(s), Schema::String | Schema::Uuid(_))
    }

    fn is_string_array(&self, s: &'a Schema) -> bool {
        matches!(self.non_null(s), Schema::Array(a) if self.is_string(&a.items))
    }

    fn is_audience(&self, s: &'a Schema) -> bool {
        let Schema::Union(u) = self.resolve(s) else {
            return false;
        };
        let mut records = 0;
        for v in u.variants() {
            match self.resolve(v) {
                Schema::Null => {}
                Schema::Record(r) if matches!(r.name.name(), "InlineAudience" | "SegmentAudience") => records += 1,
                _ => return false,
            }
        }
        records > 0
    }
}

fn collect_names<'a>(s: &'a Schema, out: &mut HashMap<&'a str, &'a Schema>) {
    match s {
        Schema::Record(r) => {
            out.insert(r.name.name(), s);
            for f in &r.fields {
                collect_names(&f.schema, out);
            }
        }
        Schema::Enum(e) => {
            out.insert(e.name.name(), s);
        }
        Schema::Fixed(f) => {
            out.insert(f.name.name(), s);
        }
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_names(v, out)),
        Schema::Array(a) => collect_names(&a.items, out),
        Schema::Map(m) => collect_names(&m.types, out),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    const VALID: &str = r#"
topic_prefix: "t1."
topics:
  orders: { partitions: 3, replication_factor: 1, key: order_id, schema: schemas/order_event.avsc }
  notifications:
    partitions: 4
    replication_factor: 1
    key: user_id
    schema: schemas/notification.avsc
    configs: { min.insync.replicas: 1, compression.type: lz4 }
  dlq: { partitions: 1, replication_factor: 1, cleanup_policy: compact, retention_ms: -1 }
stages:
  templating:
    inputs: [orders]
    output: notifications
    dead_letter: dlq
  persistence:
    inputs: [notifications]
    dead_letter: dlq
    batch_size: 10
templates:
  - topic: orders
    event: OrderPlaced
    kind: order.placed
    recipients: { user: buyer_id }
    title: "Order {{ order_id }} placed"
    body: '{{ "%.2f"|format(payload.amount_cents / 100) }} {{ payload.currency }} for {{ recipient }}'
    link: "/orders/{{ order_id }}"
    locales:
      ko: { title: "주문 {{ order_id }}", body: "{{ payload.currency }}" }
"#;

    #[test]
    fn valid_file_loads_with_defaults() {
        let t = Topology::from_str(VALID, &workspace()).unwrap();
        assert_eq!(t.topic_name("orders"), "t1.orders");
        assert_eq!(t.group_name(&t.stages.templating.group), "t1.tidings-templating");
        assert_eq!(t.logical_topic("t1.orders"), Some("orders"));
        assert_eq!(t.logical_topic("orders"), None);
        assert_eq!(t.topics["orders"].partitions, 3);
        assert_eq!(t.topics["orders"].cleanup_policy, super::super::CleanupPolicy::Delete);
        assert_eq!(t.stages.templating.max_in_flight, 20_000);
        assert_eq!(t.stages.persistence.batch_size, 10);
        assert_eq!(t.stages.persistence.linger_ms, 250);
        assert_eq!(t.stages.persistence.group, "tidings-persistence");
        // No `stages.claims`: the claim stage's defaults.
        assert_eq!(t.stages.claims, super::super::ClaimsStage::default());
        assert_eq!(
            (t.stages.claims.batch_size, t.stages.claims.linger_ms, t.stages.claims.decide_linger_ms),
            (10_000, 50, 5)
        );
        assert_eq!((t.stages.claims.max_coupons, t.stages.claims.rejection_cache), (10_000, 100_000));
        assert_eq!(
            (t.stages.claims.group.as_str(), t.stages.claims.dead_letter.as_str()),
            ("tidings-claims", "tidings.dlq.claims")
        );
        assert_eq!(
            t.topics["dlq"].kafka_configs(),
            vec![("cleanup.policy".to_owned(), "compact".to_owned()), ("retention.ms".to_owned(), "-1".to_owned())]
        );
        assert_eq!(t.topics["notifications"].configs["min.insync.replicas"], "1");
        assert!(t.schema_text("orders").unwrap().contains("OrderPlaced"));
        assert!(t.schema("orders").is_some());
        assert!(t.schema_text("dlq").is_none());
        let tpl = t.template("orders", "OrderPlaced").unwrap();
        assert_eq!(tpl.recipients, Recipients::User("buyer_id".to_owned()));
        assert_eq!(tpl.texts(Some("ko-KR")).0, "주문 {{ order_id }}");
        assert_eq!(tpl.texts(Some("fr")).0, "Order {{ order_id }} placed");
        assert_eq!(tpl.texts(None).0, "Order {{ order_id }} placed");
        // The other four order events have no template.
        assert_eq!(t.warnings.len(), 4, "{:?}", t.warnings);
        assert!(t.warnings[0].location.starts_with("topology.yaml:14:"), "{:?}", t.warnings[0]);
        let t = t.with_prefix("run42-");
        assert_eq!(t.topic_name("dlq"), "run42-dlq");
    }

    #[test]
    fn syntax_error_is_reported_alone_with_position() {
        let err = Topology::from_str("topics:\n  orders: { partitions: 1\nstages: [", &workspace()).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(err.0[0].location.starts_with("topology.yaml:"), "{err}");
        assert!(err.0[0].message.starts_with("YAML syntax error"), "{err}");
        let (_, pos) = err.0[0].location.split_once(':').unwrap();
        assert!(pos.split(':').all(|n| n.parse::<usize>().is_ok()), "{err}");
    }

    /// Each mistake is on its own line, so every diagnostic must carry that line.
    const BROKEN: &str = r#"topics:
  orders: { partitions: 3, replication_factor: 1, schema: schemas/order_event.avsc }
  coupons: { partitions: 0, replication_factor: 1, schema: schemas/coupon_event.avsc }
  chat: { partitons: 3, replication_factor: 1, schema: schemas/chat_event.avsc }
  notifications: { partitions: 1, replication_factor: 1, schema: schemas/notification.avsc }
  dlq: { partitions: 1, replication_factor: 1 }
  extra: { partitions: 1, replication_factor: 1, schema: schemas/nope.avsc }
stages:
  templating:
    inputs: [orders, coupons, ordes]
    output: notifications
    dead_letter: dlq
  persistence:
    inputs: [notifications]
    dead_letter: dlq
templates:
  - topic: orders
    event: OrderPlaced
    kind: order.placed
    recipients: { user: buyer_id }
    title: "Order {{ order_id "
    body: "ok"
  - topic: orders
    event: OrderShiped
    kind: order.shipped
    recipients: { user: buyer_id }
    title: "t"
    body: "b"
  - topic: coupons
    event: CouponIssued
    kind: coupon.issued
    recipients:
      user: payload.usr_id
    title: "t"
    body: "{{ payload.code }} {{ payload.discount }}"
  - topic: orders
    event: OrderPaid
    kind: order.paid
    recipients: { user: buyer_id, users: buyer_id }
    title: "t"
    body: "b"
"#;

    #[test]
    fn every_mistake_is_reported_with_its_location() {
        let err = Topology::from_str(BROKEN, &workspace()).unwrap_err();
        let text = err.to_string();
        let expect = [
            ("topology.yaml:3:", "topics.coupons.partitions", "at least 1"),
            ("topology.yaml:4:", "topics.chat", "unknown field `partitons`"),
            ("topology.yaml:7:", "topics.extra.schema", "cannot read schema file"),
            ("topology.yaml:10:", "stages.templating.inputs[2]", "`ordes` is not declared"),
            ("topology.yaml:21:", "templates[0].title", "does not compile"),
            ("topology.yaml:24:", "templates[1].event", "`OrderShiped` is not an event"),
            ("topology.yaml:33:", "templates[2].recipients.user", "has no field `usr_id`"),
            ("topology.yaml:35:", "templates[2].body", "unknown variable `payload.discount`"),
            ("topology.yaml:39:", "templates[3].recipients", "exactly one of"),
        ];
        for (line, path, msg) in expect {
            assert!(
                err.0
                    .iter()
                    .any(|d| d.location.starts_with(line) && d.location.ends_with(path) && d.message.contains(msg)),
                "missing `{line} {path}: {msg}` in:\n{text}"
            );
        }
        assert_eq!(err.0.len(), expect.len(), "unexpected extra errors:\n{text}");
        assert_eq!(text.lines().count(), expect.len());
        let lines: Vec<usize> = err.0.iter().map(|d| d.location.split(':').nth(1).unwrap().parse().unwrap()).collect();
        assert!(lines.windows(2).all(|w| w[0] <= w[1]), "not in file order:\n{text}");
    }

    #[test]
    fn stage_and_reference_mistakes() {
        let yaml = r#"
topic_prefix: "bad prefix"
topics:
  orders: { partitions: 1, replication_factor: 1, key: order_no, schema: schemas/order_event.avsc }
  chat: { partitions: 1, replication_factor: 1, schema: schemas/chat_event.avsc }
  notifications: { partitions: 1, replication_factor: 1, configs: { retention.ms: 5 } }
  dlq: { partitions: 1, replication_factor: 1 }
stages:
  templating: { inputs: [orders, chat], output: notifications, dead_letter: orders, group: g }
  persistence: { inputs: [notifications], dead_letter: dlq, group: g }
  extra: {}
templates:
  - topic: chat
    event: MessageSent
    kind: chat.message
    recipients: { room: room_id, exclude: payload.sender }
    title: "t"
    body: "b"
    locales: { ko: { title: "t", body: "b" } }
  - topic: dlq
    event: X
    kind: ""
    recipients: { audience: payload.x }
    title: "t"
    body: "b"
"#;
        let err = Topology::from_str(yaml, &workspace()).unwrap_err();
        let text = err.to_string();
        for needle in [
            "topic_prefix: may only contain",
            "topics.orders.key: the schema has no top-level field `order_no`",
            "topics.notifications.configs.retention.ms: set `retention.ms`",
            "stages: unknown stage",
            "stages.templating.output: topic `notifications` has no schema",
            "stages.templating.dead_letter: the dead-letter topic must not be",
            "stages.persistence.inputs[0]: topic `notifications` has no schema",
            "stages.persistence.group: both stages use the same consumer group",
            "templates[0].recipients.exclude: path `payload.sender`",
            "templates[0].locales: topic `chat` has no top-level `locale`",
            "templates[1].kind: kind must not be empty",
            "templates[1].topic: topic `dlq` is not an input",
            "templates[1].topic: topic `dlq` has no schema",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
    }

    /// A file without `categories` still loads, each template in its topic's category; declared
    /// categories are loaded and an unknown one is reported with the other mistakes.
    #[test]
    fn categories_default_to_the_topic_and_unknown_ones_are_refused() {
        let t = Topology::from_str(VALID, &workspace()).unwrap();
        assert!(t.categories.is_empty());
        assert_eq!(t.templates[0].category, "orders", "the topic's name by default");
        assert!(!t.is_critical("orders"));

        let declared = VALID.replace(
            "templates:\n",
            "categories:\n  orders: { description: Orders }\n  payment: { critical: true }\ntemplates:\n",
        );
        let t = Topology::from_str(&declared, &workspace()).unwrap();
        assert_eq!(t.categories["orders"].description, "Orders");
        assert!(t.is_critical("payment") && !t.is_critical("orders") && !t.is_critical("nothing"));
        let explicit = declared.replace("    kind: order.placed\n", "    kind: order.placed\n    category: payment\n");
        assert_eq!(Topology::from_str(&explicit, &workspace()).unwrap().templates[0].category, "payment");

        // An unknown category, reported together with another mistake.
        let wrong = declared
            .replace("    kind: order.placed\n", "    kind: order.placed\n    category: marketing\n")
            .replace("batch_size: 10", "batch_size: lots");
        let err = Topology::from_str(&wrong, &workspace()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(
                "templates[0].category: unknown category `marketing`; the categories declared are: orders, payment"
            ),
            "{text}"
        );
        assert!(text.contains("stages.persistence.batch_size"), "{text}");
        assert_eq!(err.0.len(), 2, "{text}");
        // Once categories are declared, a template's default must be one of them too.
        let undeclared = VALID.replace("templates:\n", "categories:\n  payment: { critical: true }\ntemplates:\n");
        let text = Topology::from_str(&undeclared, &workspace()).unwrap_err().to_string();
        assert!(text.contains("its default (the topic name `orders`) is not declared"), "{text}");
        // A bad name and an unknown key of a category.
        let bad = VALID.replace(
            "templates:\n",
            "categories:\n  orders: {}\n  \"a b\": { critical: true, colour: red }\ntemplates:\n",
        );
        let err = Topology::from_str(&bad, &workspace()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("categories.a b: unknown field `colour`"), "{text}");
        assert!(text.contains("categories.a b: category names may only contain"), "{text}");
        assert_eq!(err.0.len(), 2, "{text}");
    }

    const CLAIMS_TOPICS: &str = r#"
topics:
  coupons: { partitions: 1, replication_factor: 1, schema: schemas/coupon_event.avsc }
  coupon-claims: { partitions: 1, replication_factor: 1, schema: schemas/coupon_claim.avsc }
  notifications: { partitions: 1, replication_factor: 1, schema: schemas/notification.avsc }
  dlq: { partitions: 1, replication_factor: 1 }
"#;

    /// `stages.claims` with `claims`, after a templating stage with a mistake of its own.
    fn with_claims(claims: &str) -> Result<Topology, super::super::TopologyErrors> {
        let yaml = format!(
            "{CLAIMS_TOPICS}stages:\n  templating: {{ inputs: [coupons], output: notification, dead_letter: dlq }}\n  \
             persistence: {{ inputs: [notifications], dead_letter: dlq }}\n  claims: {claims}\n"
        );
        Topology::from_str(&yaml, &workspace())
    }

    /// A bad key or value in `stages.claims` is reported with the file's other mistakes.
    #[test]
    fn claims_stage_mistakes_are_reported_with_the_others() {
        let templating = "stages.templating.output: topic `notification` is not declared";
        let cases: [(&str, &[&str]); 3] = [
            ("{ batch_sise: 5 }", &["stages.claims: unknown field `batch_sise`, expected one of `dead_letter`"]),
            ("{ linger_ms: soon }", &["stages.claims.linger_ms: invalid type: string \"soon\", expected u64"]),
            (
                "{ dead_letter: coupons, group: tidings-persistence, batch_size: 0, max_coupons: 0, rejection_cache: 0 }",
                &[
                    "stages.claims.dead_letter: the dead-letter topic must not be the claim stage's input or output",
                    "stages.claims.group: another stage uses the same consumer group",
                    "stages.claims.batch_size: batch_size must be at least 1",
                    "stages.claims.max_coupons: max_coupons must be at least 1",
                ],
            ),
        ];
        for (claims, needles) in cases {
            let err = with_claims(claims).unwrap_err();
            let text = err.to_string();
            for needle in needles.iter().chain([&templating]) {
                assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
            }
            assert_eq!(err.0.len(), needles.len() + 1, "{text}");
        }
        // The claim stage's topics must be declared when its section is there.
        let yaml = VALID.replace("    batch_size: 10\n", "    batch_size: 10\n  claims: { dead_letter: nowhere }\n");
        let text = Topology::from_str(&yaml, &workspace()).unwrap_err().to_string();
        for needle in
            ["stages.claims: topic `coupon-claims` is not declared", "stages.claims: topic `coupons` is not declared"]
        {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
        assert!(text.contains("stages.claims.dead_letter: topic `nowhere` is not declared"), "{text}");
    }

    #[test]
    fn claims_stage_settings_load() {
        let yaml = CLAIMS_TOPICS.to_owned()
            + "  claims-dlq: { partitions: 1, replication_factor: 1 }\nstages:\n  \
               templating: { inputs: [coupons], output: notifications, dead_letter: dlq }\n  \
               persistence: { inputs: [notifications], dead_letter: dlq }\n  \
               claims: { dead_letter: claims-dlq, group: g, batch_size: 7, linger_ms: 9, decide_linger_ms: 0, \
               max_coupons: 3, rejection_cache: 0 }\n";
        let t = Topology::from_str(&yaml, &workspace()).unwrap_or_else(|e| panic!("{e}"));
        let expected = super::super::ClaimsStage {
            dead_letter: "claims-dlq".into(),
            group: "g".into(),
            batch_size: 7,
            linger_ms: 9,
            decide_linger_ms: 0,
            max_coupons: 3,
            rejection_cache: 0,
        };
        assert_eq!(t.stages.claims, expected);
    }

    #[test]
    fn duplicate_templates_and_recipient_types() {
        let yaml = r#"
topics:
  coupons: { partitions: 1, replication_factor: 1, schema: schemas/coupon_event.avsc }
  notifications: { partitions: 1, replication_factor: 1, schema: schemas/notification.avsc }
  dlq: { partitions: 1, replication_factor: 1 }
stages:
  templating: { inputs: [coupons], output: notifications, dead_letter: dlq }
  persistence: { inputs: [notifications], dead_letter: dlq }
templates:
  - { topic: coupons, event: CampaignLaunched, kind: k, recipients: { audience: payload.audience }, title: t, body: b }
  - { topic: coupons, event: CampaignLaunched, kind: k, recipients: { users: payload.title }, title: t, body: b }
  - { topic: coupons, event: CouponIssued, kind: k, recipients: { user: payload.discount_percent }, title: t, body: b }
  - { topic: coupons, event: CouponExpiring, kind: k, recipients: { audience: payload.user_id }, title: t, body: b }
"#;
        let err = Topology::from_str(yaml, &workspace()).unwrap_err();
        let text = err.to_string();
        for needle in [
            "topology.yaml:11:5 templates[1]: second template for event `CampaignLaunched`",
            "templates[1].recipients.users: path `payload.title` is not an array of strings",
            "templates[2].recipients.user: path `payload.discount_percent` is not a string",
            "templates[3].recipients.audience: path `payload.user_id` is not an InlineAudience",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
        }
        assert_eq!(err.0.len(), 4, "{text}");
    }

    #[test]
    fn project_topology_passes() {
        let t = Topology::load(&workspace().join("topology.yaml")).unwrap_or_else(|e| panic!("{e}"));
        for event in ["OrderPlaced", "OrderPaid", "OrderShipped", "OrderDelivered", "OrderCancelled"] {
            let tpl = t.template("orders", event).unwrap();
            assert!(tpl.locales.contains_key("ko"), "{event} has no Korean text");
            assert_eq!(tpl.recipients, Recipients::User("buyer_id".to_owned()));
        }
        assert_eq!(
            t.template("coupons", "CampaignLaunched").unwrap().recipients,
            Recipients::Audience("payload.audience".to_owned())
        );
        let chat = t.template("chat", "MessageSent").unwrap();
        assert_eq!(chat.kind, "chat.message");
        assert_eq!(chat.recipients, Recipients::Room { room: "room_id".to_owned(), exclude: None });
        assert!(!chat.inbox, "chat copies are delivery-only");
        // Every event type has a template.
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn project_templates_render() {
        let t = Topology::load(&workspace().join("topology.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let env = minijinja::Environment::new();
        let placed = t.template("orders", "OrderPlaced").unwrap();
        let ctx = serde_json::json!({
            "event_id": "e1", "order_id": "o-7", "buyer_id": "u1", "locale": "ko",
            "event_type": "OrderPlaced", "recipient": "u1",
            "payload": { "amount_cents": 123_450, "currency": "KRW",
                         "items": [{"sku": "a", "name": "A", "quantity": 1, "unit_price_cents": 1}] }
        });
        let render = |s: &str| env.render_str(s, &ctx).unwrap();
        let (title, body) = placed.texts(Some("ko"));
        assert!(render(title).contains("o-7"));
        assert!(render(body).contains("1234.50"), "{}", render(body));
        assert!(render(placed.texts(None).1).contains("1234.50 KRW"), "{}", render(placed.texts(None).1));
        let delivered = t.template("orders", "OrderDelivered").unwrap();
        let ctx_none = serde_json::json!({"order_id": "o-7", "payload": {"delivered_to": null}});
        let ctx_some = serde_json::json!({"order_id": "o-7", "payload": {"delivered_to": "front door"}});
        let no_place = env.render_str(&delivered.body, &ctx_none).unwrap();
        assert!(!no_place.contains("None") && !no_place.contains("none"), "{no_place}");
        assert!(env.render_str(&delivered.body, &ctx_some).unwrap().contains("front door"));
    }
}
