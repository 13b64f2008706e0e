//! What this host can run: which KVM (hardware, PVM, none), which QEMU, and the accelerator that follows.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::VmmError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator {other:?}: use kvm or tcg")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware virtualization (VMX/SVM) through /dev/kvm: ordinary guests run at native speed.
    Hardware,
    /// PVM (pagetable-based virtual machine): /dev/kvm works but only PVM-built guest kernels run; ordinary
    /// kernels crawl and die, so it is not usable for our guests.
    Pvm,
    /// /dev/kvm exists but cannot be opened.
    NoAccess(String),
    Absent,
}

#[derive(Debug, Clone)]
pub struct HostCaps {
    pub kvm: KvmKind,
    pub qemu: Option<PathBuf>,
    /// Identifies the QEMU binary (size and modification time) without running it: a different binary means
    /// snapshots made by the old one are not used.
    pub qemu_id: Option<String>,
}

impl HostCaps {
    pub fn detect() -> Self {
        let qemu = find_in_path("qemu-system-x86_64");
        let qemu_id = qemu.as_deref().and_then(|q| {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(q).ok()?;
            Some(format!("{}:{}:{}", q.display(), m.size(), m.mtime()))
        });
        Self { kvm: detect_kvm(Path::new("/")), qemu, qemu_id }
    }

    /// QEMU's own version line (runs it: for reports, not for the start-up path).
    pub fn qemu_version(&self) -> Option<String> {
        let out = std::process::Command::new(self.qemu.as_deref()?).arg("--version").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines().next().map(|l| l.trim().to_string())
    }

    /// The accelerator to use: the request if it can work, else the best that can. Never silently weaker than
    /// asked: an explicit `kvm` that cannot run ordinary guests is an error.
    pub fn choose(&self, requested: Option<Accel>) -> Result<Accel, VmmError> {
        match (requested, &self.kvm) {
            (None, KvmKind::Hardware) | (Some(Accel::Kvm), KvmKind::Hardware) => Ok(Accel::Kvm),
            (None, _) | (Some(Accel::Tcg), _) => Ok(Accel::Tcg),
            (Some(Accel::Kvm), other) => Err(VmmError::Accel { requested: Accel::Kvm, reason: other.explain() }),
        }
    }

    pub fn qemu(&self) -> Result<&Path, VmmError> {
        self.qemu.as_deref().ok_or_else(|| VmmError::MissingBinary("qemu-system-x86_64".into()))
    }
}

impl KvmKind {
    pub fn explain(&self) -> String {
        match self {
            KvmKind::Hardware => "hardware KVM is available".into(),
            KvmKind::Pvm => "/dev/kvm is PVM (kvm_pvm module), which runs only PVM-built guest kernels; use --accel tcg".into(),
            KvmKind::NoAccess(e) => format!("/dev/kvm cannot be opened ({e}); add your user to the kvm group or use --accel tcg"),
            KvmKind::Absent => "/dev/kvm does not exist (no virtualization extensions or kvm module not loaded); use --accel tcg".into(),
        }
    }
}

/// Reads the host's KVM flavour below `root` (a parameter so tests can point it at a fake tree).
pub fn detect_kvm(root: &Path) -> KvmKind {
    let dev = root.join("dev/kvm");
    if !dev.exists() {
        return KvmKind::Absent;
    }
    if root.join("sys/module/kvm_pvm").exists() {
        return KvmKind::Pvm;
    }
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(&dev) {
        return KvmKind::NoAccess(e.to_string());
    }
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let module = root.join("sys/module/kvm_intel").exists() || root.join("sys/module/kvm_amd").exists();
    if hw && module {
        KvmKind::Hardware
    } else {
        KvmKind::NoAccess("no vmx/svm CPU flag or kvm_intel/kvm_amd module; the /dev/kvm here is not hardware KVM".into())
    }
}

/// For a hardware `/dev/kvm` below `root` that this process may not open: how to get access. `None` when it opens,
/// is absent or is not hardware KVM (PVM, no CPU support): then there is nothing a group would change.
pub fn kvm_access_advice(root: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = root.join("dev/kvm");
    let meta = std::fs::metadata(&dev).ok()?;
    if root.join("sys/module/kvm_pvm").exists() {
        return None;
    }
    let cpuinfo = std::fs::read_to_string(root.join("proc/cpuinfo")).unwrap_or_default();
    let hw = cpuinfo.lines().filter(|l| l.starts_with("flags")).any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return None;
    }
    match std::fs::OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(_) => return None,
        Err(e) if e.kind() != std::io::ErrorKind::PermissionDenied => return None,
        Err(_) => {}
    }
    let gid = nix::unistd::Gid::from_raw(meta.gid());
    let group = nix::unistd::Group::from_gid(gid).ok().flatten();
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten();
    let in_db = match (&group, &me) {
        (Some(g), Some(u)) => u.gid == g.gid || g.mem.contains(&u.name),
        _ => false,
    };
    let in_session = nix::unistd::getgroups().map(|gs| gs.contains(&gid)).unwrap_or(false) || nix::unistd::getegid() == gid;
    Some(kvm_advice_text(group.as_ref().map(|g| g.name.as_str()), meta.mode() & 0o777, in_db, in_session))
}

