//! Shared helpers for the integration tests: they drive the real `hutch` binary, which boots real VMs.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub fn hutch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hutch"));
    c.env("HUTCH_LOG", "warn");
    // Outside any git repository: inside one, `hutch run` copies the repository into the VM (tests of that
    // set their own working directory).
    c.current_dir(std::env::temp_dir());
    c
}

pub fn run(args: &[&str]) -> Output {
    hutch().arg("run").args(args).stdin(Stdio::null()).output().expect("spawn hutch")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The runtime root sandboxes live under (the same root the image cache uses).
pub fn runtime_root() -> PathBuf {
    match std::env::var_os("HUTCH_CACHE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from("/var/lib/hutch"),
    }
}

/// Processes whose command line mentions `needle` (e.g. a sandbox directory).
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if cmd.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                found.push(pid);
            }
        }
    }
    found
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

pub fn sandbox_dirs() -> Vec<String> {
    std::fs::read_dir(runtime_root().join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// A tmux server of the test's own (its own socket), with one window of a given size running a plain bash, to
/// drive `hutch` on a real terminal: keys go in with `send-keys`, the screen comes out with `capture-pane`.
/// The server is killed when this is dropped (its socket is in a temporary directory of its own).
pub struct Tmux {
    /// In the temporary directory, so nothing is left behind.
    socket: PathBuf,
    _dir: tempfile::TempDir,
    /// A script that runs the `hutch` under test from a temporary directory, with the test's environment.
    pub hutch: String,
}

impl Tmux {
    /// `None` (after printing SKIP) when tmux is missing.
    pub fn start(cols: u16, rows: u16) -> Option<Tmux> {
        if Command::new("tmux").arg("-V").output().map(|o| !o.status.success()).unwrap_or(true) {
            eprintln!("SKIP: tmux is not installed (scripts/deps installs it)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let hutch = dir.path().join("h");
        std::fs::write(&hutch, format!("#!/bin/sh\ncd {}\nexec env HUTCH_LOG=warn {} \"$@\"\n", std::env::temp_dir().display(), env!("CARGO_BIN_EXE_hutch"))).unwrap();
        std::fs::set_permissions(&hutch, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let socket = dir.path().join("tmux.sock");
        let t = Tmux { socket, hutch: hutch.display().to_string(), _dir: dir };
        let size = (cols.to_string(), rows.to_string());
        let out = t.cmd(&["-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", &size.0, "-y", &size.1, "env PS1='$ ' bash --norc --noprofile"]);
        assert!(out.status.success(), "tmux new-session: {}", text(&out.stderr));
        // The screen is read as text lines; a long history keeps what scrolled off.
        t.cmd(&["set-option", "-g", "history-limit", "10000"]);
        Some(t)
    }

    pub fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-S").arg(&self.socket).args(args).stdin(Stdio::null()).output().expect("spawn tmux")
    }

    /// Types `s` literally (no key names).
    pub fn type_text(&self, s: &str) {
        let out = self.cmd(&["send-keys", "-t", "t", "-l", s]);
        assert!(out.status.success(), "tmux send-keys: {}", text(&out.stderr));
    }

    /// Presses keys by tmux name (`Enter`, `C-c`, ...).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        let out = self.cmd(&args);
        assert!(out.status.success(), "tmux send-keys: {}", text(&out.stderr));
    }

    /// Types a command line and presses Enter.
    pub fn line(&self, s: &str) {
        self.type_text(s);
        self.keys(&["Enter"]);
    }

    /// The visible screen, one string per row (trailing blanks trimmed).
    pub fn screen(&self) -> String {
        text(&self.cmd(&["capture-pane", "-p", "-t", "t"]).stdout)
    }

    /// The screen and its history, wrapped lines joined.
    pub fn history(&self) -> String {
        text(&self.cmd(&["capture-pane", "-p", "-J", "-S", "-", "-t", "t"]).stdout)
    }

    /// Waits (at most `secs`, a bound against hangs, not a speed check) until the screen and its history show
    /// `what`; panics with the screen if they never do.
    pub fn wait_for(&self, what: &str, secs: u64) -> String {
        let mut last = String::new();
        let found = wait_until(Duration::from_secs(secs), || {
            last = self.history();
            last.contains(what)
        });
        assert!(found, "{what:?} never appeared on the terminal; it shows:\n{last}");
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}
