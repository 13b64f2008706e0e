//! Sandbox lifecycle for the daemon: create (checked spec, cap and quota reserved first), a supervisor task per
//! sandbox that owns its VM until it is deleted, expires or dies, TTL expiry, startup reconciliation with what
//! a previous daemon left, and graceful shutdown. The database row is written before anything runs and
//! updated as the sandbox moves; the in-memory map holds only sandboxes whose VM this process owns.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hutch_sandbox::egress::Egress;
use hutch_sandbox::envcache::{Plan, Start};
use hutch_sandbox::envsnap::EnvStore;
use hutch_sandbox::pool::Pool;
use hutch_sandbox::{AgentClient, Host, Sandbox, SandboxConfig, StartMode};
use tokio::sync::{mpsc, watch};
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::egress_spec::{EgressBase, SecretBinding};
use crate::metrics::Metrics;
use crate::secrets::SecretKey;
use crate::model::{CreateSandbox, PolicySpec, SandboxInfo, SandboxState, SetupSpec};
use crate::store::{now_ms, SandboxRow, Store};
use crate::DaemonError;

/// A VM its requester makes ready before it goes live: a triggered run's clone and setup, which the environment
/// cache captures while the VM is still the start's own (afterwards its supervisor owns it). Returns the VM (in
/// whatever phase the requester left its gateway) and the start mode shown. Runs in the start's task: it must end
/// by itself when its requester gives up (the requester's cancellation and deadline).
pub trait Prepare: Send + Sync {
    fn prepare<'a>(&'a self, host: &'a Host, cfg: &'a SandboxConfig) -> Prepared<'a>;
}

/// What [`Prepare::prepare`] returns: the VM and its start mode, or why it could not be made ready.
pub type Prepared<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(Sandbox, String), String>> + Send + 'a>>;

/// The daemon's limits; all of them explicit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sandboxes alive at once (creating, running or being destroyed), across all tokens.
    pub max_sandboxes: usize,
    /// Per token, unless the token has its own number.
    pub per_token: usize,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub default_cpus: u32,
    pub max_cpus: u32,
    pub default_memory_mib: u32,
    pub max_memory_mib: u32,
    /// Output kept by a non-streaming exec, per stream.
    pub exec_output_max: usize,
    /// Largest file upload.
    pub upload_max: u64,
    /// (cpus, MiB) sizes an ordinary token may ask for; only these get boot snapshots. Admin tokens may ask for
    /// any size within the maxima (booted cold when not listed).
    pub sizes: Vec<(u32, u32)>,
    /// Environment cache entries (setup results) expire this long after they were made.
    pub env_cache_max_age: Duration,
    /// All environment cache entries together (least recently used go first).
    pub env_cache_max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sandboxes: 5,
            per_token: 5,
            default_ttl: Duration::from_secs(600),
            max_ttl: Duration::from_secs(86400),
            default_cpus: 1,
            max_cpus: 2,
            default_memory_mib: 512,
            max_memory_mib: 4096,
            exec_output_max: 16 << 20,
            upload_max: 1 << 30,
            sizes: vec![(1, 512)],
            env_cache_max_age: hutch_sandbox::envcache::DEFAULT_MAX_AGE,
            env_cache_max_bytes: hutch_sandbox::envcache::DEFAULT_MAX_SIZE,
        }
    }
}

/// A file in a snapshot directory saying the daemon made it (for its size set), so it may prune it.
const DAEMON_MARK: &str = "made-by-daemon";

/// Errors with the HTTP status they become.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooMany(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

/// A create request after every field has been checked.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CheckedCreate {
    pub image: String,
    pub cpus: u32,
    pub memory_mib: u32,
    pub ttl_secs: u64,
    pub env: BTreeMap<String, String>,
    pub policy: Option<PolicySpec>,
    pub secrets: Vec<String>,
    /// Headers the gateway adds from secrets (rows written before they existed have none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_headers: BTreeMap<String, crate::model::SecretHeader>,
    /// Rows written before setups existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<SetupSpec>,
}

/// Largest setup script a create may carry.
const MAX_SETUP: usize = 1 << 20;
/// Output of a setup kept for its error message (the end of it).
const SETUP_TAIL: usize = 8 << 10;
/// How a failed setup's error starts (it becomes a 400, not a 500).
const SETUP_FAILED: &str = "the setup script failed";
/// Where the setup script is put in the guest.
const SETUP_PATH: &str = "/var/tmp/hutch/setup";

/// A sandbox whose VM this daemon owns.
pub struct Live {
    pub id: String,
    pub owner: String,
    pub client: AgentClient,
    pub console: std::path::PathBuf,
    /// The sandbox's terminal session (`hutch attach`), which outlives its clients.
    pub terminal: tokio::sync::Mutex<Option<Arc<crate::terminal::Terminal>>>,
    /// Made by `POST /v1/sandboxes/repo`: the repository in `/workspace` and what happens when a terminal
    /// command ends (see `crate::repo`).
    pub session: Option<Arc<crate::repo::Session>>,
    /// The sandbox's gateway (an event-triggered run moves it from the setup phase to the agent phase).
    pub gateway: hutch_gateway::Gateway,
    stop: mpsc::Sender<Cmd>,
    done: watch::Receiver<bool>,
}

/// What the supervisor of a VM is told to do with it.
enum Cmd {
    /// Destroy it, recording why.
    Destroy(String),
    /// Save it into the directory (which must not exist) and end the VM; the sandbox becomes `paused`.
    Pause(std::path::PathBuf, tokio::sync::oneshot::Sender<Result<hutch_sandbox::pause::PauseMeta, String>>),
}

/// A reserved place under the cap and the owner's quota; given back when dropped, so no path can leak one.
struct Slot {
    mgr: Arc<Inner>,
    owner: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.mgr.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_owner.get_mut(&self.owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_owner.remove(&self.owner);
            }
        }
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_owner: HashMap<String, usize>,
}

struct Inner {
    counts: Mutex<Counts>,
}

pub struct Manager {
    pub store: Arc<Store>,
    pub host: Host,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    key: Arc<SecretKey>,
    audit_tx: mpsc::UnboundedSender<(String, String)>,
    inner: Arc<Inner>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    /// Restored, paused VMs of the default size, handed out by creates that fit them.
    pool: Mutex<Option<Arc<Pool>>>,
    rebuilding: Arc<AtomicBool>,
    shutting_down: AtomicBool,
    tasks: TaskTracker,
    /// Where collected changes of repository sandboxes are kept (`<data dir>/results`); unset: none are taken.
    results: std::sync::OnceLock<std::path::PathBuf>,
    /// Where paused sandboxes are saved (`<data dir>/paused/<id>/`); unset: pausing is refused.
    pause_root: std::sync::OnceLock<std::path::PathBuf>,
    /// Images served besides the default one, by name (`agents`), with the variables their commands start with.
    /// Set once before serving; their sandboxes restore from their own snapshots (no warm pool).
    extra_images: std::sync::OnceLock<BTreeMap<String, ExtraImage>>,
    /// E2B template names that mean an image (`hutch serve --template ALIAS=IMAGE`).
    template_aliases: std::sync::OnceLock<BTreeMap<String, String>>,
    /// Pins and upstream roots in every sandbox's policy (`hutch serve --egress-base FILE`).
    egress_base: std::sync::OnceLock<EgressBase>,
    /// The E2B sandbox domain: `<port>-<id>.<domain>` Host headers reach sandbox ports (`--e2b-domain`).
    e2b_domain: std::sync::OnceLock<String>,
}

/// An image other than the default that this daemon also serves.
#[derive(Clone)]
pub struct ExtraImage {
    pub host: Host,
    pub env: Vec<(String, String)>,
}

