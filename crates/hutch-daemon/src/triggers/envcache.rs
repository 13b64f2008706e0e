//! A triggered run's setup and the environment cache (`hutch_sandbox::envcache`), keyed as `hutch run` and
//! `hutch serve` key it, with the trigger and the repository as the scope (two repositories or two triggers never
//! share an entry) and the run's setup phase (the trigger's `[setup]` policy plus the forge's clone rule bound to
//! this repository) as the setup policy.
//!
//! A miss: a capturable VM clones the repository and runs the setup; when the setup exited 0 and this run holds
//! the key's builder lock, the VM is captured (before the agent phase and before the event is in it: nothing of an
//! event is ever in an entry) and the run goes on in a VM restored from the new entry. A hit: the entry is
//! restored with a fresh identity and gateway, and /workspace is brought to the event's ref with this run's own
//! placeholder (fetch and a forced checkout; what the setup left stays). An entry that cannot be used, or whose
//! workspace cannot be updated, is discarded with one warning line and the setup runs again.
//!
//! Declared inputs (`cache_inputs`): their paths are part of the key; the object ids they had at the commit the
//! setup ran on are recorded next to the entry (`trigger-inputs.json` in its directory, bound to the entry by its
//! key and state checksum). A hit compares them with the event's commit after the update: any difference (or a
//! missing record) makes the entry stale for this run, which then runs the setup as a miss does and, as the
//! builder, replaces the entry.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hutch_gateway::Phase;
use hutch_sandbox::envcache::{age, KeyInputs, Plan, Start};
use hutch_sandbox::envsnap::EnvStore;
use hutch_sandbox::{Host, Sandbox, SandboxConfig};
use tokio_util::sync::CancellationToken;

use super::config::Trigger;
use super::event::Planned;
use super::runner::{clone_repo, clone_url, input_ids, setup, update_repo, Log};
use super::store::RunRow;

/// The record of an entry's declared inputs, in the entry's directory.
const RECORD: &str = "trigger-inputs.json";
const RECORD_MAX: u64 = 64 << 10;

/// The object ids (or `absent`) of the declared inputs at the commit an entry's setup ran on.
#[derive(serde::Serialize, serde::Deserialize)]
struct InputRecord {
    /// The entry it belongs to: an entry made again (same key, new directory) never reads an old record.
    key: String,
    state_sha256: String,
    inputs: BTreeMap<String, String>,
}

/// Writes the record for `entry` (a temporary file renamed into place: a reader sees all of it or none).
fn write_record(entry: &hutch_sandbox::envsnap::Entry, inputs: &BTreeMap<String, String>) -> Result<(), String> {
    let rec = InputRecord { key: entry.meta.key.clone(), state_sha256: entry.meta.state_sha256.clone(), inputs: inputs.clone() };
    let text = serde_json::to_vec(&rec).map_err(|e| e.to_string())?;
    let tmp = entry.dir.join(format!(".{RECORD}.{}", hutch_sandbox::new_id()));
    std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, entry.dir.join(RECORD))).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot record the declared inputs in {}: {e}", entry.dir.display())
    })
}

/// The recorded inputs of `entry`, if its record is there, readable, its own and for exactly `declared`.
fn read_record(entry: &hutch_sandbox::envsnap::Entry, declared: &[String]) -> Option<BTreeMap<String, String>> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(entry.dir.join(RECORD)).ok()?.take(RECORD_MAX + 1).read_to_end(&mut text).ok()?;
    if text.len() as u64 > RECORD_MAX {
        return None;
    }
    let rec: InputRecord = serde_json::from_slice(&text).ok()?;
    let same_paths = rec.inputs.len() == declared.len() && declared.iter().all(|p| rec.inputs.contains_key(p));
    (rec.key == entry.meta.key && rec.state_sha256 == entry.meta.state_sha256 && same_paths).then_some(rec.inputs)
}

/// Makes a triggered run's VM ready inside the manager's start (which owns the VM until it goes live, as a
/// capture needs).
pub(super) struct Ready {
    run_id: String,
    trigger: Trigger,
    plan: Planned,
    script: String,
    log: Arc<Mutex<Log>>,
    cancel: CancellationToken,
    deadline: tokio::time::Instant,
    max_age: Duration,
    max_bytes: u64,
    /// The commit /workspace is at once ready, or why the preparation failed.
    outcome: Mutex<Option<Result<hutch_repo::Oid, String>>>,
}

