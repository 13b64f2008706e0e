//! The triggers file (`hutch serve --triggers FILE`), read once into checked values. Every error names the
//! file, the trigger and the key. Nothing in it is ever taken from an event: the payload can choose only what a
//! trigger explicitly reads from it (the repository, among those the trigger lists, the ref, the issue number
//! and the concurrency key), never the image, the policy, the secrets or where the result goes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hutch_policy::{PhasedPolicy, PolicyLayer};
use serde::Deserialize;

/// A problem in the triggers file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the triggers file {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    #[error("{}: trigger {trigger:?}: {key}: {message}", path.display())]
    Key { path: PathBuf, trigger: String, key: String, message: String },
}

/// Where events come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// GitHub-compatible webhooks: `X-Hub-Signature-256`, `X-GitHub-Event`, `X-GitHub-Delivery`.
    GitHub { secret: String },
    /// Any JSON, signed the same way; the delivery id is `X-Hutch-Delivery` (or the body's digest).
    Generic { secret: String },
    /// A cron expression in UTC.
    Schedule { expr: String, cron: Box<croner::Cron> },
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::GitHub { .. } => "github",
            Source::Generic { .. } => "generic",
            Source::Schedule { .. } => "schedule",
        }
    }

    /// The store secret holding the webhook's HMAC key.
    pub fn hmac_secret(&self) -> Option<&str> {
        match self {
            Source::GitHub { secret } | Source::Generic { secret } => Some(secret),
            Source::Schedule { .. } => None,
        }
    }
}

/// A dotted path to a value in the JSON payload (`issue.number`), keys only.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldPath(pub Vec<String>);

impl FieldPath {
    fn parse(s: &str) -> Result<FieldPath, String> {
        let parts: Vec<String> = s.split('.').map(str::to_string).collect();
        let ok = !s.is_empty()
            && parts.len() <= 16
            && parts.iter().all(|p| !p.is_empty() && p.len() <= 64 && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        if ok {
            Ok(FieldPath(parts))
        } else {
            Err(format!("{s:?} is not a field path (keys of letters, digits, '_' or '-' joined by '.', e.g. \"issue.number\")"))
        }
    }

    pub fn get<'a>(&self, v: &'a serde_json::Value) -> Option<&'a serde_json::Value> {
        self.0.iter().try_fold(v, |v, k| v.get(k))
    }

    pub fn text(&self) -> String {
        self.0.join(".")
    }
}

/// Either a fixed value from the file or a field of the payload.
#[derive(Debug, Clone)]
pub enum Value<T> {
    Fixed(T),
    Field(FieldPath),
}

/// What an event must look like to start a run. Empty lists match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub events: Vec<String>,
    pub actions: Vec<String>,
    /// `OWNER/NAME`, lowercase.
    pub repositories: Vec<String>,
    pub branches: Vec<String>,
    pub labels: Vec<String>,
    pub comment_prefix: Option<String>,
    /// Logins, lowercase.
    pub authors: Vec<String>,
}

/// Where results go and how the VM reaches the repository.
#[derive(Debug, Clone)]
pub struct Forge {
    /// The REST API's root (`https://api.github.com`).
    pub api: String,
    /// The git server's root (`https://github.com`); clone URLs are `<git>/OWNER/NAME.git`.
    pub git: String,
    /// The git server's host and port, for the setup phase's allow rule and the token's binding.
    pub git_host: String,
    pub git_port: u16,
    /// Where the daemon itself reaches the forge's git, when not at `git` (the VM's view, through its gateway
    /// and pins): `<git_from_host>/OWNER/NAME.git`.
    pub git_from_host: Option<String>,
    /// The store secret holding the forge token.
    pub token: String,
    pub ca_file: Option<PathBuf>,
}

/// What a newer event with the same concurrency key does to an older run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// The older run is cancelled (queued or running).
    Cancel,
    /// The newer run waits until the older one ended.
    Queue,
}

