//! The user's own configuration, `$XDG_CONFIG_HOME/hutch/config.toml` (or `~/.config/hutch/config.toml`, or
//! `--config FILE`), and how `hutch run` merges its inputs. The user's file is always trusted (unlike a
//! repository's `hutch.toml`): defaults for the image, resources, and the egress of both phases.
//!
//! Merge order, highest first: flags, the user's config, an approved `hutch.toml`, built-in defaults. A scalar
//! (image, cpus, memory) comes from the highest source that sets it; egress policies are merged per phase, the
//! highest source deciding for each host and port, each secret name and each pin
//! ([`hutch_policy::PhasedPolicy::merge`]).

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::ValueEnum;
use hutch_policy::PolicyLayer;
use hutch_repo::{CredentialRules, ProjectConfig};
use serde::Deserialize;

use crate::cli::{ImageName, RunArgs};

/// Where the user's config lives, relative to the XDG config directory.
const RELATIVE: &str = "hutch/config.toml";
const MAX_FILE: u64 = 256 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    image: Option<String>,
    resources: Option<hutch_repo::project::RawResources>,
    policy: Option<toml::Table>,
    credentials: Option<hutch_repo::credentials::RawCredentials>,
    secrets: Option<RawSecrets>,
}

/// `[secrets]`: where values come from besides the host's environment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecrets {
    from_env_file: Option<PathBuf>,
}

/// The user's config in checked form; empty when there is none.
#[derive(Debug, Clone, Default)]
pub struct UserConfig {
    pub image: Option<ImageName>,
    pub cpus: Option<u32>,
    pub memory: Option<u32>,
    /// `[policy]`, in the `--policy` format; its `[policy.setup]` is the setup script's.
    pub policy: Option<PolicyLayer>,
    /// `[credentials]`: patterns to leave out of the VM besides the built-in list, and files to send anyway.
    pub credentials: CredentialRules,
    /// `[secrets] from_env_file`: an env file whose keys are secrets, like `--env-file` (relative to the config's
    /// directory).
    pub env_file: Option<PathBuf>,
}

/// `$XDG_CONFIG_HOME/hutch/config.toml`, else `$HOME/.config/hutch/config.toml`; `None` when neither variable
/// holds an absolute path.
pub fn default_path() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).map(PathBuf::from).filter(|p| p.is_absolute());
    var("XDG_CONFIG_HOME").or_else(|| var("HOME").map(|h| h.join(".config"))).map(|d| d.join(RELATIVE))
}

impl UserConfig {
    /// Reads `explicit` (`--config FILE`, which must exist) or the default file (which may be missing). A bad file
    /// is an error that names the file, the key and what to do.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<UserConfig> {
        let (path, must_exist) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => match default_path() {
                Some(p) => (p, false),
                None => return Ok(UserConfig::default()),
            },
        };
        let hint = if must_exist {
            "fix it, or run without --config".to_string()
        } else {
            "fix it or remove it (or point --config at another file); see `Configuration` in the README".to_string()
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if !must_exist && e.kind() == std::io::ErrorKind::NotFound => return Ok(UserConfig::default()),
            Err(e) => bail!("cannot read the config file {}: {e}", path.display()),
        };
        if !meta.is_file() || meta.len() > MAX_FILE {
            bail!("the config file {} is not a regular file of at most {} KiB; {hint}", path.display(), MAX_FILE / 1024);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("cannot read the config file {}: {e}", path.display()))?;
        match parse(&path, &text) {
            Ok(c) => Ok(c),
            Err(Problem::Key(msg)) => bail!("bad config file {}: {msg}\n{hint}", path.display()),
            Err(Problem::Policy(msg)) => bail!("bad config file {msg}\n{hint}"),
        }
    }
}

enum Problem {
    /// A problem with a key, to be prefixed with the file.
    Key(String),
    /// A policy error, which names the file itself.
    Policy(String),
}

