//! `get_host(port)`: HTTP to a server listening inside a sandbox, at `/e2b-port/<id>/<port>/<path>` on the
//! daemon's listener. Each request opens a stream over the agent channel that the agent connects to the port on
//! the guest's loopback (the guest has no network device), and speaks HTTP/1.1 to it with hyper; bodies stream
//! both ways. Only the sandbox's owner (`X-API-Key` or `Authorization: Bearer`) or a holder of its traffic token
//! (`e2b-traffic-access-token`, from the create answer) gets through; anyone else sees E2B's 404.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
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
    let (port, rest) = rest.split_once('/').map(|(p, r)| (p, r)).unwrap_or((rest, ""));
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
    let live = authorize(&st, req.headers(), id)?;
    let stream = live.client.connect_port(port).await.map_err(|e| {
        E2bError::new(StatusCode::BAD_GATEWAY, format!("port {port} in sandbox {id} is not open: {}", hutch_sandbox::error_chain(&e)))
    })?;
    let (parts, body) = req.into_parts();
    let target = match parts.uri.query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
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
}
