//! Prometheus metrics: sandboxes by state (read from the database at scrape time, so they always match it),
//! creates and failures, boot and restore time histograms, destroys by reason, cap and quota rejections, and
//! the gateway's bytes and denials (zero until the gateway is wired into sandboxes).

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub sandboxes: Family<StateLabel, Gauge>,
    pub creates: Counter,
    pub create_failures: Counter,
    pub boot_seconds: Histogram,
    pub restore_seconds: Histogram,
    pub destroys: Family<ReasonLabel, Counter>,
    pub rejections: Family<ReasonLabel, Counter>,
    pub gateway_bytes: Counter,
    pub gateway_denials: Counter,
    pub pool_ready: Gauge,
    /// Event-triggered runs waiting for a slot (refreshed from the database at scrape time).
    pub runs_queued: Gauge,
    pub runs_running: Gauge,
    pub runs_ended: Family<OutcomeLabel, Counter>,
    /// Queued to ended, per run.
    pub run_seconds: Histogram,
    /// Webhook received to the command's first output.
    pub run_first_output_seconds: Histogram,
    pub webhooks: Family<OutcomeLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("hutch");
        let sandboxes = Family::<StateLabel, Gauge>::default();
        let creates = Counter::default();
        let create_failures = Counter::default();
        // Restores take ~0.1-1 s under TCG, cold boots 2-30 s.
        let boot_seconds = Histogram::new([0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0].into_iter());
        let restore_seconds = Histogram::new([0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0].into_iter());
        let destroys = Family::<ReasonLabel, Counter>::default();
        let rejections = Family::<ReasonLabel, Counter>::default();
        let gateway_bytes = Counter::default();
        let gateway_denials = Counter::default();
        let pool_ready = Gauge::default();
        let runs_queued = Gauge::default();
        let runs_running = Gauge::default();
        let runs_ended = Family::<OutcomeLabel, Counter>::default();
        let run_seconds = Histogram::new([5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0].into_iter());
        let run_first_output_seconds = Histogram::new([0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0].into_iter());
        let webhooks = Family::<OutcomeLabel, Counter>::default();
        registry.register("runs_queued", "Event-triggered runs waiting for a slot", runs_queued.clone());
        registry.register("runs_running", "Event-triggered runs in progress", runs_running.clone());
        registry.register("runs_ended", "Event-triggered runs ended, by outcome", runs_ended.clone());
        registry.register("run_seconds", "Event-triggered runs, queued to ended", run_seconds.clone());
        registry.register("run_first_output_seconds", "Event-triggered runs, event received to the command's first output", run_first_output_seconds.clone());
        registry.register("webhooks", "Webhook deliveries, by outcome (accepted, duplicate, ignored, bad_signature, too_large, rate_limited, ...)", webhooks.clone());
        registry.register("sandboxes", "Sandboxes by state, as recorded in the database", sandboxes.clone());
        registry.register("sandbox_creates", "Sandbox starts attempted", creates.clone());
        registry.register("sandbox_create_failures", "Sandbox starts that failed", create_failures.clone());
        registry.register("sandbox_boot_seconds", "Time from create to a ready guest, cold boots", boot_seconds.clone());
        registry.register("sandbox_restore_seconds", "Time from create to a ready guest, snapshot restores", restore_seconds.clone());
        registry.register("sandbox_destroys", "Sandboxes ended, by reason", destroys.clone());
        registry.register("sandbox_rejections", "Creates refused by the concurrency cap or a token quota", rejections.clone());
        registry.register("gateway_bytes", "Bytes carried by the egress gateways", gateway_bytes.clone());
        registry.register("gateway_denials", "Egress requests denied by policy", gateway_denials.clone());
        registry.register("pool_ready", "Restored, paused VMs waiting in the warm pool", pool_ready.clone());
        Metrics {
            registry,
            sandboxes,
            creates,
            create_failures,
            boot_seconds,
            restore_seconds,
            destroys,
            rejections,
            gateway_bytes,
            gateway_denials,
            pool_ready,
            runs_queued,
            runs_running,
            runs_ended,
            run_seconds,
            run_first_output_seconds,
            webhooks,
        }
    }

    pub fn destroyed(&self, reason: &str) {
        self.destroys.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    pub fn run_ended(&self, outcome: &str) {
        self.runs_ended.get_or_create(&OutcomeLabel { outcome: outcome.to_string() }).inc();
    }

    pub fn webhook(&self, outcome: &str) {
        self.webhooks.get_or_create(&OutcomeLabel { outcome: outcome.to_string() }).inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejections.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    /// The text exposition, with the state gauges refreshed from the database.
    pub fn render(&self, store: &Store) -> Result<String, crate::DaemonError> {
        let counts = store.count_by_state()?;
        for state in ["creating", "running", "destroying", "destroyed", "failed"] {
            let n = counts.iter().find(|(s, _)| s == state).map(|(_, n)| *n).unwrap_or(0);
            self.sandboxes.get_or_create(&StateLabel { state: state.to_string() }).set(n);
        }
        let runs = store.count_runs_by_state()?;
        let n = |s: &str| runs.iter().find(|(st, _)| st == s).map(|(_, n)| *n).unwrap_or(0);
        self.runs_queued.set(n("queued"));
        self.runs_running.set(n("running"));
        let mut out = String::new();
        encode(&mut out, &self.registry).map_err(|e| crate::DaemonError::Internal(format!("encode metrics: {e}")))?;
        Ok(out)
    }
}
