//! The stock E2B SDK (PyPI `e2b`, pinned; scripts/test installs it) against a real `hutch serve` with real VMs:
//! tests/e2b_sdk.py drives create, list, commands, files, isolation, timeouts and kill through the SDK's own
//! clients (REST and Connect RPC), and the raw wire checks here hold the E2B error shape for bad input.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SDK_VERSION: &str = "2.63.0";

struct Daemon {
    child: Option<Child>,
    addr: String,
    data: PathBuf,
    _tmp: tempfile::TempDir,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        Self::start_in(tmp, data, args)
    }

    /// A daemon on `data` (a previous daemon's data directory, to test what survives a restart).
    fn start_in(tmp: tempfile::TempDir, data: PathBuf, args: &[&str]) -> Daemon {
        let mut child = hutch()
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
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
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    if let Some(t) = tx.take() {
                        let _ = t.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                    }
                }
                log2.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("the daemon did not start; log:\n{}", log.lock().unwrap()));
        Daemon { child: Some(child), addr, data, _tmp: tmp, log }
    }

    /// A new token, printed in its E2B spelling.
    fn e2b_key(&self, name: &str) -> String {
        let out = hutch().args(["token", "create", "--name", name, "--e2b", "--data-dir"]).arg(&self.data).output().expect("token create");
        assert!(out.status.success(), "token create: {}", text(&out.stderr));
        let key = text(&out.stdout).trim().to_string();
        assert!(key.starts_with("e2b_") && key.len() == 4 + 76, "an e2b_<hex> key: {key}");
        key
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Stops the daemon (SIGTERM, as an operator would) and hands back its data directory.
    fn stop(mut self) -> (tempfile::TempDir, PathBuf, String) {
        self.terminate();
        let log = self.log();
        let tmp = std::mem::replace(&mut self._tmp, tempfile::tempdir().expect("tempdir"));
        (tmp, self.data.clone(), log)
    }

    fn terminate(&mut self) {
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

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The Python that has the pinned SDK, or why there is none.
fn sdk_python() -> Result<String, String> {
    let py = std::env::var("HUTCH_E2B_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&py)
        .args(["-c", "import importlib.metadata as m; print(m.version('e2b'))"])
        .output()
        .map_err(|e| format!("{py} cannot run: {e}"))?;
    let v = text(&out.stdout).trim().to_string();
    if !out.status.success() {
        return Err(format!("the e2b SDK is not installed for {py} (pip install e2b=={SDK_VERSION})"));
    }
    if v != SDK_VERSION {
        return Err(format!("{py} has e2b {v}, not the pinned {SDK_VERSION} (pip install e2b=={SDK_VERSION})"));
    }
    Ok(py)
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b_sdk.py")
}

/// Isolation between tenants too: one key's sandbox is invisible (404) to another key through connect, kill and
/// list, and envd answers only to the sandbox's own access token.
#[test]
fn stock_e2b_sdk_drives_sandboxes_commands_files_timeouts_and_isolation() {
    let py = match sdk_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}; the E2B SDK test needs the stock SDK");
            return;
        }
    };
    let d = Daemon::start(&["--pool", "2", "--max-sandboxes", "6"]);
    let (k1, k2) = (d.e2b_key("e2b-one"), d.e2b_key("e2b-two"));
    let runs = std::env::var("E2B_BENCH_RUNS").unwrap_or_else(|_| "0".into());
    let out = Command::new(py)
        .arg(script())
        .env("E2B_API_URL", d.url())
        .env("E2B_SANDBOX_URL", d.url())
        .env("E2B_API_KEY", &k1)
        .env("OTHER_KEY", &k2)
        .env("E2B_BENCH_RUNS", runs)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_ACCESS_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run the SDK script");
    let so = text(&out.stdout);
    eprintln!("{so}{}", text(&out.stderr));
    assert!(out.status.success() && so.contains("ALL OK"), "the SDK script failed; daemon log:\n{}", d.log());
    for step in ["list by metadata", "non-zero exit raises CommandExitException", "5 MiB binary", "isolation between keys", "set_timeout ends the sandbox"] {
        assert!(so.contains(step), "step {step:?} did not run");
    }
}

