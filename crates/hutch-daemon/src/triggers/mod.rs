//! Event-triggered runs: a signed webhook or a schedule starts a job in a fresh sandbox, and its change is
//! delivered to the forge by the host. `config` (the triggers file, checked), `event` (signature, filters, the
//! values a run is made of), `store` (runs, deliveries and schedule state in the daemon's database), `intake`
//! (`POST /hooks/{trigger}`), `runner` (the queue, limits, one VM per run, delivery), `envcache` (a run's setup
//! from and into the environment cache), `schedule` (cron), `api` (`/v1/runs`, `/v1/triggers`).

pub mod api;
pub mod config;
mod envcache;
pub mod event;
pub mod intake;
pub mod runner;
pub mod schedule;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Principal;
use crate::manager::Manager;
use crate::DaemonError;
pub use config::{ConfigError, TriggerSet};

/// The name of the token that owns the sandboxes of event-triggered runs (its secret is never known to anyone:
/// no request can authenticate as it).
pub const RUNS_TOKEN: &str = "hutch-runs";

/// A run this daemon is executing.
struct Running {
    trigger: String,
    key: Option<String>,
    cancel: CancellationToken,
    /// Why it is being cancelled (set before the token fires).
    why: Arc<Mutex<Option<(String, String)>>>,
}

/// Per-source rate limiting: a fixed one-minute window.
#[derive(Default)]
struct Window {
    start: Option<Instant>,
    count: u32,
}

/// Triggers of one daemon: the checked file, the queue and the runs in progress.
pub struct Triggers {
    pub mgr: Arc<Manager>,
    set: RwLock<Arc<TriggerSet>>,
    /// `<data dir>/runs/<id>/`: each run's output log and its collected change.
    runs_dir: PathBuf,
    principal: Principal,
    wake: Notify,
    running: Mutex<HashMap<String, Running>>,
    rate: Mutex<HashMap<String, Window>>,
    pub delivery_retry: hutch_forge::RetryPolicy,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Triggers {
    /// Sets up the triggers of `set`; settles what a previous daemon left (see [`Triggers::recover`]).
    pub fn new(mgr: Arc<Manager>, set: TriggerSet, data_dir: &std::path::Path) -> Result<Arc<Triggers>, DaemonError> {
        let runs_dir = data_dir.join("runs");
        std::fs::create_dir_all(&runs_dir).map_err(|source| DaemonError::Io { what: format!("create {}", runs_dir.display()), source })?;
        let principal = runs_principal(&mgr)?;
        Ok(Arc::new(Triggers {
            mgr,
            set: RwLock::new(Arc::new(set)),
            runs_dir,
            principal,
            wake: Notify::new(),
            running: Mutex::new(HashMap::new()),
            rate: Mutex::new(HashMap::new()),
            delivery_retry: hutch_forge::RetryPolicy::default(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        }))
    }

    pub fn set(&self) -> Arc<TriggerSet> {
        self.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the triggers (SIGHUP). Runs already queued keep the values they were made from; they run with
    /// the new file's trigger of their name, or fail if it is gone.
    pub fn replace(&self, set: TriggerSet) {
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        self.wake.notify_one();
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `trigger` may take another delivery this minute.
    fn rate_ok(&self, trigger: &str, per_minute: u32) -> bool {
        let mut m = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let w = m.entry(trigger.to_string()).or_default();
        let now = Instant::now();
        let window_over = match w.start {
            Some(s) => now.duration_since(s) >= Duration::from_secs(60),
            None => true,
        };
        if window_over {
            *w = Window { start: Some(now), count: 0 };
        }
        if w.count >= per_minute {
            return false;
        }
        w.count += 1;
        true
    }

    /// Settles runs a previous daemon left: queued ones stay queued and run; a run that was `running` lost its
    /// VM with that daemon and is recorded failed with the reason (never run a second time on its own: its
    /// command may have had effects; `hutch runs retry` starts it again).
    pub fn recover(&self) -> Result<(usize, usize), DaemonError> {
        let store = &self.mgr.store;
        let mut failed = 0;
        for r in store.runs(Some("running"), None, u32::MAX)? {
            if r.daemon_pid == Some(std::process::id() as i64) && self.running().contains_key(&r.id) {
                continue;
            }
            let reason = format!(
                "the daemon stopped while this run was in progress (previous pid {}); its VM did not survive. Not retried automatically: `hutch runs retry {}`",
                r.daemon_pid.unwrap_or(0),
                r.id
            );
            if store.end_run(&r.id, "failed", &reason)? {
                self.mgr.metrics.run_ended("failed");
                failed += 1;
            }
        }
        let queued = store.queued_runs()?.len();
        Ok((queued, failed))
    }

    /// Starts the runner and the schedules; they stop with [`Triggers::shutdown`].
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        self.tasks.spawn(async move { me.run_loop().await });
        let me = self.clone();
        self.tasks.spawn(async move { me.schedule_loop().await });
    }

    /// Cancels every run in progress (recorded failed: the daemon stopped) and waits for their VMs to go.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let ids: Vec<String> = self.running().keys().cloned().collect();
        for id in ids {
            self.cancel_running(&id, "failed", "the daemon shut down while this run was in progress; `hutch runs retry` starts it again");
        }
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn cancel_running(&self, id: &str, state: &str, reason: &str) -> bool {
        let m = self.running();
        let Some(r) = m.get(id) else { return false };
        *r.why.lock().unwrap_or_else(|p| p.into_inner()) = Some((state.to_string(), reason.to_string()));
        r.cancel.cancel();
        true
    }

    /// Cancels a queued or running run; whether it was unfinished.
    pub fn cancel(&self, id: &str, reason: &str) -> Result<bool, DaemonError> {
        if self.cancel_running(id, "cancelled", reason) {
            return Ok(true);
        }
        let ended = self.mgr.store.end_run(id, "cancelled", reason)?;
        if ended {
            self.mgr.metrics.run_ended("cancelled");
        }
        Ok(ended)
    }

    /// The run's output log.
    pub fn log_path(&self, id: &str) -> PathBuf {
        self.runs_dir.join(id).join("output.log")
    }
}

/// The principal that owns run sandboxes: a token row made once with a random secret nobody receives.
fn runs_principal(mgr: &Manager) -> Result<Principal, DaemonError> {
    let existing = mgr.store.tokens()?.into_iter().find(|t| t.name == RUNS_TOKEN && !t.revoked);
    let row = match existing {
        Some(t) => t,
        None => {
            let t = crate::auth::create_token(&mgr.store, RUNS_TOKEN, true, None)?;
            // The token itself is dropped here: the row exists to own sandboxes, not to be used.
            mgr.store.token(&t.id)?.ok_or_else(|| DaemonError::Internal("the runs token vanished".into()))?
        }
    };
    Ok(Principal { token_id: row.id, name: row.name, admin: true, max_sandboxes: None })
}

/// A new run id: `r` and 12 hex digits (letters and digits only: it names the branch `hutch/<id>`).
pub fn new_run_id() -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::getrandom(&mut b);
    format!("r{}", hex::encode(b))
}
