//! Finding the guest agent binary that goes into the image.

use std::path::PathBuf;

use anyhow::{bail, Context};

/// `$HUTCH_AGENT`, else next to this executable, else in the cargo target tree this executable was built in.
pub fn locate() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("HUTCH_AGENT").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("HUTCH_AGENT={} does not exist", p.display());
        }
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find hutch's own path")?;
    let dir = exe.parent().context("hutch's path has no parent")?;
    let profile = dir.file_name().and_then(|s| s.to_str()).unwrap_or("release");
    // The static build for the explicit target first: a plain `cargo build` leaves a dynamic hutch-agent next to
    // hutch in the target tree, which cannot run in the guest.
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu").join(profile).join("hutch-agent"),
        dir.join("../x86_64-unknown-linux-gnu/release/hutch-agent"),
        dir.join("../../x86_64-unknown-linux-gnu/release/hutch-agent"),
        dir.join("../lib/hutch/hutch-agent"),
        dir.join("hutch-agent"),
    ];
    for c in &candidates {
        if c.is_file() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    bail!(
        "the guest agent binary was not found (looked next to {}); build it with `scripts/build` or point HUTCH_AGENT at a static hutch-agent",
        exe.display()
    )
}
