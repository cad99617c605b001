//! JWT authentication for the user-facing endpoints: verifies HS256, RS256 or ES256 tokens against
//! the configured keys (signature, `exp`, `nbf`, `iss`/`aud`) and yields the user id from `sub`.
//! Tokens come from `Authorization: Bearer` or the `access_token` query; the stream alone (a read)
//! also takes the `tidings_session` cookie, so no endpoint that changes anything can be forged (CSRF).

use axum::extract::{FromRef, FromRequestParts, Query};
use axum::http::header::{AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::ingest::ApiError;

/// HS256 secret of the embedded dev mode; never use it where tokens matter.
pub const DEV_SECRET: &str = "tidings-dev-secret";
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// Cookie carrying the token for browsers' streams (EventSource cannot set an Authorization
/// header, and a redirect to the owner drops the query token). Set by `POST /v1/session`.
pub const COOKIE_NAME: &str = "tidings_session";
/// Query parameter carrying the token.
pub const QUERY_PARAM: &str = "access_token";

/// Problems with keys or with minting a token; all are configuration errors, so retrying the same
/// call does not help.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the public key is neither an RSA nor an EC key in PEM form (not retriable): {0}")]
    Key(String),
    #[error("could not sign the token (not retriable): {0}")]
    Sign(String),
}

/// One key tokens may be signed with: an HS256 secret, or an RS256/ES256 public key.
#[derive(Clone)]
pub struct Key {
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for Key {
    // Keeps HS256 secrets out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key").field("alg", &self.alg).finish_non_exhaustive()
    }
}

impl Key {
    /// An HS256 shared secret.
    pub fn hs256(secret: &[u8]) -> Key {
        Key { alg: Algorithm::HS256, key: DecodingKey::from_secret(secret) }
    }

    /// A public key in PEM form: RS256 for an RSA key, ES256 for an EC (P-256) key.
    pub fn from_public_pem(pem: &[u8]) -> Result<Key, AuthError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Key { alg: Algorithm::RS256, key });
        }
        DecodingKey::from_ec_pem(pem)
            .map(|key| Key { alg: Algorithm::ES256, key })
            .map_err(|e| AuthError::Key(e.to_string()))
    }

    /// The algorithm tokens for this key must declare.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// What a token must satisfy.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences), when set.
    pub audience: Option<String>,
    /// Accepted keys; a token is checked against those of its header's algorithm.
    pub keys: Vec<Key>,
}

/// Why a request is not authenticated; each answers 401 with its own error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRejection {
    /// No token in the header, the query (or, for the stream, the cookie).
    Missing,
    /// Malformed, badly signed, wrong algorithm, issuer or audience, not yet valid, no `sub`.
    Invalid(String),
    /// Correctly signed but past `exp` (plus leeway).
    Expired,
}

impl IntoResponse for TokenRejection {
    fn into_response(self) -> Response {
        let (code, message, challenge) = match self {
            TokenRejection::Missing => (
                "missing_token",
                "a bearer token is required (Authorization header, access_token query, or for the stream the tidings_session cookie)"
                    .to_string(),
                r#"Bearer realm="tidings""#,
            ),
            TokenRejection::Invalid(why) => {
                ("invalid_token", format!("invalid token: {why}"), r#"Bearer realm="tidings", error="invalid_token""#)
            }
            TokenRejection::Expired => (
                "token_expired",
                "the token has expired".to_string(),
                r#"Bearer realm="tidings", error="invalid_token""#,
            ),
        };
        (
            [(WWW_AUTHENTICATE, HeaderValue::from_static(challenge))],
            ApiError::new(StatusCode::UNAUTHORIZED, code, message),
        )
            .into_response()
    }
}

/// The claims the gateway reads; the spec claims are checked by `Validation`.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The user (`sub`).
    pub user: String,
    /// Expiry, seconds since the epoch (`exp`).
    pub exp: u64,
}

impl AuthConfig {
    /// The user id (`sub`) of a valid token.
    pub fn verify(&self, token: &str) -> Result<String, TokenRejection> {
        self.verify_claims(token).map(|v| v.user)
    }

    /// The user and expiry of a valid token.
    pub fn verify_claims(&self, token: &str) -> Result<Verified, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenRejection::Invalid(e.to_string()))?;
        let mut tried = false;
        for key in self.keys.iter().filter(|k| k.alg == header.alg) {
            tried = true;
            match jsonwebtoken::decode::<Claims>(token, &key.key, &self.validation(key.alg)) {
                Ok(data) if data.claims.sub.is_empty() => {
                    return Err(TokenRejection::Invalid("empty sub".into()));
                }
                Ok(data) => return Ok(Verified { user: data.claims.sub, exp: data.claims.exp }),
                // Another key of the same algorithm may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => return Err(TokenRejection::Expired),
                Err(e) => return Err(TokenRejection::Invalid(e.to_string())),
            }
        }
        Err(TokenRejection::Invalid(if tried {
            "signature does not match any configured key".into()
        } else {
            format!("algorithm {:?} is not accepted", header.alg)
        }))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_exp = true;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            // Without a configured audience any `aud` is fine: the token was still signed for us.
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        v
    }
}

/// The token of a request: Bearer header, else `access_token` query. Never the cookie: see
/// [`stream_token_of`].
pub fn token_of(parts: &Parts) -> Option<String> {
    bearer_of(parts).or_else(|| {
        #[derive(Deserialize)]
        struct TokenQuery {
            access_token: Option<String>,
        }
        match Query::<TokenQuery>::try_from_uri(&parts.uri) {
            Ok(Query(TokenQuery { access_token: Some(t) })) if !t.is_empty() => Some(t),
            _ => None,
        }
    })
}

