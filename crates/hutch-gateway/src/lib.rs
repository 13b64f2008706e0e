//! Hutch's host-side egress gateway for one sandbox. Every TCP connection the sandbox makes
//! arrives here (as an HTTP proxy connection or a transparent tunnel with the destination name);
//! the gateway decides it against the checked policy, dials exactly the checked address, logs
//! it, and on hosts that secrets are bound to terminates TLS with a per-sandbox CA to swap
//! placeholders for real values. DNS questions are answered from policy alone.
//!
//! A gateway may have a setup phase before its agent phase, each with its own checked policy and
//! secrets (`hutch run --setup`). It starts in the first; [`Gateway::enter_phase`] moves it on:
//! from then on every decision uses the new phase's policy, the old phase's secrets are never
//! swapped again (their values are dropped, their placeholders only flagged), and connections
//! opened under the old phase are closed.

mod audit;
mod ca;
mod conn;
mod decode;
mod forward;
mod http;
mod io;
mod mask;
mod proxy;
mod secrets;
mod upstream;
mod ws;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Duration;

pub use hutch_policy::Phase;
use hutch_policy::{CheckedPolicy, HostName, HostPattern, LoadedSecret};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

pub use audit::{
    AuditEvent, AuditRecord, AuditSink, DenialEntry, DenialSummary, FileAuditSink, MemoryAuditSink, CountingAuditSink,
    Mode, Verdict, Via,
};
pub use upstream::{BoxFuture, Resolver, SystemResolver};

use crate::audit::Auditor;
use crate::ca::SandboxCa;
use crate::io::{Budget, Meter, Metered};
use crate::secrets::SecretTable;
use crate::upstream::{Decided, Refusal, UpstreamTls};

/// Resource limits for one sandbox's gateway.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once (proxy connections and tunnels together).
    pub max_connections: usize,
    /// Bytes moved through the gateway in both directions over the gateway's life.
    pub max_total_bytes: u64,
    /// Request line plus headers, per request (431 beyond).
    pub max_header_bytes: usize,
    /// Request body on intercepted connections (413 beyond).
    pub max_body_bytes: usize,
    /// Responses on secret-bearing hosts up to this size are buffered and masked with the full
    /// placeholder; larger ones are masked while streaming with same-length stand-ins.
    pub max_mask_bytes: usize,
    /// A compressed response on a masked connection may decode to at most this many bytes;
    /// beyond, it is refused as a decompression bomb.
    pub max_decoded_bytes: u64,
    /// Name resolution, TCP connect and upstream TLS handshake.
    pub connect_timeout: Duration,
    /// Sandbox-side ClientHello, TLS handshake and request headers (slowloris).
    pub handshake_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 256,
            max_total_bytes: 64 << 30,
            max_header_bytes: 64 << 10,
            max_body_bytes: 32 << 20,
            max_mask_bytes: 4 << 20,
            max_decoded_bytes: 256 << 20,
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// One phase's policy and the values of its secrets.
pub struct PhaseEgress {
    pub policy: Arc<CheckedPolicy>,
    /// Values loaded on the host with [`CheckedPolicy::load_secrets`].
    pub secrets: Vec<LoadedSecret>,
}

/// Everything one sandbox's gateway is built from.
pub struct GatewayConfig {
    /// Short printable id, `[A-Za-z0-9._-]`, at most 64 characters.
    pub sandbox_id: String,
    /// The agent phase's policy (the only phase unless `setup` is given).
    pub policy: Arc<CheckedPolicy>,
    /// Values loaded on the host with [`CheckedPolicy::load_secrets`].
    pub secrets: Vec<LoadedSecret>,
    /// A setup phase that comes first, with its own policy and secrets.
    pub setup: Option<PhaseEgress>,
    pub audit: Arc<dyn AuditSink>,
    pub limits: Limits,
    /// The host's own interface addresses, refused as destinations.
    pub host_addrs: Vec<IpAddr>,
    pub resolver: Arc<dyn Resolver>,
    /// Trust the system's root certificates for upstream TLS (besides `--upstream-ca`).
    pub system_roots: bool,
}