/// What startup reconciliation found and did.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Rows a previous daemon left unfinished, now marked destroyed.
    pub marked_destroyed: Vec<String>,
    /// Leftover sandbox directories (and their VMs) removed.
    pub reaped: Vec<String>,
}

fn check_env_name(k: &str) -> Result<(), String> {
    let ok = !k.is_empty() && !k.starts_with(|c: char| c.is_ascii_digit()) && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("env: {k:?} is not a valid variable name (letters, digits, _; not starting with a digit)"))
    }
}

pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > 32 {
        return Err(format!("labels: at most 32, got {}", labels.len()));
    }
    for (k, v) in labels {
        let ok = !k.is_empty() && k.len() <= 63 && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
        if !ok {
            return Err(format!("labels: key {k:?} must be 1-63 characters of letters, digits, '-', '_', '.', '/'"));
        }
        if v.len() > 256 || v.chars().any(|c| c.is_control() || c == ',' || c == '=') {
            return Err(format!("labels: the value of {k} must be at most 256 characters, without control characters, ',' or '='"));
        }
    }
    Ok(())
}

/// `key=value[,key=value...]` as a label filter.
pub fn parse_label_filter(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut m = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| format!("label filter {part:?} is not key=value"))?;
        m.insert(k.to_string(), v.to_string());
    }
    check_labels(&m)?;
    Ok(m)
}

/// The policy as policy-file TOML: the allow rules, a `[secrets.NAME]` binding for each secret the sandbox may
/// use (hosts from the store, or narrowed with an added header), and the operator's base (pins, upstream roots).
/// Parsed by the gateway's own parser, so what is stored is what is enforced.
fn policy_toml(p: Option<&PolicySpec>, secrets: &[SecretBinding], base: &EgressBase) -> Result<String, String> {
    let mut allow = Vec::new();
    for a in p.map(|p| p.allow.as_slice()).unwrap_or_default() {
        let mut t = toml::map::Map::new();
        t.insert("host".into(), toml::Value::String(a.host.clone()));
        if let Some(ports) = &a.ports {
            t.insert("ports".into(), toml::Value::Array(ports.iter().map(|p| toml::Value::Integer(*p as i64)).collect()));
        }
        if let Some(m) = &a.methods {
            t.insert("methods".into(), toml::Value::Array(m.iter().cloned().map(toml::Value::String).collect()));
        }
        if let Some(ps) = &a.paths {
            t.insert("paths".into(), toml::Value::Array(ps.iter().cloned().map(toml::Value::String).collect()));
        }
        allow.push(toml::Value::Table(t));
    }
    let mut root = toml::map::Map::new();
    root.insert("allow".into(), toml::Value::Array(allow));
    let mut sec = toml::map::Map::new();
    for b in secrets {
        let mut t = toml::map::Map::new();
        t.insert("hosts".into(), toml::Value::Array(b.hosts.iter().cloned().map(toml::Value::String).collect()));
        if let Some((header, value)) = &b.inject {
            let mut i = toml::map::Map::new();
            i.insert("header".into(), toml::Value::String(header.clone()));
            i.insert("value".into(), toml::Value::String(value.clone()));
            t.insert("inject".into(), toml::Value::Table(i));
        }
        sec.insert(b.name.clone(), toml::Value::Table(t));
    }
    root.insert("secrets".into(), toml::Value::Table(sec));
    base.policy_toml_with(root).map_err(|e| format!("policy: {e}"))
}

fn checked_policy(p: Option<&PolicySpec>, secrets: &[SecretBinding], base: &EgressBase) -> Result<hutch_policy::CheckedPolicy, String> {
    if p.is_some_and(|p| p.allow.len() > 256) {
        return Err("policy: at most 256 allow rules".into());
    }
    // The operator's pins go in where the sandbox's rules use them (the policy refuses a pin no rule uses).
    let bare = EgressBase { resolve: Vec::new(), upstream_ca: base.upstream_ca.clone() };
    let text = policy_toml(p, secrets, &bare)?;
    let checked = hutch_policy::CheckedPolicy::from_toml_str(&text, Path::new("policy")).map_err(|e| e.to_string())?;
    if base.resolve.is_empty() {
        return Ok(checked);
    }
    let text = policy_toml(p, secrets, &base.used_by(&checked))?;
    hutch_policy::CheckedPolicy::from_toml_str(&text, Path::new("policy")).map_err(|e| e.to_string())
}

/// Audit records of one sandbox's gateway, handed to a writer task (the gateway's data path must not wait on
/// the database) that appends them to the sandbox's egress log. At most [`AUDIT_ROWS_MAX`] per sandbox: a guest
/// that makes millions of attempts must not fill the host's disk (the denial metric still counts every one).
struct DbAuditSink {
    sandbox: String,
    tx: mpsc::UnboundedSender<(String, String)>,
    metrics: Arc<Metrics>,
    stored: std::sync::atomic::AtomicU64,
}

/// Egress records kept in the database per sandbox; the API returns up to this many.
const AUDIT_ROWS_MAX: u64 = 100_000;

impl hutch_gateway::AuditSink for DbAuditSink {
    fn record(&self, record: &hutch_gateway::AuditRecord) {
        if record.decision == hutch_gateway::Verdict::Deny {
            self.metrics.gateway_denials.inc();
        }
        let n = self.stored.fetch_add(1, Ordering::Relaxed);
        if n == AUDIT_ROWS_MAX {
            tracing::warn!(sandbox = %self.sandbox, "egress log full ({AUDIT_ROWS_MAX} records); later records are not stored");
        }
        if n >= AUDIT_ROWS_MAX {
            return;
        }
        if let Ok(line) = serde_json::to_string(record) {
            let _ = self.tx.send((self.sandbox.clone(), line));
        }
    }
}

impl Manager {
    /// Must be called inside a Tokio runtime: it starts the audit writer task.
    pub fn new(store: Arc<Store>, key: Arc<SecretKey>, host: Host, limits: Limits, metrics: Arc<Metrics>) -> Arc<Manager> {
        let (audit_tx, mut audit_rx) = mpsc::unbounded_channel::<(String, String)>();
        let writer_store = store.clone();
        tokio::spawn(async move {
            while let Some((sandbox, line)) = audit_rx.recv().await {
                if let Err(e) = writer_store.append_audit(&sandbox, &line) {
                    tracing::error!(%sandbox, "cannot record an egress audit record: {e}");
                }
            }
        });
        Arc::new(Manager {
            store,
            host,
            limits,
            metrics,
            key,
            audit_tx,
            inner: Arc::new(Inner { counts: Mutex::new(Counts::default()) }),
            live: Mutex::new(HashMap::new()),
            pool: Mutex::new(None),
            rebuilding: Arc::new(AtomicBool::new(false)),
            shutting_down: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            results: std::sync::OnceLock::new(),
            pause_root: std::sync::OnceLock::new(),
            extra_images: std::sync::OnceLock::new(),
            template_aliases: std::sync::OnceLock::new(),
            egress_base: std::sync::OnceLock::new(),
            e2b_domain: std::sync::OnceLock::new(),
        })
    }

    /// Keeps the collected changes of repository sandboxes in `dir` (made when first needed).
    pub fn set_results_dir(&self, dir: std::path::PathBuf) {
        crate::repo::clean_leftovers(&dir);
        let _ = self.results.set(dir);
    }

    pub fn results_dir(&self) -> Option<&Path> {
        self.results.get().map(|p| p.as_path())
    }

    /// Keeps `size` VMs of the default size restored and paused, so that a create answers in tens of
    /// milliseconds instead of a restore's hundreds. Zero turns the pool off.
    pub fn start_pool(&self, size: usize) {
        if size == 0 {
            return;
        }
        let cfg = SandboxConfig { cpus: self.limits.default_cpus, memory_mib: self.limits.default_memory_mib, ..SandboxConfig::default() };
        let pool = Arc::new(Pool::start(self.host.clone(), cfg, size));
        *self.pool.lock().unwrap_or_else(|p| p.into_inner()) = Some(pool);
    }

