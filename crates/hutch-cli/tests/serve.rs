//! `hutch serve` end to end: a real daemon (the real binary, on a loopback port), real tokens, real VMs, and
//! the real client commands. Each test runs its own daemon with its own data directory.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hutch_daemon::model::*;
use serde_json::{json, Value};

/// A running `hutch serve` with its data directory; SIGTERM (then SIGKILL) when dropped.
struct Daemon {
    child: Option<Child>,
    url: String,
    data: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        let mut d = Daemon::start_in(&data, args);
        d._tmp = Some(tmp);
        d
    }

    fn start_in(data: &Path, args: &[&str]) -> Daemon {
        let mut child = hutch()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data)
            .args(args)
            .env("HUTCH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hutch serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
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
        let url = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("the daemon did not start; log:\n{}", log.lock().unwrap()));
        Daemon { child: Some(child), url, data: data.to_path_buf(), _tmp: None, log }
    }

    fn token(&self, name: &str, extra: &[&str]) -> String {
        let out = hutch().args(["token", "create", "--name", name, "--data-dir"]).arg(&self.data).args(extra).output().expect("token create");
        assert!(out.status.success(), "token create: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("child").id()
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The client command with this daemon's URL and `token`.
    fn cli(&self, token: &str) -> Command {
        let mut c = hutch();
        c.env("HUTCH_URL", &self.url).env("HUTCH_TOKEN", token);
        c
    }

    fn store(&self) -> hutch_daemon::store::Store {
        hutch_daemon::store::Store::open(&self.data.join("state.db")).expect("open the daemon's database")
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().expect("running");
        c.kill().expect("SIGKILL");
        c.wait().expect("wait");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

fn client() -> sync_http::Client {
    sync_http::Client::new()
}

/// A tiny synchronous wrapper over reqwest's async client (the tests are plain threads).
mod sync_http {
    pub use self::inner::*;
    mod inner {
        use std::sync::OnceLock;

        fn rt() -> &'static tokio::runtime::Runtime {
            static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
            RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime"))
        }

        pub struct Client(::reqwest::Client);

        pub struct Resp {
            pub status: u16,
            pub body: Vec<u8>,
            pub content_type: String,
        }

        impl Resp {
            pub fn json(&self) -> serde_json::Value {
                serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
            }
            pub fn error(&self) -> String {
                self.json()["error"].as_str().unwrap_or_default().to_string()
            }
        }

        impl Client {
            pub fn new() -> Client {
                Client(::reqwest::Client::builder().build().expect("client"))
            }

            pub fn send(&self, method: &str, url: &str, token: Option<&str>, body: Option<(&str, Vec<u8>)>) -> Resp {
                let method: ::reqwest::Method = method.parse().expect("method");
                let mut rb = self.0.request(method, url);
                if let Some(t) = token {
                    rb = rb.bearer_auth(t);
                }
                if let Some((ct, b)) = body {
                    rb = rb.header("content-type", ct).body(b);
                }
                rt().block_on(async move {
                    let r = rb.send().await.expect("request");
                    let status = r.status().as_u16();
                    let content_type = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                    let body = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                    Resp { status, body, content_type }
                })
            }
        }
    }
}

use sync_http::Resp;

fn get(d: &Daemon, token: &str, path: &str) -> Resp {
    client().send("GET", &format!("{}{path}", d.url), Some(token), None)
}

fn post(d: &Daemon, token: &str, path: &str, body: Value) -> Resp {
    client().send("POST", &format!("{}{path}", d.url), Some(token), Some(("application/json", body.to_string().into_bytes())))
}

fn delete(d: &Daemon, token: &str, path: &str) -> Resp {
    client().send("DELETE", &format!("{}{path}", d.url), Some(token), None)
}

fn create(d: &Daemon, token: &str, body: Value) -> SandboxInfo {
    let r = post(d, token, "/v1/sandboxes", body);
    assert_eq!(r.status, 201, "create: {}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).expect("SandboxInfo")
}

/// The VM behind a sandbox, from the daemon's database: its runtime directory and QEMU pid.
fn vm_of(d: &Daemon, id: &str) -> (PathBuf, Option<u32>) {
    let row = d.store().sandbox(id).expect("db").expect("row");
    let dir = runtime_root().join("sandboxes").join(row.vm_id.expect("vm id"));
    (dir, row.vmm_pid.map(|p| p as u32))
}

fn assert_vm_gone(dir: &Path, pid: Option<u32>) {
    let needle = dir.to_string_lossy().to_string();
    assert!(wait_until(Duration::from_secs(20), || !dir.exists() && processes_mentioning(&needle).is_empty()), "VM {needle} left behind");
    if let Some(p) = pid {
        assert!(wait_until(Duration::from_secs(5), || !Path::new(&format!("/proc/{p}")).exists()
            || std::fs::read(format!("/proc/{p}/cmdline")).map(|c| !c.windows(needle.len()).any(|w| w == needle.as_bytes())).unwrap_or(true)));
    }
}

#[test]
fn full_lifecycle_exec_stdin_signals_extend_delete() {
    let d = Daemon::start(&[]);
    let t = d.token("alice", &[]);
    let sb = create(&d, &t, json!({"labels": {"team": "a", "job": "ci"}, "env": {"GREETING": "hi there"}, "ttl_secs": 300}));
    assert_eq!(sb.state, SandboxState::Running);
    assert_eq!(sb.owner, "alice");
    let (dir, pid) = vm_of(&d, &sb.id);
    assert!(dir.exists() && pid.is_some());

    // get, list with label and state filters
    let got = get(&d, &t, &format!("/v1/sandboxes/{}", sb.id));
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["labels"]["team"], "a");
    let l = get(&d, &t, "/v1/sandboxes?label=team%3Da&state=running").json();
    assert_eq!(l["sandboxes"].as_array().unwrap().len(), 1);
    let l = get(&d, &t, "/v1/sandboxes?label=team%3Db").json();
    assert_eq!(l["sandboxes"].as_array().unwrap().len(), 0);
    let out = d.cli(&t).args(["ls", "--json", "--label", "job=ci"]).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["id"], sb.id.as_str());

    // non-streaming exec: env, stdin, exit code, stderr separate, timeout kills
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["sh", "-c", "read x; echo \"$GREETING $x\"; echo oops >&2; exit 5"], "stdin": "world\n"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!((v["exit_code"].as_i64(), v["stdout"].as_str(), v["stderr"].as_str()), (Some(5), Some("hi there world\n"), Some("oops\n")));
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["sleep", "30"], "timeout_secs": 1})).json();
    assert_eq!((r["timed_out"].as_bool(), r["exit_code"].as_i64(), r["signal"].as_i64()), (Some(true), Some(137), Some(9)));
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["/no/such/program"]})).json();
    assert_eq!(r["exit_code"], 127);

    // streaming exec through the CLI (WebSocket): stdin forwarded, code returned, streams kept apart
    let mut c = d.cli(&t).args(["exec", &sb.id, "--", "sh", "-c", "wc -c; echo to-err >&2; exit 3"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = c.stdin.take().unwrap();
        stdin.write_all(&vec![b'x'; 3 << 20]).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), (3 << 20).to_string());
    assert!(text(&out.stderr).contains("to-err") && !text(&out.stdout).contains("to-err"));

    // Signals: SIGTERM to the client is passed to the guest command over the WebSocket; its handler runs
    // and its own exit code comes back.
    let mut c = d
        .cli(&t)
        .args(["exec", &sb.id, "--", "sh", "-c", "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.1; done"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(c.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    assert_eq!(first, "ready\n");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest, "got-term\n");
    assert_eq!(c.wait().unwrap().code(), Some(3));
    // A process killed by a signal reports 128+N through the streaming path too.
    let out = d.cli(&t).args(["exec", &sb.id, "--", "sh", "-c", "kill -TERM $$"]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(143));

    // SSE exec
    let r = client().send(
        "POST",
        &format!("{}/v1/sandboxes/{}/exec/stream", d.url, sb.id),
        Some(&t),
        Some(("application/json", json!({"argv": ["sh", "-c", "cat; echo e >&2"], "stdin": "via sse"}).to_string().into_bytes())),
    );
    assert_eq!(r.status, 200);
    assert!(r.content_type.starts_with("text/event-stream"));
    let body = text(&r.body);
    assert!(body.contains("event: stdout") && body.contains("event: stderr") && body.contains("event: exit"), "{body}");
    let b64 = base64_of("via sse");
    assert!(body.contains(&b64), "{body}");

    // extend, then delete: the VM and its directory are gone, the record says why
    let before = sb.expires_ms;
    let e = post(&d, &t, &format!("/v1/sandboxes/{}/extend", sb.id), json!({"seconds": 120})).json();
    assert!(e["expires_ms"].as_i64().unwrap() >= before + 120_000);
    let out = d.cli(&t).args(["rm", &sb.id]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_vm_gone(&dir, pid);
    let v = get(&d, &t, &format!("/v1/sandboxes/{}", sb.id)).json();
    assert_eq!(v["state"], "destroyed");
    assert!(v["end_reason"].as_str().unwrap().contains("deleted by token alice"));
    let r = delete(&d, &t, &format!("/v1/sandboxes/{}", sb.id));
    assert_eq!(r.status, 409, "a second delete is a conflict, not a crash");
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["true"]}));
    assert_eq!(r.status, 409);
    assert!(r.error().contains("destroyed"));
    // metrics reflect it (class 20: for an admin token only)
    let r = get(&d, &t, "/metrics");
    assert_eq!(r.status, 403, "an ordinary token does not read metrics: {}", text(&r.body));
    let admin = d.token("ops", &["--admin"]);
    let m = text(&get(&d, &admin, "/metrics").body);
    assert!(m.contains("hutch_sandboxes{state=\"destroyed\"} 1"), "{m}");
    assert!(m.contains("hutch_sandbox_creates_total 1"), "{m}");
    assert!(m.contains("hutch_sandbox_restore_seconds_count 1") || m.contains("hutch_sandbox_boot_seconds_count 1"), "{m}");
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn streaming_exec_of_large_output_is_complete_and_in_order() {
    let d = Daemon::start(&[]);
    let t = d.token("big", &[]);
    let sb = create(&d, &t, json!({}));
    // ~39 MB on stdout and ~1 MB on stderr, concurrently, over the WebSocket.
    let t0 = Instant::now();
    let out = d.cli(&t).args(["exec", &sb.id, "--", "sh", "-c", "seq 1 150000 >&2 & seq 1 5000000; wait"]).stdin(Stdio::null()).output().unwrap();
    let took = t0.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr[..out.stderr.len().min(400)]));
    let want = Command::new("seq").args(["1", "5000000"]).output().unwrap().stdout;
    assert_eq!(out.stdout.len(), want.len());
    assert!(out.stdout == want, "stdout differs");
    let want_err = Command::new("seq").args(["1", "150000"]).output().unwrap().stdout;
    assert!(out.stderr == want_err, "stderr differs ({} vs {} bytes)", out.stderr.len(), want_err.len());
    eprintln!("streamed {} MB in {:.2}s ({:.1} MB/s)", want.len() / 1_000_000, took.as_secs_f64(), want.len() as f64 / 1e6 / took.as_secs_f64());
    // The non-streaming exec caps what it keeps and says so.
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["sh", "-c", "head -c 20000000 /dev/zero"]})).json();
    assert_eq!(r["truncated"], true);
}

