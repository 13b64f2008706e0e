//! Egress through a real VM, measured: a large download over the gateway (TLS passed through
//! for a host without secrets, TLS intercepted for a host with one, via the proxy and via the
//! transparent tunnel) against the same download straight over loopback on the host, and the
//! latency each small request gains (p50/p95), on new connections and on a kept-alive one.
//!
//! Needs a release `hutch` (`cargo build --release -p hutch-cli`; found in $CARGO_TARGET_DIR or
//! ./target, or give --hutch) and curl on the host:
//!
//!     cargo run --release -p hutch-testnet --example egress-bench -- --mib 100 --requests 50

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Parser;
use hutch_testnet::TestNet;

#[derive(Parser, Debug)]
struct Args {
    /// The hutch binary (default: release build under $CARGO_TARGET_DIR or ./target).
    #[arg(long)]
    hutch: Option<PathBuf>,
    /// Size of the large download in MiB.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=4096))]
    mib: u64,
    /// Small requests per measurement.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=10000))]
    requests: u32,
    /// Large downloads per path (the best is reported).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
    repeats: u32,
}

const BULK: &str = "bulk.example.test";
const API: &str = "api.example.test";
/// Not secret: the bench needs some value to bind to the intercepted host.
const BENCH_KEY: &str = "bench-secret-value-0123456789";

fn find_hutch(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let p = target.join("release/hutch");
    if !p.is_file() {
        bail!("{} not found: build it with `cargo build --release -p hutch-cli`, or pass --hutch PATH", p.display());
    }
    Ok(p)
}

/// One measurement: its label and samples (seconds per request, or bytes per second).
struct Series {
    label: String,
    values: Vec<f64>,
}

