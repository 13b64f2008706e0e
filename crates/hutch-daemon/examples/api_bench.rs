//! API latency with real VMs, in process (the router driven with `oneshot`, no sockets): create, exec and
//! delete percentiles through the API, against `Sandbox::create`/`destroy` called directly, and the ratio.
//! Needs the image for `$HUTCH_AGENT` (`hutch image build`). Run: `cargo run --release -p hutch-daemon --example api_bench [N]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

fn line(name: &str, v: &mut [Duration]) -> f64 {
    let p50 = pct(v, 0.5);
    println!("{name:<28} p50 {p50:>8.1} ms   p90 {:>8.1} ms   max {:>8.1} ms   (n={})", pct(v, 0.9), pct(v, 1.0), v.len());
    p50
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let agent = std::env::var("HUTCH_AGENT").map_err(|_| "set HUTCH_AGENT to the guest agent binary")?;
    let cache = hutch_image::Cache::from_env()?;
    let image = cache.lookup(&hutch_image::ImageSpec::default_for(agent))?.ok_or("no image for this agent; run `hutch image build`")?;
    let host = hutch_sandbox::Host::new(image, cache.root().to_path_buf())?;
    let dir = tempfile::tempdir()?;
    let store = Arc::new(hutch_daemon::store::Store::open(&dir.path().join("state.db"))?);
    let key = Arc::new(hutch_daemon::secrets::SecretKey::load_or_create(&dir.path().join("secrets.key"))?);
    let token = hutch_daemon::auth::create_token(&store, "bench", false, None)?.token;
    let mgr = hutch_daemon::Manager::new(store, key, host.clone(), hutch_daemon::Limits::default(), Arc::new(hutch_daemon::metrics::Metrics::new()));
    let app = hutch_daemon::api::router(mgr.clone());
    let call = |method: &str, uri: String, body: &str| {
        Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
    };

    let (mut api_create, mut api_exec, mut api_delete) = (vec![], vec![], vec![]);
    for _ in 0..n {
        let t0 = Instant::now();
        let r = app.clone().oneshot(call("POST", "/v1/sandboxes".into(), "{}")?).await?;
        api_create.push(t0.elapsed());
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let id = v["id"].as_str().ok_or("create failed")?.to_string();
        for _ in 0..5 {
            let t0 = Instant::now();
            let r = app.clone().oneshot(call("POST", format!("/v1/sandboxes/{id}/exec"), r#"{"argv":["true"]}"#)?).await?;
            axum::body::to_bytes(r.into_body(), 1 << 20).await?;
            api_exec.push(t0.elapsed());
        }
        let t0 = Instant::now();
        app.clone().oneshot(call("DELETE", format!("/v1/sandboxes/{id}"), "")?).await?;
        api_delete.push(t0.elapsed());
    }
    let (mut direct_create, mut direct_exec, mut direct_destroy) = (vec![], vec![], vec![]);
    let cfg = hutch_sandbox::SandboxConfig::default();
    for _ in 0..n {
        let t0 = Instant::now();
        let sb = hutch_sandbox::Sandbox::create(&host, &cfg).await?;
        direct_create.push(t0.elapsed());
        for _ in 0..5 {
            let t0 = Instant::now();
            sb.client().run(&["true"]).await?;
            direct_exec.push(t0.elapsed());
        }
        let t0 = Instant::now();
        sb.destroy().await;
        direct_destroy.push(t0.elapsed());
    }
    let a = line("API create (201, running)", &mut api_create);
    let b = line("direct Sandbox::create", &mut direct_create);
    println!("  ratio API/direct p50: {:.2}", a / b);
    let a = line("API exec `true`", &mut api_exec);
    let b = line("direct exec `true`", &mut direct_exec);
    println!("  ratio API/direct p50: {:.2}", a / b);
    let a = line("API delete", &mut api_delete);
    let b = line("direct destroy", &mut direct_destroy);
    println!("  ratio API/direct p50: {:.2}", a / b);
    mgr.shutdown().await;
    Ok(())
}
