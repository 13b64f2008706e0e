//! WebSocket and HTTP/2 carried through inspected (TLS-terminated) connections (issue class 10,
//! with the checks of classes 6, 7 and 17 applied to them): the WebSocket upgrade request is
//! decided, swapped and audited like any request, frames from the upstream are masked; every
//! HTTP/2 request is decided on its own. The VM side is driven over in-memory streams; TLS, the
//! WebSocket server and the HTTP/2 server (hutch-testnet) are real.

mod common;

use std::sync::Arc;

use common::{proxy_connect, tls};
use futures::{SinkExt, StreamExt};
use hutch_gateway::{AuditRecord, Gateway, GatewayConfig, MemoryAuditSink};
use hutch_policy::CheckedPolicy;
use hutch_testnet::TestNet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "sk-KeyReal-0123456789abcdefZZ";

const API: &str = "api.example.test";
const RULED: &str = "ruled.example.test";
const DENIED: &str = "denied.example.test";

struct Fx {
    net: TestNet,
    gw: Gateway,
    audit: Arc<MemoryAuditSink>,
}

/// KEY goes in `x-token` to api. ruled allows GET under `/ok/` and `/ws/` only. denied is not
/// allowed at all.
fn fixture() -> Fx {
    let net = TestNet::start().expect("testnet");
    let p = net.https_port();
    let text = format!(
        r#"
allow = ["{API}:{p}", {{ host = "{RULED}", ports = [{p}], methods = ["GET"], paths = ["/ok/", "/ws/"] }}]
resolve = ["{API}:{p}:127.0.0.1", "{RULED}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
[secrets.KEY]
hosts = ["{API}"]
header = "x-token"
"#,
        ca = net.ca_file().display()
    );
    let policy =
        CheckedPolicy::from_toml_str(&text, std::path::Path::new("carried.toml")).expect("policy");
    let secrets = policy
        .load_secrets_with(|v| (v == "KEY").then(|| KEY.into()))
        .expect("secrets");
    let audit = Arc::new(MemoryAuditSink::new());
    let mut cfg = GatewayConfig::new("carried", Arc::new(policy), secrets, audit.clone());
    cfg.system_roots = false;
    let gw = Gateway::new(cfg).expect("gateway");
    Fx { net, gw, audit }
}

impl Fx {
    fn placeholder(&self) -> String {
        self.gw.placeholders().into_iter().find(|(n, _)| n == "KEY").map(|(_, p)| p).expect("placeholder")
    }

    /// Records whose flags hold `flag`, waiting a little for lines written when streams end.
    async fn with_flag(&self, flag: &str) -> Vec<AuditRecord> {
        for _ in 0..300 {
            let found: Vec<AuditRecord> =
                self.audit.records().into_iter().filter(|r| r.flags.iter().any(|f| f == flag)).collect();
            if !found.is_empty() {
                return found;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no record flagged {flag}: {:#?}", self.audit.records());
    }

    /// A WebSocket client in the sandbox: CONNECT, TLS trusting the sandbox CA, the opening
    /// handshake with `headers`. `Err` carries the refusal as the client saw it.
    async fn websocket(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<common::Upgraded>>,
        String,
    > {
        let c = proxy_connect(&self.gw, &format!("{host}:{}", self.net.https_port())).await;
        let io = c.io.ok_or_else(|| format!("CONNECT {}: {}", c.status, c.body))?;
        let t = tls(io, host, &self.gw.ca_cert_pem()).await.map_err(|e| format!("TLS: {e}"))?;
        let mut req = format!("wss://{host}:{}{path}", self.net.https_port())
            .into_client_request()
            .expect("request");
        for (k, v) in headers {
            req.headers_mut().insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        match tokio_tungstenite::client_async(req, t).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(format!(
                "{} {}",
                resp.status(),
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

async fn next_text<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let m = tokio::time::timeout(std::time::Duration::from_secs(20), ws.next())
        .await
        .expect("a message in time")
        .expect("open")
        .expect("message");
    match m {
        Message::Text(t) => t.as_str().to_string(),
        other => panic!("not text: {other:?}"),
    }
}

/// Class 10 (WebSocket through inspection): on a host with a secret, the upgrade request gets the
/// value in its bound header only (frames are relayed as sent), the upstream's frames come back
/// with the value masked, also when it is split across fragments, and the upgrade and the end of
/// the WebSocket are audited. A denied host is refused at CONNECT; a rule's path limit applies to
/// the upgrade request (403), and a placeholder sent where its secret is not bound is flagged.
#[tokio::test]
async fn class_10_websocket_through_inspection_is_checked_swapped_and_masked() {
    let f = fixture();
    let ph = f.placeholder();
    let mut ws = f.websocket(API, "/ws/echo", &[("x-token", &ph)]).await.expect("websocket to api");
    ws.send(Message::text("hello")).await.expect("send");
    assert_eq!(next_text(&mut ws).await, "hello");
    // A placeholder inside a frame is not swapped: the echo gives back exactly what was sent.
    let inside = format!("the token is {ph}");
    ws.send(Message::text(inside.clone())).await.expect("send");
    assert_eq!(next_text(&mut ws).await, inside);
    // The server reflects the upgrade request's headers: the real value is masked.
    ws.send(Message::text("headers")).await.expect("send");
    let reflected = next_text(&mut ws).await;
    assert!(reflected.contains("x-token") && !reflected.contains(KEY), "{reflected}");
    assert!(reflected.contains("hutch-ph-KEY-"), "{reflected}");
    for n in [1, 7, 13] {
        ws.send(Message::text(format!("headers-split-{n}"))).await.expect("send");
        let split = next_text(&mut ws).await;
        assert!(split.contains("x-token") && !split.contains(&KEY[4..20]), "split {n}: {split}");
        assert_eq!(split.len(), reflected.len(), "same-length stand-ins");
    }
    ws.close(None).await.expect("close");
    drop(ws);

    let seen = f.net.requests_to("/ws/echo");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-token"), Some(KEY), "swapped into the upgrade request's header");
    assert!(seen[0].header("sec-websocket-extensions").is_none(), "no compression offered");
    let up = f.with_flag("websocket").await;
    let upgrade = up.iter().find(|r| r.status == Some(101)).expect("the upgrade's line");
    assert_eq!(upgrade.secrets, vec!["KEY".to_string()]);
    let closed = &f.with_flag("websocket_closed").await[0];
    assert!(closed.flags.iter().any(|x| x == "masked_in_websocket:KEY:literal"), "{:?}", closed.flags);
    assert!(closed.bytes_down > 0 && closed.bytes_up > 0, "{closed:?}");

    // Denied host: refused before any TLS.
    let e = f.websocket(DENIED, "/ws/echo", &[]).await.err().expect("denied");
    assert!(e.contains("403"), "{e}");
    // A path-limited rule judges the upgrade request like any other.
    let e = f.websocket(RULED, "/elsewhere/ws", &[]).await.err().expect("outside the rule");
    assert!(e.starts_with("403"), "{e}");
    assert!(f.net.requests_to("/elsewhere").is_empty());
    // Allowed there, but a placeholder sent to a host its secret is not bound to is flagged.
    let mut ws = f.websocket(RULED, "/ws/echo", &[("x-token", &ph)]).await.expect("websocket to ruled");
    ws.send(Message::text("headers")).await.expect("send");
    let reflected = next_text(&mut ws).await;
    assert!(reflected.contains(&ph), "not swapped off its host: {reflected}");
    let flagged = f.with_flag("websocket").await;
    assert!(
        flagged.iter().any(|r| r.dest.starts_with(RULED) && r.flags.iter().any(|x| x == "possible_exfiltration:KEY")),
        "{flagged:#?}"
    );
}

/// TLS from the sandbox offering `alpn`, trusting the sandbox CA.
async fn tls_alpn(
    f: &Fx,
    host: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<common::Upgraded> {
    use rustls::pki_types::pem::PemObject;
    let c = proxy_connect(&f.gw, &format!("{host}:{}", f.net.https_port())).await;
    let io = c.io.unwrap_or_else(|| panic!("CONNECT {host}: {}", c.body));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(f.gw.ca_cert_pem().as_bytes()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, io).await.expect("TLS")
}

type H2 = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

async fn h2_client(t: tokio_rustls::client::TlsStream<common::Upgraded>) -> H2 {
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(t),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

async fn h2_send(
    s: &H2,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> (http::StatusCode, String) {
    let mut b = http::Request::builder().method(method).uri(url).version(http::Version::HTTP_2);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(http_body_util::Full::new(bytes::Bytes::new())).expect("request");
    let mut s = s.clone();
    let resp = s.send_request(req).await.expect("response");
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Class 10 (HTTP/2 through inspection): a sandbox that offers `h2` to a host whose upstream
/// speaks it gets HTTP/2 from the gateway; each request on the one connection is decided on its
/// own (method and path rules: one allowed, the next refused 403 on the same connection), the
/// secret goes into its header only on the bound host, responses are masked, and requests run
/// concurrently. A sandbox that offers only HTTP/1.1 keeps HTTP/1.1.
#[tokio::test]
async fn class_10_http2_through_inspection_checks_each_request() {
    let f = fixture();
    let ph = f.placeholder();
    let p = f.net.https_port();
    let t = tls_alpn(&f, API, &[b"h2", b"http/1.1"]).await;
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "h2 offered: the upstream speaks it");
    let s = h2_client(t).await;
    let url = format!("https://{API}:{p}/reflect/x-token");
    let (status, body) = h2_send(&s, "GET", &url, &[("x-token", &ph)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(KEY) && body.contains("hutch-ph-KEY-"), "masked: {body}");
    let seen = f.net.requests_to("/reflect/x-token");
    assert_eq!(seen[0].header("x-token"), Some(KEY), "swapped in its header");
    assert_eq!(seen[0].version, "HTTP/2.0", "carried upstream as HTTP/2");
    // Concurrent streams on the one connection.
    let calls = (0..4).map(|i| {
        let s = s.clone();
        let url = format!("https://{API}:{p}/c{i}");
        async move { h2_send(&s, "GET", &url, &[]).await }
    });
    for (status, body) in futures::future::join_all(calls).await {
        assert_eq!(status, 200, "{body}");
    }
    // A placeholder in another header is not swapped (header-only by default), only flagged.
    let (status, _) = h2_send(&s, "GET", &format!("https://{API}:{p}/other"), &[("x-other", &ph)]).await;
    assert_eq!(status, 200);
    assert_eq!(f.net.requests_to("/other")[0].header("x-other"), Some(ph.as_str()));

    // The path- and method-limited host: each request on one h2 connection is judged.
    let t = tls_alpn(&f, RULED, &[b"h2", b"http/1.1"]).await;
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let s = h2_client(t).await;
    let (ok, body) = h2_send(&s, "GET", &format!("https://{RULED}:{p}/ok/a"), &[]).await;
    assert_eq!(ok, 200, "{body}");
    let (no, body) = h2_send(&s, "GET", &format!("https://{RULED}:{p}/secret"), &[]).await;
    assert_eq!(no, 403, "{body}");
    let (no, body) = h2_send(&s, "POST", &format!("https://{RULED}:{p}/ok/b"), &[]).await;
    assert_eq!(no, 403, "{body}");
    // :authority must name the host the connection was decided for.
    let (no, body) = h2_send(&s, "GET", &format!("https://{API}:{p}/ok/c"), &[]).await;
    assert_eq!(no, 421, "{body}");
    let (ok, _) = h2_send(&s, "GET", &format!("https://{RULED}:{p}/ok/d"), &[]).await;
    assert_eq!(ok, 200, "the connection goes on after refusals");
    let paths: Vec<String> = f.net.requests().iter().map(|r| r.path.clone()).collect();
    assert!(paths.contains(&"/ok/a".into()) && paths.contains(&"/ok/d".into()), "{paths:?}");
    assert!(!paths.iter().any(|x| x == "/secret" || x == "/ok/b" || x == "/ok/c"), "{paths:?}");
    let denied: Vec<AuditRecord> = f
        .audit
        .records()
        .into_iter()
        .filter(|r| r.decision == hutch_gateway::Verdict::Deny && r.dest.starts_with(RULED))
        .collect();
    assert_eq!(denied.len(), 3, "{denied:#?}");

    // HTTP/1.1 only: stays HTTP/1.1.
    let t = tls_alpn(&f, API, &[b"http/1.1"]).await;
    assert_eq!(t.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}
