//! The repository side of `hutch run` (the working tree into the VM as `/workspace`, a setup phase, the VM's
//! changes back as `refs/hutch/<id>` plus a checked patch, `--apply`) and the `diff`, `apply` and `trust`
//! commands. The checks themselves live in `hutch-repo`; this file decides what to print and when.

use std::io::{IsTerminal, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Subcommand};
use hutch_proto::ExitStatus;
use hutch_repo::guest::{guest_cwd, run_setup, WORKSPACE};
use hutch_repo::project::Trust;
use hutch_gateway::{Gateway, Phase};
use hutch_repo::path::show;
use hutch_repo::{
    store, Collected, CredentialFilter, CredentialRules, HostRepo, Limits, PathPattern, ProjectConfig, Snapshot, Stored, TrustStore,
    Workspace,
};
use hutch_sandbox::AgentClient;

use crate::cli::RunArgs;

const MAX_SETUP: u64 = 1 << 20;
const COLLECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// `hutch run` flags for the repository and the setup phase.
#[derive(Debug, Args, Clone, Default)]
pub struct RepoArgs {
    /// Run FILE as root in the VM before the command (from /workspace when in a repository); its output is shown
    /// under a `setup` header, and if it fails the command does not run. It reaches only what --setup-allow and
    /// --setup-secret (or a [setup] policy table) give it.
    #[arg(long, value_name = "FILE", value_parser = parse_script)]
    pub setup: Option<SetupFile>,
    /// When the command exits 0, apply the VM's changes to the working tree after showing their diffstat.
    #[arg(long)]
    pub apply: bool,
    /// With --apply: also apply changes to paths that can run code on this host later (.vscode/, Makefile, ...).
    #[arg(long, requires = "apply")]
    pub allow_sensitive: bool,
    /// Do not copy the current git repository into the VM (no /workspace, no changes back).
    #[arg(long, conflicts_with = "apply")]
    pub no_repo: bool,
    /// Ignore the repository's hutch.toml.
    #[arg(long)]
    pub no_project_config: bool,
    /// Send credential files matching PATH into the VM although they look like credentials (.env, keys, ...):
    /// a path from the repository's top, as hutch names it, or a pattern (`*.pem`, `config/`). Repeatable.
    #[arg(long = "include", value_name = "PATH", value_parser = parse_include, conflicts_with = "no_repo")]
    pub include: Vec<PathPattern>,
}

fn parse_include(s: &str) -> Result<PathPattern, String> {
    PathPattern::parse(s)
}

/// Paths named per kind of message before the rest are counted instead.
const MAX_NAMED: usize = 20;

/// A setup script given with `--setup`, read once: these bytes are the ones that run.
#[derive(Debug, Clone)]
pub struct SetupFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

