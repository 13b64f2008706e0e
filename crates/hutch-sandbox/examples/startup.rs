//! Where start-up time goes: snapshot restore vs warm-pool hit, split into create and first exec output.
//! `cargo run --release -p hutch-sandbox --example startup -- [runs]` (needs the image: `hutch image build`).

use std::time::{Duration, Instant};

use hutch_sandbox::{Host, Sandbox, SandboxConfig};

async fn first_output(sb: &Sandbox) -> Duration {
    let t = Instant::now();
    let out = sb.client().run(&["echo", "x"]).await.expect("exec");
    assert_eq!(out.stdout, b"x\n");
    t.elapsed()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

#[tokio::main]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let agent = std::env::var("HUTCH_AGENT").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/x86_64-unknown-linux-gnu/release/hutch-agent").into());
    let cache = hutch_image::Cache::from_env().expect("cache");
    let image = cache.lookup(&hutch_image::ImageSpec::default_for(agent)).expect("lookup").expect("no image: run `hutch image build`");
    let host = Host::new(image, cache.root().to_path_buf()).expect("host");
    let cfg = SandboxConfig::default();
    hutch_sandbox::snapshot::ensure(&host, &cfg).await.expect("snapshot");
    let pool = hutch_sandbox::pool::Pool::start(host.clone(), cfg.clone(), 1);
    let (mut rc, mut re, mut pc, mut pe, mut se) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let t = Instant::now();
        let sb = Sandbox::create(&host, &cfg).await.expect("create");
        rc.push(t.elapsed().as_secs_f64() * 1e3);
        re.push(first_output(&sb).await.as_secs_f64() * 1e3);
        sb.destroy().await;
        assert!(pool.wait_full(Duration::from_secs(60)).await);
        let t = Instant::now();
        let sb = pool.take(&cfg).await.expect("take");
        pc.push(t.elapsed().as_secs_f64() * 1e3);
        pe.push(first_output(&sb).await.as_secs_f64() * 1e3);
        for _ in 0..3 {
            se.push(first_output(&sb).await.as_secs_f64() * 1e3);
        }
        sb.destroy().await;
    }
    pool.drain().await;
    for (name, v) in [("restore: create", &mut rc), ("restore: first exec", &mut re), ("pool: take", &mut pc), ("pool: first exec", &mut pe), ("later exec", &mut se)] {
        println!("{name:<22} p50 {:>7.1} ms  p95 {:>7.1} ms", pct(v, 50.0), pct(v, 95.0));
    }
}
