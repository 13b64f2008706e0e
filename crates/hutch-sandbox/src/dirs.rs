//! Per-sandbox runtime directories and the reaping of leftovers: a directory records who owns it (hutch's pid
//! and start time) and which VMM runs in it (written by the VMM backend the moment it spawns one); a later run
//! kills and removes whatever a dead owner left behind, and kills any VMM whose command line names a
//! directory that is gone or whose owner is dead, so a VMM is found even when its directory is not.
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
}

impl Drop for SandboxDir {
    fn drop(&mut self) {
        if let Some(s) = &self.sockets {
            let _ = std::fs::remove_dir_all(s);
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn start_time(pid: u32) -> Option<u64> {
    hutch_vmm::qemu::process_start_time(pid)
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

/// Kills and removes what dead owners left under `root/sandboxes`, and kills every VMM whose directory there is
/// gone or has a dead owner. Returns the ids reaped (directories removed, or VMMs killed whose directory was
/// already gone).
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
    let sandboxes = root.join("sandboxes");
    let mut reaped = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&sandboxes) {
        for e in entries.flatten() {
            let dir = e.path();
            if !dir.is_dir() || owner_alive(&dir) {
                continue;
            }
            kill_recorded_vmm(&dir);
            for (pid, _) in vmm_processes(&sandboxes).into_iter().filter(|(_, id)| dir.file_name() == Some(std::ffi::OsStr::new(id))) {
                kill_and_wait(pid);
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                reaped.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    // VMMs whose directory is already gone: a host killed between spawning one and recording it (older hutch
    // versions recorded the pid only after a restore finished), or a directory removed by hand.
    for (pid, id) in vmm_processes(&sandboxes) {
        let dir = sandboxes.join(&id);
        if dir.is_dir() && owner_alive(&dir) {
            continue;
        }
        if !dir.exists() {
            tracing::warn!(pid, id = %id, "killing a VMM whose sandbox directory is gone");
            if !reaped.contains(&id) {
                reaped.push(id);
            }
        }
        kill_and_wait(pid);
    }
    reaped
}

/// Kills the VMM named in `dir`'s `vmm.pid`: only the process with that pid and start time (so a reused pid is
/// never hit). A record without a start time falls back to the command line naming `dir`.
fn kill_recorded_vmm(dir: &Path) {
    let Ok(rec) = std::fs::read_to_string(dir.join(hutch_vmm::qemu::VMM_PID_FILE)) else { return };
    let mut it = rec.split_whitespace();
    let Some(pid) = it.next().and_then(|p| p.parse::<i32>().ok()).filter(|p| *p > 0) else { return };
    match it.next().and_then(|s| s.parse::<u64>().ok()).filter(|s| *s > 0) {
        Some(start) => {
            if start_time(pid as u32) == Some(start) {
                kill_and_wait(pid);
            }
        }
        None => kill_if_ours(pid, dir),
    }
}

/// Running VMMs (`qemu-system-*`) whose command line names a directory under `sandboxes`, with that
/// directory's name.
fn vmm_processes(sandboxes: &Path) -> Vec<(i32, String)> {
    let mut needle = sandboxes.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return found };
    let me = std::process::id() as i32;
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let name = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
        if !name.starts_with(b"qemu-system") {
            continue;
        }
        let Some(at) = cmdline.windows(needle.len()).position(|w| w == needle.as_slice()) else { continue };
        let rest = &cmdline[at + needle.len()..];
        let id: Vec<u8> = rest.iter().take_while(|&&b| b != b'/' && b != 0 && b != b',').copied().collect();
        if id.is_empty() || !id.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_' || *b == b'.') || id.starts_with(b".") {
            continue;
        }
        found.push((pid, String::from_utf8_lossy(&id).into_owned()));
    }
    found
}

fn kill_and_wait(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
    for _ in 0..200 {
        // Gone, or a zombie of some other parent (it no longer runs anything).
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(s) if s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')) => return,
            Ok(_) => {}
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Kills `pid` only if its command line names `dir` (so a reused pid is never hit). A command line that does
/// not name it is read again for up to a second before the pid is judged foreign: in two full test runs the
/// stand-in VMM survived a reap, so a single read is not trusted.
fn kill_if_ours(pid: i32, dir: &Path) {
    let needle = dir.as_os_str().as_encoded_bytes();
    for _ in 0..100 {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) {
            kill_and_wait(pid);
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
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

    /// Class 20: a host killed before it recorded its VMM, or a directory removed with its VMM still running,
    /// must not leave the VMM running forever: it is found by the directory its command line names.
    #[test]
    fn class_20_a_vmm_whose_directory_is_gone_is_found_and_killed() {
        let root = tempfile::tempdir().unwrap();
        let kept = SandboxDir::create(root.path(), "kept").unwrap();
        let spawn = |dir: &Path| {
            let mut c = std::process::Command::new("sh");
            std::os::unix::process::CommandExt::arg0(&mut c, "qemu-system-x86_64");
            c.args(["-c", "sleep 60; :", "sh"]).arg(format!("file,id=con,path={}/console.log", dir.display())).spawn().unwrap()
        };
        let gone = root.path().join("sandboxes/0123456789ab");
        let mut orphan = spawn(&gone);
        let mut live_vmm = spawn(kept.path());
        // Both must have exec'd (a process between fork and exec still shows the test's command line).
        for pid in [orphan.id(), live_vmm.id()] {
            for _ in 0..500 {
                if std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"qemu-system")) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let reaped = reap_stale(root.path());
        assert_eq!(reaped, vec!["0123456789ab".to_string()]);
        assert!(!orphan.wait().unwrap().success(), "the VMM of a vanished directory was killed");
        assert!(live_vmm.try_wait().unwrap().is_none(), "a live owner's VMM is left alone");
        let _ = live_vmm.kill();
        let _ = live_vmm.wait();
    }
}
