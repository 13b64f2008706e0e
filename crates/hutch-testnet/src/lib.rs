//! A local "internet" for egress tests: HTTPS and plain HTTP servers on 127.0.0.1 (port 0) with
//! their own test CA, answering every request with what they received, plus a few routes that
//! attacks and benchmarks need (redirects, large bodies, header reflection) and a git smart-HTTP
//! server. It runs on its own thread and runtime, so synchronous tests that drive the `hutch`
//! binary and async tests that use the sandbox library can both start one.

mod procmem;
pub use procmem::process_memory_contains;
mod body;
mod forge;
pub use forge::{ForgeRecord, ForgeRequest, ForgeRoute, IssueComment, PullRequest, PushedRef};
mod git;
pub mod model_api;
mod pki;
mod reflect;
mod ws;
mod routes;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

/// Names the servers' certificate covers unless [`TestNet::start_with_names`] says otherwise.
/// Every `*.example.test` name works, so tests can invent hosts freely.
pub const DEFAULT_NAMES: [&str; 3] = ["example.test", "*.example.test", "localhost"];

/// A python3 script of attack probes for tests to run inside a VM (`python3 probe.py KIND ARGS`):
/// DNS over UDP/TCP with arbitrary label bytes, UDP, TCP, ICMP and raw IP, vsock, raw requests to
/// the guest's proxy, TLS with a chosen SNI and Host through CONNECT or a direct connection, the
/// certificate shown for a name, and a scan of every process's environment, command line and
/// memory and of every file for a value known only by its SHA-256. Exit 0 means the attempt got
/// through, 1 that it was answered with a refusal, 2 that it failed outright.
pub const GUEST_PROBE: &str = include_str!("guest_probe.py");

/// Largest request body the servers read (bigger ones get 413).
pub const MAX_REQUEST_BODY: usize = 64 << 20;

