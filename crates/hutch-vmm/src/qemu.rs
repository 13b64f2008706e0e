//! The QEMU `microvm` backend: command line, process supervision, QMP snapshot (migration to a file with RAM in
//! a file-backed memory backend) and restore (`-incoming defer`, RAM mapped privately from the snapshot).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

use crate::qmp::Qmp;
use crate::{io_err, Accel, Backend, Memory, SnapshotFiles, Vm, VmConfig, VmExit, VmmError};

const START_TIMEOUT: Duration = Duration::from_secs(10);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    /// Drop to this user once QEMU has opened its files (`-runas`).
    run_as: Option<RunAs>,
}

/// An unprivileged account for the VMM.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// When running as root: the dedicated `hutch-vmm` account if it exists, else `nobody`. Otherwise none (the
    /// VMM already runs unprivileged, as the invoking user).
    pub fn detect() -> Option<RunAs> {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        ["hutch-vmm", "nobody"].iter().find_map(|n| {
            let u = nix::unistd::User::from_name(n).ok()??;
            Some(RunAs { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw() })
        })
    }
}

impl Qemu {
    pub fn new(binary: PathBuf) -> Self {
        Self { binary, run_as: RunAs::detect() }
    }

    /// Runs QEMU as `run_as` (or as the invoking user with `None`).
    pub fn with_run_as(mut self, run_as: Option<RunAs>) -> Self {
        self.run_as = run_as;
        self
    }

    pub fn run_as(&self) -> Option<&RunAs> {
        self.run_as.as_ref()
    }

