//! The rootfs component: a Debian minbase tree from mmdebstrap (packages from the host's own
//! apt sources, so no mirror is named here), npm packages installed globally into it by the
//! tree's own npm (from whatever registry the host's npm environment names), staged on a
//! tmpfs when memory allows, tidied, and packed into a sparse raw ext4 image.
//! The image is shared read-only by every sandbox (each writes to its own qcow2 overlay), so
//! once built it must never be modified.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::key::{NpmInputs, RootfsInputs, RECIPE_VERSION};
use crate::progress::Progress;
use crate::spec::{sha256_hex, CheckedSpec};
use crate::tools::{self, MKFS_EXT4, MMDEBSTRAP, UNSHARE};

pub(crate) const IMAGE: &str = "rootfs.ext4";
pub(crate) const INFO: &str = "rootfs.json";
const VARIANT: &str = "minbase";
const LABEL: &str = "hutch-root";
const MIN_IMAGE_BYTES: u64 = 4 << 30;
pub(crate) const HOSTNAME: &str = "hutch";

/// mmdebstrap customize hook (`$1` is the tree) that installs `$HUTCH_NPM_PACKAGES` globally
/// with the tree's own Node.js and npm, so install scripts run against the guest's libraries.
/// The tree's CA bundle has only Debian's roots; npm gets the host's bundle, which is what
/// the host trusts for the registry (a local mirror or proxy may need its own root), and the
/// copy is removed with npm's cache. Proxy and `npm_config_*` variables pass through. It runs
/// from a file in the build directory, so a failure shows npm's messages, not the script.
const NPM_HOOK: &str = r#"#!/bin/sh
set -eu
root="$1"
ca=
if [ -n "${HUTCH_NPM_CAFILE:-}" ]; then
    cp "$HUTCH_NPM_CAFILE" "$root/tmp/hutch-npm-ca.crt"
    ca=--cafile=/tmp/hutch-npm-ca.crt
fi
# Checked NAME@VERSION words, split on purpose.
if ! chroot "$root" /usr/bin/env PATH=/usr/local/bin:/usr/bin:/bin HOME=/root \
    npm install --global --no-audit --no-fund --no-update-notifier --loglevel=warn $ca $HUTCH_NPM_PACKAGES >&2
then
    echo "hutch: npm could not install $HUTCH_NPM_PACKAGES (npm's messages above)" >&2
    exit 1
fi
rm -rf "$root/root/.npm" "$root/tmp/hutch-npm-ca.crt"
"#;

/// Name of the hook's file in the build directory.
const NPM_HOOK_FILE: &str = "npm-hook.sh";

/// The host's CA bundle, handed to npm in the tree when present.
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The host apt sources files, in order of preference.
const SOURCES_FILES: [&str; 2] = [
    "/etc/apt/sources.list.d/debian.sources",
    "/etc/apt/sources.list",
];

/// The host's apt sources: given to mmdebstrap as its mirror, and hashed into the key.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    pub path: PathBuf,
    pub text: String,
}

impl Sources {
    pub fn from_host() -> Result<Self, ImageError> {
        let path = SOURCES_FILES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| ImageError::NoAptSources(SOURCES_FILES.map(PathBuf::from)))?;
        let text = fs::read_to_string(&path).ctx("reading apt sources", &path)?;
        Ok(Sources { path, text })
    }

    /// Whether these sources offer `suite` (deb822 `Suites:` or one-line `deb URI suite`).
    pub fn has_suite(&self, suite: &str) -> bool {
        self.text.lines().any(|line| {
            let line = line.trim();
            if let Some(suites) = line.strip_prefix("Suites:") {
                return suites.split_whitespace().any(|s| s == suite);
            }
            // deb [options] URI suite components...
            let Some(rest) = line.strip_prefix("deb ") else {
                return false;
            };
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']').map_or("", |(_, r)| r),
                None => rest,
            };
            rest.split_whitespace().nth(1) == Some(suite)
        })
    }

    pub fn inputs(&self, spec: &CheckedSpec) -> RootfsInputs {
        RootfsInputs {
            recipe: RECIPE_VERSION,
            suite: spec.suite.clone(),
            variant: VARIANT.to_owned(),
            packages: spec.packages.clone(),
            sources_file: self.path.to_string_lossy().into_owned(),
            sources_sha256: sha256_hex(self.text.as_bytes()),
            npm: (!spec.npm_packages.is_empty()).then(|| NpmInputs {
                packages: spec.npm_packages.clone(),
                hook_sha256: sha256_hex(NPM_HOOK.as_bytes()),
            }),
        }
    }
}

