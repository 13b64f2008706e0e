//! `hutch serve`: the daemon. Checks where it may listen, takes the data directory's lock, opens the database,
//! settles what a previous daemon left (reconcile), then serves until SIGINT/SIGTERM and destroys every
//! sandbox it owns before exiting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hutch_daemon::server::{check_listen, TlsFiles, DEFAULT_LISTEN};

use hutch_daemon::{Limits, Manager};
use hutch_sandbox::{Host, SandboxConfig};
use tokio::signal::unix::{signal, SignalKind};

use crate::tokens::DataDirArg;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:7707, or none with --unix). Anything but loopback needs
    /// --tls-cert/--tls-key and at least one token.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Also (or, without --listen, only) serve on this unix socket, mode 0660, group --socket-group: each
    /// connecting user is their own identity (the token `USER@unix`, made on first use; root is an admin).
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// The group whose members may connect to --unix.
    #[arg(long, default_value = "hutch", requires = "unix")]
    pub socket_group: String,
    /// PEM certificate chain for HTTPS.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also serve this image (e.g. `agents`) to creates that name it; E2B's template of that name. Repeatable.
    #[arg(long = "image", value_name = "NAME")]
    pub images: Vec<crate::cli::ImageName>,
    /// An E2B template name that means an image: `ALIAS=IMAGE` (IMAGE `default` or one given with --image).
    /// Repeatable.
    #[arg(long = "template", value_name = "ALIAS=IMAGE", value_parser = parse_template_alias)]
    pub templates: Vec<(String, String)>,
    /// A policy file whose `resolve` pins and `upstream_ca` roots go into every sandbox's egress policy (how names
    /// are reached and which upstream roots are trusted: an internal DNS name, a TLS-inspecting proxy's CA).
    /// Allow rules and secrets stay per sandbox.
    #[arg(long, value_name = "FILE")]
    pub egress_base: Option<PathBuf>,
    /// E2B's sandbox domain: requests whose Host is `<port>-<sandbox id>.<DOMAIN>` go to that port in the sandbox
    /// (what the SDK's `get_host` returns; `49983-<id>.<DOMAIN>` is envd). Needs a wildcard DNS record
    /// `*.<DOMAIN>` pointing at this daemon (and a wildcard certificate for HTTPS).
    #[arg(long, value_name = "DOMAIN", value_parser = parse_e2b_domain)]
    pub e2b_domain: Option<String>,
    #[command(flatten)]
    pub dir: DataDirArg,
    /// Sandboxes alive at once, across all tokens (creates beyond it get 429).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_sandboxes: u32,
    /// Sandboxes alive at once per token, unless the token has its own limit (default: --max-sandboxes).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub per_token: Option<u32>,
    /// Lifetime of a sandbox created without ttl_secs, in seconds.
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=2_592_000))]
    pub default_ttl: u64,
    /// Longest lifetime a create or an extend may ask for, in seconds from now.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..=2_592_000))]
    pub max_ttl: u64,
    /// Most vCPUs one sandbox may have.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_cpus: u32,
    /// Most memory (MiB) one sandbox may have.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(128..=65536))]
    pub max_memory: u32,
    /// VMs of the default size kept restored and paused, so that creates take tens of milliseconds; 0 turns
    /// the warm pool off. Each costs its idle memory (see `hutch bench`).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub pool: u32,
    /// Largest file upload, in MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_upload_mib: u64,
    /// Sandbox sizes ordinary tokens may ask for, as CPUSxMIB (e.g. 1x512,2x2048); the default size is always one
    /// of them. Only these get a boot snapshot; an admin token may ask for any size within --max-cpus and
    /// --max-memory, which boots cold when it is not listed.
    #[arg(long, value_delimiter = ',', value_parser = parse_vm_size)]
    pub sizes: Vec<(u32, u32)>,
    /// Open connections in all.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(16..=100_000))]
    pub max_connections: u32,
    /// Open connections from one client address that have not yet carried an authenticated request; the oldest
    /// of them is closed to make room for a new one.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub conn_per_address: u32,
    /// Seconds a connection that has not carried an authenticated request may wait for one (headers included).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub unauthenticated_timeout: u64,
    /// Seconds an authenticated connection may sit with no request in progress.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout: u64,
    /// Seconds the daemon waits for the next piece of a request body before failing the request.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout: u64,
    /// A TOML file of triggers: webhooks (`POST /hooks/NAME`) and schedules that start runs in fresh sandboxes
    /// and deliver their change to a forge. Checked at start; re-read on SIGHUP.
    #[arg(long)]
    pub triggers: Option<PathBuf>,
}

