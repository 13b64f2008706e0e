//! `hutch image`: build (image + boot snapshot), ls, rm; and the shared "image ready?" step of other commands.

use anyhow::Context;
use hutch_image::{Cache, Image, ImageSpec, SpinnerProgress};
use hutch_sandbox::{Host, SandboxConfig};

use crate::cli::{ImageCmd, ImageName, VmArgs};

/// The default image, built first if missing (with progress on stderr).
pub async fn ensure_image() -> anyhow::Result<(Cache, Image)> {
    ensure_named(ImageName::Default).await
}

/// The image `name`, built first if missing (with progress on stderr).
pub async fn ensure_named(name: ImageName) -> anyhow::Result<(Cache, Image)> {
    let agent = crate::agent::locate()?;
    let cache = Cache::from_env().context("cannot choose the image cache directory")?;
    let (spec, what) = match name {
        ImageName::Default => (ImageSpec::default_for(agent), "the guest image"),
        ImageName::Agents => (
            ImageSpec::agents(agent),
            "the agents image (Node.js and npm packages from the registry the host's npm uses)",
        ),
    };
    let c = cache.clone();
    let image = tokio::task::spawn_blocking(move || -> anyhow::Result<Image> {
        if let Some(img) = c.lookup(&spec)? {
            return Ok(img);
        }
        eprintln!("hutch: building {what} in {} (first use; later runs reuse it)", c.root().display());
        let progress = SpinnerProgress::new();
        Ok(c.ensure(&spec, &progress)?)
    })
    .await
    .context("image build task")??;
    // Runs write only here (sandboxes, snapshots of a shared image): the user's own, private directory.
    cache.create_root()?;
    Ok((cache, image))
}

/// Variables every command in image `name` starts with; `--env` overrides them.
pub fn default_env(name: ImageName) -> Vec<(String, String)> {
    let vars: &[(&str, &str)] = match name {
        ImageName::Default => &[],
        // The VM is the sandbox: Claude Code refuses --dangerously-skip-permissions as root unless told it runs in
        // one. Its telemetry, error reports and update checks could only be denied by the gateway.
        ImageName::Agents => &[("IS_SANDBOX", "1"), ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"), ("DISABLE_AUTOUPDATER", "1")],
    };
    vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

pub fn sandbox_config(vm: &VmArgs) -> SandboxConfig {
    SandboxConfig { cpus: vm.cpus, memory_mib: vm.memory, accel: vm.accel, ..SandboxConfig::default() }
}

/// Says, once, when the isolation is weaker than hardware virtualization.
pub fn warn_if_tcg(host: &Host, cfg: &SandboxConfig) -> anyhow::Result<hutch_vmm::Accel> {
    let accel = host.caps.choose(cfg.accel)?;
    if accel == hutch_vmm::Accel::Tcg && cfg.accel.is_none() {
        eprintln!(
            "hutch: warning: using QEMU TCG software emulation ({}); for development, not a hardened boundary",
            host.caps.kvm.explain().split(';').next().unwrap_or("no usable KVM")
        );
    }
    Ok(accel)
}

/// Which of the named images a rootfs was built as, from its inputs ("custom" for other specs).
fn image_name(r: &hutch_image::RootfsInputs) -> &'static str {
    let base: Vec<&str> = hutch_image::BASE_PACKAGES.to_vec();
    let mut with_node = [hutch_image::BASE_PACKAGES, hutch_image::NODE_PACKAGES].concat();
    with_node.sort_unstable();
    let mut agents = hutch_image::AGENT_NPM_PACKAGES.to_vec();
    agents.sort_unstable();
    match &r.npm {
        None if r.packages == base => "default",
        Some(npm) if npm.packages == agents && r.packages == with_node => "agents",
        _ => "custom",
    }
}

fn print_images(list: &[hutch_image::Manifest]) {
    println!("{:<18} {:<8} {:<28} {:>10} {:>10}", "KEY", "IMAGE", "KERNEL", "ROOTFS MB", "AGE");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    for m in list {
        let age_h = now.saturating_sub(m.created_unix) as f64 / 3600.0;
        println!(
            "{:<18} {:<8} {:<28} {:>10} {:>9.1}h",
            &m.key[..16.min(m.key.len())],
            image_name(&m.rootfs.inputs),
            m.kernel.release,
            m.rootfs.allocated_bytes / 1_000_000,
            age_h
        );
    }
}

pub async fn cmd(c: ImageCmd) -> anyhow::Result<i32> {
    match c {
        ImageCmd::Build(a) => {
            let (cache, image) = ensure_named(a.vm.image).await?;
            println!("image {} ({}), kernel {}", &image.key[..16.min(image.key.len())], image.dir.display(), image.kernel_release);
            if !a.no_snapshot {
                let host = Host::new(image, cache.root().to_path_buf())?;
                let cfg = sandbox_config(&a.vm);
                warn_if_tcg(&host, &cfg)?;
                let t0 = std::time::Instant::now();
                eprintln!("hutch: making the boot snapshot ({} vCPU, {} MiB)...", cfg.cpus, cfg.memory_mib);
                let snap = hutch_sandbox::snapshot::ensure(&host, &cfg).await?;
                println!("snapshot {} ready in {:.1}s ({})", snap.meta.key, t0.elapsed().as_secs_f64(), snap.dir.display());
            }
            Ok(0)
        }
        ImageCmd::Ls { json } => {
            let cache = Cache::from_env()?;
            let list = cache.list()?;
            let shared = cache.list_shared()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() && shared.is_empty() {
                println!("no images in {} (build one with `hutch image build`)", cache.root().display());
            } else {
                print_images(&list);
                if let (false, Some(dir)) = (shared.is_empty(), cache.shared()) {
                    println!("shared, read-only ({}):", dir.display());
                    print_images(&shared);
                }
            }
            Ok(0)
        }
        ImageCmd::Rm { key } => {
            let cache = Cache::from_env()?;
            for k in cache.remove(&key)? {
                println!("removed {k}");
            }
            Ok(0)
        }
    }
}
