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
use super::runner::{clone_repo, clone_url, setup, update_repo, Log};
use super::store::RunRow;

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
        let scope = format!("trigger {} repository {}", t.name, clone_url(t, p));
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
                    match self.bounded(update_repo(sb.client(), sb.gateway(), t, p, &self.log)).await {
                        Ok(b) => (Some(b), format!("environment cache (key {short}, made {} ago)", age(entry.age_secs()))),
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
                *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(base));
                return Ok((sb, mode));
            }
            let t0 = Instant::now();
            let prepared = self
                .bounded(async {
                    let base = clone_repo(sb.client(), sb.gateway(), t, p, &self.log).await?;
                    setup(sb.client(), sb.gateway(), &self.script, &self.log).await?;
                    sb.gateway().enter_phase(Phase::Agent).map_err(|e| format!("ending the setup phase: {e}"))?;
                    Ok(base)
                })
                .await;
            let base = match prepared {
                Ok(b) => b,
                Err(e) => {
                    sb.destroy().await;
                    return Err(e);
                }
            };
            cloned = Some(base.clone());
            let Some(pl) = &plan else {
                *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(base));
                return Ok((sb, "setup".into()));
            };
            let building = matches!(&start, Start::Fresh { lock: Some(_) }) && sb.capturable();
            if building {
                self.note(&format!("setup: storing the environment in the cache (key {})", pl.short_key()));
            }
            match pl.capture(sb, &mut start, t0.elapsed().as_millis() as u64, &warn).await {
                // Not the builder: this VM goes on.
                Err(sb) => {
                    *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(Ok(base));
                    return Ok((sb, "setup".into()));
                }
                // Captured: the next turn restores from the entry (or, if the capture failed, runs the setup again
                // without storing).
                Ok(_) => continue,
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
                *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(Err(e.clone()));
            }
            r
        })
    }
}
