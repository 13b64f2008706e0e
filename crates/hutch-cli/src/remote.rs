//! The service commands: `serve`, local `token`/`secret` administration, and the client commands (`create`,
//! `ls`, `exec`, `shell`, `cp`, `logs`, `rm`, `extend`) that talk to a daemon at `--url`/`$HUTCH_URL` with
//! `$HUTCH_TOKEN`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use hutch_daemon::model::*;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Subcommand)]
pub enum ServiceCmd {
    /// Serve sandboxes over an HTTP API (REST + WebSocket; see /openapi.json).
    Serve(crate::serve::ServeArgs),
    /// Manage the daemon's API tokens (acts on its data directory).
    #[command(subcommand)]
    Token(crate::tokens::TokenCmd),
    /// Manage the daemon's secrets store (acts on its data directory; values never come back out).
    #[command(subcommand)]
    Secret(crate::tokens::SecretCmd),
    /// Create a sandbox on a daemon; prints its id.
    Create(CreateArgs),
    /// List sandboxes on a daemon.
    Ls(LsArgs),
    /// Run a command in a sandbox on a daemon, streaming its output; exits with its code.
    Exec(ExecArgs),
    /// Open an interactive terminal in a sandbox on a daemon.
    Shell(crate::shell::ShellArgs),
    /// Join a sandbox's terminal session, which outlives its clients (`-- CMD` starts one; `~.` detaches).
    Attach(crate::shell::AttachArgs),
    /// Copy a file into or out of a sandbox: `hutch cp LOCAL ID:/path` or `hutch cp ID:/path LOCAL`.
    Cp(CpArgs),
    /// Show a sandbox's egress audit log.
    Logs(LogsArgs),
    /// Destroy sandboxes.
    Rm(RmArgs),
    /// Push back a sandbox's expiry.
    Extend(ExtendArgs),
    /// Event-triggered runs on a daemon (`hutch serve --triggers`): ls, show, logs [-f], cancel, retry.
    #[command(subcommand)]
    Runs(crate::runs::RunsCmd),
}

pub async fn dispatch(c: ServiceCmd) -> anyhow::Result<i32> {
    match c {
        ServiceCmd::Serve(a) => crate::serve::serve(a).await,
        ServiceCmd::Token(c) => crate::tokens::token(c),
        ServiceCmd::Secret(c) => crate::tokens::secret(c),
        ServiceCmd::Create(a) => create(a).await,
        ServiceCmd::Ls(a) => ls(a).await,
        ServiceCmd::Exec(a) => exec(a).await,
        ServiceCmd::Shell(a) => crate::shell::shell(a).await,
        ServiceCmd::Attach(a) => crate::shell::attach(a).await,
        ServiceCmd::Cp(a) => cp(a).await,
        ServiceCmd::Logs(a) => logs(a).await,
        ServiceCmd::Rm(a) => rm(a).await,
        ServiceCmd::Extend(a) => extend(a).await,
        ServiceCmd::Runs(c) => crate::runs::runs(c).await,
    }
}

/// Where the daemon is and how to trust it. The token comes only from the environment, never from argv
/// (which other users can read in `ps`).
#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// The daemon's URL: http(s)://HOST:PORT, or unix:///PATH for its unix socket (your identity is your user;
    /// no token needed).
    #[arg(long, env = "HUTCH_URL", default_value = "http://127.0.0.1:7707", value_parser = parse_url)]
    pub url: String,
    /// Extra CA certificate (PEM) to trust for an https daemon.
    #[arg(long, env = "HUTCH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

pub(crate) fn parse_url(s: &str) -> Result<String, String> {
    if let Some(path) = s.strip_prefix("unix://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(format!("{s:?}: a unix socket URL names an absolute path, as in unix:///run/hutch/hutch.sock"));
        }
        return Ok(s.to_string());
    }
    let u: reqwest::Url = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if u.scheme() != "http" && u.scheme() != "https" {
        return Err(format!("{s:?}: the daemon URL must be http://, https:// or unix://"));
    }
    Ok(s.trim_end_matches('/').to_string())
}

