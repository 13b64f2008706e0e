//! The queue and one run's life. The runner starts queued runs oldest first within the global limit, the
//! trigger's limit and one run per concurrency key. A run: a sandbox through the manager (its gateway starts in
//! the setup phase, where the forge token is bound to the repository's git URL), the clone inside the VM with a
//! placeholder for the token, the trigger's setup script (with a setup, from or into the environment cache:
//! `super::envcache`), the agent phase, then the event's files, the command (the event as
//! `/run/hutch/event.json` and `HUTCH_*` variables, its output into the run's size-capped log), the change
//! collected as `hutch run` collects it, the VM destroyed, then `hutch_forge::deliver` from the host (retried
//! on transient failures only; a failed command is never retried).

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hutch_gateway::Phase;
use hutch_policy::PhasedPolicy;
use hutch_proto::{ExecEvent, ExecRequest, ExitStatus};
use hutch_sandbox::egress::Egress;
use tokio_util::sync::CancellationToken;

use super::config::Trigger;
use super::event::Planned;
use super::store::{Mark, RunRow};
use super::{Running, Triggers};
use crate::manager::{CheckedCreate, Live};
use crate::store::now_ms;

/// Output kept per run (stdout and stderr of the setup and the command, interleaved as they came).
pub const LOG_MAX: u64 = 8 << 20;
/// Where the event's payload is in the VM.
pub const EVENT_FILE: &str = "/run/hutch/event.json";
const PROMPT_FILE: &str = "/run/hutch/prompt.txt";
pub(super) const WORKSPACE: &str = "/workspace";

/// Clones `$1` at `$2` into /workspace. The token is a placeholder (the gateway swaps the real value in on the
/// way to the git host, in this phase only); it travels in a header given on the command line, never stored
/// in the clone's config. Payload-derived values arrive as arguments, never as shell text.
const CLONE: &str = r#"set -eu
auth=$(printf 'x-access-token:%s' "$HUTCH_FORGE_TOKEN" | base64 -w0)
mkdir -p /workspace
git -c "http.extraHeader=Authorization: Basic $auth" clone -q --no-tags --branch "$2" -- "$1" /workspace
cd /workspace
git config user.name hutch
git config user.email hutch@localhost
git rev-parse HEAD
"#;

/// Brings the workspace of a cached environment (a clone that `CLONE` made for an earlier event) to `$2` of
/// `$1`: fetch, then a forced checkout. Not `git clean`: what the setup left outside git's files (installed
/// dependencies, build caches) stays. The token travels as in `CLONE`.
const UPDATE: &str = r#"set -eu
auth=$(printf 'x-access-token:%s' "$HUTCH_FORGE_TOKEN" | base64 -w0)
cd /workspace
git -c "http.extraHeader=Authorization: Basic $auth" fetch -q --no-tags -- "$1" "$2"
if grep -q "branch '" .git/FETCH_HEAD; then
  git checkout -q --force -B "$2" FETCH_HEAD
else
  git checkout -q --force --detach FETCH_HEAD
fi
git rev-parse HEAD
"#;

/// Prints, for `$1` (a commit of /workspace) and each path after it, one line: the object id of that path at the
/// commit (a blob, or a tree for a directory), or `absent`. Paths arrive as arguments (checked by
/// `config::check_input_path`, so `COMMIT:PATH` holds no revision syntax); nothing here touches the network.
const INPUTS: &str = r#"set -eu
cd /workspace
c=$1
shift
git cat-file -e "$c^{commit}"
for p in "$@"; do
  if o=$(git rev-parse --verify -q "$c:$p"); then printf '%s\n' "$o"; else echo absent; fi
done
"#;

/// How a run ended.
struct End {
    state: &'static str,
    reason: String,
}

impl End {
    fn failed(reason: impl Into<String>) -> End {
        End { state: "failed", reason: reason.into() }
    }
}

/// The run's log: appended as output arrives, cut at [`LOG_MAX`] with one note.
pub(super) struct Log {
    file: Option<std::fs::File>,
    written: u64,
    cut: bool,
}