    /// The full command line for `cfg`. Public so that benchmarks can run the same VM by hand.
    pub fn args(&self, cfg: &VmConfig, incoming: bool) -> Vec<OsString> {
        let dir = &cfg.dir;
        let sock_dir = &cfg.sock_dir;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        // A marker in the process list (`ps`) naming the VM's directory; the reaper also finds a VMM by its
        // directory in the command line when the directory itself is gone.
        push("-name".into());
        push(format!("hutch-{}", dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().replace(',', "_")));
        let mem_backend = !matches!(cfg.memory, Memory::Anonymous);
        let mut machine = "microvm,x-option-roms=off,isa-serial=on,rtc=on".to_string();
        if mem_backend {
            machine.push_str(",memory-backend=mem");
        }
        push("-M".into());
        push(machine);
        match cfg.accel {
            Accel::Kvm => {
                push("-accel".into());
                push("kvm".into());
                push("-cpu".into());
                push("host".into());
            }
            Accel::Tcg => {
                push("-accel".into());
                // A bounded translation cache keeps an idle guest's footprint small.
                push("tcg,thread=multi,tb-size=64".into());
                push("-cpu".into());
                push("max".into());
            }
        }
        push("-m".into());
        push(format!("{}M", cfg.memory_mib));
        if let Memory::File { path, shared } = &cfg.memory {
            push("-object".into());
            push(format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                cfg.memory_mib,
                path.display(),
                if *shared { "on" } else { "off" }
            ));
        }
        if let Memory::Ram = &cfg.memory {
            push("-object".into());
            push(format!("memory-backend-ram,id=mem,size={}M", cfg.memory_mib));
        }
        push("-smp".into());
        push(cfg.cpus.to_string());
        for s in ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"] {
            push(s.into());
        }
        // seccomp: no spawning, no obsolete syscalls, no privilege changes (except the one -runas makes, which
        // leaves QEMU without any privilege to change back to).
        push("-sandbox".into());
        let elevate = if self.run_as.is_some() { "allow" } else { "deny" };
        push(format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"));
        push("-chardev".into());
        push(format!("file,id=con,path={}", dir.join("console.log").display()));
        push("-serial".into());
        push("chardev:con".into());
        push("-kernel".into());
        push(cfg.kernel.display().to_string());
        push("-initrd".into());
        push(cfg.initrd.display().to_string());
        push("-append".into());
        push(cfg.cmdline.clone());
        push("-drive".into());
        push(format!("file={},format=qcow2,if=none,id=root,cache=unsafe,discard=unmap", cfg.disk.display()));
        push("-device".into());
        push("virtio-blk-device,drive=root".into());
        // The workspace slot, second in device order in every VM (cold, snapshotted, restored), read-only; the
        // base slot third (see `DEVICE_LAYOUT`).
        for (node, image, serial) in
            [("ws", &cfg.workspace, crate::WORKSPACE_SERIAL), ("wsbase", &cfg.workspace_base, crate::WORKSPACE_BASE_SERIAL)]
        {
            push("-blockdev".into());
            push(match image {
                Some(img) => format!(
                    "driver=raw,node-name={node},read-only=on,file.driver=file,file.filename={},file.locking=off,file.drop-cache=off",
                    qemu_opt_escape(&img.display().to_string())
                ),
                None => format!(
                    "driver=null-co,node-name={node},read-only=on,read-zeroes=on,size={}",
                    crate::WORKSPACE_PLACEHOLDER_BYTES
                ),
            });
            push("-device".into());
            push(format!("virtio-blk-device,drive={node},serial={serial}"));
        }
        push("-device".into());
        push("virtio-rng-device".into());
        // The only channel to the host: one virtio-serial port, host end a unix socket in the VM's private dir.
        push("-device".into());
        push("virtio-serial-device,max_ports=2".into());
        push("-chardev".into());
        push(format!("socket,id=agent,path={},server=on,wait=off", agent_socket(sock_dir).display()));
        push("-device".into());
        push(format!("virtserialport,chardev=agent,name={}", hutch_proto::AGENT_PORT_NAME));
        // The monitor is a host-side unix socket; no guest device reaches it.
        push("-qmp".into());
        push(format!("unix:{},server=on,wait=off", qmp_socket(sock_dir).display()));
        if incoming {
            push("-incoming".into());
            push("defer".into());
        }
        if let Some(r) = &self.run_as {
            push("-runas".into());
            push(r.name.clone());
        }
        a
    }

    async fn spawn(&self, cfg: &VmConfig, incoming: bool) -> Result<QemuVm, VmmError> {
        if !self.binary.is_file() {
            return Err(VmmError::MissingBinary(self.binary.display().to_string()));
        }
        if let Some(r) = &self.run_as {
            let uid = nix::unistd::Uid::from_raw(r.uid);
            let gid = nix::unistd::Gid::from_raw(r.gid);
            // After dropping privileges QEMU still creates sockets in the directory (incoming migration) and
            // reopens the disk layer (when an incoming migration completes).
            for path in [&cfg.dir, &cfg.sock_dir, &cfg.disk] {
                nix::unistd::chown(path, Some(uid), Some(gid))
                    .map_err(|e| VmmError::Io { what: format!("chown {} to {}", path.display(), r.name), source: e.into() })?;
            }
        }
        let log_path = cfg.dir.join("qemu.log");
        let log = std::fs::File::create(&log_path).map_err(io_err(format!("cannot create {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io_err("dup log fd"))?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        // Nothing of hutch's environment (which holds the values of egress secrets) reaches the
        // process that runs the guest.
        cmd.env_clear()
            .args(self.args(cfg, incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            // Its own process group: a Ctrl-C at the terminal reaches hutch, which tears the VM down in order.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only sets this child's parent-death signal so that QEMU dies
        // with hutch even when hutch is SIGKILLed. Run by an ordinary user, QEMU keeps it for its whole life (no
        // privilege change clears it). Started by root, the kernel clears it when QEMU drops privileges (-runas);
        // from then on the guest powers itself off when its host session goes away, and the next run reaps.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(VmmError::Spawn)?;
        // Recorded before anything can fail or wait: a host killed from here on leaves a directory that names
        // its VMM (pid and start time), so the next run or daemon finds and kills it.
        if let Some(pid) = child.id() {
            let start = process_start_time(pid).unwrap_or(0);
            let _ = std::fs::write(cfg.dir.join(VMM_PID_FILE), format!("{pid} {start}"));
        }
        let mut vm = QemuVm {
            child,
            dir: cfg.sock_dir.clone(),
            console: cfg.dir.join("console.log"),
            log: log_path,
            qmp: None,
        };
        match Qmp::connect(&qmp_socket(&cfg.sock_dir), START_TIMEOUT).await {
            Ok(q) => vm.qmp = Some(q),
            Err(e) => {
                let why = vm.early_exit_reason().await;
                vm.kill().await;
                return Err(why.unwrap_or(e));
            }
        }
        Ok(vm)
    }
}

/// The file in a VM's directory that names its VMM: `<pid> <start time>`.
pub const VMM_PID_FILE: &str = "vmm.pid";

/// The kernel's start time of `pid` (clock ticks since boot): with the pid, it names one process, never a
/// later one that reused the pid.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A value inside a QEMU option list: a comma is written twice.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

pub fn agent_socket(dir: &Path) -> PathBuf {
    dir.join("agent.sock")
}

fn qmp_socket(dir: &Path) -> PathBuf {
    dir.join("qmp.sock")
}

impl Backend for Qemu {
    type Vm = QemuVm;

    async fn boot(&self, cfg: &VmConfig) -> Result<QemuVm, VmmError> {
        self.spawn(cfg, false).await
    }

    async fn restore(&self, cfg: &VmConfig, snap: &SnapshotFiles) -> Result<QemuVm, VmmError> {
        let t = std::time::Instant::now();
        let mut vm = self.spawn(cfg, true).await?;
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "restore: QMP connected");
        let r = vm.load(snap).await;
        tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "restore: loaded");
        match r {
            Ok(()) => Ok(vm),
            Err(e) => {
                let why = vm.early_exit_reason().await;
                vm.kill().await;
                Err(why.unwrap_or(e))
            }
        }
    }
}

impl Qemu {
    /// Starts `cfg` from a full save ([`QemuVm::save_full`]: device state and RAM in one stream) and lets it
    /// run. `cfg.memory` must name RAM the way the saved VM did ([`Memory::Ram`] for a file-backed one).
    pub async fn restore_full(&self, cfg: &VmConfig, state: &Path) -> Result<QemuVm, VmmError> {
        let mut vm = self.spawn(cfg, true).await?;
        match vm.load_full(state).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                let why = vm.early_exit_reason().await;
                vm.kill().await;
                Err(why.unwrap_or(e))
            }
        }
    }
}

