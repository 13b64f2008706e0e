//! A sandbox's egress: its gateway (built per sandbox from the host user's checked policy), the environment
//! that points the guest's programs at it, and the host end of the streams the guest opens.

use std::sync::Arc;

use hutch_gateway::{AuditSink, CountingAuditSink, DnsAnswer, Gateway, GatewayConfig, Phase, PhaseEgress};
use hutch_policy::{CheckedPolicy, LoadedSecret, PolicyInput};
use hutch_proto::frame::{read_header, write_header};
use hutch_proto::mux::Stream;
use hutch_proto::{DnsReply, GuestRequest};

use crate::SandboxError;

type SecretLoader = dyn Fn(&CheckedPolicy) -> Result<Vec<LoadedSecret>, String> + Send + Sync;

/// The host user's egress decision for one sandbox. Secret values are loaded when the sandbox starts and live
/// only in the host-side gateway.
#[derive(Clone)]
pub struct Egress {
    /// The agent phase's policy: what the command may reach.
    pub policy: Arc<CheckedPolicy>,
    /// A setup phase's own policy. With one, the gateway starts in the setup phase, and the caller moves it to
    /// the agent phase ([`Gateway::enter_phase`]) when the setup script is done.
    pub setup: Option<Arc<CheckedPolicy>>,
    pub audit: Arc<dyn AuditSink>,
    pub limits: hutch_gateway::Limits,
    load_secrets: Arc<SecretLoader>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress").field("policy", &self.policy).field("setup", &self.setup).finish_non_exhaustive()
    }
}

impl Egress {
    /// Values of the policy's secrets come from the host environment (`$NAME`, or the policy's file/env source).
    pub fn new(policy: CheckedPolicy, audit: Arc<dyn AuditSink>) -> Self {
        Self {
            policy: Arc::new(policy),
            setup: None,
            audit,
            limits: hutch_gateway::Limits::default(),
            load_secrets: Arc::new(|p: &CheckedPolicy| p.load_secrets().map_err(|e| e.to_string())),
        }
    }

    /// Adds a setup phase with its own policy (and secrets) before the agent phase.
    pub fn with_setup_phase(mut self, policy: CheckedPolicy) -> Self {
        self.setup = Some(Arc::new(policy));
        self
    }

    /// Secrets from elsewhere (a daemon's encrypted store).
    pub fn with_secret_loader(mut self, f: impl Fn(&CheckedPolicy) -> Result<Vec<LoadedSecret>, String> + Send + Sync + 'static) -> Self {
        self.load_secrets = Arc::new(f);
        self
    }

    /// No allow rules: every connection and lookup is denied (and counted; no record is kept).
    pub fn deny_all() -> Self {
        let policy = CheckedPolicy::from_input(&PolicyInput::default()).unwrap_or_else(|_| unreachable_empty_policy());
        Self::new(policy, Arc::new(CountingAuditSink::new()))
    }

    pub(crate) fn gateway(&self, sandbox_id: &str) -> Result<Gateway, SandboxError> {
        let secrets = (self.load_secrets)(&self.policy).map_err(SandboxError::Gateway)?;
        let mut cfg = GatewayConfig::new(sandbox_id, self.policy.clone(), secrets, self.audit.clone());
        cfg.limits = self.limits.clone();
        if let Some(policy) = &self.setup {
            let secrets = (self.load_secrets)(policy).map_err(|e| SandboxError::Gateway(format!("setup phase: {e}")))?;
            cfg.setup = Some(PhaseEgress { policy: policy.clone(), secrets });
        }
        Gateway::new(cfg).map_err(|e| SandboxError::Gateway(crate::error_chain(&e)))
    }
}

fn unreachable_empty_policy() -> CheckedPolicy {
    // An empty input has nothing that can fail to parse; keep a second path anyway rather than panic.
    CheckedPolicy::from_toml_str("", std::path::Path::new("<empty>")).unwrap_or_else(|e| panic!("empty policy rejected: {e}"))
}

/// The environment every guest process starts with: the user's variables, each agent-phase secret's placeholder
/// under the secret's name, and the settings that send proxy-aware programs to the gateway and make TLS clients trust the
/// sandbox CA.
pub fn guest_env(gateway: &Gateway, user: &[(String, String)]) -> Vec<(String, String)> {
    const BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
    let proxy = "http://127.0.0.1:3128";
    let mut env: Vec<(String, String)> = [
        ("HTTP_PROXY", proxy),
        ("HTTPS_PROXY", proxy),
        ("http_proxy", proxy),
        ("https_proxy", proxy),
        ("NO_PROXY", "localhost,127.0.0.1,::1"),
        ("no_proxy", "localhost,127.0.0.1,::1"),
        ("SSL_CERT_FILE", BUNDLE),
        ("REQUESTS_CA_BUNDLE", BUNDLE),
        ("CURL_CA_BUNDLE", BUNDLE),
        ("GIT_SSL_CAINFO", BUNDLE),
        ("NODE_EXTRA_CA_CERTS", "/etc/hutch/ca.crt"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(gateway.placeholders());
    env.extend(user.iter().cloned());
    env
}

/// What a setup-phase process gets on top of [`guest_env`]: the setup phase's placeholders, which no other
/// process ever sees.
pub fn setup_env(gateway: &Gateway) -> Vec<(String, String)> {
    gateway.phase_placeholders(Phase::Setup)
}

/// Serves the streams the guest opens: each is a DNS question, a proxy connection or a transparent tunnel,
/// and each is decided by the gateway.
pub async fn serve_guest_streams(mut inbound: tokio::sync::mpsc::Receiver<Stream>, gateway: Gateway) {
    while let Some(mut stream) = inbound.recv().await {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let Ok(req) = read_header::<_, GuestRequest>(&mut stream).await else { return };
            match req {
                GuestRequest::Dns { name } => {
                    let reply = match gateway.dns_allowed(&name) {
                        DnsAnswer::Allowed { .. } => DnsReply::Allowed,
                        DnsAnswer::Denied { .. } => DnsReply::Denied,
                    };
                    let _ = write_header(&mut stream, &reply).await;
                }
                GuestRequest::Proxy => gateway.serve_proxy(stream).await,
                GuestRequest::Tunnel { name, port } => gateway.serve_tunnel(stream, &name, port).await,
            }
        });
    }
}