#[test]
fn files_round_trip_and_guest_paths_are_checked() {
    let d = Daemon::start(&[]);
    let t = d.token("files", &[]);
    let sb = create(&d, &t, json!({}));
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("blob.bin");
    let data: Vec<u8> = (0..(5u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let out = d.cli(&t).args(["cp", src.to_str().unwrap(), &format!("{}:/root/deep/dir/blob.bin", sb.id)]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = tmp.path().join("back.bin");
    let out = d.cli(&t).args(["cp", &format!("{}:/root/deep/dir/blob.bin", sb.id), back.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::read(&back).unwrap() == data, "round trip changed the bytes");
    let sum = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["sha256sum", "/root/deep/dir/blob.bin"]})).json();
    let host_sum = text(&Command::new("sha256sum").arg(&src).output().unwrap().stdout);
    assert_eq!(sum["stdout"].as_str().unwrap().split_whitespace().next(), host_sum.split_whitespace().next());

    let base = format!("/v1/sandboxes/{}/files", sb.id);
    // stat, list, mkdir, remove
    let st = get(&d, &t, &format!("{base}/stat?path=/root/deep/dir/blob.bin")).json();
    assert_eq!((st["kind"].as_str(), st["size"].as_u64()), (Some("file"), Some(5 << 20)));
    let m = post(&d, &t, &format!("{base}/mkdir"), json!({"path": "/root/deep/new/sub"}));
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["kind"], "dir");
    let l = get(&d, &t, &format!("{base}/list?path=/root/deep")).json();
    let names: Vec<&str> = l["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["/root/deep/dir", "/root/deep/new"]);
    assert_eq!(post(&d, &t, &format!("{base}/mkdir"), json!({"path": "/root/deep/new", "parents": false})).status, 409);
    assert_eq!(delete(&d, &t, &format!("{base}?path=/root/deep")).status, 409, "non-empty without recursive");
    assert_eq!(delete(&d, &t, &format!("{base}?path=/root/deep&recursive=true")).status, 204);
    assert_eq!(get(&d, &t, &format!("{base}/stat?path=/root/deep")).status, 404);
    assert_eq!(get(&d, &t, &format!("{base}?path=/root/nothing")).status, 404);
    assert_eq!(get(&d, &t, &format!("{base}?path=/root")).status, 400, "a directory is not downloadable");
    // an empty file downloads as empty
    let r = client().send("PUT", &format!("{}{base}?path=/root/empty", d.url), Some(&t), Some(("application/octet-stream", vec![])));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let e = get(&d, &t, &format!("{base}?path=/root/empty"));
    assert_eq!((e.status, e.body.len()), (200, 0));

    // traversal and malformed paths: 400 with a message, before anything runs
    for bad in ["/root/../../etc/passwd", "../etc/passwd", "relative/path", "", "/a%00b"] {
        for (m, p) in [("GET", format!("{base}?path={bad}")), ("GET", format!("{base}/list?path={bad}")), ("GET", format!("{base}/stat?path={bad}")), ("DELETE", format!("{base}?path={bad}"))] {
            let r = client().send(m, &format!("{}{p}", d.url), Some(&t), None);
            assert_eq!(r.status, 400, "{m} {p}: {}", String::from_utf8_lossy(&r.body));
            assert!(!r.error().is_empty());
        }
    }
    let r = client().send("PUT", &format!("{}{base}?path=/root/../../x", d.url), Some(&t), Some(("application/octet-stream", b"x".to_vec())));
    assert_eq!(r.status, 400);
    assert!(r.error().contains(".."), "{}", r.error());
    assert!(!Path::new("/x").exists());
    assert_eq!(delete(&d, &t, &format!("{base}?path=/&recursive=true")).status, 400);
}

#[test]
fn token_isolation() {
    let d = Daemon::start(&[]);
    let a = d.token("a", &[]);
    let b = d.token("b", &[]);
    let admin = d.token("root", &["--admin"]);
    let sb = create(&d, &a, json!({"labels": {"owner": "a"}}));
    let p = format!("/v1/sandboxes/{}", sb.id);
    // B cannot see it, exec in it, touch its files, extend or delete it: all the same 404 as a missing one.
    assert_eq!(get(&d, &b, &p).status, 404);
    assert_eq!(post(&d, &b, &format!("{p}/exec"), json!({"argv": ["true"]})).status, 404);
    assert_eq!(get(&d, &b, &format!("{p}/files?path=/etc/hostname")).status, 404);
    assert_eq!(post(&d, &b, &format!("{p}/extend"), json!({"seconds": 5})).status, 404);
    assert_eq!(get(&d, &b, &format!("{p}/egress")).status, 404);
    assert_eq!(delete(&d, &b, &p).status, 404);
    assert_eq!(get(&d, &b, "/v1/sandboxes?all=true").json()["sandboxes"].as_array().unwrap().len(), 0);
    let out = d.cli(&b).args(["exec", &sb.id, "--", "true"]).stdin(Stdio::null()).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    let out = d.cli(&b).args(["rm", &sb.id]).output().unwrap();
    assert!(!out.status.success());
    // Still alive for A; an admin sees and may act on it.
    let r = post(&d, &a, &format!("{p}/exec"), json!({"argv": ["true"]}));
    assert_eq!(r.json()["exit_code"], 0);
    assert_eq!(get(&d, &admin, "/v1/sandboxes").json()["sandboxes"].as_array().unwrap().len(), 1);
    // No token, a bad token, a revoked token: 401.
    assert_eq!(client().send("GET", &format!("{}/v1/sandboxes", d.url), None, None).status, 401);
    assert_eq!(get(&d, "hutch_000000000000_00", "/v1/sandboxes").status, 401);
    let out = hutch().args(["token", "revoke", "b", "--data-dir"]).arg(&d.data).output().unwrap();
    assert!(out.status.success());
    assert_eq!(get(&d, &b, "/v1/sandboxes").status, 401);
    assert_eq!(delete(&d, &admin, &p).status, 200);
}

#[test]
fn ttl_expiry_destroys_the_sandbox() {
    let d = Daemon::start(&[]);
    let t = d.token("ttl", &[]);
    let sb = create(&d, &t, json!({"ttl_secs": 2}));
    let (dir, pid) = vm_of(&d, &sb.id);
    let p = format!("/v1/sandboxes/{}", sb.id);
    assert!(wait_until(Duration::from_secs(30), || get(&d, &t, &p).json()["state"] == "destroyed"), "not expired: {}", text(&get(&d, &t, &p).body));
    assert_eq!(get(&d, &t, &p).json()["end_reason"], "ttl expired");
    assert_vm_gone(&dir, pid);
    // Extending past the maximum is refused with the limit named.
    let sb = create(&d, &t, json!({"ttl_secs": 60}));
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/extend", sb.id), json!({"seconds": 10_000_000}));
    assert_eq!(r.status, 400);
    assert!(r.error().contains("86400"), "{}", r.error());
    let r = post(&d, &t, "/v1/sandboxes", json!({"ttl_secs": 10_000_000}));
    assert_eq!(r.status, 400);
}

#[test]
fn kill_9_then_restart_leaves_no_orphans_and_a_true_database() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_in(&data, &[]);
    let t = d.token("k", &[]);
    let a = create(&d, &t, json!({}));
    let b = create(&d, &t, json!({}));
    let vms = [vm_of(&d, &a.id), vm_of(&d, &b.id)];
    let daemon_pid = d.pid();
    d.kill9();
    assert!(!Path::new(&format!("/proc/{daemon_pid}")).exists() || std::fs::read_to_string(format!("/proc/{daemon_pid}/stat")).map(|s| s.contains(") Z")).unwrap_or(true));
    // The database still says running: nothing corrected it yet.
    let store = hutch_daemon::store::Store::open(&data.join("state.db")).unwrap();
    assert_eq!(store.unfinished().unwrap().len(), 2);
    drop(store);
    let d2 = Daemon::start_in(&data, &[]);
    assert!(d2.log().contains("2 sandbox(es) marked destroyed"), "{}", d2.log());
    for (dir, pid) in &vms {
        assert_vm_gone(dir, *pid);
    }
    for id in [&a.id, &b.id] {
        let v = get(&d2, &t, &format!("/v1/sandboxes/{id}")).json();
        assert_eq!(v["state"], "destroyed");
        assert!(v["end_reason"].as_str().unwrap().contains("daemon restarted"), "{v}");
    }
    assert!(d2.store().unfinished().unwrap().is_empty());
    assert_eq!(get(&d2, &t, "/v1/sandboxes").json()["sandboxes"].as_array().unwrap().len(), 0);
    // And it serves: a new sandbox works.
    let c = create(&d2, &t, json!({}));
    assert_eq!(post(&d2, &t, &format!("/v1/sandboxes/{}/exec", c.id), json!({"argv": ["echo", "ok"]})).json()["stdout"], "ok\n");
}