    fn sizes_text(&self) -> String {
        self.limits.sizes.iter().map(|(c, m)| format!("{c}x{m}")).collect::<Vec<_>>().join(", ")
    }

    /// Removes the boot snapshots this daemon (or an earlier one) made for sizes no longer offered. Snapshots
    /// without the daemon's mark (made by `hutch run` or `hutch image build`) are left alone.
    pub fn prune_snapshots(&self) -> Vec<std::path::PathBuf> {
        let mut removed = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.host.image.snapshots) else { return removed };
        for e in rd.flatten() {
            let dir = e.path();
            if !dir.join(DAEMON_MARK).is_file() {
                continue;
            }
            let size = std::fs::read_to_string(dir.join("meta.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<hutch_sandbox::snapshot::Meta>(&t).ok())
                .map(|m| (m.cpus, m.memory_mib));
            if size.is_some_and(|s| self.limits.sizes.contains(&s)) {
                continue;
            }
            if std::fs::remove_dir_all(&dir).is_ok() {
                removed.push(dir);
            }
        }
        removed
    }

    /// Garbage collection of the cache this daemon runs from, as `hutch cache prune` does it: environment
    /// snapshots past their age or the size cap (least recently used first), and images other than this daemon's
    /// (with their boot snapshots) by the same rules; nothing in use by any process is removed. Returns what went.
    pub fn prune_caches(&self) -> Vec<String> {
        let (age, bytes) = (Some(self.limits.env_cache_max_age), Some(self.limits.env_cache_max_bytes));
        let mut out: Vec<String> = Vec::new();
        match hutch_image::Cache::at(&self.host.root).prune_images(std::slice::from_ref(&self.host.image.key), age, bytes) {
            Ok(v) => out.extend(v.into_iter().map(|(k, why)| format!("image {k} ({why})"))),
            Err(e) => tracing::warn!("cannot prune old images: {e}"),
        }
        // After the images: entries made on a removed image snapshot go too.
        out.extend(EnvStore::new(&self.host.root).prune(age, bytes).into_iter().map(|(k, why)| format!("environment {k} ({why})")));
        out
    }

    /// Makes the missing snapshot for `cfg`'s size in the background, once at a time, so that later creates
    /// restore instead of booting. Only for the configured sizes.
    fn rebuild_snapshot(&self, cfg: &SandboxConfig) {
        if !self.limits.sizes.contains(&(cfg.cpus, cfg.memory_mib)) {
            return;
        }
        if self.rebuilding.swap(true, Ordering::SeqCst) {
            return;
        }
        let (host, cfg, flag) = (self.host.clone(), cfg.clone(), self.rebuilding.clone());
        self.tasks.spawn(async move {
            match hutch_sandbox::snapshot::ensure(&host, &cfg).await {
                Ok(s) => {
                    // Marked as the daemon's, so that a later daemon with other sizes can prune it.
                    let _ = std::fs::write(s.dir.join(DAEMON_MARK), b"");
                    tracing::info!("snapshot {} rebuilt", s.meta.key)
                }
                Err(e) => tracing::warn!("cannot rebuild the snapshot: {}", hutch_sandbox::error_chain(&e)),
            }
            flag.store(false, Ordering::SeqCst);
        });
    }

    /// VMs waiting in the warm pool.
    pub fn pool_ready(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |p| p.ready())
    }

    fn live_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn image_name(&self) -> String {
        format!("default@{}", &self.host.image.key[..12.min(self.host.image.key.len())])
    }

    /// Serves `images` besides the default (call once, before serving).
    pub fn set_extra_images(&self, images: BTreeMap<String, ExtraImage>) {
        let _ = self.extra_images.set(images);
    }

    /// Template aliases (E2B): each names an image this daemon serves (checked by the caller).
    pub fn set_template_aliases(&self, aliases: BTreeMap<String, String>) {
        let _ = self.template_aliases.set(aliases);
    }

    /// The operator's egress base for every sandbox (call once, before serving).
    pub fn set_egress_base(&self, base: EgressBase) {
        let _ = self.egress_base.set(base);
    }

    /// The E2B sandbox domain (call once, before serving; checked by the caller).
    pub fn set_e2b_domain(&self, domain: String) {
        let _ = self.e2b_domain.set(domain);
    }

    pub fn e2b_domain(&self) -> Option<&str> {
        self.e2b_domain.get().map(String::as_str)
    }

    fn egress_base(&self) -> &EgressBase {
        static NONE: std::sync::OnceLock<EgressBase> = std::sync::OnceLock::new();
        self.egress_base.get().unwrap_or_else(|| NONE.get_or_init(EgressBase::default))
    }

    pub fn template_aliases(&self) -> BTreeMap<String, String> {
        self.template_aliases.get().cloned().unwrap_or_default()
    }

    /// Names of the images served: `default` and the extra ones.
    pub fn image_names(&self) -> Vec<String> {
        let mut v = vec!["default".to_string()];
        v.extend(self.extra_images.get().into_iter().flat_map(|m| m.keys().cloned()));
        v
    }

    /// The host (image) and base environment for a checked spec's image (`NAME@key`).
    fn host_for(&self, image: &str) -> (&Host, Vec<(String, String)>) {
        let name = image.split('@').next().unwrap_or(image);
        match self.extra_images.get().and_then(|m| m.get(name)) {
            Some(x) => (&x.host, x.env.clone()),
            None => (&self.host, Vec::new()),
        }
    }

    /// Parses a create request into a [`CheckedCreate`]; every problem is named.
    pub fn check_create(&self, who: &Principal, req: &CreateSandbox) -> Result<CheckedCreate, ManagerError> {
        let bad = ManagerError::BadInput;
        let image = match req.image.as_deref() {
            None | Some("default") => self.image_name(),
            Some(p) if !p.is_empty() && self.host.image.key.starts_with(p) => self.image_name(),
            Some(name) if self.extra_images.get().is_some_and(|m| m.contains_key(name)) => {
                let key = self.extra_images.get().and_then(|m| m.get(name)).map(|x| x.host.image.key.clone()).unwrap_or_default();
                format!("{name}@{}", &key[..12.min(key.len())])
            }
            Some(other) => {
                return Err(bad(format!("image {other:?} is unknown; this daemon serves {} (`hutch serve --image NAME` adds more)", self.image_names().join(", "))))
            }
        };
        let cpus = req.cpus.unwrap_or(self.limits.default_cpus);
        if cpus < 1 || cpus > self.limits.max_cpus {
            return Err(bad(format!("cpus must be 1 to {}, got {cpus}", self.limits.max_cpus)));
        }
        let memory_mib = req.memory_mib.unwrap_or(self.limits.default_memory_mib);
        if memory_mib < 128 || memory_mib > self.limits.max_memory_mib {
            return Err(bad(format!("memory_mib must be 128 to {}, got {memory_mib}", self.limits.max_memory_mib)));
        }
        // Each size needs its own boot snapshot (~130 MiB on disk, minutes of CPU to make): ordinary tokens pick
        // from the configured set, so no client can make the host build and keep one per size it invents.
        if !who.admin && !self.limits.sizes.contains(&(cpus, memory_mib)) {
            return Err(bad(format!(
                "size {cpus} vCPU x {memory_mib} MiB is not offered by this daemon; offered: {} (cpus x MiB; an admin can offer more with `hutch serve --sizes`)",
                self.sizes_text()
            )));
        }
        let max_ttl = self.limits.max_ttl.as_secs();
        let ttl_secs = req.ttl_secs.unwrap_or(self.limits.default_ttl.as_secs());
        if ttl_secs < 1 || ttl_secs > max_ttl {
            return Err(bad(format!("ttl_secs must be 1 to {max_ttl}, got {ttl_secs}")));
        }
        if req.env.len() > 256 {
            return Err(bad(format!("env: at most 256 variables, got {}", req.env.len())));
        }
        let mut env_bytes = 0;
        for (k, v) in &req.env {
            check_env_name(k).map_err(bad)?;
            if v.contains('\0') {
                return Err(bad(format!("env: the value of {k} contains a NUL byte")));
            }
            env_bytes += k.len() + v.len();
        }
        if env_bytes > 64 << 10 {
            return Err(bad("env: more than 64 KiB in total".into()));
        }
        let mut secrets = req.secrets.clone();
        secrets.sort();
        secrets.dedup();
        if secrets.len() > 64 {
            return Err(bad("secrets: at most 64".into()));
        }
        for s in &secrets {
            crate::secrets::check_secret_name(s).map_err(bad)?;
            if self.store.secret(s)?.is_none() {
                return Err(bad(format!("secret {s} is not in the daemon's store (add it with `hutch secret set {s} --hosts ...`)")));
            }
        }
        let bindings = self.secret_bindings(&secrets, &req.secret_headers)?;
        checked_policy(req.policy.as_ref(), &bindings, self.egress_base()).map_err(bad)?;
        check_labels(&req.labels).map_err(bad)?;
        if let Some(s) = &req.setup {
            if s.script.len() > MAX_SETUP {
                return Err(bad(format!("setup.script: at most {} KiB, got {} bytes", MAX_SETUP >> 10, s.script.len())));
            }
            if s.script.trim().is_empty() {
                return Err(bad("setup.script is empty".into()));
            }
            checked_policy(s.policy.as_ref(), &[], self.egress_base()).map_err(|e| bad(format!("setup.{e}")))?;
        }
        Ok(CheckedCreate {
            image,
            cpus,
            memory_mib,
            ttl_secs,
            env: req.env.clone(),
            policy: req.policy.clone(),
            secrets,
            secret_headers: req.secret_headers.clone(),
            setup: req.setup.clone(),
        })
    }

