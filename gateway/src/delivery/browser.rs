//! What a browser's plain `EventSource` needs from the gateway: the stream cookie, a short-lived
//! stream-only credential (`POST`/`DELETE /v1/session`), and CORS on `GET /v1/stream` for allowed
//! origins, since after a 307 to the owner the page's origin (one gateway) differs from the stream's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, CACHE_CONTROL, ORIGIN, SET_COOKIE, VARY,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{AppendHeaders, IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::auth::{bearer_of, AuthError, TokenRejection, COOKIE_NAME, LEGACY_COOKIE_NAME};
use crate::delivery::owners::RedirectAllow;
use crate::delivery::StreamState;
use crate::error::ApiError;

/// Default lifetime of a stream credential (the cookie), when the user token lives longer.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// The only path the stream cookie is sent to.
const COOKIE_PATH: &str = "/v1/stream";

/// Browser-facing settings of the stream.
#[derive(Debug, Clone)]
pub struct BrowserAccess {
    /// Origins whose pages may read the stream with credentials, besides those of the redirect
    /// allow-list (`--cors-allow-origin`; same syntax as `--redirect-allow`). Empty: only those.
    pub cors_allow: RedirectAllow,
    /// Mark the session cookie `Secure` (the gateway is served over https).
    pub cookie_secure: bool,
    /// `Domain` of the session cookie (`gw.example.com`), so every gateway under that parent gets
    /// it; without it the cookie goes back only to the host that set it (any port of it).
    pub cookie_domain: Option<String>,
    /// Longest life of a stream credential; it never outlives the user token it was made from.
    pub session_ttl: Duration,
}

impl Default for BrowserAccess {
    fn default() -> Self {
        BrowserAccess {
            cors_allow: RedirectAllow::default(),
            cookie_secure: false,
            cookie_domain: None,
            session_ttl: DEFAULT_SESSION_TTL,
        }
    }
}

impl BrowserAccess {
    /// Checks a cookie domain: a host name, nothing that could end the attribute.
    pub fn check_domain(domain: &str) -> Result<(), String> {
        let ok = !domain.is_empty()
            && domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !domain.starts_with('.')
            && !domain.ends_with('.');
        if ok {
            Ok(())
        } else {
            Err(format!("{domain:?} is not a host name (like gw.example.com)"))
        }
    }
}

/// The request's `Origin`, when it may read the stream: an origin of the redirect allow-list
/// (pages are served by peer gateways too; empty list: this host, any port) or of `cors_allow`.
pub fn allowed_origin(state: &StreamState, headers: &HeaderMap) -> Option<HeaderValue> {
    let value = headers.get(ORIGIN)?;
    let origin = value.to_str().ok()?;
    // Exactly an origin (no path, no userinfo): what browsers send; anything else is not echoed.
    let url = url::Url::parse(origin).ok()?;
    if url.origin().ascii_serialization() != origin {
        return None;
    }
    (state.owners.may_redirect_to(origin) || state.browser.cors_allow.matches(origin)).then(|| value.clone())
}

