//! Schema-registry client used by every stage: talks to any Confluent-compatible registry by URL
//! (the embedded one or an external one) and caches schemas by id and readers per writer schema,
//! because building a resolved schema is the dominant cost of Avro decoding. The REST calls are
//! made here with reqwest rather than through schema_registry_converter, which keeps an error's
//! HTTP status only inside its message text: errors are classified by status instead.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::error::{CodecError, RegistryError};
use crate::wire;

/// The settings that hold this process's registry credentials, named when the registry refuses
/// them (401/403).
pub const CREDENTIAL_SETTINGS: &str = "--schema-registry-bearer-token (TIDINGS_SCHEMA_REGISTRY_BEARER_TOKEN) or \
     --schema-registry-basic-auth (TIDINGS_SCHEMA_REGISTRY_BASIC_AUTH); for the embedded registry of another \
     `tidings up`, its write token: that process's --registry-write-token (TIDINGS_REGISTRY_WRITE_TOKEN) or \
     <data-dir>/registry-write-token";

/// Largest single allocation the Avro decoder may make.
pub const MAX_AVRO_ALLOCATION: usize = 64 * 1024 * 1024;

/// Why a framed record could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The bytes are not a valid record; retrying cannot help (dead-letter it).
    #[error(transparent)]
    Malformed(#[from] CodecError),
    /// The record names a schema id the registry does not know (dead-letter it).
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    /// The writer schema cannot be read as the stage's reader schema (dead-letter it).
    #[error("schema id {id} is incompatible with the reader schema: {reason}")]
    Incompatible { id: u32, reason: String },
    /// The registry could not be asked; retry later, do not dead-letter.
    #[error("schema registry unavailable: {0}")]
    RegistryUnavailable(String),
}

impl DecodeError {
    /// A short, stable reason code for dead-letter headers and metrics.
    pub fn reason_code(&self) -> &'static str {
        match self {
            DecodeError::Malformed(CodecError::TooShort(_)) => "too-short",
            DecodeError::Malformed(CodecError::WrongMagic(_)) => "wrong-magic-byte",
            DecodeError::Malformed(_) => "malformed-avro",
            DecodeError::UnknownSchemaId(_) => "unknown-schema-id",
            DecodeError::Incompatible { .. } => "incompatible-schema",
            DecodeError::RegistryUnavailable(_) => "registry-unavailable",
        }
    }

    pub fn is_retriable(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable(_))
    }
}

/// A writer schema and the reader built for it. Schemas are leaked on purpose: one per distinct
/// schema id for the life of the process (a handful), so readers can borrow them for `'static`.
struct CachedReader {
    reader: GenericDatumReader<'static>,
    /// The reader schema's named types, resolved once, to validate each decoded value.
    names: ResolvedSchema<'static>,
    schema: &'static Schema,
    /// The writer schema is the reader schema (same canonical form): no resolution needed.
    same: bool,
}

/// Where a schema registry is and how to authenticate to it (Confluent Cloud style: https with
/// an API key and secret as basic auth, or a bearer token).
#[derive(Clone, Default)]
pub struct RegistryEndpoint {
    pub url: String,
    /// `(user, password)` for HTTP basic auth.
    pub basic_auth: Option<(String, String)>,
    pub bearer_token: Option<String>,
    /// An extra trusted CA (PEM), for an https registry signed by a private CA.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for RegistryEndpoint {
    // Credentials stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryEndpoint")
            .field("url", &self.url)
            .field("basic_auth", &self.basic_auth.as_ref().map(|(u, _)| u))
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "…"))
            .field("ca_pem", &self.ca_pem.is_some())
            .finish()
    }
}

impl From<&str> for RegistryEndpoint {
    fn from(url: &str) -> Self {
        RegistryEndpoint { url: url.to_string(), ..Default::default() }
    }
}

impl From<String> for RegistryEndpoint {
    fn from(url: String) -> Self {
        RegistryEndpoint { url, ..Default::default() }
    }
}

impl From<&String> for RegistryEndpoint {
    fn from(url: &String) -> Self {
        url.as_str().into()
    }
}

impl From<&RegistryEndpoint> for RegistryEndpoint {
    fn from(e: &RegistryEndpoint) -> Self {
        e.clone()
    }
}

/// Cached access to a schema registry.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    url: String,
    /// The base URL, for appending path segments (percent-encoded by the URL type).
    base: reqwest::Url,
    http: reqwest::Client,
    auth: Auth,
    by_id: RwLock<HashMap<u32, &'static Schema>>,
    /// Readers keyed by (writer id, reader schema address).
    readers: RwLock<HashMap<(u32, usize), Arc<CachedReader>>>,
}

/// How requests authenticate.
enum Auth {
    None,
    Basic(String, String),
    Bearer(String),
}

