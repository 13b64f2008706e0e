//! Turning the egress flags, the user's config and an approved hutch.toml into each phase's checked policy, and the
//! end-of-run summary of what was denied.

use std::sync::Arc;

use anyhow::{bail, Context};
use hutch_gateway::{AuditSink, CountingAuditSink, DenialSummary, FileAuditSink};
use hutch_policy::{PhasedPolicy, PolicyInput, PolicyLayer};
use hutch_repo::ProjectConfig;
use hutch_sandbox::egress::Egress;

use crate::cli::EgressArgs;
use crate::config::UserConfig;

/// The sandbox's egress: the agent phase's policy, and the setup phase's when a setup script runs. Layers merge
/// with the flags first, then the user's config, then the approved hutch.toml. Every secret a phase that runs will
/// use must have its value on the host now, before any VM starts.
pub fn build(a: &EgressArgs, user: &UserConfig, project: Option<&ProjectConfig>, setup_runs: bool) -> anyhow::Result<Egress> {
    let input = PolicyInput {
        policy_file: a.policy.clone(),
        allow: a.allow.clone(),
        resolve: a.resolve.clone(),
        upstream_ca: a.upstream_ca.clone(),
        secrets: a.secret.clone(),
        setup_allow: a.setup_allow.clone(),
        setup_secrets: a.setup_secret.clone(),
    };
    let flags = PolicyLayer::from_input(&input).context("egress policy")?;
    if flags.has_setup() && !setup_runs {
        bail!(
            "--setup-allow, --setup-secret and a [setup] table in --policy are for a setup script, and this run has none; give one with --setup FILE"
        );
    }
    let mut layers = vec![flags];
    layers.extend(user.policy.clone());
    layers.extend(project.and_then(|p| p.policy.clone()));
    let phased = PhasedPolicy::merge(&layers).context("egress policy")?;
    phased.agent.load_secrets().context("egress secrets")?;
    if setup_runs {
        phased.setup.load_secrets().context("egress secrets of the setup phase")?;
    }
    let audit: Arc<dyn AuditSink> = match &a.audit {
        Some(path) => Arc::new(FileAuditSink::create(path).with_context(|| format!("cannot open audit log {}", path.display()))?),
        // No file: no record is kept at all (a guest can make millions); the end-of-run summary comes from the
        // gateway's bounded tally of denials.
        None => Arc::new(CountingAuditSink::new()),
    };
    let PhasedPolicy { setup, agent } = phased;
    let egress = Egress::new(agent, audit);
    Ok(if setup_runs { egress.with_setup_phase(setup) } else { egress })
}

pub fn print_denials(s: &DenialSummary) {
    if !s.is_empty() {
        eprint!("{s}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(r: anyhow::Result<Egress>) -> String {
        match r {
            Ok(_) => panic!("should fail"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn setup_rules_need_a_setup_script_and_its_secrets_load_only_with_one() {
        let none = UserConfig::default();
        let a = EgressArgs { setup_allow: vec!["pkgs.example.com".into()], ..Default::default() };
        assert!(err(build(&a, &none, None, false)).contains("--setup FILE"));
        let e = build(&a, &none, None, true).expect("with a setup script");
        assert!(e.setup.as_ref().is_some_and(|p| !p.rules().is_empty()) && e.policy.rules().is_empty());

        // The user's config may name setup secrets; their values are needed only when a setup script runs.
        let layer = PolicyLayer::from_toml_str(
            "[setup]\nallow = [\"pkgs.example.com\"]\n[setup.secrets.HUTCH_TEST_NEVER_SET_SETUP_SECRET]\nhosts = [\"pkgs.example.com\"]\n",
            std::path::Path::new("/cfg/config.toml"),
        )
        .expect("layer");
        let user = UserConfig { policy: Some(layer), ..Default::default() };
        let e = build(&EgressArgs::default(), &user, None, false).expect("no setup script, no setup secrets");
        assert!(e.setup.is_none());
        let msg = err(build(&EgressArgs::default(), &user, None, true));
        assert!(msg.contains("setup phase") && msg.contains("$HUTCH_TEST_NEVER_SET_SETUP_SECRET is not set"), "{msg}");
    }
}
