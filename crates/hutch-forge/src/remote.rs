//! git against the forge: fetch and push over HTTPS only. The token reaches git through a configuration file
//! of mode 0600 in a private directory (`http.<clone URL>.extraHeader`, so it goes to that URL and nowhere
//! else; redirects are not followed), never through argv, the environment or the URL. git's messages are
//! redacted before they become errors, and a failure is sorted into "try again" (5xx, connection) or not.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hutch_repo::git::Git;
use hutch_repo::RepoError;
use zeroize::Zeroizing;

use crate::retry::Failure;
use crate::{ForgeError, ForgeRepo, SecretToken};

/// The configuration git reads for remote operations; deleted with its directory.
pub(crate) struct RemoteConfig {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl RemoteConfig {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// A value in a git configuration file: quoted, with `\` and `"` escaped. Line breaks are refused by the callers'
/// checks (a URL, a path, a header that is visible ASCII).
fn quoted(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Writes the configuration for `repo` with `token` into a fresh private directory.
pub(crate) fn write_config(repo: &ForgeRepo, token: &SecretToken) -> Result<RemoteConfig, ForgeError> {
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| ForgeError::Io { what, message: e.to_string() }
    };
    let dir = tempfile::Builder::new().prefix("hutch-forge-cred-").tempdir().map_err(io("cannot create a private directory"))?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io("cannot make the private directory 0700"))?;
    let path = dir.path().join("gitconfig");
    let mut text = Zeroizing::new(String::new());
    text.push_str("[http]\n\tfollowRedirects = false\n\tsslVerify = true\n");
    if let Some(ca) = &repo.ca_file {
        let ca = ca.to_str().filter(|s| !s.contains(['\n', '\r', '\0'])).ok_or_else(|| {
            ForgeError::Config(format!("the forge's CA file path {} must be UTF-8 without line breaks", ca.display()))
        })?;
        text.push_str(&format!("\tsslCAInfo = {}\n", quoted(ca)));
    }
    text.push_str(&format!("[http {}]\n\textraHeader = {}\n", quoted(&repo.clone_url), quoted(&format!("Authorization: {}", token.git_basic().as_str()))));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io("cannot create the git configuration for the forge"))?;
    f.write_all(text.as_bytes()).map_err(io("cannot write the git configuration for the forge"))?;
    Ok(RemoteConfig { _dir: dir, path })
}

/// The HTTP status git's message names (`The requested URL returned error: 503`, `HTTP 503`).
fn status_in(msg: &str) -> Option<u16> {
    for key in ["returned error: ", "HTTP "] {
        for (i, _) in msg.match_indices(key) {
            let digits: String = msg[i + key.len()..].chars().take_while(char::is_ascii_digit).collect();
            if let Ok(n) = digits.parse::<u16>() {
                if (100..600).contains(&n) {
                    return Some(n);
                }
            }
        }
    }
    None
}

/// Sorts a failed remote git command.
pub(crate) fn classify(action: &str, what: &str, e: RepoError, token: &SecretToken) -> Failure {
    let msg = match e {
        RepoError::Git { stderr, .. } => token.redact(&stderr),
        other => return Failure::Fatal(ForgeError::Repo(other)),
    };
    let auth = ["could not read Username", "could not read Password", "Authentication failed", "terminal prompts disabled"];
    match status_in(&msg) {
        Some(s @ (401 | 403)) => Failure::Fatal(ForgeError::Unauthorized { what: what.into(), status: s }),
        Some(s) if s >= 500 => Failure::Transient(format!("HTTP {s}: {msg}")),
        Some(s) if s >= 400 => Failure::Fatal(ForgeError::Rejected { what: what.into(), status: s, message: msg }),
        _ if auth.iter().any(|a| msg.contains(a)) => Failure::Fatal(ForgeError::Unauthorized { what: what.into(), status: 401 }),
        _ => {
            let transient = [
                "Failed to connect",
                "Connection refused",
                "Connection reset",
                "Could not resolve host",
                "Connection timed out",
                "Operation timed out",
                "SSL_ERROR_SYSCALL",
                "Empty reply from server",
                "Recv failure",
                "Send failure",
            ];
            if transient.iter().any(|t| msg.contains(t)) {
                Failure::Transient(msg)
            } else {
                Failure::Fatal(ForgeError::Git { action: action.into(), message: msg })
            }
        }
    }
}

/// Runs one remote git command on a blocking thread.
pub(crate) async fn run(g: &Git, action: &'static str, what: &str, args: Vec<String>, token: &SecretToken) -> Result<(), Failure> {
    let g = g.clone();
    let out = tokio::task::spawn_blocking(move || g.run(action, &args)).await;
    match out {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(classify(action, what, e, token)),
        Err(e) => Err(Failure::Fatal(ForgeError::Io { what: format!("git {action}"), message: e.to_string() })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SecretToken {
        SecretToken::new("tok_0123456789abcdef").unwrap()
    }

    fn git_err(s: &str) -> RepoError {
        RepoError::Git { action: "push".into(), stderr: s.into() }
    }

    #[test]
    fn failures_are_sorted_by_what_git_says() {
        let t = token();
        let f = classify("push", "pushing", git_err("error: RPC failed; HTTP 503 curl 22 The requested URL returned error: 503"), &t);
        assert!(matches!(f, Failure::Transient(_)), "{f:?}");
        let f = classify("push", "pushing", git_err("fatal: unable to access 'https://x/': Failed to connect to x port 1: Connection refused"), &t);
        assert!(matches!(f, Failure::Transient(_)), "{f:?}");
        let f = classify("push", "pushing", git_err("fatal: could not read Username for 'https://x': terminal prompts disabled"), &t);
        assert!(matches!(f, Failure::Fatal(ForgeError::Unauthorized { status: 401, .. })), "{f:?}");
        let f = classify("push", "pushing", git_err("fatal: unable to access 'https://x/': The requested URL returned error: 404"), &t);
        assert!(matches!(f, Failure::Fatal(ForgeError::Rejected { status: 404, .. })), "{f:?}");
        let f = classify("push", "pushing", git_err("! [remote rejected] main -> main (pre-receive hook declined) tok_0123456789abcdef"), &t);
        match f {
            Failure::Fatal(e) => assert!(!e.to_string().contains("tok_0123456789abcdef"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_config_file_is_private_and_scoped_to_the_clone_url() {
        use std::os::unix::fs::PermissionsExt;
        let repo = ForgeRepo {
            api_base: "https://localhost:1".into(),
            clone_url: "https://localhost:1/o/r.git".into(),
            owner: "o".into(),
            name: "r".into(),
            ca_file: Some("/tmp/ca \"x\".pem".into()),
        };
        let cfg = write_config(&repo, &token()).unwrap();
        let meta = std::fs::metadata(cfg.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let dir_mode = std::fs::metadata(cfg.path().parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let text = std::fs::read_to_string(cfg.path()).unwrap();
        assert!(text.contains("[http \"https://localhost:1/o/r.git\"]"), "{text}");
        assert!(text.contains("sslCAInfo = \"/tmp/ca \\\"x\\\".pem\""), "{text}");
        let p = cfg.path().to_path_buf();
        drop(cfg);
        assert!(!p.exists(), "the file goes with its directory");
    }
}
