//! The checks of a launch request (the body of `POST /v1/campaigns`, or the flags of `tidings
//! campaign launch`): every problem is named at once, templates are compiled and rendered with a
//! sample recipient exactly as templating renders them (strict: an unknown variable is an error).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use tidings_store::segments;

use super::CampaignsConfig;
use crate::preferences::{valid_locale, Category, Problem};

/// Longest campaign id, in characters (all ASCII).
pub const MAX_ID_CHARS: usize = 128;
/// How far in the past a `send_at` may be and still mean "now": clocks of callers drift.
pub const SEND_AT_SKEW_MICROS: i64 = 5_000_000;
/// The recipient id templates are rendered with when they are checked.
pub const SAMPLE_RECIPIENT: &str = "sample-recipient";

/// One locale's texts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Text {
    pub title: String,
    pub body: String,
}

/// Who gets a campaign: the members of segments and inline user ids (each user once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audience {
    /// Sorted, without repeats.
    pub segments: Vec<String>,
    /// Sorted, without repeats.
    pub user_ids: Vec<String>,
}

/// A checked campaign. Serialized as stored (`campaigns.definition`): fields in a fixed order,
/// locales by name and the audience sorted, so the same request always gives the same text and a
/// retry is recognised by comparing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    pub campaign_id: String,
    pub category: String,
    pub title: String,
    pub body: String,
    pub link: Option<String>,
    pub default_locale: String,
    pub locales: BTreeMap<String, Text>,
    pub audience: Audience,
    /// RFC 3339 UTC with microseconds; `None`: now.
    pub send_at: Option<String>,
}

impl Definition {
    /// The canonical JSON stored and compared.
    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("a definition serializes")
    }

    pub fn send_at_micros(&self) -> Option<i64> {
        self.send_at.as_deref().and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok()).map(|t| t.timestamp_micros())
    }

    /// A just launched campaign's status at `now` (microseconds): scheduled while `send_at` is ahead.
    pub fn initial_status(&self, now: i64) -> &'static str {
        if self.send_at_micros().is_some_and(|t| t > now) {
            "scheduled"
        } else {
            "sending"
        }
    }

    pub fn event_id(&self) -> String {
        format!("campaign:{}", self.campaign_id)
    }
}

/// A checked launch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub definition: Definition,
    /// Whether the request was given its own id (else a new UUID: it cannot be retried).
    pub id_given: bool,
    pub dry_run: bool,
}

fn problem(path: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem { path: path.into(), message: message.into() }
}

/// Whether `id` can name a campaign: 1..=128 characters of `[A-Za-z0-9._:-]`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_CHARS
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// Compiles `template` and renders it with the sample context; the error names the problem.
pub fn check_template(template: &str, campaign_id: &str, category: &str, locale: &str) -> Result<(), String> {
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let tpl = env.template_from_str(template).map_err(|e| format!("does not compile: {e}"))?;
    let ctx = minijinja::context! {
        campaign_id => campaign_id, category => category, recipient => SAMPLE_RECIPIENT, locale => locale,
    };
    tpl.render(ctx).map(drop).map_err(|e| format!("does not render with a sample recipient: {e}"))
}

/// A required non-empty string field.
fn text(obj: &Map<String, Value>, path: &str, problems: &mut Vec<Problem>) -> String {
    match obj.get(path.rsplit('.').next().unwrap_or(path)) {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => {
            problems.push(problem(path, "must not be empty"));
            String::new()
        }
        None | Some(Value::Null) => {
            problems.push(problem(path, "is required"));
            String::new()
        }
        Some(_) => {
            problems.push(problem(path, "must be a string"));
            String::new()
        }
    }
}

/// An optional array of strings, sorted and without repeats.
fn names(v: Option<&Value>, path: &str, problems: &mut Vec<Problem>) -> Vec<String> {
    match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) => out.push(s.to_string()),
                    None => problems.push(problem(format!("{path}[{i}]"), "must be a string")),
                }
            }
            out
        }
        Some(_) => {
            problems.push(problem(path, "must be an array of strings"));
            Vec::new()
        }
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort_unstable();
    v.dedup();
    v
}