fn parse(path: &Path, text: &str) -> Result<UserConfig, Problem> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| Problem::Key(e.to_string().trim_end().to_string()))?;
    let image = match &raw.image {
        None => None,
        Some(s) => Some(ImageName::from_str(s, false).map_err(|_| {
            let names: Vec<&str> = ImageName::value_variants().iter().map(|i| i.name()).collect();
            Problem::Key(format!("image = {s:?}: there is no such image; use one of {}", names.join(", ")))
        })?),
    };
    let (cpus, memory) = match &raw.resources {
        None => (None, None),
        Some(r) => {
            if let Some(c) = r.cpus.filter(|c| !(1..=64).contains(c)) {
                return Err(Problem::Key(format!("resources.cpus = {c}: must be 1 to 64")));
            }
            if let Some(m) = r.memory.filter(|m| !(128..=65536).contains(m)) {
                return Err(Problem::Key(format!("resources.memory = {m}: must be 128 to 65536 (MiB)")));
            }
            (r.cpus, r.memory)
        }
    };
    let policy = match &raw.policy {
        None => None,
        Some(t) => {
            let base = path.parent().unwrap_or(Path::new("/"));
            let origin = format!("{} [policy]", path.display());
            Some(PolicyLayer::from_table(t, &origin, base).map_err(|e| Problem::Policy(e.to_string()))?)
        }
    };
    let credentials = match &raw.credentials {
        None => CredentialRules::default(),
        Some(c) => CredentialRules::from_raw(c, "[credentials]").map_err(Problem::Key)?,
    };
    let base = path.parent().unwrap_or(Path::new("/"));
    let env_file = raw.secrets.and_then(|s| s.from_env_file).map(|f| base.join(f));
    Ok(UserConfig { image, cpus, memory, policy, credentials, env_file })
}

/// Which run settings were given as flags (the rest may come from config files).
#[derive(Debug, Clone, Copy, Default)]
pub struct Explicit {
    pub image: bool,
    pub cpus: bool,
    pub memory: bool,
}

impl Explicit {
    /// From `hutch run`'s parsed arguments.
    pub fn from_matches(run: &clap::ArgMatches) -> Explicit {
        use clap::parser::ValueSource;
        let given = |id: &str| run.value_source(id) == Some(ValueSource::CommandLine);
        Explicit { image: given("image"), cpus: given("cpus"), memory: given("memory") }
    }

    /// From this process's command line; everything counts as given if it cannot be read again (so config files
    /// never override what might have been a flag).
    pub fn from_command_line() -> Explicit {
        use clap::CommandFactory;
        let all = Explicit { image: true, cpus: true, memory: true };
        let Ok(m) = crate::cli::Cli::command().try_get_matches_from(std::env::args_os()) else { return all };
        m.subcommand_matches("run").map(Explicit::from_matches).unwrap_or(all)
    }
}

