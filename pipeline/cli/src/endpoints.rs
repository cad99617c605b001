//! `<data-dir>/endpoints.json`: where a running `tidings up` listens, so `produce`, `demo` and
//! `inbox` find the embedded broker, registry, store and gateway without flags.

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

/// The database URL to use: the flag, else the one `up` wrote, else the embedded default.
pub fn database_url(infra: &crate::Infra) -> String {
    infra
        .database_url
        .clone()
        .or_else(|| Endpoints::read(&infra.data_dir).map(|e| e.database_url))
        .unwrap_or_else(|| format!("sqlite://{}/tidings.db", infra.data_dir.display()))
}
