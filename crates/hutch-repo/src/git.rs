//! Host-side git, run one way only. Every invocation starts from an empty environment, names its git
//! directory explicitly, reads no system or global config, and overrides on the command line every setting
//! that could run a program (hooks, fsmonitor, pagers, signing, credential helpers, auto-gc, submodule
//! recursion). Reading VM output happens in scratch repositories whose config hutch writes, so no filter,
//! textconv or diff driver is ever defined there.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::RepoError;

/// `-c` settings on every command line: command-line config wins over the repository's own.
const OVERRIDES: &[&str] = &[
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "core.pager=cat",
    "core.editor=false",
    "core.askPass=",
    "core.sshCommand=false",
    "core.protectNTFS=true",
    "core.protectHFS=true",
    "core.quotePath=true",
    "credential.helper=",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "log.showSignature=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "fetch.recurseSubmodules=false",
    "submodule.recurse=false",
    "protocol.allow=never",
    "protocol.file.allow=always",
    "transfer.fsckObjects=true",
    "fetch.fsck.hasDotgit=error",
    "fetch.fsck.hasDot=error",
    "fetch.fsck.hasDotdot=error",
    "fetch.fsck.fullPathname=error",
    "fetch.fsck.nullSha1=error",
    "fetch.fsck.zeroPaddedFilemode=error",
    "color.ui=false",
    "advice.detachedHead=false",
    "init.defaultBranch=main",
    "user.name=hutch",
    "user.email=hutch@localhost",
];

/// How much of git's stderr an error carries.
const STDERR_MAX: usize = 4000;

/// A git object id (SHA-1 or SHA-256), checked to be hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Oid(String);

impl Oid {
    pub fn parse(s: &str) -> Option<Oid> {
        let s = s.trim();
        ((s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| Oid(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl TryFrom<String> for Oid {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Oid::parse(&s).ok_or_else(|| format!("{s:?} is not an object id"))
    }
}

impl From<Oid> for String {
    fn from(o: Oid) -> String {
        o.0
    }
}

impl std::fmt::Display for Oid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One way of running git: which git directory, work tree and index, from which directory.
#[derive(Debug, Clone)]
pub struct Git {
    git_dir: Option<PathBuf>,
    work_tree: Option<PathBuf>,
    index: Option<PathBuf>,
    cwd: PathBuf,
    excludes: Option<PathBuf>,
    /// HTTPS remotes allowed, with this file as the global configuration (see [`Git::remote_https`]).
    remote_config: Option<PathBuf>,
}

impl Git {
    /// Git on the repository at `git_dir` (bare use: no work tree).
    pub fn at(git_dir: &Path) -> Git {
        Git { git_dir: Some(git_dir.to_path_buf()), work_tree: None, index: None, cwd: git_dir.to_path_buf(), excludes: None, remote_config: None }
    }

    /// Git that finds the repository from `cwd`, as a user's shell would (only for discovery).
    pub fn discover(cwd: &Path) -> Git {
        Git { git_dir: None, work_tree: None, index: None, cwd: cwd.to_path_buf(), excludes: None, remote_config: None }
    }

    /// Uses `tree` as the work tree and runs from its top.
    pub fn work_tree(mut self, tree: &Path) -> Git {
        self.work_tree = Some(tree.to_path_buf());
        self.cwd = tree.to_path_buf();
        self
    }

    /// Uses `index` instead of the repository's index file.
    pub fn index(mut self, index: &Path) -> Git {
        self.index = Some(index.to_path_buf());
        self
    }

    /// An ignore file to honour besides the work tree's `.gitignore` files and `info/exclude`.
    pub fn excludes(mut self, file: Option<PathBuf>) -> Git {
        self.excludes = file;
        self
    }

    /// Lets this git fetch from and push to HTTPS remotes (no other protocol), reading `config` as its global
    /// configuration: a file the caller wrote, mode 0600, that holds what the remote needs (CA file, an
    /// authorization header scoped to one URL). Secrets stay in that file, never in argv or the environment.
    /// Everything else stays shut out as for any other git here (hooks, helpers, askpass, prompts).
    pub fn remote_https(mut self, config: &Path) -> Git {
        self.remote_config = Some(config.to_path_buf());
        self
    }

    pub fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = Command::new("git");
        c.env_clear();
        c.env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()));
        // No user config, attributes or ignore files by default location: HOME points nowhere.
        c.env("HOME", "/nonexistent/hutch-home");
        c.env("LC_ALL", "C");
        c.env("GIT_CONFIG_NOSYSTEM", "1");
        c.env("GIT_CONFIG_GLOBAL", "/dev/null");
        c.env("GIT_ATTR_NOSYSTEM", "1");
        c.env("GIT_TERMINAL_PROMPT", "0");
        c.env("GIT_NO_REPLACE_OBJECTS", "1");
        c.env("GIT_OPTIONAL_LOCKS", "0");
        c.env("GIT_PAGER", "cat");
        c.env("GIT_PROTOCOL_FROM_USER", "0");
        match &self.remote_config {
            Some(cfg) => {
                c.env("GIT_CONFIG_GLOBAL", cfg);
                c.env("GIT_ALLOW_PROTOCOL", "https");
            }
            None => {
                c.env("GIT_ALLOW_PROTOCOL", "file");
            }
        }
        if let Some(d) = &self.git_dir {
            c.env("GIT_DIR", d);
        }
        if let Some(w) = &self.work_tree {
            c.env("GIT_WORK_TREE", w);
        }
        if let Some(i) = &self.index {
            c.env("GIT_INDEX_FILE", i);
        }
        for o in OVERRIDES {
            c.arg("-c").arg(o);
        }
        if let Some(x) = &self.excludes {
            let mut kv = OsString::from("core.excludesFile=");
            kv.push(x);
            c.arg("-c").arg(kv);
        }
        c.args(args);
        c.current_dir(&self.cwd);
        c.stdin(Stdio::null());
        c
    }

    /// Runs git; returns its stdout, or an error carrying `action` and git's stderr.
    pub fn run<I, S>(&self, action: &str, args: I) -> Result<Vec<u8>, RepoError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_input(action, args, None)
    }

