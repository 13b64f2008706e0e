//! One sandbox: a fresh VM restored from the image's snapshot (or booted cold), an agent session with a fresh
//! identity, exec and files through [`AgentClient`], and destruction that leaves nothing behind.

pub mod client;
pub mod dirs;
pub mod egress;
pub mod envcache;
pub mod envsnap;
pub mod pause;
pub mod pool;
pub mod snapshot;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hutch_image::Image;
use hutch_proto::mux::Role;
use hutch_proto::{handshake, Identity, Session};
use hutch_vmm::qemu::{Qemu, QemuVm};
use hutch_vmm::{Accel, Backend, HostCaps, Memory, Vm, VmConfig, VmmError};

pub use client::{AgentClient, ExecHandle, Output};
pub use dirs::{reap_stale, reap_stale_in, SandboxDir};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("{what}")]
    HostIo { what: String, #[source] source: std::io::Error },
    #[error("agent channel")]
    Channel(#[source] hutch_proto::FrameError),
    #[error("agent channel")]
    Mux(#[source] hutch_proto::MuxError),
    #[error("agent handshake")]
    Handshake(#[source] hutch_proto::HandshakeError),
    /// The agent's words, which can quote guest file names: escaped when shown.
    #[error("in the guest: {}", hutch_text::escape_lines(.0.as_bytes()))]
    Guest(String),
    #[error("{0}")]
    BadInput(String),
    /// A guest file larger than the caller allows; nothing of it was written.
    #[error("{} is {size} bytes, more than the limit of {max} bytes; nothing was written", hutch_text::escape(what))]
    TooLarge { what: String, size: u64, max: u64 },
    #[error("the guest did not come up within {timeout:?} ({mode}); last console lines:\n{console}")]
    BootTimeout { timeout: Duration, mode: &'static str, console: String },
    #[error("the VM exited while starting ({mode}); last console lines:\n{console}")]
    VmExited { mode: &'static str, console: String },
    #[error("egress gateway: {0}")]
    Gateway(String),
    #[error("environment snapshot: {0}")]
    Env(String),
    #[error("{tool} failed: {message}")]
    Tool { tool: &'static str, message: String },
}

/// Resources and behaviour of one sandbox.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub cpus: u32,
    pub memory_mib: u32,
    /// `None`: the best accelerator that runs ordinary guests here.
    pub accel: Option<Accel>,
    /// Boot from the kernel even when a snapshot exists.
    pub cold: bool,
    /// How long a cold boot may take before it counts as hung (it is retried once).
    pub boot_timeout: Duration,
    /// Environment every exec in this sandbox starts with.
    pub env: Vec<(String, String)>,
    /// Appended to the kernel command line of a cold boot (debugging).
    pub extra_kernel_args: Vec<String>,
    /// What the sandbox may reach, through its gateway. Default: nothing (every attempt denied and audited).
    pub egress: egress::Egress,
    /// The VM powers itself off when its host session ends (default). Off only for hosts that re-attach.
    pub exit_on_disconnect: bool,
    /// A read-only filesystem image for the workspace drive slot (the guest mounts it at `/workspace` on request).
    pub workspace_image: Option<PathBuf>,
    /// The image `workspace_image` takes unchanged data from (erofs extra device), for the workspace base slot.
    pub workspace_base: Option<PathBuf>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self { cpus: 1, memory_mib: 512, accel: None, cold: false, boot_timeout: Duration::from_secs(30), env: vec![], extra_kernel_args: vec![], egress: egress::Egress::deny_all(), exit_on_disconnect: true, workspace_image: None, workspace_base: None }
    }
}

/// What the host offers sandboxes: the VMM, the accelerator, the image, and where runtime state lives.
#[derive(Debug, Clone)]
pub struct Host {
    pub caps: HostCaps,
    pub qemu: Qemu,
    pub image: Image,
    /// `<root>/sandboxes/<id>` holds each sandbox's disk layer, logs and (without `runtime`) sockets.
    pub root: PathBuf,
    /// `<runtime>/sandboxes/<id>` holds each sandbox's sockets: `$XDG_RUNTIME_DIR/hutch` for a user who has one.
    pub runtime: Option<PathBuf>,
    /// Keeps the image from being pruned while this host (any clone of it) may start sandboxes from it.
    pub in_use: Option<std::sync::Arc<hutch_image::InUse>>,
}

impl Host {
    pub fn new(image: Image, root: PathBuf) -> Result<Self, SandboxError> {
        let caps = HostCaps::detect();
        let qemu = Qemu::new(caps.qemu()?.to_path_buf());
        // Not being able to mark the image (a read-only cache, say) costs only that protection.
        let in_use = hutch_image::Cache::at(&root).hold(&image).ok().map(std::sync::Arc::new);
        Ok(Self { caps, qemu, image, root, runtime: runtime_root(), in_use })
    }

    /// A new sandbox directory (and socket directory) for `id`.
    pub fn sandbox_dir(&self, id: &str) -> Result<SandboxDir, SandboxError> {
        SandboxDir::create_in(&self.root, self.runtime.as_deref(), id)
    }

    /// Kills and removes what dead owners left behind; returns the ids reaped.
    pub fn reap_stale(&self) -> Vec<String> {
        reap_stale_in(&self.root, self.runtime.as_deref())
    }
}

/// `$XDG_RUNTIME_DIR/hutch` for a user who is not root and whose runtime directory is theirs alone (the
/// directory pam_systemd makes at login: owned by the user, mode 0700). Root keeps sockets beside the rest.
fn runtime_root() -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid();
    if me.is_root() {
        return None;
    }
    let dir = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty())?);
    let meta = std::fs::metadata(&dir).ok()?;
    let private = dir.is_absolute() && meta.is_dir() && meta.uid() == me.as_raw() && meta.mode() & 0o077 == 0;
    private.then(|| dir.join("hutch"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    Cold,
    Restored,
    /// Taken from a warm pool: restored and warmed up in advance, paused until handed out.
    Pooled,
}

impl StartMode {
    fn as_str(self) -> &'static str {
        match self {
            StartMode::Cold => "cold boot",
            StartMode::Restored => "snapshot restore",
            StartMode::Pooled => "warm pool",
        }
    }
}

#[derive(Debug, Clone)]
pub struct StartInfo {
    pub mode: StartMode,
    pub accel: Accel,
    /// From `create` called to the agent answering with the identity applied.
    pub took: Duration,
    /// Notes for the user: fallbacks and retries that happened.
    pub notes: Vec<String>,
    /// A restore was wanted but there was no usable snapshot: the caller should have one made in the background
    /// (`snapshot::ensure`), so that the next start is a restore again.
    pub snapshot_wanted: bool,
}

pub struct Sandbox {
    pub id: String,
    pub start: StartInfo,
    client: AgentClient,
    vm: QemuVm,
    driver: tokio::task::JoinHandle<Result<(), hutch_proto::MuxError>>,
    egress_task: tokio::task::JoinHandle<()>,
    gateway: hutch_gateway::Gateway,
    /// A second handle on the agent channel's socket: after a respawn the host reads the fresh agent's `Ready`
    /// on it, with the session's own handle gone (so the channel never closes in between).
    raw: Option<std::os::fd::OwnedFd>,
    /// Set when the VM's RAM is a shared file of its own (an environment snapshot can then be taken of it).
    capture: Option<envsnap::CaptureBase>,
    /// Guest RAM is in a named memory backend (restored VMs), not QEMU's default RAM: a full save must be
    /// resumed the same way.
    mem_backend: bool,
    // Last: dropped after the VM is killed.
    dir: SandboxDir,
}

/// A VM whose agent session is up but which has no identity yet: the state a warm pool keeps VMs in.
pub(crate) struct Attached {
    pub(crate) id: String,
    pub(crate) dir: SandboxDir,
    pub(crate) vm: QemuVm,
    pub(crate) accel: Accel,
    pub(crate) mode: StartMode,
    pub(crate) session: Session,
    pub(crate) inbound: tokio::sync::mpsc::Receiver<hutch_proto::mux::Stream>,
    pub(crate) driver: tokio::task::JoinHandle<Result<(), hutch_proto::MuxError>>,
    pub(crate) raw: Option<std::os::fd::OwnedFd>,
}

impl Attached {
    /// Connects to the agent and completes the handshake; kills the VM on failure.
    pub(crate) async fn connect(id: String, dir: SandboxDir, mut vm: QemuVm, accel: Accel, mode: StartMode, timeout: Duration) -> Result<Attached, SandboxError> {
        let stream = match vm.connect_agent().await {
            Ok(s) => s,
            Err(e) => {
                vm.kill().await;
                return Err(e.into());
            }
        };
        let session_nonce = u64::from_str_radix(&id, 16).unwrap_or(1);
        let handshake = async move {
            let mut stream = stream;
            handshake::host_handshake(&mut stream, session_nonce, mode == StartMode::Cold).await.map(|_| stream)
        };
        let stream = tokio::select! {
            r = tokio::time::timeout(timeout, handshake) => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    vm.kill().await;
                    return Err(SandboxError::Handshake(e));
                }
                Err(_) => {
                    vm.kill().await;
                    return Err(SandboxError::BootTimeout { timeout, mode: mode.as_str(), console: console_tail(vm.console_log()) });
                }
            },
            _ = vm.wait() => {
                return Err(SandboxError::VmExited { mode: mode.as_str(), console: console_tail(vm.console_log()) });
            }
        };
        tracing::debug!(id = %id, "attach: handshake done");
        let raw = {
            use std::os::fd::AsFd;
            stream.as_fd().try_clone_to_owned().ok()
        };
        let (session, inbound, driver) = Session::start(stream, Role::Client);
        Ok(Attached { id, dir, vm, accel, mode, session, inbound, driver, raw })
    }

    /// Gives the VM its identity and egress; kills it on failure.
    pub(crate) async fn finish(self, cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let Attached { id, dir, mut vm, accel, mode, session, inbound, driver, raw } = self;
        let t0 = Instant::now();
        let fail = |vm: QemuVm, driver: tokio::task::JoinHandle<_>| async move {
            let mut vm = vm;
            driver.abort();
            vm.kill().await;
        };
        let gateway = match cfg.egress.gateway(&id) {
            Ok(g) => g,
            Err(e) => {
                fail(vm, driver).await;
                return Err(e);
            }
        };
        let egress_task = tokio::spawn(egress::serve_guest_streams(inbound, gateway.clone()));
        let client = AgentClient::new(session);
        let mut entropy = vec![0u8; 64];
        if let Err(e) = getrandom::getrandom(&mut entropy) {
            egress_task.abort();
            fail(vm, driver).await;
            return Err(SandboxError::HostIo { what: "no host randomness".into(), source: std::io::Error::other(e.to_string()) });
        }
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let identity = Identity {
            sandbox_id: id.clone(),
            hostname: "hutch".into(),
            time_secs: now.as_secs() as i64,
            time_nanos: now.subsec_nanos(),
            entropy,
            env: egress::guest_env(&gateway, &cfg.env),
            ca_pem: Some(gateway.ca_cert_pem()),
            exit_on_disconnect: cfg.exit_on_disconnect,
        };
        if let Err(e) = client.init(identity).await {
            egress_task.abort();
            driver.abort();
            vm.kill().await;
            return Err(e);
        }
        tracing::debug!(id = %id, ms = t0.elapsed().as_secs_f64() * 1e3, "attach: identity applied");
        let start = StartInfo { mode, accel, took: Duration::ZERO, notes: vec![], snapshot_wanted: false };
        let mem_backend = mode != StartMode::Cold;
        Ok(Sandbox { id, start, client, vm, driver, egress_task, gateway, raw, capture: None, mem_backend, dir })
    }

    pub(crate) async fn discard(mut self) {
        self.driver.abort();
        self.vm.kill().await;
    }
}