fn run_sdk(py: &str, file: &str, d: &Daemon, key: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(file))
        .args(args)
        .env("E2B_API_URL", d.url())
        .env("E2B_SANDBOX_URL", d.url())
        .env("E2B_API_KEY", key)
        .env_remove("E2B_DOMAIN")
        .env_remove("E2B_ACCESS_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run the SDK script");
    let so = text(&out.stdout);
    eprintln!("{so}{}", text(&out.stderr));
    assert!(out.status.success() && so.contains("ALL OK"), "{file} {args:?} failed; daemon log:\n{}", d.log());
    so
}

/// `pause()` and `Sandbox.connect()` (resume) five times with a file and a running process surviving each
/// cycle, then once more across a daemon restart (SIGTERM, new daemon on the same data directory).
#[test]
fn e2b_pause_and_resume_keep_files_and_processes_across_cycles_and_a_restart() {
    let py = match sdk_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}; the E2B SDK test needs the stock SDK");
            return;
        }
    };
    let d = Daemon::start(&["--pool", "1"]);
    let key = d.e2b_key("e2b-pause");
    let so = run_sdk(&py, "e2b_pause.py", &d, &key, &["phase1"]);
    assert!(so.contains("ok: pause/resume cycle 5"), "five cycles ran");
    let line = so.lines().find(|l| l.starts_with("PAUSED ")).expect("the paused sandbox").to_string();
    let f: Vec<&str> = line.split_whitespace().collect();
    let (tmp, data, log1) = d.stop();
    assert!(log1.contains("sandbox paused"), "{log1}");
    let paused_dir = data.join("paused").join(f[1]);
    assert!(paused_dir.join("state").is_file() && paused_dir.join("disk.qcow2").is_file(), "saved state kept across the stop");
    let d = Daemon::start_in(tmp, data.clone(), &["--pool", "0"]);
    let so = run_sdk(&py, "e2b_pause.py", &d, &key, &["phase2", f[1], f[2], f[3]]);
    assert!(so.contains("ok: file and process intact after a daemon restart"));
    assert!(!paused_dir.exists(), "the saved state is gone once resumed and killed");
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

/// Templates: none/`base` is the default image, `agents` (served with `--image agents`) and an alias of it
/// (`--template node=agents`) the agents image, an unknown name E2B's 404.
#[test]
fn e2b_templates_map_to_hutch_images() {
    let py = match sdk_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}; the E2B SDK test needs the stock SDK");
            return;
        }
    };
    let d = Daemon::start(&["--pool", "0", "--image", "agents", "--template", "node=agents"]);
    let key = d.e2b_key("e2b-templates");
    let so = run_sdk(&py, "e2b_templates.py", &d, &key, &[]);
    for step in ["no template: the default image", "template agents", "template node", "unknown template is a 404"] {
        assert!(so.contains(step), "step {step:?} did not run");
    }
}

/// The async SDK's `watch_dir`: a Connect server stream of filesystem events.
#[test]
fn e2b_async_sdk_watch_dir_streams_events() {
    let py = match sdk_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}; the E2B SDK test needs the stock SDK");
            return;
        }
    };
    let d = Daemon::start(&["--pool", "1"]);
    let key = d.e2b_key("e2b-async");
    let so = run_sdk(&py, "e2b_async.py", &d, &key, &[]);
    assert!(so.contains("ok: streamed create, write, recursive create and remove events") && so.contains("ok: stop ends the stream"));
}

const NPM_SDK_VERSION: &str = "2.51.0";

