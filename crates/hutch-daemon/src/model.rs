//! The API's wire types (JSON), shared by the daemon and the `hutch` client commands. Request types reject
//! unknown fields; every type documents itself into the OpenAPI document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Create a sandbox. Every field is optional; unknown fields are an error.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// The guest image: `default` (the only one today) or a prefix of its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Virtual CPUs (1 to the daemon's maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 64)]
    pub cpus: Option<u32>,
    /// Guest memory in MiB (128 to the daemon's maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 128, maximum = 65536)]
    pub memory_mib: Option<u32>,
    /// Seconds until the sandbox is destroyed (default and maximum set by the daemon); see `extend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 2592000)]
    pub ttl_secs: Option<u64>,
    /// Environment every command in the sandbox starts with.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Egress policy, enforced by the sandbox's gateway. Without one every connection is denied (and audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySpec>,
    /// Names of secrets in the daemon's store this sandbox may use through the gateway (never their values).
    #[serde(default)]
    pub secrets: Vec<String>,
    /// Headers the gateway adds from secrets, by secret name (each one of `secrets`): on the hosts given (which
    /// must lie within the secret's stored binding; the secret is then bound to those alone), to requests that
    /// carry no header of that name. The guest never holds the value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_headers: BTreeMap<String, SecretHeader>,
    /// Free-form labels for filtering listings.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// A setup script run as root before the sandbox is handed out, with egress of its own. Its result is kept as
    /// an environment snapshot: a later create by the same token with the same script, setup policy, image and
    /// size starts from it instead of running the script again (`start_mode` says which happened).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<SetupSpec>,
}

/// A header the gateway adds from a secret (see `CreateSandbox::secret_headers`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretHeader {
    /// `HOST` or `*.DOMAIN`, each within the secret's stored binding.
    pub hosts: Vec<String>,
    /// The header name, e.g. `Authorization`.
    pub header: String,
    /// The header value with `{value}` once where the secret goes, e.g. `Bearer {value}`.
    pub value: String,
}

/// The setup phase of a create.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SetupSpec {
    /// The script: run directly when it starts with `#!`, else by `sh`. At most 1 MiB.
    pub script: String,
    /// The setup phase's egress (the sandbox's own `policy` applies only after the setup). Without one the setup
    /// reaches nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySpec>,
    /// Run the setup and neither use nor store a cached environment.
    #[serde(default)]
    pub no_cache: bool,
}

/// The allow rules of an egress policy, in the same terms as a policy file's `[[allow]]` entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    #[serde(default)]
    pub allow: Vec<AllowSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AllowSpec {
    /// `example.com` or `*.example.com`.
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<u16>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Destroying,
    Destroyed,
    Failed,
    /// Saved to disk (RAM, devices, disk layer); no VM runs until it is resumed.
    Paused,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Destroying => "destroying",
            SandboxState::Destroyed => "destroyed",
            SandboxState::Failed => "failed",
            SandboxState::Paused => "paused",
        }
    }

    pub fn parse(s: &str) -> Option<SandboxState> {
        Some(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "destroying" => SandboxState::Destroying,
            "destroyed" => SandboxState::Destroyed,
            "failed" => SandboxState::Failed,
            "paused" => SandboxState::Paused,
            _ => return None,
        })
    }

    pub fn ended(self) -> bool {
        matches!(self, SandboxState::Destroyed | SandboxState::Failed)
    }
}

/// A sandbox as the API shows it. Times are milliseconds since the Unix epoch.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxInfo {
    pub id: String,
    pub state: SandboxState,
    /// The name of the token that owns it.
    pub owner: String,
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicySpec>,
    pub secrets: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub created_ms: i64,
    pub expires_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<i64>,
    /// Why it ended (deleted, TTL expired, the VM stopped, daemon restart...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// `snapshot restore`, `cold boot`, `warm pool`; with a setup: `environment cache (key ..., made ... ago)`,
    /// `setup, stored in the environment cache (key ...)` or `setup` (run, not stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_mode: Option<String>,
    /// Milliseconds from the create call to a guest ready for commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<SandboxInfo>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only sandboxes in this state (default: creating, running and destroying ones).
    #[serde(default)]
    pub state: Option<SandboxState>,
    /// Only sandboxes with all these labels: `key=value[,key=value...]`.
    #[serde(default)]
    #[param(pattern = "^[A-Za-z0-9._/-]{1,63}=[^,=\\x00-\\x1f\\x7f-\\x9f]{0,256}(,[A-Za-z0-9._/-]{1,63}=[^,=\\x00-\\x1f\\x7f-\\x9f]{0,256})*$")]
    pub label: Option<String>,
    /// Include ended sandboxes (destroyed, failed).
    #[serde(default)]
    pub all: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtendRequest {
    /// Seconds added to the current expiry (the expiry may be at most the daemon's maximum TTL from now).
    #[schema(minimum = 1, maximum = 2592000)]
    pub seconds: u64,
}

