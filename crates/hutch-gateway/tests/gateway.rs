//! End-to-end gateway tests: real TLS, real servers on loopback (the "internet"), the VM side
//! driven over in-memory streams. Each test names the threats.md class it covers.

mod common;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use hutch_gateway::{
    AuditEvent, AuditRecord, BoxFuture, DnsAnswer, FileAuditSink, Gateway, GatewayConfig, Limits,
    Mode, Resolver, Verdict, Via,
};
use hutch_policy::HostName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "ghp_REAL_token_value_0123456789";
const OTHER: &str = "sk-OTHER-real-value-abcdef";

/// api.test carries secret TOKEN, other.test carries OTHER, echo.test carries none; all pinned
/// to the loopback internet. plain.test is reachable over plaintext HTTP and carries TOKEN too.
const POLICY: &str = r#"
allow = ["api.test:HTTPS_PORT", "other.test:HTTPS_PORT", "echo.test:HTTPS_PORT", "plain.test:HTTP_PORT", "localhost:HTTPS_PORT"]
resolve = ["api.test:HTTPS_PORT:127.0.0.1", "other.test:HTTPS_PORT:127.0.0.1", "echo.test:HTTPS_PORT:127.0.0.1", "plain.test:HTTP_PORT:127.0.0.1"]
upstream_ca = ["CA_FILE"]

[secrets.TOKEN]
hosts = ["api.test", "plain.test"]
inject = { header = "x-api-key", value = "key={value}" }
in_headers = true

[secrets.OTHER]
hosts = ["other.test"]
in_body = true
"#;

fn env() -> Vec<(&'static str, &'static str)> {
    vec![("TOKEN", TOKEN), ("OTHER", OTHER)]
}

async fn fixture() -> Fixture {
    Fixture::new(POLICY, &env(), Limits::default()).await
}

fn target(name: &str, net: &Internet) -> String {
    format!("{name}:{}", net.https.port())
}