impl Log {
    pub(super) fn write(&mut self, b: &[u8]) {
        let Some(f) = self.file.as_mut() else { return };
        if self.written >= LOG_MAX {
            if !self.cut {
                self.cut = true;
                let _ = f.write_all(format!("\n[hutch: output beyond {} MiB not kept]\n", LOG_MAX >> 20).as_bytes());
            }
            return;
        }
        let n = (LOG_MAX - self.written).min(b.len() as u64) as usize;
        let _ = f.write_all(&b[..n]);
        self.written += n as u64;
        if n < b.len() {
            self.write(&b[n..]);
        }
    }

    pub(super) fn note(&mut self, msg: &str) {
        if let Some(f) = self.file.as_mut() {
            let _ = f.write_all(format!("[hutch] {msg}\n").as_bytes());
        }
    }
}

impl Triggers {
    pub(crate) async fn run_loop(self: Arc<Self>) {
        loop {
            if let Err(e) = self.dispatch() {
                tracing::error!("the run queue: {e}");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Starts what the limits allow, oldest first.
    fn dispatch(self: &Arc<Self>) -> Result<(), crate::DaemonError> {
        if self.stop.is_cancelled() || self.mgr.is_shutting_down() {
            return Ok(());
        }
        let set = self.set();
        let store = &self.mgr.store;
        for r in store.queued_runs()? {
            let mut running = self.running();
            if running.len() >= set.max_running {
                break;
            }
            let Some(t) = set.triggers.get(&r.trigger).cloned() else {
                drop(running);
                if store.end_run(&r.id, "failed", &format!("trigger {} is no longer in the triggers file", r.trigger))? {
                    self.mgr.metrics.run_ended("failed");
                }
                continue;
            };
            if running.values().filter(|j| j.trigger == r.trigger).count() >= t.max_running {
                continue;
            }
            if r.concurrency_key.as_ref().is_some_and(|k| running.values().any(|j| j.key.as_ref() == Some(k))) {
                continue;
            }
            if !store.start_run(&r.id)? {
                continue;
            }
            let cancel = self.stop.child_token();
            let why = Arc::new(Mutex::new(None));
            running.insert(r.id.clone(), Running { trigger: r.trigger.clone(), key: r.concurrency_key.clone(), cancel: cancel.clone(), why: why.clone() });
            drop(running);
            let me = self.clone();
            self.tasks.spawn(async move {
                let id = r.id.clone();
                me.execute(r, t, cancel, why).await;
                me.running().remove(&id);
                me.wake.notify_one();
            });
        }
        Ok(())
    }

    async fn execute(&self, run: RunRow, t: Trigger, cancel: CancellationToken, why: Arc<Mutex<Option<(String, String)>>>) {
        let dir = self.runs_dir.join(&run.id);
        let _ = std::fs::create_dir_all(&dir);
        let log = Arc::new(Mutex::new(Log {
            file: std::fs::OpenOptions::new().create(true).append(true).open(dir.join("output.log")).ok(),
            written: 0,
            cut: false,
        }));
        let sandbox: Arc<Mutex<Option<String>>> = Default::default();
        let deadline = tokio::time::Instant::now() + t.job.timeout;
        let work = self.work(&run, &t, &dir, log.clone(), sandbox.clone(), cancel.clone(), deadline);
        let end = tokio::select! {
            r = tokio::time::timeout_at(deadline, work) => match r {
                Ok(end) => end,
                Err(_) => End { state: "timed_out", reason: format!("the run took longer than the trigger's timeout of {} s", t.job.timeout.as_secs()) },
            },
            _ = cancel.cancelled() => {
                let (state, reason) = why.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(|| ("cancelled".into(), "cancelled".into()));
                End { state: if state == "failed" { "failed" } else { "cancelled" }, reason }
            }
        };
        // Whatever happened, the VM goes (a no-op when the work already destroyed it).
        let sb = sandbox.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(sb) = sb {
            self.mgr.stop_sandbox(&sb, &format!("run {} ended", run.id)).await;
        }
        let _ = std::fs::remove_dir_all(dir.join("result"));
        log.lock().unwrap_or_else(|p| p.into_inner()).note(&format!("run {}: {}", end.state, end.reason));
        match self.mgr.store.end_run(&run.id, end.state, &end.reason) {
            Ok(true) => {
                self.mgr.metrics.run_ended(end.state);
                self.mgr.metrics.run_seconds.observe((now_ms() - run.created_ms).max(0) as f64 / 1000.0);
            }
            Ok(false) => {}
            Err(e) => tracing::error!(run = %run.id, "cannot record the end of a run: {e}"),
        }
        tracing::info!(run = %run.id, state = end.state, reason = %end.reason, "run ended");
    }

    /// The egress of a run: the trigger's policy, plus, in the setup phase, the git host and the forge token
    /// bound to this repository's path on it.
    fn egress(&self, run: &RunRow, t: &Trigger, plan: &Planned) -> Result<Egress, String> {
        let f = &t.job.forge;
        let store_hosts = self.mgr.store.secret(&f.token).map_err(|e| e.to_string())?.map(|r| r.hosts).ok_or_else(|| {
            format!("the forge token's secret {} is not in the daemon's store (`hutch secret set {} --hosts {}`)", f.token, f.token, f.git_host)
        })?;
        let host_port = format!("{}:{}", f.git_host, f.git_port);
        if !store_hosts.iter().any(|h| h == &f.git_host || h == &host_port) {
            return Err(format!(
                "the store binds secret {} to {:?}, not to the git host {}; the owner decides where a secret may go (`hutch secret set {} --hosts {}`)",
                f.token, store_hosts, f.git_host, f.token, host_port
            ));
        }
        let forge_layer = super::config::clone_layer(f, &plan.owner, &plan.repo)?;
        let phased = PhasedPolicy::merge(&[forge_layer, t.job.policy.clone()]).map_err(|e| format!("the run's egress: {e}"))?;
        // Egress records are kept under the run's id.
        Ok(Egress::new(phased.agent, self.mgr.audit_sink(&run.id)).with_setup_phase(phased.setup).with_secret_loader(self.mgr.secret_loader()))
    }

    #[allow(clippy::too_many_arguments)]
    async fn work(
        &self,
        run: &RunRow,
        t: &Trigger,
        dir: &std::path::Path,
        log: Arc<Mutex<Log>>,
        sandbox: Arc<Mutex<Option<String>>>,
        cancel: CancellationToken,
        deadline: tokio::time::Instant,
    ) -> End {
        let plan: Planned = match serde_json::from_str(&run.plan) {
            Ok(p) => p,
            Err(e) => return End::failed(format!("the run's stored plan is unreadable: {e}")),
        };
        let note = |m: &str| log.lock().unwrap_or_else(|p| p.into_inner()).note(m);
        let egress = match self.egress(run, t, &plan) {
            Ok(e) => e,
            Err(e) => return End::failed(e),
        };
        let spec = CheckedCreate {
            image: self.mgr.image_name(),
            cpus: t.job.cpus,
            memory_mib: t.job.memory_mib,
            ttl_secs: t.job.timeout.as_secs() + 600,
            env: Default::default(),
            policy: None,
            secrets: vec![],
            secret_headers: Default::default(),
            setup: None,
        };
        let labels = [("hutch.run".to_string(), run.id.clone()), ("hutch.trigger".to_string(), run.trigger.clone())].into_iter().collect();
        note(&format!("starting a sandbox for {}/{} at {}", plan.owner, plan.repo, plan.git_ref));
        // With a setup script the VM is made ready (clone, setup, the environment cache) before it goes live.
        let ready = match (&t.job.setup, t.job.cache) {
            (Some(script), true) => Some(Arc::new(super::envcache::Ready::new(run, t, &plan, script, log.clone(), cancel.clone(), deadline, &self.mgr.limits))),
            _ => None,
        };
        let prepare = ready.clone().map(|r| r as Arc<dyn crate::manager::Prepare>);
        let (info, live) = match self.mgr.create_with_egress(&self.principal, spec, &labels, egress, prepare).await {
            Ok(x) => x,
            Err(e) => {
                // The preparation's own reason (a failed clone or setup) rather than the start's wrapping of it.
                let why = ready.as_ref().and_then(|r| r.failure());
                return End::failed(why.unwrap_or_else(|| format!("the sandbox could not start: {}", hutch_sandbox::error_chain(&e))));
            }
        };
        *sandbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(info.id.clone());
        let _ = self.mgr.store.set_run_sandbox(&run.id, &info.id);
        if cancel.is_cancelled() {
            return End { state: "cancelled", reason: "cancelled".into() };
        }
        let base = match &ready {
            Some(r) => match r.base() {
                Some(b) => b,
                None => return End::failed("the prepared VM did not report its commit"),
            },
            None => match self.prepare(t, &plan, &live, &log).await {
                Ok(b) => b,
                Err(e) => return End::failed(e),
            },
        };
        // The event last: nothing of it is in a cached environment, and the setup never sees it.
        if let Err(e) = put_event(&live.client, run, &plan).await {
            return End::failed(e);
        }
        // The command.
        let exit = match self.command(run, t, &plan, &live, &log).await {
            Ok(s) => s,
            Err(e) => return End::failed(e),
        };
        let code = match exit {
            ExitStatus::Code(c) => Some(c as i64),
            ExitStatus::Signal(_) => None,
        };
        let _ = self.mgr.store.set_run_exit(&run.id, Some(exit.as_shell_code() as i64));
        if exit != ExitStatus::Code(0) {
            return End::failed(format!("the command exited with {} (not retried; nothing delivered)", exit.as_shell_code()));
        }
        // Collect exactly as `hutch run` does, then the VM goes before anything is sent anywhere.
        let result = dir.join("result");
        let _ = std::fs::remove_dir_all(&result);
        if let Err(e) = std::fs::create_dir_all(&result) {
            return End::failed(format!("cannot create {}: {e}", result.display()));
        }
        let ws = hutch_repo::Workspace::cloned(base.clone(), WORKSPACE.into());
        let collected = match hutch_repo::collect(&live.client, &ws, &result, &hutch_repo::Limits::default()).await {
            Ok(c) => c,
            Err(e) => return End::failed(format!("collecting the change: {e}")),
        };
        drop(live);
        let sb = sandbox.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(sb) = sb {
            self.mgr.stop_sandbox(&sb, &format!("run {} collected", run.id)).await;
        }
        self.deliver(run, t, &plan, base, collected.head, &result, code, &log).await
    }

    /// The clone, the setup script, then the agent phase (the path without the environment cache). Returns the
    /// commit the clone is at.
    async fn prepare(&self, t: &Trigger, plan: &Planned, live: &Live, log: &Arc<Mutex<Log>>) -> Result<hutch_repo::Oid, String> {
        let base = clone_repo(&live.client, &live.gateway, t, plan, log).await?;
        if let Some(script) = &t.job.setup {
            setup(&live.client, &live.gateway, script, log).await?;
        }
        live.gateway.enter_phase(Phase::Agent).map_err(|e| format!("ending the setup phase: {e}"))?;
        Ok(base)
    }

    async fn command(&self, run: &RunRow, t: &Trigger, plan: &Planned, live: &Live, log: &Arc<Mutex<Log>>) -> Result<ExitStatus, String> {
        let mut env: Vec<(String, String)> = t.job.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let clean = |s: &str| s.replace('\0', "").chars().take(64 << 10).collect::<String>();
        env.extend([
            ("HUTCH_RUN_ID".to_string(), run.id.clone()),
            ("HUTCH_TRIGGER".into(), run.trigger.clone()),
            ("HUTCH_EVENT".into(), run.event.clone()),
            ("HUTCH_EVENT_FILE".into(), EVENT_FILE.into()),
            ("HUTCH_PROMPT_FILE".into(), PROMPT_FILE.into()),
            ("HUTCH_REPOSITORY".into(), format!("{}/{}", plan.owner, plan.repo)),
            ("HUTCH_REF".into(), plan.git_ref.clone()),
            ("HUTCH_PROMPT".into(), clean(plan.prompt.as_deref().unwrap_or(""))),
            ("HUTCH_AUTHOR".into(), clean(plan.author.as_deref().unwrap_or(""))),
        ]);
        if let Some(n) = plan.issue {
            env.push(("HUTCH_ISSUE".into(), n.to_string()));
        }
        log.lock().unwrap_or_else(|p| p.into_inner()).note("running the command");
        let _ = self.mgr.store.mark_run(&run.id, Mark::Command, now_ms());
        let store = self.mgr.store.clone();
        let metrics = self.mgr.metrics.clone();
        let (id, created) = (run.id.clone(), run.created_ms);
        let first = Box::new(move || {
            let now = now_ms();
            let _ = store.mark_run(&id, Mark::FirstOutput, now);
            metrics.run_first_output_seconds.observe((now - created).max(0) as f64 / 1000.0);
        });
        let (status, _) = exec(&live.client, t.job.command.clone(), env, Some(WORKSPACE), log, Some(first)).await?;
        let _ = self.mgr.store.mark_run(&run.id, Mark::CommandEnd, now_ms());
        Ok(status)
    }

    #[allow(clippy::too_many_arguments)]
    async fn deliver(
        &self,
        run: &RunRow,
        t: &Trigger,
        plan: &Planned,
        base: hutch_repo::Oid,
        vm_head: Option<hutch_repo::Oid>,
        result: &std::path::Path,
        code: Option<i64>,
        log: &Arc<Mutex<Log>>,
    ) -> End {
        let f = &t.job.forge;
        let git_root = f.git_from_host.as_deref().unwrap_or(&f.git);
        let repo = hutch_forge::ForgeRepo {
            api_base: f.api.clone(),
            clone_url: format!("{git_root}/{}/{}.git", plan.owner, plan.repo),
            owner: plan.owner.clone(),
            name: plan.repo.clone(),
            ca_file: f.ca_file.clone(),
        };
        let token = match self.mgr.reveal_secret(&f.token) {
            Ok(Some(v)) => match hutch_forge::SecretToken::new(v.as_str()) {
                Ok(t) => t,
                Err(e) => return End::failed(format!("the forge token: {e}")),
            },
            Ok(None) => return End::failed(format!("the forge token's secret {} is not in the daemon's store", f.token)),
            Err(e) => return End::failed(format!("cannot read the forge token: {e}")),
        };
        let delivery = hutch_forge::DeliveryPlan {
            run_id: run.id.clone(),
            base_ref: plan.git_ref.clone(),
            base_commit: base,
            vm_head,
            result_dir: result.to_path_buf(),
            open_pull_request: t.job.pull_request,
            comment_on_issue: if t.job.comment { plan.issue } else { None },
            allow_sensitive: t.job.allow_sensitive,
            title: t.job.title.clone(),
            summary: hutch_forge::RunSummary {
                exit_code: code.map(|c| c as i32),
                details: vec![format!("trigger: {}", run.trigger), format!("run: {} (`hutch runs show {}`)", run.id, run.id)],
            },
        };
        log.lock().unwrap_or_else(|p| p.into_inner()).note(&format!("delivering to {}/{}", plan.owner, plan.repo));
        // Whole deliveries are tried again only when the forge or the network failed (not on a refusal).
        let mut tries = 0;
        let d = loop {
            tries += 1;
            match hutch_forge::deliver(&repo, &token, &delivery, self.delivery_retry).await {
                Ok(d) => break d,
                Err(e) if e.retryable() && tries < 3 => {
                    log.lock().unwrap_or_else(|p| p.into_inner()).note(&format!("delivery failed, retrying: {e}"));
                    tokio::time::sleep(self.delivery_retry.delay(tries)).await;
                }
                Err(e) => return End::failed(format!("delivery failed: {e}")),
            }
        };
        let _ = self.mgr.store.mark_run(&run.id, Mark::Delivered, now_ms());
        let held: Vec<String> = d.held_back.iter().map(|s| format!("{} ({})", s.path, s.kind)).collect();
        let held_json = (!held.is_empty()).then(|| serde_json::to_string(&held).unwrap_or_default());
        let pr = d.pull_request.as_ref().map(|(_, url)| url.clone());
        let _ = self.mgr.store.set_run_delivery(&run.id, d.branch.as_deref(), pr.as_deref(), held_json.as_deref());
        let what = match (&d.branch, &pr) {
            (None, _) => "the command changed nothing; nothing delivered".to_string(),
            (Some(b), Some(url)) => format!("pushed {b}, opened {url}"),
            (Some(b), None) => format!("pushed {b}"),
        };
        let what = if held.is_empty() { what } else { format!("{what}; held back: {}", held.join(", ")) };
        End { state: "succeeded", reason: what }
    }
}

/// The event's payload and prompt as files in the VM.
async fn put_event(c: &hutch_sandbox::AgentClient, run: &RunRow, plan: &Planned) -> Result<(), String> {
    c.put_file(EVENT_FILE, 0o444, run.payload.len() as u64, &run.payload[..]).await.map_err(|e| format!("cannot copy the event into the VM: {e}"))?;
    let prompt = plan.prompt.clone().unwrap_or_default();
    c.put_file(PROMPT_FILE, 0o444, prompt.len() as u64, prompt.as_bytes()).await.map_err(|e| format!("cannot copy the prompt into the VM: {e}"))?;
    Ok(())
}

/// The repository's clone URL as the VM sees it.
pub(super) fn clone_url(t: &Trigger, plan: &Planned) -> String {
    format!("{}/{}/{}.git", t.job.forge.git, plan.owner, plan.repo)
}

/// Runs `script` (`CLONE` or `UPDATE`) with the repository's URL and the ref, and the forge token's placeholder of
/// this gateway's setup phase; returns the commit it printed last.
async fn git_step(c: &hutch_sandbox::AgentClient, gw: &hutch_gateway::Gateway, t: &Trigger, plan: &Planned, log: &Arc<Mutex<Log>>, script: &str, what: &str) -> Result<hutch_repo::Oid, String> {
    let setup_env = hutch_sandbox::egress::setup_env(gw);
    let placeholder = setup_env
        .iter()
        .find(|(k, _)| k == &t.job.forge.token)
        .map(|(_, v)| v.clone())
        .ok_or_else(|| "the gateway has no placeholder for the forge token".to_string())?;
    let url = clone_url(t, plan);
    let mut env = setup_env;
    env.push(("HUTCH_FORGE_TOKEN".into(), placeholder));
    let argv = ["sh", "-c", script, "hutch-git", &url, &plan.git_ref].map(str::to_string).to_vec();
    log.lock().unwrap_or_else(|p| p.into_inner()).note(&format!("{what} {url} at {}", plan.git_ref));
    let (status, out) = exec(c, argv, env, Some("/"), log, None).await?;
    if status != ExitStatus::Code(0) {
        return Err(format!("{what} failed (exit {}); see the run's log", status.as_shell_code()));
    }
    let head = String::from_utf8_lossy(&out).lines().last().unwrap_or("").trim().to_string();
    hutch_repo::Oid::parse(&head).ok_or_else(|| format!("{what} did not report a commit"))
}

/// Clones the repository at the event's ref into /workspace; the commit it is at.
pub(super) async fn clone_repo(c: &hutch_sandbox::AgentClient, gw: &hutch_gateway::Gateway, t: &Trigger, plan: &Planned, log: &Arc<Mutex<Log>>) -> Result<hutch_repo::Oid, String> {
    git_step(c, gw, t, plan, log, CLONE, "cloning").await
}

/// Brings the /workspace of a cached environment to the event's ref; the commit it is at.
pub(super) async fn update_repo(c: &hutch_sandbox::AgentClient, gw: &hutch_gateway::Gateway, t: &Trigger, plan: &Planned, log: &Arc<Mutex<Log>>) -> Result<hutch_repo::Oid, String> {
    git_step(c, gw, t, plan, log, UPDATE, "updating the cached workspace from").await
}

/// The object ids of the declared inputs `paths` at `commit` of /workspace (`absent` for a path not in it), read
/// in the VM: its output is hostile text, taken only as exactly one object id or `absent` per path.
pub(super) async fn input_ids(c: &hutch_sandbox::AgentClient, commit: &hutch_repo::Oid, paths: &[String], log: &Arc<Mutex<Log>>) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut argv = ["sh", "-c", INPUTS, "hutch-inputs", commit.as_str()].map(str::to_string).to_vec();
    argv.extend(paths.iter().cloned());
    log.lock().unwrap_or_else(|p| p.into_inner()).note(&format!("reading the declared inputs at {}", commit.short()));
    let (status, out) = exec(c, argv, vec![], Some("/"), log, None).await?;
    if status != ExitStatus::Code(0) {
        return Err(format!("reading the declared inputs failed (exit {}); see the run's log", status.as_shell_code()));
    }
    parse_input_ids(&out, paths)
}

/// One line per path, in order: an object id or `absent`; anything else (more or fewer lines, other text) is an
/// error.
fn parse_input_ids(out: &[u8], paths: &[String]) -> Result<std::collections::BTreeMap<String, String>, String> {
    let bad = || "the VM's answer for the declared inputs is not one object id or \"absent\" per path".to_string();
    let text = std::str::from_utf8(out).map_err(|_| bad())?;
    let lines: Vec<&str> = text.strip_suffix('\n').ok_or_else(bad)?.split('\n').collect();
    if lines.len() != paths.len() {
        return Err(bad());
    }
    let mut ids = std::collections::BTreeMap::new();
    for (p, l) in paths.iter().zip(lines) {
        let v = match l {
            "absent" => "absent".to_string(),
            l => hutch_repo::Oid::parse(l).filter(|o| o.as_str() == l).ok_or_else(bad)?.as_str().to_string(),
        };
        ids.insert(p.clone(), v);
    }
    Ok(ids)
}

/// The trigger's setup script in /workspace, with the setup phase's placeholders.
pub(super) async fn setup(c: &hutch_sandbox::AgentClient, gw: &hutch_gateway::Gateway, script: &str, log: &Arc<Mutex<Log>>) -> Result<(), String> {
    log.lock().unwrap_or_else(|p| p.into_inner()).note("running the setup script");
    let mut tee = |b: &[u8]| log.lock().unwrap_or_else(|p| p.into_inner()).write(b);
    let r = hutch_repo::guest::run_setup(c, script.as_bytes(), WORKSPACE, hutch_sandbox::egress::setup_env(gw), &mut tee).await.map_err(|e| format!("the setup script: {e}"))?;
    if r.status != ExitStatus::Code(0) {
        return Err(format!("the setup script exited with {}", r.status.as_shell_code()));
    }
    Ok(())
}

/// Runs `argv` in the guest with `env`; output to the run's log (stdout also returned, up to 64 KiB); `first`
/// is called at the first byte of output.
async fn exec(
    client: &hutch_sandbox::AgentClient,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<&str>,
    log: &Arc<Mutex<Log>>,
    mut first: Option<Box<dyn FnOnce() + Send>>,
) -> Result<(ExitStatus, Vec<u8>), String> {
    let req = ExecRequest { argv, env, cwd: cwd.map(str::to_string), stdin: false, tty: None };
    let mut h = client.exec(req).await.map_err(|e| format!("cannot start a process in the VM: {e}"))?;
    let mut out = Vec::new();
    while let Some(ev) = h.events.next().await {
        let is_stdout = matches!(ev, ExecEvent::Stdout(_));
        match ev {
            ExecEvent::Started { .. } => {}
            ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => {
                if let Some(f) = first.take() {
                    f();
                }
                log.lock().unwrap_or_else(|p| p.into_inner()).write(&b);
                if is_stdout && out.len() < 64 << 10 {
                    out.extend_from_slice(&b[..b.len().min((64 << 10) - out.len())]);
                }
            }
            ExecEvent::Exited(s) => return Ok((s, out)),
            ExecEvent::SpawnFailed { message, .. } => return Err(format!("the VM could not start {}", hutch_text::escape(&message))),
        }
    }
    Err("the VM's agent went away before the process ended".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_ids_are_parsed_strictly() {
        let paths = vec!["a.txt".to_string(), "web/lock.json".to_string()];
        let id = "0123456789abcdef0123456789abcdef01234567";
        let ok = parse_input_ids(format!("{id}\nabsent\n").as_bytes(), &paths).unwrap();
        assert_eq!(ok["a.txt"], id);
        assert_eq!(ok["web/lock.json"], "absent");
        for bad in [
            format!("{id}\n"),
            format!("{id}\nabsent"),
            format!("{id}\nabsent\nabsent\n"),
            format!(" {id}\nabsent\n"),
            format!("{}\nabsent\n", id.to_uppercase()),
            format!("{id}\nAbsent\n"),
            format!("{id}\r\nabsent\n"),
            "\u{1b}[2J\nabsent\n".to_string(),
            String::new(),
        ] {
            assert!(parse_input_ids(bad.as_bytes(), &paths).is_err(), "{bad:?}");
        }
        assert!(parse_input_ids(b"\xff\nabsent\n", &paths).is_err());
    }
}