    /// As [`Git::run`], feeding `input` on stdin.
    pub fn run_input<I, S>(&self, action: &str, args: I, input: Option<&[u8]>) -> Result<Vec<u8>, RepoError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        if input.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().map_err(RepoError::GitMissing)?;
        let writer = match (input, child.stdin.take()) {
            (Some(data), Some(mut stdin)) => {
                let data = data.to_vec();
                Some(std::thread::spawn(move || {
                    let _ = stdin.write_all(&data);
                }))
            }
            _ => None,
        };
        let out = child.wait_with_output().map_err(RepoError::GitMissing)?;
        if let Some(w) = writer {
            let _ = w.join();
        }
        if !out.status.success() {
            return Err(RepoError::Git { action: action.to_string(), stderr: stderr_text(&out.stderr) });
        }
        Ok(out.stdout)
    }

    /// Runs git and returns its stdout as one trimmed line of text.
    pub fn line<I, S>(&self, action: &str, args: I) -> Result<String, RepoError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let out = self.run(action, args)?;
        Ok(String::from_utf8_lossy(&out).trim_end_matches('\n').to_string())
    }

    /// Runs git and reports only whether it succeeded.
    pub fn ok<I, S>(&self, args: I) -> bool
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.command(args);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c.status().map(|s| s.success()).unwrap_or(false)
    }
}

pub(crate) fn stderr_text(b: &[u8]) -> String {
    let s = crate::path::show(&b[..b.len().min(STDERR_MAX)]).replace("\\n", "\n");
    let s = s.trim().to_string();
    if s.is_empty() {
        "(no message)".into()
    } else {
        s
    }
}

/// A path git printed (bytes, maybe not UTF-8), without its trailing newline.
pub(crate) fn path_from_output(b: &[u8]) -> PathBuf {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    PathBuf::from(OsString::from_vec(b.to_vec()))
}

