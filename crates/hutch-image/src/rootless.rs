//! Root filesystems built by an ordinary user. The whole rootfs build (mmdebstrap, tidying, `mkfs.ext4 -d`) runs
//! in a user namespace where the user's first 65536 subordinate ids are ids 0-65535 and the user's own id is 65536:
//! inside, the build is root's build, byte for byte (mmdebstrap's unshare mode, run as the namespace's root, only
//! unshares mount, pid and the rest), and `mkfs.ext4 -d` records the ownership the tree has there. The user's own
//! files stay reachable (their owner is mapped, so the namespace's root may open them), and the finished image is
//! given back to the user. This needs user namespaces, the setuid `newuidmap`/`newgidmap` of Debian's `uidmap`
//! (which `unshare --map-users` runs) and a subordinate id range; [`rootless_build_blockers`] says what is missing,
//! and `hutch doctor` reports it.
//!
//! The namespace runs the current program again with [`HELPER_ARG`]: a program that builds images as an ordinary
//! user must call [`helper_main`] first thing in `main` (the `hutch` binary does).

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::progress::Progress;
use crate::rootfs::{self, Sources};
use crate::spec::CheckedSpec;
use crate::tools::{self, UNSHARE};

/// The first argument that makes [`helper_main`] take over: the rootfs build inside the namespace.
pub const HELPER_ARG: &str = "__hutch-image-rootfs-in-userns";
/// Ids the namespace maps: 0-65535 from the subordinate range, then the user's own.
const MAPPED: u32 = 65536;
/// The user's own uid and gid inside the namespace.
const SELF_IN_NS: u32 = MAPPED;
/// The build request the helper reads, in the build directory.
const REQUEST: &str = "rootless-request.json";
/// A line of the helper's stderr that announces a build stage.
const STAGE_PREFIX: &str = "hutch-stage: ";

/// One thing the host lacks for a rootless build, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: String,
    pub fix: String,
}

/// What stands in the way of a rootless build for `user` (name and uid) below `root` (`/` on a real host; a
/// parameter so that tests can use a fake tree). Empty: the host allows it.
pub fn rootless_build_blockers(root: &Path, user: &str, uid: u32) -> Vec<Missing> {
    let mut missing = Vec::new();
    let read = |rel: &str| std::fs::read_to_string(root.join(rel)).ok();
    let number = |rel: &str| read(rel).and_then(|s| s.trim().parse::<i64>().ok());
    if number("proc/sys/user/max_user_namespaces") == Some(0) {
        missing.push(Missing {
            what: "user namespaces are disabled (user.max_user_namespaces = 0)".into(),
            fix: "sysctl -w user.max_user_namespaces=15000".into(),
        });
    }
    if number("proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        missing.push(Missing {
            what: "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)".into(),
            fix: "sysctl -w kernel.unprivileged_userns_clone=1".into(),
        });
    }
    if number("proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        missing.push(Missing {
            what: "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)"
                .into(),
            fix: "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile for mmdebstrap".into(),
        });
    }
    for tool in ["newuidmap", "newgidmap"] {
        let found = ["usr/bin", "bin", "usr/sbin", "sbin"].iter().map(|d| root.join(d).join(tool)).find(|p| p.is_file());
        match found {
            None => missing.push(Missing { what: format!("{tool} is not installed"), fix: "apt-get install uidmap".into() }),
            Some(p) => {
                use std::os::unix::fs::MetadataExt;
                let setuid = std::fs::metadata(&p).map(|m| m.mode() & 0o4000 != 0 && m.uid() == 0).unwrap_or(false);
                if !setuid {
                    missing.push(Missing {
                        what: format!("{} is not setuid root", p.display()),
                        fix: "apt-get install --reinstall uidmap".into(),
                    });
                }
            }
        }
    }
    for (file, flag) in [("etc/subuid", "--add-subuids"), ("etc/subgid", "--add-subgids")] {
        if !has_subordinate_range(read(file).as_deref().unwrap_or(""), user, uid) {
            missing.push(Missing {
                what: format!("/{file} gives {user} no range of 65536 ids"),
                fix: format!("usermod {flag} 100000-165535 {user} (as root; pick a range no other user has)"),
            });
        }
    }
    if !["usr/bin/mmdebstrap", "bin/mmdebstrap"].iter().any(|p| root.join(p).is_file()) {
        missing.push(Missing { what: "mmdebstrap is not installed".into(), fix: "apt-get install mmdebstrap".into() });
    }
    missing
}

/// Whether a `/etc/subuid`-style text gives `user` (by name or uid) a range of at least 65536 ids.
fn has_subordinate_range(text: &str, user: &str, uid: u32) -> bool {
    subordinate_start(text, user, uid).is_some()
}

