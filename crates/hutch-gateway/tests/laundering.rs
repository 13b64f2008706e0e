//! Secret laundering through the hosts a run can reach (threats.md classes 17, 6, 5 and 19),
//! against the test net's laundering routes (hutch-testnet: encoded reflections, the status line,
//! header names, a store served back in `Range` pieces to any of its names). The VM side is
//! driven over in-memory streams; TLS and the servers are real.

mod common;

use std::sync::Arc;

use base64::Engine;
use common::{proxy_connect, tls, tunnel};
use hutch_gateway::{AuditRecord, Gateway, GatewayConfig, MemoryAuditSink, Mode};
use hutch_policy::CheckedPolicy;
use hutch_testnet::TestNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The real values; 28 characters, mixed case, so each encoding is distinct.
const KEY: &str = "sk-KeyReal-0123456789abcdefZZ";
const STORED: &str = "st-StoredReal-9876543210wxyzQ";

const API: &str = "api.example.test";
const MIRROR: &str = "mirror.example.test";
const RULED: &str = "ruled.example.test";

struct Fx {
    net: TestNet,
    gw: Gateway,
    audit: Arc<MemoryAuditSink>,
}

/// KEY: header `x-token` on api (header only, the default). STORED: swapped in bodies under
/// `/store/` on api (opted in). mirror answers from the same servers (shares the store) and
/// carries no secret. ruled allows GET under `/ok/` only.
fn fixture(inspect_all: bool) -> Fx {
    fixture_with(inspect_all, |_| {})
}

fn fixture_with(inspect_all: bool, limits: impl FnOnce(&mut hutch_gateway::Limits)) -> Fx {
    let net = TestNet::start().expect("testnet");
    let (p, hp) = (net.https_port(), net.http_port());
    let text = format!(
        r#"
inspect_all = {inspect_all}
allow = ["{API}:{p}", "{API}:{hp}", "{MIRROR}:{p}", "{MIRROR}:{hp}",
         {{ host = "{RULED}", ports = [{p}], methods = ["GET"], paths = ["/ok/"] }}]
resolve = ["{API}:{p}:127.0.0.1", "{API}:{hp}:127.0.0.1", "{MIRROR}:{p}:127.0.0.1", "{MIRROR}:{hp}:127.0.0.1", "{RULED}:{p}:127.0.0.1"]
upstream_ca = ["{ca}"]
[secrets.KEY]
hosts = ["{API}"]
header = "x-token"
[secrets.STORED]
hosts = ["{API}:{p}/store/"]
in_body = true
"#,
        ca = net.ca_file().display()
    );
    let policy = CheckedPolicy::from_toml_str(&text, std::path::Path::new("laundering.toml"))
        .expect("policy");
    let secrets = policy
        .load_secrets_with(|v| match v {
            "KEY" => Some(KEY.into()),
            "STORED" => Some(STORED.into()),
            _ => None,
        })
        .expect("secrets");
    let audit = Arc::new(MemoryAuditSink::new());
    let mut cfg = GatewayConfig::new("laundering", Arc::new(policy), secrets, audit.clone());
    cfg.system_roots = false;
    limits(&mut cfg.limits);
    let gw = Gateway::new(cfg).expect("gateway");
    Fx { net, gw, audit }
}

impl Fx {
    fn placeholder(&self, name: &str) -> String {
        self.gw
            .placeholders()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .expect("placeholder")
    }

    /// One raw HTTP/1.1 exchange with `name` over TLS through CONNECT, trusting `ca`; returns the
    /// whole response as the sandbox got it (status line, headers, body).
    async fn https(&self, name: &str, ca: &str, head: &str, body: &str) -> String {
        let c = proxy_connect(&self.gw, &format!("{name}:{}", self.net.https_port())).await;
        let io = c.io.unwrap_or_else(|| panic!("CONNECT {name}: {}", c.body));
        match tls(io, name, ca).await {
            Ok(t) => exchange(t, name, head, body).await,
            Err(e) => format!("TLS FAILED: {e}"),
        }
    }

    /// The same over the transparent plain-HTTP path.
    async fn http(&self, name: &str, head: &str) -> String {
        let io = tunnel(&self.gw, name, self.net.http_port());
        exchange(io, name, head, "").await
    }