/// `--e2b-domain`: a host name (canonical, lowercase) under which sandbox hosts are named.
fn parse_e2b_domain(s: &str) -> Result<String, String> {
    let name = hutch_policy::HostName::parse(s).map_err(|e| e.to_string())?;
    if !name.as_str().contains('.') {
        return Err(format!("{name} has one label; give a domain such as sandbox.example.com"));
    }
    Ok(name.as_str().to_string())
}

/// `ALIAS=IMAGE` for `--template`.
fn parse_template_alias(s: &str) -> Result<(String, String), String> {
    let (a, i) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ALIAS=IMAGE (e.g. my-node=agents)"))?;
    let ok = !a.is_empty() && a.len() <= 64 && a.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':'));
    if !ok {
        return Err(format!("template alias {a:?}: 1-64 letters, digits, '-', '_', '.', '/', ':'"));
    }
    Ok((a.to_string(), i.to_string()))
}

/// `CPUSxMIB`, e.g. `2x2048`.
fn parse_vm_size(s: &str) -> Result<(u32, u32), String> {
    let (c, m) = s.split_once(['x', 'X']).ok_or_else(|| format!("{s:?} is not CPUSxMIB (e.g. 1x512)"))?;
    let cpus: u32 = c.trim().parse().map_err(|_| format!("{s:?}: {c:?} is not a number of vCPUs"))?;
    let mem: u32 = m.trim().parse().map_err(|_| format!("{s:?}: {m:?} is not a number of MiB"))?;
    if cpus == 0 || mem < 128 {
        return Err(format!("{s:?}: at least 1 vCPU and 128 MiB"));
    }
    Ok((cpus, mem))
}

/// Holds the data directory's lock for the daemon's lifetime: two daemons on one database would each
/// "reconcile" away the other's sandboxes.
struct DirLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

fn lock_dir(dd: &hutch_daemon::DataDir) -> anyhow::Result<DirLock> {
    let path = dd.root.join("daemon.lock");
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).with_context(|| format!("open {}", path.display()))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(DirLock { _lock: l }),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            bail!("another `hutch serve` is using {} (stop it, or give this one another --data-dir)", dd.root.display())
        }
        Err((_, e)) => bail!("cannot lock {}: {e}", path.display()),
    }
}