/// Where the pinned npm SDK is installed (`HUTCH_E2B_NODE_MODULES`, set by scripts/test), or why it is not.
fn npm_sdk() -> Result<PathBuf, String> {
    let dir = std::env::var_os("HUTCH_E2B_NODE_MODULES").map(PathBuf::from).ok_or("HUTCH_E2B_NODE_MODULES is not set (scripts/test installs the npm SDK and sets it)")?;
    let pkg = std::fs::read_to_string(dir.join("e2b/package.json")).map_err(|e| format!("no npm e2b in {}: {e}", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&pkg).map_err(|e| format!("e2b/package.json: {e}"))?;
    if v["version"] != NPM_SDK_VERSION {
        return Err(format!("npm e2b is {}, not the pinned {NPM_SDK_VERSION}", v["version"]));
    }
    Command::new("node").arg("--version").output().map_err(|e| format!("node cannot run: {e}"))?;
    Ok(dir)
}

/// The stock npm SDK: create, commands, files, list, kill.
#[test]
fn npm_e2b_sdk_creates_runs_and_moves_files() {
    let modules = match npm_sdk() {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIP: {why}; the npm E2B SDK test needs the stock SDK");
            return;
        }
    };
    let d = Daemon::start(&["--pool", "1"]);
    let key = d.e2b_key("e2b-npm");
    // An ES module resolves packages from its own directory upwards: run a copy beside node_modules.
    let script = modules.parent().unwrap().join(format!("e2b_sdk_{}.mjs", std::process::id()));
    std::fs::copy(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b_sdk.mjs"), &script).unwrap();
    let out = Command::new("node")
        .arg(&script)
        .env("E2B_API_URL", d.url())
        .env("E2B_SANDBOX_URL", d.url())
        .env("E2B_API_KEY", &key)
        .env_remove("E2B_DOMAIN")
        .stdin(Stdio::null())
        .output()
        .expect("run node");
    let _ = std::fs::remove_file(&script);
    let so = text(&out.stdout);
    eprintln!("{so}{}", text(&out.stderr));
    assert!(out.status.success() && so.contains("ALL OK"), "the npm SDK script failed; daemon log:\n{}", d.log());
    for step in ["commands.run with streamed output", "non-zero exit throws CommandExitError", "files write/read/list/exists/remove", "list by metadata"] {
        assert!(so.contains(step), "step {step:?} did not run");
    }
}

/// `get_host`: an HTTP server in the sandbox reached through the daemon, by path prefix and by `<port>-<id>.<domain>`
/// Host header (`--e2b-domain`), for its owner and traffic token only.
#[test]
fn e2b_get_host_reaches_a_server_in_the_sandbox_for_its_owner_only() {
    let py = match sdk_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}; the E2B SDK test needs the stock SDK");
            return;
        }
    };
    let d = Daemon::start(&["--pool", "1", "--e2b-domain", "sbx.e2b.test"]);
    let (k1, k2) = (d.e2b_key("e2b-host"), d.e2b_key("e2b-host-other"));
    let out = Command::new(py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b_host.py"))
        .env("E2B_API_URL", d.url())
        .env("E2B_SANDBOX_URL", d.url())
        .env("E2B_API_KEY", &k1)
        .env("OTHER_KEY", &k2)
        .env("E2B_TEST_DOMAIN", "sbx.e2b.test")
        .env_remove("E2B_DOMAIN")
        .stdin(Stdio::null())
        .output()
        .expect("run the SDK script");
    let so = text(&out.stdout);
    eprintln!("{so}{}", text(&out.stderr));
    assert!(out.status.success() && so.contains("ALL OK"), "e2b_host.py failed; daemon log:\n{}", d.log());
    assert!(so.contains("ok: no credentials, another key or a wrong token get nothing"));
    assert!(so.contains("ok: a <port>-<id>.<domain> Host reaches the server in the sandbox") && so.contains("ok: by host: another key"));
}