/// Migration bandwidth for a save to disk: QEMU's default (128 MiB/s) would make a pause of a 512 MiB guest take
/// seconds for nothing; the stream goes to a local file.
const SAVE_BANDWIDTH: u64 = 8 << 30;

pub struct QemuVm {
    child: tokio::process::Child,
    /// Where its sockets are.
    dir: PathBuf,
    console: PathBuf,
    log: PathBuf,
    qmp: Option<Qmp>,
}

impl QemuVm {
    /// How many guest code blocks TCG has translated in this process so far (`None` off TCG or on error): the
    /// cost that dominates a fresh emulator's first commands.
    pub async fn translated_blocks(&mut self) -> Option<u64> {
        let r = self.qmp().ok()?.execute("human-monitor-command", json!({"command-line": "info jit"})).await.ok()?;
        let text = r.as_str()?;
        let line = text.lines().find(|l| l.trim_start().starts_with("TB count"))?;
        line.split_whitespace().nth(2)?.parse().ok()
    }

    fn qmp(&mut self) -> Result<&mut Qmp, VmmError> {
        self.qmp.as_mut().ok_or_else(|| VmmError::Qmp("monitor not connected".into()))
    }

    async fn load(&mut self, snap: &SnapshotFiles) -> Result<(), VmmError> {
        let state = tokio::fs::read(&snap.state)
            .await
            .map_err(|e| VmmError::Snapshot { what: "state unreadable", reason: format!("{}: {e}", snap.state.display()) })?;
        let sock = self.dir.join("migrate-in.sock");
        let qmp = self.qmp()?;
        qmp.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}))
            .await?;
        qmp.execute("migrate-incoming", json!({"uri": format!("unix:{}", sock.display())})).await?;
        let mut conn = UnixStream::connect(&sock).await.map_err(io_err("connect to the incoming migration socket"))?;
        conn.write_all(&state).await.map_err(io_err("send snapshot state"))?;
        conn.shutdown().await.map_err(io_err("send snapshot state"))?;
        drop(conn);
        qmp.wait_migration(MIGRATION_TIMEOUT).await?;
        // Without -S the guest resumes by itself once the state is loaded; make sure it runs.
        let st = qmp.execute("query-status", json!({})).await?;
        if st.get("running").and_then(|v| v.as_bool()) != Some(true) {
            qmp.execute("cont", json!({})).await?;
        }
        let _ = std::fs::remove_file(&sock);
        Ok(())
    }

    async fn load_full(&mut self, state: &Path) -> Result<(), VmmError> {
        let mut file = tokio::fs::File::open(state)
            .await
            .map_err(|e| VmmError::Snapshot { what: "state unreadable", reason: format!("{}: {e}", state.display()) })?;
        let sock = self.dir.join("migrate-in.sock");
        let qmp = self.qmp()?;
        qmp.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "x-ignore-shared", "state": false}]}))
            .await?;
        qmp.execute("migrate-incoming", json!({"uri": format!("unix:{}", sock.display())})).await?;
        let mut conn = UnixStream::connect(&sock).await.map_err(io_err("connect to the incoming migration socket"))?;
        tokio::io::copy(&mut file, &mut conn).await.map_err(io_err("send the saved state"))?;
        conn.shutdown().await.map_err(io_err("send the saved state"))?;
        drop(conn);
        qmp.wait_migration(MIGRATION_TIMEOUT).await?;
        let st = qmp.execute("query-status", json!({})).await?;
        if st.get("running").and_then(|v| v.as_bool()) != Some(true) {
            qmp.execute("cont", json!({})).await?;
        }
        let _ = std::fs::remove_file(&sock);
        Ok(())
    }

    /// Stops the guest and saves its whole state (devices and every RAM page, whatever backs it) to `state`.
    /// Its disk layer is flushed by QEMU as the migration completes. The VM stays stopped; kill it after.
    pub async fn save_full(&mut self, state: &Path) -> Result<u64, VmmError> {
        let sock = self.dir.join("migrate-out.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(io_err("bind the migration socket"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).map_err(io_err("chmod the migration socket"))?;
        }
        let qmp = self.qmp()?;
        qmp.execute("stop", json!({})).await?;
        qmp.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "x-ignore-shared", "state": false}]}))
            .await?;
        qmp.execute("migrate-set-parameters", json!({"max-bandwidth": SAVE_BANDWIDTH})).await?;
        qmp.execute("migrate", json!({"uri": format!("unix:{}", sock.display())})).await?;
        let (mut conn, _) = tokio::time::timeout(MIGRATION_TIMEOUT, listener.accept())
            .await
            .map_err(|_| VmmError::Timeout(MIGRATION_TIMEOUT, "QEMU to connect the migration socket"))?
            .map_err(io_err("accept the migration connection"))?;
        let mut out = tokio::fs::File::create(state).await.map_err(io_err(format!("create {}", state.display())))?;
        let n = tokio::io::copy(&mut conn, &mut out).await.map_err(io_err("save the migration stream"))?;
        out.sync_all().await.map_err(io_err("sync the saved state"))?;
        self.qmp()?.wait_migration(MIGRATION_TIMEOUT).await?;
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        Ok(n)
    }

    /// QEMU's own words if it already exited.
    async fn early_exit_reason(&mut self) -> Option<VmmError> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match self.child.try_wait() {
            Ok(Some(st)) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                Some(VmmError::EarlyExit(format!("{st}: {tail}")))
            }
            _ => None,
        }
    }
}

