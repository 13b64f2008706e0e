//! The environment cache end to end with real VMs: the real `hutch` binary, a repository in a temporary
//! directory, and the test net (hutch-testnet) as the setup phase's package registry, whose request log counts
//! how often the setup really ran. Threat classes: 6 (secrets: no setup secret value or placeholder in any file
//! of an entry) and 15 (untrusted repository: two repositories never share an entry).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::{hutch, text};
use hutch_testnet::TestNet;

const REGISTRY: &str = "pkgs.example.test";
const TOKEN_HOST: &str = "tok.example.test";

fn git(dir: &Path, args: &[&str]) {
    let o = std::process::Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
}

/// A repository with a few files, committed.
fn repo(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    git(&dir, &["init", "-q"]);
    std::fs::write(dir.join("a.txt"), "first\n").expect("write");
    std::fs::write(dir.join("doomed.txt"), "deleted on the host later\n").expect("write");
    std::fs::write(dir.join("requirements.txt"), "hutch-demo\n").expect("write");
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-qm", "init"]);
    dir
}

fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom").expect("urandom").read_exact(&mut b).expect("random");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `hutch run` in `dir` with `args`, then `-- sh -c script`; stdin closed.
fn run_in(dir: &Path, args: &[String], env: &[(&str, &str)], script: &str) -> Output {
    let mut c = hutch();
    c.current_dir(dir).arg("run").args(args).args(["--timeout", "600", "--", "sh", "-c", script]).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("spawn hutch")
}

fn dump(o: &Output) -> String {
    format!("exit {:?}\n--- stdout\n{}\n--- stderr\n{}", o.status.code(), text(&o.stdout), text(&o.stderr))
}