pub(crate) fn parse_script(s: &str) -> Result<SetupFile, String> {
    let meta = std::fs::metadata(s).map_err(|e| format!("cannot read script {s}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("script {s} is not a regular file"));
    }
    if meta.len() > MAX_SETUP {
        return Err(format!("script {s} is larger than 1 MiB"));
    }
    let bytes = std::fs::read(s).map_err(|e| format!("cannot read script {s}: {e}"))?;
    Ok(SetupFile { name: s.to_string(), bytes })
}

fn parse_id(s: &str) -> Result<String, String> {
    store::check_id(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

#[derive(Debug, Subcommand)]
pub enum RepoCmd {
    /// Show what a sandbox changed in this repository: its commits (refs/hutch/ID) and the patch `apply` applies.
    Diff(DiffArgs),
    /// Apply a sandbox's changes to the working tree: all of them or, if any does not apply, none.
    Apply(ApplyArgs),
    /// Approve this repository's hutch.toml (pinned to its exact content and its setup script's).
    Trust(TrustArgs),
}

#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Sandbox id or a unique prefix of it (default: the newest result).
    #[arg(value_parser = parse_id)]
    pub id: Option<String>,
    /// Only the summary and the diffstat.
    #[arg(long)]
    pub stat: bool,
    /// List the stored results of this repository.
    #[arg(long, conflicts_with_all = ["id", "stat"])]
    pub list: bool,
    /// Fetch the change of sandbox ID from the daemon ($HUTCH_URL, $HUTCH_TOKEN; `hutch run --detach`) first.
    #[arg(long, value_name = "ID", value_parser = crate::remote::parse_id, conflicts_with_all = ["id", "list"])]
    pub from: Option<String>,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Sandbox id or a unique prefix of it (default: the newest result).
    #[arg(value_parser = parse_id)]
    pub id: Option<String>,
    /// Also apply changes to paths that can run code on this host later (.vscode/, Makefile, hooks, CI, ...).
    #[arg(long)]
    pub allow_sensitive: bool,
    /// Fetch the change of sandbox ID from the daemon ($HUTCH_URL, $HUTCH_TOKEN; `hutch run --detach`) first.
    #[arg(long, value_name = "ID", value_parser = crate::remote::parse_id, conflicts_with = "id")]
    pub from: Option<String>,
}

#[derive(Debug, Args)]
pub struct TrustArgs {
    /// Withdraw the approval instead.
    #[arg(long)]
    pub revoke: bool,
    /// Only show what hutch.toml asks for and whether it is approved.
    #[arg(long, conflicts_with = "revoke")]
    pub show: bool,
}

pub async fn dispatch(c: RepoCmd) -> anyhow::Result<i32> {
    match c {
        // `--from ID`: the daemon's change is fetched into this repository's results, then shown or applied by id.
        RepoCmd::Diff(mut a) => match a.from.take() {
            Some(id) if !crate::fetch::fetch(&current_repo()?, &id).await? => Ok(0),
            from => diff(DiffArgs { id: from.or(a.id.take()), ..a }),
        },
        RepoCmd::Apply(mut a) => match a.from.take() {
            Some(id) if !crate::fetch::fetch(&current_repo()?, &id).await? => Ok(0),
            from => apply(ApplyArgs { id: from.or(a.id.take()), ..a }),
        },
        RepoCmd::Trust(a) => trust(a),
    }
}

fn current_repo() -> anyhow::Result<HostRepo> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    HostRepo::discover(&cwd)?
        .ok_or_else(|| anyhow!("{} is not inside a git work tree; run this in the repository the sandbox ran in", cwd.display()))
}

fn diff(a: DiffArgs) -> anyhow::Result<i32> {
    let repo = current_repo()?;
    if a.list {
        let all = store::list(&repo.results_dir());
        if all.is_empty() {
            println!("no sandbox results in this repository");
        }
        for s in all {
            let m = &s.meta;
            let sens = if m.sensitive.is_empty() { String::new() } else { format!(", {} sensitive", m.sensitive.len()) };
            println!("{}  {:>8}  {} commits, {} files{sens}", m.id, age(m.created_unix), m.commit_count, m.files);
        }
        return Ok(0);
    }
    let stored = store::load(&repo.results_dir(), a.id.as_deref())?;
    let mut err = std::io::stderr().lock();
    summary(&mut err, &stored)?;
    let mut out = std::io::stdout().lock();
    if a.stat {
        writeln!(out, "{}", stored.meta.stat)?;
    } else {
        let patch = stored.apply_patch()?;
        if out.is_terminal() {
            out.write_all(&for_terminal(&patch))?;
        } else {
            out.write_all(&patch)?;
        }
    }
    out.flush()?;
    Ok(0)
}

fn apply(a: ApplyArgs) -> anyhow::Result<i32> {
    let repo = current_repo()?;
    let stored = store::load(&repo.results_dir(), a.id.as_deref())?;
    apply_stored(&repo, &stored, a.allow_sensitive)?;
    Ok(0)
}

fn apply_stored(repo: &HostRepo, stored: &Stored, allow_sensitive: bool) -> anyhow::Result<()> {
    let id = &stored.meta.id;
    let done = hutch_repo::apply(repo, stored, allow_sensitive)?;
    if done.files == 0 {
        eprintln!("hutch: sandbox {id} changed no files; nothing to apply");
    } else {
        eprintln!("hutch: applied {} file changes from sandbox {id} to {}", done.files, repo.top.display());
    }
    for s in &done.sensitive {
        eprintln!("hutch: applied sensitive path {} ({})", s.path, s.kind);
    }
    if let Some(r) = stored.meta.reference.as_ref().filter(|_| stored.meta.commit_count > 0) {
        eprintln!("hutch: the VM's commits stay in {r} (not merged into any branch)");
    }
    Ok(())
}

fn trust(a: TrustArgs) -> anyhow::Result<i32> {
    let repo = current_repo()?;
    let cfg = ProjectConfig::load(&repo.top)?
        .ok_or_else(|| anyhow!("there is no {} in {}", hutch_repo::project::FILE_NAME, repo.top.display()))?;
    let store = TrustStore::from_env()?;
    if a.revoke {
        let n = store.revoke(&cfg.file)?;
        println!("{}: {}", cfg.file.display(), if n > 0 { "approval withdrawn" } else { "was not approved" });
        return Ok(0);
    }
    let asks = cfg.asks();
    println!("{} asks for:", cfg.file.display());
    let out = cfg.leaves_out();
    if asks.is_empty() && out.is_empty() {
        println!("  nothing (it is ignored until it asks for something)");
    } else if asks.is_empty() {
        println!("  nothing that needs approval");
    }
    for ask in &asks {
        println!("  - {ask}");
    }
    if !out.is_empty() {
        println!("and, without needing approval, leaves out:");
        for o in &out {
            println!("  - {o}");
        }
    }
    if a.show {
        let status = match store.check(&cfg) {
            Trust::Trusted => "approved",
            Trust::Changed => "not approved: it changed since it was approved",
            Trust::Unknown => "not approved",
        };
        println!("status: {status}");
        return Ok(0);
    }
    store.trust(&cfg)?;
    println!("approved this version (sha256 {}); a change to it or its setup script needs `hutch trust` again", &cfg.digest[..16]);
    Ok(0)
}

/// A result's header: id, commits, sensitive paths, what the VM changed in its own `.git`.
fn summary(w: &mut dyn Write, s: &Stored) -> std::io::Result<()> {
    let m = &s.meta;
    writeln!(w, "hutch: sandbox {} ({} ago), {} file(s) changed, {} new commit(s)", m.id, age(m.created_unix), m.files, m.commit_count)?;
    if let Some(r) = m.reference.as_ref().filter(|_| m.commit_count > 0) {
        writeln!(w, "hutch: commits in {r}:")?;
        for c in &m.commits {
            writeln!(w, "hutch:   {} {}", c.oid.short(), c.subject)?;
        }
        if m.commit_count > m.commits.len() {
            writeln!(w, "hutch:   ... and {} more", m.commit_count - m.commits.len())?;
        }
    }
    if !m.sensitive.is_empty() {
        writeln!(w, "hutch: sensitive paths (they can run code on this host later; `apply` needs --allow-sensitive):")?;
        for x in &m.sensitive {
            writeln!(w, "hutch:   {} ({})", x.path, x.kind)?;
        }
    }
    if !m.vm_git_metadata.is_empty() {
        writeln!(w, "hutch: the VM changed its own {}; git metadata never leaves the VM", m.vm_git_metadata.join(", "))?;
    }
    Ok(())
}

fn age(created: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let s = now.saturating_sub(created);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Patch text for a terminal: every line escaped by the shared rules (controls other than newline and tab,
/// bidirectional and invisible format characters), so file contents from the VM cannot drive the terminal.
fn for_terminal(b: &[u8]) -> Vec<u8> {
    hutch_text::escape_lines(b).into_bytes()
}

struct Active {
    repo: HostRepo,
    snap: Snapshot,
}

/// One `hutch run`'s repository and setup state, from before the VM exists to after it is gone.
pub struct RunRepo {
    /// The repository found by [`RunRepo::prepare`], until [`RunRepo::snapshot`] takes its snapshot.
    found: Option<HostRepo>,
    active: Option<Active>,
    /// The repository's hutch.toml, when it asks for something and the user approved this version.
    project: Option<ProjectConfig>,
    setup: Option<SetupFile>,
    /// Runs instead of the setup when the VM starts from a cached environment.
    maintenance: Option<SetupFile>,
    /// Which working-tree files stay out of the VM as credentials.
    credentials: CredentialFilter,
    apply: bool,
    allow_sensitive: bool,
    limits: Limits,
    ws: Option<Workspace>,
    collected: Option<(String, anyhow::Result<Collected>)>,
}

impl RunRepo {
    /// Before anything starts, reading only: finds the repository and checks its hutch.toml against the user's
    /// approvals. An unapproved one that asks for anything is refused here; an approved one is kept for
    /// [`RunRepo::project`], and its setup script is used unless `--setup` gave one.
    /// The credential filter is built here too, from `--include`, the user's `[credentials]` and the hutch.toml's
    /// (its `exclude` always, its `include` only once approved).
    pub fn prepare(a: &RunArgs, user_credentials: &CredentialRules) -> anyhow::Result<RunRepo> {
        let r = &a.repo;
        let mut rr = RunRepo {
            found: None,
            active: None,
            project: None,
            setup: r.setup.clone(),
            maintenance: a.cache.maintenance.clone(),
            credentials: CredentialFilter::default(),
            apply: r.apply,
            allow_sensitive: r.allow_sensitive,
            limits: Limits::default(),
            ws: None,
            collected: None,
        };
        if r.no_repo {
            return Ok(rr);
        }
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        let Some(repo) = HostRepo::discover(&cwd).context("looking for a git repository")? else {
            if r.apply {
                bail!("--apply needs a git repository, and {} is not in one", cwd.display());
            }
            return Ok(rr);
        };
        let flags = CredentialRules { exclude: vec![], include: r.include.clone() };
        let mut project_credentials = CredentialRules::default();
        if !r.no_project_config {
            if let Some(cfg) = ProjectConfig::load(&repo.top)? {
                project_credentials.exclude = cfg.credentials.exclude.clone();
                if !cfg.asks().is_empty() {
                    let store = TrustStore::from_env()?;
                    match store.check(&cfg) {
                        Trust::Trusted => {
                            if let (None, Some(s)) = (&rr.setup, &cfg.setup) {
                                rr.setup = Some(SetupFile { name: s.path.clone(), bytes: s.bytes.clone() });
                            }
                            if let (None, Some(s)) = (&rr.maintenance, &cfg.maintenance) {
                                rr.maintenance = Some(SetupFile { name: s.path.clone(), bytes: s.bytes.clone() });
                            }
                            project_credentials.include = cfg.credentials.include.clone();
                            rr.project = Some(cfg);
                        }
                        t => bail!(untrusted(&cfg, t)),
                    }
                }
            }
        }
        rr.credentials = CredentialFilter::new(vec![flags, user_credentials.clone(), project_credentials]);
        rr.found = Some(repo);
        Ok(rr)
    }

    /// The approved hutch.toml, if any.
    pub fn project(&self) -> Option<&ProjectConfig> {
        self.project.as_ref()
    }

    /// Whether a setup script runs before the command (`--setup` or an approved hutch.toml's).
    pub fn has_setup(&self) -> bool {
        self.setup.is_some()
    }

    /// The setup script that runs (its bytes key the environment cache).
    pub fn setup_script(&self) -> Option<&SetupFile> {
        self.setup.as_ref()
    }

    /// The work tree's top directory, once found (before or after the snapshot).
    pub fn top(&self) -> Option<&Path> {
        self.found.as_ref().map(|r| r.top.as_path()).or(self.active.as_ref().map(|a| a.repo.top.as_path()))
    }

    /// In a VM restored from an environment snapshot: the `/workspace` it has is the one of the run that made
    /// the snapshot. It goes, and the current working-tree snapshot enters the usual way, so that files deleted
    /// or changed on the host since then are deleted or changed in the VM too.
    pub async fn replace_workspace(&mut self, client: &AgentClient) -> anyhow::Result<()> {
        // The workspace drive now holds this run's image; mounting it detaches the setup run's workspace and
        // starts a fresh overlay, so a file deleted on the host is gone in the VM.
        self.enter_workspace(client).await
    }

    /// In a VM restored from an environment snapshot, instead of the setup: the maintenance script, if any, with
    /// the setup phase's egress and placeholders; then the gateway moves to the agent phase.
    pub async fn maintenance(&mut self, client: &AgentClient, gateway: &Gateway, command: &[String]) -> anyhow::Result<()> {
        if let Some(s) = &self.maintenance {
            let cwd = if self.ws.is_some() { WORKSPACE } else { "/root" };
            eprintln!("hutch: ── maintenance: {} ──", s.name);
            let mut tee = |b: &[u8]| {
                let mut e = std::io::stderr();
                let _ = e.write_all(b);
                let _ = e.flush();
            };
            let env = hutch_sandbox::egress::setup_env(gateway);
            let r = run_setup(client, &s.bytes, cwd, env, &mut tee).await.context("running the maintenance script")?;
            if r.status != ExitStatus::Code(0) {
                let text = String::from_utf8_lossy(&for_terminal(&r.tail)).into_owned();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                bail!(
                    "maintenance {} failed with exit code {}; the command did not run. Its last output:\n{tail}",
                    s.name,
                    r.status.as_shell_code()
                );
            }
        }
        gateway.enter_phase(Phase::Agent).context("ending the setup phase")?;
        eprintln!("hutch: ── command: {} ──", command.join(" "));
        Ok(())
    }

    /// After every input was checked: takes the working-tree snapshot and points the command's working directory
    /// into /workspace.
    /// `image_cache` keeps workspace images by content, so another run of the same tree reuses its image.
    pub fn snapshot(&mut self, a: &mut RunArgs, image_cache: &Path) -> anyhow::Result<()> {
        let Some(repo) = self.found.take() else { return Ok(()) };
        let snap = Snapshot::take_filtered(&repo, image_cache, &self.credentials).context("taking a snapshot of the working tree")?;
        report_credentials(&mut std::io::stderr(), &snap);
        if a.workdir.is_none() {
            a.workdir = Some(guest_cwd(&repo.prefix));
        }
        self.active = Some(Active { repo, snap });
        Ok(())
    }

    /// For `hutch run --detach`: the snapshot commit alone (the daemon makes the workspace image from its
    /// bundle), credential files reported as `snapshot` reports them.
    pub fn snapshot_commit(&mut self) -> anyhow::Result<Option<(HostRepo, Snapshot)>> {
        let Some(repo) = self.found.take() else { return Ok(None) };
        let snap = Snapshot::take_commit(&repo, &self.credentials).context("taking a snapshot of the working tree")?;
        report_credentials(&mut std::io::stderr(), &snap);
        Ok(Some((repo, snap)))
    }

    /// The image the last snapshot of this work tree used (see [`hutch_repo::host::predicted_image`]), before this
    /// run's snapshot is taken.
    /// With it, the base image it needs in the workspace base slot, if any.
    pub fn predicted_image(&self, image_cache: &Path) -> Option<(std::path::PathBuf, Option<std::path::PathBuf>)> {
        self.found.as_ref().and_then(|r| hutch_repo::host::predicted_image(r, image_cache))
    }

    /// The workspace image the sandbox must be started with, if any.
    pub fn workspace_image(&self) -> Option<std::path::PathBuf> {
        self.active.as_ref().map(|a| a.snap.image.clone())
    }

    /// The image for the workspace base slot (the full image a delta workspace image takes data from), if any.
    pub fn workspace_base(&self) -> Option<std::path::PathBuf> {
        self.active.as_ref().and_then(|a| a.snap.image_base.clone())
    }

    /// The VM mounted this run's image at /workspace before the snapshot was done (see `run`): nothing left to do
    /// in [`RunRepo::enter_workspace`].
    pub fn workspace_mounted(&mut self) {
        if let Some(act) = &self.active {
            self.ws = Some(hutch_repo::guest::mounted_workspace(&act.snap, &act.repo.prefix));
        }
    }

    /// In the fresh VM, first: the repository into /workspace.
    pub async fn enter_workspace(&mut self, client: &AgentClient) -> anyhow::Result<()> {
        if self.ws.is_some() {
            return Ok(());
        }
        if let Some(act) = &self.active {
            let t0 = std::time::Instant::now();
            let ws =
                hutch_repo::setup_workspace(client, &act.snap, &act.repo.prefix).await.context("mounting the repository in the VM")?;
            self.ws = Some(ws);
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "repo: workspace mounted");
        }
        Ok(())
    }

    /// Then the setup phase, if there is one: the script runs with the setup phase's secret placeholders in its
    /// environment while the gateway decides under the setup policy; when it succeeds the gateway moves to the
    /// agent phase (closing what the setup phase opened) before the command runs.
    pub async fn setup(&mut self, client: &AgentClient, gateway: &Gateway, command: &[String]) -> anyhow::Result<()> {
        let Some(s) = &self.setup else { return Ok(()) };
        let cwd = if self.ws.is_some() { WORKSPACE } else { "/root" };
        eprintln!("hutch: ── setup: {} ──", s.name);
        let mut tee = |b: &[u8]| {
            let mut e = std::io::stderr();
            let _ = e.write_all(b);
            let _ = e.flush();
        };
        let env = hutch_sandbox::egress::setup_env(gateway);
        let r = run_setup(client, &s.bytes, cwd, env, &mut tee).await.context("running the setup script")?;
        if r.status != ExitStatus::Code(0) {
            let text = String::from_utf8_lossy(&for_terminal(&r.tail)).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            bail!(
                "setup {} failed with exit code {}; the command did not run. Its last output:\n{tail}",
                s.name,
                r.status.as_shell_code()
            );
        }
        gateway.enter_phase(Phase::Agent).context("ending the setup phase")?;
        eprintln!("hutch: ── command: {} ──", command.join(" "));
        Ok(())
    }

    /// After the command exited, while the VM is still there: pack and download what it changed.
    pub async fn collect(&mut self, client: &AgentClient, sandbox_id: &str) {
        let (Some(act), Some(ws)) = (&self.active, &self.ws) else { return };
        let dest = act.snap.dir().join("out");
        let t0 = std::time::Instant::now();
        let r: anyhow::Result<Collected> = async {
            std::fs::create_dir_all(&dest).with_context(|| format!("cannot create {}", dest.display()))?;
            // The VM controls how long its side takes; a hung collection must not hang hutch.
            match tokio::time::timeout(COLLECT_TIMEOUT, hutch_repo::collect(client, ws, &dest, &self.limits)).await {
                Ok(r) => Ok(r?),
                Err(_) => bail!("the VM did not hand over its changes within {} s", COLLECT_TIMEOUT.as_secs()),
            }
        }
        .await;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "repo: changes collected");
        self.collected = Some((sandbox_id.to_string(), r));
    }

    /// After the VM is gone: check and import, summarize, and apply with `--apply`. Returns the exit code.
    pub fn finish(self, code: i32) -> anyhow::Result<i32> {
        let (Some(act), Some((id, collected))) = (self.active, self.collected) else { return Ok(code) };
        let collected = collected.context("collecting the VM's changes")?;
        eprintln!("hutch: ── changes from sandbox {id} ──");
        let t0 = std::time::Instant::now();
        let stored = hutch_repo::import(&act.repo, &act.snap, &id, &collected, &self.limits)?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "repo: changes imported");
        let Some(stored) = stored else {
            if !collected.git_meta_changed.is_empty() {
                eprintln!("hutch: the VM changed its own {}; git metadata never leaves the VM", collected.git_meta_changed.join(", "));
            }
            eprintln!("hutch: no changes in /workspace");
            return Ok(code);
        };
        let mut err = std::io::stderr();
        summary(&mut err, &stored)?;
        if !stored.meta.stat.is_empty() {
            eprintln!("{}", hutch_text::escape_lines(stored.meta.stat.as_bytes()));
        }
        let short = &id[..id.len().min(8)];
        // With sensitive paths a plain `hutch apply` would refuse: name the flag it needs, after a review.
        let (apply_cmd, after) = if stored.meta.sensitive.is_empty() {
            (format!("hutch apply {short}"), "")
        } else {
            (format!("hutch apply --allow-sensitive {short}"), " (after reviewing the sensitive paths above)")
        };
        if !self.apply {
            eprintln!("hutch: review with `hutch diff {short}`, apply with `{apply_cmd}`{after}");
        } else if code != 0 {
            eprintln!("hutch: not applied because the command exited with {code}; `{apply_cmd}` applies them{after}");
        } else {
            apply_stored(&act.repo, &stored, self.allow_sensitive)?;
        }
        Ok(code)
    }
}

