//! VMM backends behind one narrow trait: boot, restore from a snapshot, snapshot, connect the agent channel, kill.
//! QEMU's `microvm` implements it today; Firecracker (`/snapshot/create`, `/snapshot/load`, vsock on a unix
//! socket) fits the same shape.

pub mod host;
pub mod qemu;
mod qmp;

use std::path::{Path, PathBuf};

pub use host::{Accel, HostCaps, KvmKind};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0} not found: install it with `apt-get install qemu-system-x86` (or run `hutch doctor`)")]
    MissingBinary(String),
    #[error("cannot start the VMM")]
    Spawn(#[source] std::io::Error),
    #[error("{what}")]
    Io { what: String, #[source] source: std::io::Error },
    #[error("the VMM exited during start-up: {0}")]
    EarlyExit(String),
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("accelerator {requested} is not usable here: {reason}")]
    Accel { requested: Accel, reason: String },
    #[error("snapshot {what}: {reason}")]
    Snapshot { what: &'static str, reason: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
    let what = what.into();
    move |source| VmmError::Io { what, source }
}

/// Where guest RAM lives. A file lets a snapshot skip copying RAM (it is the file) and lets a restore map the
/// snapshot's RAM copy-on-write.
#[derive(Debug, Clone)]
pub enum Memory {
    Anonymous,
    /// `shared`: writes go to the file (to make a snapshot). Not shared: a private copy-on-write mapping (restore).
    File { path: PathBuf, shared: bool },
    /// Anonymous RAM in a memory backend named like the file one: a VM resumed from a full save of a VM that
    /// had a file backend (RAM blocks are matched by name when the state is loaded).
    Ram,
}

/// Everything needed to start one VM. Built and checked by the caller; backends only translate it.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// The VM's own writable disk (a qcow2 overlay over the shared read-only root filesystem).
    pub disk: PathBuf,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: Accel,
    pub memory: Memory,
    /// Per-VM directory for logs; owned and removed by the caller.
    pub dir: PathBuf,
    /// Per-VM directory for unix sockets (the agent channel, QMP, migration): `dir` itself, or one under the
    /// user's runtime directory; owned and removed by the caller.
    pub sock_dir: PathBuf,
    /// What the workspace drive slot holds: a read-only filesystem image, or (`None`) an empty placeholder. The
    /// slot exists in every VM, so a snapshot made without a workspace restores with one.
    pub workspace: Option<PathBuf>,
    /// What the workspace base slot (right after the workspace slot, in every VM) holds: the full image a delta
    /// image in the workspace slot takes its unchanged data from (erofs extra device), or (`None`) an empty
    /// placeholder.
    pub workspace_base: Option<PathBuf>,
}

/// The serial number of the workspace drive, by which the guest finds it.
pub const WORKSPACE_SERIAL: &str = hutch_proto::WORKSPACE_SERIAL;
/// The serial number of the workspace base drive.
pub const WORKSPACE_BASE_SERIAL: &str = hutch_proto::WORKSPACE_BASE_SERIAL;
/// Bumped whenever the VM's devices (which, in which order) change: a snapshot's device state only loads into a
/// VM with the very devices it was saved from, so everything that restores saved state is keyed on this.
pub const DEVICE_LAYOUT: u32 = 2;
/// The capacity of the empty placeholder in the workspace slot. A guest restored from a snapshot keeps the
/// capacity it read at boot, so the placeholder is larger than any workspace image: the guest's filesystem
/// reads only the blocks its superblock names, and QEMU refuses reads past the real image's end.
pub const WORKSPACE_PLACEHOLDER_BYTES: u64 = 1 << 40;

/// The files of a snapshot besides the disk layer: device state (migration stream) and guest RAM.
#[derive(Debug, Clone)]
pub struct SnapshotFiles {
    pub state: PathBuf,
    pub memory: PathBuf,
}

/// A VMM implementation.
pub trait Backend: Send + Sync {
    type Vm: Vm;
    /// Boots `cfg` from its kernel.
    fn boot(&self, cfg: &VmConfig) -> impl std::future::Future<Output = Result<Self::Vm, VmmError>> + Send;
    /// Starts `cfg` from `snap` (the config's memory must be the snapshot's RAM file, mapped privately).
    fn restore(&self, cfg: &VmConfig, snap: &SnapshotFiles) -> impl std::future::Future<Output = Result<Self::Vm, VmmError>> + Send;
}

/// A running VM.
pub trait Vm: Send {
    /// Connects to the guest agent's channel (a byte stream). May be called once per session.
    fn connect_agent(&self) -> impl std::future::Future<Output = Result<tokio::net::UnixStream, VmmError>> + Send;
    /// Pauses the guest and saves its device state to `snap.state`; RAM is already in `snap.memory` because the
    /// VM was booted with a shared file. The VM stays paused.
    fn snapshot(&mut self, snap: &SnapshotFiles) -> impl std::future::Future<Output = Result<(), VmmError>> + Send;
    /// Stops the guest's vCPUs (it keeps its memory and devices); `resume` continues it.
    fn pause(&mut self) -> impl std::future::Future<Output = Result<(), VmmError>> + Send;
    fn resume(&mut self) -> impl std::future::Future<Output = Result<(), VmmError>> + Send;
    /// Waits until the VMM process ends.
    fn wait(&mut self) -> impl std::future::Future<Output = VmExit> + Send;
    /// Kills the VMM process and waits for it.
    fn kill(&mut self) -> impl std::future::Future<Output = ()> + Send;
    /// The VMM's process id (for leftover reaping).
    fn pid(&self) -> Option<u32>;
    /// The guest console log.
    fn console_log(&self) -> &Path;
}

#[derive(Debug, Clone)]
pub struct VmExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}