/// The job a matching event starts.
#[derive(Debug, Clone)]
pub struct JobTemplate {
    pub repository: Value<(String, String)>,
    pub git_ref: Value<String>,
    pub issue: Option<FieldPath>,
    pub forge: Forge,
    pub setup: Option<String>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The trigger's egress in the policy file format (`allow`, `resolve`, `upstream_ca`, `[secrets]`,
    /// `[setup]`), checked when the file is read; the forge's clone rule is added per run.
    pub policy: PolicyLayer,
    pub cpus: u32,
    pub memory_mib: u32,
    pub timeout: Duration,
    pub concurrency: Option<(Value<String>, OnConflict)>,
    pub pull_request: bool,
    pub comment: bool,
    pub allow_sensitive: bool,
    pub title: String,
    /// Use and fill the environment cache for the setup (`cache = false`: the setup runs every time).
    pub cache: bool,
    /// Declared inputs of the setup (`cache_inputs`): repository-relative paths whose content at the event's
    /// commit decides whether a cached environment still fits (checked by [`check_input_path`]).
    pub cache_inputs: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Trigger {
    pub name: String,
    pub source: Source,
    pub filter: Filter,
    pub job: JobTemplate,
    /// Largest webhook body accepted (413 beyond).
    pub max_body: usize,
    /// Deliveries accepted per minute from this source (429 beyond).
    pub per_minute: u32,
    /// Runs of this trigger at once.
    pub max_running: usize,
}

/// The whole file, checked.
#[derive(Debug, Clone, Default)]
pub struct TriggerSet {
    pub path: PathBuf,
    pub triggers: BTreeMap<String, Trigger>,
    /// Runs at once across all triggers.
    pub max_running: usize,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    max_running: Option<usize>,
    #[serde(default)]
    trigger: Vec<toml::Table>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    name: String,
    source: String,
    secret: Option<String>,
    schedule: Option<String>,
    max_body_kib: Option<usize>,
    per_minute: Option<u32>,
    max_running: Option<usize>,
    #[serde(default)]
    filter: RawFilter,
    forge: RawForge,
    job: toml::Table,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    repositories: Vec<String>,
    #[serde(default)]
    branches: Vec<String>,
    #[serde(default)]
    labels: Vec<String>,
    comment_prefix: Option<String>,
    #[serde(default)]
    authors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForge {
    api: String,
    git: String,
    git_from_host: Option<String>,
    token: String,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    repository: Option<String>,
    repository_from: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    ref_from: Option<String>,
    issue_from: Option<String>,
    setup: Option<String>,
    command: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    policy: Option<toml::Table>,
    cpus: Option<u32>,
    memory_mib: Option<u32>,
    timeout_secs: Option<u64>,
    concurrency_key: Option<String>,
    concurrency_key_from: Option<String>,
    on_conflict: Option<OnConflict>,
    #[serde(default = "yes")]
    pull_request: bool,
    #[serde(default)]
    comment: bool,
    #[serde(default)]
    allow_sensitive: bool,
    title: Option<String>,
    #[serde(default = "yes")]
    cache: bool,
    #[serde(default)]
    cache_inputs: Vec<String>,
}

/// Most declared inputs per trigger, and the longest path.
pub const MAX_CACHE_INPUTS: usize = 32;
pub const MAX_INPUT_PATH: usize = 256;

/// A declared input: a path relative to the repository's root, `/`-separated, of plain components (letters,
/// digits, `-`, `_`, `.`, `+`, `@`; not `.` or `..`). The narrow spelling keeps it one path to git (`COMMIT:PATH`
/// has no revision syntax in it) and one line in a log.
pub fn check_input_path(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_INPUT_PATH {
        return Err(format!("{s:?}: a path is 1 to {MAX_INPUT_PATH} bytes"));
    }
    if s.starts_with('/') {
        return Err(format!("{s:?} is absolute; name a path relative to the repository's root, e.g. \"requirements.txt\""));
    }
    for c in s.split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!("{s:?}: no empty, \".\" or \"..\" components (a path inside the repository, e.g. \"web/package-lock.json\")"));
        }
        if c.starts_with('-') || !c.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.+@".contains(&b)) {
            return Err(format!("{s:?}: components are letters, digits, '-', '_', '.', '+' or '@' (not starting with '-')"));
        }
    }
    Ok(())
}

