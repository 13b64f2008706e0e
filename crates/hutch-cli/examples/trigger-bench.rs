//! Event-triggered runs, measured: a real `hutch serve --triggers` and the test net's forge; N signed
//! `issue_comment` webhooks one after the other, each run cloning in its VM, committing and delivering a branch
//! and a pull request. Prints p50/p90 from the webhook's arrival (the run's record) to the command's first
//! output, and to the pull request opened (delivery done).
//!
//! With `--setup`, the trigger has a setup script that installs a package from the test net's Debian repository,
//! and each measured pair is a run whose environment is not cached (its entry removed first: the setup runs and
//! is stored) and a run that starts from the cached environment; p50 of each and their ratio.
//!
//! Needs a release `hutch` (found in $CARGO_TARGET_DIR or ./target, or give --hutch), root (VMs) and the image:
//!
//!     cargo run --release -p hutch-cli --example trigger-bench -- --runs 5

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use hutch_daemon::triggers::event::sign;
use hutch_testnet::TestNet;
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    /// The hutch binary (default: release build under $CARGO_TARGET_DIR or ./target).
    #[arg(long)]
    hutch: Option<PathBuf>,
    /// Webhooks sent, one run at a time.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
    /// A setup script in the trigger; measure runs without and with its cached environment.
    #[arg(long)]
    setup: bool,
    /// With --setup: `cache = false` in the trigger (every run runs the setup and stores nothing).
    #[arg(long, requires = "setup")]
    no_cache: bool,
}

