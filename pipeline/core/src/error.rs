//! Errors of the shared plumbing, each saying whether retrying can help.

/// Decoding or encoding a record failed; retrying the same bytes cannot help.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("record is too short for the Confluent wire format ({0} bytes, need at least 5)")]
    TooShort(usize),
    #[error("wrong magic byte {0:#04x} (the Confluent wire format starts with 0x00)")]
    WrongMagic(u8),
    #[error("Avro: {0}")]
    Avro(String),
    #[error("{path}: {message}")]
    Field { path: String, message: String },
}

/// Errors talking to the schema registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("schema id {0} is not known to the schema registry")]
    UnknownSchemaId(u32),
    #[error("subject {0} has no registered schema")]
    UnknownSubject(String),
    #[error("schema registry rejected the schema: {0}")]
    Rejected(String),
    #[error("schema registry unreachable or failing: {0}")]
    Unavailable(String),
    /// 401/403: the credentials are missing, wrong or lack a permission: a configuration error,
    /// not retried (a restart sends the same credentials).
    #[error("schema registry refused our credentials (HTTP {0}): {1}")]
    Unauthorized(u16, String),
    /// Another 4xx (not 404, 408 or 429): the request itself is wrong, e.g. a schema incompatible
    /// with the subject's versions (409); not retried.
    #[error("schema registry refused the request (HTTP {0}): {1}")]
    Refused(u16, String),
    /// 429: over the registry's request quota (retried).
    #[error("schema registry throttled us (HTTP 429): {0}")]
    Throttled(String),
    #[error("schema {0} is not valid Avro: {1}")]
    InvalidSchema(String, String),
    /// The client settings (URL, credentials, CA) are unusable; fix the configuration.
    #[error("schema registry client settings: {0}")]
    Config(String),
}

impl RegistryError {
    /// Whether the same request may succeed later: an outage (5xx, 408, a timeout, a refused
    /// connection) or a quota (429), never a refusal.
    pub fn is_retriable(&self) -> bool {
        matches!(self, RegistryError::Unavailable(_) | RegistryError::Throttled(_))
    }

    /// Whether only a change of settings can fix it: unusable client settings, refused
    /// credentials (401/403) or another refused request (4xx).
    pub fn is_configuration(&self) -> bool {
        matches!(self, RegistryError::Config(_) | RegistryError::Unauthorized(..) | RegistryError::Refused(..))
    }
}