fn yes() -> bool {
    true
}

/// Trigger names, store secret names and the like: what may appear in a URL path and a log line.
fn check_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `OWNER/NAME` as GitHub allows them.
pub fn parse_repo(s: &str) -> Option<(String, String)> {
    let (o, n) = s.split_once('/')?;
    let part = |p: &str| !p.is_empty() && p.len() <= 100 && !p.starts_with('.') && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    (part(o) && part(n) && !n.ends_with(".git")).then(|| (o.to_string(), n.to_string()))
}

/// A branch or tag name git and hutch both accept as an argument: no option-looking or odd spellings.
pub fn check_ref(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with(['-', '/', '.'])
        && !s.ends_with(['/', '.'])
        && !s.contains("..")
        && !s.contains("//")
        && !s.ends_with(".lock")
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

/// `https://HOST[:PORT]` with nothing after it; the host and port.
fn parse_https_root(s: &str) -> Option<(String, u16)> {
    let rest = s.strip_prefix("https://")?.trim_end_matches('/');
    if rest.is_empty() || rest.contains(['/', '@', '?', '#']) {
        return None;
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (rest, 443),
    };
    let host = host.to_ascii_lowercase();
    let ok = !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
    ok.then_some((host, port))
}

impl TriggerSet {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<TriggerSet, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        TriggerSet::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<TriggerSet, ConfigError> {
        let syntax = |message: String| ConfigError::Syntax { path: path.to_path_buf(), message };
        let raw: RawFile = toml::from_str(text).map_err(|e| syntax(e.to_string().trim_end().to_string()))?;
        let mut set = TriggerSet { path: path.to_path_buf(), triggers: BTreeMap::new(), max_running: raw.max_running.unwrap_or(2) };
        if set.max_running == 0 || set.max_running > 256 {
            return Err(syntax("max_running: must be 1 to 256".into()));
        }
        for (i, table) in raw.trigger.into_iter().enumerate() {
            let label = table.get("name").and_then(|v| v.as_str()).map(str::to_string).unwrap_or_else(|| format!("#{}", i + 1));
            let key_err = |key: &str, message: String| ConfigError::Key { path: path.to_path_buf(), trigger: label.clone(), key: key.to_string(), message };
            let rt: RawTrigger = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
                // toml names the offending key in its message; keep it.
                key_err("(table)", e.message().trim_end().to_string())
            })?;
            let t = check_trigger(rt, path).map_err(|(key, message)| key_err(&key, message))?;
            if set.triggers.contains_key(&t.name) {
                return Err(key_err("name", "another trigger has this name".into()));
            }
            set.triggers.insert(t.name.clone(), t);
        }
        Ok(set)
    }
}

type KeyResult<T> = Result<T, (String, String)>;

fn k<T>(key: &str, r: Result<T, String>) -> KeyResult<T> {
    r.map_err(|m| (key.to_string(), m))
}