/// Run a command and wait for it: output is collected (up to the daemon's limit) and returned at once.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// Program and arguments (no shell: use `["sh", "-c", "..."]` for one).
    #[schema(min_items = 1, max_items = 4096)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory in the guest (default `/root`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Text given to the command on stdin (then end of file). Without it stdin is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Bytes (base64) given on stdin; exclusive with `stdin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Kill the command's process group after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 2592000)]
    pub timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// The exit code, or 128 + N when killed by signal N (shell convention).
    pub exit_code: i32,
    /// The signal that ended it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// `utf8` when both outputs are valid UTF-8 text, else `base64`.
    pub encoding: String,
    pub stdout: String,
    pub stderr: String,
    /// Output beyond the daemon's limit was dropped (use the streaming endpoints for large output).
    pub truncated: bool,
    pub duration_ms: u64,
}

/// The first message on an exec WebSocket, or the body of an SSE exec.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamExec {
    /// Program and arguments.
    #[schema(min_items = 1, max_items = 4096)]
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Run under a pseudo-terminal of this size (output then arrives as stdout only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// SSE only: text given on stdin, then end of file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TtySize {
    #[schema(minimum = 1, maximum = 1000)]
    pub rows: u16,
    #[schema(minimum = 1, maximum = 1000)]
    pub cols: u16,
}

/// Control messages on an exec WebSocket, client to daemon (JSON text frames; binary frames are stdin).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMsg {
    StdinEof,
    Signal { signal: i32 },
    Resize { rows: u16, cols: u16 },
}

/// Events, daemon to client: SSE events, or JSON text frames on a WebSocket (where stdout and stderr come as
/// binary frames instead: first byte 1 = stdout, 2 = stderr, then the bytes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Started { pid: u32 },
    /// SSE only: base64 bytes.
    Stdout { data: String },
    /// SSE only: base64 bytes.
    Stderr { data: String },
    Exit { exit_code: i32, #[serde(default, skip_serializing_if = "Option::is_none")] signal: Option<i32> },
    Error { message: String },
}

/// One Server-Sent Event as it appears on the wire: `event` names the ServerMsg type, `data` is the ServerMsg
/// as JSON.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SseEvent {
    #[schema(pattern = "^(started|stdout|stderr|exit|error)$")]
    pub event: String,
    pub data: String,
}

pub const WS_STDOUT: u8 = 1;
pub const WS_STDERR: u8 = 2;

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PathQuery {
    /// Absolute path in the guest.
    #[param(pattern = "^/", min_length = 1, max_length = 4096)]
    pub path: String,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// Absolute path in the guest; missing parent directories are created.
    #[param(pattern = "^/.", min_length = 2, max_length = 4096)]
    pub path: String,
    /// Permission bits in octal (default 644).
    #[serde(default)]
    #[param(pattern = "^[0-7]{1,4}$")]
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RemoveQuery {
    /// Absolute path in the guest (not `/`).
    #[param(pattern = "^/.", min_length = 2, max_length = 4096)]
    pub path: String,
    /// Remove a directory and everything in it.
    #[serde(default)]
    pub recursive: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MkdirRequest {
    /// Absolute path in the guest.
    #[schema(pattern = "^/", min_length = 1, max_length = 4096)]
    pub path: String,
    /// Create missing parents (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parents: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileStat {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits, octal text such as `644`.
    pub mode: String,
    pub mtime_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileStat>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EgressLog {
    /// Whether an egress gateway serves this sandbox (always, today: every sandbox's only way out).
    pub gateway_attached: bool,
    pub records: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub sandboxes_running: u64,
    pub version: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong and, where it helps, what to do.
    pub error: String,
}
