//! `hutch run --detach` against a real `hutch serve` (the real binary on a loopback port, real tokens, real VMs),
//! driven on real terminals: tmux panes run the commands, keys are typed with `send-keys`, screens are read with
//! `capture-pane`. The working tree goes to the daemon, the command runs on a terminal that outlives its client,
//! a second pane attaches and types into it, and once it ends its change is fetched, shown and applied in the
//! repository it came from by `hutch diff/apply --from ID`. Threat classes: another token's sandbox does not
//! exist (404); a fetched change is checked again on the client and refused at another HEAD.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const WAIT: u64 = 240;

/// A running `hutch serve` with its own data directory; SIGTERM when dropped.
struct Daemon {
    child: Child,
    url: String,
    data: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        // No warm pool: a repository sandbox never takes one, and this host's cores are better spent on the test.
        let mut child = hutch()
            .args(["serve", "--listen", "127.0.0.1:0", "--pool", "0", "--data-dir"])
            .arg(&data)
            .env("HUTCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hutch serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    if let Some(t) = tx.take() {
                        let _ = t.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                    }
                }
                if line.contains("repository change collected") || line.contains("ERROR") {
                    eprintln!("daemon: {line}");
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(120)).expect("the daemon did not start");
        Daemon { child, url, data, _tmp: tmp }
    }

    fn token(&self, name: &str) -> String {
        let out = hutch().args(["token", "create", "--name", name, "--data-dir"]).arg(&self.data).output().unwrap();
        assert!(out.status.success(), "token create: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }

    fn cli(&self, token: &str, dir: &Path) -> Command {
        let mut c = hutch();
        c.env("HUTCH_URL", &self.url).env("HUTCH_TOKEN", token).current_dir(dir).stdin(Stdio::null());
        c
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .unwrap();
    assert!(o.status.success(), "git {args:?}: {}", text(&o.stderr));
    text(&o.stdout)
}

/// A repository with one commit and an uncommitted file.
fn sample_repo(t: &Path) -> PathBuf {
    let r = t.join("repo");
    std::fs::create_dir(&r).unwrap();
    git(&r, &["init", "-q", "-b", "main"]);
    std::fs::write(r.join("a.txt"), "one\n").unwrap();
    git(&r, &["add", "a.txt"]);
    git(&r, &["commit", "-qm", "first"]);
    std::fs::write(r.join("notes.txt"), "uncommitted on the host\n").unwrap();
    r
}

/// The sandbox id printed as `ID=<12 hex>` on the screen.
fn shown_id(screen: &str) -> Option<String> {
    screen
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ID=")?.split_whitespace().next())
        .find(|v| v.len() == 12 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string)
}

/// The whole trip: `hutch run --detach` in one pane (returns at once with an id), `hutch attach` in a second pane
/// shows the running command (replayed), a typed line reaches it, the command commits and ends, the attached
/// client exits with its code; then `hutch diff --from ID` shows the change (commits and uncommitted files) and
/// `hutch apply --from ID` applies it. Before the end the change is not there yet (409); another token and an
/// unknown id get a 404; at another HEAD the fetch is refused. Nothing is left: the sandbox is destroyed, its VM
/// gone, no download or upload leftovers.
#[test]
fn detached_run_attach_type_then_diff_and_apply_from_the_daemon() {
    let Some(a) = Tmux::start(100, 30) else { return };
    let Some(b) = Tmux::start(100, 30) else { return };
    let d = Daemon::start();
    let tok = d.token("detach");
    let other = d.token("someone-else");
    let t = tempfile::tempdir().unwrap();
    let repo = sample_repo(t.path());
    // The binary itself, run in the repository (the panes' `hutch` script starts it outside any repository).
    for p in [&a, &b] {
        p.line(&format!("cd {} && export HUTCH_URL={} HUTCH_TOKEN={} HUTCH_LOG=warn H={}", repo.display(), d.url, tok, env!("CARGO_BIN_EXE_hutch")));
    }

    let prog = r#"echo two >> a.txt; echo made > new.txt; git commit -qam "vm edit"; echo "RE""ADY in $PWD with $(cat notes.txt)"; read l; echo "typed <$l>"; echo "$l" > typed.txt; exit 7"#;
    let t0 = Instant::now();
    a.line(&format!("id=$($H run --detach -- sh -c '{prog}'); echo ID=$id EXIT=$?"));
    let h = a.wait_for(" EXIT=0", WAIT);
    let detach_took = t0.elapsed();
    let id = shown_id(&h).unwrap_or_else(|| panic!("no sandbox id on the screen:\n{h}"));
    assert!(h.lines().any(|l| l.starts_with(&format!("hutch: started in sandbox {id}"))), "{h}");

    // Not ended yet: nothing to fetch, and the message says why.
    let early = d.cli(&tok, &repo).args(["diff", "--from", &id]).output().unwrap();
    assert!(!early.status.success() && text(&early.stderr).contains("has not ended yet") && text(&early.stderr).contains("409"), "{}", text(&early.stderr));

    let t1 = Instant::now();
    b.line(&format!("$H attach {id}; echo EXIT=$?"));
    let hb = b.wait_for("READY in /workspace with uncommitted on the host", WAIT);
    let attach_took = t1.elapsed();
    assert!(!hb.contains("typed <"), "{hb}");
    // Typed key by key, each timed from send-keys to its echo on the screen (the guest terminal echoes it): the
    // whole path through tmux, the client, the daemon, the agent channel and back. Printed, not asserted.
    let typed = "hello-from-pane-b";
    let mut samples = Vec::new();
    for i in 1..=typed.len() {
        let t = Instant::now();
        b.type_text(&typed[i - 1..i]);
        let seen = wait_until(Duration::from_secs(WAIT), || {
            let s = b.screen();
            s.lines().rev().find(|l| !l.trim().is_empty()).is_some_and(|l| l.trim_end().ends_with(&typed[..i]))
        });
        assert!(seen, "keystroke {i} never echoed:\n{}", b.screen());
        samples.push(t.elapsed());
    }
    samples.sort();
    b.keys(&["Enter"]);
    let hb = b.wait_for("EXIT=7", WAIT);
    assert!(hb.contains("typed <hello-from-pane-b>"), "{hb}");

    // The change, once collected (the request waits for a collection in progress).
    let t2 = Instant::now();
    let out = d.cli(&tok, &repo).args(["diff", "--from", &id]).output().unwrap();
    let fetch_took = t2.elapsed();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("1 new commit(s)") && stderr.contains("vm edit"), "{stderr}");
    for want in ["+two", "+made", "+hello-from-pane-b", "b/typed.txt"] {
        assert!(stdout.contains(want), "{want} missing from the diff:\n{stdout}");
    }
    assert!(!stdout.contains("notes.txt"), "the host's own uncommitted file is no change:\n{stdout}");
    assert_eq!(git(&repo, &["rev-parse", &format!("refs/hutch/{id}^{{commit}}")]).trim().len(), 40);

    let out = d.cli(&tok, &repo).args(["apply", "--from", &id]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(repo.join("a.txt")).unwrap(), "one\ntwo\n");
    assert_eq!(std::fs::read_to_string(repo.join("new.txt")).unwrap(), "made\n");
    assert_eq!(std::fs::read_to_string(repo.join("typed.txt")).unwrap(), "hello-from-pane-b\n");
    assert_eq!(std::fs::read_to_string(repo.join("notes.txt")).unwrap(), "uncommitted on the host\n");

    // Another token's sandbox and an unknown id do not exist.
    for (token, which) in [(&other, id.as_str()), (&tok, "0123456789ab")] {
        let out = d.cli(token, &repo).args(["diff", "--from", which]).output().unwrap();
        let e = text(&out.stderr);
        assert!(!out.status.success() && e.contains(&format!("no sandbox {which}")) && e.contains("HTTP 404"), "{e}");
    }
    // At another HEAD (and without the local copy) the fetch is refused, naming both commits.
    std::fs::remove_dir_all(repo.join(".git/hutch").join(&id)).unwrap();
    git(&repo, &["commit", "-qam", "moved on"]);
    let out = d.cli(&tok, &repo).args(["diff", "--from", &id]).output().unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success() && e.contains("started from") && e.contains("this repository's HEAD is"), "{e}");

    // Nothing left behind: the sandbox ended with its command, its VM and directory are gone, and neither the
    // daemon's results nor the repository hold half-made files.
    let info = d.cli(&tok, &repo).args(["ls", "--all", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let row = list.as_array().unwrap().iter().find(|s| s["id"] == id.as_str()).cloned().unwrap();
    assert_eq!(row["state"], "destroyed", "{row}");
    let store = hutch_daemon::store::Store::open(&d.data.join("state.db")).unwrap();
    let vm = store.sandbox(&id).unwrap().unwrap().vm_id.unwrap();
    assert!(wait_until(Duration::from_secs(30), || processes_mentioning(&vm).is_empty() && !sandbox_dirs().contains(&vm)), "VM {vm} is left");
    let leftovers = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect()).unwrap_or_default()
    };
    // The snapshot's scratch directory goes with the sandbox's last reference.
    assert!(wait_until(Duration::from_secs(30), || leftovers(&d.data.join("results")).is_empty()), "{:?}", leftovers(&d.data.join("results")));
    assert!(leftovers(&repo.join(".git/hutch")).is_empty(), "{:?}", leftovers(&repo.join(".git/hutch")));
    eprintln!(
        "keystroke-to-echo through the daemon over {} keys: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms (includes tmux send-keys and capture-pane polling)",
        samples.len(),
        samples[samples.len() / 2].as_secs_f64() * 1e3,
        samples[samples.len() * 9 / 10].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    );
    eprintln!(
        "hutch run --detach returned in {:.2}s; attach to the command's first screen {:.2}s; diff --from after the end (collection + fetch + import) {:.2}s",
        detach_took.as_secs_f64(),
        attach_took.as_secs_f64(),
        fetch_took.as_secs_f64()
    );
}