/// Fills in what the flags left open: the user's config, then an approved hutch.toml, then the defaults.
pub fn apply_resources(a: &mut RunArgs, explicit: Explicit, user: &UserConfig, project: Option<&ProjectConfig>) {
    if !explicit.image {
        if let Some(i) = user.image {
            a.vm.image = i;
        }
    }
    if !explicit.cpus {
        if let Some(c) = user.cpus.or(project.and_then(|p| p.cpus)) {
            a.vm.cpus = c;
        }
    }
    if !explicit.memory {
        a.vm.memory = user.memory.or(project.and_then(|p| p.memory_mib)).unwrap_or(a.vm.image.default_memory());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    fn config(text: &str) -> Result<UserConfig, String> {
        parse(Path::new("/cfg/hutch/config.toml"), text).map_err(|p| match p {
            Problem::Key(m) | Problem::Policy(m) => m,
        })
    }

    fn run_args(argv: &[&str]) -> (RunArgs, Explicit) {
        let m = crate::cli::Cli::command().try_get_matches_from(argv).expect("parse");
        let run = m.subcommand_matches("run").expect("run");
        let explicit = Explicit::from_matches(run);
        match crate::cli::Cli::from_arg_matches(&m).expect("args").cmd {
            crate::cli::Command::Run(r) => (r, explicit),
            _ => panic!("not run"),
        }
    }

    #[test]
    fn a_full_config_parses() {
        let c = config(
            "image = \"agents\"\n[resources]\ncpus = 2\nmemory = 2048\n[policy]\nallow = [\"api.example.com\"]\n[policy.secrets.KEY]\nhosts = [\"api.example.com\"]\n[policy.setup]\nallow = [\"pkgs.example.com\"]\n",
        )
        .expect("valid");
        assert_eq!((c.image, c.cpus, c.memory), (Some(ImageName::Agents), Some(2), Some(2048)));
        let p = c.policy.expect("policy");
        assert!(p.has_setup());
        assert!(p.rules(hutch_policy::Phase::Agent)[0].origin().starts_with("/cfg/hutch/config.toml [policy]"));
        assert!(config("").expect("empty").policy.is_none());
        let c = config("[credentials]\nexclude = [\"*.secret\"]\ninclude = [\"*.pem\"]\n[secrets]\nfrom_env_file = \"work.env\"\n").expect("valid");
        assert_eq!(c.credentials.exclude[0].as_str(), "*.secret");
        assert_eq!(c.env_file.as_deref(), Some(Path::new("/cfg/hutch/work.env")), "relative to the config's directory");
    }

    /// Bad values name the key and what is allowed.
    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            ("memory = 1024\n", "unknown field `memory`"),
            ("[resources]\nmemory = 100\n", "resources.memory = 100: must be 128 to 65536"),
            ("[resources]\ncpus = 0\n", "resources.cpus = 0: must be 1 to 64"),
            ("[resources]\ncpus = \"two\"\n", "cpus"),
            ("image = \"ubuntu\"\n", "image = \"ubuntu\": there is no such image; use one of default, agents"),
            ("[policy]\nallow = [\"*.com\"]\n", "/cfg/hutch/config.toml [policy]: allow[0]"),
            ("[policy]\nalow = []\n", "/cfg/hutch/config.toml [policy]: unknown field `alow`"),
            ("[policy.setup]\nallow = [\"10.0.0.1\"]\n", "[policy]: setup.allow[0]"),
            ("not toml", "expected"),
            ("[credentials]\nexclude = [\"a//b\"]\n", "[credentials]: exclude[0] = \"a//b\": has an empty component"),
            ("[credentials]\nexclude = \"*.pem\"\n", "invalid type"),
            ("[secrets]\nfrom_env = \"x\"\n", "unknown field `from_env`"),
        ];
        for (text, want) in cases {
            let e = config(text).expect_err(text);
            assert!(e.contains(want), "{text:?}: wanted {want:?} in {e}");
        }
    }

    /// Flags beat the user's config, which beats hutch.toml, which beats the defaults.
    #[test]
    fn resources_merge_in_order() {
        let user = config("image = \"agents\"\n[resources]\ncpus = 3\n").expect("valid");
        let (mut a, e) = run_args(&["hutch", "run", "--", "true"]);
        apply_resources(&mut a, e, &user, None);
        assert_eq!((a.vm.image, a.vm.cpus, a.vm.memory), (ImageName::Agents, 3, 1024), "the image's default memory");

        let (mut a, e) = run_args(&["hutch", "run", "--image", "default", "--cpus", "1", "--", "true"]);
        apply_resources(&mut a, e, &user, None);
        assert_eq!((a.vm.image, a.vm.cpus, a.vm.memory), (ImageName::Default, 1, 512), "flags win");

        let (mut a, e) = run_args(&["hutch", "run", "--memory", "700", "--", "true"]);
        apply_resources(&mut a, e, &UserConfig::default(), None);
        assert_eq!((a.vm.image, a.vm.cpus, a.vm.memory), (ImageName::Default, 1, 700));

        let t = tempfile::tempdir().expect("tempdir");
        std::fs::write(t.path().join("hutch.toml"), "[resources]\ncpus = 4\nmemory = 900\n").expect("write");
        let project = ProjectConfig::load(t.path()).expect("load").expect("exists");
        let (mut a, e) = run_args(&["hutch", "run", "--", "true"]);
        apply_resources(&mut a, e, &user, Some(&project));
        assert_eq!((a.vm.cpus, a.vm.memory), (3, 900), "the user's config over hutch.toml, hutch.toml over defaults");
        let (mut a, e) = run_args(&["hutch", "run", "--", "true"]);
        apply_resources(&mut a, e, &UserConfig::default(), Some(&project));
        assert_eq!((a.vm.cpus, a.vm.memory), (4, 900));
    }
}
