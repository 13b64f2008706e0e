//! The secrets store: values encrypted at rest (XChaCha20-Poly1305, the secret's name as associated data so
//! a ciphertext cannot be moved to another name) with a key kept in its own file outside the database.
//! Values go in (`hutch secret set`) and, later, to the gateway; no API returns one.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hutch_policy::{HostPattern, SecretValue};
use zeroize::Zeroizing;

use crate::store::{now_ms, SecretRow, Store};
use crate::DaemonError;

/// The key that seals secret values; never written to the database.
pub struct SecretKey {
    cipher: XChaCha20Poly1305,
    path: PathBuf,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.path.display())
    }
}

/// What a listing shows about a secret: never its value.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub hosts: Vec<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl SecretKey {
    /// Reads the 32-byte key at `path`, creating it (mode 0600, never overwriting) if it does not exist.
    pub fn load_or_create(path: &Path) -> Result<SecretKey, DaemonError> {
        let io = |what: String| move |source| DaemonError::Io { what, source };
        match std::fs::read(path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                if bytes.len() != 32 {
                    return Err(DaemonError::BadInput(format!(
                        "the secrets key {} has {} bytes, not 32; restore the right file (secrets sealed with another key cannot be read)",
                        path.display(),
                        bytes.len()
                    )));
                }
                let mode = std::fs::metadata(path).map_err(io(format!("stat {}", path.display())))?.permissions().mode();
                if mode & 0o077 != 0 {
                    return Err(DaemonError::BadInput(format!(
                        "the secrets key {} is readable by others (mode {:o}); run `chmod 600 {}`",
                        path.display(),
                        mode & 0o777,
                        path.display()
                    )));
                }
                let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| DaemonError::Internal("key length".into()))?;
                Ok(SecretKey { cipher, path: path.to_path_buf() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
                }
                let mut key = Zeroizing::new([0u8; 32]);
                getrandom::getrandom(key.as_mut()).map_err(|e| DaemonError::Internal(format!("no host randomness: {e}")))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io(format!("create {}", path.display())))?;
                f.write_all(key.as_ref()).and_then(|_| f.sync_all()).map_err(io(format!("write {}", path.display())))?;
                let cipher = XChaCha20Poly1305::new_from_slice(key.as_ref()).map_err(|_| DaemonError::Internal("key length".into()))?;
                Ok(SecretKey { cipher, path: path.to_path_buf() })
            }
            Err(e) => Err(DaemonError::Io { what: format!("read {}", path.display()), source: e }),
        }
    }

    fn seal(&self, name: &str, value: &[u8]) -> Result<(Vec<u8>, Vec<u8>), DaemonError> {
        let mut nonce = [0u8; 24];
        getrandom::getrandom(&mut nonce).map_err(|e| DaemonError::Internal(format!("no host randomness: {e}")))?;
        let ct = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: value, aad: name.as_bytes() })
            .map_err(|_| DaemonError::Internal("encryption failed".into()))?;
        Ok((nonce.to_vec(), ct))
    }

    fn open(&self, row: &SecretRow) -> Result<Zeroizing<Vec<u8>>, DaemonError> {
        if row.nonce.len() != 24 {
            return Err(DaemonError::Internal(format!("secret {} has a malformed nonce", row.name)));
        }
        self.cipher
            .decrypt(XNonce::from_slice(&row.nonce), Payload { msg: &row.ciphertext, aad: row.name.as_bytes() })
            .map(Zeroizing::new)
            .map_err(|_| {
                DaemonError::BadInput(format!(
                    "secret {} cannot be decrypted with {} (wrong key file, or the database was altered)",
                    row.name,
                    self.path.display()
                ))
            })
    }
}

/// Secret names are environment-variable-like, as in policy files.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    let mut b = name.bytes();
    let first = matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_');
    if first && b.all(|c| c.is_ascii_alphanumeric() || c == b'_') && name.len() <= 64 {
        Ok(())
    } else {
        Err(format!("secret name {name:?} must be a letter or '_' followed by letters, digits or '_' (at most 64)"))
    }
}

