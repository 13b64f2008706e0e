//! Egress through a real VM, measured: a large download over the gateway (TLS passed through
//! for a host without secrets, TLS intercepted for a host with one, via the proxy and via the
//! transparent tunnel; plain HTTP too) against the same download straight over loopback on the
//! host, and against the host-guest channel alone (exec stdout); and the latency of small
//! requests (p50/p95/mean, and what the VM path adds) on new connections and on a kept-alive one.
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
const PLAIN: &str = "plain.example.test";
const VM_PATHS: [&str; 5] = [
    "HTTPS passthrough, proxy",
    "HTTPS passthrough, tunnel",
    "HTTPS intercepted, proxy",
    "HTTPS intercepted, tunnel",
    "HTTP, tunnel",
];
const API: &str = "api.example.test";
/// Not secret: the bench needs some value to bind to the intercepted host.
const BENCH_KEY: &str = "bench-secret-value-0123456789";

fn find_hutch(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
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

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn pct(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

/// One way of fetching: its label, the curl command line (trust settings included) and URLs.
struct Path {
    label: &'static str,
    curl: String,
    big: String,
    small: String,
}

/// The script both sides run: sections start with `== NAME`, then one number per line.
fn script(net: &TestNet, args: &Args, vm: bool) -> String {
    let n = args.mib << 20;
    let reqs = args.requests;
    let auth = if vm {
        "Authorization: Bearer $API_KEY"
    } else {
        "Authorization: Bearer direct"
    };
    let mut s = String::from("set -e\n");
    let (tls_big, tls_small) = (
        |name: &str| net.https_url(name, &format!("/bytes/{n}")),
        |name: &str| net.https_url(name, "/small"),
    );
    let (http_big, http_small) = (
        net.http_url(PLAIN, &format!("/bytes/{n}")),
        net.http_url(PLAIN, "/small"),
    );
    // Each client trusts exactly the CA that signs what it is shown (the test CA, or the sandbox
    // CA when the gateway intercepts), so no side pays for parsing a large bundle per request.
    let paths = if vm {
        let testnet = "--cacert /root/testnet-ca.pem";
        let sandbox = "--cacert /etc/hutch/ca.crt";
        vec![
            Path {
                label: "HTTPS passthrough, proxy",
                curl: format!("curl -sS --fail {testnet}"),
                big: tls_big(BULK),
                small: tls_small(BULK),
            },
            Path {
                label: "HTTPS passthrough, tunnel",
                curl: format!("curl -sS --fail --noproxy '*' {testnet}"),
                big: tls_big(BULK),
                small: tls_small(BULK),
            },
            Path {
                label: "HTTPS intercepted, proxy",
                curl: format!("curl -sS --fail {sandbox}"),
                big: tls_big(API),
                small: tls_small(API),
            },
            Path {
                label: "HTTPS intercepted, tunnel",
                curl: format!("curl -sS --fail --noproxy '*' {sandbox}"),
                big: tls_big(API),
                small: tls_small(API),
            },
            Path {
                label: "HTTP, tunnel",
                curl: "curl -sS --fail --noproxy '*'".into(),
                big: http_big,
                small: http_small,
            },
        ]
    } else {
        let (p, hp) = (net.https_port(), net.http_port());
        let ca = net.ca_file().display();
        vec![
            Path {
                label: "HTTPS",
                curl: format!("curl -sS --fail --resolve {BULK}:{p}:127.0.0.1 --cacert {ca}"),
                big: tls_big(BULK),
                small: tls_small(BULK),
            },
            Path {
                label: "HTTP",
                curl: format!("curl -sS --fail --resolve {PLAIN}:{hp}:127.0.0.1"),
                big: http_big,
                small: http_small,
            },
        ]
    };
    for Path {
        label,
        curl,
        big,
        small,
    } in paths
    {
        s.push_str(&format!("echo '== bulk {label}'\n"));
        for _ in 0..args.repeats {
            s.push_str(&format!(
                "{curl} -H \"{auth}\" -o /dev/null -w '%{{speed_download}}\\n' {big}\n"
            ));
        }
        s.push_str(&format!("echo '== new {label}'\n"));
        s.push_str(&format!("for i in $(seq {reqs}); do {curl} -H \"{auth}\" -o /dev/null -w '%{{time_total}}\\n' {small}; done\n"));
        s.push_str(&format!("echo '== reused {label}'\n"));
        // One curl, many URLs: one connection kept alive; the first request opens it.
        let urls: Vec<String> = (0..=reqs)
            .map(|_| format!("-o /dev/null {small}"))
            .collect();
        s.push_str(&format!(
            "{curl} -H \"{auth}\" -w '%{{time_total}}\\n' {} | tail -n +2\n",
            urls.join(" ")
        ));
    }
    s
}

/// Bytes per second of `hutch run -- head -c N /dev/zero` on hutch's stdout, from the first byte
/// to the last: the host-guest channel without the gateway or any network code.
fn stdout_channel(hutch: &std::path::Path, bytes: u64) -> anyhow::Result<f64> {
    use std::io::Read;
    let mut child = Command::new(hutch)
        .env("HUTCH_LOG", "warn")
        .args(["run", "--", "head", "-c", &bytes.to_string(), "/dev/zero"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("run hutch")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let mut first = None;
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(std::time::Instant::now);
        got += n as u64;
    }
    child.wait()?;
    let first = first.context("no output")?;
    if got != bytes {
        bail!("stdout channel carried {got} bytes, expected {bytes}");
    }
    Ok(got as f64 / first.elapsed().as_secs_f64())
}

fn parse(out: &str) -> anyhow::Result<Vec<Series>> {
    let mut series: Vec<Series> = Vec::new();
    for line in out.lines() {
        if let Some(label) = line.strip_prefix("== ") {
            series.push(Series {
                label: label.to_string(),
                values: Vec::new(),
            });
        } else if let Some(cur) = series.last_mut() {
            let v: f64 = line
                .trim()
                .replace(',', ".")
                .parse()
                .with_context(|| format!("unexpected line {line:?} in {}", cur.label))?;
            cur.values.push(v);
        }
    }
    Ok(series)
}

fn get<'a>(all: &'a [Series], label: &str) -> anyhow::Result<&'a Series> {
    all.iter()
        .find(|s| s.label == label)
        .with_context(|| format!("no measurement {label:?}"))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let hutch = find_hutch(args.hutch.clone())?;
    if Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        bail!("curl is needed on the host for the direct baseline (apt-get install curl)");
    }
    let net = TestNet::start().context("start the test net")?;

    eprintln!("direct on the host over loopback...");
    let out = Command::new("sh")
        .arg("-c")
        .arg(script(&net, &args, false))
        .output()
        .context("run the direct baseline")?;
    if !out.status.success() {
        bail!(
            "direct baseline failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
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
        .args(net.allow_http(PLAIN))
        .args(net.upstream_ca_args())
        .args(["--secret", &format!("API_KEY@{API}")])
        .args(["--", "sh", "-c", &script(&net, &args, true)])
        .stdin(Stdio::null());
    let out = cmd.output().context("run hutch")?;
    if !out.status.success() {
        bail!(
            "hutch run failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let vm = parse(&String::from_utf8_lossy(&out.stdout))?;
    let seen_big = net
        .requests()
        .iter()
        .filter(|s| s.path.starts_with("/bytes/"))
        .count();
    eprintln!("(test net served {seen_big} large downloads on port {p})");

    eprintln!("the host-guest channel alone (stdout of head -c)...");
    let channel = stdout_channel(&hutch, args.mib << 20)?;

    let mib = args.mib;
    let best = |s: &Series| s.values.iter().copied().fold(0.0, f64::max);
    println!("\nDownload of {mib} MiB (best of {}):", args.repeats);
    let https = best(get(&direct, "bulk HTTPS")?);
    let http = best(get(&direct, "bulk HTTP")?);
    println!(
        "  {:<36} {:>9.1} MiB/s",
        "direct on the host, HTTPS",
        https / 1048576.0
    );
    println!(
        "  {:<36} {:>9.1} MiB/s",
        "direct on the host, HTTP",
        http / 1048576.0
    );
    println!(
        "  {:<36} {:>9.1} MiB/s   (no gateway: exec stdout over the agent channel)",
        "VM stdout channel",
        channel / 1048576.0
    );
    for label in VM_PATHS {
        let v = best(get(&vm, &format!("bulk {label}"))?);
        let base = if label.starts_with("HTTPS") {
            https
        } else {
            http
        };
        println!(
            "  {:<36} {:>9.1} MiB/s   ratio to direct {:>6.3}",
            format!("VM, {label}"),
            v / 1048576.0,
            v / base
        );
    }
    for kind in ["new", "reused"] {
        let what = if kind == "new" {
            "a new connection each"
        } else {
            "one kept-alive connection"
        };
        println!("\nSmall requests, {} on {what} (curl time_total; the guest clock ticks in 4 ms steps under TCG):", args.requests);
        for (label, series) in [("HTTPS", "HTTPS"), ("HTTP", "HTTP")] {
            let d = get(&direct, &format!("{kind} {series}"))?;
            let (b50, b95, bm) = (pct(&d.values, 0.5), pct(&d.values, 0.95), mean(&d.values));
            println!(
                "  {:<36} p50 {:>8.2} ms  p95 {:>8.2} ms  mean {:>8.2} ms",
                format!("direct on the host, {label}"),
                b50 * 1e3,
                b95 * 1e3,
                bm * 1e3
            );
            for vlabel in VM_PATHS
                .iter()
                .filter(|l| l.split([' ', ',']).next() == Some(label))
            {
                let s = get(&vm, &format!("{kind} {vlabel}"))?;
                let (p50, p95, m) = (pct(&s.values, 0.5), pct(&s.values, 0.95), mean(&s.values));
                println!(
                    "  {:<36} p50 {:>8.2} ms  p95 {:>8.2} ms  mean {:>8.2} ms   added p50 {:>+8.2} ms  p95 {:>+8.2} ms  mean {:>+8.2} ms",
                    format!("VM, {vlabel}"),
                    p50 * 1e3,
                    p95 * 1e3,
                    m * 1e3,
                    (p50 - b50) * 1e3,
                    (p95 - b95) * 1e3,
                    (m - bm) * 1e3
                );
            }
        }
    }
    println!("\nVM numbers include the guest's own work (curl, TLS, TCP over its loopback), which runs under the host's accelerator (TCG here).");
    Ok(())
}
