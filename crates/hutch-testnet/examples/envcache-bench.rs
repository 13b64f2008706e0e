//! The environment cache, measured: `hutch bench --env-cache` with a setup script that installs a package with apt
//! from a Debian repository served by the test net (as in the setup-phase egress test), first run (setup) against
//! cached run, to the command's first output.
//!
//! Needs a release `hutch` (found in $CARGO_TARGET_DIR or ./target, or give --hutch) and dpkg-deb on the host:
//!
//!     cargo run --release -p hutch-testnet --example envcache-bench -- --runs 5

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use clap::Parser;
use hutch_testnet::TestNet;

#[derive(Parser, Debug)]
struct Args {
    /// The hutch binary (default: release build under $CARGO_TARGET_DIR or ./target).
    #[arg(long)]
    hutch: Option<PathBuf>,
    /// Runs of each kind (p50 reported).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    runs: u32,
}

const REGISTRY: &str = "pkgs.example.test";

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let hutch = match a.hutch {
        Some(h) => h,
        None => std::path::absolute(PathBuf::from(std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into())).join("release/hutch"))?,
    };
    let net = TestNet::start().context("test net")?;
    net.publish_demo_debian_repo();
    let p = net.https_port();
    let setup = net.dir().join("setup.sh");
    std::fs::write(
        &setup,
        format!(
            "#!/bin/sh\nset -e\ncat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt\nrm -f /etc/apt/sources.list.d/*\necho \"deb [trusted=yes] https://{REGISTRY}:{p}/files/debian ./\" > /etc/apt/sources.list.d/bench.list\napt-get update -q\napt-get install -y -q hutch-demo\n"
        ),
    )?;
    // Outside any repository, so that only the setup is measured (a repository adds its workspace copy).
    let dir = tempfile::tempdir()?;
    let mut cmd = Command::new(&hutch);
    cmd.current_dir(dir.path()).args(["bench", "--env-cache", "--runs", &a.runs.to_string(), "--"]).args(net.copy_in_args()).args([
        "--setup".to_string(),
        setup.display().to_string(),
        "--setup-allow".into(),
        format!("{REGISTRY}:{p}"),
        "--resolve".into(),
        format!("{REGISTRY}:{p}:127.0.0.1"),
    ]);
    let st = cmd.status().context("run hutch bench")?;
    if !st.success() {
        bail!("hutch bench failed: {st}");
    }
    Ok(())
}