/// The advice of [`kvm_access_advice`] from what it found: the device's group and mode, whether the account is a
/// member of that group, and whether this login session already has it.
pub fn kvm_advice_text(group: Option<&str>, mode: u32, in_db: bool, in_session: bool) -> String {
    let tail = "until then guests run under TCG (no setup needed, but slower and not a hardened boundary)";
    match group {
        Some(g) if mode & 0o060 == 0o060 && in_db && !in_session => format!(
            "/dev/kvm is hardware KVM for group `{g}`, which your account is in, but this login began before you \
             joined it: log out and in again (or run `newgrp {g}`); {tail}"
        ),
        Some(g) if mode & 0o060 == 0o060 && !in_db => format!(
            "/dev/kvm is hardware KVM for group `{g}` (mode {mode:o}), and you are not in it: `sudo usermod -aG {g} \
             $USER`, then log out and in again (groups are read at login); {tail}"
        ),
        _ => format!(
            "/dev/kvm is hardware KVM but no group may use it (mode {mode:o}{}): ask an administrator for a udev \
             rule such as `KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"` and membership of `kvm`, then log in again; \
             {tail}",
            group.map(|g| format!(", group {g}")).unwrap_or_default()
        ),
    }
}

pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The host TSC frequency in kHz, for `tsc_early_khz=` (guest timer calibration under TCG is fragile without it).
pub fn tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(v) = s.trim().parse() {
            return Some(v);
        }
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str], cpuflags: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for f in files {
            let p = t.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            if f.ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else {
                std::fs::write(&p, b"").unwrap();
            }
        }
        std::fs::create_dir_all(t.path().join("proc")).unwrap();
        std::fs::write(t.path().join("proc/cpuinfo"), format!("processor : 0\nflags\t\t: fpu {cpuflags} sse\n")).unwrap();
        t
    }

    #[test]
    fn pvm_is_detected_and_refused_for_explicit_kvm() {
        let t = tree(&["dev/kvm", "sys/module/kvm_pvm/"], "");
        let kind = detect_kvm(t.path());
        assert_eq!(kind, KvmKind::Pvm);
        let caps = HostCaps { kvm: kind, qemu: None, qemu_id: None };
        assert_eq!(caps.choose(None).unwrap(), Accel::Tcg);
        let err = caps.choose(Some(Accel::Kvm)).unwrap_err().to_string();
        assert!(err.contains("PVM"), "{err}");
    }

    #[test]
    fn kvm_group_advice_says_what_to_do_and_that_it_needs_a_new_login() {
        let join = kvm_advice_text(Some("kvm"), 0o660, false, false);
        assert!(join.contains("usermod -aG kvm") && join.contains("log out and in again") && join.contains("TCG"), "{join}");
        let relogin = kvm_advice_text(Some("kvm"), 0o660, true, false);
        assert!(relogin.contains("newgrp kvm") && !relogin.contains("usermod"), "{relogin}");
        let closed = kvm_advice_text(Some("root"), 0o600, false, false);
        assert!(closed.contains("udev") && closed.contains("600"), "{closed}");
        // A PVM or CPU-less /dev/kvm gets no group advice: a group would not make it usable.
        let t = tree(&["dev/kvm", "sys/module/kvm_pvm/"], "vmx");
        assert_eq!(kvm_access_advice(t.path()), None);
        let t = tree(&["dev/kvm"], "");
        assert_eq!(kvm_access_advice(t.path()), None);
    }

    #[test]
    fn hardware_kvm_needs_flag_and_module() {
        let t = tree(&["dev/kvm", "sys/module/kvm_intel/"], "vmx");
        assert_eq!(detect_kvm(t.path()), KvmKind::Hardware);
        let t = tree(&["dev/kvm"], "");
        assert!(matches!(detect_kvm(t.path()), KvmKind::NoAccess(_)));
        let t = tree(&[], "vmx");
        assert_eq!(detect_kvm(t.path()), KvmKind::Absent);
    }
}
