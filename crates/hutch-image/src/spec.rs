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

/// Debian packages an image with npm packages needs (bookworm's Node.js is 18.x); added to
/// such a spec's packages whether or not it lists them.
pub const NODE_PACKAGES: &[&str] = &["nodejs", "npm"];

/// The coding agents of [`ImageSpec::agents`], pinned so that the image key names exactly what
/// is installed. A pin moves only to a release whose `engines` accept [`NODE_PACKAGES`]'s
/// Node.js 18: Claude Code 2.1.199 and later want Node.js 22. Claude Code since 2.1.113 is a
/// native binary that its postinstall script picks for the platform; Codex's `codex` is a
/// small Node.js launcher of its native binary.
pub const AGENT_NPM_PACKAGES: &[&str] =
    &["@anthropic-ai/claude-code@2.1.197", "@openai/codex@0.171.0"];

/// What an image is made of. Everything here is part of the cache key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Debian suite of the rootfs, e.g. "bookworm". The host's apt sources must list it.
    pub suite: String,
    /// Debian packages installed on top of [`BASE_PACKAGES`].
    pub extra_packages: Vec<String>,
    /// npm packages installed globally (under /usr/local) after the Debian packages, each
    /// `NAME@VERSION` with an exact version (no ranges or tags), so the key pins them.
    /// Non-empty adds [`NODE_PACKAGES`]; the host must reach an npm registry while building.
    pub npm_packages: Vec<String>,
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
            npm_packages: Vec::new(),
            agent_binary: agent_binary.into(),
        }
    }

    /// The default image plus Node.js and the coding agents of [`AGENT_NPM_PACKAGES`]
    /// (`claude`, `codex`).
    pub fn agents(agent_binary: impl Into<PathBuf>) -> Self {
        ImageSpec {
            extra_packages: NODE_PACKAGES.iter().map(|p| (*p).to_owned()).collect(),
            npm_packages: AGENT_NPM_PACKAGES.iter().map(|p| (*p).to_owned()).collect(),
            ..ImageSpec::default_for(agent_binary)
        }
    }
}

/// An [`ImageSpec`] that passed the checks.
#[derive(Debug, Clone)]
pub(crate) struct CheckedSpec {
    pub suite: String,
    /// Base plus extras (plus [`NODE_PACKAGES`] when there are npm packages), sorted, without
    /// duplicates.
    pub packages: Vec<String>,
    /// `NAME@VERSION`, sorted by name, one version per name.
    pub npm_packages: Vec<String>,
    pub agent: Agent,
}

impl CheckedSpec {
    /// The parts a rootfs build reads, already checked by the process that asks for the build (the rootless
    /// build's helper gets them from it); no agent.
    pub(crate) fn for_rootfs(suite: String, packages: Vec<String>, npm_packages: Vec<String>) -> CheckedSpec {
        CheckedSpec { suite, packages, npm_packages, agent: Agent { bytes: Vec::new(), sha256: String::new() } }
    }
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
        let npm_packages = check_npm_packages(&spec.npm_packages)?;
        if !npm_packages.is_empty() {
            packages.extend(NODE_PACKAGES.iter().map(|p| (*p).to_owned()));
        }
        packages.sort();
        packages.dedup();
        Ok(CheckedSpec {
            suite: spec.suite.clone(),
            packages,
            npm_packages,
            agent: Agent::load(&spec.agent_binary)?,
        })
    }
}

/// Each entry split into a checked name and exact version; sorted by name, a name given twice
/// refused (even with the same version: the caller's list is probably wrong).
fn check_npm_packages(specs: &[String]) -> Result<Vec<String>, ImageError> {
    let mut checked: Vec<(&str, &str)> = Vec::with_capacity(specs.len());
    for spec in specs {
        // A scoped name starts with '@', so the version is after the last one.
        let (name, version) = spec
            .rsplit_once('@')
            .filter(|(name, _)| !name.is_empty())
            .ok_or_else(|| {
                ImageError::InvalidSpec(format!(
                    "npm package `{spec}` has no version: write NAME@VERSION, e.g. `left-pad@1.3.0`"
                ))
            })?;
        if !is_npm_name(name) {
            return Err(ImageError::InvalidSpec(format!(
                "`{name}` is not an npm package name (lower-case letters, digits, and `-._~` \
                 after the first character; optionally `@scope/` before it; at most 214 characters)"
            )));
        }
        if !is_exact_version(version) {
            return Err(ImageError::InvalidSpec(format!(
                "npm package `{name}`: `{version}` is not an exact version (like `1.2.3` or \
                 `1.2.3-beta.1`; no ranges or tags, so that the image key pins what is installed)"
            )));
        }
        if checked.iter().any(|(n, _)| *n == name) {
            return Err(ImageError::InvalidSpec(format!(
                "npm package `{name}` is listed twice; give it once"
            )));
        }
        checked.push((name, version));
    }
    checked.sort();
    Ok(checked
        .into_iter()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect())
}