/// The CORS headers of a stream answer to an allowed `origin`.
pub fn cors_headers(origin: HeaderValue) -> [(HeaderName, HeaderValue); 2] {
    [(ACCESS_CONTROL_ALLOW_ORIGIN, origin), (ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"))]
}

/// Middleware of the stream route (axum's answers: 401, 307, transient answers, preflights):
/// CORS headers for allowed origins, and `Vary: Origin` always, since the answer depends on it.
pub async fn cors(State(state): State<StreamState>, req: Request, next: Next) -> Response {
    let origin = allowed_origin(&state, req.headers());
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    if let Some(origin) = origin {
        h.extend(cors_headers(origin));
    }
    h.append(VARY, HeaderValue::from_static("origin"));
    r
}

/// `OPTIONS /v1/stream`: the preflight a cross-origin reconnect with `Last-Event-ID` needs (not a
/// CORS-safelisted header). Public on purpose: it reveals nothing; [`cors`] adds the origin.
pub async fn preflight() -> Response {
    (
        StatusCode::NO_CONTENT,
        [
            (ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET")),
            (ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("last-event-id, authorization, cache-control")),
            (ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600")),
        ],
    )
        .into_response()
}

/// `POST /v1/session` (a user token in `Authorization: Bearer`, nothing else) and
/// `DELETE /v1/session` (anyone: it only tells the browser to drop its own cookie).
pub fn session_router(state: StreamState) -> Router {
    Router::new().route("/v1/session", post(open_session).delete(close_session)).with_state(state)
}

/// `name=value` with the cookie's attributes, for `path`.
fn cookie(name: &str, value: &str, path: &str, max_age: u64, browser: &BrowserAccess) -> String {
    // HttpOnly: page scripts never read it. SameSite=Strict: other sites' pages never send it.
    let mut cookie = format!("{name}={value}; HttpOnly; SameSite=Strict; Path={path}; Max-Age={max_age}");
    if let Some(domain) = &browser.cookie_domain {
        cookie.push_str("; Domain=");
        cookie.push_str(domain);
    }
    if browser.cookie_secure {
        cookie.push_str("; Secure");
    }
    cookie
}

/// 204 setting the stream cookie to `value` (empty and 0: dropping it), and dropping the cookie of
/// earlier versions, which held the user token itself on all of `/v1`.
fn session_cookie(value: &str, max_age: u64, browser: &BrowserAccess) -> Response {
    // Path=/v1/stream: the browser sends it nowhere else, and only the stream accepts it (see auth).
    let stream = cookie(COOKIE_NAME, value, COOKIE_PATH, max_age, browser);
    let legacy = cookie(LEGACY_COOKIE_NAME, "", "/v1", 0, browser);
    match (HeaderValue::from_str(&stream), HeaderValue::from_str(&legacy)) {
        (Ok(stream), Ok(legacy)) => (
            StatusCode::NO_CONTENT,
            [(CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            AppendHeaders([(SET_COOKIE, stream), (SET_COOKIE, legacy)]),
        )
            .into_response(),
        // A signed JWT is base64url and dots; the domain was checked at startup.
        _ => TokenRejection::Invalid("not a token a cookie can hold".into()).into_response(),
    }
}

/// Sets the stream cookie to a new stream credential for the bearer token's user, valid for
/// `session_ttl` or until the token expires, whichever comes first. It opens streams and nothing
/// else, on every gateway with the same keys (see `crate::auth::Key`).
async fn open_session(State(state): State<StreamState>, parts: Parts) -> Response {
    let Some(token) = bearer_of(&parts) else { return TokenRejection::Missing.into_response() };
    let verified = match state.auth.verify_claims(&token) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let exp = verified.exp.min(now.saturating_add(state.browser.session_ttl.as_secs()));
    match state.auth.mint_stream(&verified.user, exp) {
        Ok(credential) => session_cookie(&credential, exp.saturating_sub(now), &state.browser),
        Err(e @ AuthError::NoStreamKey) => {
            ApiError::new(StatusCode::NOT_IMPLEMENTED, "stream_sessions_unavailable", e.to_string()).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "Minting a stream credential failed.");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "could not open a session").into_response()
        }
    }
}

async fn close_session(State(state): State<StreamState>) -> Response {
    session_cookie("", 0, &state.browser)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_cookies(r: &Response) -> Vec<&str> {
        r.headers().get_all(SET_COOKIE).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn cookie_attributes() {
        let plain = BrowserAccess::default();
        let r = session_cookie("t.o.k", 60, &plain);
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            set_cookies(&r),
            [
                "tidings_stream=t.o.k; HttpOnly; SameSite=Strict; Path=/v1/stream; Max-Age=60",
                "tidings_session=; HttpOnly; SameSite=Strict; Path=/v1; Max-Age=0"
            ]
        );
        let shared =
            BrowserAccess { cookie_secure: true, cookie_domain: Some("gw.example.com".into()), ..Default::default() };
        for c in set_cookies(&session_cookie("", 0, &shared)) {
            assert!(c.ends_with("Max-Age=0; Domain=gw.example.com; Secure"), "{c}");
        }
        assert_eq!(session_cookie("a\nb", 1, &plain).status(), StatusCode::UNAUTHORIZED);
        assert!(BrowserAccess::check_domain("gw.example.com").is_ok());
        for bad in ["", ".example.com", "a.com; Secure", "a b", "x."] {
            assert!(BrowserAccess::check_domain(bad).is_err(), "{bad:?}");
        }
    }
}
