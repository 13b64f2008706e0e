//! A warm pool: VMs restored from the snapshot ahead of time, warmed up (so the emulator has already translated
//! the exec path), paused, and handed out with a fresh identity and gateway. Refilled in the background,
//! drained on shutdown. Nothing per-sandbox touches a pooled VM before it is handed out.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hutch_vmm::Vm;
use tokio::sync::Notify;

use crate::{AgentClient, Attached, Host, Sandbox, SandboxConfig, SandboxError, StartMode};

/// How many warm-up commands a pooled VM runs before it is paused.
const WARM_RUNS: usize = 2;

/// How long the refill waits after a take before restoring the replacement.
const REFILL_DELAY: Duration = Duration::from_millis(500);

struct Inner {
    host: Host,
    cfg: SandboxConfig,
    size: usize,
    ready: Mutex<VecDeque<Attached>>,
    wake: Notify,
    stopping: AtomicBool,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Attached>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Pool {
    inner: Arc<Inner>,
    refill: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Pool {
    /// Starts keeping `size` paused VMs of `cfg`'s size ready (making the snapshot first if needed).
    pub fn start(host: Host, cfg: SandboxConfig, size: usize) -> Pool {
        let inner = Arc::new(Inner { host, cfg, size, ready: Mutex::new(VecDeque::new()), wake: Notify::new(), stopping: AtomicBool::new(false) });
        let refill = tokio::spawn(refill(inner.clone()));
        Pool { inner, refill: Mutex::new(Some(refill)) }
    }

    /// VMs ready to hand out right now.
    pub fn ready(&self) -> usize {
        self.inner.lock().len()
    }

    /// The runtime directories of the pooled VMs (for diagnostics and leak checks).
    pub fn ready_dirs(&self) -> Vec<std::path::PathBuf> {
        self.inner.lock().iter().map(|a| a.dir.path().to_path_buf()).collect()
    }

    /// Waits until the pool is full (or `timeout` passes); true when full.
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.ready() < self.inner.size {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    fn fits(&self, cfg: &SandboxConfig) -> bool {
        let p = &self.inner.cfg;
        cfg.cpus == p.cpus && cfg.memory_mib == p.memory_mib && cfg.accel == p.accel && !cfg.cold && cfg.extra_kernel_args.is_empty()
    }

    /// A sandbox for `cfg`: from the pool when one of its size is ready, else created the usual way.
    pub async fn take(&self, cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        if self.fits(cfg) && !self.inner.stopping.load(Ordering::SeqCst) {
            let warm = self.inner.lock().pop_front();
            self.inner.wake.notify_one();
            if let Some(mut warm) = warm {
                match warm.vm.resume().await {
                    Ok(()) => match warm.finish(cfg).await {
                        Ok(mut sb) => {
                            sb.start.mode = StartMode::Pooled;
                            sb.start.took = t0.elapsed();
                            return Ok(sb);
                        }
                        Err(e) => tracing::warn!("pooled VM failed to start ({e}); creating a fresh one"),
                    },
                    Err(e) => {
                        tracing::warn!("pooled VM failed to resume ({e}); creating a fresh one");
                        warm.discard().await;
                    }
                }
            }
        }
        Sandbox::create(&self.inner.host, cfg).await
    }

    /// Stops refilling and destroys every pooled VM; later takes create sandboxes the usual way.
    pub async fn drain(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
        let refill = self.refill.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(r) = refill {
            let _ = r.await;
        }
        let all: Vec<Attached> = self.inner.lock().drain(..).collect();
        for a in all {
            a.discard().await;
        }
    }
}

async fn refill(inner: Arc<Inner>) {
    let mut failures = 0u32;
    while !inner.stopping.load(Ordering::SeqCst) {
        if inner.lock().len() >= inner.size {
            // Woken by a take or by drain; the timeout is a safety net against a lost wake-up.
            let woken = tokio::time::timeout(Duration::from_secs(1), inner.wake.notified()).await.is_ok();
            if woken && !inner.stopping.load(Ordering::SeqCst) {
                // A VM was just handed out: on a small host its first commands would compete with the
                // replacement's restore for the same cores. Let them go first.
                tokio::time::sleep(REFILL_DELAY).await;
            }
            continue;
        }
        match warm_one(&inner).await {
            Ok(a) => {
                failures = 0;
                if inner.stopping.load(Ordering::SeqCst) {
                    a.discard().await;
                    return;
                }
                inner.lock().push_back(a);
            }
            Err(e) => {
                failures += 1;
                tracing::warn!("warm pool: cannot prepare a VM ({}); retrying", crate::error_chain(&e));
                tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(25)))).await;
            }
        }
    }
}

async fn warm_one(inner: &Inner) -> Result<Attached, SandboxError> {
    let host = &inner.host;
    let accel = host.caps.choose(inner.cfg.accel)?;
    let snap = crate::snapshot::ensure(host, &inner.cfg).await?;
    let mut a = Sandbox::restore_attached(host, &inner.cfg, accel, &snap).await?;
    // Commands before pausing, shaped like a first real one (a dynamic program, the locale, output on both
    // streams): the guest kernel's exec path, the loader, libc and the agent's output path get translated by
    // the emulator now, not on the first real request. Absolute paths and an explicit environment: the base
    // environment arrives only with the identity.
    let client = AgentClient::new(a.session.clone());
    let warm = async {
        client.ping().await?;
        for _ in 0..WARM_RUNS {
            let req = hutch_proto::ExecRequest {
                argv: ["/bin/sh", "-c", "/bin/echo warm; /bin/echo warm >&2"].map(String::from).to_vec(),
                env: vec![("LANG".into(), "C.UTF-8".into()), ("PATH".into(), "/usr/bin:/bin".into())],
                cwd: None,
                stdin: false,
                tty: None,
            };
            let out = client.run_request(req).await?;
            if out.status != Some(hutch_proto::ExitStatus::Code(0)) || out.stdout != b"warm\n" {
                return Err(SandboxError::Guest(format!("warm-up exec ended with {:?}", out.status)));
            }
        }
        Ok(())
    };
    let r = tokio::time::timeout(Duration::from_secs(10), warm).await;
    match r {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            a.discard().await;
            return Err(e);
        }
        Err(_) => {
            a.discard().await;
            return Err(SandboxError::Guest("warm-up exec timed out".into()));
        }
    }
    if let Err(e) = a.vm.pause().await {
        a.discard().await;
        return Err(e.into());
    }
    a.mode = StartMode::Pooled;
    Ok(a)
}
