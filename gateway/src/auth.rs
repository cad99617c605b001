//! JWT authentication for the user-facing endpoints: verifies HS256, RS256 or ES256 user tokens
//! (signature, `exp`, `nbf`, `iss`/`aud`) from `Authorization: Bearer`, and yields `sub`. The stream
//! alone also takes the `access_token` query and its own short-lived credential, the stream cookie.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::{AUTHORIZATION, COOKIE, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::ApiError;

/// HS256 secret of the embedded dev mode; never use it where tokens matter.
pub const DEV_SECRET: &str = "tidings-dev-secret";
/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// Cookie carrying a stream credential for browsers' streams (EventSource cannot set an
/// Authorization header, and a redirect to the owner drops the query token). Set by `POST /v1/session`.
pub const COOKIE_NAME: &str = "tidings_stream";
/// The cookie earlier versions set to the user token itself (`Path=/v1`); accepted nowhere, and
/// cleared by `/v1/session` so browsers stop sending a bearer token around.
pub const LEGACY_COOKIE_NAME: &str = "tidings_session";
/// Query parameter carrying a user token, on the stream only.
pub const QUERY_PARAM: &str = "access_token";
/// `aud` of stream credentials.
pub const STREAM_AUDIENCE: &str = "tidings-stream";
/// JWT `typ` of stream credentials: user-token verification refuses it by name, whatever the key.
const STREAM_TYP: &str = "tidings-stream+jwt";
/// Label of the stream-credential key derivation (HMAC-SHA256 keyed with a configured secret).
const STREAM_KEY_LABEL: &[u8] = b"tidings stream credential key v1";

/// Problems with keys or with minting a token; all are configuration errors, so retrying the same
/// call does not help.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the public key is neither an RSA nor an EC key in PEM form (not retriable): {0}")]
    Key(String),
    #[error("could not sign the token (not retriable): {0}")]
    Sign(String),
    #[error(
        "no key to sign stream credentials with: configure an HS256 secret (--jwt-secret) or, with public \
         keys only, a secret shared by all gateways (--stream-secret) (not retriable)"
    )]
    NoStreamKey,
}

/// One key tokens may be signed with: an HS256 secret, or an RS256/ES256 public key; or a secret
/// for stream credentials only.
///
/// Stream credentials (see [`AuthConfig::mint_stream`]) are HS256 JWTs under a key *derived* from
/// a secret every gateway of a deployment already has: HMAC-SHA256(secret, [`STREAM_KEY_LABEL`]).
/// So any gateway verifies what another minted (a browser redirected to its user's owner keeps its
/// cookie), and the derived key never equals a user-token key, so a stream credential can never
/// pass as a user token. The secret is the HS256 user-token secret; a deployment with public keys
/// only has no shared secret (a public key is public: a key derived from it could be derived by
/// anyone), so it configures one for streams alone (`--stream-secret`), the same on every gateway.
#[derive(Clone)]
pub struct Key {
    alg: Algorithm,
    /// Verifies user tokens; `None` for a stream-only secret.
    key: Option<DecodingKey>,
    /// The derived stream-credential secret: HS256 secrets and stream-only secrets.
    stream: Option<Arc<[u8]>>,
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
        Key { alg: Algorithm::HS256, key: Some(DecodingKey::from_secret(secret)), stream: stream_key(secret) }
    }

    /// A secret for stream credentials only (it verifies no user token): for deployments whose
    /// user tokens are checked with public keys. Every gateway needs the same one.
    pub fn stream_only(secret: &[u8]) -> Key {
        Key { alg: Algorithm::HS256, key: None, stream: stream_key(secret) }
    }

    /// A public key in PEM form: RS256 for an RSA key, ES256 for an EC (P-256) key.
    pub fn from_public_pem(pem: &[u8]) -> Result<Key, AuthError> {
        if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
            return Ok(Key { alg: Algorithm::RS256, key: Some(key), stream: None });
        }
        DecodingKey::from_ec_pem(pem)
            .map(|key| Key { alg: Algorithm::ES256, key: Some(key), stream: None })
            .map_err(|e| AuthError::Key(e.to_string()))
    }

    /// The algorithm tokens for this key must declare.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

