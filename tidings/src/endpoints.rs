//! `<data-dir>/endpoints.json`: where a running `tidings up` listens, so `produce`, `demo` and
//! `inbox` find the embedded broker, registry, store and gateway without flags; and
//! `<data-dir>/registry-write-token`, the embedded registry's generated write token (mode 0600).

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoints {
    pub brokers: String,
    pub schema_registry_url: String,
    pub database_url: String,
    pub http: String,
    /// HTTP ingest for services; empty when it is off.
    #[serde(default)]
    pub ingest: String,
    /// The dev service token, in dev mode only.
    #[serde(default)]
    pub ingest_token: Option<String>,
    pub topic_prefix: String,
}

impl Endpoints {
    pub fn path(data_dir: &Path) -> std::path::PathBuf {
        data_dir.join("endpoints.json")
    }

    pub fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(data_dir)?;
        std::fs::write(Self::path(data_dir), serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    pub fn read(data_dir: &Path) -> Option<Self> {
        let text = std::fs::read(Self::path(data_dir)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// File of the write token `up` generated for its embedded registry (`curl -H "Authorization:
/// Bearer $(cat …)"` for an operator's writes).
fn registry_token_path(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("registry-write-token")
}

/// The embedded registry's write token: the operator's (a token left by an earlier run is
/// removed: it is no longer valid), else a new random one, written for the CLI and the operator
/// to `<data-dir>/registry-write-token`, readable by this user only.
pub fn registry_write_token(given: Option<String>, data_dir: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = registry_token_path(data_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(anyhow::anyhow!("removing the old {}: {e}", path.display()));
        }
        _ => {}
    }
    if let Some(token) = given {
        return Ok(token);
    }
    // Two v4 UUIDs: 244 bits from the OS's random source, 64 hex characters.
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    // Created afresh with mode 0600: never a moment with the token in a file others may read.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    std::io::Write::write_all(&mut file, token.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    tracing::info!("Embedded schema registry write token written to {} (mode 0600).", path.display());
    Ok(token)
}

/// The database URL to use: the flag, else the one `up` wrote, else the embedded default.
pub fn database_url(infra: &crate::Infra) -> String {
    infra
        .database_url
        .clone()
        .or_else(|| Endpoints::read(&infra.data_dir).map(|e| e.database_url))
        .unwrap_or_else(|| format!("sqlite://{}/tidings.db", infra.data_dir.display()))
}
