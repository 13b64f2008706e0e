//! Environment snapshots: a VM captured right after its setup phase succeeded (RAM, device state, and its disk
//! layer, which becomes a read-only backing layer), kept in the cache under a key the caller computes, and
//! restored by later sandboxes with their own overlay and a fresh identity.
//!
//! Layers: image snapshot (a booted guest) -> environment snapshot (the same guest after a setup) -> sandbox
//! (a private overlay and a private copy-on-write mapping of the RAM). Nothing per-sandbox is in an entry: before
//! the capture the agent forgets its identity and restarts itself, the guest's free memory is zeroed, and the
//! gateway that minted the setup's placeholders is gone with its run.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hutch_proto::handshake::{self, HandshakeMsg};
use hutch_vmm::{Accel, Backend, Memory, SnapshotFiles, Vm};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::{self, Snapshot};
use crate::{Attached, Host, Sandbox, SandboxConfig, SandboxError, StartMode};

/// Bumped when the layout of an entry or the way it is made changes.
const FORMAT: u32 = 1;

/// Sent through the agent channel before a capture: many times the guest's receive buffers for the port
/// (a virtqueue of 128 pages).
const FLUSH_BYTES: usize = 8 << 20;
const FLUSH_FILE: &str = "/tmp/.hutch-channel-flush";

/// How long the respawned agent may take to announce itself (it zeroes the guest's free memory first).
const RESPAWN_TIMEOUT: Duration = Duration::from_secs(60);

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn env_err(msg: impl Into<String>) -> SandboxError {
    SandboxError::Env(msg.into())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::HostIo { what, source }
}

/// The image snapshot a capturable sandbox was restored from, and its private shared RAM file.
#[derive(Debug, Clone)]
pub struct CaptureBase {
    snapshot_dir: PathBuf,
    snapshot_state_sha256: String,
    image_key: String,
    memory: PathBuf,
    accel: Accel,
    cpus: u32,
    memory_mib: u32,
}

/// What an entry records about itself (`meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnvMeta {
    pub format: u32,
    /// The VM's device layout ([`hutch_vmm::DEVICE_LAYOUT`]) the saved device state belongs to (0: from before
    /// it was recorded).
    #[serde(default)]
    pub layout: u32,
    pub key: String,
    /// What it was made for, for `hutch cache ls` (the repository's directory and the setup script's name).
    pub label: String,
    pub image_key: String,
    /// The image snapshot whose disk layer is this entry's backing file, and that snapshot's checksum: a rebuilt
    /// image snapshot (same directory, other content) makes the entry unusable.
    pub base_snapshot: PathBuf,
    pub base_state_sha256: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub accel: String,
    pub state_sha256: String,
    pub memory_bytes: u64,
    pub disk_sha256: String,
    pub created_unix: u64,
    /// How long the setup that made it took (what a hit saves).
    pub setup_ms: u64,
}

/// A usable entry.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub meta: EnvMeta,
}

impl Entry {
    fn snapshot(&self) -> Snapshot {
        let m = &self.meta;
        Snapshot {
            dir: self.dir.clone(),
            disk: self.dir.join("disk.qcow2"),
            files: SnapshotFiles { state: self.dir.join("state"), memory: self.dir.join("memory") },
            meta: snapshot::Meta {
                key: m.key.clone(),
                image_key: m.image_key.clone(),
                cpus: m.cpus,
                memory_mib: m.memory_mib,
                accel: m.accel.clone(),
                state_sha256: m.state_sha256.clone(),
                memory_bytes: m.memory_bytes,
                created_unix: m.created_unix,
                boot_ms: m.setup_ms,
            },
        }
    }

    /// Seconds since it was made.
    pub fn age_secs(&self) -> u64 {
        now_unix().saturating_sub(self.meta.created_unix)
    }
}

/// One line of `hutch cache ls`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    /// `None` when `meta.json` is unreadable (a corrupt or half-removed entry; `prune` removes it).
    pub meta: Option<EnvMeta>,
    pub bytes: u64,
    pub last_used_unix: u64,
}

/// Held by the one run that builds an entry for a key; released when dropped.
pub struct BuilderLock {
    _flock: Flock<std::fs::File>,
    key: String,
}

/// The entries: `<cache root>/envs/<key>/`.
#[derive(Debug, Clone)]
pub struct EnvStore {
    dir: PathBuf,
}

