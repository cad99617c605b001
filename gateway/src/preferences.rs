//! The authenticated user's notification preferences: `GET`/`PUT /v1/me/preferences`. A user opts
//! out of categories (never a critical one) and sets a time zone, quiet hours and a locale; every
//! problem of a refused body is named in one 422 answer, and nothing is stored unless it is all valid.

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::Arc;
use tidings_store::preferences::{Preferences, QuietHours};
use tidings_store::Store;

use crate::auth::{AuthConfig, AuthUser};
use crate::error::ApiError;

/// Largest `PUT` body: the preferences of a topology with every category opted out fit many
/// times over; a larger body is refused with 413 before it is read.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// One notification category as topology.yaml declares it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Category {
    pub name: String,
    /// Cannot be opted out of.
    pub critical: bool,
    pub description: String,
}

/// Shared state of the preferences endpoints.
#[derive(Clone)]
pub struct PreferencesState {
    pub store: Store,
    pub auth: Arc<AuthConfig>,
    /// The categories a user may see, in the order shown.
    pub categories: Arc<Vec<Category>>,
}

impl FromRef<PreferencesState> for Arc<AuthConfig> {
    fn from_ref(s: &PreferencesState) -> Self {
        s.auth.clone()
    }
}

pub fn router(state: PreferencesState) -> Router {
    Router::new()
        .route("/v1/me/preferences", get(read).put(replace))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The body of `PUT /v1/me/preferences` (the answer of `GET` adds `categories`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    opt_out: Vec<String>,
    #[serde(default = "utc")]
    time_zone: String,
    #[serde(default)]
    quiet_hours: Option<QuietHoursJson>,
    /// The language tag campaign texts are picked by; absent or null: each campaign's default.
    #[serde(default)]
    locale: Option<String>,
}

/// Longest language tag accepted (BCP 47 allows long private-use tags; 35 covers real ones).
pub const MAX_LOCALE_CHARS: usize = 35;

/// Whether `tag` looks like a BCP 47 language tag: a 2 to 8 letter language, then subtags of 1 to
/// 8 letters or digits joined by `-` (`en`, `ko`, `pt-BR`, `zh-Hant-TW`).
pub fn valid_locale(tag: &str) -> bool {
    let mut parts = tag.split('-');
    let lang_ok =
        parts.next().is_some_and(|l| (2..=8).contains(&l.len()) && l.bytes().all(|b| b.is_ascii_alphabetic()));
    lang_ok
        && tag.len() <= MAX_LOCALE_CHARS
        && parts.all(|p| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

fn utc() -> String {
    "UTC".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuietHoursJson {
    start: String,
    end: String,
}

/// One problem of a refused body: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

/// 422 naming every problem: `{"error": {"code", "message", "problems": [{"path", "message"}]}}`.
struct Invalid(Vec<Problem>);

impl IntoResponse for Invalid {
    fn into_response(self) -> Response {
        let message = self.0.iter().map(|p| format!("{}: {}", p.path, p.message)).collect::<Vec<_>>().join("; ");
        let body = json!({"error": {"code": "invalid_preferences", "message": message, "problems": self.0}});
        (StatusCode::UNPROCESSABLE_ENTITY, Json(body)).into_response()
    }
}

/// `HH:MM` (00:00–23:59) as minutes after midnight.
pub fn parse_hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let two_digits = |x: &str| x.len() == 2 && x.bytes().all(|b| b.is_ascii_digit());
    if !two_digits(h) || !two_digits(m) {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn hhmm(minutes: u16) -> String {
    format!("{:02}:{:02}", minutes / 60, minutes % 60)
}

/// Checks a body against the categories; on success the preferences and locale to store (opt-outs
/// sorted and de-duplicated), else every problem found.
fn validate(body: Body, categories: &[Category]) -> Result<(Preferences, Option<String>), Vec<Problem>> {
    let mut problems = Vec::new();
    if let Some(tag) = body.locale.as_deref().filter(|t| !valid_locale(t)) {
        problems.push(Problem {
            path: "locale".into(),
            message: format!("{tag:?} is not a language tag such as en, ko or pt-BR"),
        });
    }
    let mut opt_out = Vec::new();
    for (i, name) in body.opt_out.into_iter().enumerate() {
        let path = format!("opt_out[{i}]");
        match categories.iter().find(|c| c.name == name) {
            None => {
                let known = categories.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
                problems
                    .push(Problem { path, message: format!("unknown category {name:?}; the categories are: {known}") });
            }
            Some(c) if c.critical => problems
                .push(Problem { path, message: format!("category {name:?} is critical and cannot be turned off") }),
            Some(_) => opt_out.push(name),
        }
    }
    opt_out.sort();
    opt_out.dedup();
    if body.time_zone.parse::<chrono_tz::Tz>().is_err() {
        problems.push(Problem {
            path: "time_zone".into(),
            message: format!(
                "{:?} is not an IANA time zone name (e.g. Asia/Seoul, Europe/Berlin, UTC)",
                body.time_zone
            ),
        });
    }
    let mut quiet_hours = None;
    if let Some(q) = body.quiet_hours {
        let start = parse_hhmm(&q.start);
        let end = parse_hhmm(&q.end);
        for (field, text, parsed) in [("start", &q.start, start), ("end", &q.end, end)] {
            if parsed.is_none() {
                problems.push(Problem {
                    path: format!("quiet_hours.{field}"),
                    message: format!("{text:?} is not a time of day as HH:MM (00:00 to 23:59)"),
                });
            }
        }
        match (start, end) {
            (Some(s), Some(e)) if s == e => problems.push(Problem {
                path: "quiet_hours".into(),
                message: "start and end are the same time; send null for no quiet hours".into(),
            }),
            (Some(start_minute), Some(end_minute)) => quiet_hours = Some(QuietHours { start_minute, end_minute }),
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok((Preferences { opt_out, time_zone: body.time_zone, quiet_hours }, body.locale))
    } else {
        Err(problems)
    }
}

fn answer(prefs: &Preferences, locale: Option<&str>, categories: &[Category]) -> Value {
    json!({
        "locale": locale,
        "opt_out": prefs.opt_out,
        "time_zone": prefs.time_zone,
        "quiet_hours": prefs.quiet_hours.map(|q| json!({"start": hhmm(q.start_minute), "end": hhmm(q.end_minute)})),
        "categories": categories,
    })
}

async fn read(State(state): State<PreferencesState>, AuthUser(user): AuthUser) -> Result<Json<Value>, ApiError> {
    let prefs = state.store.preferences(&user).await?.unwrap_or_default();
    let locale = state.store.preference_locale(&user).await?;
    Ok(Json(answer(&prefs, locale.as_deref(), &state.categories)))
}

async fn replace(
    State(state): State<PreferencesState>,
    AuthUser(user): AuthUser,
    body: Result<Json<Body>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "invalid_json" };
        // axum's own statuses: 400 not JSON, 415 not `application/json`, 413 too large, 422 wrong
        // types or unknown fields.
        ApiError::new(status, code, e.body_text())
    })?;
    let (prefs, locale) = match validate(body, &state.categories) {
        Ok(p) => p,
        Err(problems) => return Ok(Invalid(problems).into_response()),
    };
    let now = chrono::Utc::now().timestamp_micros();
    state.store.set_preferences_and_locale(&user, &prefs, locale.as_deref(), now).await?;
    Ok(Json(answer(&prefs, locale.as_deref(), &state.categories)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hhmm_parses_times_of_day_only() {
        assert_eq!(parse_hhmm("00:00"), Some(0));
        assert_eq!(parse_hhmm("22:30"), Some(22 * 60 + 30));
        assert_eq!(parse_hhmm("23:59"), Some(23 * 60 + 59));
        for bad in ["24:00", "7:00", "07:60", "0700", "07:0", "+7:00", "", "ab:cd", "07:00:00"] {
            assert_eq!(parse_hhmm(bad), None, "{bad:?}");
        }
        assert_eq!(hhmm(8 * 60 + 5), "08:05");
    }

    #[test]
    fn locales_are_language_tags() {
        for good in ["en", "ko", "pt-BR", "zh-Hant-TW", "es-419", "gsw"] {
            assert!(valid_locale(good), "{good:?}");
        }
        for bad in ["", "e", "en_US", "en-", "-en", "1a", "en-toolongsubtag", "ko kr", &"a".repeat(9), "en-\u{e9}"] {
            assert!(!valid_locale(bad), "{bad:?}");
        }
        assert!(!valid_locale(&format!("en{}", "-abcdefgh".repeat(4))), "longer than {MAX_LOCALE_CHARS}");
    }
}