/// The start of the first range of at least 65536 ids a `/etc/subuid`-style text gives `user` (by name or uid).
fn subordinate_start(text: &str, user: &str, uid: u32) -> Option<u32> {
    text.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let (Some(who), Some(start), Some(count)) = (f.next(), f.next(), f.next()) else {
            return None;
        };
        let big = count.trim().parse::<u64>().is_ok_and(|c| c >= u64::from(MAPPED));
        ((who == user || who == uid.to_string()) && big).then(|| start.trim().parse().ok()).flatten()
    })
}

/// The ids of the user's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IdMap {
    uid: u32,
    gid: u32,
    subuid: u32,
    subgid: u32,
}

impl IdMap {
    /// This process's: the effective user and group, and their first subordinate ranges.
    fn of_this_process() -> Option<IdMap> {
        let uid = nix::unistd::geteuid();
        let gid = nix::unistd::getegid();
        let name = nix::unistd::User::from_uid(uid).ok().flatten()?.name;
        let read = |f: &str| fs::read_to_string(f).ok();
        let subuid = subordinate_start(&read("/etc/subuid")?, &name, uid.as_raw())?;
        let subgid = subordinate_start(&read("/etc/subgid")?, &name, uid.as_raw())?;
        Some(IdMap { uid: uid.as_raw(), gid: gid.as_raw(), subuid, subgid })
    }

    /// `unshare` with this mapping, a private mount namespace, running `program` as the namespace's root.
    fn command(&self, program: impl Into<OsString>) -> Result<Command, ImageError> {
        let mut cmd = tools::command(UNSHARE.find()?);
        cmd.arg("--user")
            .arg("--mount")
            .arg("--propagation=private")
            .arg(format!("--map-user={SELF_IN_NS}"))
            .arg(format!("--map-group={SELF_IN_NS}"))
            .arg(format!("--map-users={},0,{MAPPED}", self.subuid))
            .arg(format!("--map-groups={},0,{MAPPED}", self.subgid))
            .args(["--setuid=0", "--setgid=0", "--"])
            .arg(program.into());
        Ok(cmd)
    }
}

/// Whether this process builds root filesystems in a user namespace (not root, and the host allows it).
pub(crate) fn available() -> bool {
    !nix::unistd::geteuid().is_root() && IdMap::of_this_process().is_some() && blockers_for_me().is_empty()
}

/// [`rootless_build_blockers`] for this process's user.
pub(crate) fn blockers_for_me() -> Vec<Missing> {
    let uid = nix::unistd::geteuid();
    let name = nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
    rootless_build_blockers(Path::new("/"), &name, uid.as_raw())
}

/// What the helper needs to build: the checked spec's Debian and npm parts and the host's apt sources as read
/// by the caller (so the key the caller computed is the key of what is built).
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    suite: String,
    packages: Vec<String>,
    npm_packages: Vec<String>,
    sources_path: PathBuf,
    sources_text: String,
}

/// Builds the rootfs component into the empty directory `out` (owned by this user and group) in a user
/// namespace; `out` then holds what a root build leaves, owned by the user.
pub(crate) fn build(
    spec: &CheckedSpec,
    sources: &Sources,
    out: &Path,
    progress: &dyn Progress,
) -> Result<rootfs::RootfsInfo, ImageError> {
    let map = IdMap::of_this_process().ok_or_else(|| ImageError::NeedsRoot { shared: None, rootless: describe(&blockers_for_me()) })?;
    let request = Request {
        suite: spec.suite.clone(),
        packages: spec.packages.clone(),
        npm_packages: spec.npm_packages.clone(),
        sources_path: sources.path.clone(),
        sources_text: sources.text.clone(),
    };
    fsutil::write_json(&out.join(REQUEST), &request)?;
    let exe = std::env::current_exe().ctx("finding the running program", "/proc/self/exe")?;
    let mut cmd = map.command(&exe)?;
    cmd.arg(HELPER_ARG).arg(out).stdout(Stdio::null()).stderr(Stdio::piped());
    let shown = tools::describe(&cmd);
    let mut child = cmd.spawn().map_err(|source| ImageError::Spawn { command: shown.clone(), source })?;
    let mut said = Vec::new();
    if let Some(stderr) = child.stderr.take() {
        // Bounded: stage lines go to the progress display, the rest is kept for the error (last 40 lines, each cut).
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            match line.strip_prefix(STAGE_PREFIX) {
                Some(stage) => progress.stage(&format!("{stage} (user namespace)")),
                None => {
                    said.push(line.chars().take(2000).collect::<String>());
                    if said.len() > 40 {
                        said.remove(0);
                    }
                }
            }
        }
    }
    let status = child.wait().map_err(|source| ImageError::Spawn { command: shown.clone(), source })?;
    let _ = fs::remove_file(out.join(REQUEST));
    if !status.success() {
        return Err(ImageError::CommandFailed {
            command: shown,
            status: status.to_string(),
            stderr_tail: said.join(" | "),
            hint: "; the root filesystem is built in a user namespace (`hutch doctor` checks what it needs)".into(),
        });
    }
    rootfs::read_info(out)
}