impl GatewayConfig {
    /// Defaults: [`Limits::default`], the host's interface addresses, the system resolver and
    /// system roots.
    pub fn new(
        sandbox_id: impl Into<String>,
        policy: Arc<CheckedPolicy>,
        secrets: Vec<LoadedSecret>,
        audit: Arc<dyn AuditSink>,
    ) -> GatewayConfig {
        GatewayConfig {
            sandbox_id: sandbox_id.into(),
            policy,
            secrets,
            setup: None,
            audit,
            limits: Limits::default(),
            host_addrs: host_interface_addrs(),
            resolver: Arc::new(SystemResolver),
            system_roots: true,
        }
    }
}

/// The host's interface addresses (empty if they cannot be listed).
pub fn host_interface_addrs() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(list) => list.into_iter().map(|i| i.ip()).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list host interface addresses");
            Vec::new()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("sandbox id {0:?} must be 1 to 64 characters of letters, digits, '.', '_' or '-'")]
    BadSandboxId(String),
    #[error("cannot create the sandbox CA or a leaf certificate")]
    Ca(#[source] rcgen::Error),
    #[error("cannot build a TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("upstream CA file {} holds no usable certificate", path.display())]
    UpstreamCa { path: PathBuf },
    #[error("the system random number generator failed")]
    Random(#[source] getrandom::Error),
    #[error("limits: {0}")]
    BadLimits(&'static str),
    #[error("secret {0} was not loaded from this policy")]
    UnknownSecret(String),
    #[error("this gateway has no {0} phase")]
    NoSuchPhase(Phase),
    #[error("cannot go back from the {from} phase to the {to} phase")]
    PhaseOrder { from: Phase, to: Phase },
}

/// The answer to a sandbox's DNS question, from policy alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsAnswer {
    /// Some allow rule covers this name; `name` is its canonical form.
    Allowed {
        name: HostName,
    },
    Denied {
        reason: String,
    },
}

/// What one phase decides with. Connections keep the phase they were decided under; when the
/// gateway leaves it, `ended` fires and they close.
pub(crate) struct PhaseState {
    pub(crate) phase: Phase,
    pub(crate) policy: Arc<CheckedPolicy>,
    pub(crate) upstream_tls: UpstreamTls,
    pub(crate) ended: CancellationToken,
}

/// The current phase and the secrets, changed together under one lock: a swap decision and a
/// phase change never interleave.
pub(crate) struct State {
    pub(crate) current: Arc<PhaseState>,
    pub(crate) secrets: SecretTable,
}

pub(crate) struct Inner {
    pub(crate) sandbox_id: String,
    /// In the order they run; the gateway starts in the first.
    pub(crate) phases: Vec<Arc<PhaseState>>,
    pub(crate) state: RwLock<State>,
    pub(crate) auditor: Auditor,
    pub(crate) limits: Limits,
    pub(crate) host_addrs: Vec<IpAddr>,
    pub(crate) resolver: Arc<dyn Resolver>,
    pub(crate) ca: SandboxCa,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) budget: Arc<Budget>,
}

impl Inner {
    pub(crate) fn state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The phase new connections and lookups are decided under.
    pub(crate) fn current(&self) -> Arc<PhaseState> {
        self.state().current.clone()
    }

    /// Hosts any phase binds a secret to (so a placeholder of another phase is seen and
    /// flagged), and hosts whose rule limits methods or paths, are always inspected; with
    /// `inspect_all`, every host is.
    pub(crate) fn must_intercept(&self, phase: &PhaseState, d: &Decided) -> bool {
        phase.policy.inspect_all()
            || self.state().secrets.any_bound_to(&d.name)
            || d.rule.restricts_requests()
    }

