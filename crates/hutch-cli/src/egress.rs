//! Turning the egress flags, the user's config and an approved hutch.toml into each phase's checked policy, and the
//! end-of-run summary of what was denied.

use std::sync::Arc;

use anyhow::{bail, Context};
use hutch_gateway::{AuditSink, DenialSummary, FileAuditSink, MemoryAuditSink};
use hutch_policy::{CheckedPolicy, EnvFile, LoadedSecret, PhasedPolicy, PolicyInput, PolicyLayer, SecretSource};
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
    let env_files = read_env_files(a, user, &phased, setup_runs)?;
    let load = move |p: &CheckedPolicy| -> Result<Vec<LoadedSecret>, hutch_policy::PolicyError> {
        p.load_secrets_with(|var| match env_files.iter().find_map(|f| f.get(var)) {
            Some(e) => Some(e.expose().to_string()),
            None => std::env::var(var).ok(),
        })
    };
    load(&phased.agent).context("egress secrets")?;
    if setup_runs {
        load(&phased.setup).context("egress secrets of the setup phase")?;
    }
    let audit: Arc<dyn AuditSink> = match &a.audit {
        Some(path) => Arc::new(FileAuditSink::create(path).with_context(|| format!("cannot open audit log {}", path.display()))?),
        None => Arc::new(MemoryAuditSink::new()),
    };
    let PhasedPolicy { setup, agent } = phased;
    let egress = Egress::new(agent, audit).with_secret_loader(move |p| load(p).map_err(|e| e.to_string()));
    Ok(if setup_runs { egress.with_setup_phase(setup) } else { egress })
}

/// `--env-file` and `[secrets] from_env_file`, read and checked: every key must be a secret that a phase which
/// runs binds to hosts (a `--secret KEY@HOST`, or a policy secret read from `$KEY`), and every value must be
/// usable as one. Their values then stand in for hutch's environment when secrets are loaded. A key without a
/// binding is refused rather than passed in as it is: the VM gets placeholders, never values.
fn read_env_files(a: &EgressArgs, user: &UserConfig, phased: &PhasedPolicy, setup_runs: bool) -> anyhow::Result<Vec<EnvFile>> {
    let mut files: Vec<EnvFile> = Vec::new();
    for path in a.env_file.iter().chain(user.env_file.as_ref()) {
        let f = EnvFile::read(path)?;
        for e in &f.entries {
            if let Some(other) = files.iter().find(|o| o.get(e.key.as_str()).is_some()) {
                bail!(
                    "{} is set in both {} and {} (line {}); keep it in one of them",
                    e.key,
                    other.path.display(),
                    f.path.display(),
                    e.line
                );
            }
        }
        files.push(f);
    }
    let mut phases = vec![&phased.agent];
    if setup_runs {
        phases.push(&phased.setup);
    }
    for f in &files {
        for e in &f.entries {
            let key = e.key.as_str();
            let bound = phases.iter().any(|p| p.secrets().iter().any(|s| matches!(s.source(), SecretSource::Env(v) if v == key)));
            if !bound {
                bail!(
                    "{} (line {}): {key} is not bound to any host, so its value would have nowhere to go; bind it with \
                     --secret {key}@HOST (and --allow HOST) to have the gateway send it to HOST only, pass it with --env \
                     {key}=VALUE if it is not secret, or remove the line. No VM was started",
                    f.path.display(),
                    e.line
                );
            }
            e.secret_value(&f.path)?;
        }
    }
    Ok(files)
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

    /// Class 12: every env-file key must be a bound secret with a usable value; refusals name the file, line and
    /// key, never the value.
    #[test]
    fn class_12_env_file_keys_must_be_bound_and_values_never_shown() {
        let t = tempfile::tempdir().expect("tempdir");
        let f = t.path().join(".env");
        let g = t.path().join("other.env");
        std::fs::write(&f, "# keys\nAPI_KEY=value-xyz-123456\nDB_URL='value-xyz-654321'\n").expect("write");
        std::fs::write(&g, "DB_URL=value-xyz-777777\n").expect("write");
        let none = UserConfig::default();
        let args = |files: &[&std::path::Path], secrets: &[&str], allow: &[&str]| EgressArgs {
            env_file: files.iter().map(|p| p.to_path_buf()).collect(),
            secret: secrets.iter().map(|s| s.to_string()).collect(),
            allow: allow.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let e = err(build(&args(&[&f], &["API_KEY@api.example.com"], &["api.example.com"]), &none, None, false));
        assert!(e.contains("line 3): DB_URL is not bound to any host") && e.contains("--secret DB_URL@HOST"), "{e}");
        assert!(!e.contains("value-xyz"), "{e}");
        let both = args(&[&f], &["API_KEY@api.example.com", "DB_URL@db.example.com"], &["api.example.com", "db.example.com"]);
        build(&both, &none, None, false).expect("every key bound");
        // Bound only for a setup phase that does not run is not bound.
        let mut setup_only = args(&[&f], &["API_KEY@api.example.com"], &["api.example.com"]);
        setup_only.setup_secret = vec!["DB_URL@db.example.com".into()];
        setup_only.setup_allow = vec!["db.example.com".into()];
        build(&setup_only, &none, None, true).expect("bound in the setup phase, which runs");
        let mut two = both.clone();
        two.env_file.push(g.clone());
        let e = err(build(&two, &none, None, false));
        assert!(e.contains("DB_URL is set in both") && e.contains("other.env (line 1)") && !e.contains("value-xyz"), "{e}");
        std::fs::write(&f, "API_KEY=short\n").expect("write");
        let e = err(build(&args(&[&f], &["API_KEY@api.example.com"], &["api.example.com"]), &none, None, false));
        assert!(e.contains("line 1: the value of API_KEY is shorter than 8"), "{e}");
        let user = UserConfig { env_file: Some(g.clone()), ..Default::default() };
        let e = err(build(&EgressArgs::default(), &user, None, false));
        assert!(e.contains("other.env (line 1): DB_URL is not bound"), "[secrets] from_env_file is read too: {e}");
        assert!(!e.contains("value-xyz"), "{e}");
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