fn check_trigger(rt: RawTrigger, path: &Path) -> KeyResult<Trigger> {
    if !check_name(&rt.name) {
        return Err(("name".into(), "must be 1-64 letters, digits, '-', '_' or '.' (it is part of the URL /hooks/NAME)".into()));
    }
    let secret = |rt: &RawTrigger| -> KeyResult<String> {
        match &rt.secret {
            Some(s) if check_name(s) => Ok(s.clone()),
            Some(_) => Err(("secret".into(), "must name a secret in the daemon's store (letters, digits, '-', '_', '.')".into())),
            None => Err(("secret".into(), "a webhook needs the name of its HMAC secret in the daemon's store (`hutch secret set NAME`); the value never goes in this file".into())),
        }
    };
    let source = match rt.source.as_str() {
        "github" => Source::GitHub { secret: secret(&rt)? },
        "generic" => Source::Generic { secret: secret(&rt)? },
        "schedule" => {
            let expr = rt.schedule.clone().ok_or(("schedule".to_string(), "a schedule source needs a cron expression, e.g. \"0 3 * * *\" (UTC)".to_string()))?;
            let cron = croner::Cron::new(&expr).with_seconds_optional().parse().map_err(|e| ("schedule".to_string(), format!("{expr:?} is not a cron expression: {e}")))?;
            if rt.secret.is_some() {
                return Err(("secret".into(), "a schedule has no webhook secret".into()));
            }
            Source::Schedule { expr, cron: Box::new(cron) }
        }
        other => return Err(("source".into(), format!("{other:?} is not a source; use \"github\", \"generic\" or \"schedule\""))),
    };
    if rt.schedule.is_some() && !matches!(source, Source::Schedule { .. }) {
        return Err(("schedule".into(), "only a schedule source has a cron expression".into()));
    }
    let f = rt.filter;
    let lower = |v: Vec<String>| v.into_iter().map(|s| s.to_ascii_lowercase()).collect::<Vec<_>>();
    let filter = Filter {
        events: f.events,
        actions: f.actions,
        repositories: lower(f.repositories),
        branches: f.branches,
        labels: f.labels,
        comment_prefix: f.comment_prefix,
        authors: lower(f.authors),
    };
    for r in &filter.repositories {
        if parse_repo(r).is_none() {
            return Err(("filter.repositories".into(), format!("{r:?} is not OWNER/NAME")));
        }
    }
    if matches!(source, Source::Schedule { .. }) && (!filter.events.is_empty() || !filter.actions.is_empty() || !filter.authors.is_empty() || filter.comment_prefix.is_some() || !filter.labels.is_empty()) {
        return Err(("filter".into(), "a schedule has no events to filter".into()));
    }
    if matches!(source, Source::Generic { .. }) && (!filter.events.is_empty() || !filter.labels.is_empty() || filter.comment_prefix.is_some() || !filter.authors.is_empty()) {
        return Err(("filter".into(), "a generic source filters on actions, repositories and branches only (events, labels, comments and authors are GitHub's)".into()));
    }
    let (git_host, git_port) = parse_https_root(&rt.forge.git).ok_or(("forge.git".to_string(), format!("{:?} is not https://HOST[:PORT]", rt.forge.git)))?;
    parse_https_root(&rt.forge.api.replace("/api/v3", "")).ok_or(("forge.api".to_string(), format!("{:?} is not an https:// URL", rt.forge.api)))?;
    if !check_name(&rt.forge.token) {
        return Err(("forge.token".into(), "must name the forge token's secret in the daemon's store; the value never goes in this file".into()));
    }
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let forge = Forge {
        api: rt.forge.api.trim_end_matches('/').to_string(),
        git: rt.forge.git.trim_end_matches('/').to_string(),
        git_host,
        git_port,
        git_from_host: match rt.forge.git_from_host {
            Some(g) if parse_https_root(&g).is_some() => Some(g.trim_end_matches('/').to_string()),
            Some(g) => return Err(("forge.git_from_host".into(), format!("{g:?} is not https://HOST[:PORT]"))),
            None => None,
        },
        token: rt.forge.token,
        ca_file: rt.forge.ca_file.map(|p| base.join(p)),
    };
    if let Some(ca) = &forge.ca_file {
        if !ca.is_file() {
            return Err(("forge.ca_file".into(), format!("{} is not a file", ca.display())));
        }
    }
    let job = check_job(&rt.name, &source, &filter, forge, rt.job, path)?;
    let max_body = rt.max_body_kib.unwrap_or(1024);
    if max_body == 0 || max_body > 25 * 1024 {
        return Err(("max_body_kib".into(), "must be 1 to 25600 (GitHub sends at most 25 MiB)".into()));
    }
    let per_minute = rt.per_minute.unwrap_or(60);
    if per_minute == 0 {
        return Err(("per_minute".into(), "must be at least 1".into()));
    }
    let max_running = rt.max_running.unwrap_or(1);
    if max_running == 0 {
        return Err(("max_running".into(), "must be at least 1".into()));
    }
    Ok(Trigger { name: rt.name, source, filter, job, max_body: max_body << 10, per_minute, max_running })
}

