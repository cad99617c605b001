//! What a browser's plain `EventSource` needs from the gateway: the stream's session cookie
//! (`POST`/`DELETE /v1/session`), and CORS on `GET /v1/stream` for allowed origins, since after a
//! 307 to the owner the page's origin (one gateway) differs from the stream's (another).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, CACHE_CONTROL, ORIGIN, SET_COOKIE, VARY,
};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::auth::{bearer_of, TokenRejection, COOKIE_NAME};
use crate::delivery::owners::RedirectAllow;
use crate::delivery::StreamState;

/// Browser-facing settings of the stream.
#[derive(Debug, Clone, Default)]
pub struct BrowserAccess {
    /// Origins whose pages may read the stream with credentials, besides those of the redirect
    /// allow-list (`--cors-allow-origin`; same syntax as `--redirect-allow`). Empty: only those.
    pub cors_allow: RedirectAllow,
    /// Mark the session cookie `Secure` (the gateway is served over https).
    pub cookie_secure: bool,
    /// `Domain` of the session cookie (`gw.example.com`), so every gateway under that parent gets
    /// it; without it the cookie goes back only to the host that set it (any port of it).
    pub cookie_domain: Option<String>,
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

fn session_cookie(value: &str, max_age: u64, browser: &BrowserAccess) -> Response {
    // HttpOnly: page scripts never read it. SameSite=Strict: other sites' pages never send it.
    // Path=/v1: no other path of the host gets it. Only the stream accepts it (see auth).
    let mut cookie = format!("{COOKIE_NAME}={value}; HttpOnly; SameSite=Strict; Path=/v1; Max-Age={max_age}");
    if let Some(domain) = &browser.cookie_domain {
        cookie.push_str("; Domain=");
        cookie.push_str(domain);
    }
    if browser.cookie_secure {
        cookie.push_str("; Secure");
    }
    match HeaderValue::from_str(&cookie) {
        Ok(v) => (StatusCode::NO_CONTENT, [(SET_COOKIE, v), (CACHE_CONTROL, HeaderValue::from_static("no-store"))])
            .into_response(),
        // A verified JWT is base64url and dots; the domain was checked at startup.
        Err(_) => TokenRejection::Invalid("not a token a cookie can hold".into()).into_response(),
    }
}

/// Sets the stream's session cookie to the bearer token, for as long as the token is valid. The
/// cookie is the same token, so it can do no more than the token (less: it only opens streams).
async fn open_session(State(state): State<StreamState>, parts: Parts) -> Response {
    let Some(token) = bearer_of(&parts) else { return TokenRejection::Missing.into_response() };
    let verified = match state.auth.verify_claims(&token) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    session_cookie(&token, verified.exp.saturating_sub(now), &state.browser)
}

async fn close_session(State(state): State<StreamState>) -> Response {
    session_cookie("", 0, &state.browser)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_cookie(r: &Response) -> &str {
        r.headers()[SET_COOKIE].to_str().unwrap()
    }

    #[test]
    fn cookie_attributes() {
        let plain = BrowserAccess::default();
        let r = session_cookie("t.o.k", 60, &plain);
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        assert_eq!(set_cookie(&r), "tidings_session=t.o.k; HttpOnly; SameSite=Strict; Path=/v1; Max-Age=60");
        let shared =
            BrowserAccess { cookie_secure: true, cookie_domain: Some("gw.example.com".into()), ..Default::default() };
        assert!(set_cookie(&session_cookie("", 0, &shared)).ends_with("Max-Age=0; Domain=gw.example.com; Secure"));
        assert_eq!(session_cookie("a\nb", 1, &plain).status(), StatusCode::UNAUTHORIZED);
        assert!(BrowserAccess::check_domain("gw.example.com").is_ok());
        for bad in ["", ".example.com", "a.com; Secure", "a b", "x."] {
            assert!(BrowserAccess::check_domain(bad).is_err(), "{bad:?}");
        }
    }
}
