//! Per-sandbox runtime directories and the reaping of leftovers: a directory records who owns it (hutch's pid
//! and start time) and which VMM runs in it; a later run kills and removes whatever a dead owner left behind.
//! Sockets may live apart, under a runtime root (`$XDG_RUNTIME_DIR/hutch` for a user), in a directory of the same
//! id. Directories are private to their owner (0700); root's `sandboxes/` is searchable but not listable (0711)
//! so that QEMU, dropped to its own account, reaches its directory.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::SandboxError;

/// A sandbox's directory (and its sockets' directory, when apart), removed with everything in it when dropped.
#[derive(Debug)]
pub struct SandboxDir {
    path: PathBuf,
    sockets: Option<PathBuf>,
}

/// `dir` (and its parents) created if missing, then given `mode`.
fn private_dir(dir: &Path, mode: u32) -> Result<(), SandboxError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", dir.display()), source: e })
}

fn sandboxes_mode() -> u32 {
    if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    }
}

impl SandboxDir {
    pub fn create(root: &Path, id: &str) -> Result<Self, SandboxError> {
        Self::create_in(root, None, id)
    }

    /// `root/sandboxes/<id>`, with the sockets in `runtime/sandboxes/<id>` when a runtime root is given.
    pub fn create_in(root: &Path, runtime: Option<&Path>, id: &str) -> Result<Self, SandboxError> {
        let sandboxes = root.join("sandboxes");
        private_dir(&sandboxes, sandboxes_mode())?;
        let path = sandboxes.join(id);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", path.display()), source: e })?;
        let mut dir = Self { path, sockets: None };
        let me = std::process::id();
        let owner = format!("{me} {}", start_time(me).unwrap_or(0));
        std::fs::write(dir.path.join("owner"), owner).map_err(|e| SandboxError::HostIo { what: "cannot write the owner file".into(), source: e })?;
        if let Some(runtime) = runtime {
            private_dir(runtime, 0o700)?;
            let parent = runtime.join("sandboxes");
            private_dir(&parent, 0o700)?;
            let sockets = parent.join(id);
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&sockets)
                .map_err(|e| SandboxError::HostIo { what: format!("cannot create {}", sockets.display()), source: e })?;
            dir.sockets = Some(sockets);
        }
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the VM's unix sockets go.
    pub fn sockets(&self) -> &Path {
        self.sockets.as_deref().unwrap_or(&self.path)
    }

    pub fn record_vmm(&self, pid: Option<u32>) {
        if let Some(pid) = pid {
            let _ = std::fs::write(self.path.join("vmm.pid"), pid.to_string());
        }
    }
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        if let Some(s) = &self.sockets {
            let _ = std::fs::remove_dir_all(s);
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The kernel's start time of `pid` (clock ticks since boot), to tell a live owner from a reused pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn owner_alive(dir: &Path) -> bool {
    let Ok(owner) = std::fs::read_to_string(dir.join("owner")) else {
        // Being created right now, or a creation that died before writing it: judge by age.
        let age = std::fs::metadata(dir).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        return age.is_none_or(|a| a < Duration::from_secs(60));
    };
    let mut it = owner.split_whitespace();
    let (Some(pid), Some(start)) = (it.next().and_then(|p| p.parse::<u32>().ok()), it.next().and_then(|s| s.parse::<u64>().ok())) else {
        return false;
    };
    start_time(pid) == Some(start)
}

/// Kills and removes what dead owners left under `root/sandboxes`. Returns the ids reaped.
pub fn reap_stale(root: &Path) -> Vec<String> {
    reap_stale_in(root, None)
}

/// [`reap_stale`], also removing the socket directories under `runtime/sandboxes` of the sandboxes reaped, and
/// those whose sandbox directory is gone (a crash between the two removals).
pub fn reap_stale_in(root: &Path, runtime: Option<&Path>) -> Vec<String> {
    let reaped = reap_dirs(root);
    if let Some(runtime) = runtime {
        if let Ok(entries) = std::fs::read_dir(runtime.join("sandboxes")) {
            for e in entries.flatten() {
                let name = e.file_name();
                let state = root.join("sandboxes").join(&name);
                // A socket directory is made after its sandbox directory and removed before it, so one without is
                // left over.
                if !state.exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for id in &reaped {
            let _ = std::fs::remove_dir_all(runtime.join("sandboxes").join(id));
        }
    }
    reaped
}

fn reap_dirs(root: &Path) -> Vec<String> {
    let mut reaped = Vec::new();
    let Ok(entries) = std::fs::read_dir(root.join("sandboxes")) else {
        return reaped;
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.is_dir() || owner_alive(&dir) {
            continue;
        }
        if let Some(pid) = std::fs::read_to_string(dir.join("vmm.pid")).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
            kill_if_ours(pid, &dir);
        }
        if std::fs::remove_dir_all(&dir).is_ok() {
            reaped.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    reaped
}

/// Kills `pid` only if its command line names `dir` (so a reused pid is never hit). A command line that does
/// not name it is read again for up to a second before the pid is judged foreign: in two full test runs the
/// stand-in VMM survived a reap, so a single read is not trusted.
fn kill_if_ours(pid: i32, dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut ours = false;
    for _ in 0..100 {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            ours = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !ours {
        return;
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    for _ in 0..200 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_owner_is_reaped_with_its_process_and_live_one_is_kept() {
        let root = tempfile::tempdir().unwrap();
        let live = SandboxDir::create(root.path(), "live").unwrap();
        // A dead owner: a pid that exited, with a "VMM" (a process whose argv names the dir) still running. One
        // plain program (`sleep`, the dir as its argv[0]): no shell or interpreter wrapper that could exec, fork
        // or take seconds to start on a loaded host.
        let stale = root.path().join("sandboxes/stale");
        std::fs::create_dir_all(&stale).unwrap();
        let mut dead = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = dead.id();
        dead.wait().unwrap();
        std::fs::write(stale.join("owner"), format!("{dead_pid} 1")).unwrap();
        let mut vmm = std::process::Command::new("sleep");
        std::os::unix::process::CommandExt::arg0(&mut vmm, &stale);
        let mut vmm = vmm.arg("60").spawn().unwrap();
        std::fs::write(stale.join("vmm.pid"), vmm.id().to_string()).unwrap();
        let seen = String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", vmm.id())).unwrap_or_default()).replace('\0', " ");

        let reaped = reap_stale(root.path());
        assert_eq!(reaped, vec!["stale".to_string()]);
        assert!(!stale.exists());
        let st = vmm.wait().unwrap();
        assert!(!st.success(), "the leftover process was killed (its command line read {seen:?})");
        assert!(live.path().exists());
        let p = live.path().to_path_buf();
        drop(live);
        assert!(!p.exists());
    }
}
