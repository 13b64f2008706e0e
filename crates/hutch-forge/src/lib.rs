//! Delivery of a sandbox's checked change to a GitHub-compatible forge, done on the host with the forge token
//! after the VM is gone: the base is fetched into a private bare work repository, the collected bundle and patch
//! go through hutch-repo's checks, sensitive paths are held back unless the trigger allows them, the result is
//! pushed to `hutch/<run_id>`, and a pull request and/or an issue comment is opened through the REST API.
//! The token never enters a VM, an argv, a URL or a log line; every error is redacted before it is returned.

#![cfg_attr(test, allow(clippy::unwrap_used))]

mod api;
mod body;
mod remote;
mod retry;
mod token;
mod work;

use std::path::PathBuf;

pub use hutch_repo::{Oid, Sensitive, SensitiveKind};
pub use retry::RetryPolicy;
pub use token::SecretToken;

/// One repository on a forge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeRepo {
    /// The REST API's root: `https://api.github.com`, `https://HOST/api/v3` on GitHub Enterprise, or the test
    /// net's forge (`https://localhost:PORT`).
    pub api_base: String,
    /// The smart-HTTP clone URL, `https://github.com/OWNER/NAME.git`. No user name or password in it.
    pub clone_url: String,
    pub owner: String,
    pub name: String,
    /// `Some(file)`: trust only the CA certificates in this PEM file, for the API and for git (a private forge,
    /// the test net); `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl ForgeRepo {
    /// `OWNER/NAME` on github.com.
    pub fn github(owner: &str, name: &str) -> ForgeRepo {
        ForgeRepo {
            api_base: "https://api.github.com".into(),
            clone_url: format!("https://github.com/{owner}/{name}.git"),
            owner: owner.into(),
            name: name.into(),
            ca_file: None,
        }
    }
}

/// What the host says about the run, for the pull request body or the comment. The diffstat and the sensitive
/// paths are not taken from here: [`deliver`] computes them from the checked change it pushes, so the text can
/// never disagree with the branch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// The command's exit code; `None` when it was killed (signal, timeout).
    pub exit_code: Option<i32>,
    /// Extra lines the host adds (the trigger's name, how to see the run's logs). Shown escaped.
    pub details: Vec<String>,
}

/// One delivery: where the VM's change goes and how it is announced.
#[derive(Debug, Clone)]
pub struct DeliveryPlan {
    /// The run's id; the branch is `hutch/<run_id>`. Letters, digits, `-`, `_` and `.` only.
    pub run_id: String,
    /// The ref the VM cloned: a branch name (the pull request's base) or a commit id.
    pub base_ref: String,
    /// The commit the VM started from.
    pub base_commit: Oid,
    /// The VM's HEAD as `hutch_repo::collect` reported it (`Collected::head`).
    pub vm_head: Option<Oid>,
    /// The directory `hutch_repo::collect` downloaded into, as it left it: `commits.bundle` and `changes.patch`
    /// when present. No `changes.patch` means the VM's working tree is the one it started with (collect always
    /// writes one, maybe empty, when HEAD moved).
    pub result_dir: PathBuf,
    pub open_pull_request: bool,
    /// Post the summary as a comment on this issue or pull request.
    pub comment_on_issue: Option<u64>,
    /// The trigger allows changes to sensitive paths (`.github/workflows/` and the rest of
    /// [`hutch_repo::SensitiveKind`]); otherwise they are held back and the text says so.
    pub allow_sensitive: bool,
    /// The pull request's title and the first line of the commit message hutch makes.
    pub title: String,
    pub summary: RunSummary,
}

/// What was delivered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    /// `hutch/<run_id>` when something was pushed; `None` when the VM changed nothing deliverable.
    pub branch: Option<String>,
    /// The branch's head commit.
    pub commit: Option<Oid>,
    /// The pull request's number and web URL.
    pub pull_request: Option<(u64, String)>,
    /// The comment's id.
    pub comment: Option<u64>,
    /// Sensitive paths left out of the branch (their base version was kept).
    pub held_back: Vec<Sensitive>,
    /// `git diff --stat` of what was pushed, base to branch head (escaped).
    pub diffstat: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    /// The repository or plan is unusable as given; nothing was sent.
    #[error("{0}")]
    Config(String),
    /// The VM's change failed hutch-repo's checks, or host-side git failed locally; nothing was sent.
    #[error(transparent)]
    Repo(#[from] hutch_repo::RepoError),
    /// The forge refused the token (401/403).
    #[error("the forge refused the token for {what} (HTTP {status}); check that the token is valid and may {what}")]
    Unauthorized { what: String, status: u16 },
    /// The forge refused the request for another reason (4xx). Not retried.
    #[error("the forge refused {what} (HTTP {status}): {message}")]
    Rejected { what: String, status: u16, message: String },
    /// 5xx or connection failures that outlasted the retries.
    #[error("{what} failed after {attempts} attempts: {message}")]
    Transient { what: String, attempts: u32, message: String },
    /// git failed talking to the forge in a way that is not a status code.
    #[error("git {action} failed: {message}")]
    Git { action: String, message: String },
    #[error("{what}: {message}")]
    Io { what: String, message: String },
}

impl ForgeError {
    /// Whether trying the whole delivery again later may succeed (the forge or the network was down).
    pub fn retryable(&self) -> bool {
        matches!(self, ForgeError::Transient { .. })
    }
}

/// Delivers `plan` to `repo` with `token`: fetch, check, push `hutch/<run_id>`, then the pull request and/or the
/// comment. Transient failures (5xx, connection errors) are retried per `retry`; 4xx never.
pub async fn deliver(repo: &ForgeRepo, token: &SecretToken, plan: &DeliveryPlan, retry: RetryPolicy) -> Result<Delivered, ForgeError> {
    work::deliver(repo, token, plan, retry).await
}