#[test]
fn twenty_concurrent_creates_against_a_cap_of_five() {
    let d = Daemon::start(&["--max-sandboxes", "5"]);
    let t = d.token("many", &[]);
    let url = format!("{}/v1/sandboxes", d.url);
    let handles: Vec<_> = (0..20)
        .map(|_| {
            let (url, t) = (url.clone(), t.clone());
            std::thread::spawn(move || client().send("POST", &url, Some(&t), Some(("application/json", b"{}".to_vec()))))
        })
        .collect();
    let results: Vec<Resp> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let created: Vec<String> = results.iter().filter(|r| r.status == 201).map(|r| r.json()["id"].as_str().unwrap().to_string()).collect();
    let refused: Vec<&Resp> = results.iter().filter(|r| r.status == 429).collect();
    assert_eq!(created.len(), 5, "statuses: {:?}", results.iter().map(|r| r.status).collect::<Vec<_>>());
    assert_eq!(refused.len(), 15);
    for r in &refused {
        assert!(r.error().contains("limit of 5 concurrent sandboxes"), "{}", r.error());
    }
    // Nothing leaked: the refused ones left no rows, dirs or VMs; the database lists exactly the five.
    let store = d.store();
    assert_eq!(store.sandboxes(None, None).unwrap().len(), 5);
    let vms: Vec<_> = created.iter().map(|id| vm_of(&d, id)).collect();
    // Per-token quota: a token limited to 1 gets a clear 429 of its own.
    for id in &created {
        assert_eq!(delete(&d, &t, &format!("/v1/sandboxes/{id}")).status, 200);
    }
    for (dir, pid) in &vms {
        assert_vm_gone(dir, *pid);
    }
    assert!(store.unfinished().unwrap().is_empty());
    let one = d.token("one", &["--max-sandboxes", "1"]);
    let s = create(&d, &one, json!({}));
    let r = post(&d, &one, "/v1/sandboxes", json!({}));
    assert_eq!(r.status, 429);
    assert!(r.error().contains("token one already has 1 of its 1"), "{}", r.error());
    assert_eq!(delete(&d, &one, &format!("/v1/sandboxes/{}", s.id)).status, 200);
}

