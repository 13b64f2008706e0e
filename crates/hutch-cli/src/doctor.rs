//! `hutch doctor`: what this host can do, and how to fix each problem found. The host programs it checks come
//! from `scripts/host-tools`, the same list `scripts/deps` installs and verifies, so the two never disagree.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hutch_vmm::{HostCaps, KvmKind};

use crate::cli::DoctorArgs;

/// The manifest shared with `scripts/deps`.
const HOST_TOOLS: &str = include_str!("../../../scripts/host-tools");

/// One line of `scripts/host-tools`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostTool {
    program: String,
    package: String,
    /// Needed by `hutch run`/`hutch image build`, not only by the tests.
    required: bool,
    /// Needed by an ordinary user's image build (checked for presence and the setuid bit, not run).
    rootless: bool,
    version_args: Vec<String>,
}

fn host_tools() -> Vec<HostTool> {
    HOST_TOOLS
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let program = f.next()?.to_string();
            let package = f.next()?.to_string();
            let kind = f.next()?;
            let (required, rootless) = (kind == "required", kind == "rootless");
            Some(HostTool { program, package, required, rootless, version_args: f.map(str::to_string).collect() })
        })
        .collect()
}

/// Where a program is, searching the sbin directories too (a non-root PATH often lacks them).
fn locate(program: &str) -> Option<PathBuf> {
    hutch_vmm::host::find_in_path(program)
        .or_else(|| ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(|d| Path::new(d).join(program)).find(|p| p.is_file()))
}

/// What running a tool told us: the first line of its output, or why it did not run.
enum Probe {
    Ran(String),
    Missing,
    Broken(String),
}

fn probe(tool: &HostTool) -> (Option<PathBuf>, Probe) {
    let Some(path) = locate(&tool.program) else { return (None, Probe::Missing) };
    if tool.version_args == ["-"] {
        use std::os::unix::fs::MetadataExt;
        let setuid = std::fs::metadata(&path).is_ok_and(|m| m.mode() & 0o4000 != 0 && m.uid() == 0);
        let probe = if setuid { Probe::Ran("setuid root".into()) } else { Probe::Broken("not setuid root".into()) };
        return (Some(path), probe);
    }
    let out = Command::new(&path).args(&tool.version_args).stdin(Stdio::null()).env("LC_ALL", "C").output();
    let probe = match out {
        Ok(o) if o.status.success() => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            Probe::Ran(String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().chars().take(80).collect())
        }
        Ok(o) => Probe::Broken(format!("`{} {}` exited with {}", tool.program, tool.version_args.join(" "), o.status)),
        Err(e) => Probe::Broken(format!("cannot run it: {e}")),
    };
    (Some(path), probe)
}

/// The major version in a `... version 7.2.22 ...` line.
fn major_version(line: &str) -> Option<u32> {
    let rest = &line[line.find("version ")? + "version ".len()..];
    rest.split('.').next()?.trim().parse().ok()
}

/// A dynamically linked busybox cannot run in the initramfs, which has no libc.
fn is_static_elf(path: &Path) -> Option<bool> {
    let bytes = std::fs::read(path).ok()?;
    // An ELF with a PT_INTERP program header is dynamically linked.
    if bytes.get(..4)? != b"\x7fELF" || *bytes.get(4)? != 2 {
        return None;
    }
    let u16_at = |o: usize| bytes.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| bytes.get(o..o + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let p_type = bytes.get(phoff + i * phentsize..phoff + i * phentsize + 4)?;
        if u32::from_le_bytes(p_type.try_into().ok()?) == 3 {
            return Some(false);
        }
    }
    Some(true)
}