fn pct(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

/// The script both sides run: sections start with `== NAME`, then one number per line.
fn script(net: &TestNet, args: &Args, vm: bool) -> String {
    let n = args.mib << 20;
    let big_bulk = net.https_url(BULK, &format!("/bytes/{n}"));
    let big_api = net.https_url(API, &format!("/bytes/{n}"));
    let small_bulk = net.https_url(BULK, "/small");
    let small_api = net.https_url(API, "/small");
    let reqs = args.requests;
    let auth = if vm { "Authorization: Bearer $API_KEY" } else { "Authorization: Bearer direct" };
    let mut s = String::from("set -e\n");
    // `direct` on the host pins names to the servers as the gateway does; in the VM curl goes
    // through the proxy (environment) or, with --noproxy, through the transparent tunnel.
    let (via_proxy, via_tunnel) = if vm {
        ("curl -sS --fail".to_string(), "curl -sS --fail --noproxy '*'".to_string())
    } else {
        let resolve = format!("--resolve {BULK}:{p}:127.0.0.1 --resolve {API}:{p}:127.0.0.1 --cacert {ca}", p = net.https_port(), ca = net.ca_file().display());
        (format!("curl -sS --fail {resolve}"), format!("curl -sS --fail {resolve}"))
    };
    if vm {
        // The test CA is the guest's "public web PKI": passthrough TLS ends at the test server.
        s.push_str("cat /root/testnet-ca.pem >> /etc/ssl/certs/ca-certificates.crt\n");
    }
    let paths: Vec<(&str, &str, &str, &str)> = if vm {
        vec![
            ("passthrough, proxy", &via_proxy, &big_bulk, &small_bulk),
            ("passthrough, tunnel", &via_tunnel, &big_bulk, &small_bulk),
            ("intercepted, proxy", &via_proxy, &big_api, &small_api),
            ("intercepted, tunnel", &via_tunnel, &big_api, &small_api),
        ]
    } else {
        vec![("direct", &via_proxy, &big_bulk, &small_bulk)]
    };
    for (label, curl, big, small) in paths {
        s.push_str(&format!("echo '== bulk {label}'\n"));
        for _ in 0..args.repeats {
            s.push_str(&format!("{curl} -H \"{auth}\" -o /dev/null -w '%{{speed_download}}\\n' {big}\n"));
        }
        s.push_str(&format!("echo '== new {label}'\n"));
        s.push_str(&format!("for i in $(seq {reqs}); do {curl} -H \"{auth}\" -o /dev/null -w '%{{time_total}}\\n' {small}; done\n"));
        s.push_str(&format!("echo '== reused {label}'\n"));
        // One curl, many URLs: one connection kept alive; the first request opens it.
        let urls: Vec<String> = (0..=reqs).map(|_| format!("-o /dev/null {small}")).collect();
        s.push_str(&format!("{curl} -H \"{auth}\" -w '%{{time_total}}\\n' {} | tail -n +2\n", urls.join(" ")));
    }
    s
}

fn parse(out: &str) -> anyhow::Result<Vec<Series>> {
    let mut series: Vec<Series> = Vec::new();
    for line in out.lines() {
        if let Some(label) = line.strip_prefix("== ") {
            series.push(Series { label: label.to_string(), values: Vec::new() });
        } else if let Some(cur) = series.last_mut() {
            let v: f64 = line.trim().replace(',', ".").parse().with_context(|| format!("unexpected line {line:?} in {}", cur.label))?;
            cur.values.push(v);
        }
    }
    Ok(series)
}

fn get<'a>(all: &'a [Series], label: &str) -> anyhow::Result<&'a Series> {
    all.iter().find(|s| s.label == label).with_context(|| format!("no measurement {label:?}"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let hutch = find_hutch(args.hutch.clone())?;
    if Command::new("curl").arg("--version").stdout(Stdio::null()).status().map(|s| !s.success()).unwrap_or(true) {
        bail!("curl is needed on the host for the direct baseline (apt-get install curl)");
    }
    let net = TestNet::start().context("start the test net")?;

    eprintln!("direct on the host over loopback...");
    let out = Command::new("sh").arg("-c").arg(script(&net, &args, false)).output().context("run the direct baseline")?;
    if !out.status.success() {
        bail!("direct baseline failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let direct = parse(&String::from_utf8_lossy(&out.stdout))?;

    eprintln!("in a VM through the gateway...");
    let p = net.https_port();
    let ca_in = format!("{}:/root/testnet-ca.pem", net.ca_file().display());
    let mut cmd = Command::new(&hutch);
    cmd.env("API_KEY", BENCH_KEY)
        .env("HUTCH_LOG", "warn")
        .args(["run", "--timeout", "3600", "--copy-in", &ca_in])
        .args(net.allow_https(BULK))
        .args(net.allow_https(API))
        .args(net.upstream_ca_args())
        .args(["--secret", &format!("API_KEY@{API}")])
        .args(["--", "sh", "-c", &script(&net, &args, true)])
        .stdin(Stdio::null());
    let out = cmd.output().context("run hutch")?;
    if !out.status.success() {
        bail!("hutch run failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let vm = parse(&String::from_utf8_lossy(&out.stdout))?;
    let seen_big = net.requests().iter().filter(|s| s.path.starts_with("/bytes/")).count();
    eprintln!("(test net served {seen_big} large downloads on port {p})");

    let mib = args.mib;
    println!("\nDownload of {mib} MiB over HTTPS (best of {}):", args.repeats);
    let best = |s: &Series| s.values.iter().copied().fold(0.0, f64::max);
    let base = best(get(&direct, "bulk direct")?);
    println!("  {:<34} {:>9.1} MiB/s", "direct on the host (loopback)", base / 1048576.0);
    for label in ["passthrough, proxy", "passthrough, tunnel", "intercepted, proxy", "intercepted, tunnel"] {
        let v = best(get(&vm, &format!("bulk {label}"))?);
        println!("  {:<34} {:>9.1} MiB/s   ratio to direct {:>6.3}", format!("VM, {label}"), v / 1048576.0, v / base);
    }
    for kind in ["new", "reused"] {
        let what = if kind == "new" { "a new connection each" } else { "one kept-alive connection" };
        println!("\nSmall request latency, {} requests on {what} (curl time_total):", args.requests);
        let d = get(&direct, &format!("{kind} direct"))?;
        let (b50, b95) = (pct(&d.values, 0.5), pct(&d.values, 0.95));
        println!("  {:<34} p50 {:>8.2} ms  p95 {:>8.2} ms", "direct on the host", b50 * 1e3, b95 * 1e3);
        for label in ["passthrough, proxy", "passthrough, tunnel", "intercepted, proxy", "intercepted, tunnel"] {
            let s = get(&vm, &format!("{kind} {label}"))?;
            let (p50, p95) = (pct(&s.values, 0.5), pct(&s.values, 0.95));
            println!(
                "  {:<34} p50 {:>8.2} ms  p95 {:>8.2} ms   added p50 {:>8.2} ms  p95 {:>8.2} ms",
                format!("VM, {label}"),
                p50 * 1e3,
                p95 * 1e3,
                (p50 - b50) * 1e3,
                (p95 - b95) * 1e3
            );
        }
    }
    println!("\nThe VM side includes the guest's own cost (curl and TLS in the guest run under the host's accelerator; TCG here).");
    Ok(())
}