#[test]
fn bad_input_gets_a_clear_4xx_and_the_daemon_keeps_serving() {
    let d = Daemon::start(&[]);
    let t = d.token("fuzz", &[]);
    let url = |p: &str| format!("{}{p}", d.url);
    let c = client();
    // Method, URL, body (content type, bytes), expected status, text the error must contain.
    type Case<'a> = (&'a str, String, Option<(&'a str, Vec<u8>)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("POST", url("/v1/sandboxes"), Some(("application/json", b"{not json".to_vec())), 400, "JSON"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"cpus": 1, "bogus": true}"#.to_vec())), 400, "unknown field `bogus`"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"cpus": "two"}"#.to_vec())), 400, "cpus"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"cpus": 99}"#.to_vec())), 400, "cpus must be"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"memory_mib": 1}"#.to_vec())), 400, "memory_mib"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"env": {"1BAD": "x"}}"#.to_vec())), 400, "not a valid variable name"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"image": "ubuntu"}"#.to_vec())), 400, "unknown"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"secrets": ["NOPE"]}"#.to_vec())), 400, "not in the daemon's store"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"policy": {"allow": [{"host": "*"}]}}"#.to_vec())), 400, "policy"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", br#"{"labels": {"bad key": "v"}}"#.to_vec())), 400, "labels"),
        ("POST", url("/v1/sandboxes"), Some(("text/plain", b"{}".to_vec())), 415, "Content-Type"),
        ("POST", url("/v1/sandboxes"), Some(("application/json", vec![b' '; 3 << 20])), 413, "limit"),
        ("GET", url("/v1/sandboxes/zzz"), None, 400, "not a sandbox id"),
        ("GET", url("/v1/sandboxes/../../etc/passwd"), None, 404, "no such endpoint"),
        ("GET", url("/v1/sandboxes/0123456789ab"), None, 404, "no sandbox"),
        ("DELETE", url("/v1/sandboxes/0123456789ab"), None, 404, "no sandbox"),
        ("GET", url("/v1/sandboxes?state=sleeping"), None, 400, "state"),
        ("GET", url("/v1/sandboxes?label=novalue"), None, 400, "key=value"),
        ("GET", url("/v1/sandboxes?colour=red"), None, 400, "colour"),
        ("POST", url("/v1/sandboxes/0123456789ab/exec"), Some(("application/json", br#"{"argv": []}"#.to_vec())), 400, "argv is empty"),
        ("POST", url("/v1/sandboxes/0123456789ab/extend"), Some(("application/json", br#"{"seconds": -1}"#.to_vec())), 400, "seconds"),
        ("PATCH", url("/v1/sandboxes"), None, 405, "method not allowed"),
        ("GET", url("/nope"), None, 404, "no such endpoint"),
    ];
    for (m, u, body, status, needle) in cases {
        // A fresh connection per case: after a 413 the server closes the connection it has not read to the
        // end, and a pooled client could race that close with its next request.
        let r = client().send(m, &u, Some(&t), body);
        assert_eq!(r.status, status, "{m} {u}: {}", String::from_utf8_lossy(&r.body));
        assert!(r.content_type.starts_with("application/json"), "{m} {u}: {}", r.content_type);
        assert!(r.error().contains(needle), "{m} {u}: {:?} lacks {needle:?}", r.error());
    }
    let h = c.send("GET", &url("/healthz"), None, None);
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    // The OpenAPI document is generated and served, and names every endpoint.
    let doc = c.send("GET", &url("/openapi.json"), None, None).json();
    for p in ["/v1/sandboxes", "/v1/sandboxes/{id}", "/v1/sandboxes/{id}/exec", "/v1/sandboxes/{id}/exec/stream", "/v1/sandboxes/{id}/files", "/v1/sandboxes/{id}/egress", "/metrics", "/healthz"] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
}

#[test]
fn secrets_are_referenced_by_name_and_never_returned() {
    let d = Daemon::start(&[]);
    let t = d.token("s", &[]);
    let value = "ghp_supersecretvalue_0123456789";
    let mut c = hutch().args(["secret", "set", "GH_TOKEN", "--hosts", "api.github.com", "--data-dir"]).arg(&d.data).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(format!("{value}\n").as_bytes()).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = hutch().args(["secret", "ls", "--json", "--data-dir"]).arg(&d.data).output().unwrap();
    assert!(text(&out.stdout).contains("GH_TOKEN") && !text(&out.stdout).contains(value));
    let db = std::fs::read(d.data.join("state.db")).unwrap();
    assert!(!db.windows(value.len()).any(|w| w == value.as_bytes()), "the database holds the value in clear");
    let sb = create(&d, &t, json!({"secrets": ["GH_TOKEN"], "policy": {"allow": [{"host": "api.github.com", "ports": [443]}]}}));
    let v = get(&d, &t, &format!("/v1/sandboxes/{}", sb.id));
    assert!(text(&v.body).contains("GH_TOKEN") && !text(&v.body).contains(value));
    // Inside the guest the variable is a placeholder, never the value.
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["sh", "-c", "env"]}));
    let env = r.json()["stdout"].as_str().unwrap().to_string();
    assert!(!env.contains(value), "the guest saw the value");
    assert!(env.contains("GH_TOKEN="), "no placeholder: {env}");
    // Denied egress is audited and shows in the log.
    post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["sh", "-c", "getent hosts example.com || true"]}));
    let log = get(&d, &t, &format!("/v1/sandboxes/{}/egress", sb.id)).json();
    assert_eq!(log["gateway_attached"], true);
    let all = log.to_string();
    assert!(!all.contains(value));
    let admin = d.token("ops", &["--admin"]);
    let m = text(&get(&d, &admin, "/metrics").body);
    assert!(m.contains("hutch_gateway_denials_total"), "{m}");
    eprintln!("egress log: {all}");
}

