//! The HTTP face of the registry: the subset of Confluent's REST API that serializers, converters
//! and operators use, with Confluent's paths, JSON shapes, content types and error codes.

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{CompatibilityLevel, Registry, RegistryServerError, SubjectVersion, VersionSelector, AVRO};

const SR_CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The registry's routes.
pub fn router(registry: Registry) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/subjects", get(list_subjects))
        .route("/subjects/{subject}", post(lookup).delete(delete_subject))
        .route("/subjects/{subject}/versions", get(list_versions).post(register))
        .route("/subjects/{subject}/versions/{version}", get(get_version).delete(delete_version))
        .route("/subjects/{subject}/versions/{version}/schema", get(get_version_schema))
        .route("/schemas/ids/{id}", get(schema_by_id))
        .route("/schemas/ids/{id}/versions", get(schema_usages))
        .route("/compatibility/subjects/{subject}/versions", post(check_against_all))
        .route("/compatibility/subjects/{subject}/versions/{version}", post(check_against_version))
        .route("/config", get(get_global_level).put(put_global_level).delete(delete_global_level))
        .route("/config/{subject}", get(get_subject_level).put(put_subject_level).delete(delete_subject_level))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, 404, "HTTP 404 Not Found") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, 405, "HTTP 405 Method Not Allowed")
        })
        .with_state(registry)
}

/// Serves until `shutdown` is cancelled with no write guard at all: for tests and benchmarks in
/// one process, on a port nobody else knows. `tidings up` serves through [`serve_with`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let limits = tidings_core::http::Limits::default();
    let timeout = axum::middleware::from_fn_with_state(limits.request_timeout, tidings_core::http::request_timeout);
    let app = router(registry).layer(timeout);
    let accept = tidings_core::http::Capped::new(listener, limits.clone());
    tidings_core::http::serve(accept, app, limits, shutdown).await
}

/// Serves until `shutdown` is cancelled, behind [`guarded_router`]; the listener's own address is
/// an allowed host besides those of `access`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    registry: Registry,
    mut access: Access,
    limits: tidings_core::http::Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    access.listen = Some(listener.local_addr()?.ip());
    let timeout = axum::middleware::from_fn_with_state(limits.request_timeout, tidings_core::http::request_timeout);
    let app = guarded_router(registry, access).layer(timeout);
    let accept = tidings_core::http::Capped::new(listener, limits.clone());
    tidings_core::http::serve(accept, app, limits, shutdown).await
}

/// Who may write to the registry, and by which names it may be reached.
///
/// A web page in a browser on the same host can send "simple" cross-site requests (no JSON
/// content type, an `Origin` header) and, through DNS rebinding, same-origin ones under its own
/// host name; so loopback is no credential, requests naming an origin or a foreign host are
/// refused, and bodies must be JSON.
#[derive(Clone)]
pub struct Access {
    write_token: String,
    allowed_hosts: Vec<String>,
    listen: Option<std::net::IpAddr>,
}

impl Access {
    /// Writes need `write_token` (bearer, or basic auth's password; an empty one matches nothing).
    /// Requests may name (`Host`, port ignored) `localhost`, a loopback address, the listen
    /// address (any IP address when that is unspecified) or one of `allowed_hosts`.
    pub fn new(write_token: impl Into<String>, allowed_hosts: impl IntoIterator<Item = String>) -> Self {
        let allowed_hosts = allowed_hosts.into_iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        Access { write_token: write_token.into(), allowed_hosts, listen: None }
    }

    /// The address the registry listens on, an allowed host (set by [`serve_with`]).
    pub fn with_listen(mut self, ip: std::net::IpAddr) -> Self {
        self.listen = Some(ip);
        self
    }

