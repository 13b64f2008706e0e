//! The local internet itself, over real sockets: TLS with the test CA, echo, UDP counting, and a
//! `git clone` + `git push` over smart HTTP by the host's git.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hutch_testnet::TestNet;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

async fn https_get(net: &TestNet, name: &str, path: &str, auth: &str) -> (u16, Bytes) {
    https_get_at(
        net,
        std::net::SocketAddr::from(([127, 0, 0, 1], net.https_port())),
        name,
        path,
        auth,
    )
    .await
}

async fn https_get_at(
    net: &TestNet,
    addr: std::net::SocketAddr,
    name: &str,
    path: &str,
    auth: &str,
) -> (u16, Bytes) {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(net.ca_pem().as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(name.to_string()).expect("name"), tcp)
        .await
        .expect("TLS with the test CA");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri(path)
        .header("host", format!("{name}:{}", addr.port()))
        .header("authorization", auth)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = send.send_request(req).await.expect("response");
    let status = resp.status().as_u16();
    (
        status,
        resp.into_body().collect().await.expect("body").to_bytes(),
    )
}

#[tokio::test]
async fn https_echo_with_the_test_ca_records_requests() {
    let net = TestNet::start().expect("testnet");
    let (status, body) = https_get(&net, "api.example.test", "/v1/thing?x=1", "Bearer t").await;
    assert_eq!(status, 200);
    let echo: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(echo["path"], "/v1/thing?x=1");
    assert_eq!(echo["sni"], "api.example.test");
    let seen = net.requests_to("/v1/thing");
    assert_eq!(seen.len(), 1);
    assert!(seen[0].tls);
    assert_eq!(seen[0].host().as_deref(), Some("api.example.test"));
    assert_eq!(seen[0].header("authorization"), Some("Bearer t"));
    let (_, body) = https_get(&net, "x.example.test", "/bytes/300000", "").await;
    assert_eq!(body.len(), 300_000);
    assert!(net.requests().iter().all(|s| s.port == net.https_port()));

    match net.web_addr() {
        Some(ip) => {
            let (status, _) = https_get_at(
                &net,
                std::net::SocketAddr::new(ip, 443),
                "web.example.test",
                "/on-443",
                "",
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(net.requests_to("/on-443")[0].port, 443);
        }
        None => println!(
            "no web ports (binding 443 and 80 needs root or CAP_NET_BIND_SERVICE): not exercised"
        ),
    }

    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.send_to(b"quic?", ("127.0.0.1", net.udp_port()))
        .expect("send");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while net.udp_datagrams() == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(net.udp_datagrams(), 1);
}

#[test]
fn git_clone_and_push_over_smart_http() {
    let net = TestNet::start().expect("testnet");
    net.create_git_repo("repo.git", &[("README", "hello from the testnet\n")])
        .expect("repo");
    let work = tempfile::tempdir().expect("tempdir");
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("HOME", work.path())
            // The environment's CA setting would win over `-c http.sslCAInfo`.
            .env("GIT_SSL_CAINFO", net.ca_file())
            .args([
                "-c",
                &format!(
                    "http.curloptResolve=git.example.test:{}:127.0.0.1",
                    net.https_port()
                ),
            ])
            .args(["-c", "user.name=t", "-c", "user.email=t@example.test"])
            .args(args)
            .current_dir(work.path())
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&[
        "clone",
        "-q",
        &net.https_url("git.example.test", "/repo.git"),
        "clone",
    ]);
    assert_eq!(
        std::fs::read_to_string(work.path().join("clone/README")).expect("README"),
        "hello from the testnet\n"
    );
    std::fs::write(work.path().join("clone/new.txt"), "pushed\n").expect("write");
    git(&["-C", "clone", "add", "new.txt"]);
    git(&["-C", "clone", "commit", "-q", "-m", "push test"]);
    git(&["-C", "clone", "push", "-q", "origin", "main:pushed"]);
    let refs = net.git_refs("repo.git").expect("refs");
    assert!(refs.contains("refs/heads/pushed"), "{refs}");
    assert!(net
        .requests()
        .iter()
        .any(|s| s.path.starts_with("/repo.git/git-receive-pack")));
}