/// `secret_headers` (a header the gateway adds from a stored secret) may only narrow the secret's stored
/// binding: a host outside it, a secret not in `secrets`, or a value without `{value}` is a 400 naming the field,
/// before any VM starts.
#[test]
fn secret_headers_only_narrow_the_stored_binding() {
    let d = Daemon::start(&["--pool", "0"]);
    let t = d.token("sh", &[]);
    let mut c = hutch().args(["secret", "set", "GH_TOKEN", "--hosts", "*.github.com", "--data-dir"]).arg(&d.data).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(b"ghp_supersecretvalue_0123456789\n").unwrap();
    }
    assert!(c.wait_with_output().unwrap().status.success());
    let header = |hosts: Value, value: &str| json!({"header": "Authorization", "value": value, "hosts": hosts});
    for (body, want) in [
        (json!({"secrets": ["GH_TOKEN"], "secret_headers": {"GH_TOKEN": header(json!(["github.com"]), "Bearer {value}")}}), "secret_headers.GH_TOKEN.hosts[0]"),
        (json!({"secrets": ["GH_TOKEN"], "secret_headers": {"GH_TOKEN": header(json!(["*.com"]), "Bearer {value}")}}), "secret_headers.GH_TOKEN.hosts[0]"),
        (json!({"secrets": [], "secret_headers": {"GH_TOKEN": header(json!(["api.github.com"]), "Bearer {value}")}}), "secret_headers.GH_TOKEN"),
        (json!({"secrets": ["GH_TOKEN"], "secret_headers": {"GH_TOKEN": header(json!(["api.github.com"]), "Bearer")}}), "{value}"),
        (json!({"secrets": ["GH_TOKEN"], "secret_headers": {"GH_TOKEN": header(json!([]), "Bearer {value}")}}), "secret_headers.GH_TOKEN.hosts"),
    ] {
        let r = post(&d, &t, "/v1/sandboxes", body.clone());
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert_eq!(r.status, 400, "{body}: {text}");
        assert!(text.contains(want), "{body}: {text}");
    }
    assert!(get(&d, &t, "/v1/sandboxes").json()["sandboxes"].as_array().unwrap().is_empty(), "nothing was created");
}

#[test]
fn graceful_shutdown_destroys_sandboxes_and_records_it() {
    let mut d = Daemon::start(&[]);
    let t = d.token("g", &[]);
    let sb = create(&d, &t, json!({}));
    let (dir, pid) = vm_of(&d, &sb.id);
    let st = d.stop();
    assert_eq!(st.code(), Some(0), "{}", d.log());
    assert_vm_gone(&dir, pid);
    let row = d.store().sandbox(&sb.id).unwrap().unwrap();
    assert_eq!((row.state.as_str(), row.end_reason.as_deref()), ("destroyed", Some("the daemon shut down")));
}

#[test]
fn non_loopback_needs_tls_and_https_works_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = hutch().args(["serve", "--listen", "0.0.0.0:0", "--data-dir"]).arg(&data).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("requires TLS"), "{}", text(&out.stderr));
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let out = hutch().args(["serve", "--listen", "0.0.0.0:0", "--tls-cert"]).arg(&cert).arg("--tls-key").arg(&key).arg("--data-dir").arg(&data).output().unwrap();
    assert!(text(&out.stderr).contains("requires API tokens"), "{}", text(&out.stderr));
    let d = Daemon::start_in(&data, &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert!(d.url.starts_with("https://"), "{}", d.url);
    let t = d.token("tls", &[]);
    let url = d.url.replace("127.0.0.1", "localhost");
    let cli = |args: &[&str]| d.cli(&t).env("HUTCH_URL", &url).env("HUTCH_CA_CERT", &cert).args(args).stdin(Stdio::null()).output().unwrap();
    let out = d.cli(&t).env("HUTCH_URL", &url).args(["ls"]).output().unwrap();
    assert!(!out.status.success(), "an unknown CA must fail");
    let out = cli(&["create"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_string();
    let out = cli(&["exec", &id, "--", "echo", "over wss"]);
    assert_eq!(text(&out.stdout), "over wss\n", "{}", text(&out.stderr));
    assert!(cli(&["rm", &id]).status.success());
}

#[test]
fn pty_session_in_tmux_with_ctrl_c_and_resize() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIP: tmux is not installed (apt-get install tmux); the PTY session test needs a real terminal client");
        return;
    }
    let d = Daemon::start(&[]);
    let t = d.token("pty", &[]);
    let sb = create(&d, &t, json!({}));
    let sock = format!("hutch-test-{}", std::process::id());
    let tmux = |args: &[&str]| Command::new("tmux").arg("-L").arg(&sock).args(args).output().expect("tmux");
    let shell_cmd = format!("HUTCH_URL={} HUTCH_TOKEN={} {} shell {}; echo SHELL-EXIT=$?; sleep 30", d.url, t, env!("CARGO_BIN_EXE_hutch"), sb.id);
    let out = tmux(&["new-session", "-d", "-s", "t", "-x", "100", "-y", "30", &shell_cmd]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    struct Kill<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    let _k = Kill(&tmux);
    let screen = || text(&tmux(&["capture-pane", "-p", "-t", "t"]).stdout);
    let wait_for = |needle: &str| wait_until(Duration::from_secs(30), || screen().contains(needle));
    assert!(wait_for("#"), "no prompt: {}", screen());
    tmux(&["send-keys", "-t", "t", "tty; stty size; echo $((6*7))x", "Enter"]);
    assert!(wait_for("42x"), "{}", screen());
    assert!(screen().contains("/dev/pts/"), "a real terminal in the guest: {}", screen());
    assert!(screen().contains("30 100"), "the terminal's size: {}", screen());
    // Ctrl-C reaches the guest's foreground process, not hutch.
    // (bash abandons the rest of a command line whose job died of SIGINT, so the status is asked for after.)
    tmux(&["send-keys", "-t", "t", "sleep 100", "Enter"]);
    std::thread::sleep(Duration::from_millis(800));
    let t0 = Instant::now();
    tmux(&["send-keys", "-t", "t", "C-c"]);
    tmux(&["send-keys", "-t", "t", "echo after-sleep=$?", "Enter"]);
    assert!(wait_for("after-sleep=130"), "{}", screen());
    assert!(t0.elapsed() < Duration::from_secs(60), "the sleep was interrupted, not waited out");
    // Resize reaches it too.
    tmux(&["resize-window", "-t", "t", "-x", "90", "-y", "20"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "-t", "t", "clear; stty size | sed s/^/size=/", "Enter"]);
    assert!(wait_for("size=20 90"), "{}", screen());
    tmux(&["send-keys", "-t", "t", "exit 7", "Enter"]);
    assert!(wait_for("SHELL-EXIT=7"), "{}", screen());
}

/// schemathesis (PyPI) against the generated /openapi.json: no 5xx, and every response matches the document
/// (status codes, content types, headers, bodies). Request-strictness findings are not asserted: some limits
/// are set at run time (e.g. --max-ttl under the schema's 30-day bound), and an ended sandbox's record stays
/// readable on purpose (it says why it ended).
#[test]
fn schemathesis_finds_no_server_errors_and_no_schema_violations() {
    let st = if Command::new("schemathesis").arg("--version").output().is_ok() { "schemathesis" } else { "st" };
    if Command::new(st).arg("--version").output().is_err() {
        eprintln!("SKIP: schemathesis is not installed (pip install schemathesis); the API conformance run needs it");
        return;
    }
    let d = Daemon::start(&["--max-sandboxes", "2", "--default-ttl", "60"]);
    let t = d.token("fuzz", &[]);
    let out = Command::new(st)
        .args(["run", &format!("{}/openapi.json", d.url), "-H", &format!("Authorization: Bearer {t}")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"])
        .args(["--max-examples", "30", "--seed", "1"])
        .env("NO_COLOR", "1")
        .current_dir(d.data.parent().unwrap())
        .output()
        .expect("run schemathesis");
    let report = text(&out.stdout);
    let tail: String = report.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!("{tail}");
    assert!(out.status.success(), "schemathesis found problems:\n{report}\n{}", text(&out.stderr));
    assert!(report.contains("generated"), "schemathesis ran no cases:\n{report}");
    // The daemon is still serving afterwards.
    assert_eq!(client().send("GET", &format!("{}/healthz", d.url), None, None).status, 200);
}

/// schemathesis on the native pause and resume routes, with a real sandbox's id supplied (`[parameters]`), so
/// its stateful phase pauses and resumes a live VM, and in negative mode too: malformed ids and other bad input
/// get a documented 4xx, never a 5xx, and every response matches the document.
#[test]
fn schemathesis_pauses_and_resumes_a_real_sandbox_without_server_errors() {
    let st = if Command::new("schemathesis").arg("--version").output().is_ok() { "schemathesis" } else { "st" };
    if Command::new(st).arg("--version").output().is_err() {
        eprintln!("SKIP: schemathesis is not installed (pip install schemathesis); the API conformance run needs it");
        return;
    }
    let d = Daemon::start(&["--max-sandboxes", "2", "--default-ttl", "600"]);
    let t = d.token("fuzz-pause", &[]);
    let doc = client().send("GET", &format!("{}/openapi.json", d.url), None, None).json();
    for p in ["/v1/sandboxes/{id}/pause", "/v1/sandboxes/{id}/resume"] {
        assert!(doc["paths"][p].get("post").is_some(), "openapi lacks POST {p}");
    }
    let sb = create(&d, &t, json!({}));
    let dir = d.data.parent().unwrap();
    std::fs::write(dir.join("schemathesis.toml"), format!("[parameters]\n\"path.id\" = \"{}\"\n", sb.id)).unwrap();
    let out = Command::new(st)
        .args(["run", &format!("{}/openapi.json", d.url), "-H", &format!("Authorization: Bearer {t}")])
        .args(["--include-path-regex", "/(pause|resume)$", "--mode", "all", "--checks", "all"])
        .args(["--max-examples", "10", "--seed", "1"])
        .env("NO_COLOR", "1")
        .current_dir(dir)
        .output()
        .expect("run schemathesis");
    let report = text(&out.stdout);
    let tail: String = report.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!("{tail}");
    assert!(out.status.success(), "schemathesis found problems:\n{report}\n{}", text(&out.stderr));
    assert!(report.contains("Tested: 2"), "both routes were tested:\n{report}");
    // The id reached the core: the sandbox was paused (and resumed) for real, and it still works.
    let log = d.log();
    assert!(log.contains("sandbox paused"), "never paused a real sandbox:\n{log}");
    let info = get(&d, &t, &format!("/v1/sandboxes/{}", sb.id)).json();
    if info["state"] == "paused" {
        assert_eq!(post(&d, &t, &format!("/v1/sandboxes/{}/resume", sb.id), json!({})).status, 200);
    }
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["echo", "alive"]}));
    assert_eq!(r.json()["stdout"], "alive\n", "{}", String::from_utf8_lossy(&r.body));
}