    fn presented_token_matches(&self, headers: &axum::http::HeaderMap) -> bool {
        use base64::Engine as _;
        if self.write_token.is_empty() {
            return false;
        }
        let Some(auth) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
        let presented = if let Some(b) = auth.strip_prefix("Bearer ") {
            b.trim().to_string()
        } else if let Some(b) = auth.strip_prefix("Basic ") {
            let decoded = base64::engine::general_purpose::STANDARD.decode(b.trim()).unwrap_or_default();
            let text = String::from_utf8_lossy(&decoded).to_string();
            text.split_once(':').map(|(_, p)| p.to_string()).unwrap_or_default()
        } else {
            return false;
        };
        subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), self.write_token.as_bytes()).into()
    }

    /// Whether `host` (a `Host` header's value) names this registry. An IP address cannot be
    /// rebound, so the listen address is safe to accept, and any address when that is 0.0.0.0/::.
    pub(crate) fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim().to_ascii_lowercase();
        let name = match host.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or_default(),
            None => host.rsplit_once(':').map_or(host.as_str(), |(name, _port)| name),
        };
        if name == "localhost" {
            return true;
        }
        if let Ok(ip) = name.parse::<std::net::IpAddr>() {
            return ip.is_loopback() || self.listen.is_some_and(|l| l == ip || l.is_unspecified());
        }
        self.allowed_hosts.iter().any(|h| h == name)
    }
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("write_token", &"…")
            .field("allowed_hosts", &self.allowed_hosts)
            .field("listen", &self.listen)
            .finish()
    }
}

/// The routes behind the guard of `access`.
pub fn guarded_router(registry: Registry, access: Access) -> Router {
    router(registry).layer(axum::middleware::from_fn_with_state(std::sync::Arc::new(access), guard))
}

/// Refuses what a browser sends (an `Origin`: 403) and names other than this registry's (421);
/// reads (GET, and the POSTs that only look up or check compatibility) then pass, writes need the
/// write token (401).
async fn guard(State(access): State<std::sync::Arc<Access>>, req: Request, next: axum::middleware::Next) -> Response {
    if req.headers().contains_key(header::ORIGIN) {
        return ApiError::new(StatusCode::FORBIDDEN, 40301, "the schema registry does not serve web pages (Origin)")
            .into_response();
    }
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| req.uri().host());
    if let Some(host) = host {
        if !access.host_allowed(host) {
            return ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                42101,
                format!("the schema registry is not reached as {host:?} (see --registry-allow-host)"),
            )
            .into_response();
        }
    }
    let path = req.uri().path();
    let write = match *req.method() {
        axum::http::Method::GET | axum::http::Method::HEAD => false,
        axum::http::Method::POST => path.ends_with("/versions") && path.starts_with("/subjects/"),
        _ => true,
    };
    if write && !access.presented_token_matches(req.headers()) {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            40101,
            "schema registry writes need the registry's write token",
        )
        .into_response();
    }
    next.run(req).await
}

/// Confluent's error body: `{"error_code": int, "message": string}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }
}

impl From<RegistryServerError> for ApiError {
    fn from(e: RegistryServerError) -> Self {
        use RegistryServerError as E;
        let (status, code) = match &e {
            E::InvalidSchema(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42201),
            E::UnsupportedSchemaType(_) | E::InvalidVersion(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42202),
            E::InvalidCompatibilityLevel(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42203),
            E::Incompatible { .. } => (StatusCode::CONFLICT, 409),
            E::SubjectNotFound(_) => (StatusCode::NOT_FOUND, 40401),
            E::VersionNotFound { .. } => (StatusCode::NOT_FOUND, 40402),
            E::SchemaNotFound(_) => (StatusCode::NOT_FOUND, 40403),
            E::SubjectNotSoftDeleted(_) => (StatusCode::NOT_FOUND, 40405),
            E::VersionSoftDeleted { .. } => (StatusCode::NOT_FOUND, 40406),
            E::VersionNotSoftDeleted { .. } => (StatusCode::NOT_FOUND, 40407),
            E::SubjectLevelNotFound(_) => (StatusCode::NOT_FOUND, 40408),
            E::Store(store) => {
                tracing::error!(error = %store, "schema registry store failure");
                // 503 tells clients (schema_registry_converter among them) that a retry may help.
                let status = if store.is_retriable() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                (status, 50001)
            }
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        sr_json(self.status, &json!({ "error_code": self.code, "message": self.message }))
    }
}

/// A JSON response with the registry content type.
fn sr_json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, SR_CONTENT_TYPE)], bytes).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot serialize response: {e}")).into_response(),
    }
}

