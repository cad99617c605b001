//! Service credentials: what upstream services present to produce events over HTTP ingest.
//! Static bearer tokens, configured by the operator; a browser user's JWT never passes.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::AuthConfig;
use crate::error::ApiError;

/// The service token `tidings up --dev` accepts (and writes to its endpoints file for `demo`).
/// Public on purpose: outside dev mode it is refused like any other unknown token.
pub const DEV_SERVICE_TOKEN: &str = "tidings-dev-service-token";

/// Shortest service token accepted from configuration: guessable tokens are refused at startup.
pub const MIN_TOKEN_LEN: usize = 16;

/// The accepted service tokens, kept only as SHA-256 digests.
#[derive(Clone, Default)]
pub struct ServiceTokens {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceTokens({} configured)", self.digests.len())
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl ServiceTokens {
    /// Tokens from configuration; every one shorter than [`MIN_TOKEN_LEN`] is reported.
    pub fn new<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let tokens: Vec<&str> = tokens.into_iter().map(str::trim).filter(|t| !t.is_empty()).collect();
        let short = tokens.iter().filter(|t| t.len() < MIN_TOKEN_LEN).count();
        if short > 0 {
            return Err(format!("{short} ingest token(s) shorter than {MIN_TOKEN_LEN} characters"));
        }
        Ok(ServiceTokens { digests: tokens.into_iter().map(digest).collect() })
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Whether `token` is one of them. Digests of equal length are compared in constant time, so
    /// neither a token's content nor its length shows in the timing.
    pub fn accepts(&self, token: &str) -> bool {
        let d = digest(token);
        self.digests.iter().fold(0u8, |hit, known| hit | known.ct_eq(&d).unwrap_u8()) == 1
    }

    /// Checks the request's `Authorization: Bearer`: 401 without a known service token, 403 for a
    /// valid user token (`users`), which may read its own notifications but never produce.
    pub fn check(&self, headers: &HeaderMap, users: Option<&AuthConfig>) -> Result<(), ApiError> {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let Some(token) = bearer else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing_credential",
                "this endpoint is for services: Authorization: Bearer <service token>",
            ));
        };
        if self.accepts(token) {
            return Ok(());
        }
        if users.is_some_and(|u| u.verify(token).is_ok()) {
            return Err(ApiError::new(StatusCode::FORBIDDEN, "user_token", "a user token cannot act as a service"));
        }
        Err(ApiError::new(StatusCode::UNAUTHORIZED, "invalid_credential", "the service token is not known"))
    }
}

/// What a services-only router checks before it reads a body: the service tokens, and the user
/// tokens it tells apart (403 instead of 401).
#[derive(Clone)]
pub struct ServiceGuard {
    pub tokens: ServiceTokens,
    pub users: Option<Arc<AuthConfig>>,
}

/// Middleware (`route_layer(from_fn_with_state(guard, require_service))`) passing only requests
/// with a service token, before their body is read.
pub async fn require_service(State(guard): State<ServiceGuard>, req: Request, next: Next) -> Response {
    match guard.tokens.check(req.headers(), guard.users.as_deref()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        h
    }

    #[test]
    fn only_configured_tokens_pass_and_user_tokens_are_forbidden() {
        let tokens = ServiceTokens::new(["svc-orders-0123456789", "svc-coupons-0123456789"]).unwrap();
        assert!(tokens.check(&bearer("svc-coupons-0123456789"), None).is_ok());
        use axum::response::IntoResponse;
        let status = |r: Result<(), ApiError>| r.unwrap_err().into_response().status();
        assert_eq!(status(tokens.check(&HeaderMap::new(), None)), StatusCode::UNAUTHORIZED);
        assert_eq!(status(tokens.check(&bearer("svc-orders-012345678"), None)), StatusCode::UNAUTHORIZED);
        let users = AuthConfig {
            keys: vec![crate::auth::Key::hs256(crate::auth::DEV_SECRET.as_bytes())],
            ..Default::default()
        };
        let user_token = crate::auth::mint_hs256(
            crate::auth::DEV_SECRET.as_bytes(),
            "u1",
            std::time::Duration::from_secs(60),
            None,
            None,
        )
        .unwrap();
        assert_eq!(status(tokens.check(&bearer(&user_token), Some(&users))), StatusCode::FORBIDDEN);
        assert!(ServiceTokens::default().is_empty() && !ServiceTokens::default().accepts(""));
    }

    #[test]
    fn short_tokens_are_refused() {
        assert!(ServiceTokens::new(["short"]).is_err());
    }
}