pub fn new_id() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    hex::encode(b)
}

/// The kernel command line every guest gets. `tsc_early_khz` avoids the failed timer calibration that hangs some
/// TCG boots; `no_timer_check` the IO-APIC check that fails under load.
pub fn kernel_cmdline(accel: Accel) -> String {
    let mut c = String::from("console=ttyS0 quiet loglevel=3 panic=-1 reboot=t no_timer_check cryptomgr.notests mitigations=off 8250.nr_uarts=1");
    if accel == Accel::Tcg {
        // QEMU 7.2's translation cache is keyed by virtual address: with address-space randomization every new
        // process maps the loader and libc somewhere new and the emulator translates them all over again (a
        // dynamic /bin/true: ~30 ms randomized, ~6 ms not). Inside a throwaway VM whose only user is root
        // anyway, fixed maps cost little; the VM is the boundary. Hardware KVM guests keep randomization.
        c.push_str(" norandmaps");
        // The clocksource watchdog compares the TSC against jiffies, and under TCG it is the jiffies that lag:
        // without this the guest drops to a 4 ms jiffies clock.
        c.push_str(" tsc=reliable");
        if let Some(khz) = hutch_vmm::host::tsc_khz() {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
    }
    c
}

pub(crate) fn qemu_img_overlay(backing: &Path, backing_fmt: &str, out: &Path) -> Result<(), SandboxError> {
    let o = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", backing_fmt, "-b"])
        .arg(backing)
        .arg(out)
        .output()
        .map_err(|e| SandboxError::Tool { tool: "qemu-img", message: format!("{e} (install it with `apt-get install qemu-utils`)") })?;
    if !o.status.success() {
        return Err(SandboxError::Tool { tool: "qemu-img", message: String::from_utf8_lossy(&o.stderr).trim().to_string() });
    }
    Ok(())
}

/// The last lines of a VM's console, escaped: the guest writes whatever it likes there, and the tail is
/// printed to the user's terminal and stored in the daemon's database.
pub fn console_tail(path: &Path) -> String {
    // Only the end of the file is read: a guest can write gigabytes to its console.
    let bytes = read_tail(path, 16 << 10);
    let text = hutch_text::escape_lines(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].iter().map(|l| hutch_text::shorten(l, 300)).collect::<Vec<_>>().join("\n");
    if tail.is_empty() {
        "(the console is empty)".into()
    } else {
        tail
    }
}

fn read_tail(path: &Path, max: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else { return Vec::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > max && f.seek(SeekFrom::Start(len - max)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    buf
}

impl Sandbox {
    /// Creates a sandbox: restore from the snapshot when there is a good one, else boot cold (retried once if
    /// the guest hangs). A failed restore falls back to a cold boot; it never fails the run by itself.
    pub async fn create(host: &Host, cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        Self::create_with_notes(host, cfg, &|n| tracing::warn!("{n}")).await
    }

    /// As [`Sandbox::create`], telling `notify` about each fallback or retry as it happens.
    pub async fn create_with_notes(host: &Host, cfg: &SandboxConfig, notify: &(dyn Fn(&str) + Sync)) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        host.reap_stale();
        let accel = host.caps.choose(cfg.accel)?;
        let mut notes = Vec::new();
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "create: reaped leftovers");
        if !cfg.cold {
            match snapshot::lookup(host, cfg, accel) {
                Ok(Some(snap)) => match Self::restore(host, cfg, accel, &snap).await {
                    Ok(mut sb) => {
                        sb.start.took = t0.elapsed();
                        return Ok(sb);
                    }
                    Err(e) => {
                        let n = format!("snapshot restore failed ({}); booting cold and discarding the snapshot", error_chain(&e));
                        notify(&n);
                        notes.push(n);
                        snapshot::discard(&snap);
                    }
                },
                Ok(None) => {
                    let n = "no snapshot for this image and size yet; booting cold (`hutch image build` makes one)".to_string();
                    notify(&n);
                    notes.push(n);
                }
                Err(e) => {
                    let n = format!("snapshot unusable ({}); booting cold", error_chain(&e));
                    notify(&n);
                    notes.push(n);
                }
            }
        }
        let mut sb = match Self::boot_cold(host, cfg, accel).await {
            Err(SandboxError::BootTimeout { timeout, .. }) => {
                let n = format!("the guest did not come up within {timeout:?}; retrying once with a fresh VM");
                notify(&n);
                notes.push(n);
                Self::boot_cold(host, cfg, accel).await?
            }
            r => r?,
        };
        sb.start.snapshot_wanted = !cfg.cold;
        sb.start.notes = notes;
        sb.start.took = t0.elapsed();
        Ok(sb)
    }

    pub(crate) fn vm_config(host: &Host, cfg: &SandboxConfig, accel: Accel, dir: &SandboxDir, disk: PathBuf, memory: Memory) -> VmConfig {
        VmConfig {
            kernel: host.image.kernel.clone(),
            initrd: host.image.initrd.clone(),
            cmdline: [kernel_cmdline(accel)].into_iter().chain(cfg.extra_kernel_args.iter().cloned()).collect::<Vec<_>>().join(" "),
            disk,
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            accel,
            memory,
            dir: dir.path().to_path_buf(),
            sock_dir: dir.sockets().to_path_buf(),
            workspace: cfg.workspace_image.clone(),
            workspace_base: cfg.workspace_base.clone(),
        }
    }

    async fn boot_cold(host: &Host, cfg: &SandboxConfig, accel: Accel) -> Result<Sandbox, SandboxError> {
        let id = new_id();
        let dir = host.sandbox_dir(&id)?;
        let disk = dir.path().join("disk.qcow2");
        qemu_img_overlay(&host.image.rootfs, "raw", &disk)?;
        let vmcfg = Self::vm_config(host, cfg, accel, &dir, disk, Memory::Anonymous);
        let vm = host.qemu.boot(&vmcfg).await?;
        Self::attach(id, dir, vm, cfg, accel, StartMode::Cold, cfg.boot_timeout).await
    }

    pub(crate) async fn restore(host: &Host, cfg: &SandboxConfig, accel: Accel, snap: &snapshot::Snapshot) -> Result<Sandbox, SandboxError> {
        Self::restore_attached(host, cfg, accel, snap).await?.finish(cfg).await
    }

    pub(crate) async fn restore_attached(host: &Host, cfg: &SandboxConfig, accel: Accel, snap: &snapshot::Snapshot) -> Result<Attached, SandboxError> {
        let t0 = Instant::now();
        let id = new_id();
        let dir = host.sandbox_dir(&id)?;
        let disk = dir.path().join("disk.qcow2");
        snap.new_overlay(&disk)?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "restore: overlay created");
        let memory = Memory::File { path: snap.files.memory.clone(), shared: false };
        let vmcfg = Self::vm_config(host, cfg, accel, &dir, disk, memory);
        let vm = host.qemu.restore(&vmcfg, &snap.files).await?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "restore: VMM restored");
        // A restored guest answers in milliseconds; waiting long would only delay the cold-boot fallback.
        Attached::connect(id, dir, vm, accel, StartMode::Restored, Duration::from_secs(5)).await
    }

    /// Handshake, session, identity; kills the VM on any failure.
    async fn attach(
        id: String,
        dir: SandboxDir,
        vm: QemuVm,
        cfg: &SandboxConfig,
        accel: Accel,
        mode: StartMode,
        timeout: Duration,
    ) -> Result<Sandbox, SandboxError> {
        let attached = Attached::connect(id, dir, vm, accel, mode, timeout).await?;
        attached.finish(cfg).await
    }

    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// Guest code blocks the emulator has translated for this VM so far (TCG only).
    pub async fn translated_blocks(&mut self) -> Option<u64> {
        self.vm.translated_blocks().await
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The sandbox's egress gateway (denial summary, bytes used).
    pub fn gateway(&self) -> &hutch_gateway::Gateway {
        &self.gateway
    }

    pub fn vmm_pid(&self) -> Option<u32> {
        self.vm.pid()
    }

    pub fn console_log(&self) -> &Path {
        self.vm.console_log()
    }

    /// Resolves when the VM process ends by itself (guest power-off, panic, VMM crash).
    pub async fn vm_exited(&mut self) -> hutch_vmm::VmExit {
        self.vm.wait().await
    }

    /// Resolves when the agent channel is gone (the VM died or powered off).
    pub async fn channel_closed(&self) {
        while !self.driver.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the VM and removes every file the sandbox had.
    pub async fn destroy(mut self) {
        self.driver.abort();
        self.egress_task.abort();
        self.vm.kill().await;
        // `dir` is dropped here, after the VM is gone.
    }
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