fn ok<T: Serialize>(body: &T) -> Response {
    sr_json(StatusCode::OK, body)
}

/// A JSON request body in a JSON content type (`application/json`, Confluent's
/// `application/vnd.schemaregistry.v1+json` or another `application/…+json`): 415 otherwise,
/// a missing one included, as those are what a web page may send cross-site without asking.
struct SrJson<T>(T);

/// Whether a `Content-Type` value names JSON.
fn is_json_content_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for SrJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req.headers().get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()));
        if !content_type.as_deref().is_some_and(is_json_content_type) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                415,
                format!(
                    "HTTP 415 Unsupported Media Type: {:?} (send application/json)",
                    content_type.as_deref().unwrap_or("no Content-Type")
                ),
            ));
        }
        let body = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, 400, format!("cannot read the request body: {e}")))?;
        serde_json::from_slice(&body)
            .map(SrJson)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, 400, format!("Unrecognized request body: {e}")))
    }
}

#[derive(Deserialize)]
struct SchemaRequest {
    schema: String,
    #[serde(rename = "schemaType")]
    schema_type: Option<String>,
    #[serde(default)]
    references: Vec<serde_json::Value>,
}

impl SchemaRequest {
    /// References (schemas composed from other subjects) are not supported; refuse them rather
    /// than register a schema that cannot be resolved.
    fn checked(self) -> Result<Self, ApiError> {
        if self.references.is_empty() {
            Ok(self)
        } else {
            Err(RegistryServerError::InvalidSchema("schema references are not supported by this registry".into())
                .into())
        }
    }
}

