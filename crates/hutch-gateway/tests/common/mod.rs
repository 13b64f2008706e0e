//! Test support: a local "internet" (HTTPS and HTTP echo servers on 127.0.0.1 with their own
//! test CA) and a VM-side client that reaches it through a gateway over in-memory streams.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hutch_gateway::{Gateway, GatewayConfig, Limits, MemoryAuditSink};
use hutch_policy::CheckedPolicy;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Names the test internet's certificate covers.
pub const NAMES: [&str; 5] = [
    "api.test",
    "other.test",
    "plain.test",
    "echo.test",
    "localhost",
];

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub tls: bool,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The local internet: an HTTPS server and a plaintext HTTP server on loopback.
pub struct Internet {
    pub https: SocketAddr,
    pub http: SocketAddr,
    pub ca_pem: String,
    pub ca_file: PathBuf,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _dir: tempfile::TempDir,
}

type TestBody = BoxBody<Bytes, Infallible>;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA and a leaf for `NAMES`, as rustls server config plus the CA PEM.
pub fn test_pki(names: &[&str]) -> (Arc<ServerConfig>, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Test Internet CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("ca cert");
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf_params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("leaf params");
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf cert");
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone(), ca.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(cfg), ca.pem())
}

impl Internet {
    pub async fn start() -> Internet {
        let (server_cfg, ca_pem) = test_pki(&NAMES);
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_file = dir.path().join("internet-ca.pem");
        std::fs::write(&ca_file, &ca_pem).expect("write ca");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let https_l = TcpListener::bind("127.0.0.1:0").await.expect("bind https");
        let http_l = TcpListener::bind("127.0.0.1:0").await.expect("bind http");
        let https = https_l.local_addr().expect("addr");
        let http = http_l.local_addr().expect("addr");
        let acceptor = TlsAcceptor::from(server_cfg);
        {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = https_l.accept().await {
                    // Like production servers; without it the first response on a connection
                    // can wait for a 40 ms delayed ACK on the gateway's upstream socket.
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            serve_echo(tls, seen, true, https.port()).await;
                        }
                    });
                }
            });
        }
        {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Ok((tcp, _)) = http_l.accept().await {
                    let seen = seen.clone();
                    tokio::spawn(async move { serve_echo(tcp, seen, false, https.port()).await });
                }
            });
        }
        Internet {
            https,
            http,
            ca_pem,
            ca_file,
            seen,
            _dir: dir,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

async fn serve_echo<S>(io: S, seen: Arc<Mutex<Vec<Seen>>>, tls: bool, https_port: u16)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move { Ok::<_, Infallible>(echo(req, seen, tls, https_port).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).boxed()
}

async fn echo(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tls: bool,
    https_port: u16,
) -> Response<TestBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let auth = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    seen.lock().expect("seen lock").push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        headers: headers.clone(),
        body: body.to_vec(),
        tls,
    });
    let route = parts.uri.path();
    match route {
        "/redirect" => Response::builder()
            .status(StatusCode::FOUND)
            .header(
                "location",
                format!("https://other.test:{https_port}/landed"),
            )
            .body(full("moved"))
            .expect("response"),
        "/reflect" => Response::builder()
            .header("x-reflect", auth.clone())
            .body(full(format!("you sent: {auth}")))
            .expect("response"),
        "/reflect-stream" => {
            // No length, value split over frames.
            let text = format!("streamed: {auth} and again {auth} end");
            let frames: Vec<Result<Frame<Bytes>, Infallible>> = text
                .as_bytes()
                .chunks(5)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            Response::new(StreamBody::new(futures::stream::iter(frames)).boxed())
        }
        "/big" => {
            let n: usize = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
            let frames = (0..n.div_ceil(chunk.len())).map(move |i| {
                let len = (n - i * chunk.len()).min(chunk.len());
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            });
            Response::builder()
                .header("content-length", n)
                .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                .expect("response")
        }
        _ => {
            let json = serde_json::json!({
                "method": parts.method.as_str(),
                "path": path,
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            });
            Response::builder()
                .header("content-type", "application/json")
                .body(full(json.to_string()))
                .expect("response")
        }
    }
}