    fn secret_bindings(&self, names: &[String], headers: &BTreeMap<String, crate::model::SecretHeader>) -> Result<Vec<SecretBinding>, ManagerError> {
        let mut rows = Vec::new();
        for n in names {
            rows.push(self.store.secret(n)?.ok_or_else(|| ManagerError::BadInput(format!("secret {n} is not in the daemon's store")))?);
        }
        crate::egress_spec::bindings(&rows, headers).map_err(ManagerError::BadInput)
    }

    /// The sandbox's egress: its checked policy, secret values read from the store only when the gateway is
    /// built (they live in the host-side gateway, never in the guest), and its audit records into the database.
    fn egress(&self, id: &str, spec: &CheckedCreate) -> Result<Egress, ManagerError> {
        let policy = checked_policy(spec.policy.as_ref(), &self.secret_bindings(&spec.secrets, &spec.secret_headers)?, self.egress_base()).map_err(ManagerError::BadInput)?;
        let sink = DbAuditSink { sandbox: id.to_string(), tx: self.audit_tx.clone(), metrics: self.metrics.clone(), stored: Default::default() };
        let store = self.store.clone();
        let key = self.key.clone();
        let mut egress = Egress::new(policy, Arc::new(sink));
        if let Some(s) = &spec.setup {
            egress = egress.with_setup_phase(checked_policy(s.policy.as_ref(), &[], self.egress_base()).map_err(ManagerError::BadInput)?);
        }
        Ok(egress.with_secret_loader(move |p| {
            p.load_secrets_with(|name| match crate::secrets::reveal(&store, &key, name) {
                Ok(Some(v)) => Some(v.expose().to_string()),
                _ => None,
            })
            .map_err(|e| e.to_string())
        }))
    }

    /// An audit sink that records `sandbox`'s egress like any other sandbox's.
    pub fn audit_sink(&self, sandbox: &str) -> Arc<dyn hutch_gateway::AuditSink> {
        Arc::new(DbAuditSink { sandbox: sandbox.to_string(), tx: self.audit_tx.clone(), metrics: self.metrics.clone(), stored: Default::default() })
    }