/// Creates an empty bare repository at `dir` (which must not exist or be empty) with hutch's own config.
pub fn init_scratch(dir: &Path, object_format: &str) -> Result<Git, RepoError> {
    let g = Git::discover(dir.parent().unwrap_or(Path::new("/")));
    g.run(
        "init (scratch repository)",
        [
            OsStr::new("init"),
            OsStr::new("-q"),
            OsStr::new("--bare"),
            OsStr::new(&format!("--object-format={object_format}")),
            dir.as_os_str(),
        ],
    )?;
    // `git init` copies templates (sample hooks); they never run, but nothing is needed from them either.
    let _ = std::fs::remove_dir_all(dir.join("hooks"));
    Ok(Git::at(dir))
}

/// The user's own global ignore file (their `core.excludesFile`, else the XDG default), read as data so the
/// snapshot leaves out what their `git status` leaves out.
pub fn user_excludes_file() -> Option<PathBuf> {
    let out = Command::new("git")
        .args(["config", "--global", "--includes", "--path", "--get", "core.excludesFile"])
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env_remove("GIT_DIR")
        .current_dir("/")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let p = if out.status.success() && !out.stdout.is_empty() {
        path_from_output(&out.stdout)
    } else {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
        base.join("git/ignore")
    };
    p.is_file().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oids_are_checked() {
        assert!(Oid::parse("0123456789abcdef0123456789abcdef01234567").is_some());
        assert!(Oid::parse(&"a".repeat(64)).is_some());
        assert!(Oid::parse("0123456789ABCDEF0123456789abcdef01234567").is_none());
        assert!(Oid::parse("HEAD").is_none());
        assert!(Oid::parse("../../x").is_none());
    }

    #[test]
    fn repository_config_cannot_run_hooks_or_fsmonitor() {
        let t = tempfile::tempdir().unwrap();
        let repo = t.path().join("r");
        let g = Git::discover(t.path());
        g.run("init", [OsStr::new("init"), OsStr::new("-q"), repo.as_os_str()]).unwrap();
        let marker = t.path().join("ran");
        let hook = format!("#!/bin/sh\ntouch {}\n", marker.display());
        // A hostile repository config: a hooks dir with every hook, an fsmonitor command, a pager.
        let hooks = t.path().join("hooks");
        std::fs::create_dir(&hooks).unwrap();
        for h in ["reference-transaction", "post-checkout", "pre-commit", "post-commit", "post-index-change"] {
            std::fs::write(hooks.join(h), &hook).unwrap();
            std::fs::set_permissions(hooks.join(h), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        let cmd = t.path().join("cmd.sh");
        std::fs::write(&cmd, &hook).unwrap();
        std::fs::set_permissions(&cmd, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let cfg = format!(
            "[core]\n\thooksPath = {}\n\tfsmonitor = {}\n\tpager = {}\n[commit]\n\tgpgSign = true\n[gpg]\n\tprogram = {}\n",
            hooks.display(),
            cmd.display(),
            cmd.display(),
            cmd.display()
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(repo.join(".git/config")).unwrap();
        f.write_all(cfg.as_bytes()).unwrap();
        std::fs::write(repo.join("f"), "x").unwrap();
        let g = Git::at(&repo.join(".git")).work_tree(&repo);
        g.run("add", ["add", "-A"]).unwrap();
        g.run("status", ["status"]).unwrap();
        let tree = g.line("write-tree", ["write-tree"]).unwrap();
        let c = g.line("commit-tree", ["commit-tree", "-m", "x", &tree]).unwrap();
        g.run("update-ref", ["update-ref", "refs/heads/main", &c]).unwrap();
        g.run("checkout", ["checkout", "-q", "-B", "other"]).unwrap();
        assert!(!marker.exists(), "a hook, fsmonitor, pager or gpg program from the repository config ran");
        // Control: plain git does run them, so the check above can fail.
        let st = Command::new("git")
            .args(["commit", "-q", "--allow-empty", "-m", "y"])
            .current_dir(&repo)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@t")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@t")
            .output()
            .unwrap();
        let _ = st;
        assert!(marker.exists(), "control: plain git should have run the repository's hooks");
    }
}
