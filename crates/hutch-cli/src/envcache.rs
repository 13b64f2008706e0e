//! The environment cache in `hutch run`: the key (what a setup's result depends on), the flags, and `hutch cache
//! ls|rm|prune`. The snapshots themselves are `hutch_sandbox::envsnap`.
//!
//! In the key: the image and its snapshot's VM size and accelerator, the setup script's bytes, the setup phase's
//! policy (hosts, rules, secret names and their hosts and sources, pins, upstream CA paths; never a secret value),
//! the repository (its directory), and the content of each declared input file. Not in it: any other file of the
//! repository, `--env`, copy-in files, the command's own policy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use hutch_sandbox::envcache::{digest_file, KeyInputs, DEFAULT_MAX_AGE, DEFAULT_MAX_SIZE};
pub use hutch_sandbox::envcache::{age, Plan};
use hutch_sandbox::envsnap::EnvStore;

use crate::config::UserConfig;
use crate::repo::{RunRepo, SetupFile};

/// `hutch run` flags for the environment cache.
#[derive(Debug, Args, Clone, Default)]
pub struct CacheArgs {
    /// Run the setup script and do not use or store an environment snapshot.
    #[arg(long, conflicts_with = "refresh_cache")]
    pub no_cache: bool,
    /// Run the setup script and replace the environment snapshot with the result.
    #[arg(long)]
    pub refresh_cache: bool,
    /// A file whose content is part of the environment cache's key, e.g. requirements.txt (repeatable).
    #[arg(long = "cache-input", value_name = "PATH")]
    pub cache_input: Vec<PathBuf>,
    /// Run FILE (as root, with the setup phase's egress) when the run starts from a cached environment, before the
    /// command; replaces hutch.toml's `maintenance`.
    #[arg(long, value_name = "FILE", value_parser = crate::repo::parse_script)]
    pub maintenance: Option<SetupFile>,
}

#[derive(Debug, Subcommand)]
pub enum CacheCmd {
    /// List environment snapshots, most recently used first.
    Ls,
    /// Remove environment snapshots by key prefix.
    Rm { key: String },
    /// Remove expired entries, then the least recently used past the size cap; the same for guest images (and
    /// their boot snapshots) other than the current ones.
    Prune {
        /// Hours after which an entry expires [default: the config's cache.max_age_hours, else 24].
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=24 * 365 * 10))]
        max_age_hours: Option<u64>,
        /// Total size the entries may take, in MiB [default: the config's cache.max_size_gib, else 20 GiB].
        #[arg(long, value_parser = clap::value_parser!(u64).range(0..=1 << 40))]
        max_size_mib: Option<u64>,
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

pub fn limits(user: &UserConfig) -> (Duration, u64) {
    let age = user.cache_max_age_hours.map(|h| Duration::from_secs(h * 3600)).unwrap_or(DEFAULT_MAX_AGE);
    let size = user.cache_max_size_gib.map(|g| g << 30).unwrap_or(DEFAULT_MAX_SIZE);
    (age, size)
}

/// The plan for a run with a setup script, or `None` when the cache is off for it (`--no-cache`, `--cold`, no
/// setup). Reads the declared inputs now, with the other inputs, before any VM starts.
pub fn plan(
    a: &crate::cli::RunArgs,
    user: &UserConfig,
    repo: &RunRepo,
    egress: &hutch_sandbox::egress::Egress,
    image_key: &str,
    cache_root: &Path,
) -> anyhow::Result<Option<Plan>> {
    let Some(setup) = repo.setup_script() else { return Ok(None) };
    if a.cache.no_cache || a.cold || !a.kernel_args.is_empty() {
        return Ok(None);
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let top = repo.top();
    let base = top.unwrap_or(&cwd);
    let mut inputs: Vec<PathBuf> = a.cache.cache_input.iter().map(|p| cwd.join(p)).collect();
    inputs.extend(user.cache_inputs.iter().map(|p| base.join(p)));
    inputs.extend(repo.project().map(|p| p.cache_inputs.clone()).unwrap_or_default().iter().map(|p| base.join(p)));
    let mut named = Vec::new();
    for p in &inputs {
        let abs = std::path::absolute(p).with_context(|| format!("cannot resolve cache input {}", p.display()))?;
        named.push((abs.display().to_string(), digest_file(&abs)?));
    }
    let repo_id = match top {
        Some(t) => t.canonicalize().unwrap_or_else(|_| t.to_path_buf()).display().to_string(),
        None => "(no repository)".into(),
    };
    let key = KeyInputs {
        image_key,
        vm: format!("cpus={} memory={} accel={:?}", a.vm.cpus, a.vm.memory, a.vm.accel),
        setup: &setup.bytes,
        setup_policy: egress.setup.as_deref(),
        scope: &repo_id,
        inputs: named,
    }
    .key()?;
    let (max_age, max_bytes) = limits(user);
    let label = format!("{} ({})", repo_id, setup.name);
    Ok(Some(Plan { store: EnvStore::new(cache_root), key, label, refresh: a.cache.refresh_cache, max_age, max_bytes }))
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

pub async fn cmd(c: CacheCmd) -> anyhow::Result<i32> {
    let cache = hutch_image::Cache::from_env()?;
    let store = EnvStore::new(cache.root());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    match c {
        CacheCmd::Ls => {
            let all = store.list();
            if all.is_empty() {
                println!("no environment snapshots in {}", store.dir().display());
            }
            for l in all {
                match &l.meta {
                    Some(m) => println!(
                        "{}  made {} ago, used {} ago  {:>9}  setup {:.1} s  {}",
                        l.key,
                        age(now.saturating_sub(m.created_unix)),
                        age(now.saturating_sub(l.last_used_unix)),
                        size(l.bytes),
                        m.setup_ms as f64 / 1e3,
                        m.label
                    ),
                    None => println!("{}  (unreadable; `hutch cache prune` removes it)", l.key),
                }
            }
        }
        CacheCmd::Rm { key } => {
            let removed = store.remove(&key)?;
            if removed.is_empty() {
                bail!("no environment snapshot with a key starting with {key:?}; `hutch cache ls` lists them");
            }
            for k in removed {
                println!("removed {k}");
            }
        }
        CacheCmd::Prune { max_age_hours, max_size_mib, config } => {
            let user = UserConfig::load(config.as_deref())?;
            let (age_default, size_default) = limits(&user);
            let max_age = max_age_hours.map(|h| Duration::from_secs(h * 3600)).unwrap_or(age_default);
            let max_bytes = max_size_mib.map(|m| m << 20).unwrap_or(size_default);
            // Images: every one but the current ones (those this hutch would run), by the same rules.
            let mut keep = Vec::new();
            let mut known = true;
            if let Ok(agent) = crate::agent::locate() {
                for spec in [hutch_image::ImageSpec::default_for(agent.clone()), hutch_image::ImageSpec::agents(agent)] {
                    match cache.lookup(&spec) {
                        Ok(Some(img)) if img.dir.starts_with(cache.root()) => keep.push(img.key),
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("hutch: warning: cannot tell which images are current ({e}); images are left alone");
                            known = false;
                        }
                    }
                }
            } else {
                eprintln!("hutch: warning: no guest agent binary found, so the current images are unknown; images are left alone");
                known = false;
            }
            if known {
                for (k, why) in cache.prune_images(&keep, Some(max_age), Some(max_bytes))? {
                    println!("removed image {k} ({why})");
                }
            }
            // After the images: entries made on a removed image snapshot go too.
            for (k, why) in store.prune(Some(max_age), Some(max_bytes)) {
                println!("removed {k} ({why})");
            }
        }
    }
    Ok(0)
}