    /// Loads secret values for `p` from the daemon's store (for a gateway; they never reach a guest).
    pub fn secret_loader(&self) -> impl Fn(&hutch_policy::CheckedPolicy) -> Result<Vec<hutch_policy::LoadedSecret>, String> + Send + Sync + 'static {
        let store = self.store.clone();
        let key = self.key.clone();
        move |p| {
            p.load_secrets_with(|name| match crate::secrets::reveal(&store, &key, name) {
                Ok(Some(v)) => Some(v.expose().to_string()),
                _ => None,
            })
            .map_err(|e| e.to_string())
        }
    }

    /// A secret's value from the store (the forge token, a webhook's HMAC key): for host-side use only.
    pub fn reveal_secret(&self, name: &str) -> Result<Option<zeroize::Zeroizing<String>>, DaemonError> {
        Ok(crate::secrets::reveal(&self.store, &self.key, name)?.map(|v| zeroize::Zeroizing::new(v.expose().to_string())))
    }

    fn reserve(&self, who: &Principal) -> Result<Slot, ManagerError> {
        let mut c = self.inner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.max_sandboxes {
            self.metrics.rejected("cap");
            return Err(ManagerError::TooMany(format!(
                "the daemon is at its limit of {} concurrent sandboxes; delete one or retry later",
                self.limits.max_sandboxes
            )));
        }
        let quota = who.max_sandboxes.map(|n| n as usize).unwrap_or(self.limits.per_token);
        let mine = c.per_owner.get(&who.token_id).copied().unwrap_or(0);
        if mine >= quota {
            self.metrics.rejected("quota");
            return Err(ManagerError::TooMany(format!(
                "token {} already has {mine} of its {quota} sandboxes; delete one first",
                who.name
            )));
        }
        c.total += 1;
        *c.per_owner.entry(who.token_id.clone()).or_default() += 1;
        Ok(Slot { mgr: self.inner.clone(), owner: who.token_id.clone() })
    }

    /// Creates and starts a sandbox; returns once the guest answers (or the start failed and left nothing).
    pub async fn create(self: &Arc<Self>, who: &Principal, req: &CreateSandbox) -> Result<SandboxInfo, ManagerError> {
        self.create_with(who, req, None).await
    }

    /// [`Manager::create`] with a repository session (`crate::repo`): its workspace image in the VM's workspace
    /// slot (so never from the pool, whose VMs hold the empty placeholder) and `/workspace` mounted before the
    /// sandbox counts as running.
    pub async fn create_with(self: &Arc<Self>, who: &Principal, req: &CreateSandbox, pending: Option<crate::repo::Pending>) -> Result<SandboxInfo, ManagerError> {
        let spec = self.check_create(who, req)?;
        let (id, slot) = self.record_creating(who, &spec, &req.labels)?;
        // The start runs in its own task: a client that hangs up mid-create must not leave a half-made VM.
        let me = self.clone();
        let owner = who.token_id.clone();
        let task = self.tasks.spawn(async move { me.start(id, owner, spec, slot, pending, None).await });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(ManagerError::Failed(format!("the start task failed: {e}"))),
        }
    }

    /// Takes a place under the cap and quota and records the sandbox as `creating`: the first step of every
    /// create, whoever asks.
    fn record_creating(&self, who: &Principal, spec: &CheckedCreate, labels: &BTreeMap<String, String>) -> Result<(String, Slot), ManagerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ManagerError::Unavailable("the daemon is shutting down".into()));
        }
        let slot = self.reserve(who)?;
        let id = hutch_sandbox::new_id();
        let now = now_ms();
        let row = SandboxRow {
            id: id.clone(),
            owner: who.token_id.clone(),
            state: "creating".into(),
            spec: serde_json::to_string(spec).map_err(|e| DaemonError::Internal(format!("encode spec: {e}")))?,
            labels: serde_json::to_string(labels).map_err(|e| DaemonError::Internal(format!("encode labels: {e}")))?,
            created_ms: now,
            expires_ms: now + (spec.ttl_secs as i64) * 1000,
            started_ms: None,
            ended_ms: None,
            end_reason: None,
            vm_id: None,
            vmm_pid: None,
            daemon_pid: std::process::id() as i64,
            start_mode: None,
            start_ms: None,
        };
        self.store.insert_sandbox(&row)?;
        Ok((id, slot))
    }

    /// Creates a sandbox for the daemon itself (an event-triggered run) with an egress the caller built (a
    /// setup phase, the trigger's policy); under the same cap, quota, records and supervision as any other.
    pub async fn create_with_egress(
        self: &Arc<Self>,
        who: &Principal,
        spec: CheckedCreate,
        labels: &BTreeMap<String, String>,
        egress: Egress,
        prepare: Option<Arc<dyn Prepare>>,
    ) -> Result<(SandboxInfo, Arc<Live>), ManagerError> {
        let (id, slot) = self.record_creating(who, &spec, labels)?;
        let me = self.clone();
        let owner = who.token_id.clone();
        let sid = id.clone();
        let task = self.tasks.spawn(async move { me.start(sid, owner, spec, slot, None, Some((egress, prepare))).await });
        let info = match task.await {
            Ok(r) => r?,
            Err(e) => return Err(ManagerError::Failed(format!("the start task failed: {e}"))),
        };
        let live = self.live_map().get(&id).cloned().ok_or_else(|| ManagerError::Failed(format!("sandbox {id} ended as it started")))?;
        Ok((info, live))
    }

    /// Destroys a sandbox this daemon owns, recording `reason`; whether it was live.
    pub async fn stop_sandbox(&self, id: &str, reason: &str) -> bool {
        self.destroy_live(id, reason).await
    }

    async fn start(
        self: Arc<Self>,
        id: String,
        owner: String,
        spec: CheckedCreate,
        slot: Slot,
        pending: Option<crate::repo::Pending>,
        given: Option<(Egress, Option<Arc<dyn Prepare>>)>,
    ) -> Result<SandboxInfo, ManagerError> {
        let (given, prepare) = match given {
            Some((e, p)) => (Some(e), p),
            None => (None, None),
        };
        let egress = match given.map(Ok).unwrap_or_else(|| self.egress(&id, &spec)) {
            Ok(e) => e,
            Err(e) => {
                self.store.mark_ended(&id, "failed", &format!("start failed: {e}"))?;
                return Err(e);
            }
        };
        let (host, base_env) = self.host_for(&spec.image);
        let extra = !std::ptr::eq(host, &self.host);
        let env = base_env.into_iter().chain(spec.env.clone()).collect();
        let workspace_image = pending.as_ref().and_then(|p| p.image());
        let workspace_base = pending.as_ref().and_then(|p| p.image_base());
        let cfg = SandboxConfig { cpus: spec.cpus, memory_mib: spec.memory_mib, env, egress, workspace_image, workspace_base, ..SandboxConfig::default() };
        let t0 = Instant::now();
        self.metrics.creates.inc();
        let pool = if extra { None } else { self.pool.lock().unwrap_or_else(|p| p.into_inner()).clone() };
        let created = match (&spec.setup, pool, &prepare) {
            // The environment cache is keyed on the default image only.
            (Some(_), _, _) | (_, _, Some(_)) if extra => Err("a setup script is supported on the default image only".to_string()),
            (_, _, Some(p)) => p.prepare(host, &cfg).await.map(|(sb, m)| (sb, Some(m))),
            (Some(setup), _, None) => self.start_with_setup(&id, &owner, setup, &cfg).await.map(|(sb, m)| (sb, Some(m))),
            (None, Some(p), None) if cfg.workspace_image.is_none() => p.take(&cfg).await.map(|sb| (sb, None)).map_err(|e| hutch_sandbox::error_chain(&e)),
            (None, _, None) => Sandbox::create(host, &cfg).await.map(|sb| (sb, None)).map_err(|e| hutch_sandbox::error_chain(&e)),
        };
        let (sb, setup_mode) = match created {
            Ok(sb) => sb,
            Err(msg) => {
                self.metrics.create_failures.inc();
                tracing::warn!(%id, "sandbox start failed: {msg}");
                self.store.mark_ended(&id, "failed", &format!("start failed: {msg}"))?;
                // A setup script that fails is the request's doing, not the daemon's.
                if msg.starts_with(SETUP_FAILED) {
                    return Err(ManagerError::BadInput(msg));
                }
                return Err(ManagerError::Failed(format!("the sandbox could not start: {msg}")));
            }
        };
        let took = t0.elapsed();
        if sb.start.snapshot_wanted && !extra {
            self.rebuild_snapshot(&cfg);
        }
        match sb.start.mode {
            StartMode::Restored | StartMode::Pooled => self.metrics.restore_seconds.observe(took.as_secs_f64()),
            StartMode::Cold => self.metrics.boot_seconds.observe(took.as_secs_f64()),
        }
        let mode = match sb.start.mode {
            StartMode::Restored => "snapshot restore",
            StartMode::Cold => "cold boot",
            StartMode::Pooled => "warm pool",
        };
        let session = match pending {
            Some(p) => match p.enter(sb.client()).await {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    sb.destroy().await;
                    self.store.mark_ended(&id, "failed", &format!("start failed: {e}"))?;
                    return Err(ManagerError::Failed(format!("the sandbox could not mount the repository: {e}")));
                }
            },
            None => None,
        };
        let mode = setup_mode.as_deref().unwrap_or(mode);
        if let Err(e) = self.store.mark_running(&id, &sb.id, sb.vmm_pid(), mode, took.as_millis() as i64) {
            sb.destroy().await;
            self.store.mark_ended(&id, "failed", "could not record the start")?;
            return Err(e.into());
        }
        tracing::info!(%id, vm = %sb.id, mode, took_ms = took.as_millis() as u64, "sandbox running");
        self.go_live(id, owner, sb, slot, session, (spec.cpus, spec.memory_mib)).await
    }

    /// Hands a started VM to its supervisor and makes it reachable; the last step of a create and a resume.
    async fn go_live(
        self: &Arc<Self>,
        id: String,
        owner: String,
        sb: Sandbox,
        slot: Slot,
        session: Option<Arc<crate::repo::Session>>,
        size: (u32, u32),
    ) -> Result<SandboxInfo, ManagerError> {
        let (stop_tx, stop_rx) = mpsc::channel(4);
        let (done_tx, done_rx) = watch::channel(false);
        let live = Arc::new(Live {
            id: id.clone(),
            owner,
            client: sb.client().clone(),
            console: sb.console_log().to_path_buf(),
            terminal: Default::default(),
            session,
            gateway: sb.gateway().clone(),
            stop: stop_tx,
            done: done_rx,
        });
        self.live_map().insert(id.clone(), live);
        let me = self.clone();
        let sid = id.clone();
        self.tasks.spawn(async move { me.supervise(sid, sb, slot, stop_rx, done_tx, size).await });
        // A shutdown that began while this VM was starting must not miss it.
        if self.shutting_down.load(Ordering::SeqCst) {
            let _ = self.destroy_live(&id, "the daemon shut down").await;
        }
        self.info(&id)
    }

    /// The environment cache's plan for a setup by `owner` (the token's id scopes the key: tokens never share an
    /// entry), keyed as `hutch run` keys it; `None` for `no_cache`.
    fn env_plan(&self, owner: &str, setup: &SetupSpec, cfg: &SandboxConfig) -> Result<Option<Plan>, String> {
        if setup.no_cache {
            return Ok(None);
        }
        let scope = format!("hutch serve token {owner}");
        let key = hutch_sandbox::envcache::KeyInputs {
            image_key: &self.host.image.key,
            vm: format!("cpus={} memory={} accel={:?}", cfg.cpus, cfg.memory_mib, cfg.accel),
            setup: setup.script.as_bytes(),
            setup_policy: cfg.egress.setup.as_deref(),
            scope: &scope,
            inputs: vec![],
        }
        .key()
        .map_err(|e| hutch_sandbox::error_chain(&e))?;
        Ok(Some(Plan {
            store: EnvStore::new(&self.host.root),
            key,
            label: format!("hutch serve, token {owner}"),
            refresh: false,
            max_age: self.limits.env_cache_max_age,
            max_bytes: self.limits.env_cache_max_bytes,
        }))
    }

    /// A sandbox whose setup has run: restored from the environment cache when the key has an entry, else a fresh
    /// VM that runs the setup (and, when it builds the entry, is captured and the sandbox restored from the new
    /// entry). The gateway leaves the setup phase before the sandbox is handed out. Returns the start mode shown.
    async fn start_with_setup(&self, id: &str, owner: &str, setup: &SetupSpec, cfg: &SandboxConfig) -> Result<(Sandbox, String), String> {
        let warn = |m: &str| tracing::warn!(sandbox = %id, "{}", hutch_text::escape_lines(m.as_bytes()));
        let plan = self.env_plan(owner, setup, cfg)?;
        let mut start = match &plan {
            Some(p) => p.start(&warn),
            None => Start::Fresh { lock: None },
        };
        loop {
            let sb = match &plan {
                Some(p) => p.create(&self.host, cfg, &mut start, &warn).await,
                None => Sandbox::create_with_notes(&self.host, cfg, &warn).await,
            }
            .map_err(|e| hutch_sandbox::error_chain(&e))?;
            if let Start::Cached { entry, just_made } = &start {
                let mode = if *just_made {
                    format!("setup, stored in the environment cache (key {}…)", &entry.meta.key[..8])
                } else {
                    format!("environment cache (key {}…, made {} ago)", &entry.meta.key[..8], hutch_sandbox::envcache::age(entry.age_secs()))
                };
                if let Err(e) = sb.gateway().enter_phase(hutch_gateway::Phase::Agent) {
                    sb.destroy().await;
                    return Err(format!("ending the setup phase: {e}"));
                }
                return Ok((sb, mode));
            }
            let t0 = Instant::now();
            if let Err(e) = run_setup(&sb, &setup.script).await {
                sb.destroy().await;
                return Err(e);
            }
            if let Err(e) = sb.gateway().enter_phase(hutch_gateway::Phase::Agent) {
                sb.destroy().await;
                return Err(format!("ending the setup phase: {e}"));
            }
            let Some(p) = &plan else { return Ok((sb, "setup".into())) };
            match p.capture(sb, &mut start, t0.elapsed().as_millis() as u64, &warn).await {
                // Not the builder: this VM is the sandbox.
                Err(sb) => return Ok((sb, "setup".into())),
                // Captured: the next turn restores from the entry (or, if the capture failed, runs the setup again
                // without storing).
                Ok(_) => continue,
            }
        }
    }

    /// Owns the VM until it is told to stop or dies; then destroys it, records the end, frees the slot.
    async fn supervise(
        self: Arc<Self>,
        id: String,
        sb: Sandbox,
        slot: Slot,
        mut stop: mpsc::Receiver<Cmd>,
        done: watch::Sender<bool>,
        size: (u32, u32),
    ) {
        let (state, reason) = tokio::select! {
            r = stop.recv() => match r {
                Some(Cmd::Pause(dest, reply)) => {
                    self.pause_vm(&id, sb, &dest, size, reply).await;
                    self.live_map().remove(&id);
                    drop(slot);
                    let _ = done.send(true);
                    return;
                }
                Some(Cmd::Destroy(reason)) => ("destroyed", reason),
                None => ("destroyed", "the daemon shut down".into()),
            },
            _ = sb.channel_closed() => {
                let tail = hutch_sandbox::console_tail(sb.console_log());
                ("failed", format!("the VM stopped unexpectedly; last console lines: {tail}"))
            }
        };
        self.metrics.gateway_bytes.inc_by(sb.gateway().bytes_used());
        sb.destroy().await;
        if let Err(e) = self.store.mark_ended(&id, state, &reason) {
            tracing::error!(%id, "cannot record the end of a sandbox: {e}");
        }
        self.metrics.destroyed(if state == "failed" { "vm_died" } else { reason_label(&reason) });
        self.live_map().remove(&id);
        drop(slot);
        let _ = done.send(true);
        tracing::info!(%id, %reason, "sandbox ended");
    }

    /// Saves the VM of sandbox `id` into `dest` for [`Manager::pause`]; run by its supervisor, which owns it.
    async fn pause_vm(
        &self,
        id: &str,
        sb: Sandbox,
        dest: &Path,
        (cpus, memory_mib): (u32, u32),
        reply: tokio::sync::oneshot::Sender<Result<hutch_sandbox::pause::PauseMeta, String>>,
    ) {
        self.metrics.gateway_bytes.inc_by(sb.gateway().bytes_used());
        let tmp = dest.with_extension("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        let r = match std::fs::create_dir_all(&tmp) {
            Ok(()) => {
                let image = self.store.sandbox(id).ok().flatten().and_then(|r| serde_json::from_str::<CheckedCreate>(&r.spec).ok()).map(|s| s.image).unwrap_or_default();
                let (host, _) = self.host_for(&image);
                sb.pause_to(host, cpus, memory_mib, &tmp).await.map_err(|e| hutch_sandbox::error_chain(&e))
            }
            Err(e) => {
                sb.destroy().await;
                Err(format!("cannot create {}: {e}", tmp.display()))
            }
        };
        let r = r.and_then(|meta| {
            std::fs::rename(&tmp, dest).map_err(|e| format!("cannot install {}: {e}", dest.display()))?;
            Ok(meta)
        });
        match &r {
            Ok(meta) => {
                if let Err(e) = self.store.mark_paused(id) {
                    tracing::error!(%id, "cannot record a pause: {e}");
                }
                tracing::info!(%id, state_mib = meta.state_bytes >> 20, disk_mib = meta.disk_bytes >> 20, "sandbox paused");
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                let _ = self.store.mark_ended(id, "failed", &format!("pausing failed: {e}"));
                tracing::warn!(%id, "pausing failed: {e}");
            }
        }
        let _ = reply.send(r);
    }

    /// Where paused sandboxes go; pausing is refused until it is set. Called once, before serving.
    pub fn set_pause_root(&self, dir: std::path::PathBuf) -> Result<(), DaemonError> {
        std::fs::create_dir_all(&dir).map_err(|source| DaemonError::Io { what: format!("create {}", dir.display()), source })?;
        let _ = self.pause_root.set(dir);
        Ok(())
    }

    fn paused_dir(&self, id: &str) -> Result<std::path::PathBuf, ManagerError> {
        let root = self.pause_root.get().ok_or_else(|| ManagerError::Conflict("this daemon has no place to keep paused sandboxes".into()))?;
        Ok(root.join(id))
    }

    /// Pauses a running sandbox: its VM (RAM, devices, disk layer) is saved under the data directory and ends;
    /// the sandbox keeps its id and becomes `paused` until [`Manager::resume`] or a delete. Its processes and
    /// files come back on resume; open connections do not.
    pub async fn pause(&self, who: &Principal, id: &str) -> Result<SandboxInfo, ManagerError> {
        let row = self.visible(who, id)?;
        if row.state == "paused" {
            return self.info(id);
        }
        let dest = self.paused_dir(id)?;
        let live = self.running(who, id)?;
        // A repository session's workspace drive and pending collection do not survive a save; refuse rather
        // than lose the change.
        if live.session.is_some() {
            return Err(ManagerError::Conflict(format!("sandbox {id} holds a repository session; it cannot be paused")));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Out of the map first: new requests must not reach a VM that is being suspended.
        self.live_map().remove(id);
        if live.stop.send(Cmd::Pause(dest, tx)).await.is_err() {
            return Err(ManagerError::Conflict(format!("sandbox {id} ended while it was being paused")));
        }
        match rx.await {
            Ok(Ok(_)) => self.info(id),
            Ok(Err(e)) => Err(ManagerError::Failed(format!("pausing sandbox {id} failed (the sandbox is lost): {e}"))),
            Err(_) => Err(ManagerError::Failed(format!("pausing sandbox {id} was interrupted"))),
        }
    }

    /// Resumes a paused sandbox from its saved state with a fresh identity and gateway; it runs for `ttl_secs`
    /// (else its spec's TTL) from now. A running sandbox is returned as it is.
    pub async fn resume(self: &Arc<Self>, who: &Principal, id: &str, ttl_secs: Option<u64>) -> Result<SandboxInfo, ManagerError> {
        let row = self.visible(who, id)?;
        match row.state.as_str() {
            "running" => return self.info(id),
            "paused" => {}
            other => return Err(ManagerError::Conflict(format!("sandbox {id} is {other}; only a paused sandbox can be resumed"))),
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(ManagerError::Unavailable("the daemon is shutting down".into()));
        }
        let spec: CheckedCreate = serde_json::from_str(&row.spec).map_err(|e| DaemonError::Internal(format!("sandbox {id} spec: {e}")))?;
        let src = self.paused_dir(id)?;
        let owner = self.store.token(&row.owner)?.ok_or_else(|| ManagerError::NotFound(format!("no sandbox {id}")))?;
        let owner_p = Principal { token_id: owner.id, name: owner.name, admin: owner.admin, max_sandboxes: owner.max_sandboxes };
        let slot = self.reserve(&owner_p)?;
        if !self.store.mark_resuming(id)? {
            return Err(ManagerError::Conflict(format!("sandbox {id} is being resumed or deleted by another request")));
        }
        let ttl = ttl_secs.unwrap_or(spec.ttl_secs).clamp(1, self.limits.max_ttl.as_secs());
        let me = self.clone();
        let sid = id.to_string();
        let task = self.tasks.spawn(async move { me.resume_start(sid, row.owner, spec, slot, src, ttl).await });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(ManagerError::Failed(format!("the resume task failed: {e}"))),
        }
    }

    async fn resume_start(
        self: Arc<Self>,
        id: String,
        owner: String,
        spec: CheckedCreate,
        slot: Slot,
        src: std::path::PathBuf,
        ttl: u64,
    ) -> Result<SandboxInfo, ManagerError> {
        let egress = match self.egress(&id, &spec) {
            Ok(e) => e,
            Err(e) => {
                self.store.mark_back_paused(&id)?;
                return Err(e);
            }
        };
        let (host, base_env) = self.host_for(&spec.image);
        let env = base_env.into_iter().chain(spec.env.clone()).collect();
        let cfg = SandboxConfig { cpus: spec.cpus, memory_mib: spec.memory_mib, env, egress, ..SandboxConfig::default() };
        let t0 = Instant::now();
        let sb = match Sandbox::resume_from(host, &cfg, &src).await {
            Ok(sb) => sb,
            Err(e) => {
                let msg = hutch_sandbox::error_chain(&e);
                tracing::warn!(%id, "resume failed: {msg}");
                // Refused before the saved disk layer moved: still paused, nothing lost.
                if src.join(hutch_sandbox::pause::DISK_FILE).is_file() {
                    self.store.mark_back_paused(&id)?;
                    return Err(ManagerError::Conflict(format!("sandbox {id} cannot be resumed here: {msg}")));
                }
                let _ = std::fs::remove_dir_all(&src);
                self.store.mark_ended(&id, "failed", &format!("resume failed: {msg}"))?;
                return Err(ManagerError::Failed(format!("sandbox {id} could not be resumed (it is lost): {msg}")));
            }
        };
        let took = t0.elapsed();
        let _ = std::fs::remove_dir_all(&src);
        self.store.set_expiry(&id, now_ms() + ttl as i64 * 1000)?;
        if let Err(e) = self.store.mark_running(&id, &sb.id, sb.vmm_pid(), "resumed", took.as_millis() as i64) {
            sb.destroy().await;
            self.store.mark_ended(&id, "failed", "could not record the resume")?;
            return Err(e.into());
        }
        tracing::info!(%id, vm = %sb.id, took_ms = took.as_millis() as u64, "sandbox resumed");
        self.go_live(id, owner, sb, slot, None, (spec.cpus, spec.memory_mib)).await
    }

    pub(crate) async fn destroy_live(&self, id: &str, reason: &str) -> bool {
        let Some(live) = self.live_map().get(id).cloned() else { return false };
        let _ = self.store.mark_destroying(id);
        let _ = live.stop.send(Cmd::Destroy(reason.to_string())).await;
        let mut done = live.done.clone();
        let _ = done.wait_for(|d| *d).await;
        true
    }

    /// The row for `id` if `who` may see it; others' sandboxes do not exist for a non-admin token.
    pub fn visible(&self, who: &Principal, id: &str) -> Result<SandboxRow, ManagerError> {
        let not_found = || ManagerError::NotFound(format!("no sandbox {id}"));
        let row = self.store.sandbox(id)?.ok_or_else(not_found)?;
        if row.owner != who.token_id && !who.admin {
            return Err(not_found());
        }
        Ok(row)
    }

    /// A running sandbox `who` may use.
    pub fn running(&self, who: &Principal, id: &str) -> Result<Arc<Live>, ManagerError> {
        let row = self.visible(who, id)?;
        match self.live_map().get(id) {
            Some(l) if row.state == "running" => Ok(l.clone()),
            _ => Err(ManagerError::Conflict(format!("sandbox {id} is {}, not running", row.state))),
        }
    }

    pub async fn delete(&self, who: &Principal, id: &str) -> Result<SandboxInfo, ManagerError> {
        let row = self.visible(who, id)?;
        match row.state.as_str() {
            "destroyed" | "failed" => {
                return Err(ManagerError::Conflict(format!("sandbox {id} already ended ({})", row.end_reason.unwrap_or_default())))
            }
            "creating" => return Err(ManagerError::Conflict(format!("sandbox {id} is still starting; delete it once it runs"))),
            "paused" => {
                // No VM: the saved state is all there is.
                if let Ok(dir) = self.paused_dir(id) {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                self.store.mark_ended(id, "destroyed", &format!("deleted by token {} while paused", who.name))?;
                return self.info(id);
            }
            _ => {}
        }
        if !self.destroy_live(id, &format!("deleted by token {}", who.name)).await {
            // Destroying already, by another request or the TTL: wait for it to finish.
            for _ in 0..600 {
                if self.store.sandbox(id)?.is_some_and(|r| r.state == "destroyed" || r.state == "failed") {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.info(id)
    }

    pub fn extend(&self, who: &Principal, id: &str, seconds: u64) -> Result<SandboxInfo, ManagerError> {
        let row = self.visible(who, id)?;
        if row.state != "running" && row.state != "creating" {
            return Err(ManagerError::Conflict(format!("sandbox {id} is {}; only a live sandbox can be extended", row.state)));
        }
        let now = now_ms();
        let max = self.limits.max_ttl.as_millis() as i64;
        let new = row.expires_ms.max(now).saturating_add(seconds.min(i64::MAX as u64 / 2000) as i64 * 1000);
        if seconds == 0 || new - now > max {
            return Err(ManagerError::BadInput(format!(
                "seconds must be at least 1 and keep the expiry within {} s from now (it is {} s away)",
                max / 1000,
                (row.expires_ms - now).max(0) / 1000
            )));
        }
        self.store.set_expiry(id, new)?;
        self.info(id)
    }

    pub fn info(&self, id: &str) -> Result<SandboxInfo, ManagerError> {
        let row = self.store.sandbox(id)?.ok_or_else(|| ManagerError::NotFound(format!("no sandbox {id}")))?;
        self.to_info(row)
    }

    pub fn to_info(&self, row: SandboxRow) -> Result<SandboxInfo, ManagerError> {
        let spec: CheckedCreate = serde_json::from_str(&row.spec).map_err(|e| DaemonError::Internal(format!("sandbox {} spec: {e}", row.id)))?;
        let labels = serde_json::from_str(&row.labels).unwrap_or_default();
        let owner = self.store.token(&row.owner)?.map(|t| t.name).unwrap_or_else(|| row.owner.clone());
        Ok(SandboxInfo {
            id: row.id,
            state: SandboxState::parse(&row.state).unwrap_or(SandboxState::Failed),
            owner,
            image: spec.image,
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            env: spec.env,
            policy: spec.policy,
            secrets: spec.secrets,
            labels,
            created_ms: row.created_ms,
            expires_ms: row.expires_ms,
            started_ms: row.started_ms,
            ended_ms: row.ended_ms,
            end_reason: row.end_reason,
            start_mode: row.start_mode,
            start_ms: row.start_ms,
        })
    }

    pub fn list(&self, who: &Principal, state: Option<SandboxState>, labels: &BTreeMap<String, String>, all: bool) -> Result<Vec<SandboxInfo>, ManagerError> {
        let owner = if who.admin { None } else { Some(who.token_id.as_str()) };
        let rows = self.store.sandboxes(owner, state.map(|s| s.as_str()))?;
        let mut out = Vec::new();
        for r in rows {
            let st = SandboxState::parse(&r.state).unwrap_or(SandboxState::Failed);
            if state.is_none() && !all && st.ended() {
                continue;
            }
            let l: BTreeMap<String, String> = serde_json::from_str(&r.labels).unwrap_or_default();
            if labels.iter().any(|(k, v)| l.get(k) != Some(v)) {
                continue;
            }
            out.push(self.to_info(r)?);
        }
        Ok(out)
    }

    pub fn live_count(&self) -> usize {
        self.live_map().len()
    }

    /// Settles what a previous daemon left: its VMs cannot be re-attached (each was this process's child and
    /// died with it), so every unfinished row becomes `destroyed` and every leftover directory and VM is
    /// removed. Afterwards the database and the machine agree: nothing runs that the database does not show.
    pub fn reconcile(&self) -> Result<Reconciled, DaemonError> {
        let mut out = Reconciled::default();
        for row in self.store.unfinished()? {
            if row.daemon_pid == std::process::id() as i64 && self.live_map().contains_key(&row.id) {
                continue;
            }
            let reason = format!("the daemon restarted (previous pid {}); the VM did not survive it and was cleaned up", row.daemon_pid);
            self.store.mark_ended(&row.id, "destroyed", &reason)?;
            self.metrics.destroyed("daemon_restart");
            out.marked_destroyed.push(row.id);
        }
        out.reaped = self.host.reap_stale();
        self.reconcile_paused(&mut out)?;
        Ok(out)
    }

    /// Paused sandboxes survive a restart: each `paused` row keeps its saved directory; a row whose directory is
    /// gone is failed, and a directory no paused row names (a pause or resume that a crash interrupted) removed.
    fn reconcile_paused(&self, out: &mut Reconciled) -> Result<(), DaemonError> {
        let Some(root) = self.pause_root.get() else { return Ok(()) };
        let paused: Vec<String> = self.store.sandboxes(None, Some("paused"))?.into_iter().map(|r| r.id).collect();
        for id in &paused {
            if !root.join(id).join(hutch_sandbox::pause::STATE_FILE).is_file() {
                self.store.mark_ended(id, "failed", "its saved state is missing from the data directory")?;
                out.marked_destroyed.push(id.clone());
            }
        }
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !paused.contains(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        Ok(())
    }

    /// Destroys sandboxes whose TTL has passed, every `every`, until shutdown.
    pub async fn expire_loop(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            let expired = match self.store.expired(now_ms()) {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!("cannot list expired sandboxes: {e}");
                    continue;
                }
            };
            for id in expired {
                let me = self.clone();
                self.tasks.spawn(async move {
                    if me.destroy_live(&id, "ttl expired").await {
                        tracing::info!(%id, "ttl expired; destroyed");
                    }
                });
            }
        }
    }

    /// Stops taking new sandboxes, destroys every live one, and waits for all sandbox tasks to end.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let pool = self.pool.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(p) = pool {
            p.drain().await;
        }
        let ids: Vec<String> = self.live_map().keys().cloned().collect();
        let stops = ids.iter().map(|id| self.destroy_live(id, "the daemon shut down"));
        futures::future::join_all(stops).await;
        self.tasks.close();
        self.tasks.wait().await;
        // A start that was in flight finished and saw the flag; anything it left is gone by now.
        let left: Vec<String> = self.live_map().keys().cloned().collect();
        for id in left {
            self.destroy_live(&id, "the daemon shut down").await;
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// Runs a create's setup script as root from `/root` with the setup phase's environment; an error carries the end
/// of its output (escaped). Output is not kept beyond that tail, however much the guest prints.
async fn run_setup(sb: &Sandbox, script: &str) -> Result<(), String> {
    let client = sb.client();
    let bytes = script.as_bytes();
    client.put_file(SETUP_PATH, 0o700, bytes.len() as u64, bytes).await.map_err(|e| format!("uploading the setup script: {}", hutch_sandbox::error_chain(&e)))?;
    let argv = if bytes.starts_with(b"#!") { vec![SETUP_PATH.to_string()] } else { vec!["sh".to_string(), SETUP_PATH.to_string()] };
    let env = hutch_sandbox::egress::setup_env(sb.gateway());
    let req = hutch_proto::ExecRequest { argv, env, cwd: Some("/root".into()), stdin: false, tty: None };
    let mut h = client.exec(req).await.map_err(|e| format!("starting the setup script: {}", hutch_sandbox::error_chain(&e)))?;
    let mut tail: Vec<u8> = Vec::new();
    while let Some(ev) = h.events.next().await {
        match ev {
            hutch_proto::ExecEvent::Stdout(b) | hutch_proto::ExecEvent::Stderr(b) => {
                tail.extend_from_slice(&b);
                if tail.len() > SETUP_TAIL {
                    tail.drain(..tail.len() - SETUP_TAIL);
                }
            }
            hutch_proto::ExecEvent::Started { .. } => {}
            hutch_proto::ExecEvent::Exited(hutch_proto::ExitStatus::Code(0)) => return Ok(()),
            hutch_proto::ExecEvent::Exited(st) => {
                return Err(format!("{SETUP_FAILED} with exit code {}; its last output: {}", st.as_shell_code(), hutch_text::escape_lines(&tail)))
            }
            hutch_proto::ExecEvent::SpawnFailed { message, .. } => return Err(format!("{SETUP_FAILED} to start: {}", hutch_text::escape(&message))),
        }
    }
    Err("the agent channel closed while the setup script ran".into())
}

fn reason_label(reason: &str) -> &'static str {
    if reason.starts_with("deleted") {
        "deleted"
    } else if reason.starts_with("ttl") {
        "ttl"
    } else {
        "shutdown"
    }
}
