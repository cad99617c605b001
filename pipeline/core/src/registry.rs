//! Schema-registry client used by every stage: talks to any Confluent-compatible registry by URL
//! (the embedded one or an external one) and caches schemas by id and readers per writer schema,
//! because building a resolved schema is the dominant cost of Avro decoding.

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::ResolvedSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use schema_registry_converter::async_impl::schema_registry::{
    get_schema_by_id, get_schema_by_subject, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{SchemaType, SubjectNameStrategy, SuppliedSchema};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::error::{CodecError, RegistryError};
use crate::wire;

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
    settings: SrSettings,
    by_id: RwLock<HashMap<u32, &'static Schema>>,
    /// Readers keyed by (writer id, reader schema address).
    readers: RwLock<HashMap<(u32, usize), Arc<CachedReader>>>,
}

fn classify(e: SRCError, not_found: impl FnOnce() -> RegistryError) -> RegistryError {
    let text = e.to_string();
    if text.contains("status 404") {
        not_found()
    } else if text.contains("status 4") {
        RegistryError::Rejected(e.cause.clone().unwrap_or(e.error))
    } else {
        RegistryError::Unavailable(text)
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
        let mut builder = SrSettings::new_builder(url.trim_end_matches('/').to_string());
        builder.set_timeout(Duration::from_secs(10));
        if let Some((user, password)) = &endpoint.basic_auth {
            builder.set_basic_authorization(user, Some(password));
        }
        if let Some(token) = &endpoint.bearer_token {
            builder.set_token_authorization(token);
        }
        let mut http = reqwest::Client::builder();
        if let Some(pem) = &endpoint.ca_pem {
            let ca = reqwest::Certificate::from_pem(pem)
                .map_err(|e| RegistryError::Config(format!("schema registry CA certificate: {e}")))?;
            http = http.add_root_certificate(ca);
        }
        let settings = builder.build_with(http).map_err(|e| RegistryError::Config(e.to_string()))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner {
                url: url.to_string(),
                settings,
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
        let registered = get_schema_by_id(id, &self.inner.settings)
            .await
            .map_err(|e| classify(e, || RegistryError::UnknownSchemaId(id)))?;
        let schema = Schema::parse_str(&registered.schema)
            .map_err(|e| RegistryError::InvalidSchema(format!("id {id}"), e.to_string()))?;
        let mut map = self.inner.by_id.write().expect("lock");
        let leaked: &'static Schema = map.get(&id).copied().unwrap_or_else(|| Box::leak(Box::new(schema)));
        map.insert(id, leaked);
        Ok(leaked)
    }

    /// Registers `schema` under `subject` (idempotent) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        let registered = post_schema(&self.inner.settings, subject.to_string(), supplied)
            .await
            .map_err(|e| classify(e, || RegistryError::UnknownSubject(subject.to_string())))?;
        Ok(registered.id)
    }

    /// The latest schema of `subject` and its id.
    pub async fn latest(&self, subject: &str) -> Result<(u32, &'static Schema), RegistryError> {
        let topic = subject.strip_suffix("-value").unwrap_or(subject).to_string();
        let strategy = SubjectNameStrategy::TopicNameStrategy(topic, false);
        let registered = get_schema_by_subject(&self.inner.settings, &strategy)
            .await
            .map_err(|e| classify(e, || RegistryError::UnknownSubject(subject.to_string())))?;
        let id = registered.id;
        Ok((id, self.schema_by_id(id).await?))
    }

    /// Decodes a framed record, resolving the writer schema against `reader` when they differ.
    pub async fn decode(&self, bytes: &[u8], reader: &'static Schema) -> Result<Value, DecodeError> {
        let (id, mut datum) = wire::split(bytes)?;
        let key = (id, reader as *const Schema as usize);
        let cached = self.inner.readers.read().expect("lock").get(&key).cloned();
        let cached = match cached {
            Some(c) => c,
            None => {
                let writer = self.schema_by_id(id).await.map_err(|e| match e {
                    RegistryError::UnknownSchemaId(id) => DecodeError::UnknownSchemaId(id),
                    RegistryError::Unavailable(m) => DecodeError::RegistryUnavailable(m),
                    other => DecodeError::Incompatible { id, reason: other.to_string() },
                })?;
                let same = writer.canonical_form() == reader.canonical_form();
                let built = GenericDatumReader::builder(writer)
                    .maybe_reader_schema(if same { None } else { Some(reader) })
                    .build()
                    .map_err(|e| DecodeError::Incompatible { id, reason: e.to_string() })?;
                let names = ResolvedSchema::try_from(reader)
                    .map_err(|e| DecodeError::Incompatible { id, reason: e.to_string() })?;
                let c = Arc::new(CachedReader { reader: built, names, schema: reader });
                self.inner.readers.write().expect("lock").insert(key, c.clone());
                c
            }
        };
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
