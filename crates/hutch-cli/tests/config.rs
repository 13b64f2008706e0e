//! The user's config file (`$XDG_CONFIG_HOME/hutch/config.toml`, or `--config FILE`) with real VMs: its resources
//! and both phases' egress are applied, flags override it, and a bad one is refused with the file and the key
//! named, before anything is created.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;

/// `hutch` with only the config directory `xdg` (HOME unset, so nothing else is found).
fn hutch_in(xdg: &Path) -> Command {
    let mut c = hutch();
    c.env_remove("HOME").env("XDG_CONFIG_HOME", xdg).stdin(Stdio::null());
    c
}

fn run_in(xdg: &Path, args: &[&str]) -> Output {
    hutch_in(xdg).arg("run").args(args).output().expect("spawn hutch")
}

fn write_config(xdg: &Path, text: &str) {
    std::fs::create_dir_all(xdg.join("hutch")).unwrap();
    std::fs::write(xdg.join("hutch/config.toml"), text).unwrap();
}

/// What the guest reports: vCPUs, memory in MiB, and which of `names` resolve.
fn probe_script(names: &[&str]) -> String {
    let mut s = String::from("echo cpus=$(nproc); echo mem=$(( $(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2) / 1024 ))\n");
    for n in names {
        s.push_str(&format!("getent hosts {n} >/dev/null && echo {n}=yes || echo {n}=no\n"));
    }
    s
}

fn value<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {out}"))
}

fn mem(out: &str) -> u32 {
    value(out, "mem").parse().unwrap()
}

#[test]
fn user_config_is_applied_and_flags_override_it() {
    let t = tempfile::tempdir().unwrap();
    let xdg = t.path().join("xdg");
    write_config(
        &xdg,
        "[resources]\ncpus = 2\nmemory = 640\n\n[policy]\nallow = [\"cfg.example.test\"]\n\n[policy.setup]\nallow = [\"setup-cfg.example.test\"]\n",
    );
    let names = ["cfg.example.test", "setup-cfg.example.test", "flag.example.test", "other-cfg.example.test"];
    let setup = t.path().join("setup.sh");
    std::fs::write(&setup, probe_script(&names)).unwrap();

    // The config alone: its resources, its agent-phase policy for the command, its setup-phase policy for setup.
    let o = run_in(&xdg, &["--setup", setup.to_str().unwrap(), "--", "sh", "-c", &probe_script(&names)]);
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{so}\n{se}");
    assert_eq!(value(&so, "cpus"), "2", "{so}");
    assert!((560..=640).contains(&mem(&so)), "640 MiB from the config: {so}");
    assert_eq!(
        (value(&so, "cfg.example.test"), value(&so, "setup-cfg.example.test")),
        ("yes", "no"),
        "the command gets the config's agent-phase policy only: {so}"
    );
    let setup_out = se.split("── setup: ").nth(1).unwrap();
    assert_eq!(
        (value(setup_out, "cfg.example.test"), value(setup_out, "setup-cfg.example.test")),
        ("no", "yes"),
        "the setup script gets the config's setup-phase policy only: {se}"
    );

    // Flags beat the config; --config replaces the default file.
    let other = t.path().join("other.toml");
    std::fs::write(&other, "[resources]\ncpus = 2\nmemory = 512\n[policy]\nallow = [\"other-cfg.example.test\"]\n").unwrap();
    let o = run_in(
        &xdg,
        &[
            "--config",
            other.to_str().unwrap(),
            "--cpus",
            "1",
            "--allow",
            "flag.example.test",
            "--",
            "sh",
            "-c",
            &probe_script(&names),
        ],
    );
    let (so, se) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(0), "{so}\n{se}");
    assert_eq!(value(&so, "cpus"), "1", "--cpus beats the config: {so}");
    assert!(mem(&so) <= 512, "memory from --config's file: {so}");
    assert_eq!(value(&so, "other-cfg.example.test"), "yes", "{so}");
    assert_eq!(value(&so, "flag.example.test"), "yes", "--allow adds to the config's policy: {so}");
    assert_eq!(value(&so, "cfg.example.test"), "no", "the default file is not read with --config: {so}");
}

#[test]
fn a_bad_config_is_refused_before_anything_starts() {
    let t = tempfile::tempdir().unwrap();
    let xdg = t.path().join("xdg");
    // Inside a git repository, so that getting any further would leave a working-tree snapshot in TMPDIR.
    let repo = t.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    let git = |args: &[&str]| {
        let o = Command::new("git")
            .args(args)
            .current_dir(&repo)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_AUTHOR_NAME", "U")
            .env("GIT_AUTHOR_EMAIL", "u@h")
            .env("GIT_COMMITTER_NAME", "U")
            .env("GIT_COMMITTER_EMAIL", "u@h")
            .output()
            .unwrap();
        assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
    };
    git(&["init", "-q"]);
    std::fs::write(repo.join("a.txt"), "a\n").unwrap();
    git(&["add", "a.txt"]);
    git(&["commit", "-qm", "a"]);
    let tmp = t.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let audit = t.path().join("audit.jsonl");
    let file = xdg.join("hutch/config.toml");
    let cases = [
        ("[resources]\nmemory = 100\n", "resources.memory = 100: must be 128 to 65536 (MiB)"),
        ("memroy = 100\n", "unknown field `memroy`"),
        ("image = \"ubuntu\"\n", "image = \"ubuntu\": there is no such image"),
        ("[policy]\nallow = [\"10.0.0.1\"]\n", "[policy]: allow[0]"),
        ("[policy.secrets.TOKEN]\nhosts = [\"api.example.test\"]\n", "add --allow api.example.test"),
    ];
    for (text_, want) in cases {
        write_config(&xdg, text_);
        let o = hutch_in(&xdg)
            .args(["run", "--audit", audit.to_str().unwrap(), "--", "true"])
            .current_dir(&repo)
            .env("TMPDIR", &tmp)
            .output()
            .unwrap();
        let e = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{text_:?}: {e}");
        assert!(e.contains(&file.display().to_string()) && e.contains(want), "{text_:?}: wanted the file and {want:?} in {e}");
        if !want.contains("--allow") {
            assert!(e.contains("fix it or remove it"), "says what to do: {e}");
        }
        assert!(!e.contains("TCG") && !e.contains("changes from sandbox"), "no VM was started: {e}");
        assert!(!audit.exists(), "{text_:?}: the audit log was created");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0, "{text_:?}: something was left in TMPDIR");
    }
    let o = run_in(&xdg, &["--config", "/nonexistent/hutch.toml", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o.stderr).contains("cannot read the config file /nonexistent/hutch.toml"), "{}", text(&o.stderr));

    // No config at all, and neither HOME nor XDG_CONFIG_HOME: fine.
    let o = hutch().env_remove("HOME").env_remove("XDG_CONFIG_HOME").args(["run", "--", "echo", "ok"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!((o.status.code(), text(&o.stdout)), (Some(0), "ok\n".to_string()), "{}", text(&o.stderr));
}
