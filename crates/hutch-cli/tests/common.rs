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
