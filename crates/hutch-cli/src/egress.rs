//! Turning the egress flags into a checked policy, and the end-of-run summary of what was denied.

use std::sync::Arc;

use anyhow::Context;
use hutch_gateway::{AuditSink, DenialSummary, FileAuditSink, MemoryAuditSink};
use hutch_policy::{CheckedPolicy, PolicyInput};
use hutch_sandbox::egress::Egress;

use crate::cli::EgressArgs;

pub fn from_args(a: &EgressArgs) -> anyhow::Result<Egress> {
    let input = PolicyInput {
        policy_file: a.policy.clone(),
        allow: a.allow.clone(),
        resolve: a.resolve.clone(),
        upstream_ca: a.upstream_ca.clone(),
        secrets: a.secret.clone(),
    };
    let policy = CheckedPolicy::from_input(&input).context("egress policy")?;
    // Fail before any VM starts if a secret's value is missing on the host.
    policy.load_secrets().context("egress secrets")?;
    let audit: Arc<dyn AuditSink> = match &a.audit {
        Some(path) => Arc::new(FileAuditSink::create(path).with_context(|| format!("cannot open audit log {}", path.display()))?),
        None => Arc::new(MemoryAuditSink::new()),
    };
    Ok(Egress::new(policy, audit))
}

pub fn print_denials(s: &DenialSummary) {
    if !s.is_empty() {
        eprint!("{s}");
    }
}