    fn ca(&self) -> String {
        self.gw.ca_cert_pem()
    }

    /// The audit record of the newest request whose path starts with `path`.
    async fn rec(&self, path: &str) -> AuditRecord {
        self.rec_since(0, path).await
    }

    /// Like `rec`, among the records after the first `skip`.
    async fn rec_since(&self, skip: usize, path: &str) -> AuditRecord {
        for _ in 0..200 {
            if let Some(r) = self
                .audit
                .records()
                .into_iter()
                .skip(skip)
                .rev()
                .find(|r| r.path.as_deref().is_some_and(|p| p.starts_with(path)))
            {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no audit record for {path}: {:#?}", self.audit.records());
    }

    fn flagged(rec: &AuditRecord, flag: &str) {
        assert!(rec.flags.iter().any(|f| f == flag), "{flag} not in {:?}", rec.flags);
    }
}

/// `head` is the request line and extra header lines, e.g. "GET /x HTTP/1.1\r\nx-a: b".
async fn exchange<S>(mut io: S, host: &str, head: &str, body: &str) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let req = format!(
        "{head}\r\nhost: {host}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    io.write_all(req.as_bytes()).await.expect("write request");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), io.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn body_of(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("")
}

/// Every way a client could read `KEY` back out of `text`, decoded.
fn leaks(text: &str, value: &str) -> bool {
    let mut forms: Vec<Vec<u8>> = vec![text.as_bytes().to_vec()];
    let engines = [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    for skip in 0..4 {
        let t = text.get(skip..).unwrap_or("").trim_end_matches('=');
        let t = &t[..t.len() / 4 * 4];
        for e in &engines {
            if let Ok(d) = e.decode(t) {
                forms.push(d);
            }
        }
    }
    for t in [text.to_string(), text.to_ascii_lowercase()] {
        if let Ok(d) = hex::decode(t.trim()) {
            forms.push(d);
        }
    }
    let unescaped = text.replace("\\u00", "%");
    let mut pct = Vec::new();
    let b = unescaped.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok())) {
            (b'%', Some(v)) => {
                pct.push(v);
                i += 3;
            }
            (c, _) => {
                pct.push(c);
                i += 1;
            }
        }
    }
    forms.push(pct);
    // Half the value is enough to count as a leak.
    let half = &value.as_bytes()[value.len() / 4..value.len() / 4 + value.len() / 2];
    forms
        .iter()
        .any(|f| f.windows(half.len()).any(|w| w.eq_ignore_ascii_case(half)))
}

/// Class 17 (encoded reflection): a bound host that reflects the swapped header back base64-,
/// URL-safe-base64- (each alignment), hex-, percent- or JSON-escaped, in the status line's
/// reason phrase or as a header name hands the sandbox nothing it can decode the value from; each
/// masking is audited with its encoding; a gzip body sent against `Accept-Encoding: identity`
/// is refused.
#[tokio::test]
async fn class_17_encoded_reflections_are_masked_and_audited_with_their_encoding() {
    let f = fixture(false);
    let ph = f.placeholder("KEY");
    let ca = f.ca();
    let cases: &[(&str, usize, &str)] = &[
        ("base64", 0, "base64"),
        ("base64", 1, "base64"),
        ("base64", 2, "base64"),
        ("base64url", 0, "base64"),
        ("base64url", 1, "base64"),
        ("base64url", 2, "base64"),
        ("hex", 0, "hex"),
        ("HEX", 3, "hex"),
        ("percent", 0, "escaped"),
        ("json", 0, "escaped"),
    ];
    for (enc, pad, audited) in cases {
        let path = format!("/reflect-enc/{enc}/x-token?pad={pad}");
        let mark = f.audit.records().len();
        let resp = f
            .https(API, &ca, &format!("GET {path} HTTP/1.1\r\nx-token: {ph}"), "")
            .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{enc}/{pad}: {resp}");
        assert!(!leaks(body_of(&resp), KEY), "{enc} pad {pad} leaks the value: {resp}");
        let rec = f.rec_since(mark, &format!("/reflect-enc/{enc}/x-token")).await;
        assert!(
            rec.flags.iter().any(|x| x.starts_with(&format!("masked_in_response:KEY:{audited}"))),
            "{enc}/{pad}: {:?}",
            rec.flags
        );
        // The upstream really got the value: the masking is what kept it from the sandbox.
        let seen = f.net.requests_to(&format!("/reflect-enc/{enc}/"));
        assert!(seen.iter().all(|s| s.header("x-token") == Some(KEY)));
    }

    let resp = f
        .https(API, &ca, &format!("GET /reflect-status/x-token HTTP/1.1\r\nx-token: {ph}"), "")
        .await;
    let status_line = resp.lines().next().unwrap_or("");
    assert_eq!(status_line, "HTTP/1.1 200 OK", "{resp}");
    assert!(!leaks(&resp, KEY), "{resp}");
    Fx::flagged(&f.rec("/reflect-status/").await, "masked_in_status_line:KEY:literal");

    let resp = f
        .https(API, &ca, &format!("GET /reflect-name/x-token HTTP/1.1\r\nx-token: {ph}"), "")
        .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(!leaks(&resp, KEY), "{resp}");
    Fx::flagged(&f.rec("/reflect-name/").await, "masked_in_header_name:KEY:literal");

    // Compressed against `identity`: decoded, masked, sent identity-encoded (see the class 17
    // compressed test below for every coding).
    let resp = f
        .https(API, &ca, &format!("GET /reflect-enc/gzip/x-token HTTP/1.1\r\nx-token: {ph}\r\naccept-encoding: gzip"), "")
        .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(!leaks(body_of(&resp), KEY), "{resp}");
    let sent = f.net.requests_to("/reflect-enc/gzip/");
    assert_eq!(
        sent[0].header("accept-encoding"),
        Some("identity"),
        "the gateway asks for identity whatever the client accepts"
    );
}

/// Class 17 (compressed reflection): a bound host that answers gzip, deflate, br or zstd although
/// the gateway asked for identity has its body decoded (bounded), masked and sent to the sandbox
/// identity-encoded with a true length; the audit names the value's form and the coding. A body
/// that decodes past the cap is refused as a decompression bomb, with that reason in the audit.
#[tokio::test]
async fn class_17_compressed_reflections_are_decoded_masked_and_bombs_refused() {
    let f = fixture_with(false, |l| l.max_decoded_bytes = 2 << 20);
    let ph = f.placeholder("KEY");
    let ca = f.ca();
    for enc in ["gzip", "deflate", "br", "zstd"] {
        let mark = f.audit.records().len();
        let path = format!("/reflect-enc/{enc}/x-token");
        let resp = f
            .https(API, &ca, &format!("GET {path} HTTP/1.1\r\nx-token: {ph}\r\naccept-encoding: {enc}"), "")
            .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{enc}: {resp}");
        let (head, body) = resp.split_once("\r\n\r\n").unwrap_or(("", ""));
        let head = head.to_ascii_lowercase();
        assert!(!head.contains("content-encoding"), "{enc}: sent identity: {resp}");
        assert!(head.contains(&format!("content-length: {}", body.len())), "{enc}: {resp}");
        assert!(!leaks(body, KEY), "{enc} leaks the value: {resp}");
        assert!(body.contains(&ph) && body.ends_with("-tail"), "{enc}: masked, readable: {body}");
        let rec = f.rec_since(mark, &path).await;
        Fx::flagged(&rec, &format!("masked_in_response:KEY:literal+{enc}"));
        Fx::flagged(&rec, &format!("decoded:{enc}"));
        let seen = f.net.requests_to(&path);
        assert!(seen.iter().all(|s| s.header("x-token") == Some(KEY)));
    }
    for enc in ["gzip", "deflate", "br", "zstd"] {
        let mark = f.audit.records().len();
        let path = format!("/bomb/{enc}/64");
        let resp = f.https(API, &ca, &format!("GET {path} HTTP/1.1\r\nx-token: {ph}"), "").await;
        assert!(resp.starts_with("HTTP/1.1 502"), "{enc}: {}", &resp[..resp.len().min(300)]);
        assert!(resp.contains("decompression bomb"), "{enc}: {resp}");
        let rec = f.rec_since(mark, &path).await;
        Fx::flagged(&rec, "decompression_bomb");
        assert!(rec.reason.as_deref().is_some_and(|r| r.contains("decodes to more than 2097152 bytes")), "{rec:?}");
    }
    // A host without secrets is not inspected: its compressed bodies pass untouched.
    let resp = f.https(MIRROR, &f.net.ca_pem().to_string(), "GET /bomb/gzip/1 HTTP/1.1", "").await;
    assert!(resp.to_ascii_lowercase().contains("content-encoding: gzip"), "{}", &resp[..resp.len().min(300)]);
}

/// Class 17 (stored, then read back): a value swapped into a body (opted in for `/store/` only)
/// and stored on the bound host comes back masked over TLS and over plain HTTP to the same host;
/// `Range` requests that would read it in pieces too short to mask are refused. With
/// inspect-all, another allowed name that shares the storage is masked and range-refused too.
#[tokio::test]
async fn class_17_stored_values_come_back_masked_and_ranges_are_refused() {
    let f = fixture(true);
    let ph = f.placeholder("STORED");
    let ca = f.ca();
    let resp = f
        .https(API, &ca, "POST /store/k1 HTTP/1.1", &format!("data={ph};"))
        .await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    assert!(
        f.net.requests_to("/store/k1")[0].body.contains(STORED),
        "the swap reached the store"
    );
    let resp = f.https(API, &ca, "GET /store/k1 HTTP/1.1", "").await;
    assert!(resp.starts_with("HTTP/1.1 200") && body_of(&resp).contains(&ph), "{resp}");
    assert!(!leaks(&resp, STORED));
    let resp = f.http(API, "GET /store/k1 HTTP/1.1").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(!leaks(&resp, STORED), "plain HTTP to the same host: {resp}");
    let resp = f.https(MIRROR, &ca, "GET /store/k1 HTTP/1.1", "").await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(!leaks(&resp, STORED), "another name sharing the store: {resp}");
    let rec = f.rec("/store/k1").await;
    assert_eq!(rec.mode, Some(Mode::TlsIntercept));

    let ranges_before = f.net.requests().len();
    for (name, range) in [(API, "bytes=5-9"), (API, "bytes=0-3"), (MIRROR, "bytes=10-14")] {
        let resp = f
            .https(name, &ca, &format!("GET /store/k1 HTTP/1.1\r\nrange: {range}"), "")
            .await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{name} {range}: {resp}");
        assert!(resp.contains("Range requests are refused"), "{resp}");
    }
    let resp = f.http(API, "GET /store/k1 HTTP/1.1\r\nrange: bytes=5-9").await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert_eq!(f.net.requests().len(), ranges_before, "no range request reached the store");

    // Outside its `/store/` scope the body placeholder is not swapped, only flagged.
    let resp = f
        .https(API, &ca, "POST /other HTTP/1.1", &format!("data={ph}"))
        .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(f.net.requests_to("/other")[0].body.contains(&ph));
    Fx::flagged(&f.rec("/other").await, "placeholder_out_of_scope:STORED");
}

/// Class 17 (injection only where the binding says): a header-only secret is swapped in its one
/// header and nowhere else: not in another header, the query or the body, each flagged.
#[tokio::test]
async fn class_17_header_only_by_default() {
    let f = fixture(false);
    let ph = f.placeholder("KEY");
    let ca = f.ca();
    let resp = f
        .https(
            API,
            &ca,
            &format!("POST /h1?q={ph} HTTP/1.1\r\nx-token: {ph}\r\nx-other: {ph}"),
            &format!("body={ph}"),
        )
        .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = &f.net.requests_to("/h1")[0];
    assert_eq!(seen.header("x-token"), Some(KEY), "its header is swapped");
    assert_eq!(seen.header("x-other"), Some(ph.as_str()));
    assert!(seen.path.contains(&ph) && seen.body.contains(&ph));
    assert!(!seen.path.contains(KEY) && !seen.body.contains(KEY));
    let rec = f.rec("/h1").await;
    assert_eq!(rec.secrets, vec!["KEY".to_string()]);
    for flag in [
        "placeholder_in_header_not_swapped:KEY",
        "placeholder_in_url_not_swapped:KEY",
        "placeholder_in_body_not_swapped:KEY",
    ] {
        Fx::flagged(&rec, flag);
    }
}

/// Class 6 and 7/9 (placeholders sent to hosts passed through): with inspect-all, a placeholder
/// sent to an allowed host without secrets is seen and flagged, in a header and in a streamed
/// body; without it the connection is passed through and the README says it is not seen.
#[tokio::test]
async fn class_6_inspect_all_flags_placeholders_sent_anywhere() {
    let f = fixture(true);
    let ph = f.placeholder("KEY");
    let resp = f
        .https(
            MIRROR,
            &f.ca(),
            &format!("POST /leak HTTP/1.1\r\nauthorization: Bearer {ph}"),
            &format!("{}{ph}{}", "a".repeat(70_000), "b".repeat(10)),
        )
        .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let rec = f.rec("/leak").await;
    assert_eq!(rec.mode, Some(Mode::TlsIntercept));
    Fx::flagged(&rec, "possible_exfiltration:KEY");
    assert!(f.net.requests_to("/leak")[0].contains(&ph), "sent as it is");

    let off = fixture(false);
    let resp = off
        .https(MIRROR, off.net.ca_pem(), "GET /passed HTTP/1.1", "")
        .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "passed through with the real certificate: {resp}");
}