/// Names the credential files left out and the tracked ones that went in. Paths are the user's file names but
/// may hold any byte, so they are escaped for the terminal.
fn report_credentials(w: &mut dyn Write, snap: &Snapshot) {
    for (i, p) in snap.left_out.iter().enumerate() {
        if i == MAX_NAMED {
            let _ = writeln!(w, "hutch: left out of the VM: {} more credential files", snap.left_out.len() - MAX_NAMED);
            break;
        }
        let _ = writeln!(w, "hutch: left out of the VM: {} (credential file; --include PATH to send it)", show(p));
    }
    for (i, p) in snap.tracked_credentials.iter().enumerate() {
        if i == MAX_NAMED {
            let _ = writeln!(w, "hutch: warning: {} more tracked credential files went into the VM", snap.tracked_credentials.len() - MAX_NAMED);
            break;
        }
        let held = snap.held_back_changes.contains(p);
        let p = show(p);
        let which = if held { "HEAD's version of it went into the VM, without your uncommitted changes" } else { "it went into the VM" };
        let _ = writeln!(
            w,
            "hutch: warning: {p} looks like a credential file and git tracks it, so {which} (it is in the history \
             anyway); to stop tracking it: `git rm --cached -- '{p}'`, add it to .gitignore, and rotate what it held"
        );
    }
}

