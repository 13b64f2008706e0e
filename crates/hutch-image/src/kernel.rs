//! The kernel component: which Debian cloud kernel package is current (asked of apt, never
//! hard-coded), and fetching it with `apt-get download` + `dpkg-deb -x` without installing
//! anything on the host. Keeps `vmlinuz`, the config and the module tree.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::error::{ImageError, IoContext};
use crate::fsutil;
use crate::key::{KernelInputs, KERNEL_METAPACKAGE, RECIPE_VERSION};
use crate::progress::Progress;
use crate::tools::{self, APT_CACHE, APT_GET, DPKG_DEB};

const UPDATE_HINT: &str = "run `apt-get update` and try again";

/// Where apt keeps downloaded package lists (Debian's default `Dir::State::lists`).
const APT_LISTS: &str = "/var/lib/apt/lists";

/// An exact Debian kernel package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPackage {
    pub name: String,
    pub version: String,
}

impl KernelPackage {
    pub fn inputs(&self) -> KernelInputs {
        KernelInputs {
            recipe: RECIPE_VERSION,
            package: self.name.clone(),
            version: self.version.clone(),
        }
    }
}

/// What a built kernel component holds (saved as `kernel.json` in its directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub package: String,
    pub version: String,
    /// `uname -r` of this kernel, e.g. "6.1.0-56-cloud-amd64".
    pub release: String,
}

/// File names inside a kernel component directory.
pub(crate) const VMLINUZ: &str = "vmlinuz";
pub(crate) const CONFIG: &str = "config";
pub(crate) const MODULES: &str = "modules";
pub(crate) const INFO: &str = "kernel.json";

/// The module tree (`modules/<release>`) of a kernel component.
pub(crate) fn modules_dir(component: &Path, release: &str) -> PathBuf {
    component.join(MODULES).join(release)
}

/// A remembered answer of apt, valid while apt's package lists are unchanged. Asking apt
/// costs about a second on hosts without a binary package cache, and `lookup` runs on every
/// sandbox start.
#[derive(Debug, Serialize, Deserialize)]
struct Resolved {
    lists_fingerprint: String,
    package: KernelPackage,
}

/// The kernel package the metapackage currently points at. `memo` is a file where the
/// answer is remembered for as long as apt's lists do not change.
/// `shared_memo`: another cache's memo, read (never written) when `memo` has no answer.
pub(crate) fn resolve(memo: &Path, shared_memo: Option<&Path>) -> Result<KernelPackage, ImageError> {
    let fingerprint = lists_fingerprint();
    if let Some(fp) = &fingerprint {
        for path in std::iter::once(memo).chain(shared_memo) {
            if let Ok(text) = fs::read(path) {
                if let Ok(r) = serde_json::from_slice::<Resolved>(&text) {
                    if &r.lists_fingerprint == fp {
                        return Ok(r.package);
                    }
                }
            }
        }
    }
    let package = ask_apt()?;
    if let Some(fp) = fingerprint {
        let record = Resolved {
            lists_fingerprint: fp,
            package: package.clone(),
        };
        // Remembering is an optimisation: a read-only cache still works, only slower.
        let _ = fsutil::write_json(memo, &record);
    }
    Ok(package)
}

fn ask_apt() -> Result<KernelPackage, ImageError> {
    let text = tools::run_text(
        APT_CACHE
            .command()?
            .args(["show", "--no-all-versions", KERNEL_METAPACKAGE]),
        UPDATE_HINT,
    )?;
    let (name, pinned) = parse_meta_depends(&text).ok_or_else(|| {
        ImageError::Kernel(format!(
            "`apt-cache show {KERNEL_METAPACKAGE}` names no linux-image-*-cloud-amd64 \
             dependency; {UPDATE_HINT}"
        ))
    })?;
    let version = match pinned {
        Some(v) => v,
        None => {
            let policy =
                tools::run_text(APT_CACHE.command()?.args(["policy", &name]), UPDATE_HINT)?;
            parse_candidate(&policy).ok_or_else(|| {
                ImageError::Kernel(format!(
                    "apt has no candidate version of {name}; {UPDATE_HINT}"
                ))
            })?
        }
    };
    Ok(KernelPackage { name, version })
}

/// From `apt-cache show` of the metapackage: the kernel package it depends on and, when the
/// dependency is pinned with `(= V)`, that version.
fn parse_meta_depends(show: &str) -> Option<(String, Option<String>)> {
    let depends = show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    depends.split(',').find_map(|alt| {
        let alt = alt.split('|').next()?.trim();
        let (name, rest) = match alt.split_once(' ') {
            Some((n, r)) => (n, r.trim()),
            None => (alt, ""),
        };
        if !(name.starts_with("linux-image-") && name.ends_with("-cloud-amd64"))
            || name == KERNEL_METAPACKAGE
        {
            return None;
        }
        let pinned = rest
            .strip_prefix("(=")
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.trim().to_owned());
        Some((name.to_owned(), pinned))
    })
}

fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty() && v != "(none)")
}

/// Names, sizes and modification times of apt's list files: changes whenever `apt-get
/// update` fetched something new.
fn lists_fingerprint() -> Option<String> {
    let mut entries: Vec<String> = fs::read_dir(APT_LISTS)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            if !meta.is_file() || e.file_name() == "lock" {
                return None;
            }
            let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
            Some(format!(
                "{}\0{}\0{}",
                e.file_name().to_string_lossy(),
                meta.len(),
                mtime.as_nanos()
            ))
        })
        .collect();
    if entries.is_empty() {
        return None;
    }
    entries.sort();
    Some(crate::spec::sha256_hex(entries.join("\n").as_bytes()))
}