fn check_key(key: &str) -> Result<(), SandboxError> {
    if key.is_empty() || key.len() > 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SandboxError::BadInput(format!("{key:?} is not an environment cache key (hex digits)")));
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// Bytes a directory's files take on disk (allocated blocks, so sparse RAM files count for what they hold).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.blocks() * 512).sum())
        .unwrap_or(0)
}

impl EnvStore {
    /// The store under the same cache root as the images and the sandbox directories.
    pub fn new(cache_root: &Path) -> EnvStore {
        EnvStore { dir: cache_root.join("envs") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The entry for `key`: `Ok(None)` when there is none or it expired (then it is removed); an error when it
    /// exists but cannot be used (corrupt, or its image snapshot changed), in which case the caller discards it.
    pub fn lookup(&self, key: &str, max_age: Option<Duration>) -> Result<Option<Entry>, SandboxError> {
        check_key(key)?;
        let dir = self.dir.join(key);
        if !dir.exists() {
            return Ok(None);
        }
        let entry = open(&dir)?;
        if max_age.is_some_and(|m| entry.age_secs() > m.as_secs()) {
            self.discard(key);
            return Ok(None);
        }
        Ok(Some(entry))
    }

    /// Marks `key` as just used (for least-recently-used pruning).
    pub fn touch(&self, key: &str) {
        if check_key(key).is_ok() {
            let _ = std::fs::write(self.dir.join(key).join("used"), now_unix().to_string());
        }
    }

    /// Removes an entry (a failed restore, a refresh, `hutch cache rm`).
    pub fn discard(&self, key: &str) {
        if check_key(key).is_ok() {
            let dir = self.dir.join(key);
            // Renamed away first, so that no run ever opens a half-removed entry.
            let gone = self.dir.join(format!(".gone-{key}-{}", crate::new_id()));
            if std::fs::rename(&dir, &gone).is_ok() {
                let _ = std::fs::remove_dir_all(&gone);
            }
        }
    }

    /// The builder's lock for `key` if no other run holds it.
    pub fn try_lock(&self, key: &str) -> Result<Option<BuilderLock>, SandboxError> {
        check_key(key)?;
        std::fs::create_dir_all(&self.dir).map_err(io(format!("cannot create {}", self.dir.display())))?;
        let path = self.dir.join(format!(".{key}.lock"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io(format!("cannot open {}", path.display())))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(flock) => Ok(Some(BuilderLock { _flock: flock, key: key.to_string() })),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(SandboxError::HostIo { what: format!("cannot lock {}", path.display()), source: e.into() }),
        }
    }

    /// Every entry, newest use first.
    pub fn list(&self) -> Vec<Listed> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return out };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || check_key(&name).is_err() || !e.path().is_dir() {
                continue;
            }
            let dir = e.path();
            let meta = std::fs::read_to_string(dir.join("meta.json")).ok().and_then(|t| serde_json::from_str::<EnvMeta>(&t).ok());
            let used = std::fs::read_to_string(dir.join("used")).ok().and_then(|t| t.trim().parse().ok());
            let last_used_unix = used.or(meta.as_ref().map(|m| m.created_unix)).unwrap_or(0);
            out.push(Listed { key: name, meta, bytes: dir_bytes(&dir), last_used_unix });
        }
        out.sort_by(|a, b| b.last_used_unix.cmp(&a.last_used_unix).then(a.key.cmp(&b.key)));
        out
    }

    /// Removes the entries whose key starts with `prefix`; returns their keys.
    pub fn remove(&self, prefix: &str) -> Result<Vec<String>, SandboxError> {
        check_key(prefix)?;
        let keys: Vec<String> = self.list().into_iter().map(|l| l.key).filter(|k| k.starts_with(prefix)).collect();
        for k in &keys {
            self.discard(k);
        }
        Ok(keys)
    }

    /// Removes unreadable entries, those older than `max_age`, then the least recently used ones until the rest
    /// fit in `max_bytes`; also leftovers of interrupted builds. Entries being built are never touched (they are
    /// not in the store until complete). Returns what was removed and why.
    pub fn prune(&self, max_age: Option<Duration>, max_bytes: Option<u64>) -> Vec<(String, String)> {
        let mut removed = Vec::new();
        let now = now_unix();
        // Build directories whose builder is gone (no lock held on their key).
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = name.strip_prefix(".tmp-").or_else(|| name.strip_prefix(".gone-")) else { continue };
                let key = rest.split('-').next().unwrap_or("");
                if check_key(key).is_ok() && self.try_lock(key).ok().flatten().is_some() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let mut kept = Vec::new();
        for l in self.list() {
            let why = match &l.meta {
                None => Some("unreadable".to_string()),
                Some(m) if max_age.is_some_and(|a| now.saturating_sub(m.created_unix) > a.as_secs()) => Some("expired".to_string()),
                // Made on an image snapshot that was pruned or rebuilt (a superseded image): it can never restore.
                Some(m) if !m.base_snapshot.join("meta.json").is_file() => Some("its image snapshot is gone".to_string()),
                Some(_) => None,
            };
            match why {
                Some(w) => {
                    self.discard(&l.key);
                    removed.push((l.key, w));
                }
                None => kept.push(l),
            }
        }
        if let Some(cap) = max_bytes {
            // `kept` is newest use first: drop from the end.
            let mut total: u64 = kept.iter().map(|l| l.bytes).sum();
            while total > cap {
                let Some(l) = kept.pop() else { break };
                total -= l.bytes;
                self.discard(&l.key);
                removed.push((l.key, "over the size cap (least recently used)".to_string()));
            }
        }
        removed
    }
}