pub fn parse_id(s: &str) -> Result<String, String> {
    if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a sandbox id (12 lowercase hex digits, as printed by `hutch create`)"))
    }
}

pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_secs(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|_| format!("{s:?} is not a whole number of seconds"))?;
    if v == 0 {
        return Err("must be at least 1 second".into());
    }
    Ok(v)
}

/// A client of one daemon.
pub struct Api {
    pub base: String,
    token: String,
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
    /// The daemon's unix socket, when `base` is only the URL's stand-in for it.
    unix: Option<PathBuf>,
}

/// The byte stream under a WebSocket: TCP (perhaps with TLS over it) or the daemon's unix socket.
pub trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientIo for T {}

/// A WebSocket to the daemon.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<Box<dyn ClientIo>>>;

/// What to tell a user whose connection to the daemon's socket `path` failed with `e`.
fn socket_error(path: &Path, e: &std::io::Error) -> anyhow::Error {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::MetadataExt;
            let group = std::fs::metadata(path)
                .ok()
                .and_then(|m| nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid())).ok().flatten())
                .map_or_else(|| "hutch".to_string(), |g| g.name);
            anyhow!(
                "permission denied on the daemon's socket {}: only members of the group {group} may use it (ask an \
                 administrator for `usermod -aG {group} $USER`, then log in again)",
                path.display()
            )
        }
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => anyhow!(
            "no daemon is listening on {} (is it running? `systemctl status hutch`)",
            path.display()
        ),
        _ => anyhow!("cannot connect to the daemon's socket {}: {e}", path.display()),
    }
}