/// The key prefix a run printed (`setup: cached (key 1a2b3c4d…` or `stored in the environment cache (key …`).
fn key_of(o: &Output) -> Option<String> {
    let err = text(&o.stderr);
    let at = err.find("(key ")? + 5;
    let k: String = err[at..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (k.len() == 8).then_some(k)
}

fn entry_dir(prefix: &str) -> PathBuf {
    let envs = common::runtime_root().join("envs");
    let found: Vec<PathBuf> = std::fs::read_dir(&envs)
        .expect("envs dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    assert_eq!(found.len(), 1, "one entry for {prefix}: {found:?}");
    found.into_iter().next().expect("entry")
}

fn remove_entry(prefix: &str) {
    let _ = hutch().args(["cache", "rm", prefix]).output();
}

/// Every file of `dir` that contains `needle` (binary files included).
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let o = std::process::Command::new("grep").args(["-rlaF", "-e", needle]).arg(dir).output().expect("grep");
    text(&o.stdout).lines().map(str::to_string).collect()
}

fn setup_runs(o: &Output) -> bool {
    text(&o.stderr).contains("── setup: ")
}

fn cached(o: &Output) -> bool {
    text(&o.stderr).contains("hutch: setup: cached (key ")
}

fn deb_downloads(net: &TestNet) -> usize {
    net.requests().iter().filter(|r| r.path == "/files/debian/hutch-demo_1.0_all.deb").count()
}

/// The second run with the same key restores the environment instead of running the setup (the registry sees
/// no second download) and its command uses what the setup installed; it sees the current working tree (a
/// changed file's new content, a new file, and not a file deleted on the host); a maintenance script runs with
/// the setup phase's egress. No file of the entry holds the setup secret's value or either phase's placeholder
/// (class 6).
#[test]
fn class_6_second_run_restores_the_setup_and_sees_the_current_tree_without_secrets_in_the_entry() {
    let net = TestNet::start().expect("testnet");
    net.publish_demo_debian_repo();
    let p = net.https_port();
    let t = tempfile::tempdir().expect("tempdir");
    let dir = repo(t.path(), "project");
    let setup_real = format!("setup-{}", random_hex(20));
    let agent_real = format!("agent-{}", random_hex(20));
    let setup = t.path().join("setup.sh");
    std::fs::write(
        &setup,
        format!(
            r#"#!/bin/sh
set -e
cat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt
rm -f /etc/apt/sources.list.d/*
echo "deb [trusted=yes] https://{REGISTRY}:{p}/files/debian ./" > /etc/apt/sources.list.d/test-registry.list
apt-get update -q
apt-get install -y -q hutch-demo
curl -sS --fail -o /dev/null -H "Authorization: Bearer $SETUP_TOKEN" https://{TOKEN_HOST}:{p}/setup-call
curl -sS --fail -o /dev/null -H "X-Placeholders: $SETUP_TOKEN $AGENT_TOKEN" https://{REGISTRY}:{p}/files/debian/Packages
"#
        ),
    )
    .expect("setup");
    let maintenance = t.path().join("maintenance.sh");
    std::fs::write(&maintenance, format!("#!/bin/sh\ncurl -sS --fail -o /dev/null https://{REGISTRY}:{p}/files/debian/Packages?maintenance=1\necho maintenance ran\n"))
        .expect("maintenance");
    let mut args = net.copy_in_args();
    args.extend(
        [
            "--setup",
            &setup.display().to_string(),
            "--setup-allow",
            &format!("{REGISTRY}:{p}"),
            "--setup-allow",
            &format!("{TOKEN_HOST}:{p}"),
            "--resolve",
            &format!("{REGISTRY}:{p}:127.0.0.1"),
            "--resolve",
            &format!("{TOKEN_HOST}:{p}:127.0.0.1"),
            "--upstream-ca",
            &net.upstream_ca_args()[1],
            "--setup-secret",
            &format!("SETUP_TOKEN@{TOKEN_HOST}"),
            "--secret",
            &format!("AGENT_TOKEN@{TOKEN_HOST}"),
            "--allow",
            &format!("{TOKEN_HOST}:{p}"),
            "--cache-input",
            "requirements.txt",
        ]
        .map(String::from),
    );
    let env = [("SETUP_TOKEN", setup_real.as_str()), ("AGENT_TOKEN", agent_real.as_str())];
    let script = "hutch-demo; echo \"agent=$AGENT_TOKEN\"; cd /workspace && for f in a.txt b.txt doomed.txt; do if [ -e $f ]; then echo \"$f: $(cat $f)\"; else echo \"$f: absent\"; fi; done";

    let first = run_in(&dir, &args, &env, script);
    assert_eq!(first.status.code(), Some(0), "{}", dump(&first));
    assert!(setup_runs(&first) && !cached(&first), "{}", dump(&first));
    assert!(text(&first.stderr).contains("stored in the environment cache"), "{}", dump(&first));
    assert!(text(&first.stdout).contains("hutch-demo 1.0 from the test registry"), "{}", dump(&first));
    assert_eq!(deb_downloads(&net), 1);
    let key = key_of(&first).expect("a key");
    let entry = entry_dir(&key);

    // The placeholders the setup used, as the registry saw them (sent where no secret is bound: not swapped).
    let seen = net.requests().into_iter().find(|r| r.path == "/files/debian/Packages" && r.header("x-placeholders").is_some()).expect("placeholders request");
    let phs: Vec<String> = seen.header("x-placeholders").expect("header").split_whitespace().map(str::to_string).collect();
    assert_eq!(phs.len(), 2, "{phs:?}");
    assert!(phs[0].starts_with("hutch-ph-SETUP_TOKEN-") && phs[1].starts_with("hutch-ph-AGENT_TOKEN-"), "{phs:?}");
    let swapped = net.requests().into_iter().find(|r| r.path == "/setup-call").expect("setup call");
    assert_eq!(swapped.header("authorization"), Some(format!("Bearer {setup_real}").as_str()), "the secret worked during setup");
    let files: Vec<String> = std::fs::read_dir(&entry).expect("entry").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    for f in ["memory", "state", "disk.qcow2", "meta.json"] {
        assert!(files.contains(&f.to_string()), "{f} in {files:?}");
    }
    for needle in [setup_real.as_str(), agent_real.as_str(), phs[0].as_str(), phs[1].as_str()] {
        let hits = files_containing(&entry, needle);
        assert!(hits.is_empty(), "{needle} found in {hits:?}");
    }

    // The repository changes: a changed file, a new one, one deleted on the host.
    std::fs::write(dir.join("a.txt"), "second\n").expect("write");
    std::fs::write(dir.join("b.txt"), "new\n").expect("write");
    std::fs::remove_file(dir.join("doomed.txt")).expect("rm");
    let mut with_maintenance = args.clone();
    with_maintenance.extend(["--maintenance".to_string(), maintenance.display().to_string()]);
    let second = run_in(&dir, &with_maintenance, &env, script);
    assert_eq!(second.status.code(), Some(0), "{}", dump(&second));
    assert!(cached(&second) && !setup_runs(&second), "{}", dump(&second));
    assert_eq!(key_of(&second).as_deref(), Some(key.as_str()));
    assert_eq!(deb_downloads(&net), 1, "the setup did not run again");
    let out = text(&second.stdout);
    assert!(out.contains("hutch-demo 1.0 from the test registry"), "what setup installed is there: {out}");
    assert!(out.contains("a.txt: second") && out.contains("b.txt: new") && out.contains("doomed.txt: absent"), "{out}");
    assert!(text(&second.stderr).contains("maintenance ran"), "{}", dump(&second));
    assert_eq!(net.requests().iter().filter(|r| r.path == "/files/debian/Packages?maintenance=1").count(), 1, "maintenance reached the registry");
    // The command's placeholder is the new sandbox's own, and it still works on its host.
    let agent_ph = out.lines().find_map(|l| l.strip_prefix("agent=")).expect("agent placeholder").to_string();
    assert!(agent_ph.starts_with("hutch-ph-AGENT_TOKEN-") && agent_ph != phs[1], "{agent_ph}");
    remove_entry(&key);
}

/// What is in the key: changing a declared input, the setup script or the setup policy runs the setup again;
/// changing any other file does not (and the command sees its new content). Two repositories never share an
/// entry (class 15). A corrupted entry gives a warning, the setup runs, and the run succeeds.
#[test]
fn class_15_key_follows_setup_inputs_policy_and_repository_and_a_corrupt_entry_falls_back() {
    let net = TestNet::start().expect("testnet");
    let p = net.https_port();
    let t = tempfile::tempdir().expect("tempdir");
    let dir = repo(t.path(), "one");
    let setup = t.path().join("setup.sh");
    let write_setup = |extra: &str| {
        std::fs::write(
            &setup,
            format!("#!/bin/sh\nset -e\ncat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt\ncurl -sS --fail -o /dev/null https://{REGISTRY}:{p}/setup-ran\necho made-by-setup > /root/marker\n{extra}"),
        )
        .expect("setup");
    };
    write_setup("");
    let mut args = net.copy_in_args();
    args.extend(
        [
            "--setup",
            &setup.display().to_string(),
            "--setup-allow",
            &format!("{REGISTRY}:{p}"),
            "--resolve",
            &format!("{REGISTRY}:{p}:127.0.0.1"),
            "--cache-input",
            "requirements.txt",
        ]
        .map(String::from),
    );
    let setups = || net.requests().iter().filter(|r| r.path == "/setup-ran").count();
    let script = "cat /root/marker; cat /workspace/a.txt";
    let mut keys = vec![];
    let mut check = |o: &Output, want_setup: bool, want_setups: usize, what: &str| {
        assert_eq!(o.status.code(), Some(0), "{what}: {}", dump(o));
        assert_eq!(setup_runs(o), want_setup, "{what}: {}", dump(o));
        assert_eq!(cached(o), !want_setup, "{what}: {}", dump(o));
        assert!(text(&o.stdout).starts_with("made-by-setup\n"), "{what}: {}", dump(o));
        assert_eq!(setups(), want_setups, "{what}");
        if let Some(k) = key_of(o) {
            keys.push(k);
        }
    };

    let o = run_in(&dir, &args, &[], script);
    check(&o, true, 1, "first run");
    let k1 = key_of(&o).expect("key");
    std::fs::write(dir.join("a.txt"), "edited\n").expect("write");
    let o = run_in(&dir, &args, &[], script);
    check(&o, false, 1, "another file changed");
    assert!(text(&o.stdout).contains("edited"), "{}", dump(&o));

    std::fs::write(dir.join("requirements.txt"), "hutch-demo\nmore\n").expect("write");
    let o = run_in(&dir, &args, &[], script);
    check(&o, true, 2, "a declared input changed");
    let k2 = key_of(&o).expect("key");
    assert_ne!(k1, k2);

    write_setup("# another version\n");
    let o = run_in(&dir, &args, &[], script);
    check(&o, true, 3, "the setup script changed");
    let k3 = key_of(&o).expect("key");

    let mut wider = args.clone();
    wider.extend(["--setup-allow".to_string(), format!("{TOKEN_HOST}:{p}")]);
    let o = run_in(&dir, &wider, &[], script);
    check(&o, true, 4, "the setup policy changed");
    let k4 = key_of(&o).expect("key");

    // The same files in another repository: its own entry.
    let other = repo(t.path(), "two");
    std::fs::copy(dir.join("requirements.txt"), other.join("requirements.txt")).expect("copy");
    let o = run_in(&other, &args, &[], script);
    check(&o, true, 5, "another repository");
    let k5 = key_of(&o).expect("key");

    // A corrupted entry: warning, setup, success, and a good entry again afterwards.
    let entry = entry_dir(&k3);
    let state = entry.join("state");
    std::process::Command::new("chmod").arg("644").arg(&state).status().expect("chmod");
    let mut bytes = std::fs::read(&state).expect("state");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, bytes).expect("corrupt");
    let o = run_in(&dir, &args, &[], script);
    check(&o, true, 6, "a corrupt entry");
    assert!(text(&o.stderr).contains("hutch: warning: the cached environment") && text(&o.stderr).contains("corrupt"), "{}", dump(&o));
    let o = run_in(&dir, &args, &[], script);
    check(&o, false, 6, "the entry made after the corrupt one");

    let all = [k1, k2, k3, k4, k5];
    let mut uniq = all.to_vec();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), all.len(), "{all:?}");
    for k in all {
        remove_entry(&k);
    }
    drop(keys);
}

/// Two runs with a new key at once: one builds the entry, the other runs the setup without storing (or, if it
/// started later, uses the entry); afterwards there is exactly one valid entry, and a third run uses it.
#[test]
fn concurrent_runs_leave_one_valid_entry() {
    let t = tempfile::tempdir().expect("tempdir");
    let dir = repo(t.path(), "concurrent");
    let setup = t.path().join("setup.sh");
    std::fs::write(&setup, format!("#!/bin/sh\necho {} > /root/marker\nsleep 2\n", random_hex(8))).expect("setup");
    let args = vec!["--setup".to_string(), setup.display().to_string()];
    let spawn = || {
        let mut c = hutch();
        c.current_dir(&dir).arg("run").args(&args).args(["--", "cat", "/root/marker"]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        c.spawn().expect("spawn")
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().expect("a"), b.wait_with_output().expect("b"));
    for o in [&a, &b] {
        assert_eq!(o.status.code(), Some(0), "{}", dump(o));
    }
    let stored = [&a, &b].iter().filter(|o| text(&o.stderr).contains("stored in the environment cache")).count();
    assert_eq!(stored, 1, "one builder: {}\n{}", dump(&a), dump(&b));
    let key = key_of(&a).or_else(|| key_of(&b)).expect("key");
    let entry = entry_dir(&key);
    assert!(entry.join("meta.json").is_file());
    let c = run_in(&dir, &args, &[], "cat /root/marker");
    assert!(cached(&c) && c.status.code() == Some(0), "{}", dump(&c));
    assert_eq!(text(&c.stdout), text(&a.stdout));
    let ls = hutch().args(["cache", "ls"]).output().expect("ls");
    assert_eq!(text(&ls.stdout).lines().filter(|l| l.starts_with(&key)).count(), 1, "{}", text(&ls.stdout));
    remove_entry(&key);
}
