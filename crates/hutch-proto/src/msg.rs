//! The typed messages: what a stream asks for, and what flows on it afterwards.

use serde::{Deserialize, Serialize};

/// The first frame on every stream the host opens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Per-sandbox identity, sent once after the handshake (also after a snapshot restore).
    Init(Identity),
    /// Run a process; then [`ExecInput`] host->guest and [`ExecEvent`] guest->host.
    Exec(ExecRequest),
    /// Write a file: then [`FileChunk`]s host->guest, then one [`Reply`].
    PutFile(PutFile),
    /// Read a file: guest answers [`FileMeta`] (or an error [`Reply`]) then [`FileChunk`]s.
    GetFile { path: String },
    /// Liveness and round-trip measurement.
    Ping,
    /// Flush filesystems and power the VM off.
    PowerOff,
    /// Unpack a tar archive into a directory (created if missing): then [`FileChunk`]s host->guest, then one
    /// [`Reply`]. Saves a shell and `tar` process, each a fraction of a second in an emulated guest.
    PutArchive(PutArchive),
    /// Mount the workspace drive (a read-only filesystem image) with a writable overlay at `target`; one
    /// [`Reply`]. Nothing is copied: the guest reads the image through the block device.
    MountWorkspace(MountWorkspace),
    /// Forget this sandbox: the agent resets the trust store, answers, and exits; PID 1 starts a fresh agent
    /// (new address space, nothing of the old one's memory) that announces `Ready` as after a boot. The state an
    /// environment snapshot is taken in.
    Respawn,
    /// The host is about to save this VM to disk and will come back later with a new session: the agent answers,
    /// ends the session without killing the processes it started (their output is read and dropped until the
    /// next session), announces `Ready` on the channel and waits for a `Hello`.
    Suspend,
    /// Connect to a TCP port on the guest's loopback (a server the sandbox started): one [`Reply`], then the
    /// stream's remaining bytes are that connection's, both ways. The host sends nothing before the reply.
    Connect { port: u16 },
    /// Whether the workspace overlay's upper layer is empty, i.e. nothing in `/workspace` was written, created or
    /// deleted: one [`Reply`], `Ok` only when it is provably empty. Anything else (an entry there, no overlay, an
    /// error) means "look properly": the host then runs the full check. Answered inside the agent, so the common
    /// case of a command that only read costs no process in the guest.
    WorkspaceUntouched,
}

/// Sent by the host at the start of each session: everything that must differ between sandboxes made from the
/// same snapshot. Nothing here is secret; secrets never enter the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    pub sandbox_id: String,
    pub hostname: String,
    /// Host wall clock when sent: seconds and nanoseconds since the Unix epoch.
    pub time_secs: i64,
    pub time_nanos: u32,
    /// Fresh host randomness, mixed into the guest's pool and forcing a CRNG reseed.
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
    /// Environment every exec starts from (before its own `env`): secret placeholders and proxy settings
    /// included, never secret values.
    pub env: Vec<(String, String)>,
    /// The sandbox's gateway CA certificate (PEM), added to the guest's trust stores.
    pub ca_pem: Option<String>,
    /// Power the VM off when this host session ends (nobody will attach again).
    pub exit_on_disconnect: bool,
}

/// The first frame on every stream the guest opens (egress: everything leaves through the host's gateway).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum GuestRequest {
    /// An HTTP proxy connection from a program that honours `HTTP(S)_PROXY`; raw bytes follow.
    Proxy,
    /// A transparent TCP connection to `name:port` (the name the guest resolver handed out an address for);
    /// raw bytes follow.
    Tunnel { name: String, port: u16 },
    /// May the guest resolve `name`? Answered with one [`DnsReply`].
    Dns { name: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DnsReply {
    Allowed,
    Denied,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Added to the identity environment; later entries win.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    /// When false the process gets /dev/null as stdin and no [`ExecInput::Stdin`] is expected.
    pub stdin: bool,
    /// Run on a new pseudo-terminal of this size (stdin, stdout and stderr are the terminal; output arrives as
    /// [`ExecEvent::Stdout`]).
    pub tty: Option<TtySize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ExecInput {
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    StdinEof,
    /// Deliver a signal to the process group.
    Signal(i32),
    /// Resize the pseudo-terminal (ignored without one).
    Resize(TtySize),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ExecEvent {
    Started { pid: u32 },
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    Exited(ExitStatus),
    /// The process could not be started (no such program, bad cwd, ...).
    SpawnFailed { message: String, not_found: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + signal number.
    pub fn as_shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutFile {
    pub path: String,
    pub mode: u32,
    pub size: u64,
    /// Create missing parent directories.
    pub parents: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutArchive {
    pub dir: String,
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountWorkspace {
    /// Where the merged view goes (`/workspace`).
    pub target: String,
    /// The serial number of the drive to mount.
    pub serial: String,
    /// The serial number of the drive holding the image's extra device (erofs multi-device: the full image a
    /// delta image's unchanged data lives in). `None`: a self-contained image.
    #[serde(default)]
    pub base_serial: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileMeta {
    pub size: u64,
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FileChunk {
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    End,
    /// This many zero bytes, not sent: a hole in a sparse file (guest to host only). The host keeps it a hole.
    Hole(u64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Ok,
    Err(String),
}

impl Reply {
    pub fn from_result<E: std::fmt::Display>(r: Result<(), E>) -> Self {
        match r {
            Ok(()) => Reply::Ok,
            Err(e) => Reply::Err(e.to_string()),
        }
    }
}