fn tls_config(ca: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(p) = ca {
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(p)
            .with_context(|| format!("cannot read CA certificate {}", p.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad PEM in {}", p.display()))?;
        if certs.is_empty() {
            bail!("{} holds no certificate", p.display());
        }
        for c in certs {
            roots.add(c).with_context(|| format!("unusable CA certificate in {}", p.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

impl Api {
    pub fn new(conn: &Conn) -> anyhow::Result<Api> {
        if let Some(path) = conn.url.strip_prefix("unix://") {
            let path = PathBuf::from(path);
            // Said now, plainly, rather than as the HTTP client's chain of causes.
            std::os::unix::net::UnixStream::connect(&path).map_err(|e| socket_error(&path, &e))?;
            let tls = tls_config(None)?;
            let http = reqwest::Client::builder().unix_socket(path.as_path()).connect_timeout(Duration::from_secs(10)).build().context("HTTP client")?;
            // The kernel tells the daemon who we are; no token goes over the socket.
            return Ok(Api { base: "http://localhost".into(), token: String::new(), http, tls, unix: Some(path) });
        }
        let token = std::env::var("HUTCH_TOKEN").ok().filter(|t| !t.is_empty()).ok_or_else(|| {
            anyhow!("HUTCH_TOKEN is not set; export a token made with `hutch token create --name NAME` on the daemon's host")
        })?;
        let tls = tls_config(conn.ca_cert.as_deref())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("HTTP client")?;
        Ok(Api { base: conn.url.clone(), token, http, tls, unix: None })
    }

    pub(crate) fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        if self.unix.is_some() {
            rb
        } else {
            rb.bearer_auth(&self.token)
        }
    }

    /// Where the daemon is, for messages.
    pub(crate) fn place(&self) -> String {
        self.unix.as_ref().map_or_else(|| self.base.clone(), |p| format!("unix://{}", p.display()))
    }

    /// Sends and turns an error response into its message.
    pub(crate) async fn send(&self, rb: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| anyhow!("cannot reach the daemon at {}: {}", self.place(), hutch_sandbox::error_chain(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let msg = serde_json::from_str::<ErrorBody>(&text).map(|e| e.error).unwrap_or(text);
        Err(anyhow!("{msg} (HTTP {})", status.as_u16()))
    }

    pub async fn json<T: DeserializeOwned>(&self, method: reqwest::Method, path: &str, body: Option<&impl serde::Serialize>) -> anyhow::Result<T> {
        let mut rb = self.req(method, path);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = self.send(rb).await?;
        resp.json::<T>().await.context("the daemon's answer is not what this hutch expects")
    }

    /// Opens an exec WebSocket and sends the StreamExec.
    pub async fn exec_ws(&self, id: &str, spec: &StreamExec) -> anyhow::Result<Ws> {
        self.ws(&format!("/v1/sandboxes/{id}/exec/ws"), spec).await
    }

    /// A WebSocket to `path`, whose first text frame is `first` as JSON.
    pub async fn ws(&self, path: &str, first: &impl serde::Serialize) -> anyhow::Result<Ws> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = format!("{}{path}", self.base.replacen("http", "ws", 1));
        let mut req = url.as_str().into_client_request().context("WebSocket request")?;
        let io: Box<dyn ClientIo> = match &self.unix {
            Some(sock) => Box::new(tokio::net::UnixStream::connect(sock).await.map_err(|e| socket_error(sock, &e))?),
            None => {
                req.headers_mut().insert("authorization", format!("Bearer {}", self.token).parse().context("token header")?);
                let u = reqwest::Url::parse(&self.base).context("the daemon URL")?;
                let host = u.host_str().context("the daemon URL has no host")?.trim_start_matches('[').trim_end_matches(']').to_string();
                let port = u.port_or_known_default().context("the daemon URL has no port")?;
                let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect((host.as_str(), port)))
                    .await
                    .map_err(|_| anyhow!("cannot open a session with the daemon at {}: connecting timed out", self.base))?
                    .map_err(|e| anyhow!("cannot open a session with the daemon at {}: {e}", self.base))?;
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
        };
        let connector = tokio_tungstenite::Connector::Rustls(self.tls.clone());
        let (mut ws, _) = match tokio_tungstenite::client_async_tls_with_config(req, io, None, Some(connector)).await {
            Ok(x) => x,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().to_string();
                let msg = serde_json::from_str::<ErrorBody>(&body).map(|e| e.error).unwrap_or(body);
                bail!("{msg} (HTTP {})", resp.status().as_u16());
            }
            Err(e) => bail!("cannot open a session with the daemon at {}: {e}", self.place()),
        };
        ws.send(Message::Text(serde_json::to_string(first)?.into())).await.context("send the command")?;
        Ok(ws)
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Guest memory in MiB.
    #[arg(long)]
    pub memory: Option<u32>,
    /// Seconds until the daemon destroys it.
    #[arg(long, value_parser = parse_secs)]
    pub ttl: Option<u64>,
    /// Environment variable (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Label (repeatable).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Allow egress to HOST[:PORT] (repeatable); nothing else is reachable.
    #[arg(long = "allow", value_name = "HOST[:PORT]")]
    pub allow: Vec<String>,
    /// A secret from the daemon's store the sandbox may use on its bound hosts (repeatable).
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Put the current git work tree into /workspace (as `hutch run` does); the change of each `hutch attach ID
    /// -- CMD` session is collected when CMD ends, for `hutch diff/apply --from ID`.
    #[arg(long)]
    pub repo: bool,
    /// Run FILE as root before the sandbox is handed out; the daemon keeps its result (environment cache), so a
    /// later create with the same script, setup egress and size starts from it.
    #[arg(long, value_name = "FILE", value_parser = crate::repo::parse_script)]
    pub setup: Option<crate::repo::SetupFile>,
    /// Allow the setup script egress to HOST[:PORT] (repeatable).
    #[arg(long = "setup-allow", value_name = "HOST[:PORT]", requires = "setup")]
    pub setup_allow: Vec<String>,
    /// Run the setup without using or storing the daemon's cached environment.
    #[arg(long, requires = "setup")]
    pub no_cache: bool,
    /// Print the whole record as JSON instead of the id.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn allow_spec(s: &str) -> anyhow::Result<AllowSpec> {
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port: u16 = p.parse().map_err(|_| anyhow!("--allow {s:?}: {p:?} is not a port"))?;
            Ok(AllowSpec { host: h.to_string(), ports: Some(vec![port]), methods: None, paths: None })
        }
        _ => Ok(AllowSpec { host: s.to_string(), ports: None, methods: None, paths: None }),
    }
}

async fn create(a: CreateArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let policy = if a.allow.is_empty() { None } else { Some(PolicySpec { allow: a.allow.iter().map(|s| allow_spec(s)).collect::<Result<_, _>>()? }) };
    let req = CreateSandbox {
        image: None,
        cpus: a.cpus,
        memory_mib: a.memory,
        ttl_secs: a.ttl,
        env: a.env.into_iter().collect(),
        policy,
        secrets: a.secrets,
        secret_headers: Default::default(),
        labels: a.labels.into_iter().collect(),
        setup: match a.setup {
            Some(f) => Some(SetupSpec {
                script: String::from_utf8(f.bytes).map_err(|_| anyhow!("--setup {}: the script is not UTF-8 text", f.name))?,
                policy: if a.setup_allow.is_empty() {
                    None
                } else {
                    Some(PolicySpec { allow: a.setup_allow.iter().map(|s| allow_spec(s)).collect::<Result<_, _>>()? })
                },
                no_cache: a.no_cache,
            }),
            None => None,
        },
    };
    let info: SandboxInfo = if a.repo {
        let (repo, snap) = crate::detach::snapshot_here()?;
        let rc = hutch_daemon::repo::RepoCreate { sandbox: req, snapshot: Some(snap.spec(&repo)), end_with_command: false };
        crate::detach::create_with_repo(&api, &rc, Some(&snap)).await?
    } else {
        api.json(reqwest::Method::POST, "/v1/sandboxes", Some(&req)).await?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("{}", info.id);
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Only this state: creating, running, destroying, destroyed, failed.
    #[arg(long)]
    pub state: Option<String>,
    /// Only sandboxes with this label (repeatable).
    #[arg(long = "label", short = 'l', value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub labels: Vec<(String, String)>,
    /// Include ended sandboxes.
    #[arg(long, short = 'a')]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

fn query(pairs: &[(&str, String)]) -> String {
    let mut s = url_encoded(pairs);
    if !s.is_empty() {
        s.insert(0, '?');
    }
    s
}

fn url_encoded(pairs: &[(&str, String)]) -> String {
    let mut u = reqwest::Url::parse("http://x/").expect("static URL");
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in pairs {
            q.append_pair(k, v);
        }
    }
    u.query().unwrap_or("").to_string()
}

async fn ls(a: LsArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let mut q = vec![];
    if let Some(s) = &a.state {
        if SandboxState::parse(s).is_none() {
            bail!("--state {s:?}: use creating, running, destroying, destroyed or failed");
        }
        q.push(("state", s.clone()));
    }
    if !a.labels.is_empty() {
        q.push(("label", a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")));
    }
    if a.all {
        q.push(("all", "true".into()));
    }
    let list: SandboxList = api.json(reqwest::Method::GET, &format!("/v1/sandboxes{}", query(&q)), None::<&()>).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list.sandboxes)?);
        return Ok(0);
    }
    let now = hutch_daemon::store::now_ms();
    println!("{:<14} {:<11} {:<14} {:>4} {:>7} {:>10}  LABELS", "ID", "STATE", "OWNER", "CPUS", "MEM", "EXPIRES");
    for s in list.sandboxes {
        let left = if s.state.ended() { "-".to_string() } else { format!("{}s", ((s.expires_ms - now) / 1000).max(0)) };
        let labels = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
        println!("{:<14} {:<11} {:<14} {:>4} {:>7} {:>10}  {}", s.id, s.state.as_str(), s.owner, s.cpus, s.memory_mib, left, labels);
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(value_parser = parse_id)]
    pub id: String,
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(long, short = 'w')]
    pub workdir: Option<String>,
    /// Run under a terminal (as `hutch shell` does).
    #[arg(long, short = 't')]
    pub tty: bool,
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

async fn exec(a: ExecArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    if a.tty {
        return crate::shell::interactive(&api, &a.id, a.command, a.env.into_iter().collect(), a.workdir).await;
    }
    let spec = StreamExec { argv: a.command, env: a.env.into_iter().collect(), cwd: a.workdir, tty: None, stdin: None };
    let ws = api.exec_ws(&a.id, &spec).await?;
    let (mut tx, mut rx) = ws.split();
    // SIGINT, SIGTERM and SIGHUP are passed on to the guest process group; the command decides what they mean
    // and its exit status comes back as usual.
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigs = [
        (signal(SignalKind::interrupt()).context("install SIGINT handler")?, libc::SIGINT),
        (signal(SignalKind::terminate()).context("install SIGTERM handler")?, libc::SIGTERM),
        (signal(SignalKind::hangup()).context("install SIGHUP handler")?, libc::SIGHUP),
    ];
    let stdin_task = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        let mut open = true;
        loop {
            let [(int, _), (term, _), (hup, _)] = &mut sigs;
            let msg = tokio::select! {
                r = stdin.read(&mut buf), if open => match r {
                    Ok(0) | Err(_) => {
                        open = false;
                        Message::Text(serde_json::to_string(&ClientMsg::StdinEof).unwrap_or_default().into())
                    }
                    Ok(n) => Message::Binary(buf[..n].to_vec().into()),
                },
                _ = int.recv() => sig_msg(libc::SIGINT),
                _ = term.recv() => sig_msg(libc::SIGTERM),
                _ = hup.recv() => sig_msg(libc::SIGHUP),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let code = loop {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                let (tag, data) = (b[0], &b[1..]);
                if tag == WS_STDERR {
                    stderr.write_all(data).await.context("write to stderr")?;
                    stderr.flush().await.ok();
                } else {
                    stdout.write_all(data).await.context("write to stdout")?;
                    stdout.flush().await.context("write to stdout")?;
                }
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerMsg>(&t) {
                Ok(ServerMsg::Exit { exit_code, .. }) => break exit_code,
                Ok(ServerMsg::Error { message }) => {
                    eprintln!("hutch: {}", hutch_text::escape_lines(message.as_bytes()));
                }
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => {
                eprintln!("hutch: the session ended without an exit status");
                break 125;
            }
            Some(Err(e)) => {
                eprintln!("hutch: the session broke: {e}");
                break 125;
            }
            Some(Ok(_)) => {}
        }
    };
    stdin_task.abort();
    Ok(code)
}

fn sig_msg(signal: i32) -> Message {
    Message::Text(serde_json::to_string(&ClientMsg::Signal { signal }).unwrap_or_default().into())
}

#[derive(Debug, Args)]
pub struct CpArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// LOCAL or ID:/path.
    pub src: String,
    /// LOCAL or ID:/path.
    pub dst: String,
    /// Largest file taken from a sandbox (K, M, G, T: binary units); a larger one is refused and nothing is left.
    #[arg(long = "max-size", value_name = "SIZE", default_value = "1G", value_parser = crate::cli::parse_size)]
    pub max_size: u64,
}

fn remote_path(s: &str) -> Option<(String, String)> {
    let (id, path) = s.split_once(':')?;
    let id = parse_id(id).ok()?;
    Some((id, path.to_string()))
}

async fn cp(a: CpArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    match (remote_path(&a.src), remote_path(&a.dst)) {
        (None, Some((id, guest))) => {
            use std::os::unix::fs::PermissionsExt;
            let local = PathBuf::from(&a.src);
            let file = tokio::fs::File::open(&local).await.with_context(|| format!("cannot open {}", local.display()))?;
            let meta = file.metadata().await?;
            if !meta.is_file() {
                bail!("{} is not a regular file", local.display());
            }
            let mode = format!("{:o}", meta.permissions().mode() & 0o7777);
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let path = format!("/v1/sandboxes/{id}/files{}", query(&[("path", guest), ("mode", mode)]));
            let rb = api.req(reqwest::Method::PUT, &path).header(reqwest::header::CONTENT_LENGTH, meta.len()).body(body);
            api.send(rb).await?;
            Ok(0)
        }
        (Some((id, guest)), None) => {
            let mut local = PathBuf::from(&a.dst);
            if local.is_dir() {
                let name = Path::new(&guest).file_name().ok_or_else(|| anyhow!("{guest:?} has no file name"))?;
                local = local.join(name);
            }
            let dir = local.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
            let resp = api.send(api.req(reqwest::Method::GET, &format!("/v1/sandboxes/{id}/files{}", query(&[("path", guest.clone())])))).await?;
            // Written beside the destination and renamed into place: a failed copy leaves no partial file.
            let tmp = dir.join(format!(".hutch-cp-{}", std::process::id()));
            let r = async {
                let mut f = tokio::fs::File::create(&tmp).await.with_context(|| format!("cannot create {}", tmp.display()))?;
                let mut body = resp.bytes_stream();
                let mut got = 0u64;
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(|e| anyhow!("the download of {guest} broke off: {}", hutch_sandbox::error_chain(&e)))?;
                    got += chunk.len() as u64;
                    // The sandbox chose the file: its size is hostile to this host's disk.
                    if got > a.max_size {
                        bail!("{guest} is larger than --max-size ({} bytes); nothing was written (raise --max-size to take it)", a.max_size);
                    }
                    f.write_all(&chunk).await?;
                }
                f.flush().await?;
                std::fs::rename(&tmp, &local).with_context(|| format!("cannot move into {}", local.display()))?;
                anyhow::Ok(())
            }
            .await;
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r?;
            Ok(0)
        }
        (Some(_), Some(_)) => bail!("copy between two sandboxes is not supported; copy through a local file"),
        (None, None) => bail!("one of SRC and DST must be ID:/path (ID is 12 hex digits)"),
    }
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(value_parser = parse_id)]
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

async fn logs(a: LogsArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let log: EgressLog = api.json(reqwest::Method::GET, &format!("/v1/sandboxes/{}/egress", a.id), None::<&()>).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&log.records)?);
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    for r in &log.records {
        // Each field escaped: names and paths in the log were chosen by the guest.
        let f = |k: &str| {
            let v = r.get(k).and_then(|v| v.as_str().map(str::to_string).or_else(|| Some(v.to_string()))).unwrap_or_default();
            hutch_text::escape(&v).into_owned()
        };
        writeln!(out, "{} {:<5} {:<10} {} {} {} {}", f("time"), f("decision"), f("event"), f("dest"), f("method"), f("path"), f("reason")).ok();
    }
    Ok(0)
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(required = true, value_parser = parse_id)]
    pub ids: Vec<String>,
}

async fn rm(a: RmArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let mut code = 0;
    for id in &a.ids {
        match api.json::<SandboxInfo>(reqwest::Method::DELETE, &format!("/v1/sandboxes/{id}"), None::<&()>).await {
            Ok(_) => println!("destroyed {id}"),
            Err(e) => {
                eprintln!("hutch: {id}: {}", hutch_text::escape_lines(format!("{e:#}").as_bytes()));
                code = 1;
            }
        }
    }
    Ok(code)
}

#[derive(Debug, Args)]
pub struct ExtendArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(value_parser = parse_id)]
    pub id: String,
    /// Seconds to add to its expiry.
    #[arg(long, value_parser = parse_secs)]
    pub by: u64,
}