/// A raw HTTP/1.1 exchange (Connection: close): status and body.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Bad input through the E2B surface: a 4xx whose body is E2B's `{code, message}` JSON (the SDK crashes on a
/// text body), never a 5xx; envd for a sandbox that is not there (or a wrong access token) is E2B's 502 "was
/// not found", which the SDK turns into SandboxNotRunningException.
#[test]
fn bad_input_gets_e2b_shaped_4xx_errors() {
    let d = Daemon::start(&["--pool", "0"]);
    let key = d.e2b_key("e2b-bad");
    let k = ("X-API-KEY", key.as_str());
    let json = ("Content-Type", "application/json");
    let cases: Vec<(&str, String, Vec<(&str, &str)>, &[u8], u16)> = vec![
        ("POST", "/v2/sandboxes".into(), vec![k, json], b"[1]", 400),
        ("POST", "/v2/sandboxes".into(), vec![k, json], b"{\"templateID\": 5}", 400),
        ("POST", "/v2/sandboxes".into(), vec![k, json], b"{\"templateID\": \"base\", \"timeout\": -1}", 400),
        ("POST", "/v2/sandboxes".into(), vec![k, json], b"{\"templateID\": \"base\", \"timeout\": 99999999}", 400),
        ("POST", "/v2/sandboxes".into(), vec![k, json], b"{\"templateID\": \"base\", \"envVars\": {\"1x\": \"y\"}}", 400),
        ("POST", "/v2/sandboxes".into(), vec![k, json], b"{\"templateID\": \"base\", \"metadata\": {\"e2b.dev/template\": \"y\"}}", 400),
        ("POST", "/v2/sandboxes".into(), vec![k, json], b"{\"templateID\": \"no-such\"}", 404),
        ("POST", "/v2/sandboxes".into(), vec![("X-API-KEY", "e2b_0000")], b"{}", 401),
        ("POST", "/v2/sandboxes".into(), vec![], b"{}", 401),
        ("GET", "/v2/sandboxes?limit=abc".into(), vec![k], b"", 400),
        ("GET", "/v2/sandboxes?state=zombie".into(), vec![k], b"", 400),
        ("GET", "/v2/sandboxes?nextToken=%ff".into(), vec![k], b"", 400),
        ("GET", format!("/sandboxes/{}", "x".repeat(5000)), vec![k], b"", 404),
        ("DELETE", "/sandboxes/aaaaaaaaaaaa".into(), vec![k], b"", 404),
        ("POST", "/sandboxes/aaaaaaaaaaaa/timeout".into(), vec![k, json], b"{\"timeout\": \"x\"}", 400),
        ("POST", "/v2/sandboxes/aaaaaaaaaaaa/connect".into(), vec![k, json], b"{}", 404),
        ("POST", "/process.Process/List".into(), vec![json], b"{}", 400),
        ("POST", "/process.Process/List".into(), vec![json, ("E2b-Sandbox-Id", "aaaaaaaaaaaa")], b"{}", 502),
        ("GET", "/files?path=/etc/passwd".into(), vec![("E2b-Sandbox-Id", "aaaaaaaaaaaa"), ("X-Access-Token", "guess")], b"", 502),
    ];
    for (method, path, headers, body, want) in cases {
        let (status, text) = http(&d.addr, method, &path, &headers, body);
        let shown: String = path.chars().take(60).collect();
        assert_eq!(status, want, "{method} {shown}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {shown}: not JSON ({e}): {text}"));
        assert_eq!(v["code"].as_u64(), Some(want as u64), "{method} {shown}: {text}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {shown}: {text}");
        if want == 502 {
            assert!(v["message"].as_str().unwrap().contains("was not found"), "the SDK's not-found marker: {text}");
        }
    }
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