impl Vm for QemuVm {
    async fn connect_agent(&self) -> Result<UnixStream, VmmError> {
        let path = agent_socket(&self.dir);
        UnixStream::connect(&path).await.map_err(io_err(format!("connect to the agent channel {}", path.display())))
    }

    async fn snapshot(&mut self, snap: &SnapshotFiles) -> Result<(), VmmError> {
        let sock = self.dir.join("migrate-out.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(io_err("bind the migration socket"))?;
        // QEMU connects after it dropped privileges; the directory is private to the sandbox.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).map_err(io_err("chmod the migration socket"))?;
        }
        let qmp = self.qmp()?;
        qmp.execute("stop", json!({})).await?;
        qmp.execute("migrate-set-capabilities", json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}))
            .await?;
        qmp.execute("migrate", json!({"uri": format!("unix:{}", sock.display())})).await?;
        let (mut conn, _) = tokio::time::timeout(MIGRATION_TIMEOUT, listener.accept())
            .await
            .map_err(|_| VmmError::Timeout(MIGRATION_TIMEOUT, "QEMU to connect the migration socket"))?
            .map_err(io_err("accept the migration connection"))?;
        let mut out = tokio::fs::File::create(&snap.state).await.map_err(io_err(format!("create {}", snap.state.display())))?;
        tokio::io::copy(&mut conn, &mut out).await.map_err(io_err("save the migration stream"))?;
        out.sync_all().await.map_err(io_err("sync the snapshot state"))?;
        self.qmp()?.wait_migration(MIGRATION_TIMEOUT).await?;
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        Ok(())
    }

    async fn pause(&mut self) -> Result<(), VmmError> {
        self.qmp()?.execute("stop", json!({})).await.map(|_| ())
    }

    async fn resume(&mut self) -> Result<(), VmmError> {
        self.qmp()?.execute("cont", json!({})).await.map(|_| ())
    }

    async fn wait(&mut self) -> VmExit {
        use std::os::unix::process::ExitStatusExt;
        match self.child.wait().await {
            Ok(st) => VmExit { code: st.code(), signal: st.signal() },
            Err(_) => VmExit { code: None, signal: None },
        }
    }

    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn console_log(&self) -> &Path {
        &self.console
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cfg(workspace: Option<PathBuf>, workspace_base: Option<PathBuf>) -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0".into(),
            disk: "/d/disk.qcow2".into(),
            cpus: 1,
            memory_mib: 256,
            accel: Accel::Tcg,
            memory: Memory::Anonymous,
            dir: "/d".into(),
            sock_dir: "/d".into(),
            workspace,
            workspace_base,
        }
    }

    /// The values of every `flag` in the command line, in order.
    fn values(args: &[OsString], flag: &str) -> Vec<String> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn both_workspace_slots_exist_in_every_vm_in_a_fixed_order() {
        let q = Qemu::new("/q".into()).with_run_as(None);
        let empty = q.args(&cfg(None, None), false);
        let full = q.args(&cfg(Some("/w/a,b.erofs".into()), Some("/w/base.erofs".into())), true);
        // Device order is what a snapshot's device state is matched by: images or not, the devices are the same.
        let devices = values(&empty, "-device");
        assert_eq!(devices, values(&full, "-device"));
        let blk: Vec<&String> = devices.iter().filter(|d| d.starts_with("virtio-blk-device")).collect();
        assert_eq!(
            blk,
            [
                "virtio-blk-device,drive=root",
                &format!("virtio-blk-device,drive=ws,serial={}", crate::WORKSPACE_SERIAL),
                &format!("virtio-blk-device,drive=wsbase,serial={}", crate::WORKSPACE_BASE_SERIAL),
            ]
        );
        let placeholder = format!("read-only=on,read-zeroes=on,size={}", crate::WORKSPACE_PLACEHOLDER_BYTES);
        let nodes = values(&empty, "-blockdev");
        assert_eq!(nodes.len(), 2);
        assert!(nodes.iter().all(|n| n.starts_with("driver=null-co,") && n.ends_with(&placeholder)), "{nodes:?}");
        let nodes = values(&full, "-blockdev");
        assert!(nodes[0].starts_with("driver=raw,node-name=ws,read-only=on,") && nodes[0].contains("file.filename=/w/a,,b.erofs,"), "{nodes:?}");
        assert!(nodes[1].starts_with("driver=raw,node-name=wsbase,read-only=on,") && nodes[1].contains("file.filename=/w/base.erofs,"), "{nodes:?}");
    }
}