/// Deletes `path`, which a rootless build left (files owned by the user's subordinate ids, which the user cannot
/// delete from outside), from inside the user's namespace.
pub(crate) fn remove_tree(path: &Path) -> Result<(), ImageError> {
    let map = IdMap::of_this_process().ok_or_else(|| ImageError::io("removing", path, std::io::Error::from(std::io::ErrorKind::PermissionDenied)))?;
    let mut cmd = map.command("rm")?;
    cmd.args(["-rf", "--one-file-system", "--"]).arg(path);
    tools::run(&mut cmd, "").map(drop)
}

/// In `main`, before anything else: when this process is the rootless build's helper (first argument
/// [`HELPER_ARG`]), runs it and returns the exit code; otherwise `None`.
pub fn helper_main() -> Option<i32> {
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() != Some(std::ffi::OsStr::new(HELPER_ARG)) {
        return None;
    }
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("{HELPER_ARG}: missing the build directory");
        return Some(2);
    };
    Some(match helper(&out) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{e}");
            // What a failed build left is the namespace's to delete; the caller's build directory stays.
            if let Ok(entries) = fs::read_dir(&out) {
                for e in entries.flatten() {
                    if e.file_name() != REQUEST {
                        let _ = fsutil::remove_tree(&e.path());
                    }
                }
            }
            1
        }
    })
}

/// Stage lines for the caller's progress display.
struct StageLines;

impl Progress for StageLines {
    fn stage(&self, msg: &str) {
        eprintln!("{STAGE_PREFIX}{msg}");
    }
    fn finish(&self) {}
}

fn helper(out: &Path) -> Result<(), ImageError> {
    // The namespace's root, or this is no helper's namespace: refuse rather than build as the user.
    if !nix::unistd::geteuid().is_root() {
        return Err(ImageError::InvalidSpec(format!("{HELPER_ARG} runs only as the root of a user namespace")));
    }
    // Die with the build that started us (the parent-death signal does not survive unshare's setuid).
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(|e| ImageError::io("setting the parent-death signal", out, e.into()))?;
    if nix::unistd::getppid().as_raw() == 1 {
        return Err(ImageError::io("starting", out, std::io::Error::other("the build that started this helper is gone")));
    }
    let path = out.join(REQUEST);
    let bytes = fs::read(&path).ctx("reading", &path)?;
    let request: Request = serde_json::from_slice(&bytes).map_err(|source| ImageError::Corrupt { path: path.clone(), source })?;
    let spec = CheckedSpec::for_rootfs(request.suite, request.packages, request.npm_packages);
    let sources = Sources { path: request.sources_path, text: request.sources_text };
    rootfs::build(&spec, &sources, out, &StageLines)?;
    // Give what the build made back to the user (its id in here), so the user can move and delete it.
    for e in fs::read_dir(out).ctx("listing", out)?.flatten() {
        let p = e.path();
        if fs::symlink_metadata(&p).is_ok_and(|m| m.uid() != SELF_IN_NS) {
            std::os::unix::fs::lchown(&p, Some(SELF_IN_NS), Some(SELF_IN_NS)).ctx("giving back to the user", &p)?;
        }
    }
    Ok(())
}

/// The blockers as one line for a message.
pub(crate) fn describe(blockers: &[Missing]) -> String {
    if blockers.is_empty() {
        return "nothing is missing for a rootless build, but this user has no subordinate ids".into();
    }
    blockers.iter().map(|b| format!("{} ({})", b.what, b.fix)).collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_matched_by_name_or_uid_and_size() {
        let text = "alice:100000:65536\n1001:200000:65536\nsmall:300000:1000\n";
        assert!(has_subordinate_range(text, "alice", 1000));
        assert!(has_subordinate_range(text, "bob", 1001));
        assert!(!has_subordinate_range(text, "small", 1002));
        assert!(!has_subordinate_range(text, "carol", 1003));
    }

    #[test]
    fn subordinate_starts_are_read() {
        let text = "alice:100000:65536\nbob:200000:70000\n";
        assert_eq!(subordinate_start(text, "bob", 5), Some(200_000));
        assert_eq!(subordinate_start(text, "x", 5), None);
    }

    #[test]
    fn a_bare_host_lists_every_blocker_with_a_fix() {
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(t.path().join("proc/sys/user")).expect("mkdir");
        std::fs::write(t.path().join("proc/sys/user/max_user_namespaces"), "0\n").expect("write");
        let missing = rootless_build_blockers(t.path(), "alice", 1000);
        let text: Vec<String> = missing.iter().map(|m| format!("{} -> {}", m.what, m.fix)).collect();
        for needle in ["max_user_namespaces", "newuidmap", "newgidmap", "/etc/subuid", "/etc/subgid", "mmdebstrap"] {
            assert!(text.iter().any(|l| l.contains(needle)), "{needle} in {text:?}");
        }
        assert!(missing.iter().all(|m| !m.fix.is_empty()));
    }
}