/// Stores secret `name` (bound to `hosts`) in the daemon's store, the value on stdin as an operator types it.
fn set_secret(d: &Daemon, name: &str, hosts: &str, value: &str) {
    let mut c = hutch()
        .args(["secret", "set", name, "--hosts", hosts, "--data-dir"])
        .arg(&d.data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hutch secret set");
    c.stdin.take().unwrap().write_all(format!("{value}\n").as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "secret set: {}", text(&out.stderr));
}

/// E2B's egress options on Hutch's gateway, through the SDK: `allow_out` names reachable, `deny_out` beating
/// `allow_out`, `allow_internet_access=False` blocking everything, a header `transform` with a stored secret
/// reaching the upstream from the gateway while the VM (its environment, its memory) never holds the value, and
/// unknown secrets or unmappable options refused with a 400. The test net answers on port 443 of a loopback
/// address, pinned for every sandbox by `hutch serve --egress-base`.
#[test]
fn e2b_egress_options_map_onto_the_gateway_and_secret_store() {
    let py = match sdk_python() {
        Ok(p) => p,
        Err(why) => {
            eprintln!("SKIP: {why}; the E2B SDK test needs the stock SDK");
            return;
        }
    };
    let net = hutch_testnet::TestNet::start().expect("testnet");
    let Some(ip) = net.web_addr() else {
        eprintln!("SKIP: the test net cannot bind port 443 here (not root); the E2B egress test needs it");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("egress-base.toml");
    let pins: Vec<String> = ["ok.example.test", "no.example.test", "api.example.test"].iter().map(|n| format!("\"{n}:443:{ip}\"")).collect();
    std::fs::write(&base, format!("resolve = [{}]\nupstream_ca = [\"{}\"]\n", pins.join(", "), net.ca_file().display())).unwrap();
    let d = Daemon::start(&["--pool", "1", "--egress-base", base.to_str().unwrap()]);
    let key = d.e2b_key("e2b-egress");
    let value = format!("e2bsecret-{:016x}", std::process::id() as u64 * 0x9e37_79b9_7f4a_7c15);
    set_secret(&d, "API_TOKEN", "api.example.test", &value);
    let out = Command::new(&py)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2b_egress.py"))
        .env("E2B_API_URL", d.url())
        .env("E2B_SANDBOX_URL", d.url())
        .env("E2B_API_KEY", &key)
        .env("TESTNET_CA", net.ca_file())
        .env("SECRET_VALUE", &value)
        .env_remove("E2B_DOMAIN")
        .stdin(Stdio::null())
        .output()
        .expect("run the SDK script");
    let so = text(&out.stdout);
    eprintln!("{so}{}", text(&out.stderr));
    assert!(out.status.success() && so.contains("ALL OK"), "e2b_egress.py failed; daemon log:\n{}", d.log());
    let seen = net.requests();
    let at = |p: &str| seen.iter().filter(|s| s.path.starts_with(p)).collect::<Vec<_>>();
    assert_eq!(at("/e2b-allowed").len(), 1, "the allowed host was reached once: {seen:?}");
    assert!(at("/e2b-denied").is_empty() && at("/e2b-closed").is_empty() && at("/e2b-address").is_empty(), "a denied request got through: {seen:?}");
    let sent = at("/e2b-header");
    assert_eq!(sent.len(), 1, "{seen:?}");
    assert_eq!(sent[0].header("authorization"), Some(format!("Bearer {value}").as_str()), "the upstream sees the secret from the gateway");
    let own = at("/e2b-own-header");
    assert_eq!(own.len(), 1);
    assert_eq!(own[0].header("authorization"), Some("mine"), "a header the guest set is kept");
    // The VM's memory (its RAM, page cache, processes' environments) never held the value.
    let id = so.lines().find_map(|l| l.strip_prefix("KEEP ")).expect("the kept sandbox").trim().to_string();
    let store = hutch_daemon::store::Store::open(&d.data.join("state.db")).expect("the daemon's database");
    let pid = store.sandbox(&id).unwrap().and_then(|r| r.vmm_pid).expect("the VM's pid") as u32;
    let (found, scanned) = hutch_testnet::process_memory_contains(pid, &[&value]);
    assert!(scanned > 64 << 20, "scanned only {scanned} bytes of the VM");
    assert!(!found[0], "the secret is in the VM's memory");
    let (status, body) = http(&d.addr, "DELETE", &format!("/sandboxes/{id}"), &[("X-API-KEY", key.as_str())], b"");
    assert_eq!(status, 204, "{body}");
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

/// schemathesis (PyPI) against the E2B layer's own document (`/e2b/openapi.json`), as for the native one: no 5xx,
/// every response (E2B's `{code, message}` errors included) matches the document, with real creates, pauses
/// and resumes under the daemon's cap.
#[test]
fn schemathesis_finds_no_server_errors_in_the_e2b_api() {
    let st = if Command::new("schemathesis").arg("--version").output().is_ok() { "schemathesis" } else { "st" };
    if Command::new(st).arg("--version").output().is_err() {
        eprintln!("SKIP: schemathesis is not installed (pip install schemathesis); the E2B API conformance run needs it");
        return;
    }
    let d = Daemon::start(&["--pool", "1", "--max-sandboxes", "2", "--max-ttl", "600"]);
    let key = d.e2b_key("e2b-fuzz");
    let out = Command::new(st)
        .args(["run", &format!("{}/e2b/openapi.json", d.url()), "-H", &format!("X-API-Key: {key}")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance"])
        .args(["--max-examples", "20", "--seed", "1"])
        .env("NO_COLOR", "1")
        .current_dir(d.data.parent().unwrap())
        .output()
        .expect("run schemathesis");
    let report = text(&out.stdout);
    let tail: String = report.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
    eprintln!("{tail}");
    assert!(out.status.success(), "schemathesis found problems:\n{report}\n{}", text(&out.stderr));
    assert!(report.contains("Tested: 9"), "every operation was tested:\n{report}");
    let (status, body) = http(&d.addr, "GET", "/v2/sandboxes", &[("X-API-KEY", key.as_str())], b"");
    assert_eq!(status, 200, "still serving: {body}");
    let log = d.log();
    assert!(log.contains("sandbox running"), "the fuzzing created no real sandbox:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}