/// Request bodies are recorded up to this many bytes.
pub const MAX_RECORDED_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TestNetError {
    #[error("cannot create the test CA or the server certificate")]
    Pki(#[source] rcgen::Error),
    #[error("cannot build the TLS server configuration")]
    Tls(#[source] rustls::Error),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("git repository name {0:?} must be letters, digits, '-', '_' or '.' and end in .git")]
    BadRepoName(String),
    #[error("the server thread stopped before it was listening")]
    ServerThread,
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestNetError {
    let what = what.into();
    move |source| TestNetError::Io { what, source }
}

/// One request as a server received it.
#[derive(Clone, Debug, Serialize)]
pub struct Seen {
    /// True for the HTTPS server, false for plain HTTP.
    pub tls: bool,
    /// The port the request arrived on (443 and 80 for the web address).
    pub port: u16,
    /// The TLS server name the client sent (HTTPS only).
    pub sni: Option<String>,
    pub method: String,
    /// Path and query as sent.
    pub path: String,
    /// Header names (lowercase) and values (lossy UTF-8), in order.
    pub headers: Vec<(String, String)>,
    /// The body (lossy UTF-8), at most [`MAX_RECORDED_BODY`] bytes.
    pub body: String,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    /// The request target's authority (HTTP/2's `:authority`), when it had one.
    pub authority: Option<String>,
}

impl Seen {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The Host header's name part, lowercase.
    pub fn host(&self) -> Option<String> {
        let h = self.header("host").or(self.authority.as_deref())?;
        let name = match h.rsplit_once(':') {
            Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => h,
        };
        Some(name.to_ascii_lowercase())
    }

    /// True when any header value, the path or the body contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.path.contains(needle)
            || self.body.contains(needle)
            || self.headers.iter().any(|(_, v)| v.contains(needle))
    }
}

/// What every server records; shared between the servers and the test.
#[derive(Default, Debug)]
pub(crate) struct Log {
    pub(crate) requests: Mutex<Vec<Seen>>,
    pub(crate) udp_datagrams: AtomicU64,
    pub(crate) tls_handshakes_failed: AtomicU64,
}

impl Log {
    pub(crate) fn push(&self, seen: Seen) {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(seen);
    }
}

/// The running local internet. Dropping it stops the servers and deletes its files.
pub struct TestNet {
    https: SocketAddr,
    http: SocketAddr,
    udp: SocketAddr,
    web: Option<std::net::IpAddr>,
    ca_pem: String,
    ca_file: PathBuf,
    git_root: PathBuf,
    forge: forge::Forge,
    log: Arc<Log>,
    server: server::Running,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNet")
            .field("https", &self.https)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl TestNet {
    /// Starts the servers with a certificate for [`DEFAULT_NAMES`].
    pub fn start() -> Result<TestNet, TestNetError> {
        TestNet::start_with_names(&DEFAULT_NAMES)
    }

    /// Starts the servers with a certificate for `names` (DNS names, `*.` wildcards allowed).
    pub fn start_with_names(names: &[&str]) -> Result<TestNet, TestNetError> {
        let dir = tempfile::Builder::new()
            .prefix("hutch-testnet-")
            .tempdir()
            .map_err(io_err("cannot create a temporary directory"))?;
        let pki = pki::TestPki::new(names)?;
        let ca_file = dir.path().join("testnet-ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem)
            .map_err(io_err(format!("cannot write {}", ca_file.display())))?;
        let probe = dir.path().join("probe.py");
        std::fs::write(&probe, GUEST_PROBE)
            .map_err(io_err(format!("cannot write {}", probe.display())))?;
        let git_root = dir.path().join("git");
        std::fs::create_dir(&git_root)
            .map_err(io_err(format!("cannot create {}", git_root.display())))?;
        let files_root = dir.path().join("files");
        std::fs::create_dir(&files_root)
            .map_err(io_err(format!("cannot create {}", files_root.display())))?;
        let log = Arc::new(Log::default());
        let forge = forge::Forge::new(dir.path().join("forge"));
        let routes = routes::Routes {
            git_root: git_root.clone(),
            files_root,
            store: Default::default(),
            forge: forge.clone(),
        };
        let server = server::Running::start(pki.server_config.clone(), routes, log.clone())?;
        Ok(TestNet {
            https: server.https,
            http: server.http,
            udp: server.udp,
            web: server.web,
            ca_pem: pki.ca_pem,
            ca_file,
            git_root,
            forge,
            log,
            server,
            dir,
        })
    }

    pub fn https_port(&self) -> u16 {
        self.https.port()
    }

    pub fn http_port(&self) -> u16 {
        self.http.port()
    }

    /// A UDP socket on 127.0.0.1 that counts datagrams (QUIC and other UDP must never arrive).
    pub fn udp_port(&self) -> u16 {
        self.udp.port()
    }

    /// The test CA certificate (PEM): what the servers' certificate chains to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The test CA certificate as a file, for `--upstream-ca`.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A directory that is deleted with the test net.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Files put here are served at `/files/PATH` by both servers (a static site, e.g. a package
    /// repository); other paths under `/files/` are 404.
    pub fn files_dir(&self) -> PathBuf {
        self.dir.path().join("files")
    }

    /// Publishes a flat Debian repository under `/files/debian/` with one package, `hutch-demo` (a script that
    /// prints `hutch-demo 1.0 from the test registry`): the `.deb`, a `Packages` index and a `Release` file
    /// listing the index's digest. For `deb [trusted=yes] https://HOST:PORT/files/debian ./`. Returns the `.deb`.
    pub fn publish_demo_debian_repo(&self) -> PathBuf {
        use std::process::Command;
        let sha256 = |p: &Path| {
            let o = Command::new("sha256sum").arg(p).output().expect("sha256sum");
            String::from_utf8_lossy(&o.stdout).split_whitespace().next().expect("digest").to_string()
        };
        let work = self.dir().join("deb-build");
        let bin = work.join("pkg/usr/bin");
        std::fs::create_dir_all(&bin).expect("mkdir");
        std::fs::create_dir_all(work.join("pkg/DEBIAN")).expect("mkdir");
        std::fs::write(
            work.join("pkg/DEBIAN/control"),
            "Package: hutch-demo\nVersion: 1.0\nArchitecture: all\nMaintainer: Hutch Tests <tests@hutch.invalid>\nDescription: a package served by the test registry\n",
        )
        .expect("control");
        let script = bin.join("hutch-demo");
        std::fs::write(&script, "#!/bin/sh\necho hutch-demo 1.0 from the test registry\n").expect("script");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let repo = self.files_dir().join("debian");
        std::fs::create_dir_all(&repo).expect("mkdir");
        let deb = repo.join("hutch-demo_1.0_all.deb");
        let o = Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(work.join("pkg")).arg(&deb).output().expect("dpkg-deb");
        assert!(o.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&o.stderr));
        let size = std::fs::metadata(&deb).expect("deb").len();
        let packages = format!(
            "Package: hutch-demo\nVersion: 1.0\nArchitecture: all\nMaintainer: Hutch Tests <tests@hutch.invalid>\nInstalled-Size: 1\nFilename: hutch-demo_1.0_all.deb\nSize: {size}\nSHA256: {}\nDescription: a package served by the test registry\n",
            sha256(&deb)
        );
        std::fs::write(repo.join("Packages"), &packages).expect("Packages");
        let date = Command::new("date").arg("-Ru").output().expect("date");
        let release = format!(
            "Origin: hutch-test\nLabel: hutch-test\nSuite: stable\nCodename: hutch\nDate: {}\nArchitectures: all amd64\nSHA256:\n {} {} Packages\n",
            String::from_utf8_lossy(&date.stdout).trim(),
            sha256(&repo.join("Packages")),
            packages.len()
        );
        std::fs::write(repo.join("Release"), release).expect("Release");
        deb
    }

    /// `https://NAME:PORT/PATH` on the HTTPS server (`path` starts with '/').
    pub fn https_url(&self, name: &str, path: &str) -> String {
        format!("https://{name}:{}{path}", self.https.port())
    }

    /// `http://NAME:PORT/PATH` on the plain HTTP server.
    pub fn http_url(&self, name: &str, path: &str) -> String {
        format!("http://{name}:{}{path}", self.http.port())
    }

    /// `hutch run` flags that allow `name` on the HTTPS port and pin it to this server.
    pub fn allow_https(&self, name: &str) -> Vec<String> {
        let p = self.https.port();
        vec![
            "--allow".into(),
            format!("{name}:{p}"),
            "--resolve".into(),
            format!("{name}:{p}:127.0.0.1"),
        ]
    }

    /// `hutch run` flags that allow `name` on the plain HTTP port and pin it to this server.
    pub fn allow_http(&self, name: &str) -> Vec<String> {
        let p = self.http.port();
        vec![
            "--allow".into(),
            format!("{name}:{p}"),
            "--resolve".into(),
            format!("{name}:{p}:127.0.0.1"),
        ]
    }

    /// The loopback address whose ports 443 and 80 serve the same routes, when this process may
    /// bind privileged ports. The gateway treats traffic to 443 and 80 more strictly (it must be
    /// TLS or HTTP, sent at once), so tests of that need it.
    pub fn web_addr(&self) -> Option<std::net::IpAddr> {
        self.web
    }

    /// `hutch run` flags that allow `name` on port 443 and pin it to [`TestNet::web_addr`].
    pub fn allow_web_https(&self, name: &str) -> Option<Vec<String>> {
        let ip = self.web?;
        Some(vec![
            "--allow".into(),
            format!("{name}:443"),
            "--resolve".into(),
            format!("{name}:443:{ip}"),
        ])
    }

    /// `hutch run` flags that allow `name` on port 80 and pin it to [`TestNet::web_addr`].
    pub fn allow_web_http(&self, name: &str) -> Option<Vec<String>> {
        let ip = self.web?;
        Some(vec![
            "--allow".into(),
            format!("{name}:80"),
            "--resolve".into(),
            format!("{name}:80:{ip}"),
        ])
    }

    /// `--upstream-ca FILE` for the test CA.
    pub fn upstream_ca_args(&self) -> Vec<String> {
        vec!["--upstream-ca".into(), self.ca_file.display().to_string()]
    }

    /// `hutch run` flags that put the test CA at /root/testnet-ca.pem and [`GUEST_PROBE`] at
    /// /root/probe.py in the VM. The guest script appends the CA to its trust bundle, as a real
    /// guest trusts public roots: TLS passed through the gateway ends at the test servers.
    pub fn copy_in_args(&self) -> Vec<String> {
        vec![
            "--copy-in".into(),
            format!("{}:/root/testnet-ca.pem", self.ca_file.display()),
            "--copy-in".into(),
            format!(
                "{}:/root/probe.py",
                self.dir.path().join("probe.py").display()
            ),
        ]
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.log
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Requests whose path starts with `prefix`.
    pub fn requests_to(&self, prefix: &str) -> Vec<Seen> {
        self.requests()
            .into_iter()
            .filter(|s| s.path.starts_with(prefix))
            .collect()
    }

    /// Datagrams received on [`TestNet::udp_port`].
    pub fn udp_datagrams(&self) -> u64 {
        self.log.udp_datagrams.load(Ordering::Relaxed)
    }

    /// TLS handshakes that failed on the HTTPS server (e.g. a client that did not trust the CA).
    pub fn tls_handshakes_failed(&self) -> u64 {
        self.log.tls_handshakes_failed.load(Ordering::Relaxed)
    }

    /// Creates a bare repository `name` (e.g. `repo.git`) served at `/NAME` with one commit on
    /// `main` holding `files` (path, content). Pushes over HTTP are accepted.
    pub fn create_git_repo(
        &self,
        name: &str,
        files: &[(&str, &str)],
    ) -> Result<PathBuf, TestNetError> {
        git::create_repo(&self.git_root, name, files, self.dir.path())
    }

    /// Creates a private repository `OWNER/NAME` on the forge with one commit on `main` holding `files`:
    /// git at `/OWNER/NAME.git` (fetch and push) and the REST API at `/repos/OWNER/NAME/...`, each request
    /// only with `token` (the forge module says how it is checked). Returns the bare repository's directory.
    pub fn create_forge_repo(
        &self,
        owner: &str,
        name: &str,
        files: &[(&str, &str)],
        token: &str,
    ) -> Result<PathBuf, TestNetError> {
        self.forge.create_repo(owner, name, files, token, self.dir.path())
    }

    /// `https://HOST:PORT/OWNER/NAME.git`, the forge repository's clone URL under the name `host`.
    pub fn forge_clone_url(&self, host: &str, owner: &str, name: &str) -> String {
        self.https_url(host, &format!("/{owner}/{name}.git"))
    }

    /// `https://HOST:PORT`, the forge's REST API root under the name `host`.
    pub fn forge_api_base(&self, host: &str) -> String {
        self.https_url(host, "")
    }

    /// Everything the forge received so far.
    pub fn forge_record(&self) -> ForgeRecord {
        self.forge.record()
    }

    /// The next `times` requests of kind `route` (after a good token) are answered with `status`.
    pub fn forge_inject_failure(&self, route: ForgeRoute, status: u16, times: u32) {
        self.forge.inject(route, status, times)
    }

    /// Runs git with `args` in the forge repository `OWNER/NAME` (no configuration read) and returns its
    /// stdout, to look at what was pushed (`log`, `show BRANCH:PATH`, `for-each-ref`).
    pub fn forge_git(&self, owner: &str, name: &str, args: &[&str]) -> Result<String, TestNetError> {
        git::in_repo(&self.forge.repo_dir(owner, name), args, self.dir.path())
    }

    /// The branch heads of repository `name` (`git for-each-ref` output), to check pushes.
    pub fn git_refs(&self, name: &str) -> Result<String, TestNetError> {
        git::refs(&self.git_root, name, self.dir.path())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.server.stop();
    }
}