    pub(crate) fn try_slot(&self, phase: Phase, via: Via) -> Option<OwnedSemaphorePermit> {
        match self.slots.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let mut rec = AuditRecord::new(
                    &self.sandbox_id,
                    phase,
                    AuditEvent::Connection,
                    via,
                    "-".into(),
                    Verdict::Deny,
                );
                rec.reason = Some(format!(
                    "connection limit of {} reached",
                    self.limits.max_connections
                ));
                self.auditor.emit(&rec);
                None
            }
        }
    }

    /// Decides `host:port` under `phase` and dials it, unless the phase ends first.
    pub(crate) async fn decide_and_dial(
        &self,
        phase: &PhaseState,
        host: &str,
        port: u16,
    ) -> Result<(Decided, TcpStream, SocketAddr), Refusal> {
        let work = async {
            let decided = upstream::decide(
                &phase.policy,
                self.resolver.as_ref(),
                &self.host_addrs,
                host,
                port,
                self.limits.connect_timeout,
            )
            .await?;
            let (tcp, addr) = upstream::dial(&decided, self.limits.connect_timeout).await?;
            Ok((decided, tcp, addr))
        };
        tokio::select! {
            biased;
            () = phase.ended.cancelled() => Err(Refusal {
                dest: audit::sanitize(&format!("{host}:{port}")),
                reason: format!("the {} phase ended", phase.phase),
                status: ::http::StatusCode::SERVICE_UNAVAILABLE,
            }),
            r = work => r,
        }
    }
}

