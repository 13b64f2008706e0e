//! `hutch serve` and the environment cache, end to end: a real daemon, real tokens, real VMs. A create with a setup
//! script runs it and stores the VM as it left it; the same create again starts from that snapshot instead of
//! running the script; another token never shares it.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use hutch_daemon::model::SandboxInfo;

/// A `hutch serve` of this test's own (its own data directory; no warm pool, so every create is a real start).
struct Daemon {
    child: Child,
    url: String,
    data: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let data = tempfile::tempdir().unwrap();
        let mut child = hutch()
            .args(["serve", "--listen", "127.0.0.1:0", "--pool", "0", "--data-dir"])
            .arg(data.path())
            .env("HUTCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("daemon: {line}");
                if let Some(rest) = line.split("listening on ").nth(1) {
                    if let Some(t) = tx.take() {
                        let _ = t.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                    }
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(180)).expect("the daemon did not start");
        Daemon { child, url, data }
    }

    fn token(&self, name: &str) -> String {
        let out = hutch().args(["token", "create", "--name", name, "--data-dir"]).arg(self.data.path()).output().unwrap();
        assert!(out.status.success(), "token create: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }

    fn cli(&self, token: &str, args: &[&str]) -> std::process::Output {
        hutch().env("HUTCH_URL", &self.url).env("HUTCH_TOKEN", token).args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `hutch create --setup FILE --json`, then the sandbox's `/root/setup-id` (written by the setup).
    fn create_with_setup(&self, token: &str, setup: &std::path::Path) -> (SandboxInfo, String) {
        let out = self.cli(token, &["create", "--setup", setup.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "create: {}", text(&out.stderr));
        let info: SandboxInfo = serde_json::from_slice(&out.stdout).unwrap();
        let cat = self.cli(token, &["exec", &info.id, "--", "cat", "/root/setup-id"]);
        assert!(cat.status.success(), "exec: {}", text(&cat.stderr));
        let rm = self.cli(token, &["rm", &info.id]);
        assert!(rm.status.success(), "rm: {}", text(&rm.stderr));
        (info, text(&cat.stdout).trim().to_string())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// The key prefix a start mode names (`... (key 1a2b3c4d…, ...)`).
fn key_prefix(mode: &str) -> Option<String> {
    let rest = mode.split("key ").nth(1)?;
    Some(rest.chars().take_while(|c| c.is_ascii_hexdigit()).collect())
}

/// A create with a setup script made twice runs the setup once: the second sandbox starts from the snapshot the
/// first one's setup left (it sees the random id that setup wrote, which a second run would have replaced), and
/// says so. Another token's identical create runs its own setup.
#[test]
fn daemon_setup_runs_once_per_key_and_token() {
    let d = Daemon::start();
    let alice = d.token("alice");
    let bob = d.token("bob");
    let dir = tempfile::tempdir().unwrap();
    let setup = dir.path().join("setup.sh");
    // A random id per run of the setup: equal ids mean one run.
    std::fs::write(&setup, format!("cat /proc/sys/kernel/random/uuid > /root/setup-id\necho {}\n", hutch_sandbox::new_id())).unwrap();

    let (first, id1) = d.create_with_setup(&alice, &setup);
    let mode1 = first.start_mode.clone().unwrap_or_default();
    assert!(mode1.starts_with("setup, stored in the environment cache"), "{mode1}");
    assert_eq!(id1.len(), 36, "{id1:?}");

    let (second, id2) = d.create_with_setup(&alice, &setup);
    let mode2 = second.start_mode.clone().unwrap_or_default();
    assert!(mode2.starts_with("environment cache (key"), "{mode2}");
    assert_eq!(id1, id2, "the second sandbox has what the first setup wrote: the setup did not run again");
    assert_eq!(key_prefix(&mode1), key_prefix(&mode2));

    let (third, id3) = d.create_with_setup(&bob, &setup);
    let mode3 = third.start_mode.clone().unwrap_or_default();
    assert!(mode3.starts_with("setup, stored in the environment cache"), "another token never shares an entry: {mode3}");
    assert_ne!(id1, id3);
    assert_ne!(key_prefix(&mode1), key_prefix(&mode3));

    // The entries this test made go (`hutch cache rm` by key prefix).
    for k in [key_prefix(&mode1), key_prefix(&mode3)].into_iter().flatten() {
        let out = hutch().args(["cache", "rm", &k]).output().unwrap();
        assert!(out.status.success(), "cache rm {k}: {}", text(&out.stderr));
    }
}