#[derive(Deserialize)]
struct LevelRequest {
    #[serde(alias = "compatibilityLevel")]
    compatibility: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct Flags {
    #[serde(default)]
    deleted: bool,
    #[serde(default)]
    permanent: bool,
    #[serde(default)]
    default_to_global: bool,
}

fn version_json(v: &SubjectVersion) -> serde_json::Value {
    let mut body = json!({ "subject": v.subject, "version": v.version, "id": v.id, "schema": v.schema });
    // Confluent leaves schemaType out for AVRO, the default.
    if v.schema_type != AVRO {
        body["schemaType"] = json!(v.schema_type);
    }
    body
}

fn parse_id(raw: &str) -> Result<u32, ApiError> {
    raw.parse().map_err(|_| RegistryServerError::SchemaNotFound(raw.to_string()).into())
}

async fn root() -> Response {
    ok(&json!({}))
}

async fn list_subjects(State(r): State<Registry>, Query(flags): Query<Flags>) -> Response {
    ok(&r.subjects(flags.deleted))
}

async fn register(
    State(r): State<Registry>,
    Path(subject): Path<String>,
    SrJson(body): SrJson<SchemaRequest>,
) -> Result<Response, ApiError> {
    let body = body.checked()?;
    let id = r.register_typed(&subject, &body.schema, body.schema_type.as_deref()).await?;
    Ok(ok(&json!({ "id": id })))
}

async fn lookup(
    State(r): State<Registry>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
    SrJson(body): SrJson<SchemaRequest>,
) -> Result<Response, ApiError> {
    let body = body.checked()?;
    let found = r.lookup(&subject, &body.schema, body.schema_type.as_deref(), flags.deleted).await?;
    Ok(ok(&version_json(&found)))
}

async fn delete_subject(
    State(r): State<Registry>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> Result<Response, ApiError> {
    Ok(ok(&r.delete_subject(&subject, flags.permanent).await?))
}

async fn list_versions(
    State(r): State<Registry>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> Result<Response, ApiError> {
    Ok(ok(&r.versions(&subject, flags.deleted).await?))
}

async fn get_version(
    State(r): State<Registry>,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> Result<Response, ApiError> {
    let found = r.version(&subject, VersionSelector::parse(&version)?, flags.deleted).await?;
    Ok(ok(&version_json(&found)))
}

async fn get_version_schema(
    State(r): State<Registry>,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> Result<Response, ApiError> {
    let found = r.version(&subject, VersionSelector::parse(&version)?, flags.deleted).await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, SR_CONTENT_TYPE)], found.schema).into_response())
}

async fn delete_version(
    State(r): State<Registry>,
    Path((subject, version)): Path<(String, String)>,
    Query(flags): Query<Flags>,
) -> Result<Response, ApiError> {
    let deleted = r.delete_version(&subject, VersionSelector::parse(&version)?, flags.permanent).await?;
    Ok(ok(&deleted))
}

async fn schema_by_id(State(r): State<Registry>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let (schema_type, schema) = r.schema_with_type(parse_id(&id)?).await?;
    let mut body = json!({ "schema": schema });
    if schema_type != AVRO {
        body["schemaType"] = json!(schema_type);
    }
    Ok(ok(&body))
}

async fn schema_usages(
    State(r): State<Registry>,
    Path(id): Path<String>,
    Query(flags): Query<Flags>,
) -> Result<Response, ApiError> {
    let usages = r.usages(parse_id(&id)?, flags.deleted).await?;
    let body: Vec<_> =
        usages.iter().map(|(subject, version)| json!({ "subject": subject, "version": version })).collect();
    Ok(ok(&body))
}

fn compatibility_json(problems: Vec<String>) -> Response {
    if problems.is_empty() {
        ok(&json!({ "is_compatible": true }))
    } else {
        ok(&json!({ "is_compatible": false, "messages": problems }))
    }
}

async fn check_against_version(
    State(r): State<Registry>,
    Path((subject, version)): Path<(String, String)>,
    SrJson(body): SrJson<SchemaRequest>,
) -> Result<Response, ApiError> {
    let body = body.checked()?;
    let selector = VersionSelector::parse(&version)?;
    let problems = r.check_compatibility(&subject, Some(selector), &body.schema, body.schema_type.as_deref()).await?;
    Ok(compatibility_json(problems))
}

async fn check_against_all(
    State(r): State<Registry>,
    Path(subject): Path<String>,
    SrJson(body): SrJson<SchemaRequest>,
) -> Result<Response, ApiError> {
    let body = body.checked()?;
    let problems = r.check_compatibility(&subject, None, &body.schema, body.schema_type.as_deref()).await?;
    Ok(compatibility_json(problems))
}

fn level_json(level: CompatibilityLevel) -> Response {
    ok(&json!({ "compatibilityLevel": level.as_str() }))
}

async fn get_global_level(State(r): State<Registry>) -> Response {
    level_json(r.global_level())
}

async fn put_global_level(State(r): State<Registry>, SrJson(body): SrJson<LevelRequest>) -> Result<Response, ApiError> {
    let level = CompatibilityLevel::parse(&body.compatibility)?;
    r.set_level(None, level).await?;
    Ok(ok(&json!({ "compatibility": level.as_str() })))
}

async fn delete_global_level(State(r): State<Registry>) -> Result<Response, ApiError> {
    Ok(level_json(r.delete_level(None).await?))
}

async fn get_subject_level(
    State(r): State<Registry>,
    Path(subject): Path<String>,
    Query(flags): Query<Flags>,
) -> Result<Response, ApiError> {
    match r.subject_level(&subject) {
        Some(level) => Ok(level_json(level)),
        None if flags.default_to_global => Ok(level_json(r.global_level())),
        None => Err(RegistryServerError::SubjectLevelNotFound(subject).into()),
    }
}

async fn put_subject_level(
    State(r): State<Registry>,
    Path(subject): Path<String>,
    SrJson(body): SrJson<LevelRequest>,
) -> Result<Response, ApiError> {
    let level = CompatibilityLevel::parse(&body.compatibility)?;
    r.set_level(Some(&subject), level).await?;
    Ok(ok(&json!({ "compatibility": level.as_str() })))
}

async fn delete_subject_level(State(r): State<Registry>, Path(subject): Path<String>) -> Result<Response, ApiError> {
    Ok(level_json(r.delete_level(Some(&subject)).await?))
}