// HMAC-SHA256 keyed with the secret over a fixed label (jsonwebtoken's HS256 signer is that HMAC),
// base64url: 256 bits, never equal to the secret itself.
fn stream_key(secret: &[u8]) -> Option<Arc<[u8]>> {
    jsonwebtoken::crypto::sign(STREAM_KEY_LABEL, &EncodingKey::from_secret(secret), Algorithm::HS256)
        .ok()
        .map(|k| Arc::from(k.into_bytes()))
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
    /// No token in the header (or, for the stream, the query or the cookie).
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
                "a bearer token is required (Authorization header; for the stream also the access_token query or the tidings_stream cookie from POST /v1/session)"
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

/// The claims of a stream credential.
#[derive(Serialize, Deserialize)]
struct StreamClaims {
    sub: String,
    iat: u64,
    exp: u64,
    aud: String,
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
        if header.typ.as_deref() == Some(STREAM_TYP) {
            return Err(TokenRejection::Invalid("a stream credential opens streams only".into()));
        }
        let mut tried = false;
        for (alg, key) in
            self.keys.iter().filter_map(|k| Some((k.alg, k.key.as_ref()?))).filter(|(a, _)| *a == header.alg)
        {
            tried = true;
            match jsonwebtoken::decode::<Claims>(token, key, &self.validation(alg)) {
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

    /// A stream credential for `user` until `exp` (seconds since the epoch), signed with the
    /// stream key of a stream-only secret if one is configured, else of the first HS256 secret.
    pub fn mint_stream(&self, user: &str, exp: u64) -> Result<String, AuthError> {
        let secret = self
            .keys
            .iter()
            .find(|k| k.key.is_none() && k.stream.is_some())
            .or_else(|| self.keys.iter().find(|k| k.stream.is_some()))
            .and_then(|k| k.stream.as_ref())
            .ok_or(AuthError::NoStreamKey)?;
        let iat = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = StreamClaims { sub: user.to_string(), iat, exp, aud: STREAM_AUDIENCE.to_string() };
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(STREAM_TYP.into());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(secret))
            .map_err(|e| AuthError::Sign(e.to_string()))
    }

    /// The user of a valid stream credential (from [`Self::mint_stream`] on any gateway with the
    /// same keys). User tokens are refused here, as stream credentials are by [`Self::verify`].
    pub fn verify_stream(&self, token: &str) -> Result<String, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenRejection::Invalid(e.to_string()))?;
        if header.typ.as_deref() != Some(STREAM_TYP) || header.alg != Algorithm::HS256 {
            return Err(TokenRejection::Invalid("not a stream credential (POST /v1/session makes one)".into()));
        }
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_audience(&[STREAM_AUDIENCE]);
        v.set_required_spec_claims(&["exp", "sub", "aud"]);
        for secret in self.keys.iter().filter_map(|k| k.stream.as_ref()) {
            match jsonwebtoken::decode::<StreamClaims>(token, &DecodingKey::from_secret(secret), &v) {
                Ok(data) if data.claims.sub.is_empty() => return Err(TokenRejection::Invalid("empty sub".into())),
                Ok(data) => return Ok(data.claims.sub),
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => return Err(TokenRejection::Expired),
                Err(e) => return Err(TokenRejection::Invalid(e.to_string())),
            }
        }
        Err(TokenRejection::Invalid("stream credential signature does not match any configured key".into()))
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

/// The `Authorization: Bearer` token of a request: the only source of user tokens outside the stream.
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

/// The `access_token` query parameter, with its name percent-decoded (`access%5Ftoken` is the same
/// parameter to a query parser, so it is here too).
pub fn query_token_of(parts: &Parts) -> Option<String> {
    form_urlencoded::parse(parts.uri.query()?.as_bytes())
        .find(|(k, v)| k == QUERY_PARAM && !v.is_empty())
        .map(|(_, v)| v.into_owned())
}

/// Whether a raw `name=value` pair of a query is the token parameter (its name decoded first).
pub fn is_token_param(pair: &str) -> bool {
    form_urlencoded::parse(pair.as_bytes()).next().is_some_and(|(k, _)| k == QUERY_PARAM)
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

/// The user of a stream request: a user token from the Bearer header or the `access_token` query,
/// else a stream credential from the `tidings_stream` cookie. Only the stream, a read that changes
/// nothing, takes a cookie (a browser attaches it to requests other sites make it send: on a
/// mutating endpoint that would be a CSRF hole) or a query token (URLs end up in logs).
pub fn stream_user(parts: &Parts, config: &AuthConfig) -> Result<String, TokenRejection> {
    if let Some(token) = bearer_of(parts).or_else(|| query_token_of(parts)) {
        return config.verify(&token);
    }
    let credential = cookie_of(parts).ok_or(TokenRejection::Missing)?;
    config.verify_stream(&credential)
}

/// The authenticated user of a request (the user token's `sub`; the Bearer header only: never a
/// query parameter or a cookie). Rejects with 401.
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
        let token = bearer_of(parts).ok_or(TokenRejection::Missing)?;
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

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn token_sources_and_decoded_query_names() {
        let p = parts(
            Request::get("/x?access_token=q")
                .header(AUTHORIZATION, "Bearer h")
                .header(COOKIE, "tidings_stream=c")
                .body(())
                .unwrap(),
        );
        assert_eq!(bearer_of(&p).as_deref(), Some("h"));
        let p = parts(Request::get("/x?limit=2&access%5Ftoken=q").body(()).unwrap());
        assert_eq!(query_token_of(&p).as_deref(), Some("q"), "a query parser decodes names");
        assert_eq!(bearer_of(&p), None, "the query is no source outside the stream");
        let p = parts(Request::get("/x").header(COOKIE, "a=b; tidings_stream=c; d=e").body(()).unwrap());
        assert_eq!(cookie_of(&p).as_deref(), Some("c"));
        let p = parts(
            Request::get("/x")
                .header(COOKIE, "tidings_streamx=c; xtidings_stream=d; tidings_session=e")
                .body(())
                .unwrap(),
        );
        assert_eq!(cookie_of(&p), None);
        let p = parts(Request::get("/x").header(AUTHORIZATION, "Basic abc").body(()).unwrap());
        assert_eq!(bearer_of(&p), None);
        for token in ["access_token=x", "access%5Ftoken=x", "%61ccess_token=x", "access_token", "access+token=x"] {
            assert_eq!(is_token_param(token), token != "access+token=x", "{token}");
        }
        for other in ["access_tokens=1", "last_event_id=1", "x=access_token", ""] {
            assert!(!is_token_param(other), "{other}");
        }
    }

    #[test]
    fn stream_credentials_are_no_user_tokens_and_user_tokens_no_stream_credentials() {
        let cfg = AuthConfig { keys: vec![Key::hs256(b"s1")], ..Default::default() };
        let cred = cfg.mint_stream("alice", now() + 60).unwrap();
        assert_eq!(cfg.verify_stream(&cred), Ok("alice".to_string()));
        assert!(matches!(cfg.verify(&cred), Err(TokenRejection::Invalid(_))), "a stream credential as a user token");
        let user = mint_hs256(b"s1", "alice", Duration::from_secs(60), None, None).unwrap();
        assert!(matches!(cfg.verify_stream(&user), Err(TokenRejection::Invalid(_))));
        // Not even a token shaped like a credential but signed with the user-token secret itself.
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(STREAM_TYP.into());
        let claims = StreamClaims { sub: "alice".into(), iat: now(), exp: now() + 60, aud: STREAM_AUDIENCE.into() };
        let forged = jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(b"s1")).unwrap();
        assert!(matches!(cfg.verify_stream(&forged), Err(TokenRejection::Invalid(_))));
        assert!(matches!(cfg.verify(&forged), Err(TokenRejection::Invalid(_))));
        // Another gateway with the same secret (rotation: among others) takes it; one without does not.
        let peer = AuthConfig { keys: vec![Key::hs256(b"s0"), Key::hs256(b"s1")], ..Default::default() };
        assert_eq!(peer.verify_stream(&cred), Ok("alice".to_string()));
        let other = AuthConfig { keys: vec![Key::hs256(b"s2")], ..Default::default() };
        assert!(matches!(other.verify_stream(&cred), Err(TokenRejection::Invalid(_))));
        let expired = cfg.mint_stream("alice", now() - LEEWAY_SECS - 10).unwrap();
        assert_eq!(cfg.verify_stream(&expired), Err(TokenRejection::Expired));

        // The stream takes user tokens from the header or the query, credentials from the cookie only.
        let req = |uri: &str, header: Option<(&str, String)>| {
            let mut r = Request::get(uri);
            if let Some((name, value)) = header {
                r = r.header(name, value);
            }
            parts(r.body(()).unwrap())
        };
        let ok = Ok("alice".to_string());
        assert_eq!(stream_user(&req("/", Some(("cookie", format!("tidings_stream={cred}")))), &cfg), ok);
        assert_eq!(stream_user(&req("/", Some(("authorization", format!("Bearer {user}")))), &cfg), ok);
        assert_eq!(stream_user(&req(&format!("/?access%5Ftoken={user}"), None), &cfg), ok);
        for refused in [
            req("/", Some(("cookie", format!("tidings_stream={user}")))),
            req("/", Some(("cookie", format!("tidings_session={user}")))),
            req("/", Some(("authorization", format!("Bearer {cred}")))),
            req(&format!("/?access_token={cred}"), None),
        ] {
            assert!(stream_user(&refused, &cfg).is_err(), "{:?}", refused.uri);
        }
    }

    #[test]
    fn public_key_deployments_need_a_shared_stream_secret() {
        const EC_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEf2rqzR1lTKgACbOoGmmnvHfdCKGv
ny+28OJMDZslMWV+go5/tAgqGV/93OE/qqRhqmpKpF5eA5f9kAYhmy3RUw==
-----END PUBLIC KEY-----
";
        let ec = Key::from_public_pem(EC_PUBLIC.as_bytes()).unwrap();
        let bare = AuthConfig { keys: vec![ec.clone()], ..Default::default() };
        assert!(matches!(bare.mint_stream("alice", now() + 60), Err(AuthError::NoStreamKey)));
        let a = AuthConfig { keys: vec![ec.clone(), Key::stream_only(b"shared")], ..Default::default() };
        let b = AuthConfig { keys: vec![Key::stream_only(b"shared"), ec], ..Default::default() };
        let cred = a.mint_stream("alice", now() + 60).unwrap();
        assert_eq!(b.verify_stream(&cred), Ok("alice".to_string()));
        // The stream secret verifies no user token.
        let user = mint_hs256(b"shared", "alice", Duration::from_secs(60), None, None).unwrap();
        assert!(matches!(b.verify(&user), Err(TokenRejection::Invalid(_))));
        // With both, the stream-only secret signs (so it can be the one all gateways share).
        let both = AuthConfig { keys: vec![Key::hs256(b"s1"), Key::stream_only(b"shared")], ..Default::default() };
        assert_eq!(b.verify_stream(&both.mint_stream("bo", now() + 60).unwrap()), Ok("bo".to_string()));
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