fn untrusted(cfg: &ProjectConfig, t: Trust) -> String {
    let why = if t == Trust::Changed { "it changed since you approved it" } else { "you have not approved it" };
    let asks: String = cfg.asks().iter().map(|a| format!("\n  - {a}")).collect();
    format!(
        "{} is not trusted ({why}). It asks for:{asks}\nReview it, then run `hutch trust` in {} to approve this exact version, or run with --no-project-config to ignore it",
        cfg.file.display(),
        cfg.file.parent().unwrap_or(Path::new(".")).display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Class 18 (guest-chosen bytes on the terminal; here the user's own file names, which a repository chose):
    /// names are escaped, and long lists are counted, not printed.
    #[test]
    fn class_18_credential_reports_escape_names_and_stay_bounded() {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path().join("repo");
        std::fs::create_dir(&r).expect("mkdir");
        let git = |args: &[&str]| {
            let o = std::process::Command::new("git")
                .args(args)
                .current_dir(&r)
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .output()
                .expect("git");
            assert!(o.status.success(), "{o:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(r.join("a\x1b]0;x\x07.pem"), "k").expect("write");
        for i in 0..25 {
            std::fs::write(r.join(format!("k{i}.key")), "k").expect("write");
        }
        let repo = HostRepo::discover(&r).expect("discover").expect("repo");
        let cache = tempfile::tempdir().expect("tempdir");
        let snap = Snapshot::take(&repo, cache.path()).expect("snapshot");
        let mut out = Vec::new();
        report_credentials(&mut out, &snap);
        let out = String::from_utf8(out).expect("utf-8");
        assert!(out.contains("left out of the VM: a\\x1b]0;x\\x07.pem (credential file; --include PATH to send it)"), "{out}");
        assert!(!out.contains('\x1b'));
        assert_eq!(out.lines().count(), MAX_NAMED + 1, "{out}");
        assert!(out.ends_with("left out of the VM: 6 more credential files\n"), "{out}");
    }

    #[test]
    fn terminal_output_escapes_control_characters() {
        let out = for_terminal(b"+ok\tline\n+\x1b]0;title\x07\x1b[2J\n+\xff\xfe\n+\xe2\x80\xaeevil\n");
        assert_eq!(String::from_utf8_lossy(&out), "+ok\tline\n+\\x1b]0;title\\x07\\x1b[2J\n+\\xff\\xfe\n+\\u{202e}evil\n");
    }
}
