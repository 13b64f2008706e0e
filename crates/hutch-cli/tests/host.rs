//! The host set-up: `scripts/deps` is idempotent (a second run installs nothing and still verifies every
//! program by running it) and `hutch doctor` agrees with it afterwards. CI runs this after `scripts/test` has
//! already run `scripts/deps` once.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn deps_is_idempotent_and_doctor_agrees() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIP deps_is_idempotent_and_doctor_agrees: scripts/deps installs packages and needs root");
        return;
    }
    let deps = repo_root().join("scripts/deps");
    // Already installed by the test script: verify-only must find nothing to do...
    let check = Command::new(&deps).arg("--check").output().expect("run scripts/deps --check");
    assert!(check.status.success(), "scripts/deps --check after scripts/deps: {}", text(&check.stderr));
    // ...and a full run must install nothing (it says so) and succeed.
    let again = Command::new(&deps).output().expect("run scripts/deps");
    let err = text(&again.stderr);
    assert!(again.status.success(), "second scripts/deps: {err}");
    assert!(err.contains("host programs present and working") && !err.contains("installing"), "second run installed something: {err}");

    let doctor = hutch().args(["doctor", "--host"]).output().expect("hutch doctor --host");
    let out = text(&doctor.stdout);
    assert!(doctor.status.success(), "hutch doctor --host disagrees with scripts/deps:\n{out}");
    // Every program of the shared manifest was run, including both QEMU halves with their versions.
    let manifest = std::fs::read_to_string(repo_root().join("scripts/host-tools")).unwrap();
    for program in manifest.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).filter_map(|l| l.split_whitespace().next()) {
        assert!(out.lines().any(|l| l.starts_with("ok") && l.contains(program)), "doctor did not check {program}:\n{out}");
    }
    assert!(out.contains("QEMU emulator version") && out.contains("qemu-img version"), "{out}");

    // The whole doctor (agent, image: built by scripts/test) passes too.
    let full = hutch().arg("doctor").output().expect("hutch doctor");
    assert!(full.status.success(), "hutch doctor:\n{}", text(&full.stdout));
}

#[test]
fn deps_check_names_a_missing_program_and_its_package() {
    // A PATH without qemu-img, as after an apt transaction removed it: the verifier names it and its package.
    let dir = tempfile::tempdir().unwrap();
    let deps = repo_root().join("scripts/deps");
    // Only the shell's basics are on this PATH (no sbin fallbacks reach qemu-img: it lives in /usr/bin).
    for tool in ["bash", "dirname", "grep", "sed", "head", "dpkg-query", "id", "cat", "ldd"] {
        if let Some(p) = ["/usr/bin", "/bin"].iter().map(|d| PathBuf::from(d).join(tool)).find(|p| p.exists()) {
            std::os::unix::fs::symlink(p, dir.path().join(tool)).unwrap();
        }
    }
    let out = Command::new("/bin/bash").arg(&deps).arg("--check").env("PATH", dir.path()).output().expect("run scripts/deps --check");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "a missing qemu-img must fail the check: {err}");
    assert!(err.contains("qemu-img is missing (package qemu-utils)"), "{err}");
}
