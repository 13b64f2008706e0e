//! Event-triggered runs end to end: a real `hutch serve --triggers`, signed webhooks over HTTP, real VMs that
//! clone from the test net's forge through their gateway, and delivery to that forge (branch and pull request)
//! by the daemon. The forge records which token every request carried.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use hutch_daemon::triggers::event::sign;
use hutch_testnet::TestNet;
use serde_json::{json, Value};

const FORGE_TOKEN: &str = "ghp_trigger_forge_token_5up3r53cr3t_0123456789";
const HOOK_SECRET: &str = "hook-secret-for-the-test-0123456789";
const GIT_HOST: &str = "git.example.test";

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime"))
}

struct Resp {
    status: u16,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

fn send(method: &str, url: &str, token: Option<&str>, headers: &[(&str, String)], body: Option<Vec<u8>>) -> Resp {
    let client = reqwest::Client::new();
    let mut rb = client.request(method.parse().unwrap(), url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    for (k, v) in headers {
        rb = rb.header(*k, v);
    }
    if let Some(b) = body {
        rb = rb.header("content-type", "application/json").body(b);
    }
    rt().block_on(async move {
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        Resp { status, body }
    })
}

/// A running `hutch serve --triggers` on loopback; SIGTERM when dropped.
struct Daemon {
    child: Option<Child>,
    url: String,
    data: PathBuf,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    fn start(data: &Path, triggers: &Path) -> Daemon {
        let mut child = hutch()
            .args(["serve", "--listen", "127.0.0.1:0", "--pool", "0", "--data-dir"])
            .arg(data)
            .arg("--triggers")
            .arg(triggers)
            .env("HUTCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hutch serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    if let Some(t) = tx.take() {
                        let _ = t.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                    }
                }
                log2.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(180)).unwrap_or_else(|_| panic!("the daemon did not start; log:\n{}", log.lock().unwrap()));
        Daemon { child: Some(child), url, data: data.to_path_buf(), log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn store(&self) -> hutch_daemon::store::Store {
        hutch_daemon::store::Store::open(&self.data.join("state.db")).expect("open the daemon's database")
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("SIGKILL");
        c.wait().expect("wait");
    }

    fn hook(&self, trigger: &str, event: &str, delivery: &str, body: &[u8], signature: Option<String>) -> Resp {
        let mut headers = vec![("x-github-event", event.to_string()), ("x-github-delivery", delivery.to_string())];
        if let Some(s) = signature {
            headers.push(("x-hub-signature-256", s));
        }
        send("POST", &format!("{}/hooks/{trigger}", self.url), None, &headers, Some(body.to_vec()))
    }

    fn comment(&self, delivery: &str, author: &str, text: &str) -> Resp {
        let body = comment_payload(author, text);
        self.hook("fix", "issue_comment", delivery, &body, Some(sign(HOOK_SECRET.as_bytes(), &body)))
    }

    fn run(&self, token: &str, id: &str) -> Value {
        let r = send("GET", &format!("{}/v1/runs/{id}", self.url), Some(token), &[], None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    }

    fn runs(&self, token: &str) -> Vec<Value> {
        let r = send("GET", &format!("{}/v1/runs", self.url), Some(token), &[], None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["runs"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (a bound against hangs, not a speed check) until the run ended.
    fn wait_ended(&self, token: &str, id: &str, secs: u64) -> Value {
        let mut last = Value::Null;
        let ok = wait_until(Duration::from_secs(secs), || {
            last = self.run(token, id);
            !matches!(last["state"].as_str(), Some("queued") | Some("running"))
        });
        assert!(ok, "run {id} did not end: {last}\ndaemon log:\n{}", self.log());
        last
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn comment_payload(author: &str, text: &str) -> Vec<u8> {
    comment_payload_on(7, author, text)
}

fn comment_payload_on(issue: u64, author: &str, text: &str) -> Vec<u8> {
    json!({
        "action": "created",
        "issue": { "number": issue, "title": "the test fails", "labels": [] },
        "comment": { "body": text, "user": { "login": author } },
        "repository": { "full_name": "acme/widget", "default_branch": "main" },
        "sender": { "login": author },
    })
    .to_string()
    .into_bytes()
}

/// The test net, its forge repository and a data directory with the two secrets in the daemon's store.
struct Setup {
    net: TestNet,
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let net = TestNet::start().expect("testnet");
        net.create_forge_repo(
            "acme",
            "widget",
            &[
                ("src/lib.rs", "pub fn answer() -> u32 { 41 }\n"),
                ("test.sh", "#!/bin/sh\ngrep -q 42 src/lib.rs\n"),
                (".github/workflows/ci.yml", "on: push\njobs: {}\n"),
            ],
            FORGE_TOKEN,
        )
        .expect("forge repo");
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Setup { net, dir };
        s.secret("HOOK_SECRET", HOOK_SECRET, "hooks.invalid");
        s.secret("FORGE_TOKEN", FORGE_TOKEN, GIT_HOST);
        s
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn secret(&self, name: &str, value: &str, hosts: &str) {
        let mut c = hutch()
            .args(["secret", "set", name, "--hosts", hosts, "--data-dir"])
            .arg(self.data())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(format!("{value}\n").as_bytes()).unwrap();
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "secret set: {}", text(&out.stderr));
    }

    fn admin_token(&self) -> String {
        let out = hutch().args(["token", "create", "--name", "admin", "--admin", "--data-dir"]).arg(self.data()).output().unwrap();
        assert!(out.status.success(), "token create: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }

    /// The triggers file: a comment trigger (`/hutch`, alice only) and, when `schedule` is given, a schedule.
    fn triggers(&self, max_running: usize, command: &str, schedule: Option<&str>) -> PathBuf {
        self.triggers_with(max_running, command, schedule, "")
    }

    /// [`Setup::triggers`] with extra keys for the comment trigger's `[trigger.job]` (the trigger's own keys go
    /// before its tables, so `per_trigger` is inserted there).
    fn triggers_with(&self, max_running: usize, command: &str, schedule: Option<&str>, job_extra: &str) -> PathBuf {
        let p = self.net.https_port();
        let ca = self.net.ca_file().display().to_string();
        let forge = format!(
            r#"[trigger.forge]
api = "https://localhost:{p}"
git = "https://{GIT_HOST}:{p}"
git_from_host = "https://localhost:{p}"
token = "FORGE_TOKEN"
ca_file = "{ca}"
"#
        );
        let policy = format!(
            r#"[trigger.job.policy]
resolve = ["{GIT_HOST}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
"#
        );
        let mut text = format!(
            r#"max_running = {max_running}

[[trigger]]
name = "fix"
source = "github"
secret = "HOOK_SECRET"
max_body_kib = 64
max_running = {max_running}
[trigger.filter]
events = ["issue_comment"]
actions = ["created"]
repositories = ["acme/widget"]
comment_prefix = "/hutch"
authors = ["alice"]
{forge}[trigger.job]
command = ["sh", "-c", {command:?}]
comment = true
timeout_secs = 900
title = "hutch: fix the test"
{job_extra}
{policy}"#
        );
        if let Some(cron) = schedule {
            text.push_str(&format!(
                r#"
[[trigger]]
name = "nightly"
source = "schedule"
schedule = "{cron}"
{forge}[trigger.job]
repository = "acme/widget"
ref = "main"
command = ["sh", "-c", "date > scheduled.txt && git add scheduled.txt && git commit -qm scheduled"]
{policy}"#
            ));
        }
        let path = self.dir.path().join("triggers.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// The command the comment trigger runs: it shows what the VM holds (environment, git config, the event) so
/// the test can check the token is not there, fixes the test in a commit, and touches the CI workflow, which
/// must be held back.
const FIX: &str = r##"set -e
echo "prompt: $HUTCH_PROMPT"
env | sort
git config -l
cat "$HUTCH_EVENT_FILE"; echo
case "$HUTCH_PROMPT" in hang*) echo hanging; sleep 600;; esac
sleep 4
sed -i s/41/42/ src/lib.rs
sh test.sh
git commit -qam "fix the test"
echo "# changed by the VM" >> .github/workflows/ci.yml
echo done
"##;

fn have_vms() -> bool {
    if std::env::var_os("HUTCH_AGENT").is_none() && !Path::new("/var/lib/hutch").exists() {
        eprintln!("SKIP: no image cache and no HUTCH_AGENT (see scripts/test)");
        return false;
    }
    true
}

#[test]
fn comment_webhook_runs_in_a_vm_and_opens_a_pull_request() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    let d = Daemon::start(&s.data(), &s.triggers(2, FIX, None));

    // Bad signature: 401 and nothing recorded.
    let body = comment_payload("alice", "/hutch fix the test");
    let r = d.hook("fix", "issue_comment", "d-bad", &body, Some(sign(b"wrong secret", &body)));
    assert_eq!(r.status, 401, "{}", String::from_utf8_lossy(&r.body));
    let r = d.hook("fix", "issue_comment", "d-none", &body, None);
    assert_eq!(r.status, 401);
    // Oversized: 413 (the trigger takes 64 KiB).
    let big = comment_payload("alice", &format!("/hutch {}", "x".repeat(70 << 10)));
    let r = d.hook("fix", "issue_comment", "d-big", &big, Some(sign(HOOK_SECRET.as_bytes(), &big)));
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    // A stranger's comment: accepted as a delivery, no run, logged.
    let r = d.comment("d-stranger", "mallory", "/hutch rm -rf everything");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["ignored"].as_str().unwrap().contains("allowlist"), "{}", r.json());
    assert!(wait_until(Duration::from_secs(5), || d.log().contains("is not on the trigger's allowlist")), "{}", d.log());
    // Unknown trigger.
    assert_eq!(d.hook("nope", "issue_comment", "d-x", &body, Some(sign(HOOK_SECRET.as_bytes(), &body))).status, 404);
    assert!(d.runs(&admin).is_empty(), "no run from refused or ignored deliveries");

    // The real one, delivered twice: one run.
    let t0 = Instant::now();
    let r = d.comment("d-1", "alice", "/hutch fix the test");
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["run"].as_str().unwrap().to_string();
    let again = d.comment("d-1", "alice", "/hutch fix the test");
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(again.json()["run"], id.as_str());
    assert_eq!(d.runs(&admin).len(), 1);

    // While the command runs, the VM's memory does not hold the token (the command sleeps after its output).
    let mut vm_pid = None;
    assert!(
        wait_until(Duration::from_secs(600), || {
            let r = d.run(&admin, &id);
            if r["first_output_ms"].is_i64() {
                if let Some(sb) = r["sandbox"].as_str() {
                    vm_pid = d.store().sandbox(sb).ok().flatten().and_then(|row| row.vmm_pid).map(|p| p as u32);
                }
                return true;
            }
            r["state"] != "queued" && r["state"] != "running"
        }),
        "the command never started; log:\n{}",
        d.log()
    );
    let first_output = t0.elapsed();
    let pid = vm_pid.expect("the run's VM is recorded");
    let (found, scanned) = hutch_testnet::process_memory_contains(pid, &[FORGE_TOKEN]);
    assert!(scanned > 64 << 20, "scanned only {scanned} bytes of the VM");
    assert!(!found[0], "the forge token is in the VM's memory");

    let run = d.wait_ended(&admin, &id, 900);
    let total = t0.elapsed();
    let logs = send("GET", &format!("{}/v1/runs/{id}/logs", d.url), Some(&admin), &[], None);
    let logs = String::from_utf8_lossy(&logs.body).into_owned();
    assert_eq!(run["state"], "succeeded", "{run}\nlogs:\n{logs}\ndaemon:\n{}", d.log());
    assert!(logs.contains("prompt: fix the test") && logs.contains("HUTCH_EVENT_FILE=/run/hutch/event.json") && logs.contains("done"), "{logs}");
    assert!(logs.contains("\"login\":\"alice\""), "the event is in the VM as a file: {logs}");
    assert!(!logs.contains(FORGE_TOKEN), "the token reached the VM: {logs}");

    // The forge: the clone (through the gateway) and the push (from the host) carried the real token; a branch
    // hutch/<run-id> with the fix; a pull request whose body says the workflow change was held back.
    let rec = s.net.forge_record();
    assert!(rec.requests.iter().all(|r| r.token.as_deref() == Some(FORGE_TOKEN)), "{:?}", rec.requests);
    let fetches = rec.requests.iter().filter(|r| r.route == Some(hutch_testnet::ForgeRoute::Fetch)).count();
    assert!(fetches >= 2, "the VM's clone and the host's fetch: {:?}", rec.requests);
    let branch = format!("hutch/{id}");
    assert_eq!(run["branch"], branch.as_str());
    let pushed: Vec<_> = rec.pushes.iter().filter(|p| p.name == format!("refs/heads/{branch}")).collect();
    assert_eq!(pushed.len(), 1, "{:?}", rec.pushes);
    let lib = s.net.forge_git("acme", "widget", &["show", &format!("{branch}:src/lib.rs")]).unwrap();
    assert!(lib.contains("42"), "{lib}");
    let ci = s.net.forge_git("acme", "widget", &["show", &format!("{branch}:.github/workflows/ci.yml")]).unwrap();
    assert!(!ci.contains("changed by the VM"), "a workflow change was delivered: {ci}");
    assert_eq!(rec.pulls.len(), 1);
    let pr = &rec.pulls[0];
    assert_eq!((pr.head.as_str(), pr.base.as_str()), (branch.as_str(), "main"));
    assert!(pr.body.contains(".github/workflows/ci.yml"), "the PR body names the held-back path: {}", pr.body);
    assert!(run["held_back"].as_str().unwrap_or_default().contains(".github/workflows/ci.yml"), "{run}");
    assert_eq!(rec.comments.len(), 1);
    assert_eq!(rec.comments[0].issue, 7);

    // The CLI shows the run and its output.
    let out = hutch().args(["runs", "show", &id]).env("HUTCH_URL", &d.url).env("HUTCH_TOKEN", &admin).output().unwrap();
    assert!(out.status.success() && text(&out.stdout).contains("succeeded"), "{}{}", text(&out.stdout), text(&out.stderr));
    let out = hutch().args(["runs", "logs", "-f", &id]).env("HUTCH_URL", &d.url).env("HUTCH_TOKEN", &admin).output().unwrap();
    assert!(text(&out.stdout).contains("prompt: fix the test"), "{}", text(&out.stdout));
    let metrics = send("GET", &format!("{}/metrics", d.url), Some(&admin), &[], None);
    let m = String::from_utf8_lossy(&metrics.body);
    assert!(m.contains("hutch_runs_ended_total{outcome=\"succeeded\"} 1"), "{m}");
    assert!(m.contains("hutch_webhooks_total{outcome=\"bad_signature\"} 2"), "{m}");
    eprintln!(
        "webhook to first output: {:.1} s (daemon: {} ms); to run end: {:.1} s",
        first_output.as_secs_f64(),
        run["first_output_ms"].as_i64().unwrap_or(0) - run["created_ms"].as_i64().unwrap_or(0),
        total.as_secs_f64()
    );
}

#[test]
fn a_run_queued_when_the_daemon_is_killed_runs_after_the_restart() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    let triggers = s.triggers(1, FIX, None);
    let mut d = Daemon::start(&s.data(), &triggers);
    // One slot: the first run hangs in its VM, the second waits in the queue.
    let a = d.comment("k-1", "alice", "/hutch hang");
    assert_eq!(a.status, 202, "{}", String::from_utf8_lossy(&a.body));
    let a = a.json()["run"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(600), || d.run(&admin, &a)["first_output_ms"].is_i64()), "{}", d.log());
    let b = d.comment("k-2", "alice", "/hutch fix the test");
    assert_eq!(b.status, 202);
    let b = b.json()["run"].as_str().unwrap().to_string();
    assert_eq!(d.run(&admin, &b)["state"], "queued");
    d.kill9();

    let d = Daemon::start(&s.data(), &triggers);
    assert!(wait_until(Duration::from_secs(30), || d.log().contains("1 queued") && d.log().contains("1 recorded failed")), "{}", d.log());
    let ra = d.run(&admin, &a);
    assert_eq!(ra["state"], "failed");
    assert!(ra["reason"].as_str().unwrap().contains("daemon stopped"), "{ra}");
    let rb = d.wait_ended(&admin, &b, 900);
    assert_eq!(rb["state"], "succeeded", "{rb}\n{}", d.log());
    // Nothing ran twice: one branch, of the second run.
    let rec = s.net.forge_record();
    assert_eq!(rec.pushes.iter().filter(|p| p.name.starts_with("refs/heads/hutch/")).count(), 1, "{:?}", rec.pushes);
    assert_eq!(rec.pulls.len(), 1);
    assert_eq!(d.runs(&admin).len(), 2);
}

#[test]
fn a_schedule_fires_and_delivers() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    // Every 20 seconds (six fields: seconds first).
    let d = Daemon::start(&s.data(), &s.triggers(1, FIX, Some("*/20 * * * * *")));
    let mut id = String::new();
    assert!(
        wait_until(Duration::from_secs(120), || {
            id = d.runs(&admin).iter().find(|r| r["trigger"] == "nightly").and_then(|r| r["id"].as_str()).unwrap_or_default().to_string();
            !id.is_empty()
        }),
        "{}",
        d.log()
    );
    let run = d.wait_ended(&admin, &id, 900);
    assert_eq!(run["state"], "succeeded", "{run}\n{}", d.log());
    let f = s.net.forge_git("acme", "widget", &["show", &format!("hutch/{id}:scheduled.txt")]).unwrap();
    assert!(!f.trim().is_empty());
}

#[test]
fn ten_deliveries_at_once_respect_the_global_limit_and_the_concurrency_keys() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    // Two runs at once in all; runs on the same issue one after the other.
    let d = Daemon::start(&s.data(), &s.triggers_with(2, FIX, None, "concurrency_key_from = \"issue.number\"\non_conflict = \"queue\""));
    let ids: Vec<(u64, String)> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..10u64)
            .map(|i| {
                let d = &d;
                sc.spawn(move || {
                    let issue = 100 + i % 4;
                    let body = comment_payload_on(issue, "alice", "/hutch fix the test");
                    let r = d.hook("fix", "issue_comment", &format!("c-{i}"), &body, Some(sign(HOOK_SECRET.as_bytes(), &body)));
                    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
                    (issue, r.json()["run"].as_str().unwrap().to_string())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut most = 0;
    let done = wait_until(Duration::from_secs(1500), || {
        let runs = d.runs(&admin);
        most = most.max(runs.iter().filter(|r| r["state"] == "running").count());
        runs.len() == 10 && runs.iter().all(|r| r["state"] != "queued" && r["state"] != "running")
    });
    assert!(done, "the runs did not all end; {}", d.log());
    assert!(most <= 2, "{most} runs were running at once");
    let runs: Vec<Value> = ids.iter().map(|(_, id)| d.run(&admin, id)).collect();
    for r in &runs {
        assert_eq!(r["state"], "succeeded", "{r}");
    }
    // From the records: never more than two at once, never two of one issue at once.
    let span = |r: &Value| (r["started_ms"].as_i64().unwrap(), r["ended_ms"].as_i64().unwrap());
    for (i, a) in runs.iter().enumerate() {
        let (s1, _) = span(a);
        let active: Vec<usize> = runs.iter().enumerate().filter(|(_, b)| { let (s2, e2) = span(b); s2 <= s1 && s1 < e2 }).map(|(j, _)| j).collect();
        assert!(active.len() <= 2, "when run {i} started, {active:?} were running");
        for j in active.into_iter().filter(|j| *j != i) {
            assert_ne!(ids[i].0, ids[j].0, "two runs of issue {} overlapped", ids[i].0);
        }
    }
    assert_eq!(s.net.forge_record().pulls.len(), 10);
}

#[test]
fn a_newer_comment_cancels_the_older_run_and_runs_can_be_cancelled_and_retried() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    let d = Daemon::start(&s.data(), &s.triggers_with(2, FIX, None, "concurrency_key_from = \"issue.number\"\non_conflict = \"cancel\""));
    let cli = |args: &[&str]| hutch().args(args).env("HUTCH_URL", &d.url).env("HUTCH_TOKEN", &admin).output().unwrap();
    let a = d.comment("x-1", "alice", "/hutch hang").json()["run"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(600), || d.run(&admin, &a)["first_output_ms"].is_i64()), "{}", d.log());
    let sandbox = d.run(&admin, &a)["sandbox"].as_str().unwrap().to_string();
    // A newer comment on the same issue supersedes the hanging run.
    let b = d.comment("x-2", "alice", "/hutch fix the test").json()["run"].as_str().unwrap().to_string();
    let ra = d.wait_ended(&admin, &a, 120);
    assert_eq!(ra["state"], "cancelled", "{ra}");
    assert!(ra["reason"].as_str().unwrap().contains(&format!("superseded by run {b}")), "{ra}");
    assert!(wait_until(Duration::from_secs(30), || d.store().sandbox(&sandbox).unwrap().unwrap().state == "destroyed"), "the cancelled run's VM is gone");
    let rb = d.wait_ended(&admin, &b, 900);
    assert_eq!(rb["state"], "succeeded", "{rb}");
    // The run's egress: the clone went to the forge's git host.
    let eg = send("GET", &format!("{}/v1/runs/{b}/egress", d.url), Some(&admin), &[], None).json();
    assert!(eg["records"].as_array().unwrap().iter().any(|r| r.to_string().contains(GIT_HOST)), "{eg}");

    // `hutch runs cancel` on a run in its VM; `hutch runs retry` queues it again.
    let c = d.comment("x-3", "alice", "/hutch hang again").json()["run"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(600), || d.run(&admin, &c)["first_output_ms"].is_i64()), "{}", d.log());
    let out = cli(&["runs", "cancel", &c]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rc = d.run(&admin, &c);
    assert_eq!(rc["state"], "cancelled", "{rc}");
    assert!(rc["reason"].as_str().unwrap().contains("cancelled by token admin"), "{rc}");
    let out = cli(&["runs", "cancel", &c]);
    assert!(!out.status.success() && text(&out.stderr).contains("already ended"), "{}", text(&out.stderr));
    let out = cli(&["runs", "retry", &c]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let retry = text(&out.stdout).trim().to_string();
    assert_eq!(d.run(&admin, &retry)["retry_of"], c.as_str());
    let out = cli(&["runs", "ls"]);
    assert!(text(&out.stdout).contains(&retry) && text(&out.stdout).contains("cancelled"), "{}", text(&out.stdout));
}

#[test]
fn a_generic_webhook_run_that_outlives_its_timeout_is_timed_out_and_its_vm_destroyed() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    let p = s.net.https_port();
    let ca = s.net.ca_file().display().to_string();
    let file = s.dir.path().join("generic.toml");
    std::fs::write(
        &file,
        format!(
            r#"[[trigger]]
name = "ci-failed"
source = "generic"
secret = "HOOK_SECRET"
[trigger.filter]
actions = ["failed"]
[trigger.forge]
api = "https://localhost:{p}"
git = "https://{GIT_HOST}:{p}"
git_from_host = "https://localhost:{p}"
token = "FORGE_TOKEN"
ca_file = "{ca}"
[trigger.job]
repository = "acme/widget"
ref = "main"
command = ["sh", "-c", "echo waiting; sleep 600"]
timeout_secs = 20
[trigger.job.policy]
resolve = ["{GIT_HOST}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
"#
        ),
    )
    .unwrap();
    let d = Daemon::start(&s.data(), &file);
    let post = |body: &[u8], sig: String| send("POST", &format!("{}/hooks/ci-failed", d.url), None, &[("x-hub-signature-256", sig)], Some(body.to_vec()));
    let other = br#"{"action": "passed"}"#;
    let r = post(other, sign(HOOK_SECRET.as_bytes(), other));
    assert_eq!(r.status, 200);
    assert!(r.json()["ignored"].as_str().unwrap().contains("action"), "{}", r.json());
    let body = br#"{"action": "failed", "job": "unit tests"}"#;
    let r = post(body, sign(HOOK_SECRET.as_bytes(), body));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["run"].as_str().unwrap().to_string();
    // Without a delivery header the body's digest is the delivery id: the same body again is a repeat.
    let again = post(body, sign(HOOK_SECRET.as_bytes(), body));
    assert_eq!((again.status, again.json()["duplicate"].clone()), (200, json!(true)));
    let run = d.wait_ended(&admin, &id, 600);
    assert_eq!(run["state"], "timed_out", "{run}");
    assert!(run["reason"].as_str().unwrap().contains("timeout of 20 s"), "{run}");
    let sb = run["sandbox"].as_str().expect("the run had a sandbox").to_string();
    assert!(wait_until(Duration::from_secs(30), || d.store().sandbox(&sb).unwrap().unwrap().state == "destroyed"), "the VM of a timed-out run is destroyed");
    assert!(s.net.forge_record().pushes.is_empty(), "nothing delivered");
}

/// A comment on `OWNER/NAME` (issue 7) for the environment cache test.
fn comment_on_repo(d: &Daemon, delivery: &str, repo: &str) -> String {
    let body = json!({
        "action": "created",
        "issue": { "number": 7, "title": "the test fails", "labels": [] },
        "comment": { "body": "/hutch fix", "user": { "login": "alice" } },
        "repository": { "full_name": repo, "default_branch": "main" },
        "sender": { "login": "alice" },
    })
    .to_string()
    .into_bytes();
    let r = d.hook("fix", "issue_comment", delivery, &body, Some(sign(HOOK_SECRET.as_bytes(), &body)));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    r.json()["run"].as_str().unwrap().to_string()
}

/// A run to its end (it must succeed); its log.
fn finished_run(d: &Daemon, admin: &str, id: &str) -> (Value, String) {
    let run = d.wait_ended(admin, id, 900);
    let logs = send("GET", &format!("{}/v1/runs/{id}/logs", d.url), Some(admin), &[], None);
    let logs = String::from_utf8_lossy(&logs.body).into_owned();
    assert_eq!(run["state"], "succeeded", "{run}\nlogs:\n{logs}\ndaemon:\n{}", d.log());
    (run, logs)
}

/// The value after `prefix` on the log line that starts with it.
fn line_value(logs: &str, prefix: &str) -> String {
    logs.lines().find_map(|l| l.strip_prefix(prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in:\n{logs}")).trim().to_string()
}

/// The 8-digit key prefix a log names after `marker` (`setup: cached (key 1a2b3c4d…`).
fn logged_key(logs: &str, marker: &str) -> Option<String> {
    let at = logs.find(marker)? + marker.len();
    let k: String = logs[at..].chars().take_while(|c| c.is_ascii_hexdigit()).collect();
    (k.len() == 8).then_some(k)
}

fn env_entry(prefix: &str) -> PathBuf {
    let envs = runtime_root().join("envs");
    let found: Vec<PathBuf> = std::fs::read_dir(&envs)
        .expect("envs dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    assert_eq!(found.len(), 1, "one entry for {prefix}: {found:?}");
    found.into_iter().next().unwrap()
}

/// Every file of `dir` that contains `needle` (binary files included).
fn files_with(dir: &Path, needle: &str) -> Vec<String> {
    let o = std::process::Command::new("grep").args(["-rlaF", "-e", needle]).arg(dir).output().expect("grep");
    text(&o.stdout).lines().map(str::to_string).collect()
}

/// A new commit on `main` of the forge's `acme/widget` adding `NEWS.txt` (plumbing in the bare repository).
fn push_news(s: &Setup, content: &str) -> String {
    push_file(s, "NEWS.txt", content)
}

/// A new commit on `main` of the forge's `acme/widget` setting the top-level file `name` to `content`.
fn push_file(s: &Setup, name: &str, content: &str) -> String {
    let wt = s.dir.path().join("news-wt");
    std::fs::create_dir_all(&wt).unwrap();
    std::fs::write(wt.join(name), content).unwrap();
    let wt = wt.display().to_string();
    let g = |args: &[&str]| s.net.forge_git("acme", "widget", args).unwrap_or_else(|e| panic!("git {args:?}: {e}")).trim().to_string();
    g(&["--work-tree", &wt, "read-tree", "main"]);
    g(&["--work-tree", &wt, "add", name]);
    let tree = g(&["write-tree"]);
    let commit = g(&["commit-tree", &tree, "-p", "main", "-m", &format!("change {name}")]);
    g(&["update-ref", "refs/heads/main", &commit]);
    commit
}

/// Triggered runs and the environment cache: the first run of a repository runs the trigger's setup and stores
/// the VM as the setup left it; the second run of that repository does not run the setup (it sees the random id
/// the first setup wrote) and sees the repository's new commit; another repository has an entry of its own; no
/// file of an entry holds the forge token or the setup's placeholder; a corrupted entry is a warning, and the
/// setup runs again in a run that succeeds.
#[test]
fn triggered_runs_of_a_repository_share_its_cached_setup() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    s.net
        .create_forge_repo("acme", "gadget", &[("src/lib.rs", "pub fn answer() -> u32 { 41 }\n"), ("test.sh", "#!/bin/sh\ngrep -q 42 src/lib.rs\n")], FORGE_TOKEN)
        .expect("second forge repo");
    let admin = s.admin_token();
    // A nonce in the setup: a key of this test's own, never an entry of an earlier run of it.
    let nonce = hutch_sandbox::new_id();
    let setup = format!("echo setup-ran {nonce}\necho \"placeholder=$FORGE_TOKEN\"\ncat /proc/sys/kernel/random/uuid > /root/setup-id\n");
    let command = r#"set -e
echo "setup-id=$(cat /root/setup-id)"
echo "news=$(cat NEWS.txt 2>/dev/null || echo none)"
echo "head=$(git rev-parse HEAD)"
echo "event=$(grep -c alice "$HUTCH_EVENT_FILE")"
sed -i s/41/42/ src/lib.rs
git commit -qam "fix the test"
echo done
"#;
    let file = s.triggers_with(2, command, None, &format!("setup = {setup:?}"));
    let text_ = std::fs::read_to_string(&file).unwrap().replace("repositories = [\"acme/widget\"]", "repositories = [\"acme/widget\", \"acme/gadget\"]");
    std::fs::write(&file, text_).unwrap();
    let d = Daemon::start(&s.data(), &file);
    let mut keys = Vec::new();
    let first_output = |run: &Value| run["first_output_ms"].as_i64().unwrap_or(0) - run["created_ms"].as_i64().unwrap_or(0);

    // 1: a miss. The setup runs; the entry is stored.
    let a = comment_on_repo(&d, "e-1", "acme/widget");
    let (run_a, logs_a) = finished_run(&d, &admin, &a);
    assert!(logs_a.contains(&format!("setup-ran {nonce}")), "{logs_a}");
    let key = logged_key(&logs_a, "storing the environment in the cache (key ").unwrap_or_else(|| panic!("not stored:\n{logs_a}"));
    keys.push(key.clone());
    let id_a = line_value(&logs_a, "setup-id=");
    let placeholder = line_value(&logs_a, "placeholder=");
    assert!(placeholder.len() >= 16 && placeholder != FORGE_TOKEN, "{placeholder:?}");
    assert_eq!(line_value(&logs_a, "news="), "none");
    assert_eq!(line_value(&logs_a, "event="), "1", "the command sees the event: {logs_a}");

    // Nothing secret and nothing of the event in the entry.
    let entry = env_entry(&key);
    for needle in [FORGE_TOKEN, placeholder.as_str(), "/hutch fix"] {
        let hits = files_with(&entry, needle);
        assert!(hits.is_empty(), "{needle:?} is in the entry: {hits:?}");
    }

    // 2: a new commit, then a hit: no setup, its files, the new commit.
    let news = push_news(&s, "the second commit\n");
    let b = comment_on_repo(&d, "e-2", "acme/widget");
    let (run_b, logs_b) = finished_run(&d, &admin, &b);
    assert!(!logs_b.contains("setup-ran"), "the setup ran again:\n{logs_b}");
    assert_eq!(logged_key(&logs_b, "setup: cached (key ").as_deref(), Some(key.as_str()), "{logs_b}");
    assert_eq!(line_value(&logs_b, "setup-id="), id_a, "the second run has what the first setup wrote");
    assert_eq!(line_value(&logs_b, "news="), "the second commit");
    assert_eq!(line_value(&logs_b, "head="), news, "the workspace is at the event's ref as it is now");
    let branch = format!("hutch/{b}");
    let delivered = s.net.forge_git("acme", "widget", &["rev-parse", &format!("{branch}~1")]).unwrap();
    assert_eq!(delivered.trim(), news, "the change is delivered on top of the new commit");

    // 3: another repository never shares the entry. Two of its runs at once with its new key: one builds the
    // entry, the other runs the setup without storing (or, had it started later, uses the entry); the entry is
    // whole (a third run starts from it).
    let (c1, c2) = (comment_on_repo(&d, "e-3", "acme/gadget"), comment_on_repo(&d, "e-3b", "acme/gadget"));
    let (_, logs_c1) = finished_run(&d, &admin, &c1);
    let (_, logs_c2) = finished_run(&d, &admin, &c2);
    let stored: Vec<&String> = [&logs_c1, &logs_c2].into_iter().filter(|l| l.contains("storing the environment in the cache (key ")).collect();
    assert_eq!(stored.len(), 1, "one builder:\n{logs_c1}\n---\n{logs_c2}");
    let logs_c = stored[0];
    let other = if std::ptr::eq(logs_c, &logs_c1) { &logs_c2 } else { &logs_c1 };
    assert!(other.contains("another run is building the cached environment") || other.contains("setup: cached (key "), "{other}");
    assert!(logs_c.contains(&format!("setup-ran {nonce}")), "{logs_c}");
    let key_c = logged_key(logs_c, "storing the environment in the cache (key ").unwrap();
    keys.push(key_c.clone());
    assert_ne!(key_c, key);
    assert_ne!(line_value(logs_c, "setup-id="), id_a);
    let c3 = comment_on_repo(&d, "e-3c", "acme/gadget");
    let (_, logs_c3) = finished_run(&d, &admin, &c3);
    assert_eq!(logged_key(&logs_c3, "setup: cached (key ").as_deref(), Some(key_c.as_str()), "{logs_c3}");
    assert_eq!(line_value(&logs_c3, "setup-id="), line_value(logs_c, "setup-id="));

    // 4: a corrupted entry: one warning, the setup runs, the run succeeds (and stores a good entry again).
    let state = entry.join("state");
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    let e = comment_on_repo(&d, "e-4", "acme/widget");
    let (_, logs_e) = finished_run(&d, &admin, &e);
    assert!(logs_e.contains("warning: the cached environment") && logs_e.contains("corrupt"), "{logs_e}");
    assert!(logs_e.contains(&format!("setup-ran {nonce}")), "the setup ran again:\n{logs_e}");
    assert_ne!(line_value(&logs_e, "setup-id="), id_a);
    assert_eq!(line_value(&logs_e, "news="), "the second commit");

    eprintln!("webhook to first output: setup {} ms, cached {} ms", first_output(&run_a), first_output(&run_b));
    for k in keys {
        let out = hutch().args(["cache", "rm", &k]).output().unwrap();
        assert!(out.status.success(), "cache rm {k}: {}", text(&out.stderr));
    }
}

/// Declared inputs (`cache_inputs`) and triggered runs: a commit changing another file still uses the cached
/// setup; a commit changing a declared input runs the setup again (and the command sees its new result) and
/// replaces the entry under the same key, which the next run uses. A declared input absent from the repository
/// stays "absent" and changes nothing. An entry whose record of its inputs is gone is not used.
#[test]
fn a_changed_declared_input_reruns_a_triggered_setup() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    let nonce = hutch_sandbox::new_id();
    // What the setup "installs" is what deps.txt said when it ran.
    let setup = format!("echo setup-ran {nonce}\ncat deps.txt > /root/installed\ncat /proc/sys/kernel/random/uuid > /root/setup-id\n");
    let command = r#"set -e
echo "setup-id=$(cat /root/setup-id)"
echo "installed=$(cat /root/installed)"
echo "deps=$(cat deps.txt)"
echo "news=$(cat NEWS.txt 2>/dev/null || echo none)"
"#;
    push_file(&s, "deps.txt", "left-pad==1\n");
    let extra = format!("setup = {setup:?}\ncache_inputs = [\"deps.txt\", \"web/missing.lock\"]");
    let file = s.triggers_with(1, command, None, &extra);
    let d = Daemon::start(&s.data(), &file);
    let setups = |l: &str| l.matches(&format!("setup-ran {nonce}")).count();

    // 1: a miss: the setup runs and the entry records the inputs (one of them absent).
    let (r1, l1) = finished_run(&d, &admin, &comment_on_repo(&d, "i-1", "acme/widget"));
    assert_eq!(setups(&l1), 1, "{l1}");
    let key = logged_key(&l1, "storing the environment in the cache (key ").unwrap_or_else(|| panic!("not stored:\n{l1}"));
    assert_eq!(line_value(&l1, "installed="), "left-pad==1");
    let record = std::fs::read_to_string(env_entry(&key).join("trigger-inputs.json")).expect("the entry's record of its inputs");
    assert!(record.contains("\"web/missing.lock\":\"absent\"") && record.contains("\"deps.txt\":\""), "{record}");
    let id1 = line_value(&l1, "setup-id=");

    // 2: another file changed: a hit.
    push_news(&s, "news 2\n");
    let (r2, l2) = finished_run(&d, &admin, &comment_on_repo(&d, "i-2", "acme/widget"));
    assert_eq!(setups(&l2), 0, "the setup ran again:\n{l2}");
    assert_eq!(logged_key(&l2, "setup: cached (key ").as_deref(), Some(key.as_str()), "{l2}");
    assert_eq!(line_value(&l2, "setup-id="), id1);
    assert_eq!(line_value(&l2, "news="), "news 2");

    // 3: the declared input changed: one line naming it, the setup runs again, the entry (same key) is replaced.
    push_file(&s, "deps.txt", "left-pad==2\n");
    let (r3, l3) = finished_run(&d, &admin, &comment_on_repo(&d, "i-3", "acme/widget"));
    assert_eq!(setups(&l3), 1, "the setup did not run again:\n{l3}");
    let stale: Vec<&str> = l3.lines().filter(|l| l.contains("is stale at")).collect();
    assert_eq!(stale.len(), 1, "{l3}");
    assert!(stale[0].contains("declared input changed: deps.txt") && !stale[0].contains("missing.lock"), "{}", stale[0]);
    assert_eq!(logged_key(&l3, "storing the environment in the cache (key ").as_deref(), Some(key.as_str()), "{l3}");
    assert_eq!(line_value(&l3, "installed="), "left-pad==2", "the command sees the new setup's result");
    assert_eq!(line_value(&l3, "deps="), "left-pad==2");
    assert_eq!(line_value(&l3, "news="), "news 2");
    let id3 = line_value(&l3, "setup-id=");
    assert_ne!(id3, id1);

    // 4: nothing declared changed since: the replaced entry is used.
    let (r4, l4) = finished_run(&d, &admin, &comment_on_repo(&d, "i-4", "acme/widget"));
    assert_eq!(setups(&l4), 0, "the setup ran again:\n{l4}");
    assert_eq!(logged_key(&l4, "setup: cached (key ").as_deref(), Some(key.as_str()), "{l4}");
    assert_eq!(line_value(&l4, "setup-id="), id3);
    assert_eq!(line_value(&l4, "installed="), "left-pad==2");

    // 5: an entry without its record is stale too: the setup runs and the entry (with a record) is replaced.
    std::fs::remove_file(env_entry(&key).join("trigger-inputs.json")).unwrap();
    let (_, l5) = finished_run(&d, &admin, &comment_on_repo(&d, "i-5", "acme/widget"));
    assert_eq!(setups(&l5), 1, "{l5}");
    assert!(l5.contains("its record of the declared inputs is missing or unreadable"), "{l5}");
    assert!(env_entry(&key).join("trigger-inputs.json").is_file());
    assert!(s.net.forge_record().pushes.is_empty(), "the command changed nothing: nothing delivered");
    let first_output = |run: &Value| run["first_output_ms"].as_i64().unwrap_or(0) - run["created_ms"].as_i64().unwrap_or(0);
    eprintln!(
        "webhook to first output: miss {} ms, hit {} ms, changed input {} ms, hit {} ms",
        first_output(&r1),
        first_output(&r2),
        first_output(&r3),
        first_output(&r4)
    );

    let out = hutch().args(["cache", "rm", &key]).output().unwrap();
    assert!(out.status.success(), "cache rm {key}: {}", text(&out.stderr));
}

/// A run whose setup outlives the trigger's timeout (the setup runs while the VM is still being made ready, inside
/// the daemon's start) is timed out, and its VM is gone: no sandbox left creating or running.
#[test]
fn a_triggered_setup_that_outlives_the_timeout_leaves_no_vm() {
    if !have_vms() {
        return;
    }
    let s = Setup::new();
    let admin = s.admin_token();
    let setup = format!("echo setting-up {}\nsleep 600\n", hutch_sandbox::new_id());
    let file = s.triggers_with(1, "echo never", None, &format!("setup = {setup:?}"));
    let text_ = std::fs::read_to_string(&file).unwrap().replace("timeout_secs = 900", "timeout_secs = 20");
    std::fs::write(&file, text_).unwrap();
    let d = Daemon::start(&s.data(), &file);
    let id = comment_on_repo(&d, "t-1", "acme/widget");
    let run = d.wait_ended(&admin, &id, 600);
    assert_eq!(run["state"], "timed_out", "{run}");
    let logs = send("GET", &format!("{}/v1/runs/{id}/logs", d.url), Some(&admin), &[], None);
    assert!(String::from_utf8_lossy(&logs.body).contains("setting-up"), "the setup was running: {}", String::from_utf8_lossy(&logs.body));
    let live = || ["creating", "running"].iter().map(|st| d.store().sandboxes(None, Some(st)).unwrap().len()).sum::<usize>();
    assert!(wait_until(Duration::from_secs(30), || live() == 0), "a VM outlived its run: {} live; {}", live(), d.log());
    assert!(s.net.forge_record().pushes.is_empty(), "nothing delivered");
}
