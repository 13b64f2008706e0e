//! `get_host(port)`: HTTP to a server listening inside a sandbox, at `/e2b-port/<id>/<port>/<path>` on the
//! daemon's listener, or (with `hutch serve --e2b-domain DOMAIN`) at any path of a request whose Host is
//! `<port>-<id>.<DOMAIN>`, as the SDK's `get_host` names it; `49983-<id>.<DOMAIN>` is envd, served by the
//! daemon's own envd routes. Each request opens a stream over the agent channel that the agent connects to the port on
//! the guest's loopback (the guest has no network device), and speaks HTTP/1.1 to it with hyper; bodies stream
//! both ways. Only the sandbox's owner (`X-API-Key` or `Authorization: Bearer`) or a holder of its traffic token
//! (`e2b-traffic-access-token`, from the create answer) gets through; anyone else sees E2B's 404.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;

use super::{api_principal, owner_principal, E2bError, Shared};
use crate::manager::Live;

/// The path prefix of forwarded requests.
pub const PREFIX: &str = "/e2b-port/";
/// How long the guest server may take to answer with its response head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Headers that belong to one hop (or carry the daemon's credentials) and are not forwarded.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "host",
    "x-api-key",
    "authorization",
    "e2b-traffic-access-token",
];

fn eq_ct(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `<id>/<port>[/<rest>]` after the prefix.
fn split_target(path: &str) -> Result<(&str, u16, &str), E2bError> {
    let rest = path.strip_prefix(PREFIX).unwrap_or("");
    let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let (port, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let ok_id = id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !ok_id {
        return Err(E2bError::not_found("no such sandbox: use /e2b-port/<sandbox id>/<port>/<path>"));
    }
    let port: u16 = port.parse().ok().filter(|p| *p > 0).ok_or_else(|| E2bError::bad(format!("{:?} is not a TCP port (1-65535)", port.chars().take(8).collect::<String>())))?;
    Ok((id, port, rest))
}

/// The sandbox, if the caller is its owner or holds its traffic token; E2B's 404 otherwise.
fn authorize(st: &Shared, headers: &HeaderMap, id: &str) -> Result<Arc<Live>, E2bError> {
    let not_found = || E2bError::not_found(format!("sandbox {id} not found"));
    if let Some(tok) = headers.get("e2b-traffic-access-token").and_then(|v| v.to_str().ok()) {
        if !eq_ct(tok, &st.traffic_token(id)) {
            return Err(not_found());
        }
        let row = st.mgr.store.sandbox(id)?.ok_or_else(not_found)?;
        let who = owner_principal(st, &row.owner)?.ok_or_else(not_found)?;
        return st.mgr.running(&who, id).map_err(|_| not_found());
    }
    let who = api_principal(st, headers)?;
    st.mgr.running(&who, id).map_err(|_| not_found())
}

pub async fn forward(State(st): State<Shared>, req: Request) -> Result<Response, E2bError> {
    let path = req.uri().path().to_string();
    let (id, port, rest) = split_target(&path)?;
    let target = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    forward_to(&st, id, port, target, req).await
}

/// envd's port: a `49983-<id>.<domain>` host is the SDK reaching envd without `E2B_SANDBOX_URL`.
const ENVD_PORT: u16 = 49983;

/// `<port>-<id>` from a Host value under `domain` (a port after the name is ignored), if it is one.
fn host_target<'a>(host: &'a str, domain: &str) -> Option<Result<(&'a str, u16), E2bError>> {
    let name = match host.rsplit_once(':') {
        Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    let label = name.strip_suffix(domain)?.strip_suffix('.')?;
    let parsed = label.split_once('-').and_then(|(p, id)| {
        let port: u16 = p.parse().ok().filter(|p| *p > 0)?;
        let ok_id = id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        ok_id.then_some((id, port))
    });
    Some(parsed.ok_or_else(|| E2bError::not_found(format!("no sandbox port at this host: names under {domain} are <port>-<sandbox id>.{domain}"))))
}

/// The layer that wraps the daemon's router: a request for `<port>-<id>.<domain>` goes to that port in the
/// sandbox whatever its path (the sandbox's server owns every path there); envd's port and every other host go
/// on to the routes.
pub async fn by_host(State(st): State<Shared>, mut req: Request, next: Next) -> Response {
    let Some(domain) = st.mgr.e2b_domain() else { return next.run(req).await };
    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).or_else(|| req.uri().host()).map(str::to_ascii_lowercase);
    let Some(host) = host else { return next.run(req).await };
    let (id, port) = match host_target(&host, domain) {
        None => return next.run(req).await,
        Some(Err(e)) => return e.into_response(),
        Some(Ok(t)) => t,
    };
    if port == ENVD_PORT {
        // envd's routes find the sandbox by this header; the host names it already.
        if !req.headers().contains_key("e2b-sandbox-id") {
            if let Ok(v) = HeaderValue::from_str(id) {
                req.headers_mut().insert("e2b-sandbox-id", v);
            }
        }
        return next.run(req).await;
    }
    let target = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let id = id.to_string();
    match forward_to(&st, &id, port, target, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Forwards `req` to `port` in sandbox `id` as `target` (path and query), for its owner or traffic-token holder.
async fn forward_to(st: &Shared, id: &str, port: u16, target: String, req: Request) -> Result<Response, E2bError> {
    let live = authorize(st, req.headers(), id)?;
    let stream = live.client.connect_port(port).await.map_err(|e| {
        E2bError::new(StatusCode::BAD_GATEWAY, format!("port {port} in sandbox {id} is not open: {}", hutch_sandbox::error_chain(&e)))
    })?;
    let (parts, body) = req.into_parts();
    let uri: Uri = target.parse().map_err(|_| E2bError::bad("the forwarded path is not a valid request target"))?;
    let mut out = hyper::Request::builder().method(parts.method).uri(uri).version(hyper::Version::HTTP_11);
    for (k, v) in parts.headers.iter() {
        if !DROPPED.contains(&k.as_str()) {
            out = out.header(k, v);
        }
    }
    let host = HeaderValue::from_str(&format!("localhost:{port}")).map_err(|_| E2bError::bad("bad port"))?;
    let out = out.header(header::HOST, host).body(body).map_err(|e| E2bError::bad(format!("cannot forward the request: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| E2bError::new(StatusCode::BAD_GATEWAY, format!("port {port} in sandbox {id}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(out))
        .await
        .map_err(|_| E2bError::new(StatusCode::GATEWAY_TIMEOUT, format!("the server on port {port} did not answer within {HEAD_TIMEOUT:?}")))?
        .map_err(|e| E2bError::new(StatusCode::BAD_GATEWAY, format!("the server on port {port} in sandbox {id}: {e}")))?;
    let (mut parts, body) = resp.into_parts();
    for h in ["connection", "keep-alive", "transfer-encoding", "upgrade", "trailer"] {
        parts.headers.remove(h);
    }
    Ok(Response::from_parts(parts, Body::new(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(split_target("/e2b-port/0123456789ab/8000/a/b").unwrap(), ("0123456789ab", 8000, "a/b"));
        assert_eq!(split_target("/e2b-port/0123456789ab/80").unwrap(), ("0123456789ab", 80, ""));
        assert_eq!(split_target("/e2b-port/0123456789ab/0/").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(split_target("/e2b-port/0123456789ab/70000/").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert_eq!(split_target("/e2b-port/XYZ/80/").unwrap_err().status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn hosts_under_the_domain_name_sandbox_ports() {
        let d = "sbx.example.test";
        assert_eq!(host_target("8000-0123456789ab.sbx.example.test", d).unwrap().unwrap(), ("0123456789ab", 8000));
        assert_eq!(host_target("8000-0123456789ab.sbx.example.test:7707", d).unwrap().unwrap(), ("0123456789ab", 8000));
        assert_eq!(host_target("8000-0123456789ab.sbx.example.test.", d).unwrap().unwrap(), ("0123456789ab", 8000));
        assert!(host_target("sbx.example.test", d).is_none());
        assert!(host_target("127.0.0.1:7707", d).is_none());
        assert!(host_target("x8000-0123456789ab.evilsbx.example.test", d).is_none());
        assert_eq!(host_target("a.b.sbx.example.test", d).unwrap().unwrap_err().status, StatusCode::NOT_FOUND);
        assert!(host_target("0-0123456789ab.sbx.example.test", d).unwrap().is_err());
    }
}
