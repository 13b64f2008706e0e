//! Repo in, reviewed change out. The user's repository goes into a sandbox as a clean clone (history up to
//! HEAD plus a snapshot of the working tree; no hooks, config, remotes or credentials), and what the VM did
//! comes back as a checked ref (`refs/hutch/<id>`) and a checked patch that `apply` puts into the working tree
//! only on request. Host-side git never runs hooks, filters or config-defined programs while doing so.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod apply;
pub mod credentials;
pub mod git;
pub mod guest;
pub mod host;
pub mod import;
pub mod index;
pub mod patch;
pub mod path;
pub mod project;
pub mod remote;
pub mod sensitive;
pub mod store;

#[cfg(test)]
mod roundtrip_tests;

pub use apply::{apply, Applied};
pub use credentials::{CredentialFilter, CredentialKind, CredentialRules, PathPattern};
pub use git::Oid;
pub use guest::{collect, setup_workspace, Collected, Workspace};
pub use host::{HostRepo, Snapshot};
pub use import::{check, import, Checked, Start};
pub use patch::Sensitive;
pub use project::{ProjectConfig, Trust, TrustStore};
pub use sensitive::SensitiveKind;
pub use store::{ResultMeta, Stored};

/// Size limits on what the VM may send back.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The patch of uncommitted changes.
    pub max_patch: u64,
    /// The bundle of new commits.
    pub max_bundle: u64,
    /// New commits in one sandbox.
    pub max_commits: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_patch: 64 << 20, max_bundle: 512 << 20, max_commits: 10_000 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("cannot run git (install it with `apt-get install git`)")]
    GitMissing(#[source] std::io::Error),
    // Text that can quote VM-chosen names is escaped where it is shown (`hutch_text`).
    #[error("git {action} failed: {}", hutch_text::escape_lines(stderr.as_bytes()))]
    Git { action: String, stderr: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// VM output that fails a check. Nothing from it reached the user's repository.
    #[error("refused the VM's changes: {}; the host repository was not changed", hutch_text::escape_lines(.0.as_bytes()))]
    Refused(String),
    #[error("in the sandbox: {}", hutch_text::escape_lines(.0.as_bytes()))]
    Guest(String),
    #[error(transparent)]
    Sandbox(#[from] hutch_sandbox::SandboxError),
    #[error("{0}")]
    Apply(String),
    #[error(
        "sandbox {id} changed paths that can run code on this host later: {}; review them with `hutch diff {id}` and apply with `hutch apply --allow-sensitive {id}`; nothing was changed",
        list.iter().map(|s| format!("{} ({})", s.path, s.kind)).collect::<Vec<_>>().join(", ")
    )]
    Sensitive { id: String, list: Vec<Sensitive> },
    #[error("{0}")]
    Project(String),
    #[error("{0}")]
    NotFound(String),
}

/// A byte count for messages.
pub(crate) fn size(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RepoError {
    let what = what.into();
    move |source| RepoError::Io { what, source }
}
