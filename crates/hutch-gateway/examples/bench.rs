//! Gateway throughput and latency against a local HTTPS server:
//! `cargo run --release -p hutch-gateway --example bench [-- MiB [requests]]`.
//! Prints MB/s of one large download direct, tunnelled (TLS passthrough) and intercepted (TLS
//! terminated, secret host, streaming mask), as ratios to direct, and the latency added per
//! small request (p50/p95), on new connections and on one kept-alive connection.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hutch_gateway::Limits;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const POLICY: &str = r#"
allow = ["echo.test:HTTPS_PORT", "api.test:HTTPS_PORT"]
resolve = ["echo.test:HTTPS_PORT:127.0.0.1", "api.test:HTTPS_PORT:127.0.0.1"]
upstream_ca = ["CA_FILE"]
[secrets.TOKEN]
hosts = ["api.test"]
"#;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Tunnel,
    Intercept,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Tunnel => "tunnelled (TLS passthrough)",
            Path::Intercept => "intercepted (TLS terminated)",
        }
    }

    fn host(self) -> &'static str {
        if self == Path::Intercept {
            "api.test"
        } else {
            "echo.test"
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

async fn open(f: &Fixture, path: Path) -> Box<dyn Io> {
    let host = path.host();
    match path {
        Path::Direct => {
            let tcp = TcpStream::connect(f.net.https).await.expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            Box::new(tls(tcp, host, &f.net.ca_pem).await.expect("tls"))
        }
        Path::Tunnel | Path::Intercept => {
            let c = proxy_connect(&f.gw, &format!("{host}:{}", f.net.https.port())).await;
            let io =
                c.io.unwrap_or_else(|| panic!("CONNECT refused: {} {}", c.status, c.body));
            let ca = if path == Path::Tunnel {
                f.net.ca_pem.clone()
            } else {
                f.gw.ca_cert_pem()
            };
            Box::new(tls(io, host, &ca).await.expect("tls"))
        }
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn client(io: Box<dyn Io>) -> Sender {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Sends one GET and streams the body, returning its length.
async fn fetch(sender: &mut Sender, host: &str, path: &str) -> u64 {
    sender.ready().await.expect("ready");
    let req = Request::builder()
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    assert!(resp.status().is_success(), "{}", resp.status());
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.expect("frame").data_ref() {
            n += d.len() as u64;
        }
    }
    n
}

async fn download(f: &Fixture, path: Path, bytes: u64) -> f64 {
    let mut s = client(open(f, path).await).await;
    let start = Instant::now();
    let got = fetch(&mut s, path.host(), &format!("/big?bytes={bytes}")).await;
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(got, bytes, "{} download incomplete", path.label());
    bytes as f64 / (1 << 20) as f64 / secs
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn latencies(f: &Fixture, path: Path, n: usize, new_conn: bool) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    let mut kept = if new_conn {
        None
    } else {
        Some(client(open(f, path).await).await)
    };
    for _ in 0..n {
        let start = Instant::now();
        match kept.as_mut() {
            Some(s) => {
                fetch(s, path.host(), "/small").await;
            }
            None => {
                let mut s = client(open(f, path).await).await;
                fetch(&mut s, path.host(), "/small").await;
            }
        }
        out.push(start.elapsed());
    }
    out.sort();
    out
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let f = Fixture::new(POLICY, &[("TOKEN", "bench-secret-value-0123456789")], Limits::default()).await;
        let bytes = mib << 20;
        println!("hutch-gateway bench: {mib} MiB download, {n} small requests, loopback HTTPS server, 2 cores");
        println!();
        println!("throughput (one {mib} MiB download each, best of 2):");
        let mut direct = 0.0;
        for path in [Path::Direct, Path::Tunnel, Path::Intercept] {
            let a = download(&f, path, bytes).await;
            let b = download(&f, path, bytes).await;
            let best = a.max(b);
            if path == Path::Direct {
                direct = best;
            }
            println!("  {:<30} {:>9.1} MB/s   ratio to direct {:.2}", path.label(), best, best / direct);
        }
        for new_conn in [true, false] {
            println!();
            println!(
                "latency per small request ({}):",
                if new_conn { "new connection each: CONNECT + TLS + GET" } else { "one kept-alive connection" }
            );
            let base = latencies(&f, Path::Direct, n, new_conn).await;
            let (b50, b95) = (pct(&base, 0.5), pct(&base, 0.95));
            println!("  {:<30} p50 {:>10}  p95 {:>10}", Path::Direct.label(), ms(b50), ms(b95));
            for path in [Path::Tunnel, Path::Intercept] {
                let l = latencies(&f, path, n, new_conn).await;
                let (p50, p95) = (pct(&l, 0.5), pct(&l, 0.95));
                println!(
                    "  {:<30} p50 {:>10}  p95 {:>10}   added p50 {:>10}  p95 {:>10}",
                    path.label(),
                    ms(p50),
                    ms(p95),
                    ms(p50.saturating_sub(b50)),
                    ms(p95.saturating_sub(b95))
                );
            }
        }
        println!();
        println!("gateway bytes carried: {} MiB; denials: {}", f.gw.bytes_used() >> 20, f.gw.summary().total());
    });
}