/// npm's rules for new package names: lower case, URL-safe characters, not starting with `.`
/// or `_`, an optional `@scope/`, 214 characters at most. A leading `-` is refused too: npm
/// would read the name as an option.
fn is_npm_name(name: &str) -> bool {
    let part_ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with(['.', '_', '-'])
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._~".contains(c))
    };
    if name.len() > 214 {
        return false;
    }
    match name.strip_prefix('@') {
        Some(scoped) => scoped
            .split_once('/')
            .is_some_and(|(scope, pkg)| part_ok(scope) && part_ok(pkg)),
        None => part_ok(name),
    }
}

/// A semver version without range operators: `MAJOR.MINOR.PATCH`, then optionally
/// `-prerelease` and `+build` of dot-separated `[0-9A-Za-z-]` identifiers.
fn is_exact_version(version: &str) -> bool {
    let ids_ok = |s: &str| {
        s.split('.')
            .all(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
    };
    let (rest, build) = match version.split_once('+') {
        Some((r, b)) => (r, Some(b)),
        None => (version, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (rest, None),
    };
    let numbers: Vec<&str> = core.split('.').collect();
    numbers.len() == 3
        && numbers
            .iter()
            .all(|n| !n.is_empty() && n.len() <= 16 && n.chars().all(|c| c.is_ascii_digit()))
        && pre.map_or(true, ids_ok)
        && build.map_or(true, ids_ok)
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
            npm_packages: Vec::new(),
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

    #[test]
    fn npm_packages_are_checked_sorted_and_bring_node() {
        let mut spec = ImageSpec::default_for("/bin/busybox");
        spec.npm_packages = vec![
            "typescript@5.4.5".into(),
            "@scope/tool.x@1.0.0-rc.1+b2".into(),
        ];
        let checked = CheckedSpec::check(&spec).expect("valid spec");
        assert_eq!(
            checked.npm_packages,
            vec![
                "@scope/tool.x@1.0.0-rc.1+b2".to_string(),
                "typescript@5.4.5".to_string()
            ]
        );
        for node in NODE_PACKAGES {
            assert!(checked.packages.iter().any(|p| p == node), "{node} added");
        }
        let plain = CheckedSpec::check(&ImageSpec::default_for("/bin/busybox")).expect("valid");
        assert!(plain.npm_packages.is_empty());
        assert!(
            !plain.packages.iter().any(|p| p == "npm"),
            "no npm without npm packages"
        );

        let agents = CheckedSpec::check(&ImageSpec::agents("/bin/busybox")).expect("preset");
        assert_eq!(agents.npm_packages.len(), AGENT_NPM_PACKAGES.len());
    }

    #[test]
    fn bad_npm_packages_are_refused_with_reasons() {
        for (bad, why) in [
            ("typescript", "has no version"),
            ("@scope/pkg", "has no version"),
            ("typescript@", "not an exact version"),
            ("typescript@^5.0.0", "not an exact version"),
            ("typescript@latest", "not an exact version"),
            ("typescript@5.0", "not an exact version"),
            ("typescript@5.0.0 || 6.0.0", "not an exact version"),
            ("TypeScript@5.0.0", "not an npm package name"),
            ("_private@1.0.0", "not an npm package name"),
            ("@scope@1.0.0", "not an npm package name"),
            ("a;rm -rf /@1.0.0", "not an npm package name"),
            ("../x@1.0.0", "not an npm package name"),
            ("--prefix=/x@1.0.0", "not an npm package name"),
            ("--global@1.0.0", "not an npm package name"),
        ] {
            let mut spec = ImageSpec::default_for("/bin/busybox");
            spec.npm_packages = vec![bad.into()];
            let msg = CheckedSpec::check(&spec).expect_err(bad).to_string();
            assert!(msg.contains(why), "{bad}: {msg}");
        }
        let mut spec = ImageSpec::default_for("/bin/busybox");
        spec.npm_packages = vec!["x@1.0.0".into(), "x@2.0.0".into()];
        let msg = CheckedSpec::check(&spec).expect_err("twice").to_string();
        assert!(msg.contains("listed twice"), "{msg}");
    }
}