fn either<T>(key: &str, fixed: Option<T>, from: Option<String>, default_from: Option<&str>) -> KeyResult<Option<Value<T>>> {
    match (fixed, from) {
        (Some(_), Some(_)) => Err((key.into(), format!("give {key} or {key}_from, not both"))),
        (Some(v), None) => Ok(Some(Value::Fixed(v))),
        (None, Some(f)) => Ok(Some(Value::Field(k(&format!("{key}_from"), FieldPath::parse(&f))?))),
        (None, None) => match default_from {
            Some(d) => Ok(Some(Value::Field(k(&format!("{key}_from"), FieldPath::parse(d))?))),
            None => Ok(None),
        },
    }
}

fn check_job(name: &str, source: &Source, filter: &Filter, forge: Forge, table: toml::Table, path: &Path) -> KeyResult<JobTemplate> {
    let rj: RawJob = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| ("job".to_string(), e.message().trim_end().to_string()))?;
    let github = matches!(source, Source::GitHub { .. });
    let schedule = matches!(source, Source::Schedule { .. });
    let repo_fixed = match &rj.repository {
        Some(r) => Some(parse_repo(r).ok_or(("job.repository".to_string(), format!("{r:?} is not OWNER/NAME")))?),
        None => None,
    };
    if schedule && rj.repository_from.is_some() {
        return Err(("job.repository_from".into(), "a schedule has no payload; give job.repository".into()));
    }
    let repository = either("job.repository", repo_fixed, rj.repository_from, github.then_some("repository.full_name"))?
        .ok_or(("job.repository".to_string(), "name the repository (job.repository = \"OWNER/NAME\") or the payload field holding it (job.repository_from)".to_string()))?;
    // A repository read from the payload must be one the trigger lists: an event never picks a delivery
    // target of its own.
    if matches!(repository, Value::Field(_)) && filter.repositories.is_empty() {
        return Err(("filter.repositories".into(), "a repository taken from the payload must be one of a list; add filter.repositories = [\"OWNER/NAME\", ...]".into()));
    }
    if let Some(r) = &rj.git_ref {
        if !check_ref(r) {
            return Err(("job.ref".into(), format!("{r:?} is not a branch or tag name")));
        }
    }
    let git_ref = either("job.ref", rj.git_ref, rj.ref_from, github.then_some("repository.default_branch"))?
        .ok_or(("job.ref".to_string(), "name the ref to clone (job.ref = \"main\") or the payload field holding it (job.ref_from)".to_string()))?;
    let issue = match rj.issue_from {
        Some(f) => Some(k("job.issue_from", FieldPath::parse(&f))?),
        None if github => Some(FieldPath(vec!["issue".into(), "number".into()])),
        None => None,
    };
    if rj.command.is_empty() || rj.command.len() > 256 || rj.command.iter().any(|a| a.contains('\0')) {
        return Err(("job.command".into(), "must be a non-empty list of arguments (argv, no shell unless you name one), without NUL bytes".into()));
    }
    for (k_, v) in &rj.env {
        let ok = !k_.is_empty() && !k_.starts_with(|c: char| c.is_ascii_digit()) && k_.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok || k_.starts_with("HUTCH_") || v.contains('\0') {
            return Err(("job.env".into(), format!("{k_:?}: names are letters, digits and '_' (not HUTCH_*, which hutch sets), values without NUL")));
        }
    }
    let origin = format!("{}: trigger {name:?} job.policy", path.display());
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let policy = match &rj.policy {
        Some(t) => PolicyLayer::from_table(t, &origin, &base).map_err(|e| ("job.policy".to_string(), e.to_string()))?,
        None => PolicyLayer::default(),
    };
    // Checked as each run will merge it: under the setup phase's rule for the clone.
    let clone = clone_layer(&forge, "owner", "repo").map_err(|e| ("forge".to_string(), e))?;
    PhasedPolicy::merge(&[clone, policy.clone()]).map_err(|e| ("job.policy".to_string(), e.to_string()))?;
    let cpus = rj.cpus.unwrap_or(1);
    let memory_mib = rj.memory_mib.unwrap_or(512);
    if !(1..=64).contains(&cpus) || !(128..=65536).contains(&memory_mib) {
        return Err(("job.cpus".into(), "cpus 1-64 and memory_mib 128-65536".into()));
    }
    let timeout = Duration::from_secs(rj.timeout_secs.unwrap_or(1800));
    if timeout.is_zero() || timeout > Duration::from_secs(86_400) {
        return Err(("job.timeout_secs".into(), "must be 1 to 86400".into()));
    }
    let key = either("job.concurrency_key", rj.concurrency_key, rj.concurrency_key_from, None)?;
    let concurrency = match (key, rj.on_conflict) {
        (Some(k_), c) => Some((k_, c.unwrap_or(OnConflict::Queue))),
        (None, Some(_)) => return Err(("job.on_conflict".into(), "needs job.concurrency_key or job.concurrency_key_from".into())),
        (None, None) => None,
    };
    if let Some(s) = &rj.setup {
        if s.len() > 1 << 20 {
            return Err(("job.setup".into(), "at most 1 MiB".into()));
        }
    }
    if rj.cache_inputs.len() > MAX_CACHE_INPUTS {
        return Err(("job.cache_inputs".into(), format!("at most {MAX_CACHE_INPUTS} paths")));
    }
    for p in &rj.cache_inputs {
        k("job.cache_inputs", check_input_path(p))?;
    }
    if !rj.cache_inputs.is_empty() && (rj.setup.is_none() || !rj.cache) {
        return Err(("job.cache_inputs".into(), "declared inputs key the environment cache of the setup; they need job.setup and the cache on".into()));
    }
    let mut cache_inputs = rj.cache_inputs;
    cache_inputs.sort();
    cache_inputs.dedup();
    let title = rj.title.unwrap_or_else(|| format!("hutch: {name}"));
    if title.len() > 200 || title.chars().any(char::is_control) {
        return Err(("job.title".into(), "at most 200 characters, no control characters".into()));
    }
    Ok(JobTemplate {
        repository,
        git_ref,
        issue,
        forge,
        setup: rj.setup,
        command: rj.command,
        env: rj.env,
        policy,
        cpus,
        memory_mib,
        timeout,
        concurrency,
        pull_request: rj.pull_request,
        comment: rj.comment,
        allow_sensitive: rj.allow_sensitive,
        title,
        cache: rj.cache,
        cache_inputs,
    })
}