/// The sandbox directories whose owner record names process `pid` (a daemon's pooled VMs and sandboxes).
fn dirs_owned_by(pid: u32) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(runtime_root().join("sandboxes")) else { return vec![] };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::read_to_string(p.join("owner")).map(|o| o.split_whitespace().next() == Some(&pid.to_string())).unwrap_or(false))
        .collect()
}

fn pool_ready(d: &Daemon, token: &str) -> i64 {
    let m = text(&get(d, token, "/metrics").body);
    m.lines().find_map(|l| l.strip_prefix("hutch_pool_ready ")).and_then(|v| v.trim().parse().ok()).unwrap_or(-1)
}

#[test]
fn warm_pool_serves_creates_refills_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut d = Daemon::start_in(&data, &["--pool", "1", "--sizes", "1x256"]);
    let t = d.token("p", &["--admin"]);
    assert!(wait_until(Duration::from_secs(120), || pool_ready(&d, &t) == 1), "the pool did not fill: {}", d.log());
    let pooled = dirs_owned_by(d.pid());
    assert_eq!(pooled.len(), 1, "one pooled VM: {pooled:?}");
    // A create of the default size is a pool hit, and the sandbox is a fresh one: its own id and identity.
    let sb = create(&d, &t, json!({}));
    assert_eq!(sb.start_mode.as_deref(), Some("warm pool"), "{sb:?}");
    let r = post(&d, &t, &format!("/v1/sandboxes/{}/exec", sb.id), json!({"argv": ["sh", "-c", "echo $HUTCH_SANDBOX_ID"]})).json();
    let (dir, _) = vm_of(&d, &sb.id);
    assert_eq!(r["stdout"].as_str().unwrap().trim(), dir.file_name().unwrap().to_string_lossy());
    // A size the pool does not hold starts the usual way.
    let big = create(&d, &t, json!({"memory_mib": 256}));
    assert_ne!(big.start_mode.as_deref(), Some("warm pool"), "{big:?}");
    // The pool refills in the background.
    assert!(wait_until(Duration::from_secs(120), || pool_ready(&d, &t) == 1), "the pool did not refill");
    // kill -9: the pooled VM outlives the daemon until the next one reaps it.
    let old = d.pid();
    let left = dirs_owned_by(old);
    assert_eq!(left.len(), 3, "two sandboxes and one pooled VM: {left:?}");
    d.kill9();
    let mut d2 = Daemon::start_in(&data, &["--pool", "1", "--sizes", "1x256"]);
    for dir in &left {
        assert_vm_gone(dir, None);
    }
    // A graceful stop drains the new daemon's pool.
    assert!(wait_until(Duration::from_secs(120), || pool_ready(&d2, &t) == 1), "the new pool did not fill");
    let mine = dirs_owned_by(d2.pid());
    assert_eq!(mine.len(), 1);
    assert_eq!(d2.stop().code(), Some(0), "{}", d2.log());
    for dir in &mine {
        assert_vm_gone(dir, None);
    }
}

/// The highest `tick N` the screen shows.
fn last_tick(screen: &str) -> u32 {
    screen.lines().filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok()).max().unwrap_or(0)
}