/// The `Authorization: Bearer` token of a request (the only source `POST /v1/session` takes).
pub fn bearer_of(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// The token of a stream request: like [`token_of`], else the `tidings_session` cookie. Only the
/// stream (a read that changes nothing) may take a cookie: a browser attaches it to requests
/// other sites make it send, so a cookie on a mutating endpoint would be a CSRF hole.
pub fn stream_token_of(parts: &Parts) -> Option<String> {
    token_of(parts).or_else(|| cookie_of(parts))
}

// One cookie by name: split by hand (RFC 6265 `name=value; name=value`) rather than pulling in a
// cookie crate for a single value we only compare and pass on.
fn cookie_of(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, value)| *name == COOKIE_NAME && !value.is_empty())
        .map(|(_, value)| value.trim_matches('"').to_string())
}

/// The user of a stream request (token from the header, the query or the session cookie).
pub fn stream_user(parts: &Parts, config: &AuthConfig) -> Result<String, TokenRejection> {
    let token = stream_token_of(parts).ok_or(TokenRejection::Missing)?;
    config.verify(&token)
}

/// The authenticated user of a request (the token's `sub`; header or query, never a cookie).
/// Rejects with 401.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser(pub String);

impl<S> FromRequestParts<S> for AuthUser
where
    S: Send + Sync,
    Arc<AuthConfig>: FromRef<S>,
{
    type Rejection = TokenRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let config = Arc::<AuthConfig>::from_ref(state);
        let token = token_of(parts).ok_or(TokenRejection::Missing)?;
        config.verify(&token).map(AuthUser)
    }
}

#[derive(Serialize)]
struct DevClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// An HS256 token for `user`, valid for `ttl` from now (for `tidings token` and tests).
pub fn mint_hs256(
    secret: &[u8],
    user: &str,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    let iat = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let claims = DevClaims { sub: user, iat, exp: iat.saturating_add(ttl.as_secs()), iss: issuer, aud: audience };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .map_err(|e| AuthError::Sign(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;

    fn parts(req: Request<()>) -> Parts {
        req.into_parts().0
    }

    #[test]
    fn token_sources_in_order_and_the_cookie_only_for_streams() {
        let p = parts(
            Request::get("/x?access_token=q")
                .header(AUTHORIZATION, "Bearer h")
                .header(COOKIE, "tidings_session=c")
                .body(())
                .unwrap(),
        );
        assert_eq!(token_of(&p).as_deref(), Some("h"));
        assert_eq!(stream_token_of(&p).as_deref(), Some("h"));
        let p = parts(Request::get("/x?limit=2&access_token=q").header(COOKIE, "tidings_session=c").body(()).unwrap());
        assert_eq!(token_of(&p).as_deref(), Some("q"));
        let p = parts(Request::get("/x").header(COOKIE, "a=b; tidings_session=c; d=e").body(()).unwrap());
        assert_eq!(token_of(&p), None, "a cookie is no credential outside the stream");
        assert_eq!(stream_token_of(&p).as_deref(), Some("c"));
        let p = parts(Request::get("/x").header(COOKIE, "tidings_sessionx=c; xtidings_session=d").body(()).unwrap());
        assert_eq!(stream_token_of(&p), None);
        let p = parts(Request::get("/x").header(AUTHORIZATION, "Basic abc").body(()).unwrap());
        assert_eq!(token_of(&p), None);
        let p = parts(Request::get("/x?access_token=q").body(()).unwrap());
        assert_eq!(bearer_of(&p), None, "the session endpoint takes the header only");
    }

    #[test]
    fn hs256_round_trip_and_wrong_secret() {
        let cfg = AuthConfig { keys: vec![Key::hs256(b"s1")], ..Default::default() };
        let t = mint_hs256(b"s1", "alice", Duration::from_secs(60), None, None).unwrap();
        assert_eq!(cfg.verify(&t), Ok("alice".to_string()));
        let t = mint_hs256(b"s2", "alice", Duration::from_secs(60), None, None).unwrap();
        assert!(matches!(cfg.verify(&t), Err(TokenRejection::Invalid(_))));
    }

    #[test]
    fn public_key_type_picks_the_algorithm() {
        const RSA_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAut6BVJ4UMjzeOIfbL0j6
OdxY3zrSbcm76Uq3WyKy68qGfC6XNWJ2FEM41bESisyxDMcFfq90s63yvLnkP/Qm
QA/W2623FVXJ5jEEhC5gWIqUQnNnTtuAXmZhG/u0NVdqfBGjsEO/wwm8tMQ661Lc
DfFyrA/pggqNC/9fXVU7//TIQmx2FuVMg85tottTpDy6VT6aLhi59675ex87tlI8
859YIHzKy8db1Dp5n1VAT0bEcBlY8szsBErq/YJumHyOI4OZhQf2D+mIGjSsNqDS
vPsr9tO5oPyPHifkYvuVSwaIJvq5jE/42SuumfkSiLiLeP9PXF8w9K1pXhUfr39W
bQIDAQAB
-----END PUBLIC KEY-----
";
        const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEf2rqzR1lTKgACbOoGmmnvHfdCKGv
ny+28OJMDZslMWV+go5/tAgqGV/93OE/qqRhqmpKpF5eA5f9kAYhmy3RUw==
-----END PUBLIC KEY-----
";
        assert_eq!(Key::from_public_pem(RSA_PUBLIC.as_bytes()).unwrap().algorithm(), Algorithm::RS256);
        assert_eq!(Key::from_public_pem(EC_PUBLIC.as_bytes()).unwrap().algorithm(), Algorithm::ES256);
        assert!(Key::from_public_pem(b"not a key").is_err());
    }

    #[test]
    fn debug_hides_secret() {
        assert!(!format!("{:?}", Key::hs256(b"very-secret")).contains("very"));
    }
}