/// The setup phase's egress for cloning `owner/repo`: the git host on its port, limited to the repository's
/// path, and the forge token's secret bound to that path (its value is swapped in by the gateway; the VM holds a
/// placeholder).
pub fn clone_layer(f: &Forge, owner: &str, repo: &str) -> Result<PolicyLayer, String> {
    let host_port = format!("{}:{}", f.git_host, f.git_port);
    let mut rule = toml::Table::new();
    rule.insert("host".into(), f.git_host.clone().into());
    rule.insert("ports".into(), toml::Value::Array(vec![(f.git_port as i64).into()]));
    rule.insert("paths".into(), toml::Value::Array(vec![format!("/{owner}/{repo}.git/").into()]));
    let mut binding = toml::Table::new();
    binding.insert("hosts".into(), toml::Value::Array(vec![format!("{host_port}/{owner}/{repo}.git/").into()]));
    let mut secrets = toml::Table::new();
    secrets.insert(f.token.clone(), binding.into());
    let mut setup = toml::Table::new();
    setup.insert("allow".into(), toml::Value::Array(vec![rule.into()]));
    setup.insert("secrets".into(), secrets.into());
    let mut root = toml::Table::new();
    root.insert("setup".into(), setup.into());
    PolicyLayer::from_table(&root, "the run's clone of the repository", Path::new("/")).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
max_running = 3

[[trigger]]
name = "comment-fix"
source = "github"
secret = "HOOK_SECRET"
[trigger.filter]
events = ["issue_comment"]
actions = ["created"]
repositories = ["Acme/widget"]
comment_prefix = "/hutch"
authors = ["Alice"]
[trigger.forge]
api = "https://api.github.com"
git = "https://github.com"
token = "FORGE_TOKEN"
[trigger.job]
command = ["sh", "-c", "make fix"]
concurrency_key_from = "issue.number"
on_conflict = "cancel"
comment = true
[trigger.job.policy]
allow = [{ host = "api.anthropic.com" }]

[[trigger]]
name = "nightly"
source = "schedule"
schedule = "0 3 * * *"
[trigger.forge]
api = "https://api.github.com"
git = "https://github.com"
token = "FORGE_TOKEN"
[trigger.job]
repository = "acme/widget"
ref = "main"
command = ["make", "update-deps"]
"#;

    fn parse(text: &str) -> Result<TriggerSet, ConfigError> {
        TriggerSet::parse(text, Path::new("/etc/hutch/triggers.toml"))
    }

    #[test]
    fn a_good_file_is_checked_into_typed_values() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.max_running, 3);
        let t = &s.triggers["comment-fix"];
        assert!(matches!(&t.source, Source::GitHub { secret } if secret == "HOOK_SECRET"));
        assert_eq!(t.filter.repositories, vec!["acme/widget"]);
        assert_eq!(t.filter.authors, vec!["alice"]);
        assert!(matches!(&t.job.repository, Value::Field(f) if f.text() == "repository.full_name"));
        assert!(matches!(&t.job.concurrency, Some((Value::Field(f), OnConflict::Cancel)) if f.text() == "issue.number"));
        assert_eq!((t.job.forge.git_host.as_str(), t.job.forge.git_port), ("github.com", 443));
        assert!(t.job.cache, "the environment cache is on unless a job turns it off");
        let off = parse(&GOOD.replace("comment = true\n", "comment = true\ncache = false\n")).unwrap();
        assert!(!off.triggers["comment-fix"].job.cache);
        let n = &s.triggers["nightly"];
        assert!(matches!(&n.source, Source::Schedule { .. }));
        assert!(matches!(&n.job.repository, Value::Fixed((o, r)) if o == "acme" && r == "widget"));
    }

    #[test]
    fn errors_name_the_file_the_trigger_and_the_key() {
        let cases = [
            (GOOD.replace("secret = \"HOOK_SECRET\"\n", ""), "comment-fix", "secret"),
            (GOOD.replace("repositories = [\"Acme/widget\"]\n", ""), "comment-fix", "filter.repositories"),
            (GOOD.replace("schedule = \"0 3 * * *\"", "schedule = \"every day\""), "nightly", "schedule"),
            (GOOD.replace("ref = \"main\"", "ref = \"--upload-pack=x\""), "nightly", "job.ref"),
            (GOOD.replace("git = \"https://github.com\"\ntoken = \"FORGE_TOKEN\"\n[trigger.job]\nrepository", "git = \"http://github.com\"\ntoken = \"FORGE_TOKEN\"\n[trigger.job]\nrepository"), "nightly", "forge.git"),
            (GOOD.replace("host = \"api.anthropic.com\"", "host = \"1.2.3.4\""), "comment-fix", "job.policy"),
            (GOOD.replace("source = \"schedule\"", "source = \"cron\""), "nightly", "source"),
            (GOOD.replace("on_conflict = \"cancel\"", "on_conflict = \"drop\""), "comment-fix", "job"),
        ];
        for (text, trigger, key) in cases {
            let e = parse(&text).err().unwrap_or_else(|| panic!("accepted a bad {key}"));
            let msg = e.to_string();
            assert!(msg.starts_with("/etc/hutch/triggers.toml: "), "{msg}");
            assert!(msg.contains(&format!("trigger {trigger:?}")), "{msg}");
            assert!(msg.contains(key), "{key}: {msg}");
        }
        let dup = format!("{GOOD}\n{}", &GOOD[GOOD.find("[[trigger]]\nname = \"nightly\"").unwrap()..]);
        assert!(parse(&dup).unwrap_err().to_string().contains("another trigger has this name"));
        assert!(parse("[[trigger]]\nname = 1").is_err());
    }

    #[test]
    fn cache_inputs_are_checked_repository_paths() {
        let with = |list: &str| GOOD.replace("comment = true\n", &format!("comment = true\nsetup = \"pip install -r deps.txt\"\ncache_inputs = {list}\n"));
        let s = parse(&with(r#"["web/package-lock.json", "deps.txt", "deps.txt"]"#)).unwrap();
        assert_eq!(s.triggers["comment-fix"].job.cache_inputs, vec!["deps.txt", "web/package-lock.json"], "sorted, once each");
        assert!(parse(GOOD).unwrap().triggers["comment-fix"].job.cache_inputs.is_empty());
        let many = format!("[{}]", (0..=MAX_CACHE_INPUTS).map(|i| format!("\"f{i}\"")).collect::<Vec<_>>().join(", "));
        let long = format!("[\"{}\"]", "a".repeat(MAX_INPUT_PATH + 1));
        let bad = [
            r#"["/etc/passwd"]"#.to_string(),
            r#"["../x"]"#.into(),
            r#"["a/../../x"]"#.into(),
            r#"["a//b"]"#.into(),
            r#"["./a"]"#.into(),
            r#"["a/"]"#.into(),
            r#"[""]"#.into(),
            r#"["HEAD^{tree}"]"#.into(),
            r#"["a b"]"#.into(),
            r#"["-a"]"#.into(),
            r#"["a\tb"]"#.into(),
            many,
            long,
        ];
        for list in bad {
            let msg = parse(&with(&list)).err().unwrap_or_else(|| panic!("accepted cache_inputs = {list}")).to_string();
            assert!(msg.starts_with("/etc/hutch/triggers.toml: trigger \"comment-fix\": job.cache_inputs: "), "{msg}");
        }
        // Inputs without a cached setup key nothing: refused rather than ignored.
        let no_setup = GOOD.replace("comment = true\n", "comment = true\ncache_inputs = [\"deps.txt\"]\n");
        assert!(parse(&no_setup).unwrap_err().to_string().contains("job.cache_inputs: declared inputs"));
        assert!(parse(&with(r#"["deps.txt"]"#).replace("comment = true\n", "comment = true\ncache = false\n")).is_err());
    }

    #[test]
    fn refs_and_repositories_are_strict() {
        for ok in ["main", "release/1.2", "feature_x-y"] {
            assert!(check_ref(ok), "{ok}");
        }
        for bad in ["-x", "a..b", "a b", "a;b", "/a", "a/", "x.lock", "$(id)", ""] {
            assert!(!check_ref(bad), "{bad}");
        }
        assert!(parse_repo("acme/widget").is_some());
        for bad in ["acme", "acme/widget/x", "acme/.hidden", "acme/w.git", "a b/c"] {
            assert!(parse_repo(bad).is_none(), "{bad}");
        }
    }
}
