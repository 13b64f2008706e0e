//! The environment cache as its users drive it (`hutch run` and `hutch serve` alike): the key (what a setup's
//! result depends on), the limits, and the order of a start: lookup, the builder's lock, a restore from the entry
//! or a fresh VM whose setup is captured afterwards. The snapshots themselves are [`crate::envsnap`].
//!
//! In the key: the image and the VM size and accelerator, the setup script's bytes, the setup phase's policy
//! (hosts, rules, secret names and their hosts and sources, pins, upstream CA paths; never a secret value), the
//! scope (a repository's directory, or a daemon token: two scopes never share an entry), and the content of each
//! declared input file. Not in it: any other file, the environment, copied-in files, the command's own policy.

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::envsnap::{BuilderLock, Entry, EnvStore};
use crate::{Host, Sandbox, SandboxConfig, SandboxError};

/// Entries expire this long after they were made, unless configured otherwise.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// All entries together may take this much disk, unless configured otherwise.
pub const DEFAULT_MAX_SIZE: u64 = 20 << 30;
/// A declared input file larger than this is refused (it is hashed before anything starts).
const MAX_INPUT: u64 = 256 << 20;

/// Everything a setup's result depends on, as far as the cache is concerned.
#[derive(Debug, Clone)]
pub struct KeyInputs<'a> {
    pub image_key: &'a str,
    /// The VM size and accelerator choice as the caller names them (`cpus=1 memory=512 accel=None`).
    pub vm: String,
    pub setup: &'a [u8],
    pub setup_policy: Option<&'a hutch_policy::CheckedPolicy>,
    /// Who may share the entry: a repository's directory, or a daemon token.
    pub scope: &'a str,
    /// Declared inputs: (absolute path, [`digest_file`]).
    pub inputs: Vec<(String, String)>,
}

impl KeyInputs<'_> {
    /// The key: 32 hex digits of a SHA-256 over length-prefixed fields.
    pub fn key(&self) -> Result<String, SandboxError> {
        let mut h = Sha256::new();
        let mut field = |name: &str, value: &[u8]| {
            h.update(name.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("hutch-envcache", b"1");
        field("image", self.image_key.as_bytes());
        field("vm", self.vm.as_bytes());
        field("setup", &Sha256::digest(self.setup));
        let policy = match self.setup_policy {
            Some(p) => serde_json::to_vec(p).map_err(|e| SandboxError::BadInput(format!("describing the setup policy: {e}")))?,
            None => vec![],
        };
        field("setup-policy", &policy);
        field("repository", self.scope.as_bytes());
        let mut inputs = self.inputs.clone();
        inputs.sort();
        inputs.dedup();
        for (path, digest) in &inputs {
            field("input", path.as_bytes());
            field("digest", digest.as_bytes());
        }
        Ok(hex::encode(h.finalize())[..32].to_string())
    }
}

/// A declared input's digest: SHA-256 of its content, or `absent` (a file that does not exist yet is a state too).
pub fn digest_file(path: &Path) -> Result<String, SandboxError> {
    let bad = |m: String| SandboxError::BadInput(m);
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok("absent".into()),
        Err(e) => Err(bad(format!("cannot read cache input {}: {e}", path.display()))),
        Ok(m) if !m.is_file() => Err(bad(format!("cache input {} is not a regular file", path.display()))),
        Ok(m) if m.len() > MAX_INPUT => Err(bad(format!("cache input {} is larger than {} MiB", path.display(), MAX_INPUT >> 20))),
        Ok(_) => {
            let read = |e: std::io::Error| bad(format!("cannot read cache input {}: {e}", path.display()));
            let mut f = std::fs::File::open(path).map_err(read)?;
            let mut h = Sha256::new();
            std::io::copy(&mut f, &mut h).map_err(read)?;
            Ok(hex::encode(h.finalize()))
        }
    }
}

/// What one start does with the cache.
#[derive(Debug, Clone)]
pub struct Plan {
    pub store: EnvStore,
    pub key: String,
    /// For `hutch cache ls`: what the entry was made for.
    pub label: String,
    /// Do not use an entry; make a new one (`--refresh-cache`).
    pub refresh: bool,
    pub max_age: Duration,
    pub max_bytes: u64,
}

/// Where a VM comes from.
pub enum Start {
    /// The image snapshot, then the setup; `lock` when this start builds the entry for its key.
    Fresh { lock: Option<BuilderLock> },
    /// An environment snapshot; `just_made` by this start (right after its own setup).
    Cached { entry: Entry, just_made: bool },
}

impl Plan {
    pub fn short_key(&self) -> String {
        format!("{}…", &self.key[..8.min(self.key.len())])
    }

    /// `warn` takes one-line warnings (escaped by the caller before they reach a terminal or a log).
    /// The builder's lock for the key; `None` (with a warning) when another start holds it: this one then runs the
    /// setup itself and stores nothing, and never waits.
    pub fn builder_lock(&self, warn: &(dyn Fn(&str) + Sync)) -> Option<BuilderLock> {
        match self.store.try_lock(&self.key) {
            Ok(Some(l)) => Some(l),
            Ok(None) => {
                warn(&format!("setup: another run is building the cached environment {}; running the setup without storing", self.short_key()));
                None
            }
            Err(e) => {
                warn(&format!("environment cache: {}", crate::error_chain(&e)));
                None
            }
        }
    }