/// Downloads and unpacks `package` into the empty directory `out` (a temp dir that becomes
/// the component once complete).
pub(crate) fn build(
    package: &KernelPackage,
    out: &Path,
    progress: &dyn Progress,
) -> Result<KernelInfo, ImageError> {
    let dpkg_deb = DPKG_DEB.find()?;
    progress.stage(&format!(
        "Downloading Debian kernel package {} {}",
        package.name, package.version
    ));
    let download = out.join("download");
    fs::create_dir(&download).ctx("creating directory", &download)?;
    // apt drops privileges to `_apt` for downloads; a directory it cannot write makes it
    // fall back to root with a warning. This directory is short-lived and holds only the .deb.
    set_mode(&download, 0o777)?;
    let spec = format!("{}={}", package.name, package.version);
    tools::run(
        APT_GET
            .command()?
            .current_dir(&download)
            .args(["download", "-q", &spec]),
        UPDATE_HINT,
    )?;
    let deb = fs::read_dir(&download)
        .ctx("listing", &download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| {
            ImageError::Kernel(format!("apt-get download {spec} produced no .deb file"))
        })?;

    let fields = tools::run_text(
        tools::command(&dpkg_deb)
            .arg("-f")
            .arg(&deb)
            .args(["Package", "Version"]),
        "",
    )?;
    let field = |name: &str| {
        fields
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    if field("Package").as_deref() != Some(&package.name)
        || field("Version").as_deref() != Some(&package.version)
    {
        return Err(ImageError::Kernel(format!(
            "downloaded {} is not {spec} (it says {fields:?})",
            deb.display()
        )));
    }

    progress.stage(&format!("Unpacking {}", package.name));
    let unpacked = out.join("unpacked");
    tools::run(
        tools::command(&dpkg_deb).arg("-x").arg(&deb).arg(&unpacked),
        "",
    )?;
    let release = only_release(&unpacked.join("lib/modules"), &package.name)?;
    let boot = unpacked.join("boot");
    rename(&boot.join(format!("vmlinuz-{release}")), &out.join(VMLINUZ))?;
    rename(&boot.join(format!("config-{release}")), &out.join(CONFIG))?;
    fs::create_dir(out.join(MODULES)).ctx("creating directory", out.join(MODULES))?;
    rename(
        &unpacked.join("lib/modules").join(&release),
        &modules_dir(out, &release),
    )?;
    fs::remove_dir_all(&unpacked).ctx("removing", &unpacked)?;
    fs::remove_dir_all(&download).ctx("removing", &download)?;

    let info = KernelInfo {
        package: package.name.clone(),
        version: package.version.clone(),
        release,
    };
    fsutil::write_json(&out.join(INFO), &info)?;
    Ok(info)
}

/// The one directory under `lib/modules` of the unpacked package: the kernel release.
fn only_release(lib_modules: &Path, package: &str) -> Result<String, ImageError> {
    let names: Vec<String> = fs::read_dir(lib_modules)
        .ctx("listing", lib_modules)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    match names.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(ImageError::Kernel(format!(
            "{package} should hold exactly one lib/modules/<release> directory, found {names:?}"
        ))),
    }
}

pub(crate) fn read_info(component: &Path) -> Result<KernelInfo, ImageError> {
    let path = component.join(INFO);
    let bytes = fs::read(&path).ctx("reading", &path)?;
    serde_json::from_slice(&bytes).map_err(|source| ImageError::Corrupt { path, source })
}

fn rename(from: &Path, to: &Path) -> Result<(), ImageError> {
    fs::rename(from, to).ctx("moving", from)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).ctx("changing mode of", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pinned_metapackage_dependency() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n\
                    Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(
            parse_meta_depends(show),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
    }

    #[test]
    fn parses_unpinned_dependency_and_policy() {
        let show = "Depends: foo, linux-image-6.1.0-9-cloud-amd64\n";
        assert_eq!(
            parse_meta_depends(show),
            Some(("linux-image-6.1.0-9-cloud-amd64".into(), None))
        );
        let policy =
            "linux-image-6.1.0-9-cloud-amd64:\n  Installed: (none)\n  Candidate: 6.1.27-1\n";
        assert_eq!(parse_candidate(policy), Some("6.1.27-1".into()));
        assert_eq!(parse_candidate("  Candidate: (none)\n"), None);
        assert_eq!(parse_meta_depends("Depends: libc6\n"), None);
    }

    #[test]
    fn resolves_current_kernel_with_apt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let memo = dir.path().join("memo.json");
        let pkg = match resolve(&memo, None) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("SKIP: apt cannot resolve the cloud kernel here: {e}");
                return;
            }
        };
        assert!(pkg.name.starts_with("linux-image-") && pkg.name.ends_with("-cloud-amd64"));
        assert!(!pkg.version.is_empty());
        // Answered from the memo the second time, with the same result.
        if lists_fingerprint().is_some() {
            assert!(memo.exists());
            assert_eq!(resolve(&memo, None).expect("memo"), pkg);
        }
    }
}