/// Connects through the proxy and TLS to `name`, trusting `ca_pem`.
async fn open_tls(
    f: &Fixture,
    name: &str,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<Upgraded> {
    let c = proxy_connect(&f.gw, &target(name, &f.net)).await;
    assert_eq!(c.status, StatusCode::OK, "CONNECT {name}: {}", c.body);
    tls(c.io.expect("tunnel"), name, ca_pem)
        .await
        .expect("TLS through the gateway")
}

fn req(
    method: &str,
    path: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

fn records(f: &Fixture) -> Vec<AuditRecord> {
    f.audit.records()
}

/// Waits for the audit line of a connection that ends asynchronously.
async fn wait_for(f: &Fixture, pred: impl Fn(&AuditRecord) -> bool) -> AuditRecord {
    for _ in 0..200 {
        if let Some(r) = records(f).into_iter().find(|r| pred(r)) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no matching audit record in {:#?}", records(f));
}

// --- allow / deny basics -----------------------------------------------------------------

/// Threat 2 (proxy bypass is closed by construction; what is allowed goes through): a host
/// without secrets is carried as checked TLS passthrough, end to end with the real server cert.
#[tokio::test]
async fn threat2_allowed_connect_passes_tls_through() {
    let f = fixture().await;
    let io = open_tls(&f, "echo.test", &f.net.ca_pem).await;
    let (status, _, body) = request(io, req("GET", "/hello", "echo.test", &[], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("/hello"));
    let rec = wait_for(&f, |r| {
        r.event == AuditEvent::Connection && r.dest.starts_with("echo.test")
    })
    .await;
    assert_eq!(rec.decision, Verdict::Allow);
    assert_eq!(rec.mode, Some(Mode::TlsPassthrough));
    assert_eq!(
        rec.addr.map(|a| a.ip()),
        Some("127.0.0.1".parse::<IpAddr>().expect("ip"))
    );
    assert!(rec.bytes_up > 0 && rec.bytes_down > 0, "{rec:?}");
    assert!(
        rec.rule.as_deref().is_some_and(|r| r.contains("echo.test")),
        "{rec:?}"
    );
}

/// Threat 2: anything not allowed is refused fast with a clear 403 and a deny audit line.
#[tokio::test]
async fn threat2_denied_connect_gets_403_and_audit() {
    let f = fixture().await;
    let c = proxy_connect(&f.gw, "evil.test:443").await;
    assert_eq!(c.status, StatusCode::FORBIDDEN);
    assert_eq!(
        c.body,
        "hutch: egress to evil.test:443 denied by policy (no allow rule)\n"
    );
    let rec = records(&f)
        .into_iter()
        .find(|r| r.dest == "evil.test:443")
        .expect("deny record");
    assert_eq!(rec.decision, Verdict::Deny);
    assert_eq!(rec.reason.as_deref(), Some("no allow rule"));
    // Allowed name, wrong port.
    let c = proxy_connect(&f.gw, "echo.test:8443").await;
    assert_eq!(c.status, StatusCode::FORBIDDEN);
    let summary = f.gw.summary();
    assert_eq!(summary.total(), 2, "{summary}");
    assert!(summary.to_string().contains("evil.test:443"), "{summary}");
}

/// Threat 2: the transparent tunnel path decides the same way; refused tunnels are closed.
#[tokio::test]
async fn threat2_tunnel_allowed_and_denied() {
    let f = fixture().await;
    let io = tunnel(&f.gw, "echo.test", f.net.https.port());
    let io = tls(io, "echo.test", &f.net.ca_pem)
        .await
        .expect("tls over tunnel");
    let (status, _, _) = request(io, req("GET", "/", "echo.test", &[], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK);

    let mut io = tunnel(&f.gw, "evil.test", 443);
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "a refused tunnel is closed");
    let rec = wait_for(&f, |r| r.via == Via::Tunnel && r.dest == "evil.test:443").await;
    assert_eq!(rec.decision, Verdict::Deny);
}

// --- secrets -------------------------------------------------------------------------------

/// Threat 6 and 13: on a secret host TLS is terminated with the sandbox CA, the upstream gets
/// the real value over verified TLS, and the value echoed back is masked.
#[tokio::test]
async fn threat6_upstream_gets_real_secret_client_sent_placeholder() {
    let f = fixture().await;
    let ph = f.placeholder("TOKEN");
    assert!(ph.starts_with("hutch-ph-TOKEN-") && ph != TOKEN);
    // The client trusts only the sandbox CA: the connection must be intercepted.
    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let auth = format!("Bearer {ph}");
    let (status, headers, body) = request(
        io,
        req(
            "GET",
            "/v1/user?token=abc",
            "api.test",
            &[("authorization", &auth)],
            "",
        ),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::OK);
    let seen = f.net.seen();
    let up = seen.last().expect("upstream saw the request");
    assert!(up.tls);
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    // The inject template is applied when the client sent no such header.
    assert_eq!(
        up.header("x-api-key"),
        Some(format!("key={TOKEN}").as_str())
    );
    let body = String::from_utf8_lossy(&body);
    assert!(!body.contains(TOKEN), "echoed value must be masked: {body}");
    assert!(body.contains(&ph), "masked with the placeholder: {body}");
    assert_eq!(
        headers.get("content-length").and_then(|v| v.to_str().ok()),
        Some(body.len().to_string().as_str())
    );
    let rec = wait_for(&f, |r| {
        r.event == AuditEvent::Request && r.dest.starts_with("api.test")
    })
    .await;
    assert_eq!(rec.secrets, vec!["TOKEN".to_string()]);
    assert_eq!(rec.mode, Some(Mode::TlsIntercept));
    assert_eq!(
        rec.path.as_deref(),
        Some("/v1/user?token="),
        "query values dropped on secret hosts"
    );
    assert!(
        rec.flags.iter().any(|f| f == "masked_in_response:TOKEN:literal"),
        "{rec:?}"
    );
}

/// Threat 6: a placeholder of secret A sent to host B (bound to another secret) arrives
/// unchanged and is flagged as possible exfiltration; B's own body placeholder is swapped.
#[tokio::test]
async fn threat6_placeholder_to_unbound_host_unchanged_and_flagged() {
    let f = fixture().await;
    let token_ph = f.placeholder("TOKEN");
    let other_ph = f.placeholder("OTHER");
    let io = open_tls(&f, "other.test", &f.gw.ca_cert_pem()).await;
    let body = format!("{{\"a\":\"{token_ph}\",\"b\":\"{other_ph}\"}}");
    let (status, _, _) = request(
        io,
        req(
            "POST",
            "/upload",
            "other.test",
            &[("authorization", &token_ph)],
            &body,
        ),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::OK);
    let up = f.net.seen().last().cloned().expect("seen");
    assert_eq!(
        up.header("authorization"),
        Some(token_ph.as_str()),
        "unbound placeholder unchanged"
    );
    let up_body = String::from_utf8_lossy(&up.body).into_owned();
    assert!(
        up_body.contains(&token_ph) && up_body.contains(OTHER) && !up_body.contains(TOKEN),
        "{up_body}"
    );
    let rec = wait_for(&f, |r| {
        r.event == AuditEvent::Request && r.dest.starts_with("other.test")
    })
    .await;
    assert!(
        rec.flags
            .contains(&"possible_exfiltration:TOKEN".to_string()),
        "{rec:?}"
    );
    assert_eq!(rec.secrets, vec!["OTHER".to_string()]);
}

/// Threat 6: never inject over plaintext HTTP, even to a host the secret is bound to.
#[tokio::test]
async fn threat6_secret_never_over_plaintext() {
    let f = fixture().await;
    let ph = f.placeholder("TOKEN");
    let port = f.net.http.port();
    let r = Request::builder()
        .uri(format!("http://plain.test:{port}/submit"))
        .header("host", format!("plain.test:{port}"))
        .header("authorization", format!("Bearer {ph}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, _, _) = proxy_request(&f.gw, r).await;
    assert_eq!(status, StatusCode::OK);
    let up = f.net.seen().last().cloned().expect("seen");
    assert!(!up.tls);
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {ph}").as_str())
    );
    assert_eq!(up.header("x-api-key"), None, "no inject over plaintext");
    let rec = wait_for(&f, |r| {
        r.event == AuditEvent::Request && r.dest.starts_with("plain.test")
    })
    .await;
    assert!(
        rec.flags
            .contains(&"placeholder_over_plaintext:TOKEN".to_string()),
        "{rec:?}"
    );
    assert!(rec.secrets.is_empty());
}

/// Threat 6: redirects are passed back, never followed; the next hop is a new request.
#[tokio::test]
async fn threat6_redirect_not_followed() {
    let f = fixture().await;
    let ph = f.placeholder("TOKEN");
    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let (status, headers, _) = request(
        io,
        req(
            "GET",
            "/redirect",
            "api.test",
            &[("authorization", &ph)],
            "",
        ),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::FOUND);
    assert!(headers["location"]
        .to_str()
        .expect("location")
        .starts_with("https://other.test:"));
    let seen = f.net.seen();
    assert_eq!(seen.len(), 1, "exactly one upstream request: {seen:?}");
    assert_eq!(seen[0].path, "/redirect");
}

/// Threat 6: a value reflected in headers and in a streamed body is masked.
#[tokio::test]
async fn threat6_echoed_secret_masked_in_headers_and_streams() {
    let f = fixture().await;
    let ph = f.placeholder("TOKEN");
    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let (_, headers, body) = request(
        io,
        req("GET", "/reflect", "api.test", &[("authorization", &ph)], ""),
    )
    .await
    .expect("request");
    assert_eq!(headers["x-reflect"].to_str().expect("ascii"), ph);
    assert_eq!(String::from_utf8_lossy(&body), format!("you sent: {ph}"));

    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let (_, _, body) = request(
        io,
        req(
            "GET",
            "/reflect-stream",
            "api.test",
            &[("authorization", &ph)],
            "",
        ),
    )
    .await
    .expect("request");
    let body = String::from_utf8_lossy(&body);
    assert!(
        !body.contains(TOKEN),
        "streamed echo must be masked: {body}"
    );
    assert!(
        body.starts_with("streamed: hutch-ph-") && body.ends_with(" end"),
        "{body}"
    );
}

// --- fronting and parser differentials -----------------------------------------------------

/// Threat 5 (domain fronting): SNI must equal the CONNECT authority on every host.
#[tokio::test]
async fn threat5_sni_mismatch_refused() {
    let f = fixture().await;
    for (connect_to, sni) in [("api.test", "other.test"), ("echo.test", "other.test")] {
        let c = proxy_connect(&f.gw, &target(connect_to, &f.net)).await;
        assert_eq!(c.status, StatusCode::OK);
        let r = tls(c.io.expect("io"), sni, &f.gw.ca_cert_pem()).await;
        assert!(
            r.is_err(),
            "TLS with SNI {sni} through CONNECT {connect_to} must fail"
        );
        let rec = wait_for(&f, |r| {
            r.event == AuditEvent::Connection
                && r.dest.starts_with(connect_to)
                && r.decision == Verdict::Deny
        })
        .await;
        assert!(
            rec.reason
                .as_deref()
                .is_some_and(|r| r.contains("does not match")),
            "{rec:?}"
        );
    }
    assert!(f.net.seen().is_empty(), "nothing reached the internet");
}

/// Threat 5: on a secret host, Host (and absolute-form authority) must equal SNI/CONNECT.
#[tokio::test]
async fn threat5_host_header_mismatch_on_secret_host() {
    let f = fixture().await;
    let ph = f.placeholder("TOKEN");
    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let (status, _, body) = request(
        io,
        req("GET", "/", "other.test", &[("authorization", &ph)], ""),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("does not match api.test"));
    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let port = f.net.https.port();
    let (status, _, _) = request(
        io,
        req(
            "GET",
            &format!("https://other.test:{port}/"),
            &format!("api.test:{port}"),
            &[],
            "",
        ),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::MISDIRECTED_REQUEST);
    assert!(f.net.seen().is_empty());
}

/// Threat 4 (parser differentials): absolute-form authority differing from Host is refused.
#[tokio::test]
async fn threat4_absolute_form_host_mismatch_refused() {
    let f = fixture().await;
    let port = f.net.http.port();
    let r = Request::builder()
        .uri(format!("http://plain.test:{port}/x"))
        .header("host", "evil.test")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, _, body) = proxy_request(&f.gw, r).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(String::from_utf8_lossy(&body).contains("Host header"));
    // Origin-form to the proxy and https:// absolute-form are refused too.
    let (status, _, _) = proxy_request(&f.gw, get("/x", "plain.test")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) =
        proxy_request(&f.gw, get(&format!("https://api.test:{port}/"), "api.test")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(f.net.seen().is_empty());
}

/// Threat 4: a plaintext connection through a tunnel must keep Host equal to the tunnel name.
#[tokio::test]
async fn threat4_tunnel_plain_http_host_must_match() {
    let f = fixture().await;
    let io = tunnel(&f.gw, "plain.test", f.net.http.port());
    let (status, _, _) = request(io, req("GET", "/", "evil.test", &[], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let io = tunnel(&f.gw, "plain.test", f.net.http.port());
    let (status, _, _) = request(io, req("GET", "/ok", "plain.test", &[], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(f.net.seen().len(), 1);
}

/// Threat 3 (name canonicalization): IP literals in every spelling are refused, by proxy,
/// tunnel and DNS, before anything is dialed.
#[tokio::test]
async fn threat3_ip_literals_refused_everywhere() {
    let f = fixture().await;
    let port = f.net.https.port();
    for host in [
        "127.0.0.1",
        "127.1",
        "0x7f.1",
        "2130706433",
        "0177.0.0.1",
        "[::1]",
        "[::ffff:127.0.0.1]",
        "[fe80::1%25lo]",
    ] {
        let c = proxy_connect(&f.gw, &format!("{host}:{port}")).await;
        assert_eq!(c.status, StatusCode::FORBIDDEN, "{host}");
        assert!(c.body.contains("IP address"), "{host}: {}", c.body);
    }
    for host in ["127.1", "0x7f.1", "::1", "169.254.169.254"] {
        let mut io = tunnel(&f.gw, host, port);
        let mut buf = [0u8; 1];
        assert_eq!(io.read(&mut buf).await.unwrap_or(0), 0, "{host}");
        assert!(
            matches!(f.gw.dns_allowed(host), DnsAnswer::Denied { .. }),
            "{host}"
        );
    }
    // Names with control bytes never reach a rule.
    let mut io = tunnel(&f.gw, "api.test\r\nHost: evil", port);
    let mut buf = [0u8; 1];
    assert_eq!(io.read(&mut buf).await.unwrap_or(0), 0);
    assert!(f.net.seen().is_empty());
}

/// Threat 1 (DNS exfiltration): DNS questions are answered from policy alone.
#[tokio::test]
async fn threat1_dns_answers_from_policy() {
    let f = fixture().await;
    assert_eq!(
        f.gw.dns_allowed("API.Test."),
        DnsAnswer::Allowed {
            name: HostName::parse("api.test").expect("name")
        }
    );
    assert!(matches!(
        f.gw.dns_allowed("c2VjcmV0.evil.test"),
        DnsAnswer::Denied { .. }
    ));
    assert!(matches!(
        f.gw.dns_allowed("api.test.evil.test"),
        DnsAnswer::Denied { .. }
    ));
    assert!(matches!(
        f.gw.dns_allowed("x.api.test"),
        DnsAnswer::Denied { .. }
    ));
    let recs: Vec<_> = records(&f)
        .into_iter()
        .filter(|r| r.event == AuditEvent::Dns)
        .collect();
    assert_eq!(recs.len(), 4);
    assert_eq!(
        recs.iter().filter(|r| r.decision == Verdict::Deny).count(),
        3
    );
}

// --- SSRF ----------------------------------------------------------------------------------

/// Threat 8 (SSRF): a name resolving (via the host's /etc/hosts) to loopback is refused unless
/// pinned; pinned names reach loopback (every other test relies on that).
#[tokio::test]
async fn threat8_unpinned_loopback_refused_pinned_allowed() {
    let f = fixture().await;
    let c = proxy_connect(&f.gw, &target("localhost", &f.net)).await;
    assert_eq!(c.status, StatusCode::FORBIDDEN, "{}", c.body);
    assert!(
        c.body.contains("forbidden addresses") && c.body.contains("loopback"),
        "{}",
        c.body
    );
    let c = proxy_connect(&f.gw, &target("echo.test", &f.net)).await;
    assert_eq!(c.status, StatusCode::OK);
    assert!(f.net.seen().is_empty());
}

struct FakeDns {
    answers: Vec<IpAddr>,
    calls: AtomicUsize,
}

impl Resolver for FakeDns {
    fn lookup<'a>(
        &'a self,
        _name: &'a HostName,
        _port: u16,
    ) -> BoxFuture<'a, std::io::Result<Vec<IpAddr>>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let a = self.answers.clone();
        Box::pin(async move { Ok(a) })
    }
}

/// Threat 8: metadata and private addresses in all forms are refused after one resolution;
/// the gateway never resolves twice (no rebinding window between check and connect).
#[tokio::test]
async fn threat8_resolved_forbidden_addresses_refused_once_resolved() {
    let net = Internet::start().await;
    let answers: Vec<IpAddr> = [
        "169.254.169.254",
        "fd00:ec2::254",
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "100.64.0.1",
        "0.0.0.0",
        "203.0.113.5",
    ]
    .iter()
    .map(|s| s.parse().expect("ip"))
    .collect();
    let dns = Arc::new(FakeDns {
        answers,
        calls: AtomicUsize::new(0),
    });
    let d2 = dns.clone();
    let f = Fixture::with_net(
        net,
        "allow = [\"metadata.google.internal\", \"evil-rebind.test\"]",
        &[],
        Limits::default(),
        move |cfg| cfg.resolver = d2,
    );
    for name in ["metadata.google.internal:80", "evil-rebind.test:443"] {
        let c = proxy_connect(&f.gw, name).await;
        assert_eq!(c.status, StatusCode::FORBIDDEN, "{name}");
        for class in [
            "link-local",
            "private",
            "shared address space",
            "unspecified",
            "documentation",
        ] {
            assert!(
                c.body.contains(class),
                "{name} body should list {class}: {}",
                c.body
            );
        }
    }
    assert_eq!(
        dns.calls.load(Ordering::SeqCst),
        2,
        "one lookup per connection"
    );
    // The host's own addresses are refused too.
    let net = Internet::start().await;
    let own: IpAddr = "198.51.100.77".parse().expect("ip");
    let dns = Arc::new(FakeDns {
        answers: vec!["93.184.216.34".parse().expect("ip")],
        calls: AtomicUsize::new(0),
    });
    let f = Fixture::with_net(
        net,
        "allow = [\"self.test\"]",
        &[],
        Limits::default(),
        move |cfg| {
            cfg.host_addrs = vec!["93.184.216.34".parse().expect("ip"), own];
            cfg.resolver = dns;
        },
    );
    let c = proxy_connect(&f.gw, "self.test:443").await;
    assert_eq!(c.status, StatusCode::FORBIDDEN);
    assert!(c.body.contains("host's own"), "{}", c.body);
}

// --- rules, interception, upstream verification --------------------------------------------

/// Threat 7 (broad hosts as exfiltration channels): method/path rules are enforced by
/// intercepting even hosts without secrets.
#[tokio::test]
async fn threat7_method_and_path_rules_enforced() {
    let policy = r#"
allow = [{ host = "echo.test", ports = [HTTPS_PORT], methods = ["GET"], paths = ["/repos/"] }]
resolve = ["echo.test:HTTPS_PORT:127.0.0.1"]
upstream_ca = ["CA_FILE"]
"#;
    let f = Fixture::new(policy, &[], Limits::default()).await;
    let ca = f.gw.ca_cert_pem();
    let io = open_tls(&f, "echo.test", &ca).await;
    let (status, _, _) = request(io, req("GET", "/repos/a/b", "echo.test", &[], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    for (method, path) in [
        ("POST", "/repos/a"),
        ("GET", "/gists/1"),
        ("GET", "/repos/../gists"),
    ] {
        let io = open_tls(&f, "echo.test", &ca).await;
        let (status, _, body) = request(io, req(method, path, "echo.test", &[], "x"))
            .await
            .expect("request");
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
        assert!(
            String::from_utf8_lossy(&body).starts_with("hutch: egress to echo.test:"),
            "{method} {path}"
        );
    }
    assert_eq!(f.net.seen().len(), 1);
}

/// Threat 13 (TLS interception pitfalls): upstream verification is always on, each sandbox has
/// its own CA, and upgrades other than WebSocket (h2c) are not carried on inspected connections.
#[tokio::test]
async fn threat13_upstream_verified_ca_per_sandbox_no_h2c_upgrade() {
    // A gateway that does not trust the internet's CA.
    let net = Internet::start().await;
    let policy = POLICY.replace("upstream_ca = [\"CA_FILE\"]", "");
    let f = Fixture::with_net(net, &policy, &env(), Limits::default(), |_| {});
    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let (status, _, body) = request(io, req("GET", "/", "api.test", &[], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        String::from_utf8_lossy(&body).contains("upstream TLS"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(f.net.seen().is_empty());

    let g = fixture().await;
    assert_ne!(g.gw.ca_cert_pem(), f.gw.ca_cert_pem());
    // Sandbox g's client cannot be intercepted with sandbox f's CA.
    let c = proxy_connect(&g.gw, &target("api.test", &g.net)).await;
    assert!(tls(c.io.expect("io"), "api.test", &f.gw.ca_cert_pem())
        .await
        .is_err());

    let io = open_tls(&g, "api.test", &g.gw.ca_cert_pem()).await;
    let (status, _, _) = request(
        io,
        req(
            "GET",
            "/ws",
            "api.test",
            &[("connection", "upgrade"), ("upgrade", "h2c")],
            "",
        ),
    )
    .await
    .expect("request");
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(g.net.seen().is_empty());
}

// --- exhaustion ----------------------------------------------------------------------------

/// Threat 16 (exhaustion): header and body caps answer 431 and 413.
#[tokio::test]
async fn threat16_header_and_body_caps() {
    let limits = Limits {
        max_header_bytes: 8 * 1024,
        max_body_bytes: 1024,
        ..Limits::default()
    };
    let f = Fixture::new(POLICY, &env(), limits).await;
    let huge = "a".repeat(16 * 1024);
    let port = f.net.http.port();
    let r = Request::builder()
        .uri(format!("http://plain.test:{port}/"))
        .header("host", format!("plain.test:{port}"))
        .header("x-big", huge.as_str())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let (status, _, _) = proxy_request(&f.gw, r).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let (status, _, _) = request(io, req("GET", "/", "api.test", &[("x-big", &huge)], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    let io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let (status, _, _) = request(io, req("POST", "/", "api.test", &[], &"b".repeat(4096)))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // A chunked body (no declared length) is cut at the cap and still answered with 413.
    let mut io = open_tls(&f, "api.test", &f.gw.ca_cert_pem()).await;
    let chunk = "c".repeat(4000);
    let raw = format!("POST /up HTTP/1.1\r\nhost: api.test\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n", chunk.len());
    io.write_all(raw.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 12];
    io.read_exact(&mut head).await.expect("status line");
    assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
    // in_body host buffers, also capped.
    let io = open_tls(&f, "other.test", &f.gw.ca_cert_pem()).await;
    let (status, _, _) = request(io, req("POST", "/", "other.test", &[], &"b".repeat(4096)))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        f.net.seen().iter().all(|s| s.body.len() <= 1024),
        "nothing over the cap reached the internet"
    );
}

/// Threat 16: the connection cap refuses extra connections fast (503 / closed) and audits them.
#[tokio::test]
async fn threat16_connection_cap() {
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let f = Fixture::new(POLICY, &env(), limits).await;
    let a = proxy_connect(&f.gw, &target("echo.test", &f.net)).await;
    let b = proxy_connect(&f.gw, &target("echo.test", &f.net)).await;
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    let c = proxy_connect(&f.gw, &target("echo.test", &f.net)).await;
    assert_eq!(c.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(c.body.contains("too many connections"));
    let mut t = tunnel(&f.gw, "echo.test", f.net.https.port());
    let mut buf = [0u8; 1];
    assert_eq!(t.read(&mut buf).await.unwrap_or(0), 0);
    assert_eq!(
        records(&f)
            .iter()
            .filter(|r| r
                .reason
                .as_deref()
                .is_some_and(|s| s.contains("connection limit")))
            .count(),
        2
    );
    // Closing one frees a slot.
    drop(a);
    let mut ok = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if proxy_connect(&f.gw, &target("echo.test", &f.net))
            .await
            .status
            == StatusCode::OK
        {
            ok = true;
            break;
        }
    }
    assert!(ok, "a slot is freed when a connection closes");
    drop(b);
}

/// Threat 16: the sandbox's byte budget cuts a large download off and is audited.
#[tokio::test]
async fn threat16_byte_budget() {
    let limits = Limits {
        max_total_bytes: 1 << 20,
        ..Limits::default()
    };
    let f = Fixture::new(POLICY, &env(), limits).await;
    let io = open_tls(&f, "echo.test", &f.net.ca_pem).await;
    let r = request(io, req("GET", "/big?bytes=8388608", "echo.test", &[], "")).await;
    assert!(r.is_err(), "download over budget must fail");
    let rec = wait_for(&f, |r| {
        r.event == AuditEvent::Connection && r.flags.iter().any(|x| x == "byte_budget_exhausted")
    })
    .await;
    assert!(rec.bytes_down <= 2 << 20, "{rec:?}");
    assert!(f.gw.bytes_used() >= 1 << 20);
}

/// Threat 16: a slowloris client that never finishes its headers is cut off.
#[tokio::test]
async fn threat16_slow_headers_cut_off() {
    let limits = Limits {
        handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let f = Fixture::new(POLICY, &env(), limits).await;
    let (mut client, server) = tokio::io::duplex(4096);
    let g = f.gw.clone();
    let served = tokio::spawn(async move { g.serve_proxy(server).await });
    client
        .write_all(b"GET http://plain.test/ HTTP/1.1\r\nHost: pla")
        .await
        .expect("write");
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("gateway gave up on the slow client")
        .expect("join");
}

/// Threat 16: one sandbox using up its connections does not affect another sandbox's gateway.
#[tokio::test]
async fn threat16_sandboxes_are_isolated() {
    let limits = Limits {
        max_connections: 1,
        ..Limits::default()
    };
    let busy = Fixture::new(POLICY, &env(), limits.clone()).await;
    let calm = Fixture::new(POLICY, &env(), limits).await;
    let held = proxy_connect(&busy.gw, &target("echo.test", &busy.net)).await;
    assert_eq!(held.status, StatusCode::OK);
    assert_eq!(
        proxy_connect(&busy.gw, &target("echo.test", &busy.net))
            .await
            .status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let io = open_tls(&calm, "echo.test", &calm.net.ca_pem).await;
    let (status, _, _) = request(io, req("GET", "/", "echo.test", &[], ""))
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK);
    drop(held);
}

// --- audit ---------------------------------------------------------------------------------

/// Threat 12 (secrets in logs): the audit file never contains a secret value.
#[tokio::test]
async fn threat12_audit_file_has_no_secret_values() {
    let net = Internet::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let sink = Arc::new(FileAuditSink::create(&path).expect("audit file"));
    let policy = policy_from(POLICY, &net);
    let secrets = policy
        .load_secrets_with(|v| {
            env()
                .iter()
                .find(|(k, _)| *k == v)
                .map(|(_, s)| s.to_string())
        })
        .expect("secrets");
    let mut cfg = GatewayConfig::new("audit-test", Arc::new(policy), secrets, sink);
    cfg.system_roots = false;
    let gw = Gateway::new(cfg).expect("gateway");
    let ph = gw.placeholders();
    let token_ph = &ph.iter().find(|(n, _)| n == "TOKEN").expect("ph").1;
    let port = net.https.port();
    for path in ["/reflect", &format!("/q?token={TOKEN}"), "/redirect"] {
        let c = proxy_connect(&gw, &format!("api.test:{port}")).await;
        let io = tls(c.io.expect("io"), "api.test", &gw.ca_cert_pem())
            .await
            .expect("tls");
        let _ = request(
            io,
            req("GET", path, "api.test", &[("authorization", token_ph)], ""),
        )
        .await
        .expect("request");
    }
    let c = proxy_connect(&gw, &format!("other.test:{port}")).await;
    let io = tls(c.io.expect("io"), "other.test", &gw.ca_cert_pem())
        .await
        .expect("tls");
    let _ = request(
        io,
        req(
            "POST",
            "/",
            "other.test",
            &[("authorization", token_ph)],
            OTHER,
        ),
    )
    .await
    .expect("request");
    let _ = proxy_connect(&gw, &format!("{TOKEN}.evil.test:443")).await;
    let _ = gw.dns_allowed(&format!("{OTHER}.evil.test"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&path).expect("read audit");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert!(lines.len() >= 8, "{text}");
    assert!(lines.iter().all(|l| l["sandbox"] == "audit-test"));
    // Values the sandbox itself put in names are its own data, not host secrets; but the
    // gateway's own records (requests with swapped secrets) must not carry values.
    let own: Vec<&str> = text.lines().filter(|l| !l.contains("evil.test")).collect();
    for l in &own {
        assert!(!l.contains(TOKEN), "audit line leaks TOKEN: {l}");
        assert!(!l.contains(OTHER), "audit line leaks OTHER: {l}");
    }
    assert!(text.contains("\"secrets\":[\"TOKEN\"]"), "{text}");
    assert!(net
        .seen()
        .iter()
        .any(|s| s.header("authorization") == Some(TOKEN)));
}