/// Class 5 (domain fronting) with inspect-all: SNI and CONNECT name an allowed host, Host names
/// another (allowed or not): refused with 421 before anything is sent upstream. Class 13: the
/// sandbox CA then covers every allowed name, still no other.
#[tokio::test]
async fn class_5_inspect_all_requires_sni_equal_to_host() {
    let f = fixture(true);
    let before = f.net.requests().len();
    let c = proxy_connect(&f.gw, &format!("{MIRROR}:{}", f.net.https_port())).await;
    let io = tls(c.io.expect("tunnel"), MIRROR, &f.ca()).await.expect("tls");
    let resp = exchange(io, API, "GET /fronted HTTP/1.1", "").await;
    assert!(resp.starts_with("HTTP/1.1 421"), "{resp}");
    let c = proxy_connect(&f.gw, &format!("{MIRROR}:{}", f.net.https_port())).await;
    let io = tls(c.io.expect("tunnel"), MIRROR, &f.ca()).await.expect("tls");
    let resp = exchange(io, "denied.example.test", "GET /fronted HTTP/1.1", "").await;
    assert!(resp.starts_with("HTTP/1.1 421"), "{resp}");
    assert_eq!(f.net.requests().len(), before, "nothing fronted reached the net");
    let c = proxy_connect(&f.gw, &format!("{MIRROR}:{}", f.net.https_port())).await;
    let err = tls(c.io.expect("tunnel"), "denied.example.test", &f.ca()).await;
    assert!(err.is_err(), "SNI other than the CONNECT name is refused");
}