pub async fn doctor(args: DoctorArgs) -> anyhow::Result<i32> {
    let caps = HostCaps::detect();
    let mut problems = 0;
    let mut line = |ok: bool, what: &str, detail: String| {
        if !ok {
            problems += 1;
        }
        println!("{} {:<18} {}", if ok { "ok  " } else { "FIX " }, what, detail);
    };
    match &caps.kvm {
        KvmKind::Hardware => line(true, "kvm", "hardware KVM: guests run at native speed behind a hardware boundary".into()),
        other => match hutch_vmm::host::kvm_access_advice(Path::new("/")) {
            Some(advice) => println!("warn {:<18} {advice}", "kvm"),
            None => println!("warn {:<18} {} -> guests run under QEMU TCG (software emulation: slow, and not a hardened boundary)", "kvm", other.explain()),
        },
    }

    let mut versions: Vec<(&str, u32, String)> = Vec::new();
    for tool in host_tools() {
        let (path, probe) = probe(&tool);
        let name = match (tool.required, tool.rootless) {
            (true, _) => tool.program.clone(),
            (false, true) => format!("{} (rootless)", tool.program),
            (false, false) => format!("{} (tests)", tool.program),
        };
        match probe {
            Probe::Ran(first) => {
                if let Some(major) = major_version(&first).filter(|_| tool.program.starts_with("qemu")) {
                    versions.push((if tool.program == "qemu-img" { "qemu-img" } else { "qemu-system-x86_64" }, major, first.clone()));
                }
                let path = path.map(|p| p.display().to_string()).unwrap_or_default();
                if tool.program == "busybox" && is_static_elf(Path::new(&path)) == Some(false) {
                    line(false, &name, format!("{path} is dynamically linked: apt-get install {}", tool.package));
                } else {
                    line(true, &name, format!("{path}: {first}"));
                }
            }
            Probe::Missing => line(false, &name, format!("not found: apt-get install {} (or run scripts/deps)", tool.package)),
            Probe::Broken(why) => line(false, &name, format!("{why}: apt-get install --reinstall {}", tool.package)),
        }
    }
    if let [(_, a, la), (_, b, lb)] = versions.as_slice() {
        if a != b {
            line(
                false,
                "qemu versions",
                format!("QEMU and qemu-img come from different releases ({la} / {lb}): run scripts/deps, which installs both from one"),
            );
        }
    }
    let root = nix::unistd::geteuid().is_root();
    if !root {
        line(true, "vmm user", "QEMU runs as you (no privilege to drop); seccomp on, empty environment".into());
    }
    if root {
        let vmm_user = nix::unistd::User::from_name("hutch-vmm").ok().flatten();
        line(
            vmm_user.is_some(),
            "hutch-vmm user",
            if vmm_user.is_some() { "QEMU drops to it after opening its files".into() } else { "missing (QEMU would drop to nobody): run scripts/deps".into() },
        );
    }
    if args.host {
        return Ok(verdict(problems, "host ready: next `scripts/build`, then `hutch image build`"));
    }

    match crate::agent::locate() {
        Ok(p) => line(true, "agent", p.display().to_string()),
        Err(e) => line(false, "agent", format!("{e:#}")),
    }
    match hutch_image::Cache::from_env() {
        Ok(cache) => {
            let own = cache.list().unwrap_or_default();
            let shared = cache.list_shared().unwrap_or_default();
            let own_desc = format!("{} image(s) in {}", own.len(), cache.root().display());
            match (own.is_empty(), shared.is_empty(), cache.shared()) {
                (true, true, _) if root => line(false, "image", format!("none in {}: run `hutch image build`", cache.root().display())),
                (true, true, _) => line(
                    false,
                    "image",
                    format!(
                        "none in {} nor in the system cache {}: an administrator runs `hutch image build` as root once, \
                         and every user shares it",
                        cache.root().display(),
                        cache.shared().map_or("(none)".into(), |p| p.display().to_string())
                    ),
                ),
                (_, false, Some(dir)) => line(true, "image", format!("{own_desc}; {} shared read-only in {}", shared.len(), dir.display())),
                _ => line(true, "image", own_desc),
            }
            build_line(&cache, root, &mut line);
            let disk_root = if cache.root().exists() { cache.root().to_path_buf() } else { PathBuf::from("/") };
            if let Ok(st) = nix::sys::statvfs::statvfs(&disk_root) {
                let free_gb = st.blocks_available() as f64 * st.fragment_size() as f64 / 1e9;
                line(free_gb > 5.0, "disk", format!("{free_gb:.1} GB free at {}{}", disk_root.display(), if free_gb > 5.0 { "" } else { ": free some space (images need ~2 GB, each sandbox its writes)" }));
            }
        }
        Err(e) => line(false, "cache", format!("{e}")),
    }
    Ok(verdict(problems, "ready: try `hutch run -- uname -a`"))
}

fn verdict(problems: usize, ready: &str) -> i32 {
    if problems == 0 {
        println!("\n{ready}");
        0
    } else {
        println!("\n{problems} problem(s) to fix (see FIX lines)");
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_parses_and_names_what_hutch_runs() {
        let tools = host_tools();
        for needed in ["qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "cpio", "busybox"] {
            assert!(tools.iter().any(|t| t.program == needed && t.required), "{needed} missing from scripts/host-tools");
        }
        assert!(tools.iter().all(|t| !t.package.is_empty()));
    }

    #[test]
    fn major_versions_are_read_from_version_lines() {
        assert_eq!(major_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"), Some(7));
        assert_eq!(major_version("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2)"), Some(10));
        assert_eq!(major_version("no number here"), None);
    }

    #[test]
    fn static_and_dynamic_elves_are_told_apart() {
        // The test binary itself is dynamically linked.
        let me = std::env::current_exe().expect("exe");
        assert_eq!(is_static_elf(&me), Some(false));
        assert_eq!(is_static_elf(Path::new("/etc/hostname")), None);
    }
}

/// Which way this host builds images for this user: as root; as an ordinary user in a user namespace where the host
/// allows it (user namespaces, setuid `newuidmap`/`newgidmap`, subordinate ids); else from the shared images root
/// built, with what a rootless build would need.
fn build_line(cache: &hutch_image::Cache, root: bool, line: &mut impl FnMut(bool, &str, String)) {
    if root {
        line(true, "build", format!("as root (mmdebstrap, `mkfs.ext4 -d`): images go to {} and every user shares them read-only", cache.root().display()));
        return;
    }
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten();
    let (name, uid) = me.map_or((String::from("?"), nix::unistd::geteuid().as_raw()), |u| (u.name, u.uid.as_raw()));
    let blockers = hutch_image::rootless_build_blockers(std::path::Path::new("/"), &name, uid);
    if blockers.is_empty() {
        line(
            true,
            "build",
            format!(
                "rootless: root filesystems are built in a user namespace (your subordinate ids from /etc/subuid and \
                 /etc/subgid, newuidmap/newgidmap; mmdebstrap and `mkfs.ext4 -d` run as its root) into {}",
                cache.root().display()
            ),
        );
        return;
    }
    let list: Vec<String> = blockers.iter().map(|b| format!("{} ({})", b.what, b.fix)).collect();
    // A warning, not a problem: runs need no build when root's shared image is there.
    println!(
        "warn {:<18} building a root filesystem needs root on this host: use the shared image (`hutch image build` as \
         root) or `hutch serve`'s; a rootless build would need: {}",
        "build",
        list.join("; ")
    );
}
