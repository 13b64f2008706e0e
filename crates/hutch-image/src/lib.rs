//! Builds and caches the guest images Hutch micro-VMs boot: Debian's cloud kernel, an
//! initramfs that mounts the root disk and hands PID 1 to the Hutch agent, and a Debian
//! ext4 root filesystem, each cached under a key derived from its inputs.
//!
//! ```no_run
//! use hutch_image::{Cache, ImageSpec, SpinnerProgress};
//! # fn main() -> Result<(), hutch_image::ImageError> {
//! let cache = Cache::from_env()?;
//! let image = cache.ensure(&ImageSpec::default_for("/usr/lib/hutch/hutch-agent"), &SpinnerProgress::new())?;
//! println!("{} {} {}", image.kernel.display(), image.initrd.display(), image.rootfs.display());
//! # Ok(()) }
//! ```
//!
//! Booting an image: `-kernel image.kernel -initrd image.initrd`, the root disk as the first
//! virtio-blk device (`/dev/vda`) backed by a per-sandbox qcow2 overlay of `image.rootfs`
//! (`qemu-img create -f qcow2 -F raw -b <rootfs> <overlay>`), kernel command line
//! `console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=<host_tsc_khz()> no_timer_check`
//! (with QEMU's `-no-reboot`). See [`initramfs`](crate::initramfs) for what `/init` does.

mod cache;
mod elf;
mod error;
mod fsutil;
pub mod initramfs;
mod kernel;
mod key;
mod manifest;
mod modules;
mod progress;
mod prune;
mod rootfs;
mod rootless;
mod spec;
mod tools;
mod tsc;

pub use cache::{Cache, Image, SYSTEM_CACHE};
pub use prune::InUse;
pub use error::ImageError;
pub use kernel::KernelInfo;
pub use key::{ImageInputs, InitrdInputs, KernelInputs, NpmInputs, RootfsInputs, RECIPE_VERSION};
pub use manifest::{InitrdEntry, KernelEntry, Manifest, RootfsEntry, MANIFEST_FORMAT};
pub use modules::{ModuleFile, ModulePlan, WANTED_MODULES};
pub use rootless::{helper_main as rootless_helper_main, rootless_build_blockers, Missing as RootlessBlocker, HELPER_ARG as ROOTLESS_HELPER_ARG};
pub use progress::{Progress, SilentProgress, SpinnerProgress};
pub use spec::{ImageSpec, AGENT_NPM_PACKAGES, BASE_PACKAGES, DEFAULT_SUITE, NODE_PACKAGES};
pub use tsc::host_tsc_khz;
