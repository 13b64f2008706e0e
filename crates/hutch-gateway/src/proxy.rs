//! The HTTP proxy face of the gateway: CONNECT tunnels and absolute-form `http://` requests
//! from programs in the sandbox that honour HTTP_PROXY/HTTPS_PROXY.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::audit::{AuditEvent, AuditRecord, Verdict, Via};
use crate::forward::{Forwarder, Upstream};
use crate::http::{empty, text, GwBody};
use crate::io::{Meter, Metered};
use crate::upstream::{Decided, Refusal};
use crate::{Inner, PhaseState};

/// A CONNECT that was answered 200, waiting for hyper to hand over the connection.
struct PendingTunnel {
    upgrade: OnUpgrade,
    decided: Decided,
    tcp: TcpStream,
    addr: SocketAddr,
}

pub(crate) async fn serve<S>(inner: Arc<Inner>, stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let meter = Meter::new(inner.budget.clone());
    let io = Metered::new(stream, meter.clone());
    // Every request on this connection is decided under the phase it was opened in, and the
    // connection closes when that phase ends.
    let phase = inner.current();
    let Some(_permit) = inner.try_slot(phase.phase, Via::Proxy) else {
        // Answer at once so the client fails fast instead of waiting for a timeout.
        let svc = service_fn(|_req: Request<Incoming>| async {
            Ok::<_, Infallible>(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "hutch: too many connections from this sandbox\n".into(),
            ))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .serve_connection(TokioIo::new(io), svc);
        let _ = tokio::time::timeout(inner.limits.handshake_timeout, conn).await;
        return;
    };
    let pending: Arc<Mutex<Option<PendingTunnel>>> = Arc::new(Mutex::new(None));
    let svc = {
        let inner = inner.clone();
        let pending = pending.clone();
        let phase = phase.clone();
        service_fn(move |req| {
            let inner = inner.clone();
            let pending = pending.clone();
            let phase = phase.clone();
            async move { Ok::<_, Infallible>(handle(inner, phase, req, pending).await) }
        })
    };
    let limits = &inner.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_header_size(limits.max_header_bytes);
    let conn = builder
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::select! {
        _ = conn => {}
        () = meter.idle(limits.idle_timeout) => return,
        () = phase.ended.cancelled() => return,
    }
    let tunnel = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(t) = tunnel {
        match t.upgrade.await {
            Ok(upgraded) => {
                crate::conn::carry(
                    inner.clone(),
                    TokioIo::new(upgraded),
                    t.decided,
                    t.tcp,
                    t.addr,
                    Via::Proxy,
                    meter,
                    phase,
                )
                .await;
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    }
}

async fn handle(
    inner: Arc<Inner>,
    phase: Arc<PhaseState>,
    mut req: Request<Incoming>,
    pending: Arc<Mutex<Option<PendingTunnel>>>,
) -> Response<GwBody> {
    if req.method() == Method::CONNECT {
        let Some(authority) = req.uri().authority().cloned() else {
            return text(
                StatusCode::BAD_REQUEST,
                "hutch: CONNECT needs a host:port target\n".into(),
            );
        };
        let port = authority.port_u16().unwrap_or(443);
        let host = authority.host().to_string();
        let (decided, tcp, addr) = match inner.decide_and_dial(&phase, &host, port).await {
            Ok(x) => x,
            Err(refusal) => {
                let mut rec = AuditRecord::new(
                    &inner.sandbox_id,
                    phase.phase,
                    AuditEvent::Connection,
                    Via::Proxy,
                    refusal.dest.clone(),
                    Verdict::Deny,
                );
                rec.method = Some("CONNECT".into());
                rec.status = Some(refusal.status.as_u16());
                rec.reason = Some(refusal.reason.clone());
                inner.auditor.emit(&rec);
                return text(refusal.status, refusal.message());
            }
        };
        let upgrade = hyper::upgrade::on(&mut req);
        *pending.lock().unwrap_or_else(|p| p.into_inner()) = Some(PendingTunnel {
            upgrade,
            decided,
            tcp,
            addr,
        });
        return Response::new(empty());
    }
    let uri = req.uri().clone();
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!(
                    "hutch: the proxy does not fetch {} URLs for clients; use CONNECT\n",
                    crate::audit::sanitize(uri.scheme_str().unwrap_or(""))
                ),
            )
        }
        None => {
            return text(
                StatusCode::BAD_REQUEST,
                "hutch: this is an HTTP proxy: send CONNECT or absolute-form http:// requests\n"
                    .into(),
            )
        }
    }
    let Some(authority) = uri.authority() else {
        return text(
            StatusCode::BAD_REQUEST,
            "hutch: request target has no host\n".into(),
        );
    };
    let port = authority.port_u16().unwrap_or(80);
    let host = authority.host().to_string();
    match inner.decide_and_dial(&phase, &host, port).await {
        Ok((decided, tcp, addr)) => {
            let fwd = Arc::new(Forwarder::new(
                inner.clone(),
                decided,
                Upstream::Plain,
                Via::Proxy,
                Some((tcp, addr)),
                phase.clone(),
            ));
            fwd.handle(req).await
        }
        Err(refusal) => request_refused(&inner, &phase, &req, refusal),
    }
}

fn request_refused(
    inner: &Inner,
    phase: &PhaseState,
    req: &Request<Incoming>,
    refusal: Refusal,
) -> Response<GwBody> {
    let mut rec = AuditRecord::new(
        &inner.sandbox_id,
        phase.phase,
        AuditEvent::Request,
        Via::Proxy,
        refusal.dest.clone(),
        Verdict::Deny,
    );
    rec.method = Some(crate::audit::sanitize(req.method().as_str()));
    rec.path = Some(crate::http::audit_path(req.uri(), true));
    rec.status = Some(refusal.status.as_u16());
    rec.reason = Some(refusal.reason.clone());
    inner.auditor.emit(&rec);
    text(refusal.status, refusal.message())
}