async fn extend(a: ExtendArgs) -> anyhow::Result<i32> {
    let api = Api::new(&a.conn)?;
    let info: SandboxInfo = api.json(reqwest::Method::POST, &format!("/v1/sandboxes/{}/extend", a.id), Some(&ExtendRequest { seconds: a.by })).await?;
    let left = (info.expires_ms - hutch_daemon::store::now_ms()) / 1000;
    println!("{} expires in {left}s", info.id);
    Ok(0)
}

/// Where `hutch run --daemon` finds the daemon when `$HUTCH_URL` is not set: the system service's socket.
pub const DEFAULT_SOCKET_URL: &str = "unix:///run/hutch/hutch.sock";

/// `hutch run --daemon -- CMD`: the daemon at `$HUTCH_URL` (default [`DEFAULT_SOCKET_URL`]) creates the sandbox,
/// the command runs there with its streams and exit code as in `hutch run`, and the sandbox is destroyed after it,
/// however it ends. For users who cannot build or hold images themselves. Only what the daemon's API carries is
/// accepted; every other flag is refused by name before anything is created.
pub async fn run_via_daemon(a: crate::cli::RunArgs) -> anyhow::Result<i32> {
    let e = &a.egress;
    let refused = [
        ("--copy-in", !a.copy_in.is_empty()),
        ("--copy-out", !a.copy_out.is_empty()),
        ("--policy", e.policy.is_some()),
        ("--resolve", !e.resolve.is_empty()),
        ("--upstream-ca", !e.upstream_ca.is_empty()),
        ("--secret (bind secrets from the daemon's store with `hutch create --secret NAME`)", !e.secret.is_empty()),
        ("--secret-preset", !e.secret_preset.is_empty()),
        ("--inspect-all", e.inspect_all),
        ("--setup-allow", !e.setup_allow.is_empty()),
        ("--setup-secret", !e.setup_secret.is_empty()),
        ("--setup-secret-preset", !e.setup_secret_preset.is_empty()),
        ("--env-file", !e.env_file.is_empty()),
        ("--audit (the daemon keeps the log: `hutch logs ID`)", e.audit.is_some()),
        ("--image agents", a.vm.image != crate::cli::ImageName::Default),
        ("--accel", a.vm.accel.is_some()),
        ("--cold", a.cold),
    ];
    if let Some((flag, _)) = refused.iter().find(|(_, on)| *on) {
        bail!("{flag} is not available with --daemon: run without --daemon, or use `hutch create`, `hutch cp` and `hutch exec`");
    }
    let tty = crate::term::wanted(a.tty, a.no_tty)?;
    let url = std::env::var("HUTCH_URL").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| DEFAULT_SOCKET_URL.into());
    let conn = Conn { url: parse_url(&url).map_err(|e| anyhow!("HUTCH_URL: {e}"))?, ca_cert: std::env::var_os("HUTCH_CA_CERT").map(PathBuf::from) };
    let api = Api::new(&conn)?;
    let policy = if e.allow.is_empty() { None } else { Some(PolicySpec { allow: e.allow.iter().map(|s| allow_spec(s)).collect::<Result<_, _>>()? }) };
    let req = CreateSandbox {
        image: None,
        // The daemon's default size unless asked otherwise (ordinary users get only the sizes it offers).
        cpus: (a.vm.cpus != 1).then_some(a.vm.cpus),
        memory_mib: (a.vm.memory != 512).then_some(a.vm.memory),
        ttl_secs: a.timeout.map(|t| t.as_secs().max(1)),
        env: a.env.iter().cloned().collect(),
        policy,
        secrets: Vec::new(),
        secret_headers: Default::default(),
        labels: [("hutch.run".to_string(), "1".to_string())].into_iter().collect(),
        setup: None,
    };
    let info: SandboxInfo = api.json(reqwest::Method::POST, "/v1/sandboxes", Some(&req)).await?;
    let id = info.id.clone();
    let code = exec(ExecArgs { conn, id: id.clone(), env: Vec::new(), workdir: a.workdir.clone(), tty, command: a.command.clone() }).await;
    // Destroyed whatever the command did (a TTL that already ended it makes this a 404, which is fine).
    let _ = api.json::<SandboxInfo>(reqwest::Method::DELETE, &format!("/v1/sandboxes/{id}"), None::<&()>).await;
    code
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod unix_url_tests {
    use super::*;

    #[test]
    fn unix_urls_name_absolute_paths() {
        assert_eq!(parse_url("unix:///run/hutch/hutch.sock").unwrap(), "unix:///run/hutch/hutch.sock");
        assert!(parse_url("unix://run/hutch.sock").unwrap_err().contains("absolute path"));
        assert!(parse_url("ftp://x").unwrap_err().contains("unix://"));
    }
}
