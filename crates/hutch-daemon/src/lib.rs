//! `hutch serve`: sandboxes as a service. An axum [`api::router`] over a [`manager::Manager`] (sandbox lifecycle,
//! caps, TTLs, reconcile), a SQLite [`store::Store`], hashed API [`auth`] tokens, an encrypted [`secrets`] store,
//! Prometheus [`metrics`] and a [`server`] that listens with or without TLS.

pub mod api;
pub mod auth;
pub mod e2b;
pub mod egress_spec;
pub mod files;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod peer;
pub mod repo;
pub mod secrets;
pub mod server;
pub mod store;
mod stream;
pub mod terminal;
pub mod triggers;

use std::path::{Path, PathBuf};

pub use manager::{Limits, Manager};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("database: {what}")]
    Db { what: &'static str, #[source] source: rusqlite::Error },
    #[error("the database was written by a newer hutch (schema {found}, this one knows up to {known}); upgrade hutch")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("{what}")]
    Io { what: String, #[source] source: std::io::Error },
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Sandbox(#[from] hutch_sandbox::SandboxError),
}

/// Where the daemon keeps its state: `state.db` (the database) and `secrets.key` (the key that seals secret
/// values, deliberately a separate file so a copy of the database alone reveals nothing).
#[derive(Debug, Clone)]
pub struct DataDir {
    pub root: PathBuf,
}

impl DataDir {
    /// `$HUTCH_DATA_DIR`, else `<image cache root>/daemon` (the cache root is `/var/lib/hutch` for root).
    pub fn from_env_or(cache_root: &Path) -> DataDir {
        match std::env::var_os("HUTCH_DATA_DIR").filter(|v| !v.is_empty()) {
            Some(d) => DataDir { root: PathBuf::from(d) },
            None => DataDir { root: cache_root.join("daemon") },
        }
    }

    pub fn db(&self) -> PathBuf {
        self.root.join("state.db")
    }

    pub fn secret_key(&self) -> PathBuf {
        self.root.join("secrets.key")
    }

    pub fn create(&self) -> Result<(), DaemonError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&self.root).map_err(|source| DaemonError::Io { what: format!("create {}", self.root.display()), source })?;
        // Token hashes and sealed secrets are no one else's business.
        std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
            .map_err(|source| DaemonError::Io { what: format!("chmod {}", self.root.display()), source })?;
        Ok(())
    }

    pub fn open_store(&self) -> Result<store::Store, DaemonError> {
        self.create()?;
        store::Store::open(&self.db())
    }
}