/// Detach and re-attach through the daemon, in two tmux panes: a counter started with `hutch attach --detach`
/// runs with no client; a client joins and sees it (the replayed output, then live), detaches with `~.`; another
/// pane joins and sees it still counting; with both attached, what one types reaches the program and both see
/// it; the program's exit reaches both.
#[test]
fn terminal_session_outlives_its_clients_replays_and_is_shared() {
    let Some(a) = Tmux::start(100, 30) else { return };
    let Some(b) = Tmux::start(100, 30) else { return };
    let d = Daemon::start(&[]);
    let tok = d.token("attach", &[]);
    let sb = create(&d, &tok, json!({}));
    let prog = r#"i=0; while :; do i=$((i+1)); echo "tick $i"; if read -t 1 l; then echo "typed <$l>"; [ "$l" = quit ] && exit 3; fi; done"#;
    let out = d.cli(&tok).args(["attach", "--detach", &sb.id, "--", "bash", "-c", prog]).stdin(Stdio::null()).output().expect("hutch attach");
    assert!(out.status.success() && text(&out.stderr).contains("started in sandbox"), "{}", text(&out.stderr));
    let started = Instant::now();
    for t in [&a, &b] {
        t.line(&format!("export HUTCH_URL={} HUTCH_TOKEN={}", d.url, tok));
    }
    // Nobody is attached; it counts anyway, and the first client is shown what it missed.
    std::thread::sleep(Duration::from_secs(4));
    let attach = |t: &Tmux| t.line(&format!("{} attach {}; echo EXIT=$?", t.hutch, sb.id));
    attach(&a);
    let h = a.wait_for("tick 3\n", 120);
    assert!(h.contains("tick 1\n"), "the output from before the attach is replayed:\n{h}");
    let seen = last_tick(&a.wait_for(&format!("tick {}\n", last_tick(&h) + 1), 120));
    eprintln!("after {:.1}s, the first client saw tick {seen}", started.elapsed().as_secs_f64());

    // Detach: the client ends (exit 0), the program does not.
    a.keys(&["Enter"]);
    a.type_text("~.");
    let h = a.wait_for("EXIT=0", 120);
    assert!(h.lines().any(|l| l.starts_with("hutch: detached")), "{h}");
    std::thread::sleep(Duration::from_secs(2));
    attach(&b);
    let hb = b.wait_for(&format!("tick {}\n", seen + 2), 120);
    assert!(hb.contains("typed <>"), "the Enter typed before the detach reached the program:\n{hb}");

    // Two clients at once: both see the same output, either can type.
    a.cmd(&["send-keys", "-t", "t", "clear", "Enter"]);
    attach(&a);
    let now = last_tick(&b.history());
    a.wait_for(&format!("tick {}\n", now + 1), 120);
    b.type_text("hello");
    b.keys(&["Enter"]);
    a.wait_for("typed <hello>", 120);
    b.wait_for("typed <hello>", 120);
    a.type_text("quit");
    a.keys(&["Enter"]);
    a.wait_for("EXIT=3", 120);
    b.wait_for("EXIT=3", 120);
}

/// Raises this test process's open-file limit (the flood tests hold over a thousand sockets).
fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < hard.min(8192) {
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();
    }
}

/// Whether the daemon closed `s` (end of file or reset), without waiting.
fn closed_by_peer(s: &std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 512];
    let mut reader = s;
    let r = match reader.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    s.set_nonblocking(false).unwrap();
    r
}

/// Class 20: 1,100 connections without a token (half idle, half stuck in the middle of their headers) cannot
/// lock token holders out: the daemon closes the oldest unauthenticated ones beyond its per-address allowance
/// at once and the rest after the unauthenticated timeout, while a request with a token gets in. An
/// authenticated request whose declared body never arrives fails after the body timeout instead of waiting
/// forever.
#[test]
fn class_20_unauthenticated_connection_flood_does_not_lock_out_token_holders() {
    use std::io::{Read, Write};
    raise_nofile();
    let d = Daemon::start(&["--pool", "0", "--unauthenticated-timeout", "3", "--body-timeout", "2"]);
    let t = d.token("holder", &[]);
    let addr = d.url.trim_start_matches("http://").to_string();
    let mut flood = Vec::new();
    for i in 0..1100 {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET /v1/sandboxes HTTP/1.1\r\nHost: flood\r\nX-Slow: ").unwrap();
        }
        flood.push(s);
    }
    let r = get(&d, &t, "/v1/sandboxes");
    assert_eq!(r.status, 200, "a token holder gets in during the flood: {}", text(&r.body));
    // The flood is held: beyond the per-address allowance (64) connections are closed at once...
    let mut closed = 0;
    assert!(
        wait_until(Duration::from_secs(30), || {
            closed = flood.iter().filter(|s| closed_by_peer(s)).count();
            closed >= 1100 - 64
        }),
        "only {closed} of 1100 flood connections were closed"
    );
    // ...and the rest once they have been idle past the unauthenticated timeout.
    assert!(
        wait_until(Duration::from_secs(60), || {
            closed = flood.iter().filter(|s| closed_by_peer(s)).count();
            closed == 1100
        }),
        "{closed} of 1100 flood connections were closed after the timeout"
    );
    println!("flood of 1100 unauthenticated connections: all closed; the token holder got in");

    // A declared body that never comes: answered (4xx) after the body timeout, not held forever.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "POST /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{").unwrap();
    let mut resp = Vec::new();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => {
                resp.extend_from_slice(&b[..n]);
                if resp.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) => panic!("no answer to a stalled body: {e}"),
        }
    }
    let head = text(&resp);
    assert!(head.starts_with("HTTP/1.1 4"), "a stalled body gets a 4xx: {head:?}");
    assert_eq!(get(&d, &t, "/v1/sandboxes").status, 200, "the daemon keeps serving");
}

/// Class 20: a plain `POST /exec` whose client hangs up stops its command (as WebSocket and SSE sessions do):
/// the guest process is gone after the disconnect.
#[test]
fn class_20_plain_exec_is_cancelled_when_its_client_disconnects() {
    use std::io::Write;
    let d = Daemon::start(&["--pool", "0"]);
    let t = d.token("hangup", &[]);
    let sb = create(&d, &t, json!({}));
    let exec_path = format!("/v1/sandboxes/{}/exec", sb.id);
    let body = json!({"argv": ["sh", "-c", "echo $$ > /tmp/cmd.pid; exec sleep 1000"]}).to_string();
    let mut s = std::net::TcpStream::connect(d.url.trim_start_matches("http://")).unwrap();
    write!(s, "POST {exec_path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let pid = {
        let mut pid = String::new();
        assert!(
            wait_until(Duration::from_secs(60), || {
                let r = post(&d, &t, &exec_path, json!({"argv": ["cat", "/tmp/cmd.pid"]})).json();
                pid = r["stdout"].as_str().unwrap_or_default().trim().to_string();
                !pid.is_empty()
            }),
            "the command did not start"
        );
        pid
    };
    let alive = |d: &Daemon| post(d, &t, &exec_path, json!({"argv": ["kill", "-0", &pid]})).json()["exit_code"] == 0;
    assert!(alive(&d), "the command runs while its client is connected");
    drop(s);
    assert!(wait_until(Duration::from_secs(30), || !alive(&d)), "process {pid} still runs after its client disconnected");
}