fn open(dir: &Path) -> Result<Entry, SandboxError> {
    let text = std::fs::read_to_string(dir.join("meta.json")).map_err(|e| env_err(format!("meta.json: {e}")))?;
    let meta: EnvMeta = serde_json::from_str(&text).map_err(|e| env_err(format!("meta.json: {e}")))?;
    if meta.format != FORMAT {
        return Err(env_err(format!("made by another version (format {})", meta.format)));
    }
    if meta.layout != hutch_vmm::DEVICE_LAYOUT {
        return Err(env_err(format!("made for other VM devices (layout {}, this hutch has {})", meta.layout, hutch_vmm::DEVICE_LAYOUT)));
    }
    let state = sha256_file(&dir.join("state")).map_err(|e| env_err(format!("state: {e}")))?;
    if state != meta.state_sha256 {
        return Err(env_err("device state does not match its checksum (corrupt)"));
    }
    let mem = std::fs::metadata(dir.join("memory")).map_err(|e| env_err(format!("memory: {e}")))?.len();
    if mem != meta.memory_bytes {
        return Err(env_err(format!("memory file is {mem} bytes, expected {}", meta.memory_bytes)));
    }
    let disk = sha256_file(&dir.join("disk.qcow2")).map_err(|e| env_err(format!("disk layer: {e}")))?;
    if disk != meta.disk_sha256 {
        return Err(env_err("disk layer does not match its checksum (corrupt)"));
    }
    let base: snapshot::Meta = std::fs::read_to_string(meta.base_snapshot.join("meta.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .ok_or_else(|| env_err("the image snapshot it was made on is gone"))?;
    if base.state_sha256 != meta.base_state_sha256 {
        return Err(env_err("the image snapshot it was made on was rebuilt"));
    }
    Ok(Entry { dir: dir.to_path_buf(), meta })
}

/// Copies a sparse file keeping its holes (a guest's RAM file is mostly holes).
fn sparse_copy(src: &Path, dst: &Path) -> Result<(), SandboxError> {
    use std::io::{Seek, SeekFrom};
    let mut from = std::fs::File::open(src).map_err(io(format!("cannot open {}", src.display())))?;
    let mut to = std::fs::File::create(dst).map_err(io(format!("cannot create {}", dst.display())))?;
    let len = from.metadata().map_err(io(format!("cannot stat {}", src.display())))?.len();
    to.set_len(len).map_err(io(format!("cannot size {}", dst.display())))?;
    let fd = from.as_raw_fd();
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        // SAFETY: lseek on our own open fd; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after `pos`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole };
        from.seek(SeekFrom::Start(data as u64)).map_err(io("seek"))?;
        to.seek(SeekFrom::Start(data as u64)).map_err(io("seek"))?;
        let mut chunk = std::io::Read::take(&mut from, (hole - data) as u64);
        std::io::copy(&mut chunk, &mut to).map_err(io(format!("copy {} to {}", src.display(), dst.display())))?;
        pos = hole;
    }
    Ok(())
}

/// Turns the all-zero pages of a RAM file back into holes: the guest's free memory was zeroed before the capture,
/// which allocated it in the file; as holes it costs no disk, and a restore maps it without reading anything.
fn punch_zero_pages(path: &Path) -> Result<(), SandboxError> {
    use std::io::Read;
    const PAGE: usize = 4096;
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(io(format!("cannot open {}", path.display())))?;
    let fd = f.as_raw_fd();
    let mut buf = vec![0u8; 1 << 21];
    let mut off: u64 = 0;
    let mut run_start: Option<u64> = None;
    let punch = |start: u64, end: u64| {
        // SAFETY: fallocate on our own open fd; PUNCH_HOLE with KEEP_SIZE only deallocates the range, whose
        // content reads back as zeros (which it was).
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, start as i64, (end - start) as i64) };
    };
    loop {
        let n = f.read(&mut buf).map_err(io(format!("cannot read {}", path.display())))?;
        if n == 0 {
            break;
        }
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            let at = off + (i * PAGE) as u64;
            if page.iter().all(|&b| b == 0) {
                run_start.get_or_insert(at);
            } else if let Some(s) = run_start.take() {
                punch(s, at);
            }
        }
        off += n as u64;
    }
    if let Some(s) = run_start {
        punch(s, off);
    }
    Ok(())
}

