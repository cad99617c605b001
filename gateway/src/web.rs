//! The web page the gateway serves at `/`: three static files compiled into the binary (nothing is
//! read from disk or fetched from elsewhere at run time), `GET /config.json` telling the page which
//! notification kinds to listen for and whether dev sign-in exists, and, in dev mode only,
//! `POST /v1/dev/token`, which signs a token for any user with the public dev secret.
//!
//! All of it is public on purpose: the files hold no data, and the page gets everything else from
//! the API with the user's token.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const APP_CSS: &str = include_str!("../web/app.css");

/// The page loads only its own files and talks only to its own origin: no inline script or style,
/// no frames, no plugins. With `--redirect-allow` origins, [`csp`] adds them to `connect-src` so
/// the page's stream may follow a 307 to the gateway owning its user.
pub const CSP: &str =
    "default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// [`CSP`], with `connect-src 'self'` plus `gateways` (origins such as `https://gw-2.example.com`
/// or `https://*.example.com`, as `RedirectAllow` validated them) when there are any.
pub fn csp(gateways: &[String]) -> String {
    if gateways.is_empty() {
        return CSP.to_string();
    }
    let (first, rest) = CSP.split_once("; ").expect("CSP has several directives");
    format!("{first}; connect-src 'self' {}; {rest}", gateways.join(" "))
}

/// How long a dev sign-in token is valid.
pub const DEV_TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);

/// What the page needs to know about this gateway.
#[derive(Debug, Clone, Default)]
pub struct WebConfig {
    /// Notification kinds (from the topology's templates): EventSource delivers only named events
    /// it listens for, and has no wildcard.
    pub kinds: Vec<String>,
    /// Dev mode: `POST /v1/dev/token` signs tokens with the public dev secret.
    pub dev_sign_in: Option<DevSignIn>,
    /// Other gateways' origins a stream may be redirected to (`--redirect-allow`), for `connect-src`.
    pub gateways: Vec<String>,
}

/// Claims the gateway requires that a dev token must carry.
#[derive(Debug, Clone, Default)]
pub struct DevSignIn {
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// `/`, `/index.html`, `/app.js`, `/app.css`, `/config.json`, and in dev mode `POST /v1/dev/token`.
pub fn router(config: WebConfig) -> Router {
    let config = Arc::new(config);
    let policy = HeaderValue::from_str(&csp(&config.gateways)).unwrap_or(HeaderValue::from_static(CSP));
    let file = |ty: &'static str, body: &'static str| {
        let policy = policy.clone();
        get(move || async move { asset(ty, body, policy) })
    };
    let mut router = Router::new()
        .route("/", file("text/html; charset=utf-8", INDEX_HTML))
        .route("/index.html", file("text/html; charset=utf-8", INDEX_HTML))
        .route("/app.js", file("text/javascript; charset=utf-8", APP_JS))
        .route("/app.css", file("text/css; charset=utf-8", APP_CSS))
        .route("/config.json", get(page_config))
        // No icon: an empty answer rather than a 404 in every browser console.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }));
    if config.dev_sign_in.is_some() {
        router = router.route("/v1/dev/token", post(dev_token));
    }
    router.with_state(config)
}

fn headers(content_type: &'static str, policy: HeaderValue) -> [(HeaderName, HeaderValue); 5] {
    [
        (CONTENT_TYPE, HeaderValue::from_static(content_type)),
        // Revalidate every time: a new binary's page must never run against a cached old script.
        (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (HeaderName::from_static("content-security-policy"), policy),
        (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
    ]
}

fn asset(content_type: &'static str, body: &'static str, policy: HeaderValue) -> Response {
    (headers(content_type, policy), body).into_response()
}

async fn page_config(State(config): State<Arc<WebConfig>>) -> Response {
    let body = json!({ "kinds": config.kinds, "dev_sign_in": config.dev_sign_in.is_some() });
    (headers("application/json", HeaderValue::from_static(CSP)), body.to_string()).into_response()
}

#[derive(Deserialize)]
struct DevTokenRequest {
    user_id: String,
}

/// A user id a dev token may be for: what a demo needs, nothing a header or a log line chokes on.
pub fn valid_user_id(user: &str) -> bool {
    (1..=64).contains(&user.len())
        && user.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

async fn dev_token(
    State(config): State<Arc<WebConfig>>,
    body: Result<Json<DevTokenRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Some(dev) = &config.dev_sign_in else {
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "dev sign-in is off"));
    };
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", e.body_text()))?;
    if !valid_user_id(&req.user_id) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_user_id",
            "user_id must be 1 to 64 characters of letters, digits and - _ . @",
        ));
    }
    let token = crate::auth::mint_hs256(
        crate::auth::DEV_SECRET.as_bytes(),
        &req.user_id,
        DEV_TOKEN_TTL,
        dev.issuer.as_deref(),
        dev.audience.as_deref(),
    )
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    Ok(([(CACHE_CONTROL, HeaderValue::from_static("no-store"))], Json(json!({ "token": token }))).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        for ok in ["alice", "u0001", "a.b-c_d@e", &"x".repeat(64)] {
            assert!(valid_user_id(ok), "{ok:?}");
        }
        for bad in ["", "a b", "a\nb", "ä", "a/b", &"x".repeat(65)] {
            assert!(!valid_user_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_page_loads_only_its_own_files() {
        // Nothing from elsewhere, no inline script or style (the CSP would block them anyway).
        for text in [INDEX_HTML, APP_JS, APP_CSS] {
            assert!(!text.contains("http://") && !text.contains("https://"), "an absolute URL in a web file");
        }
        assert!(!INDEX_HTML.contains("style="), "inline style in index.html");
        assert!(!INDEX_HTML.contains("<script>"), "inline script in index.html");
        assert!(!APP_JS.contains("innerHTML"), "app.js must not build markup from strings");
    }
}