/// Stores (or replaces) a secret. The value is checked the way the gateway will use it (an HTTP header value)
/// and each host is parsed as a policy host pattern, so a stored secret is always usable.
pub fn set_secret(store: &Store, key: &SecretKey, name: &str, hosts: &[String], value: Zeroizing<String>) -> Result<(), DaemonError> {
    check_secret_name(name).map_err(DaemonError::BadInput)?;
    if hosts.is_empty() {
        return Err(DaemonError::BadInput(format!("secret {name} needs at least one host it may be sent to (--hosts a,b)")));
    }
    let mut canonical = Vec::new();
    for h in hosts {
        let p = HostPattern::parse(h).map_err(|e| DaemonError::BadInput(format!("host {h:?} for secret {name}: {e}")))?;
        canonical.push(p.to_string());
    }
    let value = SecretValue::new((*value).clone(), &format!("the value of secret {name}")).map_err(DaemonError::BadInput)?;
    let (nonce, ciphertext) = key.seal(name, value.expose().as_bytes())?;
    let now = now_ms();
    store.put_secret(&SecretRow { name: name.to_string(), hosts: canonical, nonce, ciphertext, created_ms: now, updated_ms: now })
}

pub fn list_secrets(store: &Store) -> Result<Vec<SecretInfo>, DaemonError> {
    Ok(store
        .secrets()?
        .into_iter()
        .map(|r| SecretInfo { name: r.name, hosts: r.hosts, created_ms: r.created_ms, updated_ms: r.updated_ms })
        .collect())
}

/// The value, for the one consumer that injects it (the gateway); the daemon's API never calls this.
pub fn reveal(store: &Store, key: &SecretKey, name: &str) -> Result<Option<SecretValue>, DaemonError> {
    let Some(row) = store.secret(name)? else { return Ok(None) };
    let bytes = key.open(&row)?;
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| DaemonError::Internal(format!("secret {name} is not UTF-8")))?;
    SecretValue::new(text, name).map(Some).map_err(DaemonError::BadInput)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_encrypted_at_rest_with_a_key_outside_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("state.db");
        let keyfile = dir.path().join("keys/secrets.key");
        let store = Store::open(&db).unwrap();
        let key = SecretKey::load_or_create(&keyfile).unwrap();
        assert_eq!(std::fs::metadata(&keyfile).unwrap().permissions().mode() & 0o777, 0o600);
        let value = "ghp_verysecretvalue_123456";
        set_secret(&store, &key, "GH_TOKEN", &["api.github.com".into(), "*.github.com".into()], Zeroizing::new(value.into())).unwrap();
        drop(store);
        // Nowhere in the database files, in any form SQLite wrote.
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            if e.path().is_file() {
                let bytes = std::fs::read(e.path()).unwrap();
                assert!(!bytes.windows(value.len()).any(|w| w == value.as_bytes()), "{} holds the value", e.path().display());
            }
        }
        let store = Store::open(&db).unwrap();
        let key = SecretKey::load_or_create(&keyfile).unwrap();
        assert_eq!(reveal(&store, &key, "GH_TOKEN").unwrap().unwrap().expose(), value);
        let list = list_secrets(&store).unwrap();
        assert_eq!(list[0].hosts, vec!["api.github.com", "*.github.com"]);
        assert!(!format!("{list:?}").contains(value));
        // Another key cannot read it; a ciphertext moved to another name does not open.
        let other = SecretKey::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(reveal(&store, &other, "GH_TOKEN").unwrap_err().to_string().contains("cannot be decrypted"));
        let mut row = store.secret("GH_TOKEN").unwrap().unwrap();
        row.name = "MOVED".into();
        store.put_secret(&row).unwrap();
        assert!(reveal(&store, &key, "MOVED").is_err());
        // Bad input is named.
        assert!(set_secret(&store, &key, "1X", &["a.com".into()], Zeroizing::new(value.into())).unwrap_err().to_string().contains("secret name"));
        assert!(set_secret(&store, &key, "X", &[], Zeroizing::new(value.into())).unwrap_err().to_string().contains("at least one host"));
        assert!(set_secret(&store, &key, "X", &["*".into()], Zeroizing::new(value.into())).is_err());
        assert!(set_secret(&store, &key, "X", &["a.com".into()], Zeroizing::new("short".into())).unwrap_err().to_string().contains("shorter"));
        // A key readable by others is refused.
        std::fs::set_permissions(&keyfile, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(SecretKey::load_or_create(&keyfile).unwrap_err().to_string().contains("chmod 600"));
    }
}