/// What a built rootfs component holds (saved as `rootfs.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsInfo {
    pub inputs: RootfsInputs,
    /// Bytes of file content in the tree.
    pub content_bytes: u64,
    /// Apparent size of the ext4 image (the disk size the guest sees).
    pub image_bytes: u64,
}

/// Builds the rootfs component into the empty directory `out`.
pub(crate) fn build(
    spec: &CheckedSpec,
    sources: &Sources,
    out: &Path,
    progress: &dyn Progress,
) -> Result<RootfsInfo, ImageError> {
    if !nix::unistd::geteuid().is_root() {
        // The same build, as the root of a user namespace (which runs this function again).
        return crate::rootless::build(spec, sources, out, progress);
    }
    let mmdebstrap = MMDEBSTRAP.find()?;
    let unshare = UNSHARE.find()?;
    let mkfs = MKFS_EXT4.find()?;

    let npm = if spec.npm_packages.is_empty() {
        String::new()
    } else {
        format!(" and {} npm packages", spec.npm_packages.len())
    };
    progress.stage(&format!(
        "Installing Debian {} ({} packages){npm} with mmdebstrap",
        spec.suite,
        spec.packages.len()
    ));
    let staging = out.join("staging");
    fs::create_dir(&staging).ctx("creating directory", &staging)?;
    let mount = fsutil::StagingMount::on(&staging)?;
    let tree = staging.join("tree");
    // mmdebstrap's own temp files (a gpg home, ...) stay inside this build, so a killed
    // build leaves nothing in the host's /tmp: the reaper deletes them with the rest.
    let mm_tmp = out.join("mmdebstrap-tmp");
    fs::create_dir(&mm_tmp).ctx("creating directory", &mm_tmp)?;
    // In a private mount namespace the mounts mmdebstrap makes inside the tree vanish with
    // it, even if it is killed, so a dead build never leaves host mounts behind.
    let mut cmd = tools::command(&unshare);
    cmd.env("TMPDIR", &mm_tmp)
        .args(["--mount", "--propagation", "private", "--"])
        .arg(&mmdebstrap)
        .arg("--mode=root")
        .arg(format!("--variant={VARIANT}"))
        .arg(format!("--include={}", spec.packages.join(",")));
    let mut hint = String::from(
        "check the package names and the host's apt sources (`apt-get update` must work)",
    );
    if !spec.npm_packages.is_empty() {
        let hook = out.join(NPM_HOOK_FILE);
        fs::write(&hook, NPM_HOOK).ctx("writing", &hook)?;
        fsutil::set_mode(&hook, 0o500)?;
        let mut arg = std::ffi::OsString::from("--customize-hook=");
        arg.push(&hook);
        cmd.arg(arg)
            .env("HUTCH_NPM_PACKAGES", spec.npm_packages.join(" "));
        if Path::new(HOST_CA_BUNDLE).is_file() {
            cmd.env("HUTCH_NPM_CAFILE", HOST_CA_BUNDLE);
        }
        hint.push_str(
            "; for npm packages, that each NAME@VERSION exists and that this host reaches an npm \
             registry (set npm_config_registry and proxy variables as for npm itself)",
        );
    }
    cmd.arg(&spec.suite).arg(&tree).arg(&sources.path);
    tools::run(&mut cmd, &hint)?;
    let hook = out.join(NPM_HOOK_FILE);
    if hook.exists() {
        fs::remove_file(&hook).ctx("removing", &hook)?;
    }

    progress.stage("Tidying the root filesystem");
    tidy(&tree)?;
    let content_bytes = content_size(&tree)?;

    let image_bytes = image_size(content_bytes);
    progress.stage(&format!(
        "Making the ext4 image ({} MiB of files in a {} GiB disk)",
        content_bytes >> 20,
        image_bytes >> 30
    ));
    let image = out.join(IMAGE);
    let file = fs::File::create(&image).ctx("creating", &image)?;
    file.set_len(image_bytes).ctx("sizing", &image)?;
    drop(file);
    tools::run(
        tools::command(&mkfs)
            .args(["-q", "-F", "-L", LABEL, "-d"])
            .arg(&tree)
            .arg(&image),
        "",
    )?;
    if let Some(mount) = mount {
        mount.unmount()?;
    }
    fsutil::remove_tree(&staging)?;
    fsutil::remove_tree(&mm_tmp)?;
    // Shared by every sandbox through copy-on-write overlays: nobody writes to it again.
    fsutil::set_mode(&image, 0o444)?;

    let info = RootfsInfo {
        inputs: sources.inputs(spec),
        content_bytes,
        image_bytes,
    };
    fsutil::write_json(&out.join(INFO), &info)?;
    Ok(info)
}