const TOKEN: &str = "ghp_bench_forge_token_0123456789abcdef";
const HOOK: &str = "bench-hook-secret-0123456789";
const GIT: &str = "git.example.test";

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let hutch = match a.hutch {
        Some(h) => h,
        None => std::path::absolute(PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("release/hutch"))?,
    };
    let net = TestNet::start().context("test net")?;
    net.create_forge_repo("acme", "widget", &[("README.md", "widget\n")], TOKEN).context("forge repo")?;
    let registry = "pkgs.example.test";
    let setup = if a.setup {
        net.publish_demo_debian_repo();
        let pem = std::fs::read_to_string(net.ca_file())?;
        let script = format!(
            "set -e\ncat >> /etc/ssl/certs/ca-certificates.crt <<'EOF'\n{pem}EOF\nrm -f /etc/apt/sources.list.d/*\necho 'deb [trusted=yes] https://{registry}:{p}/files/debian ./' > /etc/apt/sources.list.d/test-registry.list\napt-get update -q\napt-get install -y -q hutch-demo\n",
            p = net.https_port()
        );
        let policy = format!("[trigger.job.policy.setup]\nallow = [{{ host = \"{registry}\", ports = [{p}] }}]\n", p = net.https_port());
        let cache = if a.no_cache { "cache = false\n" } else { "" };
        (format!("setup = {script:?}\n{cache}"), policy)
    } else {
        (String::new(), String::new())
    };
    let (setup, setup_policy) = setup;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    for (name, value, hosts) in [("HOOK_SECRET", HOOK, "hooks.invalid"), ("FORGE_TOKEN", TOKEN, GIT)] {
        let mut c = Command::new(&hutch).args(["secret", "set", name, "--hosts", hosts, "--data-dir"]).arg(&data).stdin(Stdio::piped()).spawn()?;
        c.stdin.take().context("stdin")?.write_all(format!("{value}\n").as_bytes())?;
        if !c.wait()?.success() {
            bail!("hutch secret set {name} failed");
        }
    }
    let out = Command::new(&hutch).args(["token", "create", "--name", "bench", "--admin", "--data-dir"]).arg(&data).output()?;
    let admin = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let p = net.https_port();
    let ca = net.ca_file().display().to_string();
    let triggers = dir.path().join("triggers.toml");
    std::fs::write(
        &triggers,
        format!(
            r#"[[trigger]]
name = "fix"
source = "github"
secret = "HOOK_SECRET"
[trigger.filter]
events = ["issue_comment"]
repositories = ["acme/widget"]
comment_prefix = "/hutch"
[trigger.forge]
api = "https://localhost:{p}"
git = "https://{GIT}:{p}"
git_from_host = "https://localhost:{p}"
token = "FORGE_TOKEN"
ca_file = "{ca}"
[trigger.job]
command = ["sh", "-c", "echo started; echo \"$HUTCH_RUN_ID\" > run.txt; git add run.txt; git commit -qm run"]
{setup}[trigger.job.policy]
resolve = ["{GIT}:{p}:127.0.0.1", "{registry}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
{setup_policy}"#
        ),
    )?;
    let mut child = Command::new(&hutch)
        .args(["serve", "--listen", "127.0.0.1:0", "--pool", "2", "--data-dir"])
        .arg(&data)
        .arg("--triggers")
        .arg(&triggers)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().context("stderr")?).lines();
    let url = loop {
        let Some(line) = lines.next() else { bail!("the daemon exited before listening") };
        if let Some(rest) = line?.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap_or_default().to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let http = reqwest::Client::new();
    let get = |path: String| -> anyhow::Result<Value> {
        rt.block_on(async { Ok(http.get(format!("{url}{path}")).bearer_auth(&admin).send().await?.json::<Value>().await?) })
    };
    // Let the warm pool fill first: a steady state, not the daemon's first seconds.
    std::thread::sleep(Duration::from_secs(20));
    let (mut first, mut pr) = (vec![], vec![]);
    let (mut miss, mut hit) = (vec![], vec![]);
    let mut key: Option<String> = None;
    let pairs = a.setup && !a.no_cache;
    let total = if pairs { a.runs * 2 } else { a.runs };
    for i in 0..total {
        // With a setup: even runs without the cached environment (removed first), odd runs with it.
        let cold = pairs && i % 2 == 0;
        if let (true, Some(k)) = (cold, &key) {
            let out = Command::new(&hutch).args(["cache", "rm", k]).output()?;
            if !out.status.success() {
                bail!("hutch cache rm {k}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        let body = json!({
            "action": "created",
            "issue": { "number": 1 + i },
            "comment": { "body": "/hutch go", "user": { "login": "alice" } },
            "repository": { "full_name": "acme/widget", "default_branch": "main" },
            "sender": { "login": "alice" },
        })
        .to_string();
        let r: Value = rt.block_on(async {
            http.post(format!("{url}/hooks/fix"))
                .header("x-github-event", "issue_comment")
                .header("x-github-delivery", format!("bench-{i}"))
                .header("x-hub-signature-256", sign(HOOK.as_bytes(), body.as_bytes()))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?
                .json::<Value>()
                .await
        })?;
        let id = r["run"].as_str().context("no run id")?.to_string();
        let deadline = Instant::now() + Duration::from_secs(600);
        let run = loop {
            let run = get(format!("/v1/runs/{id}"))?;
            if !matches!(run["state"].as_str(), Some("queued" | "running")) {
                break run;
            }
            if Instant::now() > deadline {
                bail!("run {id} did not end");
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if run["state"] != "succeeded" {
            bail!("run {id}: {run}");
        }
        let t = |k: &str| run[k].as_i64().unwrap_or(0) - run["created_ms"].as_i64().unwrap_or(0);
        let f = t("first_output_ms") as f64 / 1000.0;
        first.push(f);
        pr.push(t("delivered_ms") as f64 / 1000.0);
        if pairs {
            let logs = rt.block_on(async { http.get(format!("{url}/v1/runs/{id}/logs")).bearer_auth(&admin).send().await?.text().await })?;
            let cached = logs.contains("setup: cached (key ");
            if cached == cold {
                bail!("run {id}: expected {} the cached environment; log:\n{logs}", if cold { "no use of" } else { "use of" });
            }
            if let Some(at) = logs.find("(key ") {
                key = Some(logs[at + 5..].chars().take_while(|c| c.is_ascii_hexdigit()).collect());
            }
            if cold { miss.push(f) } else { hit.push(f) }
        }
        eprintln!("run {id}: first output {:.2} s, pull request {:.2} s", first[first.len() - 1], pr[pr.len() - 1]);
    }
    if let Some(k) = &key {
        let _ = Command::new(&hutch).args(["cache", "rm", k]).output();
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    let _ = child.wait();
    println!("webhook received -> command's first output: p50 {:.2} s  p90 {:.2} s  ({} runs)", pct(&mut first, 0.5), pct(&mut first, 0.9), first.len());
    println!("webhook received -> pull request opened:    p50 {:.2} s  p90 {:.2} s", pct(&mut pr, 0.5), pct(&mut pr, 0.9));
    if pairs {
        let (m, h) = (pct(&mut miss, 0.5), pct(&mut hit, 0.5));
        println!("first output, setup run and stored:         p50 {m:.2} s  ({} runs)", miss.len());
        println!("first output, cached environment:           p50 {h:.2} s  ({} runs); ratio {:.2}", hit.len(), h / m);
    }
    Ok(())
}
