//! Argument definitions and dispatch. Every value is parsed into its typed form here, before anything runs.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hutch_vmm::Accel;

#[derive(Debug, Parser)]
#[command(name = "hutch", version, about = "Run coding agents in clean, disposable micro-VMs")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Command,
}

// Parsed once per process; boxing `run`'s arguments would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a command in a fresh micro-VM, stream its output, exit with its code, destroy the VM.
    Run(RunArgs),
    /// Build, list and remove guest images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Environment snapshots (the state after a setup script): list, remove, prune.
    #[command(subcommand)]
    Cache(crate::envcache::CacheCmd),
    /// Tell what this host can do and how to fix what is missing.
    Doctor(DoctorArgs),
    /// Measure start-up time and memory (percentiles and ratios).
    Bench(BenchArgs),
    /// Review and apply what sandboxes changed in this repository; approve its hutch.toml.
    #[command(flatten)]
    Repo(crate::repo::RepoCmd),
    /// Sandboxes as a service: `serve`, `token`, `secret`, and the client commands.
    #[command(flatten)]
    Service(crate::remote::ServiceCmd),
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Check only the host (programs, versions, KVM), not the agent binary or the image cache: what
    /// `scripts/setup` runs before anything is built.
    #[arg(long)]
    pub host: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build an image (if missing) and its boot snapshot.
    Build(ImageBuildArgs),
    /// List cached images.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a cached image (and its snapshots) by key prefix.
    Rm { key: String },
}

#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Skip making the boot snapshot.
    #[arg(long)]
    pub no_snapshot: bool,
}

/// The images hutch knows how to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum ImageName {
    /// Debian with git, curl, python3.
    #[default]
    Default,
    /// The default image plus Node.js, Claude Code (`claude`) and Codex (`codex`).
    Agents,
}

impl ImageName {
    /// As written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ImageName::Default => "default",
            ImageName::Agents => "agents",
        }
    }

    /// Guest memory (MiB) when nothing else says (as `--memory`'s default does).
    pub fn default_memory(self) -> u32 {
        match self {
            ImageName::Default => 512,
            ImageName::Agents => 1024,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// Guest image.
    #[arg(long, value_enum, default_value_t = ImageName::Default)]
    pub image: ImageName,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub cpus: u32,
    /// Guest memory in MiB [default: 512; 1024 with --image agents, whose agents alone peak near 300].
    #[arg(long, default_value = "512", default_value_if("image", "agents", "1024"), hide_default_value = true,
          value_parser = clap::value_parser!(u32).range(128..=65536))]
    pub memory: u32,
    /// Accelerator: kvm (hardware virtualization) or tcg (software emulation). Default: kvm when it can run
    /// ordinary guests here, else tcg.
    #[arg(long)]
    pub accel: Option<Accel>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// Kill the VM and exit 124 after this many seconds.
    #[arg(long, value_parser = parse_secs)]
    pub timeout: Option<Duration>,
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Copy a host file into the VM before the command runs (repeatable).
    #[arg(long = "copy-in", value_name = "HOST:GUEST", value_parser = parse_copy_in)]
    pub copy_in: Vec<CopyIn>,
    /// Copy a VM file out to the host after the command ends (repeatable).
    #[arg(long = "copy-out", value_name = "GUEST:HOST", value_parser = parse_copy_out)]
    pub copy_out: Vec<CopyOut>,
    /// Largest file --copy-out takes from the VM (bytes, or with K, M, G, T: binary units). A larger file is
    /// refused and nothing is written; holes stay holes on the host.
    #[arg(long = "copy-out-max", value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub copy_out_max: u64,
    /// Working directory in the VM.
    #[arg(long, short = 'w', value_parser = parse_guest_path)]
    pub workdir: Option<String>,
    /// Run the command on a terminal even if stdout is not one (stdin must be) [default: a terminal when stdin
    /// and stdout are terminals].
    #[arg(long, short = 't', conflicts_with = "no_tty")]
    pub tty: bool,
    /// Never run the command on a terminal: separate stdout and stderr, stdin as a stream.
    #[arg(long = "no-tty", short = 'T')]
    pub no_tty: bool,
    /// Run the command on a `hutch serve` daemon ($HUTCH_URL, $HUTCH_TOKEN), on a terminal that outlives this
    /// client: prints the sandbox id and returns. `hutch attach ID` joins it; when it ends, its change is
    /// collected and `hutch diff --from ID` / `hutch apply --from ID` take it.
    #[arg(long, short = 'd')]
    pub detach: bool,
    #[command(flatten)]
    pub egress: EgressArgs,
    #[command(flatten)]
    pub repo: crate::repo::RepoArgs,
    #[command(flatten)]
    pub cache: crate::envcache::CacheArgs,
    /// User configuration file [default: $XDG_CONFIG_HOME/hutch/config.toml or ~/.config/hutch/config.toml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Boot the kernel instead of restoring the image's snapshot.
    #[arg(long)]
    pub cold: bool,
    /// Run in a sandbox of the daemon at $HUTCH_URL (default unix:///run/hutch/hutch.sock) instead of a VM of
    /// your own: streams and exit code as usual; the working tree and the flags the daemon does not carry stay
    /// here (they are refused by name).
    #[arg(long)]
    pub daemon: bool,
    /// Seconds a cold boot may take before it counts as hung (retried once).
    #[arg(long, value_parser = parse_secs, default_value = "30")]
    pub boot_timeout: Duration,
    /// Extra kernel command-line argument (debugging; implies --cold).
    #[arg(long = "kernel-arg", hide = true)]
    pub kernel_args: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// What the sandbox may reach. Nothing by default. With a setup script, the script and the command each reach
