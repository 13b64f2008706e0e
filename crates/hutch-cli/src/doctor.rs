//! `hutch doctor`: what this host can do, and how to fix each problem found.

use hutch_vmm::{HostCaps, KvmKind};

pub async fn doctor() -> anyhow::Result<i32> {
    let caps = HostCaps::detect();
    let mut problems = 0;
    let mut line = |ok: bool, what: &str, detail: String| {
        if !ok {
            problems += 1;
        }
        println!("{} {:<14} {}", if ok { "ok  " } else { "FIX " }, what, detail);
    };
    match &caps.kvm {
        KvmKind::Hardware => line(true, "kvm", "hardware KVM: guests run at native speed behind a hardware boundary".into()),
        other => match hutch_vmm::host::kvm_access_advice(std::path::Path::new("/")) {
            Some(advice) => println!("warn {:<14} {advice}", "kvm"),
            None => println!("warn {:<14} {} -> guests run under QEMU TCG (software emulation: slow, and not a hardened boundary)", "kvm", other.explain()),
        },
    }
    let root = nix::unistd::geteuid().is_root();
    match hutch_vmm::qemu::RunAs::detect() {
        Some(r) => line(true, "vmm user", format!("QEMU drops to `{}` after opening its files; seccomp on, empty environment", r.name)),
        None if root => line(false, "vmm user", "no `hutch-vmm` or `nobody` account for QEMU to drop to: run scripts/deps".into()),
        None => line(true, "vmm user", "QEMU runs as you (no privilege to drop); seccomp on, empty environment".into()),
    }
    match (&caps.qemu, &caps.qemu_version()) {
        (Some(p), Some(v)) => line(true, "qemu", format!("{v} ({})", p.display())),
        _ => line(false, "qemu", "qemu-system-x86_64 not found: apt-get install qemu-system-x86".into()),
    }
    for (tool, pkg) in [("qemu-img", "qemu-utils"), ("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs"), ("cpio", "cpio"), ("busybox", "busybox-static")] {
        let found = hutch_vmm::host::find_in_path(tool).or_else(|| {
            ["/usr/sbin", "/sbin", "/bin"].iter().map(|d| std::path::Path::new(d).join(tool)).find(|p| p.is_file())
        });
        match found {
            Some(p) => line(true, tool, p.display().to_string()),
            None => line(false, tool, format!("not found: apt-get install {pkg}")),
        }
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
            let disk_root = if cache.root().exists() { cache.root().to_path_buf() } else { std::path::PathBuf::from("/") };
            if let Ok(st) = nix::sys::statvfs::statvfs(&disk_root) {
                let free_gb = st.blocks_available() as f64 * st.fragment_size() as f64 / 1e9;
                line(free_gb > 5.0, "disk", format!("{free_gb:.1} GB free at {}{}", disk_root.display(), if free_gb > 5.0 { "" } else { ": free some space (images need ~2 GB, each sandbox its writes)" }));
            }
        }
        Err(e) => line(false, "cache", format!("{e}")),
    }
    if problems == 0 {
        println!("\nready: try `hutch run -- uname -a`");
        Ok(0)
    } else {
        println!("\n{problems} problem(s) to fix (see FIX lines)");
        Ok(1)
    }
}

/// Which way this host builds images for this user: as root; or, for a user, the shared images root built, and
/// whether a rootless build could work here and what it needs.
fn build_line(cache: &hutch_image::Cache, root: bool, line: &mut impl FnMut(bool, &str, String)) {
    if root {
        line(true, "build", format!("as root (mmdebstrap, `mkfs.ext4 -d`): images go to {} and every user shares them read-only", cache.root().display()));
        return;
    }
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten();
    let (name, uid) = me.map_or((String::from("?"), nix::unistd::geteuid().as_raw()), |u| (u.name, u.uid.as_raw()));
    let blockers = hutch_image::rootless_build_blockers(std::path::Path::new("/"), &name, uid);
    let host = if blockers.is_empty() {
        "this host would allow a rootless build (user namespaces, uidmap, subordinate ids)".to_string()
    } else {
        let list: Vec<String> = blockers.iter().map(|b| format!("{} ({})", b.what, b.fix)).collect();
        format!("a rootless build would need: {}", list.join("; "))
    };
    // A warning, not a problem: runs need no build when root's shared image is there.
    println!(
        "warn {:<14} building a root filesystem needs root in this version of hutch (mmdebstrap and `mkfs.ext4 -d` keep \
         file ownership); use the shared image (`hutch image build` as root) or `hutch serve`'s; {host}",
        "build"
    );
}