/// Generous headroom: sandboxes install packages and build code on their overlays.
fn image_size(content_bytes: u64) -> u64 {
    let size = MIN_IMAGE_BYTES.max(content_bytes.saturating_mul(2));
    size.div_ceil(1 << 20) * (1 << 20)
}

/// Removes host traces and caches mmdebstrap leaves, and sets the guest's identity.
fn tidy(tree: &Path) -> Result<(), ImageError> {
    let write = |rel: &str, text: &str| {
        let path = tree.join(rel);
        // A symlink here (resolv.conf often is one) must not lead the write outside the tree.
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            fs::remove_file(&path).ctx("removing", &path)?;
        }
        fs::write(&path, text).ctx("writing", path)
    };
    // Empty = "not yet set": each guest boot may generate its own.
    write("etc/machine-id", "")?;
    write("etc/hostname", &format!("{HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    )?;
    // mmdebstrap copies the host's resolver; the guest's networking is set up at run time.
    write("etc/resolv.conf", "")?;
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt/archives",
        "var/cache/apt",
        "var/cache/debconf",
        "var/log/apt",
        "tmp",
        "var/tmp",
    ] {
        clear_files(&tree.join(dir), dir == "var/cache/debconf")?;
    }
    for log in [
        "var/log/dpkg.log",
        "var/log/alternatives.log",
        "var/log/bootstrap.log",
    ] {
        let path = tree.join(log);
        if path.exists() {
            fs::remove_file(&path).ctx("removing", &path)?;
        }
    }
    Ok(())
}

/// Deletes the plain files directly in `dir` (apt's `lock` and `partial/` stay, they are
/// part of an apt state directory). `old_only` limits it to `*-old` backups.
fn clear_files(dir: &Path, old_only: bool) -> Result<(), ImageError> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.ctx("listing", dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let meta = entry.metadata().ctx("inspecting", entry.path())?;
        if meta.is_dir() || name == "lock" || (old_only && !name.ends_with("-old")) {
            continue;
        }
        fs::remove_file(entry.path()).ctx("removing", entry.path())?;
    }
    Ok(())
}

/// Sum of file sizes in the tree (hard links once), not following symlinks.
fn content_size(tree: &Path) -> Result<u64, ImageError> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![tree.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ctx("listing", &dir)? {
            let entry = entry.ctx("listing", &dir)?;
            let meta = entry.metadata().ctx("inspecting", entry.path())?;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if seen.insert((meta.dev(), meta.ino())) {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

pub(crate) fn read_info(component: &Path) -> Result<RootfsInfo, ImageError> {
    let path = component.join(INFO);
    let bytes = fs::read(&path).ctx("reading", &path)?;
    serde_json::from_slice(&bytes).map_err(|source| ImageError::Corrupt { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(text: &str) -> Sources {
        Sources {
            path: "/x".into(),
            text: text.into(),
        }
    }

    #[test]
    fn finds_suites_in_both_formats() {
        let deb822 = sources(
            "Types: deb\nURIs: http://mirror/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\n",
        );
        assert!(deb822.has_suite("bookworm"));
        assert!(deb822.has_suite("bookworm-updates"));
        assert!(!deb822.has_suite("trixie"));
        let oneline = sources(
            "deb http://mirror/debian bookworm main\n\
             deb [signed-by=/k.gpg arch=amd64] http://mirror/debian trixie main\n\
             # deb http://mirror/debian sid main\n",
        );
        assert!(oneline.has_suite("bookworm"));
        assert!(oneline.has_suite("trixie"));
        assert!(!oneline.has_suite("sid"));
    }

    #[test]
    fn image_size_has_headroom() {
        assert_eq!(image_size(300 << 20), 4 << 30);
        assert_eq!(image_size(3 << 30), 6 << 30);
        assert_eq!(image_size((3 << 30) + 1) % (1 << 20), 0);
    }
}
