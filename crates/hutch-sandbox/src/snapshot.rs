//! Snapshots of a booted guest, kept with the image: made once (boot, wait for the agent's `Ready`, pause, save
//! device state; RAM is already in its file), restored by every sandbox with its own disk layer on top.
//! Nothing per-sandbox or secret is ever in a snapshot: identity arrives after restore.

use std::path::{Path, PathBuf};

use hutch_proto::handshake::{self, HandshakeMsg};
use hutch_vmm::{Accel, Backend, Memory, SnapshotFiles, Vm};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{qemu_img_overlay, Host, SandboxConfig, SandboxDir, SandboxError};

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
        "recipe={RECIPE}\nimage={}\ncpus={}\nmemory={}\naccel={accel}\nqemu={}\nproto={}\ncmdline={}\n",
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
    host.image.dir.join("snapshots")
}

fn sha256_file(path: &Path) -> Result<String, std::io::Error> {
    let bytes = std::fs::read(path)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn bad(reason: impl Into<String>) -> SandboxError {
    SandboxError::Vmm(hutch_vmm::VmmError::Snapshot { what: "invalid", reason: reason.into() })
}

/// The snapshot for this image and size, if one exists and passes its checks.
pub fn lookup(host: &Host, cfg: &SandboxConfig, accel: Accel) -> Result<Option<Snapshot>, SandboxError> {
    let dir = snapshots_dir(host).join(key(host, cfg, accel));
    if !dir.exists() {
        return Ok(None);
    }
    let snap = open(&dir)?;
    Ok(Some(snap))
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

async fn make(host: &Host, cfg: &SandboxConfig, accel: Accel) -> Result<Snapshot, SandboxError> {
    let t0 = std::time::Instant::now();
    let key = key(host, cfg, accel);
    let parent = snapshots_dir(host);
    std::fs::create_dir_all(&parent).map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", parent.display()), source: e })?;
    let tmp = TmpDir(parent.join(format!(".tmp-{key}-{}", crate::new_id())));
    std::fs::create_dir(&tmp.0).map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", tmp.0.display()), source: e })?;
    let disk = tmp.0.join("disk.qcow2");
    qemu_img_overlay(&host.image.rootfs, "raw", &disk)?;
    let files = SnapshotFiles { state: tmp.0.join("state"), memory: tmp.0.join("memory") };

    // Sockets and logs go to a short runtime dir (unix socket paths are limited to 108 bytes).
    let id = crate::new_id();
    let rundir = SandboxDir::create(&host.root, &id)?;
    let memory = Memory::File { path: files.memory.clone(), shared: true };
    // The workspace slot holds its placeholder in the snapshot; restores put the real image there.
    let cfg = &SandboxConfig { workspace_image: None, ..cfg.clone() };
    let vmcfg = crate::Sandbox::vm_config(host, cfg, accel, rundir.path(), disk, memory);
    let mut vm = host.qemu.boot(&vmcfg).await?;
    rundir.record_vmm(vm.pid());
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
    let final_dir = parent.join(&key);
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp.0, &final_dir).map_err(|e| SandboxError::HostIo { what: "install the snapshot".into(), source: e })?;
    std::mem::forget(tmp);
    open(&final_dir)
}

struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
