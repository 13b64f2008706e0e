//! The record of a built image (`images/<key>/manifest.json`) and of each component.

use serde::{Deserialize, Serialize};

use crate::key::{ImageInputs, InitrdInputs, RootfsInputs};
use crate::modules::ModulePlan;

/// Version of the manifest's JSON layout.
pub const MANIFEST_FORMAT: u32 = 1;

/// Everything known about a cached image. Paths are relative to the cache root, so a cache
/// directory can be moved as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// SHA-256 of `inputs` (see [`crate::key`]).
    pub key: String,
    /// Seconds since the Unix epoch.
    pub created_unix: u64,
    pub kernel: KernelEntry,
    pub initrd: InitrdEntry,
    pub rootfs: RootfsEntry,
    pub inputs: ImageInputs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntry {
    pub key: String,
    /// Debian package, e.g. "linux-image-6.1.0-56-cloud-amd64".
    pub package: String,
    /// Debian version, e.g. "6.1.192-2".
    pub version: String,
    /// What `uname -r` says in the guest, e.g. "6.1.0-56-cloud-amd64".
    pub release: String,
    /// The bzImage (`-kernel`).
    pub path: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitrdEntry {
    pub key: String,
    pub path: String,
    pub bytes: u64,
    pub inputs: InitrdInputs,
    pub modules: ModulePlan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsEntry {
    pub key: String,
    /// Raw ext4, read-only: attach it through a copy-on-write overlay, never directly.
    pub path: String,
    /// Disk size the guest sees.
    pub image_bytes: u64,
    /// Bytes the sparse file really occupies on the host.
    pub allocated_bytes: u64,
    /// Bytes of file content in the tree.
    pub content_bytes: u64,
    pub inputs: RootfsInputs,
}

/// What a built initramfs component holds (`initrd.json` in its directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InitrdInfo {
    pub inputs: InitrdInputs,
    pub modules: ModulePlan,
}