impl Ready {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        run: &RunRow,
        t: &Trigger,
        plan: &Planned,
        script: &str,
        log: Arc<Mutex<Log>>,
        cancel: CancellationToken,
        deadline: tokio::time::Instant,
        limits: &crate::manager::Limits,
    ) -> Ready {
        Ready {
            run_id: run.id.clone(),
            trigger: t.clone(),
            plan: plan.clone(),
            script: script.to_string(),
            log,
            cancel,
            deadline,
            max_age: limits.env_cache_max_age,
            max_bytes: limits.env_cache_max_bytes,
            outcome: Mutex::new(None),
        }
    }

    /// The commit /workspace is at, once the VM is ready.
    pub(super) fn base(&self) -> Option<hutch_repo::Oid> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|r| r.as_ref().ok().cloned())
    }

    /// Why the preparation failed, if it did.
    pub(super) fn failure(&self) -> Option<String> {
        self.outcome.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|r| r.as_ref().err().cloned())
    }

    /// Records how the preparation ended, for [`Ready::base`] and [`Ready::failure`].
    fn settle(&self, r: Result<hutch_repo::Oid, String>) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
    }

    fn note(&self, m: &str) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).note(m);
    }

    fn warn(&self, m: &str) {
        let m = hutch_text::escape_lines(m.as_bytes());
        tracing::warn!(run = %self.run_id, "{m}");
        self.note(&format!("warning: {m}"));
    }

    /// The cache's plan for this run; `None` (with a warning) when the key cannot be made.
    fn env_plan(&self, host: &Host, cfg: &SandboxConfig) -> Option<Plan> {
        let (t, p) = (&self.trigger, &self.plan);
        let mut scope = format!("trigger {} repository {}", t.name, clone_url(t, p));
        // The declared paths (not their content, which is checked per hit): another list is another entry. Not
        // added when there are none, so that such keys stay as they were.
        if !t.job.cache_inputs.is_empty() {
            scope.push_str(&format!(" inputs {}", serde_json::to_string(&t.job.cache_inputs).unwrap_or_default()));
        }
        let key = KeyInputs {
            image_key: &host.image.key,
            vm: format!("cpus={} memory={} accel={:?}", cfg.cpus, cfg.memory_mib, cfg.accel),
            setup: self.script.as_bytes(),
            setup_policy: cfg.egress.setup.as_deref(),
            scope: &scope,
            inputs: vec![],
        }
        .key();
        match key {
            Ok(key) => Some(Plan {
                store: EnvStore::new(&host.root),
                key,
                label: format!("hutch serve, trigger {} for {}/{}", t.name, p.owner, p.repo),
                refresh: false,
                max_age: self.max_age,
                max_bytes: self.max_bytes,
            }),
            Err(e) => {
                self.warn(&format!("environment cache: {}; running the setup without it", hutch_sandbox::error_chain(&e)));
                None
            }
        }
    }

    /// `f`, unless the run is cancelled or its time is up first.
    async fn bounded<T>(&self, f: impl Future<Output = Result<T, String>>) -> Result<T, String> {
        tokio::select! {
            r = f => r,
            _ = self.cancel.cancelled() => Err("cancelled while the VM was being prepared".into()),
            _ = tokio::time::sleep_until(self.deadline) => Err("the run's timeout passed while the VM was being prepared".into()),
        }
    }

    /// `None` when `entry`'s declared inputs are as recorded at the commit /workspace of `sb` is at (`base`), else
    /// what differs, as one line.
    async fn inputs_changed(&self, sb: &Sandbox, entry: &hutch_sandbox::envsnap::Entry, base: &hutch_repo::Oid) -> Result<Option<String>, String> {
        let declared = &self.trigger.job.cache_inputs;
        if declared.is_empty() {
            return Ok(None);
        }
        let Some(recorded) = read_record(entry, declared) else {
            return Ok(Some("its record of the declared inputs is missing or unreadable".into()));
        };
        let now = input_ids(sb.client(), base, declared, &self.log).await?;
        let changed: Vec<String> = declared.iter().filter(|p| recorded.get(*p) != now.get(*p)).map(|p| hutch_text::escape(p).to_string()).collect();
        Ok((!changed.is_empty()).then(|| format!("declared input{} changed: {}", if changed.len() == 1 { "" } else { "s" }, changed.join(", "))))
    }

    async fn ready(&self, host: &Host, cfg: &SandboxConfig) -> Result<(Sandbox, String), String> {
        let warn = |m: &str| self.warn(m);
        let (t, p) = (&self.trigger, &self.plan);
        let plan = self.env_plan(host, cfg);
        let mut start = match &plan {
            Some(pl) => pl.start(&warn),
            None => Start::Fresh { lock: None },
        };
        // The commit the last clone is at (a VM restored from the entry this run just made is at it too).
        let mut cloned = None;
        loop {
            let sb = match &plan {
                Some(pl) => pl.create(host, cfg, &mut start, &warn).await,
                None => Sandbox::create_with_notes(host, cfg, &warn).await,
            }
            .map_err(|e| format!("the sandbox could not start: {}", hutch_sandbox::error_chain(&e)))?;
            if let (Start::Cached { entry, just_made }, Some(pl)) = (&start, &plan) {
                let short = format!("{}…", &entry.meta.key[..8.min(entry.meta.key.len())]);
                let (base, mode) = if *just_made {
                    (cloned.clone(), format!("setup, stored in the environment cache (key {short})"))
                } else {
                    self.note(&format!("setup: cached (key {short}, made {} ago)", age(entry.age_secs())));
                    let updated = self
                        .bounded(async {
                            let b = update_repo(sb.client(), sb.gateway(), t, p, &self.log).await?;
                            let changed = self.inputs_changed(&sb, entry, &b).await?;
                            Ok((b, changed))
                        })
                        .await;
                    match updated {
                        Ok((b, None)) => (Some(b), format!("environment cache (key {short}, made {} ago)", age(entry.age_secs()))),
                        Ok((b, Some(why))) => {
                            // Stale for this commit: the setup runs as on a miss and (as the builder) replaces it.
                            let m = format!("setup: the cached environment {short} is stale at {} ({why}); running the setup", b.short());
                            tracing::info!(run = %self.run_id, "{m}");
                            self.note(&m);
                            sb.destroy().await;
                            start = Start::Fresh { lock: pl.builder_lock(&warn) };
                            continue;
                        }
                        Err(e) if self.cancel.is_cancelled() || tokio::time::Instant::now() >= self.deadline => {
                            sb.destroy().await;
                            return Err(e);
                        }
                        Err(e) => {
                            // The entry's workspace did not take the update: it goes, and the setup runs again.
                            warn(&format!("the cached environment {short} could not be brought to {} ({e}); running the setup", p.git_ref));
                            sb.destroy().await;
                            pl.store.discard(&pl.key);
                            start = Start::Fresh { lock: pl.builder_lock(&warn) };
                            continue;
                        }
                    }
                };
                let Some(base) = base else {
                    sb.destroy().await;
                    return Err("the cached environment's commit is unknown".into());
                };
                if let Err(e) = sb.gateway().enter_phase(Phase::Agent) {
                    sb.destroy().await;
                    return Err(format!("ending the setup phase: {e}"));
                }
                self.settle(Ok(base));
                return Ok((sb, mode));
            }
            let t0 = Instant::now();
            // The declared inputs are read before the setup runs (which may change the files), and only by the
            // run that may store the entry.
            let record = !t.job.cache_inputs.is_empty() && matches!(&start, Start::Fresh { lock: Some(_) });
            let prepared = self
                .bounded(async {
                    let base = clone_repo(sb.client(), sb.gateway(), t, p, &self.log).await?;
                    let inputs = match record {
                        true => Some(input_ids(sb.client(), &base, &t.job.cache_inputs, &self.log).await),
                        false => None,
                    };
                    setup(sb.client(), sb.gateway(), &self.script, &self.log).await?;
                    sb.gateway().enter_phase(Phase::Agent).map_err(|e| format!("ending the setup phase: {e}"))?;
                    Ok((base, inputs))
                })
                .await;
            let (base, inputs) = match prepared {
                Ok(b) => b,
                Err(e) => {
                    sb.destroy().await;
                    return Err(e);
                }
            };
            // Inputs that cannot be read make an entry that no later run could trust: this run stores nothing
            // (and lets another build), but goes on.
            let inputs = match inputs {
                Some(Err(e)) => {
                    warn(&format!("{e}; running without storing the environment"));
                    start = Start::Fresh { lock: None };
                    None
                }
                Some(Ok(i)) => Some(i),
                None => None,
            };
            cloned = Some(base.clone());
            let Some(pl) = &plan else {
                self.settle(Ok(base));
                return Ok((sb, "setup".into()));
            };
            let building = matches!(&start, Start::Fresh { lock: Some(_) }) && sb.capturable();
            if building {
                self.note(&format!("setup: storing the environment in the cache (key {})", pl.short_key()));
            }
            match pl.capture(sb, &mut start, t0.elapsed().as_millis() as u64, &warn).await {
                // Not the builder: this VM goes on.
                Err(sb) => {
                    self.settle(Ok(base));
                    return Ok((sb, "setup".into()));
                }
                // Captured: the next turn restores from the entry (or, if the capture failed, runs the setup again
                // without storing). Without its record an entry with declared inputs is stale for every later run.
                Ok(Some(entry)) => {
                    if let Some(inputs) = &inputs {
                        if let Err(e) = write_record(&entry, inputs) {
                            warn(&e);
                        }
                    }
                    continue;
                }
                Ok(None) => continue,
            }
        }
    }
}

impl crate::manager::Prepare for Ready {
    fn prepare<'a>(&'a self, host: &'a Host, cfg: &'a SandboxConfig) -> crate::manager::Prepared<'a> {
        Box::pin(async move {
            let r = match self.ready(host, cfg).await {
                // The run gave up while the VM was being captured or restored (steps not bounded by the run): it
                // must not go live with no run to end it.
                Ok((sb, _)) if self.cancel.is_cancelled() || tokio::time::Instant::now() >= self.deadline => {
                    sb.destroy().await;
                    Err("the run ended while its VM was being prepared".to_string())
                }
                r => r,
            };
            if let Err(e) = &r {
                self.settle(Err(e.clone()));
            }
            r
        })
    }
}