/// Flags a daemon sandbox cannot honour are refused by name before anything is sent (no daemon is running).
#[test]
fn detach_refuses_flags_it_cannot_honour_before_anything_starts() {
    let out = hutch()
        .args(["run", "--detach", "--copy-in", "/etc/hostname:/root/h", "--setup", "/etc/hostname", "--", "true"])
        .env("HUTCH_URL", "http://127.0.0.1:9")
        .env("HUTCH_TOKEN", "hutch_x")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = text(&out.stderr);
    assert!(!out.status.success() && e.contains("--copy-in") && e.contains("--setup") && !e.contains("cannot reach"), "{e}");
}

/// `hutch create --repo` + `hutch attach --detach ID -- CMD`: the command starts where the user was in the work
/// tree, and its change is collected when it ends while the sandbox stays (until `hutch rm`); a sensitive path
/// in it needs `--allow-sensitive` on `apply --from`, as for a local result.
#[test]
fn create_with_repo_then_attach_collects_each_session() {
    let d = Daemon::start();
    let tok = d.token("create-repo");
    let t = tempfile::tempdir().unwrap();
    let repo = sample_repo(t.path());
    std::fs::create_dir(repo.join("sub")).unwrap();
    std::fs::write(repo.join("sub/keep.txt"), "k\n").unwrap();
    let sub = repo.join("sub");
    let out = d.cli(&tok, &sub).args(["create", "--repo"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let cmd = "pwd > where.txt; mkdir -p ../.vscode; echo '{}' > ../.vscode/settings.json";
    let out = d.cli(&tok, &sub).args(["attach", "--detach", &id, "--", "sh", "-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut diff = String::new();
    let got = wait_until(Duration::from_secs(WAIT), || {
        let o = d.cli(&tok, &sub).args(["diff", "--from", &id]).output().unwrap();
        diff = format!("{}{}", text(&o.stdout), text(&o.stderr));
        o.status.success()
    });
    assert!(got, "{diff}");
    assert!(diff.contains("b/sub/where.txt") && diff.contains("+/workspace/sub"), "{diff}");
    assert!(diff.contains(".vscode/settings.json (editor config)") || diff.contains("sensitive paths"), "{diff}");
    // A sensitive path needs --allow-sensitive, as for a local result.
    let out = d.cli(&tok, &sub).args(["apply", "--from", &id]).output().unwrap();
    assert!(!out.status.success() && text(&out.stderr).contains("--allow-sensitive"), "{}", text(&out.stderr));
    assert!(!repo.join("sub/where.txt").exists());
    let out = d.cli(&tok, &sub).args(["apply", "--allow-sensitive", "--from", &id]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(repo.join("sub/where.txt")).unwrap(), "/workspace/sub\n");
    assert!(repo.join(".vscode/settings.json").is_file());
    let ls = d.cli(&tok, &sub).args(["ls", "--json"]).output().unwrap();
    assert!(text(&ls.stdout).contains(&id), "the sandbox stays after its command: {}", text(&ls.stdout));
    let out = d.cli(&tok, &sub).args(["rm", &id]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A raw `POST /v1/sandboxes/repo` (body: a JSON line, then the bundle); returns (status, body).
fn post_repo(d: &Daemon, token: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let addr = d.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/sandboxes/repo HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, resp)
}

/// The daemon checks an upload before it makes anything of it: a start directory that leaves the workspace, a
/// bundle that is not one or holds another commit than the request names are 400s with the reason, and nothing
/// is left (no sandbox row, no upload file).
#[test]
fn repo_upload_bad_snapshots_are_refused_and_leave_nothing() {
    let d = Daemon::start();
    let tok = d.token("uploader");
    let t = tempfile::tempdir().unwrap();
    let repo = sample_repo(t.path());
    let head = git(&repo, &["rev-parse", "HEAD"]).trim().to_string();
    let tree = git(&repo, &["rev-parse", "HEAD^{tree}"]).trim().to_string();
    let bundle = t.path().join("b.bundle");
    git(&repo, &["bundle", "create", "-q", bundle.to_str().unwrap(), "HEAD"]);
    let bundle = std::fs::read(&bundle).unwrap();
    let line = |prefix: &str, commit: &str| {
        let v = serde_json::json!({
            "sandbox": {},
            "snapshot": {"object_format": "sha1", "base": null, "commit": commit, "tree": tree, "branch": "main", "prefix": prefix},
        });
        let mut b = serde_json::to_vec(&v).unwrap();
        b.push(b'\n');
        b
    };
    let with = |mut l: Vec<u8>, b: &[u8]| {
        l.extend_from_slice(b);
        l
    };
    let cases: [(Vec<u8>, &str); 4] = [
        (with(line("../../etc", &head), &bundle), "not a plain relative path"),
        (with(line("", &head), b"not a bundle at all"), "the snapshot cannot be used"),
        // A real bundle, but its ref is not the snapshot ref a client sends, or not the named commit.
        (with(line("", &head), &bundle), "the snapshot cannot be used"),
        (b"{\"sandbox\": {}, \"snapshot\": {\"object_format\": \"sha1\"}}\n".to_vec(), "RepoCreate"),
    ];
    for (body, want) in cases {
        let (status, resp) = post_repo(&d, &tok, &body);
        assert_eq!(status, 400, "{resp}");
        assert!(resp.contains(want), "{want:?} not in {resp}");
    }
    let ls = d.cli(&tok, t.path()).args(["ls", "--all", "--json"]).output().unwrap();
    assert_eq!(text(&ls.stdout).trim(), "[]", "no sandbox was made");
    let left: Vec<_> = std::fs::read_dir(d.data.join("results")).map(|rd| rd.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}