/// Classifies an answer by its HTTP status: 404 → `not_found`; 401/403 → `Unauthorized` (the
/// settings' credentials: not retried); 429 → `Throttled` and 408, 5xx → `Unavailable` (retried);
/// other 4xx → `Refused` (the request itself is wrong).
fn classify(status: reqwest::StatusCode, body: &str, not_found: impl FnOnce() -> RegistryError) -> RegistryError {
    // Confluent's error body is {"error_code", "message"}; anything else is shown as it came.
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or_else(|| body.chars().take(200).collect());
    match status.as_u16() {
        404 => not_found(),
        401 | 403 => RegistryError::Unauthorized(status.as_u16(), message),
        429 => RegistryError::Throttled(message),
        408 | 500..=599 => RegistryError::Unavailable(format!("HTTP {status}: {message}")),
        400..=499 => RegistryError::Refused(status.as_u16(), message),
        _ => RegistryError::Rejected(format!("HTTP {status}: {message}")),
    }
}

impl RegistryClient {
    /// A client for the registry at `endpoint` (a URL such as `http://127.0.0.1:8081`, or a
    /// [`RegistryEndpoint`] with credentials).
    pub fn new(endpoint: impl Into<RegistryEndpoint>) -> Result<Self, RegistryError> {
        let endpoint = endpoint.into();
        let url = endpoint.url.as_str();
        // Caps any single allocation the Avro decoder makes from a length it read from untrusted
        // bytes (the default is 512 MiB): a 6-byte record must not be able to claim gigabytes.
        // 64 MiB still fits a legitimate 1 MiB record of one-byte array items (~40 MB as values).
        apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
        let base = reqwest::Url::parse(url.trim_end_matches('/'))
            .map_err(|e| RegistryError::Config(format!("schema registry URL {url:?}: {e}")))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(RegistryError::Config(format!("schema registry URL {url:?} is not http(s)")));
        }
        let auth = match (&endpoint.basic_auth, &endpoint.bearer_token) {
            (Some((u, p)), _) => Auth::Basic(u.clone(), p.clone()),
            (None, Some(t)) => Auth::Bearer(t.clone()),
            (None, None) => Auth::None,
        };
        let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
        if let Some(pem) = &endpoint.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| RegistryError::Config(format!("schema registry CA certificate: {e}")))?;
            http = http.add_root_certificate(ca);
        }
        let http = http.build().map_err(|e| RegistryError::Config(e.to_string()))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                url: url.to_string(),
                base,
                http,
                auth,
                by_id: RwLock::new(HashMap::new()),
                readers: RwLock::new(HashMap::new()),
            }),
        })
    }

    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// The schema registered under `id`, fetched once.
    pub async fn schema_by_id(&self, id: u32) -> Result<&'static Schema, RegistryError> {
        if let Some(s) = self.inner.by_id.read().expect("lock").get(&id) {
            return Ok(s);
        }
        let answer = self
            .call(reqwest::Method::GET, &["schemas", "ids", &id.to_string()], None, || {
                RegistryError::UnknownSchemaId(id)
            })
            .await?;
        let text = answer.get("schema").and_then(|v| v.as_str()).ok_or_else(|| {
            RegistryError::InvalidSchema(format!("id {id}"), "the registry's answer has no `schema`".into())
        })?;
        let schema =
            Schema::parse_str(text).map_err(|e| RegistryError::InvalidSchema(format!("id {id}"), e.to_string()))?;
        let mut map = self.inner.by_id.write().expect("lock");
        let leaked: &'static Schema = map.get(&id).copied().unwrap_or_else(|| Box::leak(Box::new(schema)));
        map.insert(id, leaked);
        Ok(leaked)
    }

    /// Registers `schema` under `subject` (idempotent) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let body = serde_json::json!({ "schema": schema });
        let answer = self
            .call(reqwest::Method::POST, &["subjects", subject, "versions"], Some(body), || {
                RegistryError::UnknownSubject(subject.to_string())
            })
            .await?;
        answer
            .get("id")
            .and_then(|v| v.as_u64())
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| RegistryError::Rejected(format!("registering {subject}: the answer has no id: {answer}")))
    }

    /// The latest schema of `subject` and its id.
    pub async fn latest(&self, subject: &str) -> Result<(u32, &'static Schema), RegistryError> {
        let answer = self
            .call(reqwest::Method::GET, &["subjects", subject, "versions", "latest"], None, || {
                RegistryError::UnknownSubject(subject.to_string())
            })
            .await?;
        let id =
            answer.get("id").and_then(|v| v.as_u64()).and_then(|v| u32::try_from(v).ok()).ok_or_else(|| {
                RegistryError::Rejected(format!("latest of {subject}: the answer has no id: {answer}"))
            })?;
        Ok((id, self.schema_by_id(id).await?))
    }

    /// One Confluent REST call: `path` segments under the base URL (percent-encoded), the body as
    /// `application/vnd.schemaregistry.v1+json`; the answer's JSON, or the error its status means.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &[&str],
        body: Option<serde_json::Value>,
        not_found: impl FnOnce() -> RegistryError,
    ) -> Result<serde_json::Value, RegistryError> {
        const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";
        let mut url = self.inner.base.clone();
        url.path_segments_mut()
            .map_err(|_| RegistryError::Config(format!("schema registry URL {} cannot take a path", self.inner.url)))?
            .pop_if_empty()
            .extend(path);
        let mut req = self.inner.http.request(method, url).header(reqwest::header::ACCEPT, CONTENT_TYPE);
        req = match &self.inner.auth {
            Auth::None => req,
            Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
            Auth::Bearer(t) => req.bearer_auth(t),
        };
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE).body(b.to_string());
        }
        // Transport failures (refused, reset, timed out, TLS) can all pass: retriable.
        let resp = req.send().await.map_err(|e| RegistryError::Unavailable(format!("{e:#}")))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| RegistryError::Unavailable(format!("{e:#}")))?;
        if !status.is_success() {
            return Err(classify(status, &text, not_found));
        }
        serde_json::from_str(&text)
            .map_err(|e| RegistryError::Rejected(format!("the registry's answer is not JSON: {e}")))
    }

    /// Decodes a framed record into `T`: with `direct` when it was written with `reader` itself (a
    /// hand-written decoder of a hot schema, such as [`crate::Notification::decode_datum`]), else
    /// through [`RegistryClient::decode`] (resolving the writer schema) and `convert`.
    pub async fn decode_as<T>(
        &self,
        bytes: &[u8],
        reader: &'static Schema,
        direct: fn(&[u8]) -> Result<T, CodecError>,
        convert: fn(Value) -> Result<T, CodecError>,
    ) -> Result<T, DecodeError> {
        let (id, datum) = wire::split(bytes)?;
        if self.cached_reader(id, reader).await?.same {
            return direct(datum).map_err(DecodeError::Malformed);
        }
        convert(self.decode(bytes, reader).await?).map_err(DecodeError::Malformed)
    }

    /// Decodes a framed record, resolving the writer schema against `reader` when they differ.
    pub async fn decode(&self, bytes: &[u8], reader: &'static Schema) -> Result<Value, DecodeError> {
        let (id, mut datum) = wire::split(bytes)?;
        let cached = self.cached_reader(id, reader).await?;
        let value = cached
            .reader
            .read_value(&mut datum)
            .map_err(|e| DecodeError::Malformed(CodecError::Avro(e.to_string())))?;
        // apache-avro 0.22 reads a string cut off at the end of the input as null; validation
        // against the schema turns such a truncated record into the error it is.
        if !value.validate_with_names(cached.schema, cached.names.get_names()) {
            return Err(DecodeError::Malformed(CodecError::Avro(
                "datum is truncated or does not match its schema".into(),
            )));
        }
        if !datum.is_empty() {
            return Err(DecodeError::Malformed(CodecError::Avro(format!(
                "{} trailing bytes after the datum",
                datum.len()
            ))));
        }
        Ok(value)
    }

    /// The reader of writer schema `id` into `reader`, built once per pair.
    async fn cached_reader(&self, id: u32, reader: &'static Schema) -> Result<Arc<CachedReader>, DecodeError> {
        let key = (id, reader as *const Schema as usize);
        let cached = self.inner.readers.read().expect("lock").get(&key).cloned();
        let cached = match cached {
            Some(c) => c,
            None => {
                let writer = self.schema_by_id(id).await.map_err(|e| match e {
                    RegistryError::UnknownSchemaId(id) => DecodeError::UnknownSchemaId(id),
                    // Outages, credentials and quotas get fixed; the record stays good: its decode
                    // waits rather than dead-letter it (reads need no write credentials).
                    e @ (RegistryError::Unavailable(_)
                    | RegistryError::Unauthorized(..)
                    | RegistryError::Throttled(_)) => DecodeError::RegistryUnavailable(e.to_string()),
                    other => DecodeError::Incompatible { id, reason: other.to_string() },
                })?;
                let same = writer.canonical_form() == reader.canonical_form();
                let built = GenericDatumReader::builder(writer)
                    .maybe_reader_schema(if same { None } else { Some(reader) })
                    .build()
                    .map_err(|e| DecodeError::Incompatible { id, reason: e.to_string() })?;
                let names = ResolvedSchema::try_from(reader)
                    .map_err(|e| DecodeError::Incompatible { id, reason: e.to_string() })?;
                let c = Arc::new(CachedReader { reader: built, names, schema: reader, same });
                self.inner.readers.write().expect("lock").insert(key, c.clone());
                c
            }
        };
        Ok(cached)
    }
}

/// Encodes values of one schema registered under one id into framed records.
pub struct FramedEncoder {
    id: u32,
    writer: GenericDatumWriter<'static>,
}

impl FramedEncoder {
    pub fn new(id: u32, schema: &'static Schema) -> Result<Self, CodecError> {
        let writer = GenericDatumWriter::builder(schema).build().map_err(|e| CodecError::Avro(e.to_string()))?;
        Ok(FramedEncoder { id, writer })
    }

    pub fn schema_id(&self) -> u32 {
        self.id
    }

    /// Validates and encodes `value`, framed.
    pub fn encode(&self, value: Value) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(128);
        wire::frame_into(self.id, &[], &mut out);
        self.writer.write_value(&mut out, value).map_err(|e| CodecError::Avro(e.to_string()))?;
        Ok(out)
    }
}