/// Class 19 (request-semantics bypasses): on a GET-only, `/ok/`-only rule, method-override
/// headers and `_method` parameters are refused, and `;` parameters in dot segments do not climb
/// out of the prefix; an ordinary request under the prefix passes.
#[tokio::test]
async fn class_19_method_overrides_and_semicolon_dot_segments_are_refused() {
    let f = fixture(false);
    let ca = f.ca();
    let ok = f.https(RULED, &ca, "GET /ok/fine HTTP/1.1", "").await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    for head in [
        "GET /ok/x HTTP/1.1\r\nX-HTTP-Method-Override: DELETE",
        "GET /ok/x HTTP/1.1\r\nX-HTTP-Method: DELETE",
        "GET /ok/x HTTP/1.1\r\nX-Method-Override: PUT",
        "GET /ok/x?_method=DELETE HTTP/1.1",
        "GET /ok/x?%5Fmethod=DELETE HTTP/1.1",
        "GET /ok/..;/secret HTTP/1.1",
        "GET /ok/..;jsessionid=1/secret HTTP/1.1",
        "GET /ok/%2e%2e;/secret HTTP/1.1",
        "GET /ok/..%3B/secret HTTP/1.1",
        "GET /ok;x/../secret HTTP/1.1",
    ] {
        let resp = f.https(RULED, &ca, head, "").await;
        assert!(resp.starts_with("HTTP/1.1 403"), "{head}: {resp}");
    }
    let paths: Vec<String> = f.net.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(paths, vec!["/ok/fine".to_string()], "only the plain request got through");
}
