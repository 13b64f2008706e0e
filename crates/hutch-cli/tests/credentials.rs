//! Credential files and env files with real VMs (threat 12, secrets on the VM's disk; threat 15, a repository
//! widening its own sandbox): untracked credential files in the working tree stay out of `/workspace` and are
//! named; tracked ones go in with a warning; `--include`, the user's config and an approved `hutch.toml` decide
//! otherwise; `--env-file` keys become secrets the VM sees only as placeholders, swapped by the gateway on the
//! hosts they are bound to, and a key bound to no host stops the run before a VM starts.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use hutch_testnet::TestNet;

fn git(dir: &Path, args: &[&str]) {
    let o = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "User")
        .env("GIT_AUTHOR_EMAIL", "user@host")
        .env("GIT_COMMITTER_NAME", "User")
        .env("GIT_COMMITTER_EMAIL", "user@host")
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
}

/// A repository with a tracked `.env`, and untracked `config/.env`, `config/.env.example`, `deploy/id_rsa` and
/// `deploy/id_rsa.pub`; private config and data directories for hutch.
struct Repo {
    _t: tempfile::TempDir,
    dir: PathBuf,
    data: PathBuf,
    config: PathBuf,
    marker: String,
}

impl Repo {
    fn new() -> Repo {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("repo");
        std::fs::create_dir_all(dir.join("config")).unwrap();
        std::fs::create_dir_all(dir.join("deploy")).unwrap();
        git(&dir, &["init", "-q", "-b", "main"]);
        std::fs::write(dir.join("README"), "project\n").unwrap();
        std::fs::write(dir.join(".env"), "TRACKED=tracked-in-history\n").unwrap();
        git(&dir, &["add", "-A"]);
        git(&dir, &["commit", "-q", "-m", "first"]);
        let marker = format!("sk-live-marker-{}", std::process::id());
        std::fs::write(dir.join("config/.env"), format!("API_KEY={marker}\n")).unwrap();
        // A real key put into the committed .env: not history, so it stays out too.
        std::fs::write(dir.join(".env"), format!("TRACKED=tracked-in-history\nLOCAL={marker}\n")).unwrap();
        std::fs::write(dir.join("config/.env.example"), "API_KEY=\n").unwrap();
        std::fs::write(dir.join("deploy/id_rsa"), format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{marker}\n")).unwrap();
        std::fs::write(dir.join("deploy/id_rsa.pub"), "ssh-ed25519 AAAA user@host\n").unwrap();
        let config = t.path().join("config.toml");
        std::fs::write(&config, "").unwrap();
        Repo { data: t.path().join("data"), dir, config, marker, _t: t }
    }

    fn hutch(&self, args: &[&str]) -> Output {
        hutch()
            .args(args)
            .current_dir(&self.dir)
            .env("XDG_DATA_HOME", &self.data)
            .env("XDG_CONFIG_HOME", self.dir.join("no-such-config-dir"))
            .stdin(Stdio::null())
            .output()
            .expect("spawn hutch")
    }

    /// `hutch run --config <private file> ARGS -- sh -c <what is in /workspace>`.
    fn run(&self, args: &[&str], extra: &str) -> Output {
        let script = format!(
            "cd /workspace; for f in .env config/.env config/.env.example deploy/id_rsa deploy/id_rsa.pub; do \
             if test -e $f; then echo \"in $f\"; else echo \"out $f\"; fi; done; \
             grep -rqs {m} . && echo marker-in-workspace || echo no-marker; {extra}",
            m = self.marker
        );
        let cfg = self.config.to_str().unwrap().to_string();
        let mut v = vec!["run", "--config", &cfg];
        v.extend_from_slice(args);
        v.extend_from_slice(&["--", "sh", "-c", &script]);
        self.hutch(&v)
    }
}

const LEFT_OUT_ENV: &str = "hutch: left out of the VM: config/.env (credential file; --include PATH to send it)\n";
const LEFT_OUT_KEY: &str = "hutch: left out of the VM: deploy/id_rsa (credential file; --include PATH to send it)\n";

/// Class 12: the default list keeps untracked credential files out of the VM and says which; examples and
/// public keys go in; a tracked `.env` goes in with a warning, at HEAD's version; `--include` and the user's config let files
/// through; a `.env` the VM creates comes back like any other file.
#[test]
fn class_12_untracked_credential_files_stay_out_of_the_vm_and_are_named() {
    let r = Repo::new();
    let out = r.run(&[], "mkdir -p vmdir && echo 'X=made-in-vm' > vmdir/.env");
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    for line in ["in .env", "out config/.env", "in config/.env.example", "out deploy/id_rsa", "in deploy/id_rsa.pub", "no-marker"] {
        assert!(so.lines().any(|l| l == line), "wanted {line:?} in:\n{so}\n{se}");
    }
    assert!(se.contains(LEFT_OUT_ENV) && se.contains(LEFT_OUT_KEY), "{se}");
    assert!(!se.contains("left out of the VM: config/.env.example") && !se.contains("id_rsa.pub"), "{se}");
    assert!(
        se.contains(
            "hutch: warning: .env looks like a credential file and git tracks it, so HEAD's version of it went into the VM, \
             without your uncommitted changes"
        ) && se.contains("git rm --cached -- '.env'"),
        "{se}"
    );
    assert!(!se.contains(&r.marker), "the value is never printed: {se}");
    // The change coming back is unaffected: the VM's own .env is part of it.
    assert!(se.contains("vmdir/.env"), "the VM's new .env came back: {se}");

    let out = r.run(&["--include", "config/.env"], "");
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{se}");
    assert!(so.contains("in config/.env\n") && so.contains("out deploy/id_rsa\n") && so.contains("marker-in-workspace"), "{so}");
    assert!(!se.contains(LEFT_OUT_ENV) && se.contains(LEFT_OUT_KEY), "{se}");

    // The user's config removes a pattern from the list (and adds one).
    std::fs::write(&r.config, "[credentials]\ninclude = [\"id_rsa\"]\nexclude = [\"README\"]\n").unwrap();
    let out = r.run(&[], "test -e README && echo readme-in || echo readme-out");
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{se}");
    assert!(so.contains("in deploy/id_rsa\n") && so.contains("out config/.env\n"), "{so}");
    assert!(so.contains("readme-in\n"), "README is tracked, so it goes in: {so}");
    assert!(!se.contains(LEFT_OUT_KEY) && se.contains(LEFT_OUT_ENV), "{se}");
    assert!(se.contains("warning: README looks like a credential file"), "the user's exclude covers tracked files' warning: {se}");
}

/// Class 15: a repository asking to send a credential file into the VM is refused, with the ask listed,
/// until the user approves that version of its hutch.toml.
#[test]
fn class_15_hutch_toml_asking_for_a_credential_file_is_refused_until_approved() {
    let r = Repo::new();
    std::fs::write(r.dir.join("hutch.toml"), "[credentials]\ninclude = [\"config/.env\"]\n").unwrap();
    let refused = r.run(&[], "");
    let se = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{se}");
    assert!(se.contains("hutch.toml is not trusted (you have not approved it)"), "{se}");
    assert!(se.contains("credential files matching config/.env sent into the VM (left out by default)"), "{se}");
    assert!(!se.contains("software emulation") && !se.contains("left out of the VM"), "refused before anything started: {se}");

    let shown = r.hutch(&["trust", "--show"]);
    assert!(text(&shown.stdout).contains("credential files matching config/.env"), "{}", text(&shown.stdout));
    let t = r.hutch(&["trust"]);
    assert_eq!(t.status.code(), Some(0), "{}", text(&t.stderr));
    let out = r.run(&[], "");
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{se}");
    assert!(so.contains("in config/.env\n") && so.contains("out deploy/id_rsa\n"), "{so}");
    assert!(!se.contains(LEFT_OUT_ENV) && se.contains(LEFT_OUT_KEY), "{se}");
}

const API: &str = "api.example.test";
const OTHER: &str = "other.example.test";

/// Class 12 (secrets in env, logs and error messages) and 6 (a placeholder sent to another host): each key of
/// an env file is a secret; the VM reads its placeholder, the bound host receives the value, another host the
/// placeholder; a key bound to no host stops the run before a VM starts, and no message shows a value.
#[test]
fn class_12_env_file_keys_are_secrets_swapped_only_on_their_hosts() {
    let net = TestNet::start().expect("testnet");
    let t = tempfile::tempdir().unwrap();
    let real = format!("sk-envfile-{:016x}", std::process::id() as u64 * 0x9e37_79b9);
    let env_file = t.path().join(".env");
    std::fs::write(&env_file, format!("# the project's keys\nexport API_KEY=\"{real}\"\n")).unwrap();
    let p = net.https_port();
    let script = format!(
        "cat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt\n\
         echo \"env=$API_KEY\"\n\
         curl -sS --fail -o /dev/null -H \"Authorization: Bearer $API_KEY\" https://{API}:{p}/envfile/bound && echo bound-ok\n\
         curl -sS --fail -o /dev/null -H \"Authorization: Bearer $API_KEY\" https://{OTHER}:{p}/envfile/other && echo other-ok\n"
    );
    let mut args: Vec<String> = vec!["run".into(), "--env-file".into(), env_file.display().to_string()];
    args.extend(net.copy_in_args());
    args.extend(net.allow_https(API));
    args.extend(net.allow_https(OTHER));
    args.extend(net.upstream_ca_args());
    args.extend(["--secret".into(), format!("API_KEY@{API}"), "--timeout".into(), "300".into()]);
    args.extend(["--".into(), "sh".into(), "-c".into(), script]);
    let out = hutch().args(&args).env_remove("API_KEY").stdin(Stdio::null()).output().unwrap();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{so}\n{se}");
    let placeholder = so.lines().find_map(|l| l.strip_prefix("env=")).unwrap().to_string();
    assert!(placeholder.starts_with("hutch-ph-API_KEY-"), "the VM reads a placeholder: {so}");
    assert!(so.contains("bound-ok\n") && so.contains("other-ok\n"), "{so}\n{se}");
    let auth = |path: &str| {
        let seen = net.requests().into_iter().find(|s| s.path == path).unwrap_or_else(|| panic!("{path} not received"));
        seen.header("authorization").map(str::to_string)
    };
    assert_eq!(auth("/envfile/bound"), Some(format!("Bearer {real}")), "the bound host gets the value");
    assert_eq!(auth("/envfile/other"), Some(format!("Bearer {placeholder}")), "another host gets the placeholder");
    assert!(!so.contains(&real) && !se.contains(&real), "the value never reaches the VM's output or hutch's");

    // A key without a binding: refused before any VM starts, named with its line and how to bind it.
    std::fs::write(&env_file, format!("API_KEY={real}\nDB_PASSWORD=pw-{real}\n")).unwrap();
    let out = hutch().args(&args).stdin(Stdio::null()).output().unwrap();
    let se = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(
        se.contains("(line 2): DB_PASSWORD is not bound to any host") && se.contains("--secret DB_PASSWORD@HOST") && se.contains("No VM was started"),
        "{se}"
    );
    assert!(!se.contains("software emulation"), "no VM was started: {se}");
    assert!(!se.contains(&real) && text(&out.stdout).is_empty(), "{se}");
}
