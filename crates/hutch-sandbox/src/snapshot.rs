//! Snapshots of a booted guest, kept with the image: made once (boot, wait for the agent's `Ready`, pause, save
//! device state; RAM is already in its file), restored by every sandbox with its own disk layer on top.
//! Nothing per-sandbox or secret is ever in a snapshot: identity arrives after restore.
//!
//! A user who is not root restores snapshots from their own cache only: QEMU maps the RAM file of a restore
//! privately but opens it for writing, which the system cache's files do not allow. A snapshot root made there is
//! copied (sparse) into the user's cache on first use and checked like any other.

use std::path::{Path, PathBuf};

use hutch_proto::handshake::{self, HandshakeMsg};
use hutch_vmm::{Accel, Backend, Memory, SnapshotFiles, Vm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{qemu_img_overlay, Host, SandboxConfig, SandboxError};

/// Bumped when the way snapshots are made changes.
const RECIPE: u32 = 2;

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub files: SnapshotFiles,
    pub meta: Meta,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub key: String,
    pub image_key: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: String,
    pub state_sha256: String,
    pub memory_bytes: u64,
    pub created_unix: u64,
    pub boot_ms: u64,
}

fn key(host: &Host, cfg: &SandboxConfig, accel: Accel) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "recipe={RECIPE}\nlayout={}\nimage={}\ncpus={}\nmemory={}\naccel={accel}\nqemu={}\nproto={}\ncmdline={}\n",
        hutch_vmm::DEVICE_LAYOUT,
        host.image.key,
        cfg.cpus,
        cfg.memory_mib,
        host.caps.qemu_id.as_deref().unwrap_or("?"),
        hutch_proto::PROTOCOL_VERSION,
        crate::kernel_cmdline(accel).split(" tsc_early_khz").next().unwrap_or(""),
    ));
    hex::encode(h.finalize())[..16].to_string()
}

fn snapshots_dir(host: &Host) -> PathBuf {
    host.image.snapshots.clone()
}

fn sha256_file(path: &Path) -> Result<String, std::io::Error> {
    let bytes = std::fs::read(path)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn bad(reason: impl Into<String>) -> SandboxError {
    SandboxError::Vmm(hutch_vmm::VmmError::Snapshot { what: "invalid", reason: reason.into() })
}

/// The snapshot for this image and size, if one exists and passes its checks: this user's own, else a copy of
/// the shared cache's.
pub fn lookup(host: &Host, cfg: &SandboxConfig, accel: Accel) -> Result<Option<Snapshot>, SandboxError> {
    let key = key(host, cfg, accel);
    let dir = snapshots_dir(host).join(&key);
    if dir.exists() {
        let snap = open(&dir)?;
        // When it was last used, for `hutch cache prune` (this user's own cache only).
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let _ = std::fs::write(dir.join("used"), now.to_string());
        return Ok(Some(snap));
    }
    let Some(shared) = host.image.shared_snapshots.as_ref().map(|s| s.join(&key)).filter(|d| d.is_dir()) else {
        return Ok(None);
    };
    let theirs = open(&shared)?;
    import(host, &theirs, &key).map(Some)
}

/// Copies a shared snapshot into this user's cache (under a private name, then one rename), so that QEMU may open
/// its RAM file for the private mapping of a restore. The copy is checked as the original was.
fn import(host: &Host, theirs: &Snapshot, key: &str) -> Result<Snapshot, SandboxError> {
    let parent = snapshots_dir(host);
    std::fs::create_dir_all(&parent).map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", parent.display()), source: e })?;
    let tmp = TmpDir(parent.join(format!(".tmp-{key}-{}", crate::new_id())));
    std::fs::create_dir(&tmp.0).map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", tmp.0.display()), source: e })?;
    for name in ["meta.json", "state", "disk.qcow2", "memory"] {
        let (from, to) = (theirs.dir.join(name), tmp.0.join(name));
        copy_sparse(&from, &to).map_err(|e| SandboxError::HostIo { what: format!("copy {} to {}", from.display(), to.display()), source: e })?;
    }
    let final_dir = parent.join(key);
    if let Err(e) = std::fs::rename(&tmp.0, &final_dir) {
        // Another run of this user imported it first.
        if !final_dir.is_dir() {
            return Err(SandboxError::HostIo { what: "install the imported snapshot".into(), source: e });
        }
    } else {
        std::mem::forget(tmp);
    }
    open(&final_dir)
}

/// Copies `from` to a new file `to`, writing only the data regions (holes stay holes, and so do all-zero blocks):
/// a guest RAM file is mostly untouched pages.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on a file descriptor this function owns (`src` lives until the end); no memory is passed.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole from `pos` to the end
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut at, end) = (data as u64, (hole as u64).min(len));
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let n = src.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank while copied"));
            }
            if buf[..n].iter().any(|&b| b != 0) {
                dst.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        pos = end;
    }
    dst.sync_all()
}

