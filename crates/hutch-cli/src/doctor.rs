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
        other => println!("warn {:<14} {} -> guests run under QEMU TCG (software emulation: slow, and not a hardened boundary)", "kvm", other.explain()),
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
            let images = cache.list().unwrap_or_default();
            if images.is_empty() {
                line(false, "image", format!("none in {}: run `hutch image build`", cache.root().display()));
            } else {
                line(true, "image", format!("{} image(s) in {}", images.len(), cache.root().display()));
            }
            let root = if cache.root().exists() { cache.root().to_path_buf() } else { std::path::PathBuf::from("/") };
            if let Ok(st) = nix::sys::statvfs::statvfs(&root) {
                let free_gb = st.blocks_available() as f64 * st.fragment_size() as f64 / 1e9;
                line(free_gb > 5.0, "disk", format!("{free_gb:.1} GB free at {}{}", root.display(), if free_gb > 5.0 { "" } else { ": free some space (images need ~2 GB, each sandbox its writes)" }));
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