struct TmpDir(PathBuf);

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Sandbox {
    /// After the agent was told to end this session (respawn, suspend): stops this session's readers and waits on
    /// the channel's second handle for the agent's next `Ready`, which the old session must not read. `None`: it
    /// did not come within `limit`. The stream is returned open; the caller drops it when the VM is saved.
    pub(crate) async fn await_next_ready(&mut self, raw: std::os::fd::OwnedFd, limit: Duration) -> Result<Option<tokio::net::UnixStream>, SandboxError> {
        self.driver.abort();
        let _ = (&mut self.driver).await;
        self.egress_task.abort();
        let std_stream = std::os::unix::net::UnixStream::from(raw);
        std_stream.set_nonblocking(true).map_err(io("agent channel"))?;
        let mut stream = tokio::net::UnixStream::from_std(std_stream).map_err(io("agent channel"))?;
        let ready = async {
            loop {
                match handshake::read_msg(&mut stream).await.map_err(SandboxError::Handshake)? {
                    HandshakeMsg::Ready(_) => return Ok::<(), SandboxError>(()),
                    _ => continue,
                }
            }
        };
        match tokio::time::timeout(limit, ready).await {
            Ok(r) => r.map(|()| Some(stream)),
            Err(_) => Ok(None),
        }
    }

    /// Restores the image snapshot like [`Sandbox::create`], but with the VM's RAM in a shared file of its own, so
    /// that [`Sandbox::capture`] can take an environment snapshot of it later. Makes the image snapshot when it is
    /// missing; errors when that fails (the caller then creates an ordinary sandbox and stores nothing).
    pub async fn create_capturable(host: &Host, cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        host.reap_stale();
        let accel = host.caps.choose(cfg.accel)?;
        if cfg.cold {
            return Err(env_err("a cold boot was asked for"));
        }
        // The entry is layered on the image snapshot: make that first if it is missing (one boot, which the setup
        // about to run dwarfs).
        let snap = snapshot::ensure(host, cfg).await?;
        let id = crate::new_id();
        let dir = host.sandbox_dir(&id)?;
        let disk = dir.path().join("disk.qcow2");
        snap.new_overlay(&disk)?;
        let memory = dir.path().join("memory");
        sparse_copy(&snap.files.memory, &memory)?;
        let vmcfg = Sandbox::vm_config(host, cfg, accel, &dir, disk, Memory::File { path: memory.clone(), shared: true });
        let vm = host.qemu.restore(&vmcfg, &snap.files).await?;
        let attached = Attached::connect(id, dir, vm, accel, StartMode::Restored, Duration::from_secs(10)).await?;
        let mut sb = attached.finish(cfg).await?;
        sb.capture = Some(CaptureBase {
            snapshot_dir: snap.dir.clone(),
            snapshot_state_sha256: snap.meta.state_sha256.clone(),
            image_key: host.image.key.clone(),
            memory,
            accel,
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
        });
        sb.start.took = t0.elapsed();
        Ok(sb)
    }

    /// Whether [`Sandbox::capture`] can work on this sandbox.
    pub fn capturable(&self) -> bool {
        self.capture.is_some()
    }

    /// Takes the environment snapshot and destroys the sandbox. Call it after a setup phase succeeded and the
    /// gateway left that phase. The agent forgets the sandbox and restarts (zeroing the guest's free memory);
    /// once it announces itself the VM is paused, its device state saved, and its RAM file and disk layer move
    /// into the entry, read-only. The entry is installed under `lock`'s key (replacing an older one).
    pub async fn capture(mut self, store: &EnvStore, lock: &BuilderLock, label: &str, setup_ms: u64) -> Result<Entry, SandboxError> {
        let r = self.capture_inner(store, lock, label, setup_ms).await;
        self.destroy().await;
        r
    }

    async fn capture_inner(&mut self, store: &EnvStore, lock: &BuilderLock, label: &str, setup_ms: u64) -> Result<Entry, SandboxError> {
        let base = self.capture.clone().ok_or_else(|| env_err("this sandbox was not made for capture"))?;
        let raw = self.raw.take().ok_or_else(|| env_err("no second handle on the agent channel"))?;
        let key = lock.key.clone();
        let t0 = Instant::now();
        // The guest driver's receive buffers for the agent port are allocated once and reused, so the last
        // requests (the setup's exec with its placeholders, the identity) would stay in guest memory. Enough
        // bytes through the channel to cycle through all of them many times over overwrite them; the file itself
        // is zeros and goes at once.
        let flush = vec![0u8; FLUSH_BYTES];
        self.client.put_file(FLUSH_FILE, 0o600, flush.len() as u64, &flush[..]).await?;
        let out = self.client.run(&["rm", "-f", FLUSH_FILE]).await?;
        if out.status != Some(hutch_proto::ExitStatus::Code(0)) {
            return Err(env_err("could not remove the channel flush file"));
        }
        self.client.respawn().await?;
        // From here on the channel belongs to the fresh agent: the old session must not read its `Ready`.
        let Some(stream) = self.await_next_ready(raw, RESPAWN_TIMEOUT).await? else {
            return Err(env_err(format!("the agent did not come back within {RESPAWN_TIMEOUT:?} after forgetting the sandbox")));
        };
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "capture: fresh agent ready");

        std::fs::create_dir_all(store.dir()).map_err(io(format!("cannot create {}", store.dir().display())))?;
        let tmp = TmpDir(store.dir().join(format!(".tmp-{key}-{}", crate::new_id())));
        std::fs::create_dir(&tmp.0).map_err(io(format!("cannot create {}", tmp.0.display())))?;
        let files = SnapshotFiles { state: tmp.0.join("state"), memory: base.memory.clone() };
        self.vm.snapshot(&files).await?;
        self.vm.kill().await;
        drop(stream);
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "capture: state saved");

        let disk = tmp.0.join("disk.qcow2");
        let memory = tmp.0.join("memory");
        std::fs::rename(self.dir.path().join("disk.qcow2"), &disk).map_err(io("move the disk layer into the entry"))?;
        std::fs::rename(&base.memory, &memory).map_err(io("move the RAM file into the entry"))?;
        punch_zero_pages(&memory)?;
        // The VMM may have run as another user and owned these: the entry belongs to the cache's owner, and
        // nothing writes it again (a VMM that could write it would reach every later sandbox).
        let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
        for f in [&disk, &memory, &files.state] {
            nix::unistd::chown(f.as_path(), Some(uid), Some(gid)).map_err(|e| SandboxError::HostIo { what: format!("chown {}", f.display()), source: e.into() })?;
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o444)).map_err(io(format!("chmod {}", f.display())))?;
        }
        let meta = EnvMeta {
            format: FORMAT,
            layout: hutch_vmm::DEVICE_LAYOUT,
            key: key.clone(),
            label: label.to_string(),
            image_key: base.image_key.clone(),
            base_snapshot: base.snapshot_dir.clone(),
            base_state_sha256: base.snapshot_state_sha256.clone(),
            cpus: base.cpus,
            memory_mib: base.memory_mib,
            accel: base.accel.to_string(),
            state_sha256: sha256_file(&files.state).map_err(io("read the saved state"))?,
            memory_bytes: std::fs::metadata(&memory).map_err(io("stat the RAM file"))?.len(),
            disk_sha256: sha256_file(&disk).map_err(io("read the disk layer"))?,
            created_unix: now_unix(),
            setup_ms,
        };
        let text = serde_json::to_string_pretty(&meta).map_err(|e| env_err(e.to_string()))?;
        std::fs::write(tmp.0.join("meta.json"), text).map_err(io("write meta.json"))?;
        let final_dir = store.dir().join(&key);
        store.discard(&key);
        std::fs::rename(&tmp.0, &final_dir).map_err(io("install the entry"))?;
        std::mem::forget(tmp);
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "capture: installed");
        open(&final_dir)
    }

    /// A sandbox restored from an environment snapshot, with a fresh identity and gateway.
    pub async fn restore_env(host: &Host, cfg: &SandboxConfig, entry: &Entry) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        host.reap_stale();
        let accel = host.caps.choose(cfg.accel)?;
        if entry.meta.cpus != cfg.cpus || entry.meta.memory_mib != cfg.memory_mib || entry.meta.accel != accel.to_string() {
            return Err(env_err("made for another VM size or accelerator"));
        }
        let mut sb = Sandbox::restore(host, cfg, accel, &entry.snapshot()).await?;
        sb.start.took = t0.elapsed();
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_content_and_holes() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"hello", 4096 * 3).unwrap();
        f.write_all_at(b"world", 40 << 20).unwrap();
        drop(f);
        let dst = t.path().join("dst");
        sparse_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 4 << 20, "holes stay holes");
    }

    fn fake_entry(store: &EnvStore, key: &str, created: u64, bytes: usize, used: u64) {
        let d = store.dir().join(key);
        std::fs::create_dir_all(&d).unwrap();
        let meta = EnvMeta {
            format: FORMAT,
            layout: hutch_vmm::DEVICE_LAYOUT,
            key: key.into(),
            label: "t".into(),
            image_key: "i".into(),
            base_snapshot: d.clone(),
            base_state_sha256: String::new(),
            cpus: 1,
            memory_mib: 512,
            accel: "tcg".into(),
            state_sha256: String::new(),
            memory_bytes: 0,
            disk_sha256: String::new(),
            created_unix: created,
            setup_ms: 0,
        };
        std::fs::write(d.join("meta.json"), serde_json::to_string(&meta).unwrap()).unwrap();
        std::fs::write(d.join("memory"), vec![1u8; bytes]).unwrap();
        std::fs::write(d.join("used"), used.to_string()).unwrap();
    }

    /// `prune` removes expired and unreadable entries, then the least recently used past the size cap.
    #[test]
    fn prune_honours_age_and_size() {
        let t = tempfile::tempdir().unwrap();
        let store = EnvStore::new(t.path());
        let now = now_unix();
        fake_entry(&store, "aa", now - 3 * 3600, 1 << 20, now - 100);
        fake_entry(&store, "bb", now - 60, 1 << 20, now - 50);
        fake_entry(&store, "cc", now - 60, 1 << 20, now - 10);
        fake_entry(&store, "dd", now - 60, 1 << 20, now - 5);
        std::fs::create_dir_all(store.dir().join("ee")).unwrap();
        let removed = store.prune(Some(Duration::from_secs(2 * 3600)), Some((2 << 20) + (1 << 19)));
        let mut got: Vec<(String, String)> = removed;
        got.sort();
        assert_eq!(got.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["aa", "bb", "ee"], "{got:?}");
        assert!(got[0].1 == "expired" && got[1].1.contains("size cap") && got[2].1 == "unreadable", "{got:?}");
        let left: Vec<String> = store.list().into_iter().map(|l| l.key).collect();
        assert_eq!(left, ["dd", "cc"]);
        assert_eq!(store.remove("c").unwrap(), ["cc"]);
        assert!(store.remove("../x").is_err());
    }

    /// One builder per key: a second lock on the same key is refused while the first is held.
    #[test]
    fn one_builder_per_key() {
        let t = tempfile::tempdir().unwrap();
        let store = EnvStore::new(t.path());
        let a = store.try_lock("ab12").unwrap();
        assert!(a.is_some());
        assert!(store.try_lock("ab12").unwrap().is_none());
        assert!(store.try_lock("cd34").unwrap().is_some());
        drop(a);
        assert!(store.try_lock("ab12").unwrap().is_some());
    }
}