/// Checks a launch request received at `now` (microseconds) against the topology's `categories`,
/// naming every problem it finds. Segments are only checked for their names here: whether they
/// exist and have members is the store's to say (see `Campaigns::launch`).
pub fn check(body: &Value, categories: &[Category], cfg: &CampaignsConfig, now: i64) -> Result<Launch, Vec<Problem>> {
    let Some(obj) = body.as_object() else {
        return Err(vec![problem("body", "must be a JSON object")]);
    };
    let mut problems = Vec::new();
    const FIELDS: [&str; 10] = [
        "campaign_id",
        "category",
        "title",
        "body",
        "link",
        "default_locale",
        "locales",
        "audience",
        "send_at",
        "dry_run",
    ];
    for k in obj.keys().filter(|k| !FIELDS.contains(&k.as_str())) {
        problems.push(problem(k.as_str(), "is not a field of a campaign"));
    }
    let (campaign_id, id_given) = match obj.get("campaign_id") {
        None | Some(Value::Null) => (uuid::Uuid::new_v4().to_string(), false),
        Some(Value::String(id)) if valid_id(id) => (id.clone(), true),
        Some(_) => {
            problems.push(problem(
                "campaign_id",
                format!("must be 1 to {MAX_ID_CHARS} characters of A-Z, a-z, 0-9, '.', '_', ':', '-'"),
            ));
            (String::new(), true)
        }
    };
    let category = text(obj, "category", &mut problems);
    if !category.is_empty() && !categories.iter().any(|c| c.name == category) {
        let known = categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
        problems.push(problem("category", format!("unknown category {category:?}; the categories are: {known}")));
    }
    let default_locale = match obj.get("default_locale") {
        None | Some(Value::Null) => "en".to_owned(),
        Some(Value::String(l)) if valid_locale(l) => l.clone(),
        Some(other) => {
            problems.push(problem("default_locale", format!("{other} is not a language tag such as en, ko or pt-BR")));
            String::new()
        }
    };
    let mut templates: Vec<(String, String, String)> = Vec::new();
    let title = text(obj, "title", &mut problems);
    let body_text = text(obj, "body", &mut problems);
    templates.push(("title".into(), title.clone(), default_locale.clone()));
    templates.push(("body".into(), body_text.clone(), default_locale.clone()));
    let link = match obj.get("link") {
        None | Some(Value::Null) => None,
        Some(Value::String(l)) if !l.trim().is_empty() => {
            templates.push(("link".into(), l.clone(), default_locale.clone()));
            Some(l.clone())
        }
        Some(_) => {
            problems.push(problem("link", "must be a non-empty string (a template) or absent"));
            None
        }
    };
    let mut locales = BTreeMap::new();
    match obj.get("locales") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (locale, texts) in m {
                let path = format!("locales.{locale}");
                if !valid_locale(locale) {
                    problems.push(problem(&path, "is not a language tag such as en, ko or pt-BR"));
                }
                let Some(t) = texts.as_object() else {
                    problems.push(problem(&path, "must be an object {\"title\": ..., \"body\": ...}"));
                    continue;
                };
                for k in t.keys().filter(|k| !["title", "body"].contains(&k.as_str())) {
                    problems.push(problem(format!("{path}.{k}"), "is not a field of a locale's texts"));
                }
                let title = text(t, &format!("{path}.title"), &mut problems);
                let body = text(t, &format!("{path}.body"), &mut problems);
                templates.push((format!("{path}.title"), title.clone(), locale.clone()));
                templates.push((format!("{path}.body"), body.clone(), locale.clone()));
                locales.insert(locale.clone(), Text { title, body });
            }
        }
        Some(_) => problems.push(problem("locales", "must be an object of {\"<locale>\": {\"title\", \"body\"}}")),
    }
    for (path, template, locale) in &templates {
        if template.is_empty() {
            continue;
        }
        if let Err(message) = check_template(template, &campaign_id, &category, locale) {
            problems.push(problem(path.as_str(), message));
        }
    }
    let (mut segments, mut user_ids) = (Vec::new(), Vec::new());
    match obj.get("audience") {
        Some(Value::Object(a)) => {
            for k in a.keys().filter(|k| !["segments", "user_ids"].contains(&k.as_str())) {
                problems.push(problem(format!("audience.{k}"), "is not a field of an audience"));
            }
            segments = names(a.get("segments"), "audience.segments", &mut problems);
            if segments.len() > cfg.max_segments {
                problems.push(problem(
                    "audience.segments",
                    format!("{} segments, more than {}", segments.len(), cfg.max_segments),
                ));
            }
            for (i, s) in segments.iter().enumerate() {
                if let Err(e) = segments::check_name(s) {
                    problems.push(problem(format!("audience.segments[{i}]"), e.to_string()));
                }
            }
            user_ids = names(a.get("user_ids"), "audience.user_ids", &mut problems);
            if user_ids.len() > cfg.max_inline_users {
                problems.push(problem(
                    "audience.user_ids",
                    format!(
                        "{} inline user ids, more than {}: load them as a segment (tidings segment import)",
                        user_ids.len(),
                        cfg.max_inline_users
                    ),
                ));
            } else {
                for (i, id) in user_ids.iter().enumerate() {
                    if let Err(e) = segments::check_id(id, cfg.max_id_bytes) {
                        problems.push(problem(format!("audience.user_ids[{i}]"), e));
                    }
                }
            }
            if segments.is_empty() && user_ids.is_empty() {
                problems.push(problem("audience", "is empty: name segments or user_ids"));
            }
        }
        None | Some(Value::Null) => {
            problems.push(problem("audience", "is required: {\"segments\": [...], \"user_ids\": [...]}"))
        }
        Some(_) => problems.push(problem("audience", "must be an object {\"segments\": [...], \"user_ids\": [...]}")),
    }
    let send_at = match obj.get("send_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match chrono::DateTime::parse_from_rfc3339(s) {
            Ok(t) if t.timestamp_micros() < now - SEND_AT_SKEW_MICROS => {
                problems.push(problem("send_at", format!("{s} is in the past; leave it out to send now")));
                None
            }
            Ok(t) => Some(t.timestamp_micros()),
            Err(e) => {
                problems.push(problem("send_at", format!("{s:?} is not an RFC 3339 time: {e}")));
                None
            }
        },
        Some(_) => {
            problems.push(problem("send_at", "must be an RFC 3339 time (a string)"));
            None
        }
    };
    let dry_run = match obj.get("dry_run") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            problems.push(problem("dry_run", "must be true or false"));
            false
        }
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let send_at = send_at
        .and_then(chrono::DateTime::from_timestamp_micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
    let definition = Definition {
        campaign_id,
        category,
        title,
        body: body_text,
        link,
        default_locale,
        locales,
        audience: Audience { segments: sorted(segments), user_ids: sorted(user_ids) },
        send_at,
    };
    Ok(Launch { definition, id_given, dry_run })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_800_000_000_000_000;

    fn categories() -> Vec<Category> {
        ["orders", "campaigns"]
            .into_iter()
            .map(|n| Category { name: n.into(), critical: false, description: String::new() })
            .collect()
    }

    fn paths(body: Value) -> Vec<String> {
        let mut p: Vec<String> = check(&body, &categories(), &CampaignsConfig::default(), NOW)
            .unwrap_err()
            .into_iter()
            .map(|p| p.path)
            .collect();
        p.sort();
        p
    }

    #[test]
    fn a_good_request_becomes_a_canonical_definition() {
        let body = json!({"campaign_id": "spring-1", "category": "campaigns", "title": "Hi {{ recipient }}",
            "body": "Sale in {{ locale }}", "locales": {"ko": {"title": "안녕", "body": "세일"}},
            "audience": {"segments": ["vip", "all", "vip"], "user_ids": ["u2", "u1"]},
            "send_at": "2030-01-01T09:00:00+09:00"});
        let launch = check(&body, &categories(), &CampaignsConfig::default(), NOW).unwrap();
        let d = &launch.definition;
        assert!(launch.id_given && !launch.dry_run);
        assert_eq!(
            (d.audience.segments.as_slice(), d.audience.user_ids.as_slice()),
            (&["all".to_string(), "vip".into()][..], &["u1".to_string(), "u2".into()][..])
        );
        assert_eq!(d.send_at.as_deref(), Some("2030-01-01T00:00:00.000000Z"));
        assert_eq!(d.default_locale, "en");
        assert_eq!(d.event_id(), "campaign:spring-1");
        // The same campaign written differently is the same definition.
        let again = json!({"audience": {"user_ids": ["u1", "u2"], "segments": ["all", "vip"]},
            "send_at": "2030-01-01T00:00:00Z", "body": "Sale in {{ locale }}", "title": "Hi {{ recipient }}",
            "locales": {"ko": {"body": "세일", "title": "안녕"}}, "category": "campaigns", "campaign_id": "spring-1",
            "default_locale": "en", "dry_run": true});
        let other = check(&again, &categories(), &CampaignsConfig::default(), NOW).unwrap();
        assert_eq!(other.definition.canonical(), d.canonical());
        assert!(other.dry_run);
        let no_id = check(
            &json!({"category": "orders", "title": "t", "body": "b", "audience": {"user_ids": ["u"]}}),
            &categories(),
            &CampaignsConfig::default(),
            NOW,
        )
        .unwrap();
        assert!(!no_id.id_given && uuid::Uuid::parse_str(&no_id.definition.campaign_id).is_ok());
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let cfg = CampaignsConfig { max_inline_users: 2, ..CampaignsConfig::default() };
        let body = json!({"campaign_id": "no spaces", "category": "weather", "title": "{{ recipient",
            "body": "{{ nobody }}", "link": "/c/{{ campaign_id | nosuchfilter }}", "default_locale": "not a tag",
            "locales": {"k!": {"title": "t", "body": "", "x": 1}}, "audience": {"segments": ["bad name"], "user_ids": ["a", "b", "c"]},
            "send_at": "2000-01-01T00:00:00Z", "dry_run": "yes", "colour": "red"});
        let mut got: Vec<String> =
            check(&body, &categories(), &cfg, NOW).unwrap_err().into_iter().map(|p| p.path).collect();
        got.sort();
        assert_eq!(
            got,
            [
                "audience.segments[0]",
                "audience.user_ids",
                "body",
                "campaign_id",
                "category",
                "colour",
                "default_locale",
                "dry_run",
                "link",
                "locales.k!",
                "locales.k!.body",
                "locales.k!.x",
                "send_at",
                "title"
            ]
        );
        assert_eq!(paths(json!({"category": "orders", "title": "t", "body": "b", "audience": {}})), ["audience"]);
        assert_eq!(paths(json!({"category": "orders", "title": "t", "body": "b"})), ["audience"]);
        assert_eq!(paths(json!([])), ["body"]);
        // Within the skew, a send_at just past is "now".
        let skewed = chrono::DateTime::from_timestamp_micros(NOW - 4_000_000).unwrap().to_rfc3339();
        assert!(check(&json!({"category": "orders", "title": "t", "body": "b", "audience": {"user_ids": ["u"]}, "send_at": skewed}),
            &categories(), &cfg, NOW).is_ok());
        assert_eq!(
            paths(json!({"category": "orders", "title": "t", "body": "b",
            "audience": {"user_ids": ["u", ""]}})),
            ["audience.user_ids[1]"]
        );
    }

    #[test]
    fn templates_render_with_the_sample_context() {
        assert!(check_template("{{ campaign_id }} {{ category }} {{ recipient }} {{ locale }}", "c", "k", "en").is_ok());
        assert!(check_template("{{ recipient.name }}", "c", "k", "en").unwrap_err().contains("render"));
        assert!(check_template("{% if %}", "c", "k", "en").unwrap_err().contains("compile"));
    }
}