/// One sandbox's gateway. Cheap to clone; clones share the same state, CA and limits.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    pub fn new(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        let id = &config.sandbox_id;
        if id.is_empty()
            || id.len() > 64
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(GatewayError::BadSandboxId(audit::sanitize(id)));
        }
        let l = &config.limits;
        if l.max_connections == 0 {
            return Err(GatewayError::BadLimits(
                "max_connections must be at least 1",
            ));
        }
        if l.max_header_bytes < 1024 {
            return Err(GatewayError::BadLimits(
                "max_header_bytes must be at least 1024",
            ));
        }
        let mut inputs: Vec<(Phase, Arc<CheckedPolicy>, Vec<LoadedSecret>)> = Vec::new();
        if let Some(setup) = config.setup {
            inputs.push((Phase::Setup, setup.policy, setup.secrets));
        }
        inputs.push((Phase::Agent, config.policy, config.secrets));
        for (_, policy, secrets) in &inputs {
            for s in secrets {
                if !policy.secrets().iter().any(|p| p.name() == s.spec.name()) {
                    return Err(GatewayError::UnknownSecret(s.spec.name().to_string()));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut loaded = Vec::new();
        let mut phases = Vec::new();
        for (phase, policy, secrets) in inputs {
            loaded.extend(secrets.into_iter().map(|s| (phase, s)));
            phases.push(Arc::new(PhaseState {
                phase,
                upstream_tls: UpstreamTls::new(&policy, config.system_roots, provider.clone())?,
                policy,
                ended: CancellationToken::new(),
            }));
        }
        let first = phases[0].clone();
        let secrets = SecretTable::new(loaded, first.phase)?;
        // The CA may vouch only for hosts the gateway intercepts, in any phase.
        let mut permitted: Vec<HostPattern> = secrets.bound_patterns();
        for p in &phases {
            permitted.extend(
                p.policy
                    .rules()
                    .iter()
                    .filter(|r| p.policy.inspect_all() || r.restricts_requests())
                    .map(|r| r.pattern().clone()),
            );
        }
        let ca = SandboxCa::new(id, &permitted, provider)?;
        let inner = Inner {
            sandbox_id: config.sandbox_id,
            phases,
            state: RwLock::new(State {
                current: first,
                secrets,
            }),
            auditor: Auditor::new(config.audit),
            slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            budget: Arc::new(Budget::new(config.limits.max_total_bytes)),
            limits: config.limits,
            host_addrs: config.host_addrs,
            resolver: config.resolver,
            ca,
        };
        Ok(Gateway {
            inner: Arc::new(inner),
        })
    }

    pub fn sandbox_id(&self) -> &str {
        &self.inner.sandbox_id
    }

    /// The sandbox CA certificate (PEM) for the VM's trust store. The key never leaves the host.
    pub fn ca_cert_pem(&self) -> String {
        self.inner.ca.cert_pem()
    }

    /// The sandbox CA certificate (DER).
    pub fn ca_cert_der(&self) -> Vec<u8> {
        self.inner.ca.cert_der().to_vec()
    }

    /// `(secret name, placeholder)` pairs to put in the VM's environment instead of values: the
    /// agent phase's, which every process may see. A setup phase's go only to the processes of
    /// that phase ([`Gateway::phase_placeholders`]).
    pub fn placeholders(&self) -> Vec<(String, String)> {
        self.phase_placeholders(Phase::Agent)
    }

    /// `(secret name, placeholder)` pairs of the secrets bound in `phase`.
    pub fn phase_placeholders(&self, phase: Phase) -> Vec<(String, String)> {
        self.inner.state().secrets.placeholders(phase)
    }

    /// The phase the gateway decides in now.
    pub fn phase(&self) -> Phase {
        self.inner.current().phase
    }

    /// Moves to `next` (a no-op if already there; phases only move forward). From then on new
    /// connections, lookups and requests are decided under `next`'s policy; the secrets of the
    /// phases left behind are never swapped again and their values are dropped; connections
    /// opened under those phases are closed.
    pub fn enter_phase(&self, next: Phase) -> Result<(), GatewayError> {
        let inner = &self.inner;
        let target = inner
            .phases
            .iter()
            .position(|p| p.phase == next)
            .ok_or(GatewayError::NoSuchPhase(next))?;
        let left = {
            let mut st = inner.state.write().unwrap_or_else(|p| p.into_inner());
            let from = inner
                .phases
                .iter()
                .position(|p| Arc::ptr_eq(p, &st.current))
                .unwrap_or(0);
            if target == from {
                return Ok(());
            }
            if target < from {
                return Err(GatewayError::PhaseOrder {
                    from: st.current.phase,
                    to: next,
                });
            }
            st.current = inner.phases[target].clone();
            st.secrets.enter(next);
            inner.phases[from..target].to_vec()
        };
        for p in left {
            p.ended.cancel();
        }
        Ok(())
    }

    /// Serves one HTTP proxy connection from the sandbox until it closes.
    pub async fn serve_proxy<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        proxy::serve(self.inner.clone(), stream).await;
    }

    /// Serves one transparent connection the sandbox made to `name:port` until it closes.
    /// A refused destination closes the stream at once (and is audited).
    pub async fn serve_tunnel<S>(&self, stream: S, name: &str, port: u16)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = self.inner.clone();
        let phase = inner.current();
        let Some(_permit) = inner.try_slot(phase.phase, Via::Tunnel) else {
            return;
        };
        match inner.decide_and_dial(&phase, name, port).await {
            Ok((decided, tcp, addr)) => {
                let meter = Meter::new(inner.budget.clone());
                let io = Metered::new(stream, meter.clone());
                conn::carry(
                    inner.clone(),
                    io,
                    decided,
                    tcp,
                    addr,
                    Via::Tunnel,
                    meter,
                    phase,
                )
                .await;
            }
            Err(refusal) => {
                let mut rec = AuditRecord::new(
                    &inner.sandbox_id,
                    phase.phase,
                    AuditEvent::Connection,
                    Via::Tunnel,
                    refusal.dest,
                    Verdict::Deny,
                );
                rec.reason = Some(refusal.reason);
                inner.auditor.emit(&rec);
            }
        }
    }

    /// Answers "may the sandbox resolve `name`?" from policy alone; nothing is looked up.
    pub fn dns_allowed(&self, name: &str) -> DnsAnswer {
        let inner = &self.inner;
        let phase = inner.current();
        let (answer, dest) = match HostName::parse(name) {
            Err(e) => (
                DnsAnswer::Denied {
                    reason: e.to_string(),
                },
                audit::sanitize(name),
            ),
            Ok(n) => match phase.policy.allows_name(&n) {
                Some(_) => (DnsAnswer::Allowed { name: n.clone() }, n.to_string()),
                None => (
                    DnsAnswer::Denied {
                        reason: "no allow rule".into(),
                    },
                    n.to_string(),
                ),
            },
        };
        let verdict = if matches!(answer, DnsAnswer::Allowed { .. }) {
            Verdict::Allow
        } else {
            Verdict::Deny
        };
        let mut rec = AuditRecord::new(
            &inner.sandbox_id,
            phase.phase,
            AuditEvent::Dns,
            Via::Dns,
            dest,
            verdict,
        );
        if let DnsAnswer::Denied { reason } = &answer {
            rec.reason = Some(reason.clone());
        }
        inner.auditor.emit(&rec);
        answer
    }

    /// Denials so far, grouped by destination and reason.
    pub fn summary(&self) -> DenialSummary {
        self.inner.auditor.summary()
    }

    /// Bytes moved through this gateway so far (both directions).
    pub fn bytes_used(&self) -> u64 {
        self.inner.budget.used()
    }
}