    /// Decides where the VM comes from: the entry when there is a usable one, else a fresh VM (building the entry
    /// when no other start is). An unusable entry is discarded with a warning; nothing here fails a start.
    pub fn start(&self, warn: &(dyn Fn(&str) + Sync)) -> Start {
        if self.refresh {
            return Start::Fresh { lock: self.builder_lock(warn) };
        }
        match self.store.lookup(&self.key, Some(self.max_age)) {
            Ok(Some(entry)) => Start::Cached { entry, just_made: false },
            Ok(None) => {
                let lock = self.builder_lock(warn);
                // Another start may have finished building between the lookup and the lock.
                match (lock.is_some(), self.store.lookup(&self.key, Some(self.max_age))) {
                    (true, Ok(Some(entry))) => Start::Cached { entry, just_made: false },
                    _ => Start::Fresh { lock },
                }
            }
            Err(e) => {
                warn(&format!("the cached environment {} is unusable ({}); running the setup", self.short_key(), crate::error_chain(&e)));
                self.store.discard(&self.key);
                Start::Fresh { lock: self.builder_lock(warn) }
            }
        }
    }

    /// The VM for `start`, falling back (with a warning) from an entry that does not restore to a fresh start, and
    /// from a VM that cannot be made capturable to an ordinary one.
    pub async fn create(&self, host: &Host, cfg: &SandboxConfig, start: &mut Start, warn: &(dyn Fn(&str) + Sync)) -> Result<Sandbox, SandboxError> {
        if let Start::Cached { entry, .. } = start {
            match Sandbox::restore_env(host, cfg, entry).await {
                Ok(sb) => {
                    self.store.touch(&self.key);
                    return Ok(sb);
                }
                Err(e) => {
                    warn(&format!("cannot restore the cached environment {}… ({}); running the setup", &entry.meta.key[..8.min(entry.meta.key.len())], crate::error_chain(&e)));
                    self.store.discard(&self.key);
                    *start = Start::Fresh { lock: self.builder_lock(warn) };
                }
            }
        }
        if let Start::Fresh { lock } = start {
            if lock.is_some() {
                match Sandbox::create_capturable(host, cfg).await {
                    Ok(sb) => return Ok(sb),
                    Err(e) => {
                        warn(&format!("cannot prepare a VM for the environment cache ({}); running without storing", crate::error_chain(&e)));
                        *lock = None;
                    }
                }
            }
        }
        Sandbox::create_with_notes(host, cfg, warn).await
    }

    /// After a fresh start's setup succeeded and its phase ended: when this start holds the builder's lock, the VM
    /// becomes the entry (and is gone), the cache is pruned, and `Some(entry)` says to restore the command's VM
    /// from it. `Ok(None)`: nothing to capture, keep using `sandbox` (handed back). A failed capture is a warning and
    /// a fresh start without storing (the VM is gone then too).
    pub async fn capture(&self, sandbox: Sandbox, start: &mut Start, setup_ms: u64, warn: &(dyn Fn(&str) + Sync)) -> Result<Option<Entry>, Sandbox> {
        let Start::Fresh { lock } = start else { return Err(sandbox) };
        if lock.is_none() || !sandbox.capturable() {
            return Err(sandbox);
        }
        let Some(l) = lock.take() else { return Err(sandbox) };
        let captured = sandbox.capture(&self.store, &l, &self.label, setup_ms).await;
        drop(l);
        match captured {
            Ok(entry) => {
                let _ = self.store.prune(Some(self.max_age), Some(self.max_bytes));
                *start = Start::Cached { entry: entry.clone(), just_made: true };
                Ok(Some(entry))
            }
            Err(e) => {
                warn(&format!("cannot store the environment ({}); running the setup again without storing", crate::error_chain(&e)));
                *start = Start::Fresh { lock: None };
                Ok(None)
            }
        }
    }
}

/// "2 h", "5 min", "40 s".
pub fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs<'a>(scope: &'a str, setup: &'a [u8]) -> KeyInputs<'a> {
        KeyInputs { image_key: "img", vm: "cpus=1 memory=512 accel=None".into(), setup, setup_policy: None, scope, inputs: vec![] }
    }

    /// The key changes with the setup, the scope and a declared input, and not with the order inputs were named in.
    #[test]
    fn key_follows_its_inputs() {
        let a = inputs("/r", b"apt-get install x").key().unwrap();
        assert_eq!(a.len(), 32);
        assert_eq!(a, inputs("/r", b"apt-get install x").key().unwrap());
        assert_ne!(a, inputs("/r", b"apt-get install y").key().unwrap());
        assert_ne!(a, inputs("token abc", b"apt-get install x").key().unwrap(), "two scopes never share an entry");
        let mut with = inputs("/r", b"apt-get install x");
        with.inputs = vec![("/r/a".into(), "1".into()), ("/r/b".into(), "2".into())];
        let k1 = with.key().unwrap();
        assert_ne!(a, k1);
        with.inputs.reverse();
        assert_eq!(k1, with.key().unwrap());
        with.inputs[0].1 = "3".into();
        assert_ne!(k1, with.key().unwrap());
    }

    #[test]
    fn declared_inputs_are_digested_or_absent() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("req.txt");
        assert_eq!(digest_file(&f).unwrap(), "absent");
        std::fs::write(&f, "x==1\n").unwrap();
        let d = digest_file(&f).unwrap();
        assert_eq!(d.len(), 64);
        assert!(digest_file(t.path()).is_err(), "a directory is not an input file");
    }
}
