//! Pausing a sandbox to disk and resuming it later: the agent suspends its session (its processes keep
//! running), QEMU saves the whole machine (devices and every RAM page) into one stream, and the VM's disk layer
//! moves beside it. A resume starts a new QEMU from that stream over the same disk layer, then gives the guest a
//! fresh session, identity (clock, entropy) and gateway, as after a snapshot restore. Files and processes are
//! the same ones; connections that were open (egress, exec streams) are gone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hutch_vmm::{Memory, Vm};
use serde::{Deserialize, Serialize};

use crate::{Attached, Host, Sandbox, SandboxConfig, SandboxError, StartMode};

/// The saved machine state (QEMU's migration stream, RAM included).
pub const STATE_FILE: &str = "state";
/// The VM's qcow2 disk layer (its backing file is the image's, unchanged).
pub const DISK_FILE: &str = "disk.qcow2";
pub const META_FILE: &str = "meta.json";
const FORMAT: u32 = 1;
/// How long the agent may take to end its session and announce itself again.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(20);

/// What a pause directory holds, checked before a resume touches anything.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PauseMeta {
    pub format: u32,
    /// The VM's device layout ([`hutch_vmm::DEVICE_LAYOUT`]) the saved device state belongs to (0: from before
    /// it was recorded).
    #[serde(default)]
    pub layout: u32,
    pub image_key: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: String,
    pub mem_backend: bool,
    pub state_bytes: u64,
    pub disk_bytes: u64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::HostIo { what, source }
}

fn pause_err(msg: impl Into<String>) -> SandboxError {
    SandboxError::BadInput(msg.into())
}

/// Renames `from` to `to`, copying across file systems.
fn move_file(from: &Path, to: &Path) -> Result<(), SandboxError> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            std::fs::copy(from, to).map_err(io(format!("copy {} to {}", from.display(), to.display())))?;
            std::fs::remove_file(from).map_err(io(format!("remove {}", from.display())))
        }
        Err(e) => Err(io(format!("move {} to {}", from.display(), to.display()))(e)),
    }
}

/// Reads `dir/meta.json`.
pub fn read_meta(dir: &Path) -> Result<PauseMeta, SandboxError> {
    let path = dir.join(META_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(format!("read {}", path.display())))?;
    let meta: PauseMeta = serde_json::from_str(&text).map_err(|e| pause_err(format!("{}: {e}", path.display())))?;
    if meta.format != FORMAT {
        return Err(pause_err(format!("{} is format {}, this hutch reads {FORMAT}", path.display(), meta.format)));
    }
    if meta.layout != hutch_vmm::DEVICE_LAYOUT {
        return Err(pause_err(format!(
            "{} was saved from a VM with other devices (layout {}, this hutch has {})",
            path.display(),
            meta.layout,
            hutch_vmm::DEVICE_LAYOUT
        )));
    }
    Ok(meta)
}

impl Sandbox {
    /// Saves the sandbox (of `cpus` x `memory_mib`, on `host`'s image) into `dest` (a new, empty directory the
    /// caller owns) and ends its VM. On error the VM is gone as well (the sandbox cannot be handed back
    /// half-suspended); `dest` may hold partial files.
    pub async fn pause_to(mut self, host: &Host, cpus: u32, memory_mib: u32, dest: &Path) -> Result<PauseMeta, SandboxError> {
        let r = self.pause_inner(host, cpus, memory_mib, dest).await;
        self.destroy().await;
        r
    }

    async fn pause_inner(&mut self, host: &Host, cpus: u32, memory_mib: u32, dest: &Path) -> Result<PauseMeta, SandboxError> {
        let t0 = Instant::now();
        let raw = self.raw.take().ok_or_else(|| pause_err("no second handle on the agent channel"))?;
        self.client.suspend().await?;
        // From here on the channel carries the agent's next `Ready`; the old session must not read it.
        let Some(stream) = self.await_next_ready(raw, SUSPEND_TIMEOUT).await? else {
            return Err(pause_err(format!("the agent did not announce itself within {SUSPEND_TIMEOUT:?} after suspending")));
        };
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "pause: agent suspended");
        let state = dest.join(STATE_FILE);
        let state_bytes = self.vm.save_full(&state).await?;
        self.vm.kill().await;
        drop(stream);
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, state_bytes, "pause: state saved");
        let disk = dest.join(DISK_FILE);
        move_file(&self.dir.path().join(DISK_FILE), &disk)?;
        // The VMM may have run as another user: the saved files belong to the host process alone.
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        for f in [&disk, &state] {
            nix::unistd::chown(f.as_path(), Some(uid), Some(gid)).map_err(|e| SandboxError::HostIo { what: format!("chown {}", f.display()), source: e.into() })?;
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).map_err(io(format!("chmod {}", f.display())))?;
        }
        let disk_bytes = std::fs::metadata(&disk).map_err(io("stat the disk layer"))?.len();
        let meta = PauseMeta {
            format: FORMAT,
            layout: hutch_vmm::DEVICE_LAYOUT,
            image_key: host.image.key.clone(),
            cpus,
            memory_mib,
            accel: self.start.accel.to_string(),
            mem_backend: self.mem_backend,
            state_bytes,
            disk_bytes,
        };
        let text = serde_json::to_string_pretty(&meta).map_err(|e| pause_err(e.to_string()))?;
        std::fs::write(dest.join(META_FILE), text).map_err(io("write meta.json"))?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "pause: done");
        Ok(meta)
    }

    /// Resumes the sandbox saved in `src` (by [`Sandbox::pause_to`], with `meta` written by the caller) under
    /// `cfg`, with a fresh session, identity and gateway. The disk layer moves into the new VM's directory, so
    /// `src` is spent once QEMU starts; a resume refused before that (wrong image, size or accelerator) leaves it
    /// untouched.
    pub async fn resume_from(host: &Host, cfg: &SandboxConfig, src: &Path) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        let meta = read_meta(src)?;
        let accel = host.caps.choose(cfg.accel)?;
        if meta.image_key != host.image.key {
            return Err(pause_err(format!(
                "it was paused on image {} and this daemon runs {}; resume it with that image",
                short(&meta.image_key),
                short(&host.image.key)
            )));
        }
        if (meta.cpus, meta.memory_mib) != (cfg.cpus, cfg.memory_mib) || meta.accel != accel.to_string() {
            return Err(pause_err(format!(
                "it was paused as {}x{} MiB under {} and would resume as {}x{} MiB under {accel}",
                meta.cpus, meta.memory_mib, meta.accel, cfg.cpus, cfg.memory_mib
            )));
        }
        let state: PathBuf = src.join(STATE_FILE);
        if !state.is_file() || !src.join(DISK_FILE).is_file() {
            return Err(pause_err(format!("{} lacks its saved state or disk layer", src.display())));
        }
        let id = crate::new_id();
        let dir = host.sandbox_dir(&id)?;
        let disk = dir.path().join(DISK_FILE);
        move_file(&src.join(DISK_FILE), &disk)?;
        let memory = if meta.mem_backend { Memory::Ram } else { Memory::Anonymous };
        let vmcfg = Sandbox::vm_config(host, cfg, accel, &dir, disk, memory);
        let vm = host.qemu.restore_full(&vmcfg, &state).await?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "resume: state loaded");
        let attached = Attached::connect(id, dir, vm, accel, StartMode::Restored, Duration::from_secs(30)).await?;
        let mut sb = attached.finish(cfg).await?;
        sb.mem_backend = meta.mem_backend;
        sb.start.took = t0.elapsed();
        Ok(sb)
    }
}

fn short(key: &str) -> &str {
    &key[..12.min(key.len())]
}
