//! `hutch` for users who are not root, end to end with real VMs. CI runs as root, so the test makes two ordinary
//! accounts (idempotently) and runs the real binary as each, with a clean environment, against the image root built
//! in the system cache: streams and exit codes, stdin, files in and out, a repository the user owns (working tree
//! in, change out), egress with a secret to the local test net; QEMU runs as the user with seccomp and an empty
//! environment and dies with a SIGKILLed hutch (parent-death signal, no privilege drop to clear it). Nothing the
//! users do lands in the system cache, and neither user can see or remove the other's sandboxes or results. A user
//! with subordinate ids builds an image rootless (user namespace); one without is told what to do.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{text, wait_until};

const USER_A: &str = "hutch-test-user";
const USER_B: &str = "hutch-test-user2";
/// A user whose subordinate ids the tests remove: no rootless build.
const USER_NO_SUBIDS: &str = "hutch-test-nosubids";
const API: &str = "api.example.test";

#[derive(Debug, Clone)]
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
    home: PathBuf,
}

/// Why this test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("making test accounts needs root (CI runs the suite as root)".into());
    }
    for tool in ["useradd", "setpriv", "git"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| Path::new(d).join(tool).is_file());
        if !found {
            return Some(format!("{tool} not found"));
        }
    }
    None
}

/// The account `name`, made if missing (a home of its own, no password, no sudo).
fn ensure_user(name: &str) -> TestUser {
    if nix::unistd::User::from_name(name).unwrap().is_none() {
        let st = Command::new("useradd").args(["--create-home", "--shell", "/bin/sh", name]).status().unwrap();
        // Another test process may have made it meanwhile.
        assert!(st.success() || nix::unistd::User::from_name(name).unwrap().is_some(), "useradd {name}");
    }
    let u = nix::unistd::User::from_name(name).unwrap().unwrap();
    TestUser { name: u.name, uid: u.uid.as_raw(), gid: u.gid.as_raw(), home: u.dir }
}

/// The hutch binary and the guest agent copied where every user may read and run them (the build tree may sit
/// under directories other users cannot traverse). Byte-identical copies: the image key is unchanged.
struct Bins {
    dir: tempfile::TempDir,
}

impl Bins {
    fn new() -> Bins {
        let dir = tempfile::Builder::new().prefix("hutch-nonroot-bin-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let hutch = PathBuf::from(env!("CARGO_BIN_EXE_hutch"));
        let agent = match std::env::var_os("HUTCH_AGENT") {
            Some(a) => PathBuf::from(a),
            None => hutch.parent().unwrap().join("../x86_64-unknown-linux-gnu/release/hutch-agent"),
        };
        assert!(agent.is_file(), "the static agent {} (scripts/build makes it)", agent.display());
        for (from, name) in [(&hutch, "hutch"), (&agent, "hutch-agent")] {
            let to = dir.path().join(name);
            std::fs::copy(from, &to).unwrap();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Bins { dir }
    }

    fn hutch(&self) -> PathBuf {
        self.dir.path().join("hutch")
    }

    /// A file every user may read, in this directory.
    fn readable_copy(&self, from: &Path, name: &str) -> PathBuf {
        let to = self.dir.path().join(name);
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644)).unwrap();
        to
    }
}

/// The system cache the root-built image is in (the tests' own cache when HUTCH_CACHE_DIR points elsewhere).
fn system_cache() -> PathBuf {
    common::runtime_root()
}

/// `program args` as `user`: its own uid, gid and groups, an environment of just HOME, PATH, USER, LOGNAME (plus
/// `env`), working directory `cwd`.
fn as_user(user: &TestUser, cwd: &Path, env: &[(&str, &str)], program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid", &user.uid.to_string(), "--regid", &user.gid.to_string(), "--init-groups", "--"])
        .arg(program)
        .args(args)
        .env_clear()
        .env("HOME", &user.home)
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .current_dir(cwd)
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

/// `hutch ARGS` as `user`, with the copied agent, and the system cache named when it is not the default.
fn hutch_as(user: &TestUser, bins: &Bins, cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = as_user(user, cwd, env, &bins.hutch(), args);
    c.env("HUTCH_LOG", "warn");
    if !env.iter().any(|(k, _)| *k == "HUTCH_AGENT") {
        c.env("HUTCH_AGENT", bins.dir.path().join("hutch-agent"));
    }
    let system = system_cache();
    if system != Path::new(hutch_image::SYSTEM_CACHE) && !env.iter().any(|(k, _)| *k == "HUTCH_SYSTEM_CACHE_DIR") {
        c.env("HUTCH_SYSTEM_CACHE_DIR", system);
    }
    c
}

fn output(mut c: Command) -> Output {
    c.output().unwrap()
}

/// Every path under `root` with its owner and mode, sorted.
fn listing(root: &Path) -> BTreeMap<PathBuf, (u32, u32, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else { continue };
            if m.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path(), (m.uid(), m.gid(), m.mode() & 0o7777));
        }
    }
    out
}