/// Class 20: an ordinary token cannot make the daemon build and keep a boot snapshot per size it invents: only
/// the configured sizes are offered (an admin may ask for others, which boot cold), and snapshots the daemon
/// made for sizes no longer offered are pruned when it starts. Also: `/metrics` needs an admin token, and an
/// upload without a body (no Content-Length) or with a mode its owner cannot read is refused.
#[test]
fn class_20_sizes_are_a_configured_set_and_stray_snapshots_are_pruned() {
    // A snapshot directory a daemon made for a size it no longer offers (the daemon's mark and a meta).
    let images = runtime_root().join("images");
    let stray: Vec<PathBuf> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("snapshots").join("0000stray-test"))
        .filter(|p| p.parent().is_some_and(|s| s.is_dir()))
        .collect();
    assert!(!stray.is_empty(), "no image with snapshots under {}", images.display());
    for p in &stray {
        std::fs::create_dir_all(p).unwrap();
        std::fs::write(p.join("made-by-daemon"), b"").unwrap();
        std::fs::write(p.join("meta.json"), r#"{"key":"0000stray-test","image_key":"x","cpus":3,"memory_mib":777,"accel":"tcg","state_sha256":"","memory_bytes":0,"created_unix":0,"boot_ms":0}"#).unwrap();
    }
    let d = Daemon::start(&["--pool", "0", "--sizes", "1x384"]);
    // Every daemon prunes at start, so one started by a test running beside this one may have pruned it first:
    // what counts is that exactly the stray of the daemons' image is gone.
    // Only the daemon's own image is pruned; the strays put beside other images are removed here.
    let pruned = stray.iter().filter(|p| !p.exists()).count();
    for p in &stray {
        let _ = std::fs::remove_dir_all(p);
    }
    assert_eq!(pruned, 1, "the stray snapshot of the daemon's image was pruned, and only that: {}", d.log());

    let t = d.token("plain", &[]);
    let admin = d.token("root", &["--admin"]);
    let r = post(&d, &t, "/v1/sandboxes", json!({"memory_mib": 1024}));
    assert_eq!(r.status, 400, "{}", text(&r.body));
    assert!(r.error().contains("not offered") && r.error().contains("1x384") && r.error().contains("1x512"), "{}", r.error());
    let r = post(&d, &t, "/v1/sandboxes", json!({"cpus": 2, "memory_mib": 512}));
    assert_eq!(r.status, 400, "{}", text(&r.body));
    // An admin may ask for another size; it is not given a snapshot (it boots cold, and stays without one).
    let odd = create(&d, &admin, json!({"memory_mib": 320}));
    assert_eq!(odd.start_mode.as_deref(), Some("cold boot"), "{odd:?}");
    // An offered size works for anyone.
    let sb = create(&d, &t, json!({"memory_mib": 384}));
    assert_eq!(sb.memory_mib, 384);

    assert_eq!(get(&d, &t, "/metrics").status, 403);
    assert_eq!(get(&d, &admin, "/metrics").status, 200);
    // No body and no Content-Length (sent by hand): an empty file with a sane mode (it used to get mode 0 when
    // asked); a mode its owner cannot read is refused.
    let put_raw = |query: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(d.url.trim_start_matches("http://")).unwrap();
        write!(s, "PUT /v1/sandboxes/{}/files?{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {t}\r\nConnection: close\r\n\r\n", sb.id).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let raw = put_raw("path=/root/empty&mode=0");
    assert!(raw.starts_with("HTTP/1.1 400") && raw.contains("unreadable"), "mode 0 is refused: {raw}");
    let raw = put_raw("path=/root/empty");
    assert!(raw.starts_with("HTTP/1.1 200"), "an upload without a body is an empty file: {raw}");
    let stat: Value = serde_json::from_str(raw.split("\r\n\r\n").nth(1).unwrap_or_default()).unwrap_or_default();
    assert_eq!(stat["mode"], "644", "{raw}");
    assert_eq!(stat["size"].as_u64(), Some(0), "{raw}");

    // No snapshot was made for the admin's odd size.
    std::thread::sleep(Duration::from_secs(2));
    let odd_snaps: Vec<PathBuf> = std::fs::read_dir(&images)
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_dir(e.path().join("snapshots")).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| std::fs::read_to_string(p.join("meta.json")).is_ok_and(|m| m.contains("\"memory_mib\": 320") || m.contains("\"memory_mib\":320")))
        .collect();
    assert!(odd_snaps.is_empty(), "a snapshot for an unlisted size: {odd_snaps:?}");
}

/// The QEMU processes whose command line names a sandbox directory owned (per its owner record, read while it
/// existed) by process `pid`.
fn qemu_of_owner(pid: u32) -> Vec<(u32, PathBuf)> {
    dirs_owned_by(pid)
        .into_iter()
        .flat_map(|dir| processes_mentioning(&dir.to_string_lossy()).into_iter().map(move |p| (p, dir.clone())))
        .filter(|(p, _)| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c.starts_with(b"qemu-system") || c.windows(12).any(|w| w == b"/qemu-system")))
        .collect()
}

/// Class 20: a daemon killed with -9 while a VM is being created (cold boot), restored, or made for the warm
/// pool leaves QEMU running only until the next daemon starts: the VMM's pid is recorded the moment it is
/// spawned, and a VMM whose directory is gone is found by the directory its command line names.
#[test]
fn class_20_kill_9_at_every_start_phase_leaves_no_vmm() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let phases: [(&str, &[&str], Option<Value>); 3] = [
        ("restore", &["--pool", "0"], Some(json!({}))),
        ("cold boot (a size without a snapshot)", &["--pool", "0"], Some(json!({"memory_mib": 272}))),
        ("warm pool refill", &["--pool", "1"], None),
    ];
    for (phase, args, create_body) in phases {
        let mut d = Daemon::start_in(&data, args);
        let admin = d.token(&format!("k{}", phase.len()), &["--admin"]);
        let daemon_pid = d.pid();
        let creating = create_body.map(|body| {
            let url = format!("{}/v1/sandboxes", d.url);
            std::thread::spawn(move || client().send("POST", &url, Some(&admin), Some(("application/json", body.to_string().into_bytes()))).status)
        });
        // Kill the daemon as soon as its QEMU exists: mid-start.
        let mut seen = Vec::new();
        assert!(wait_until(Duration::from_secs(120), || { seen = qemu_of_owner(daemon_pid); !seen.is_empty() }), "{phase}: no QEMU appeared: {}", d.log());
        d.kill9();
        if let Some(c) = creating {
            let _ = c.join();
        }
        let still: Vec<u32> = seen.iter().map(|(p, _)| *p).filter(|p| Path::new(&format!("/proc/{p}")).exists()).collect();
        println!("{phase}: killed the daemon with QEMU {seen:?} starting; {} still running before the restart", still.len());
        let d2 = Daemon::start_in(&data, &["--pool", "0"]);
        for (p, dir) in &seen {
            let gone = wait_until(Duration::from_secs(20), || {
                std::fs::read(format!("/proc/{p}/cmdline")).map(|c| !c.windows(dir.as_os_str().len()).any(|w| w == dir.as_os_str().as_encoded_bytes())).unwrap_or(true)
            });
            assert!(gone, "{phase}: QEMU {p} of {} survived the next daemon's start: {}", dir.display(), d2.log());
            assert!(!dir.exists(), "{phase}: {} left behind", dir.display());
        }
        drop(d2);
    }
}