pub async fn serve(a: ServeArgs) -> anyhow::Result<i32> {
    if a.default_ttl > a.max_ttl {
        bail!("--default-ttl ({}) is longer than --max-ttl ({})", a.default_ttl, a.max_ttl);
    }
    let tls_files = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
        _ => None,
    };
    let dd = a.dir.resolve()?;
    dd.create()?;
    let _lock = lock_dir(&dd)?;
    let store = Arc::new(dd.open_store()?);
    let active_tokens = store.tokens()?.iter().filter(|t| !t.revoked).count();
    let listen = match (a.listen, &a.unix) {
        (Some(l), _) => Some(l),
        (None, Some(_)) => None,
        (None, None) => Some(DEFAULT_LISTEN.parse().context("the default listen address")?),
    };
    if let Some(l) = listen {
        check_listen(l, tls_files.as_ref(), active_tokens).map_err(anyhow::Error::msg)?;
    }
    // Checked and bound before the image: a wrong group or path fails at once and leaves nothing.
    let unix = match &a.unix {
        Some(path) => Some(crate::socket::bind(path, &a.socket_group)?),
        None => None,
    };
    let tls = tls_files.as_ref().map(hutch_daemon::server::tls_config).transpose()?;
    // The triggers file is checked before anything starts: a mistake in it names the trigger and the key.
    let trigger_set = match &a.triggers {
        Some(p) => Some(hutch_daemon::triggers::TriggerSet::load(p)?),
        None => None,
    };
    let egress_base = match &a.egress_base {
        Some(p) => Some(hutch_daemon::egress_spec::EgressBase::load(p)?),
        None => None,
    };
    let key = Arc::new(hutch_daemon::secrets::SecretKey::load_or_create(&dd.secret_key())?);

    let (cache, image) = crate::image::ensure_image().await?;
    let host = Host::new(image, cache.root().to_path_buf())?;
    crate::image::warn_if_tcg(&host, &SandboxConfig::default())?;
    for &(c, m) in &a.sizes {
        if c > a.max_cpus || m > a.max_memory {
            bail!("--sizes {c}x{m} is larger than --max-cpus {} / --max-memory {}", a.max_cpus, a.max_memory);
        }
    }
    let mut limits = Limits {
        max_sandboxes: a.max_sandboxes as usize,
        per_token: a.per_token.unwrap_or(a.max_sandboxes) as usize,
        default_ttl: Duration::from_secs(a.default_ttl),
        max_ttl: Duration::from_secs(a.max_ttl),
        max_cpus: a.max_cpus,
        max_memory_mib: a.max_memory,
        upload_max: a.max_upload_mib << 20,
        ..Limits::default()
    };
    limits.sizes = a.sizes.clone();
    limits.sizes.push((limits.default_cpus, limits.default_memory_mib));
    limits.sizes.sort();
    limits.sizes.dedup();
    let conn_limits = hutch_daemon::server::ConnLimits {
        max_connections: a.max_connections as usize,
        per_address: a.conn_per_address as usize,
        unauthenticated_idle: Duration::from_secs(a.unauthenticated_timeout),
        idle: Duration::from_secs(a.idle_timeout),
        body: Duration::from_secs(a.body_timeout),
    };
    hutch_daemon::server::raise_fd_limit();
    let metrics = Arc::new(hutch_daemon::metrics::Metrics::new());
    let mgr = Manager::new(store, key, host, limits, metrics);
    mgr.set_results_dir(dd.root.join("results"));
    // Paused sandboxes live in the data directory, so they survive restarts (reconcile keeps them).
    mgr.set_pause_root(dd.root.join("paused"))?;
    let mut extra = std::collections::BTreeMap::new();
    for name in a.images.iter().copied().filter(|n| *n != crate::cli::ImageName::Default) {
        let (cache, image) = crate::image::ensure_named(name).await?;
        let host = Host::new(image, cache.root().to_path_buf())?;
        let cfg = SandboxConfig::default();
        // Its creates restore from a snapshot (no warm pool): make it now rather than on the first create.
        hutch_sandbox::snapshot::ensure(&host, &cfg).await.with_context(|| format!("the boot snapshot of image {}", name.name()))?;
        extra.insert(name.name().to_string(), hutch_daemon::manager::ExtraImage { host, env: crate::image::default_env(name) });
    }
    let mut aliases = std::collections::BTreeMap::new();
    for (alias, image) in &a.templates {
        if image != "default" && !extra.contains_key(image) {
            bail!("--template {alias}={image}: image {image:?} is not served (add `--image {image}`)");
        }
        aliases.insert(alias.clone(), image.clone());
    }
    mgr.set_extra_images(extra);
    mgr.set_template_aliases(aliases);
    if let Some(b) = egress_base {
        mgr.set_egress_base(b);
    }
    if let Some(d) = &a.e2b_domain {
        mgr.set_e2b_domain(d.clone());
    }
    let rec = mgr.reconcile()?;
    for gone in mgr.prune_caches() {
        eprintln!("hutch: cache: removed {gone}");
    }
    let pruned = mgr.prune_snapshots();
    if !pruned.is_empty() {
        eprintln!("hutch: removed {} boot snapshot(s) of sizes no longer in --sizes", pruned.len());
    }
    mgr.start_pool(a.pool as usize);
    if !rec.marked_destroyed.is_empty() || !rec.reaped.is_empty() {
        eprintln!(
            "hutch: reconciled after a previous daemon: {} sandbox(es) marked destroyed, {} leftover VM director(ies) removed",
            rec.marked_destroyed.len(),
            rec.reaped.len()
        );
    }
    if active_tokens == 0 && listen.is_some() {
        eprintln!("hutch: no API tokens yet; every request will be refused until you run `hutch token create --name NAME`");
    }

    let mut sigint = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let listener = match listen {
        Some(l) => Some(tokio::net::TcpListener::bind(l).await.with_context(|| format!("cannot listen on {l}"))?),
        None => None,
    };
    if let Some(listener) = &listener {
        let scheme = if tls.is_some() { "https" } else { "http" };
        eprintln!("hutch: listening on {scheme}://{} (data in {})", listener.local_addr()?, dd.root.display());
    }
    if let Some(u) = &unix {
        eprintln!("hutch: listening on unix://{} (group {}; data in {})", u.path().display(), a.socket_group, dd.root.display());
    }
    tokio::spawn(mgr.clone().expire_loop(Duration::from_millis(500)));
    let triggers = match trigger_set {
        Some(set) => {
            let n = set.triggers.len();
            let t = hutch_daemon::triggers::Triggers::new(mgr.clone(), set, &dd.root)?;
            let (queued, failed) = t.recover()?;
            if queued > 0 || failed > 0 {
                eprintln!("hutch: runs left by a previous daemon: {queued} queued (they run now), {failed} recorded failed (they were in progress)");
            }
            t.start();
            eprintln!("hutch: {n} trigger(s) from {}", a.triggers.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
            if let Some(path) = a.triggers.clone() {
                let t2 = t.clone();
                let mut hup = signal(SignalKind::hangup()).context("install SIGHUP handler")?;
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        match hutch_daemon::triggers::TriggerSet::load(&path) {
                            Ok(set) => {
                                eprintln!("hutch: reloaded {} trigger(s) from {}", set.triggers.len(), path.display());
                                t2.replace(set);
                            }
                            Err(e) => eprintln!("hutch: kept the previous triggers: {e}"),
                        }
                    }
                });
            }
            Some(t)
        }
        None => None,
    };
    let router = hutch_daemon::api::router_with(mgr.clone(), triggers.clone());
    let stop = tokio_util::sync::CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        eprintln!("hutch: shutting down: finishing requests and destroying sandboxes");
        on_signal.cancel();
    });
    let tcp = async {
        if let Some(listener) = listener {
            hutch_daemon::server::serve(listener, tls, router.clone(), conn_limits.clone(), stop.clone().cancelled_owned()).await;
        }
    };
    let unix_serve = async {
        if let Some(u) = &unix {
            let store = mgr.store.clone();
            let listener = u.listener()?;
            let identify = move |uid| hutch_daemon::peer::principal_for_uid(&store, uid);
            hutch_daemon::server::serve_unix(listener, router.clone(), conn_limits.clone(), identify, stop.clone().cancelled_owned()).await;
        }
        anyhow::Ok(())
    };
    let (_, served) = tokio::join!(tcp, unix_serve);
    drop(unix);
    served?;
    if let Some(t) = &triggers {
        t.shutdown().await;
    }
    let n = mgr.live_count();
    mgr.shutdown().await;
    eprintln!("hutch: stopped ({n} sandbox(es) destroyed)");
    Ok(0)
}