/// The `/proc/PID/status` uid line's real uid.
fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// QEMU processes whose command line names `needle`.
fn qemus_mentioning(needle: &str) -> Vec<u32> {
    common::processes_mentioning(needle)
        .into_iter()
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"/usr/bin/qemu") || c.windows(18).any(|w| w == b"qemu-system-x86_64")))
        .collect()
}

fn git_as(user: &TestUser, dir: &Path, args: &[&str]) -> Output {
    let env = [("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@t"), ("GIT_COMMITTER_NAME", "t"), ("GIT_COMMITTER_EMAIL", "t@t")];
    let o = output(as_user(user, dir, &env, Path::new("/usr/bin/git"), args));
    assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
    o
}

/// A fresh directory in the user's home, owned by the user (removed first if an earlier run left it).
fn fresh_dir(user: &TestUser, name: &str) -> PathBuf {
    let d = user.home.join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(user.uid)), Some(nix::unistd::Gid::from_raw(user.gid))).unwrap();
    d
}

fn write_as_owner(user: &TestUser, path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(user.uid)), Some(nix::unistd::Gid::from_raw(user.gid))).unwrap();
}

#[test]
fn ordinary_users_run_against_the_shared_image_and_keep_their_state_to_themselves() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return;
    }
    // The shared image and its default snapshot, built by root (a no-op when CI's set-up already built them).
    let built = common::hutch().args(["image", "build"]).stdin(Stdio::null()).output().unwrap();
    assert!(built.status.success(), "root's image build: {}", text(&built.stderr));
    let system = system_cache();
    // Other users reach the system cache only through directories everyone may search.
    if let Some(closed) = system.ancestors().find(|d| std::fs::metadata(d).is_ok_and(|m| m.mode() & 0o001 == 0)) {
        eprintln!("SKIP: the image cache {} is below {}, which other users cannot enter", system.display(), closed.display());
        return;
    }
    let a = ensure_user(USER_A);
    let b = ensure_user(USER_B);
    let bins = Bins::new();
    // A clean start for both users, so that the first run takes the system snapshot into the user's cache.
    for u in [&a, &b] {
        let _ = std::fs::remove_dir_all(u.home.join(".cache/hutch"));
    }
    let before = listing(&system);

    // Streams and exit code, as in the README's first example.
    let o = output(hutch_as(&a, &bins, &a.home, &[], &["run", "--", "sh", "-c", "uname -r; echo out; echo err >&2; exit 7"]));
    assert_eq!(o.status.code(), Some(7), "stderr: {}", text(&o.stderr));
    let stdout = text(&o.stdout);
    let mut lines = stdout.lines();
    assert!(lines.next().is_some_and(|r| r.contains("cloud-amd64")), "{stdout}");
    assert_eq!(lines.next(), Some("out"));
    assert_eq!(lines.next(), None, "stderr kept apart: {stdout}");
    assert!(text(&o.stderr).lines().any(|l| l == "err"), "{}", text(&o.stderr));
    assert!(!text(&o.stderr).contains("no snapshot"), "the shared snapshot was used: {}", text(&o.stderr));

    // The user's cache is private, holds the imported snapshot, and no sandbox is left.
    let cache_a = a.home.join(".cache/hutch");
    let meta = std::fs::metadata(&cache_a).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (a.uid, 0o700), "the user's cache is theirs alone");
    assert_eq!(std::fs::metadata(cache_a.join("sandboxes")).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::read_dir(cache_a.join("sandboxes")).unwrap().count(), 0, "the sandbox left nothing");

    // stdin in, files in and out (the README's examples, relative paths in the user's own directory).
    let work = fresh_dir(&a, "hutch-nonroot-work");
    let mut c = hutch_as(&a, &bins, &work, &[], &["run", "--", "sh", "-c", "read x; echo got $x"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"hello\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!((o.status.code(), text(&o.stdout).trim()), (Some(0), "got hello"), "{}", text(&o.stderr));
    write_as_owner(&a, &work.join("data.csv"), b"a,1\nb,2\nc,3\n");
    let o = output(hutch_as(
        &a,
        &bins,
        &work,
        &[],
        &["run", "--copy-in", "./data.csv:/root/data.csv", "--copy-out", "/root/out.txt:./out.txt", "--", "sh", "-c", "wc -l data.csv > out.txt"],
    ));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = work.join("out.txt");
    assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "3 data.csv");
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), a.uid, "the copied-out file is the user's");

    // A repository the user owns: the working tree goes in, the VM's commit comes back as refs/hutch/<id> and a
    // result only the user can read; `apply` changes the working tree.
    let repo = fresh_dir(&a, "hutch-nonroot-repo");
    git_as(&a, &repo, &["init", "-q", "-b", "main"]);
    write_as_owner(&a, &repo.join("README"), b"one\n");
    git_as(&a, &repo, &["add", "-A"]);
    git_as(&a, &repo, &["commit", "-q", "-m", "first"]);
    write_as_owner(&a, &repo.join("README"), b"one\ntwo (uncommitted)\n");
    let o = output(hutch_as(&a, &bins, &repo, &[], &["run", "--", "sh", "-c", "cat README && echo three >> README && git commit -qam vm-change"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "one\ntwo (uncommitted)\n", "the working tree arrived");
    let refs = text(&git_as(&a, &repo, &["for-each-ref", "--format=%(refname)", "refs/hutch"]).stdout);
    assert_eq!(refs.lines().count(), 1, "one result ref: {refs}");
    let o = output(hutch_as(&a, &bins, &repo, &[], &["apply"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(std::fs::read_to_string(repo.join("README")).unwrap(), "one\ntwo (uncommitted)\nthree\n");
    let results = repo.join(".git/hutch");
    assert_eq!(std::fs::metadata(&results).unwrap().mode() & 0o777, 0o700, "results are private");

    // Egress with a secret: the real value reaches the bound host from the user's run; the VM holds a placeholder.
    let net = hutch_testnet::TestNet::start().expect("testnet");
    let ca = bins.readable_copy(net.ca_file(), "testnet-ca.pem");
    let real = format!("sk-nonroot-{}", hutch_sandbox::new_id());
    let p = net.https_port();
    let script = format!("curl -sS --fail -H \"Authorization: Bearer $API_KEY\" https://{API}:{p}/v1/nonroot >/dev/null && echo \"$API_KEY\"");
    let o = output(hutch_as(
        &a,
        &bins,
        &work,
        &[("API_KEY", &real)],
        &[
            "run",
            "--allow",
            &format!("{API}:{p}"),
            "--resolve",
            &format!("{API}:{p}:127.0.0.1"),
            "--upstream-ca",
            ca.to_str().unwrap(),
            "--secret",
            &format!("API_KEY@{API}"),
            "--",
            "sh",
            "-c",
            &script,
        ],
    ));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let placeholder = text(&o.stdout).trim().to_string();
    assert!(placeholder.starts_with("hutch-ph-API_KEY-") && !placeholder.contains(&real), "{placeholder}");
    let seen = net.requests_to("/v1/nonroot");
    assert_eq!(seen.len(), 1, "{:?}", net.requests());
    assert_eq!(seen[0].header("authorization"), Some(format!("Bearer {real}").as_str()));
    assert!(!text(&o.stderr).contains(&real));

    // User B, with a private runtime directory: a long command whose QEMU is inspected, then hutch is SIGKILLed.
    let runtime_b = PathBuf::from(format!("/tmp/hutch-test-runtime-{}", b.uid));
    let _ = std::fs::remove_dir_all(&runtime_b);
    std::fs::create_dir(&runtime_b).unwrap();
    std::fs::set_permissions(&runtime_b, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&runtime_b, Some(nix::unistd::Uid::from_raw(b.uid)), Some(nix::unistd::Gid::from_raw(b.gid))).unwrap();
    let cache_b = b.home.join(".cache/hutch");
    let mut c = hutch_as(&b, &bins, &b.home, &[("XDG_RUNTIME_DIR", runtime_b.to_str().unwrap())], &["run", "--", "sh", "-c", "echo ready; sleep 600"]);
    c.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = c.spawn().unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert_eq!(first, "ready\n");
    let sandboxes_b: Vec<PathBuf> = std::fs::read_dir(cache_b.join("sandboxes")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(sandboxes_b.len(), 1, "{sandboxes_b:?}");
    let qemus = qemus_mentioning(sandboxes_b[0].to_str().unwrap());
    assert_eq!(qemus.len(), 1, "one QEMU for the sandbox");
    let qemu = qemus[0];
    assert_eq!(uid_of(qemu), Some(b.uid), "QEMU runs as the user");
    let cmdline: Vec<String> = std::fs::read(format!("/proc/{qemu}/cmdline")).unwrap().split(|&c| c == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    assert!(!cmdline.iter().any(|a| a == "-runas"), "no privilege drop: {cmdline:?}");
    let sandbox_opt = cmdline.iter().position(|a| a == "-sandbox").map(|i| cmdline[i + 1].clone()).unwrap_or_default();
    assert!(sandbox_opt.starts_with("on,") && sandbox_opt.contains("elevateprivileges=deny") && sandbox_opt.contains("spawn=deny"), "{sandbox_opt}");
    assert!(std::fs::read(format!("/proc/{qemu}/environ")).unwrap().is_empty(), "QEMU's environment is empty");
    let sockets = runtime_b.join("hutch/sandboxes").join(sandboxes_b[0].file_name().unwrap());
    assert!(sockets.join("agent.sock").exists() && sockets.join("qmp.sock").exists(), "sockets under XDG_RUNTIME_DIR");
    assert!(!sandboxes_b[0].join("agent.sock").exists());
    let private = |p: &Path| std::fs::metadata(p).map(|m| (m.uid(), m.mode() & 0o777)).unwrap();
    assert_eq!(private(&sandboxes_b[0]), (b.uid, 0o700));
    assert_eq!(private(&sockets), (b.uid, 0o700));

    // A cannot see, enter or remove B's sandbox, nor kill B's QEMU; B cannot read A's results or remove A's refs.
    let sh = |u: &TestUser, cmd: &str| output(as_user(u, &u.home, &[], Path::new("/bin/sh"), &["-c", cmd]));
    for cmd in [
        format!("ls {}", cache_b.join("sandboxes").display()),
        format!("rm -rf {}", sandboxes_b[0].display()),
        format!("ls {}", sockets.display()),
        format!("kill -9 {qemu}"),
    ] {
        let o = sh(&a, &cmd);
        assert!(!o.status.success(), "user A could: {cmd}");
    }
    assert!(sandboxes_b[0].exists() && uid_of(qemu) == Some(b.uid), "B's sandbox is untouched");
    let result_dirs: Vec<PathBuf> = std::fs::read_dir(&results).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(result_dirs.len(), 1);
    for cmd in [
        format!("ls {}", results.display()),
        format!("cat {}/*", result_dirs[0].display()),
        format!("rm -rf {}", result_dirs[0].display()),
        format!("git -C {} update-ref -d $(git -C {} for-each-ref --format='%(refname)' refs/hutch)", repo.display(), repo.display()),
    ] {
        let o = sh(&b, &cmd);
        assert!(!o.status.success(), "user B could: {cmd}");
    }
    let o = output(hutch_as(&b, &bins, &repo, &[], &["diff", "--list"]));
    assert!(!text(&o.stdout).contains(result_dirs[0].file_name().unwrap().to_str().unwrap()), "B listed A's results: {}", text(&o.stdout));
    assert!(result_dirs[0].exists());
    assert_eq!(text(&git_as(&a, &repo, &["for-each-ref", "--format=%(refname)", "refs/hutch"]).stdout), refs);

    // hutch SIGKILLed: QEMU dies with it (parent-death signal), and B's next run removes the directories left.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(wait_until(Duration::from_secs(10), || !Path::new(&format!("/proc/{qemu}")).exists()), "QEMU outlived hutch");
    let o = output(hutch_as(&b, &bins, &b.home, &[("XDG_RUNTIME_DIR", runtime_b.to_str().unwrap())], &["run", "--", "true"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!sandboxes_b[0].exists() && !sockets.exists(), "the leftovers were reaped");
    let _ = std::fs::remove_dir_all(&runtime_b);

    // A user with an agent of their own builds only the initramfs; the kernel and root filesystem come from the
    // system cache, linked, not copied or rebuilt.
    let agent2 = bins.dir.path().join("agent2");
    std::fs::copy(bins.dir.path().join("hutch-agent"), &agent2).unwrap();
    std::fs::OpenOptions::new().append(true).open(&agent2).and_then(|mut f| std::io::Write::write_all(&mut f, b"\0")).unwrap();
    std::fs::set_permissions(&agent2, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = output(hutch_as(&a, &bins, &a.home, &[("HUTCH_AGENT", agent2.to_str().unwrap())], &["run", "--cold", "--", "echo", "own agent"]));
    assert_eq!((o.status.code(), text(&o.stdout).as_str()), (Some(0), "own agent\n"), "{}", text(&o.stderr));
    for (kind, linked) in [("kernels", true), ("rootfs", true), ("initrd", false)] {
        let entries: Vec<PathBuf> = std::fs::read_dir(cache_a.join(kind)).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(entries.len(), 1, "{kind}: {entries:?}");
        let link = std::fs::read_link(&entries[0]).ok();
        assert_eq!(link.as_ref().is_some_and(|l| l.starts_with(system.join(kind))), linked, "{kind}: {link:?}");
    }

    // Nothing the users did is in the system cache: no entry of theirs, and every entry that appeared meanwhile
    // (other root runs share this machine) belongs to root or the VMM account. Image files are writable by no user.
    let after = listing(&system);
    let users = [a.uid, b.uid];
    for (path, (uid, gid, _)) in &after {
        assert!(!users.contains(uid) && ![a.gid, b.gid].contains(gid), "{} belongs to a test user", path.display());
    }
    let new: Vec<&PathBuf> = after.keys().filter(|p| !before.contains_key(*p)).collect();
    for p in &new {
        assert!(!p.starts_with(system.join("images")) || after[*p].0 == 0, "new in the image area, not root's: {}", p.display());
    }
    for (path, (uid, _, mode)) in &after {
        let image_area = ["images", "kernels", "initrd", "rootfs"].iter().any(|d| path.starts_with(system.join(d)));
        if image_area && !std::fs::symlink_metadata(path).unwrap().file_type().is_symlink() {
            assert!(mode & 0o002 == 0 && !users.contains(uid), "{} is writable by users ({mode:o})", path.display());
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&repo);
}

/// The subordinate id ranges `/etc/subuid`-style `file` gives `name`, as `START-END`.
fn subordinate_ranges(file: &str, name: &str) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let (who, start, count) = (f.next()?, f.next()?.parse::<u64>().ok()?, f.next()?.parse::<u64>().ok()?);
            (who == name && count > 0).then(|| format!("{start}-{}", start + count - 1))
        })
        .collect()
}

/// Gives `user` 65536 subordinate uids and gids (past every range given so far) unless it has a range that big.
fn ensure_subordinate_ids(user: &TestUser) {
    for (file, flag) in [("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")] {
        let big = subordinate_ranges(file, &user.name).iter().any(|r| {
            let (a, b) = r.split_once('-').unwrap();
            b.parse::<u64>().unwrap() - a.parse::<u64>().unwrap() + 1 >= 65536
        });
        if big {
            continue;
        }
        let end = std::fs::read_to_string(file).unwrap_or_default().lines().filter_map(|l| {
            let mut f = l.split(':');
            let _ = f.next();
            Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
        }).max().unwrap_or(100_000).max(100_000);
        let start = end.div_ceil(65536) * 65536;
        let st = Command::new("usermod").args([flag, &format!("{start}-{}", start + 65535), &user.name]).status().unwrap();
        assert!(st.success(), "usermod {flag} for {}", user.name);
    }
}

/// Why a rootless build cannot run for `user` here, if it cannot (after the test gave the user subordinate ids).
fn rootless_unsupported(user: &TestUser) -> Option<String> {
    let blockers = hutch_image::rootless_build_blockers(Path::new("/"), &user.name, user.uid);
    (!blockers.is_empty()).then(|| blockers.iter().map(|b| format!("{} ({})", b.what, b.fix)).collect::<Vec<_>>().join("; "))
}

/// A fresh cache directory owned by `user` and the user's group (the namespace's root reaches the user's files only
/// when both are the user's).
fn user_cache(user: &TestUser, prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    nix::unistd::chown(dir.path(), Some(nix::unistd::Uid::from_raw(user.uid)), Some(nix::unistd::Gid::from_raw(user.gid))).unwrap();
    dir
}

/// A rootless image build: an ordinary user with subordinate ids builds the whole image (kernel, initramfs, root
/// filesystem in a user namespace) in an own cache without the system cache, and a VM boots from it with the
/// ownership a root build gives (root:shadow 0640 `/etc/shadow`, setuid `su`). `hutch doctor` says so. Nothing in
/// the user's cache belongs to anyone else (also after a build that was killed half-way: the next one removes its
/// remains), and the cache can be deleted by the user (`hutch image rm`).
#[test]
fn an_ordinary_user_builds_an_image_rootless_and_boots_it() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return;
    }
    let a = ensure_user(USER_A);
    ensure_subordinate_ids(&a);
    if let Some(why) = rootless_unsupported(&a) {
        eprintln!("SKIP: a rootless image build as {}: {why}", a.name);
        return;
    }
    let bins = Bins::new();
    let cache = user_cache(&a, "hutch-rootless-cache-");
    let own = cache.path().join("c");
    let env = [("HUTCH_CACHE_DIR", own.to_str().unwrap()), ("HUTCH_SYSTEM_CACHE_DIR", "")];

    let o = output(hutch_as(&a, &bins, &a.home, &env, &["doctor"]));
    let report = text(&o.stdout);
    let build = report.lines().find(|l| l.get(5..).is_some_and(|r| r.starts_with("build"))).unwrap_or_default().to_string();
    assert!(build.starts_with("ok") && build.contains("rootless"), "doctor's build line: {build}\n{report}");

    // A build killed while mmdebstrap runs leaves files owned by the user's subordinate ids, which the user cannot
    // delete directly; the next build removes them from the user's namespace.
    let mut killed = hutch_as(&a, &bins, &a.home, &env, &["image", "build", "--no-snapshot"]);
    let mut killed = killed.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let foreign = || listing(&own.join("tmp")).values().any(|(uid, _, _)| *uid != a.uid);
    let saw_foreign = wait_until(Duration::from_secs(180), foreign);
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert!(saw_foreign, "the rootless build made nothing in the namespace's ids within 180 s");

    // The minimal variant: the default image without its boot snapshot (the snapshot is no different for a user).
    let started = std::time::Instant::now();
    let o = output(hutch_as(&a, &bins, &a.home, &env, &["image", "build", "--no-snapshot"]));
    let took = started.elapsed();
    assert!(o.status.success(), "rootless build: {}", text(&o.stderr));
    eprintln!("rootless image build (kernel, initramfs, root filesystem) took {:.1} s", took.as_secs_f64());

    let rootfs: Vec<PathBuf> = std::fs::read_dir(own.join("rootfs")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(rootfs.len(), 1, "one root filesystem built: {rootfs:?}");
    assert!(!rootfs[0].is_symlink(), "built, not linked from the system cache");
    for (path, (uid, gid, _)) in listing(&own) {
        assert_eq!((uid, gid), (a.uid, a.gid), "{} belongs to the user", path.display());
    }

    let o = output(hutch_as(&a, &bins, &a.home, &env, &["run", "--cold", "--no-repo", "--", "stat", "-c", "%u %g %a %n", "/etc/shadow", "/usr/bin/su", "/root"]));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), "0 42 640 /etc/shadow\n0 0 4755 /usr/bin/su\n0 0 700 /root\n", "ownership as root builds it");

    // The user removes what they built, with nothing left for root to clean.
    let key = std::fs::read_dir(own.join("images")).unwrap().flatten().next().unwrap().file_name().into_string().unwrap();
    let o = output(hutch_as(&a, &bins, &a.home, &env, &["image", "rm", &key]));
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = output(as_user(&a, &a.home, &[], Path::new("/bin/rm"), &["-rf", own.to_str().unwrap()]));
    assert!(o.status.success() && !own.exists(), "the user deletes the whole cache: {}", text(&o.stderr));
}

/// Without a shared image and without subordinate ids, a user's build stops before anything is built, with a
/// message that says what to do (root's shared image, or what a rootless build needs); `hutch doctor` names the
/// missing ranges.
#[test]
fn a_user_without_a_shared_image_or_subordinate_ids_is_told_what_to_do() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return;
    }
    let c = ensure_user(USER_NO_SUBIDS);
    for (file, flag) in [("/etc/subuid", "--del-subuids"), ("/etc/subgid", "--del-subgids")] {
        for range in subordinate_ranges(file, &c.name) {
            let st = Command::new("usermod").args([flag, &range, &c.name]).status().unwrap();
            assert!(st.success(), "usermod {flag} {range}");
        }
    }
    let bins = Bins::new();
    let cache = user_cache(&c, "hutch-nonroot-cache-");
    let own = cache.path().join("c");
    let env = [("HUTCH_CACHE_DIR", own.to_str().unwrap()), ("HUTCH_SYSTEM_CACHE_DIR", "")];
    let o = output(hutch_as(&c, &bins, &c.home, &env, &["run", "--", "true"]));
    let stderr = text(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("needs root") && stderr.contains("hutch image build") && stderr.contains("as root"), "{stderr}");
    assert!(stderr.contains("rootless build cannot run here") && stderr.contains("/etc/subuid") && stderr.contains("usermod --add-subuids"), "{stderr}");
    for d in ["kernels", "initrd", "rootfs", "images"] {
        let entries = std::fs::read_dir(own.join(d)).map(|r| r.count()).unwrap_or(0);
        assert_eq!(entries, 0, "nothing built in {d}");
    }

    let o = output(hutch_as(&c, &bins, &c.home, &[], &["doctor"]));
    let report = text(&o.stdout);
    let line = |name: &str| report.lines().find(|l| l.get(5..).is_some_and(|r| r.starts_with(name))).unwrap_or_else(|| panic!("no {name} line in:\n{report}")).to_string();
    let build = line("build");
    assert!(build.starts_with("warn") && build.contains("needs root") && build.contains("would need"), "{build}");
    for b in hutch_image::rootless_build_blockers(Path::new("/"), &c.name, c.uid) {
        assert!(build.contains(&b.what), "doctor names {:?}: {build}", b.what);
    }
    assert!(build.contains("/etc/subuid gives") && build.contains("/etc/subgid gives"), "{build}");
    assert!(line("vmm user").contains("QEMU runs as you"), "{report}");
}

/// The group the daemon's test socket is given (not `hutch`, so a real installation's group is left alone).
const SOCKET_GROUP: &str = "hutch-test-sock";

/// `hutch serve` on a unix socket as a system service would run it: users in the socket's group create and run
/// sandboxes over it as themselves (`HUTCH_URL=unix://...`, no token), `hutch run --daemon` streams and exits
/// with the command's code, the two users cannot see or touch each other's sandboxes, and a user outside the
/// group is refused with a message that says why. The socket is 0660 in its group and gone after the daemon.
#[test]
fn the_daemon_serves_group_members_on_a_unix_socket_each_as_themselves() {
    if let Some(why) = missing_prerequisite() {
        eprintln!("SKIP: {why}");
        return;
    }
    if nix::unistd::Group::from_name(SOCKET_GROUP).unwrap().is_none() {
        let st = Command::new("groupadd").args(["--system", SOCKET_GROUP]).status().unwrap();
        assert!(st.success() || nix::unistd::Group::from_name(SOCKET_GROUP).unwrap().is_some(), "groupadd {SOCKET_GROUP}");
    }
    let a = ensure_user(USER_A);
    let b = ensure_user(USER_B);
    let outsider = ensure_user(USER_NO_SUBIDS);
    for u in [&a, &b] {
        assert!(Command::new("usermod").args(["-aG", SOCKET_GROUP, &u.name]).status().unwrap().success());
    }
    // Not a member, whatever an earlier run did.
    let _ = Command::new("gpasswd").args(["-d", &outsider.name, SOCKET_GROUP]).stdout(Stdio::null()).stderr(Stdio::null()).status();
    let bins = Bins::new();
    let dir = tempfile::Builder::new().prefix("hutch-sock-").tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = dir.path().join("hutch.sock");
    let data = dir.path().join("data");

    let mut daemon = common::hutch()
        .args(["serve", "--unix"])
        .arg(&sock)
        .args(["--socket-group", SOCKET_GROUP, "--pool", "0", "--data-dir"])
        .arg(&data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (stderr, log) = (daemon.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on unix://") {
                    let _ = tx.send(());
                }
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
    }
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            // Only a daemon still running (a reaped pid may be another process's by now).
            if let Ok(None) = self.0.try_wait() {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
                let _ = self.0.wait();
            }
        }
    }
    let pid = daemon.id();
    let mut daemon = Kill(daemon);
    assert!(rx.recv_timeout(Duration::from_secs(180)).is_ok(), "the daemon did not start:\n{}", log.lock().unwrap());
    let meta = std::fs::metadata(&sock).unwrap();
    let group = nix::unistd::Group::from_name(SOCKET_GROUP).unwrap().unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, group.gid.as_raw()), "the socket is the group's alone");

    let url = format!("unix://{}", sock.display());
    let env = [("HUTCH_URL", url.as_str())];
    let remote = |u: &TestUser, args: &[&str]| output(as_user(u, &u.home, &env, &bins.hutch(), args));

    // A member creates a sandbox and runs commands in it: streams and exit code.
    let o = remote(&a, &["create"]);
    assert!(o.status.success(), "create as {}: {}\n{}", a.name, text(&o.stderr), log.lock().unwrap());
    let id = text(&o.stdout).trim().to_string();
    let o = remote(&a, &["exec", &id, "--", "sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!((o.status.code(), text(&o.stdout).as_str()), (Some(3), "out\n"), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("err"));
    let o = remote(&a, &["ls", "--json"]);
    assert!(text(&o.stdout).contains(&id) && text(&o.stdout).contains(&format!("{}@unix", a.name)), "{}", text(&o.stdout));

    // `hutch run --daemon`: a sandbox of its own, made and destroyed around the command.
    let o = remote(&a, &["run", "--daemon", "--", "sh", "-c", "echo via daemon; exit 5"]);
    assert_eq!((o.status.code(), text(&o.stdout).as_str()), (Some(5), "via daemon\n"), "{}", text(&o.stderr));
    let o = remote(&a, &["run", "--daemon", "--copy-in", "/etc/hostname:/root/h", "--", "true"]);
    assert!(!o.status.success() && text(&o.stderr).contains("--copy-in is not available with --daemon"), "{}", text(&o.stderr));

    // The other member is another identity: A's sandbox does not exist for B.
    let o = remote(&b, &["ls", "--json"]);
    assert!(o.status.success() && !text(&o.stdout).contains(&id), "B sees A's sandbox: {}", text(&o.stdout));
    let o = remote(&b, &["exec", &id, "--", "true"]);
    assert!(!o.status.success() && text(&o.stderr).contains("404"), "B ran in A's sandbox: {}", text(&o.stderr));
    let o = remote(&b, &["rm", &id]);
    assert!(!o.status.success(), "B removed A's sandbox");
    let o = remote(&a, &["exec", &id, "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "A's sandbox is still there: {}", text(&o.stderr));

    // Outside the group: refused by the socket's permissions, with what to do.
    let o = remote(&outsider, &["ls"]);
    let err = text(&o.stderr);
    assert!(!o.status.success() && err.contains("permission denied") && err.contains(SOCKET_GROUP) && err.contains("usermod -aG"), "{err}");
    let o = remote(&outsider, &["run", "--daemon", "--", "true"]);
    assert!(!o.status.success() && text(&o.stderr).contains("permission denied"), "{}", text(&o.stderr));

    let o = remote(&a, &["rm", &id]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    // Each user is a token named after them; root would be the admin one.
    let o = common::hutch().args(["token", "ls", "--data-dir"]).arg(&data).output().unwrap();
    let tokens = text(&o.stdout);
    assert!(tokens.contains(&format!("{}@unix", a.name)) && tokens.contains(&format!("{}@unix", b.name)) && !tokens.contains(&outsider.name), "{tokens}");

    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
    let st = daemon.0.wait().unwrap();
    assert!(st.success(), "daemon exit: {st}\n{}", log.lock().unwrap());
    assert!(!sock.exists(), "the socket is removed when the daemon stops");
    assert!(qemus_mentioning(data.to_str().unwrap()).is_empty(), "no VM outlives the daemon");
}
