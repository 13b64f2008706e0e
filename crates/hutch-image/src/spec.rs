//! What the caller asks for ([`ImageSpec`]) and its checked form: validated names, the agent
//! read and hashed once.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::elf::{self, Executable};
use crate::error::{ImageError, IoContext};

/// The packages every Hutch rootfs has, on top of Debian's minbase variant.
pub const BASE_PACKAGES: &[&str] = &[
    "ca-certificates",
    "curl",
    "git",
    "iproute2",
    "nftables",
    "procps",
    "python3",
];

/// The Debian suite images are built from unless the spec says otherwise.
pub const DEFAULT_SUITE: &str = "bookworm";

/// What an image is made of. Everything here is part of the cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Debian suite of the rootfs, e.g. "bookworm". The host's apt sources must list it.
    pub suite: String,
    /// Debian packages installed on top of [`BASE_PACKAGES`].
    pub extra_packages: Vec<String>,
    /// The guest agent: a static x86_64 executable (or a `#!` script whose interpreter the
    /// rootfs has). It runs as PID 1 after switch_root; its bytes key the initramfs.
    pub agent_binary: PathBuf,
}

impl ImageSpec {
    /// bookworm, no extra packages.
    pub fn default_for(agent_binary: impl Into<PathBuf>) -> Self {
        ImageSpec {
            suite: DEFAULT_SUITE.to_owned(),
            extra_packages: Vec::new(),
            agent_binary: agent_binary.into(),
        }
    }
}

/// An [`ImageSpec`] that passed the checks.
#[derive(Debug, Clone)]
pub(crate) struct CheckedSpec {
    pub suite: String,
    /// Base plus extras, sorted, without duplicates.
    pub packages: Vec<String>,
    pub agent: Agent,
}

#[derive(Debug, Clone)]
pub(crate) struct Agent {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

impl CheckedSpec {
    pub fn check(spec: &ImageSpec) -> Result<Self, ImageError> {
        if !is_suite_name(&spec.suite) {
            return Err(ImageError::InvalidSpec(format!(
                "suite `{}` is not a Debian suite name (e.g. `bookworm`)",
                spec.suite
            )));
        }
        let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|p| (*p).to_owned()).collect();
        for extra in &spec.extra_packages {
            if !is_package_name(extra) {
                return Err(ImageError::InvalidSpec(format!(
                    "`{extra}` is not a Debian package name (lower-case letters, digits, \
                     `+`, `-`, `.`; at least two characters)"
                )));
            }
            packages.push(extra.clone());
        }
        packages.sort();
        packages.dedup();
        Ok(CheckedSpec {
            suite: spec.suite.clone(),
            packages,
            agent: Agent::load(&spec.agent_binary)?,
        })
    }
}

impl Agent {
    pub fn load(path: &Path) -> Result<Self, ImageError> {
        let bad = |problem: String| ImageError::BadAgent {
            path: path.to_owned(),
            problem,
        };
        let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let bytes = std::fs::read(path).ctx("reading agent binary", path)?;
        // A script is accepted: it runs after switch_root, where the rootfs has /bin/sh.
        match elf::inspect(&bytes).map_err(bad)? {
            Executable::StaticElf | Executable::Script { .. } => {}
        }
        Ok(Agent {
            sha256: sha256_hex(&bytes),
            bytes,
        })
    }
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Debian policy 5.6.1: lower case alphanumerics and `+ - .`, starting alphanumeric, at
/// least two characters.
fn is_package_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() >= 2
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn is_suite_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names() {
        for ok in ["git", "g++", "python3.11", "libc6-dev", "0ad"] {
            assert!(is_package_name(ok), "{ok}");
        }
        for bad in ["", "a", "Git", "-x", "curl;rm", "a b", "pkg=1.0", "../x"] {
            assert!(!is_package_name(bad), "{bad}");
        }
    }

    #[test]
    fn extras_are_merged_sorted_and_deduplicated() {
        let spec = ImageSpec {
            suite: "bookworm".into(),
            extra_packages: vec!["zstd".into(), "git".into(), "build-essential".into()],
            agent_binary: "/bin/busybox".into(),
        };
        let checked = CheckedSpec::check(&spec).expect("valid spec");
        let mut expected: Vec<String> = BASE_PACKAGES.iter().map(|p| p.to_string()).collect();
        expected.extend(["zstd".to_string(), "build-essential".to_string()]);
        expected.sort();
        assert_eq!(checked.packages, expected);
    }

    #[test]
    fn bad_specs_are_refused_with_reasons() {
        let mut spec = ImageSpec::default_for("/bin/busybox");
        spec.extra_packages = vec!["curl; rm -rf /".into()];
        let msg = CheckedSpec::check(&spec)
            .expect_err("bad package")
            .to_string();
        assert!(msg.contains("not a Debian package name"), "{msg}");

        let mut spec = ImageSpec::default_for("/bin/busybox");
        spec.suite = "Bookworm/../x".into();
        assert!(CheckedSpec::check(&spec).is_err());

        let spec = ImageSpec::default_for("/nonexistent/agent");
        let msg = CheckedSpec::check(&spec)
            .expect_err("missing agent")
            .to_string();
        assert!(
            msg.starts_with("agent binary /nonexistent/agent: cannot read it"),
            "{msg}"
        );

        let spec = ImageSpec::default_for("/bin/ls");
        let msg = CheckedSpec::check(&spec)
            .expect_err("dynamic agent")
            .to_string();
        assert!(msg.contains("dynamically linked"), "{msg}");
    }
}