fn open(dir: &Path) -> Result<Snapshot, SandboxError> {
    let meta_text = std::fs::read_to_string(dir.join("meta.json")).map_err(|e| bad(format!("meta.json: {e}")))?;
    let meta: Meta = serde_json::from_str(&meta_text).map_err(|e| bad(format!("meta.json: {e}")))?;
    let files = SnapshotFiles { state: dir.join("state"), memory: dir.join("memory") };
    let disk = dir.join("disk.qcow2");
    let state_sha = sha256_file(&files.state).map_err(|e| bad(format!("state: {e}")))?;
    if state_sha != meta.state_sha256 {
        return Err(bad("device state does not match its checksum (corrupt)"));
    }
    let mem_len = std::fs::metadata(&files.memory).map_err(|e| bad(format!("memory: {e}")))?.len();
    if mem_len != meta.memory_bytes {
        return Err(bad(format!("memory file is {mem_len} bytes, expected {}", meta.memory_bytes)));
    }
    if !disk.is_file() {
        return Err(bad("disk layer missing"));
    }
    Ok(Snapshot { dir: dir.to_path_buf(), disk, files, meta })
}

impl Snapshot {
    /// Makes `out` a fresh copy-on-write layer over the snapshot's disk. An empty qcow2 overlay depends only on
    /// its backing file, so one made once with `qemu-img` is copied for each restore: a copy of ~200 KiB instead
    /// of a `qemu-img` process (~10 ms) on the restore path.
    pub fn new_overlay(&self, out: &Path) -> Result<(), SandboxError> {
        let template = self.dir.join("overlay.qcow2");
        if !template.is_file() {
            // Made under a private name and renamed, so concurrent restores never copy a half-written template.
            let tmp = self.dir.join(format!("overlay.qcow2.{}", crate::new_id()));
            let made = crate::qemu_img_overlay(&self.disk, "qcow2", &tmp).and_then(|()| {
                std::fs::rename(&tmp, &template).map_err(|e| SandboxError::HostIo { what: format!("rename {}", tmp.display()), source: e })
            });
            if let Err(e) = made {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        }
        std::fs::copy(&template, out).map(|_| ()).map_err(|e| SandboxError::HostIo { what: format!("copy {} to {}", template.display(), out.display()), source: e })
    }
}

/// Removes a snapshot that failed (the next `ensure` rebuilds it).
pub fn discard(snap: &Snapshot) {
    let _ = std::fs::remove_dir_all(&snap.dir);
}

/// Returns the snapshot for this config, making it first if needed (one cold boot, retried once on a hang).
pub async fn ensure(host: &Host, cfg: &SandboxConfig) -> Result<Snapshot, SandboxError> {
    let accel = host.caps.choose(cfg.accel)?;
    match lookup(host, cfg, accel) {
        Ok(Some(s)) => return Ok(s),
        Ok(None) => {}
        Err(_) => {
            let _ = std::fs::remove_dir_all(snapshots_dir(host).join(key(host, cfg, accel)));
        }
    }
    match make(host, cfg, accel).await {
        Err(SandboxError::BootTimeout { .. }) => make(host, cfg, accel).await,
        r => r,
    }
}

/// Work directories of snapshot builds whose process was killed (a build takes minutes at most).
fn remove_stale_work_dirs(parent: &Path) {
    let Ok(rd) = std::fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let old = e.metadata().ok().and_then(|m| m.modified().ok()).and_then(|t| t.elapsed().ok()).is_some_and(|a| a > std::time::Duration::from_secs(3600));
        if old && e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

async fn make(host: &Host, cfg: &SandboxConfig, accel: Accel) -> Result<Snapshot, SandboxError> {
    let t0 = std::time::Instant::now();
    let key = key(host, cfg, accel);
    let parent = snapshots_dir(host);
    std::fs::create_dir_all(&parent).map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", parent.display()), source: e })?;
    remove_stale_work_dirs(&parent);
    let tmp = TmpDir(parent.join(format!(".tmp-{key}-{}", crate::new_id())));
    std::fs::create_dir(&tmp.0).map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", tmp.0.display()), source: e })?;
    let disk = tmp.0.join("disk.qcow2");
    qemu_img_overlay(&host.image.rootfs, "raw", &disk)?;
    let files = SnapshotFiles { state: tmp.0.join("state"), memory: tmp.0.join("memory") };

    // Sockets and logs go to a short runtime dir (unix socket paths are limited to 108 bytes).
    let id = crate::new_id();
    let rundir = host.sandbox_dir(&id)?;
    let memory = Memory::File { path: files.memory.clone(), shared: true };
    // The workspace slots hold their placeholders in the snapshot; restores put the real images there.
    let cfg = &SandboxConfig { workspace_image: None, workspace_base: None, ..cfg.clone() };
    let vmcfg = crate::Sandbox::vm_config(host, cfg, accel, &rundir, disk, memory);
    let mut vm = host.qemu.boot(&vmcfg).await?;
    let ready = async {
        let mut stream = vm.connect_agent().await?;
        loop {
            match handshake::read_msg(&mut stream).await.map_err(SandboxError::Handshake)? {
                HandshakeMsg::Ready(r) if r.protocol == hutch_proto::PROTOCOL_VERSION => return Ok::<_, SandboxError>(stream),
                HandshakeMsg::Ready(r) => {
                    return Err(SandboxError::Handshake(hutch_proto::HandshakeError::Version {
                        host: hutch_proto::PROTOCOL_VERSION,
                        guest: r.protocol,
                    }))
                }
                _ => continue,
            }
        }
    };
    let stream = match tokio::time::timeout(cfg.boot_timeout, ready).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            vm.kill().await;
            return Err(e);
        }
        Err(_) => {
            let console = crate::console_tail(vm.console_log());
            vm.kill().await;
            return Err(SandboxError::BootTimeout { timeout: cfg.boot_timeout, mode: "snapshot boot", console });
        }
    };
    // The guest now waits for a `Hello` that only a restoring host will send.
    let r = vm.snapshot(&files).await;
    vm.kill().await;
    drop(stream);
    r?;
    let state_sha256 = sha256_file(&files.state).map_err(|e| SandboxError::HostIo { what: "read snapshot state".into(), source: e })?;
    let memory_bytes = std::fs::metadata(&files.memory).map_err(|e| SandboxError::HostIo { what: "stat snapshot memory".into(), source: e })?.len();
    let meta = Meta {
        key: key.clone(),
        image_key: host.image.key.clone(),
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        accel: accel.to_string(),
        state_sha256,
        memory_bytes,
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        boot_ms: t0.elapsed().as_millis() as u64,
    };
    let meta_json = serde_json::to_string_pretty(&meta).map_err(|e| bad(e.to_string()))?;
    std::fs::write(tmp.0.join("meta.json"), meta_json).map_err(|e| SandboxError::HostIo { what: "write snapshot meta".into(), source: e })?;
    if nix::unistd::geteuid().is_root() {
        // QEMU ran as the VMM account and was given the disk layer; a snapshot every user reads belongs to root,
        // readable by all and writable by no VMM.
        publish(&tmp.0).map_err(|e| SandboxError::HostIo { what: format!("make {} readable by all", tmp.0.display()), source: e })?;
    }
    let final_dir = parent.join(&key);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp.0, &final_dir).map_err(|e| SandboxError::HostIo { what: "install the snapshot".into(), source: e })?;
    std::mem::forget(tmp);
    open(&final_dir)
}

/// Owner root, mode 0644 (0755 for the directory), for every entry of a snapshot directory.
fn publish(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        std::os::unix::fs::lchown(&path, Some(0), Some(0))?;
        if !path.is_symlink() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    std::os::unix::fs::lchown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