/// A gateway over `policy_toml` (ports already substituted) trusting the internet's CA.
pub struct Fixture {
    pub net: Internet,
    pub gw: Gateway,
    pub audit: Arc<MemoryAuditSink>,
}

pub fn policy_from(text: &str, net: &Internet) -> CheckedPolicy {
    let text = text
        .replace("HTTPS_PORT", &net.https.port().to_string())
        .replace("HTTP_PORT", &net.http.port().to_string())
        .replace("CA_FILE", &net.ca_file.display().to_string());
    CheckedPolicy::from_toml_str(&text, std::path::Path::new("test-policy.toml"))
        .expect("test policy")
}

impl Fixture {
    /// `policy` may use HTTPS_PORT, HTTP_PORT and CA_FILE; every `.test` name pinned by the
    /// policy resolves to 127.0.0.1.
    pub async fn new(policy: &str, env: &[(&str, &str)], limits: Limits) -> Fixture {
        let net = Internet::start().await;
        Fixture::with_net(net, policy, env, limits, |_| {})
    }

    pub fn with_net(
        net: Internet,
        policy: &str,
        env: &[(&str, &str)],
        limits: Limits,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Fixture {
        let policy = policy_from(policy, &net);
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let secrets = policy
            .load_secrets_with(|v| env.get(v).cloned())
            .expect("secrets");
        let audit = Arc::new(MemoryAuditSink::new());
        let mut cfg = GatewayConfig::new("test-sandbox", Arc::new(policy), secrets, audit.clone());
        cfg.limits = limits;
        cfg.system_roots = false;
        tweak(&mut cfg);
        let gw = Gateway::new(cfg).expect("gateway");
        Fixture { net, gw, audit }
    }

    pub fn placeholder(&self, name: &str) -> String {
        self.gw
            .placeholders()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .expect("placeholder")
    }
}

pub type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

/// What a VM-side CONNECT got: the status, the body of a refusal, the tunnel when accepted.
pub struct ConnectResult {
    pub status: StatusCode,
    pub body: String,
    pub io: Option<Upgraded>,
}

/// Opens one proxy connection to the gateway (as the guest agent would) and sends CONNECT.
pub async fn proxy_connect(gw: &Gateway, target: &str) -> ConnectResult {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let g = gw.clone();
    tokio::spawn(async move { g.serve_proxy(server).await });
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(client))
            .await
            .expect("proxy handshake");
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .method("CONNECT")
        .uri(target)
        .header("host", target)
        .body(Empty::new())
        .expect("connect request");
    let resp = sender.send_request(req).await.expect("CONNECT response");
    let status = resp.status();
    if status == StatusCode::OK {
        let up = hyper::upgrade::on(resp).await.expect("upgrade");
        ConnectResult {
            status,
            body: String::new(),
            io: Some(TokioIo::new(up)),
        }
    } else {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        ConnectResult {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            io: None,
        }
    }
}

/// Opens a transparent tunnel (as the guest agent would after its resolver mapped the name).
pub fn tunnel(gw: &Gateway, name: &str, port: u16) -> tokio::io::DuplexStream {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let g = gw.clone();
    let name = name.to_string();
    tokio::spawn(async move { g.serve_tunnel(server, &name, port).await });
    client
}

/// Sends one request over a plain proxy connection (absolute-form or anything else).
pub async fn proxy_request(
    gw: &Gateway,
    req: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes) {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let g = gw.clone();
    tokio::spawn(async move { g.serve_proxy(server).await });
    request(client, req).await.expect("proxy request")
}

/// TLS from the VM side, trusting only `ca_pem`.
pub async fn tls<S>(
    io: S,
    sni: &str,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    TlsConnector::from(Arc::new(cfg)).connect(name, io).await
}

/// One HTTP/1.1 request on `io`; the body is read whole.
pub async fn request<S>(
    io: S,
    req: Request<Full<Bytes>>,
) -> hyper::Result<(StatusCode, HeaderMap, Bytes)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

pub fn get(uri: &str, host: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(uri)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .expect("request")
}