/// only what is allowed for their own phase.
#[derive(Debug, Args, Clone, Default)]
pub struct EgressArgs {
    /// Policy file (TOML): allow rules, pins, upstream CAs, secrets; its [setup] table is the setup script's.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Allow connections to HOST (exact, or *.example.com for subdomains) on PORT (default 443 and 80).
    #[arg(long, value_name = "HOST[:PORT]")]
    pub allow: Vec<String>,
    /// Dial ADDR for HOST:PORT instead of resolving it (as curl does); allows private addresses for that name.
    #[arg(long, value_name = "HOST:PORT:ADDR")]
    pub resolve: Vec<String>,
    /// Extra trusted root certificate (PEM) for upstream TLS.
    #[arg(long = "upstream-ca", value_name = "FILE")]
    pub upstream_ca: Vec<PathBuf>,
    /// Secret NAME (value from the host's $NAME), swapped for its placeholder only in request header HEADER
    /// (default Authorization) of requests to HOST (on PORT, under path PREFIX when given); the VM sees a placeholder.
    #[arg(long, value_name = "NAME[:HEADER]@HOST[:PORT][/PREFIX][,...]")]
    pub secret: Vec<String>,
    /// A secret scoped as an API expects it: anthropic, openai, github, github-git, npm, pypi (value from the
    /// preset's usual variable, e.g. $ANTHROPIC_API_KEY, or from $NAME).
    #[arg(long = "secret-preset", value_name = "PRESET[:NAME]")]
    pub secret_preset: Vec<String>,
    /// Terminate TLS for every allowed host, not only for hosts with secrets or method/path rules: placeholders
    /// sent anywhere are flagged, SNI must equal Host everywhere, responses are masked everywhere.
    #[arg(long = "inspect-all")]
    pub inspect_all: bool,
    /// Like --allow, for the setup script only (--setup); the command does not get it.
    #[arg(long = "setup-allow", value_name = "HOST[:PORT]")]
    pub setup_allow: Vec<String>,
    /// Like --secret, for the setup script only: only its processes get the placeholder, and the gateway stops
    /// swapping it when the setup script ends.
    #[arg(long = "setup-secret", value_name = "NAME[:HEADER]@HOST[:PORT][/PREFIX][,...]")]
    pub setup_secret: Vec<String>,
    /// Like --secret-preset, for the setup script only.
    #[arg(long = "setup-secret-preset", value_name = "PRESET[:NAME]")]
    pub setup_secret_preset: Vec<String>,
    /// Read KEY=value lines from FILE (a .env) as secrets: the VM sees a placeholder in $KEY, and the gateway
    /// puts the value in place of it only on requests to the hosts bound with --secret KEY@HOST. A key without
    /// a binding stops the run before the VM starts (repeatable).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// Append the egress audit log (JSON lines) to FILE.
    #[arg(long, value_name = "FILE")]
    pub audit: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Runs per measurement.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    #[command(flatten)]
    pub vm: VmArgs,
    /// Also measure cold boots (slow under TCG).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub cold: bool,
    /// Only the repository case: `hutch run -- true` in a generated repository of this many files (~12 KiB each),
    /// against `--no-repo` in the same directory, with the split (host preparation, into the VM, collection).
    /// Repeatable (e.g. `--repo 10000 --repo 50000`).
    #[arg(long, value_name = "FILES", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub repo: Vec<u32>,
    /// Measure the environment cache instead: `hutch run RUN-ARGS` with the setup run and stored
    /// (--refresh-cache) against the same run from the cache, to the command's first output. RUN-ARGS must give a
    /// setup script (--setup FILE ...); `hutch-testnet`'s `envcache-bench` example passes one that installs a
    /// package from a local registry.
    #[arg(long)]
    pub env_cache: bool,
    /// `hutch run` arguments for --env-cache.
    #[arg(last = true, value_name = "RUN-ARGS")]
    pub run_args: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct CopyIn {
    pub host: PathBuf,
    pub guest: String,
}

#[derive(Debug, Clone)]
pub struct CopyOut {
    pub guest: String,
    pub host: PathBuf,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v.is_finite() && v <= 30.0 * 86400.0) {
        return Err(format!("timeout must be between 0 and 30 days, got {s}"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// `N`, `NK`, `NM`, `NG` or `NT` (binary units; an optional `i`/`iB`/`B` after the letter).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a size (e.g. 1G, 512M, 4096)"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    let valid = !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("{k:?} is not a valid variable name (letters, digits, _; not starting with a digit)"));
    }
    if v.contains('\0') {
        return Err(format!("the value of {k} contains a NUL byte"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn parse_guest_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') {
        return Err(format!("guest path {s:?} must be absolute"));
    }
    if s.contains('\0') {
        return Err("guest path contains a NUL byte".into());
    }
    Ok(s.to_string())
}

fn parse_copy_in(s: &str) -> Result<CopyIn, String> {
    let (host, guest) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not HOST:GUEST"))?;
    let guest = parse_guest_path(guest)?;
    let host = PathBuf::from(host);
    if !host.is_file() {
        return Err(format!("{} is not a readable file on the host", host.display()));
    }
    Ok(CopyIn { host, guest })
}

fn parse_copy_out(s: &str) -> Result<CopyOut, String> {
    let (guest, host) = s.split_once(':').ok_or_else(|| format!("{s:?} is not GUEST:HOST"))?;
    let guest = parse_guest_path(guest)?;
    if host.is_empty() {
        return Err("empty host path".into());
    }
    let host = PathBuf::from(host);
    if let Some(parent) = host.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.is_dir() {
            return Err(format!("{} does not exist on the host", parent.display()));
        }
    }
    if host.is_dir() {
        return Err(format!("{} is a directory; give a file path", host.display()));
    }
    Ok(CopyOut { guest, host })
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Command::Run(a) => crate::run::run(a).await,
        Command::Image(c) => crate::image::cmd(c).await,
        Command::Cache(c) => crate::envcache::cmd(c).await,
        Command::Doctor(a) => crate::doctor::doctor(a).await,
        Command::Bench(a) => crate::bench::bench(a).await,
        Command::Repo(c) => crate::repo::dispatch(c).await,
        Command::Service(c) => crate::remote::dispatch(c).await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn env_values_are_checked() {
        assert_eq!(parse_env("A_1=x=y").unwrap(), ("A_1".into(), "x=y".into()));
        assert!(parse_env("1A=x").unwrap_err().contains("not a valid variable name"));
        assert!(parse_env("NOEQUALS").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_env("A-B=x").is_err());
    }

    #[test]
    fn paths_and_timeouts_are_checked() {
        assert!(parse_guest_path("relative").unwrap_err().contains("absolute"));
        assert!(parse_copy_in("/nonexistent-hutch-file:/x").unwrap_err().contains("not a readable file"));
        assert!(parse_copy_out("/x:/nonexistent-dir/y").unwrap_err().contains("does not exist"));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("G").is_err());
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("abc").is_err());
        assert_eq!(parse_secs("1.5").unwrap(), Duration::from_millis(1500));
    }

    #[test]
    fn run_requires_a_command_after_double_dash() {
        assert!(Cli::try_parse_from(["hutch", "run"]).is_err());
        let c = Cli::try_parse_from(["hutch", "run", "--cpus", "2", "--", "sh", "-c", "exit 7"]).unwrap();
        match c.cmd {
            Command::Run(r) => {
                assert_eq!(r.command, vec!["sh", "-c", "exit 7"]);
                assert_eq!(r.vm.cpus, 2);
            }
            _ => panic!("not run"),
        }
        assert!(Cli::try_parse_from(["hutch", "run", "--accel", "xen", "--", "true"]).is_err());
    }

    #[test]
    fn image_names_are_checked() {
        let image = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.cmd) {
            Ok(Command::Run(r)) => Ok(r.vm.image),
            Ok(Command::Image(ImageCmd::Build(b))) => Ok(b.vm.image),
            Ok(Command::Bench(b)) => Ok(b.vm.image),
            Ok(other) => panic!("parsed as {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(image(&["hutch", "run", "--", "true"]), Ok(ImageName::Default));
        assert_eq!(image(&["hutch", "run", "--image", "agents", "--", "claude"]), Ok(ImageName::Agents));
        assert_eq!(image(&["hutch", "image", "build", "--image", "agents"]), Ok(ImageName::Agents));
        assert_eq!(image(&["hutch", "bench", "--image=default"]), Ok(ImageName::Default));
        let memory = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.cmd) {
            Ok(Command::Run(r)) => r.vm.memory,
            other => panic!("{other:?}"),
        };
        assert_eq!(memory(&["hutch", "run", "--", "true"]), 512);
        assert_eq!(memory(&["hutch", "run", "--image", "agents", "--", "true"]), 1024);
        assert_eq!(memory(&["hutch", "run", "--image", "agents", "--memory", "2048", "--", "true"]), 2048);
        assert_eq!(memory(&["hutch", "run", "--memory", "768", "--image", "agents", "--", "true"]), 768);
        let err = image(&["hutch", "run", "--image", "ubuntu", "--", "true"]).expect_err("an unknown image");
        assert!(err.contains("default") && err.contains("agents"), "{err}");
    }
}
