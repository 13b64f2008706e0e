//! One allowed connection from the sandbox, after the destination was decided and dialed: look
//! at the first bytes, then carry it as checked TLS passthrough, intercepted TLS, parsed
//! plaintext HTTP, or (off ports 80 and 443) plain TCP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hutch_policy::HostName;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;

use crate::audit::{AuditEvent, AuditRecord, Mode, Verdict, Via};
use crate::forward::{Forwarder, Upstream};
use crate::io::{splice, Meter, Prefixed};
use crate::upstream::Decided;
use crate::{Inner, PhaseState};

/// Largest ClientHello (or HTTP request line prefix) the gateway will wait for.
const MAX_SNIFF: usize = 64 * 1024;

enum Sniffed {
    Tls {
        sni: Option<String>,
        buf: Vec<u8>,
    },
    Http {
        buf: Vec<u8>,
    },
    Other {
        buf: Vec<u8>,
    },
    /// Nothing sent yet on a port where the server may speak first.
    Silent,
    Closed,
    Bad(String),
}

/// `must_speak_web`: the destination is inspected, so only TLS or HTTP may pass, on any port; a
/// client that is slow to send its first bytes must not turn that into an unchecked TCP splice.
async fn sniff<S: AsyncRead + Unpin>(
    io: &mut S,
    port: u16,
    must_speak_web: bool,
    handshake: Duration,
) -> Sniffed {
    let deadline = Instant::now() + handshake;
    let web_port = port == 80 || port == 443 || must_speak_web;
    let first_wait = if web_port {
        handshake
    } else {
        handshake.min(Duration::from_millis(500))
    };
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    match tokio::time::timeout(first_wait, io.read(&mut chunk)).await {
        Err(_) if web_port => {
            return Sniffed::Bad(format!("no data within {}s", handshake.as_secs()))
        }
        Err(_) => return Sniffed::Silent,
        Ok(Ok(0)) => return Sniffed::Closed,
        Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        Ok(Err(e)) => return Sniffed::Bad(format!("read failed: {e}")),
    }
    if buf[0] == 0x16 {
        let mut acceptor = rustls::server::Acceptor::default();
        let mut fed = 0;
        loop {
            while fed < buf.len() {
                let mut rd = &buf[fed..];
                match acceptor.read_tls(&mut rd) {
                    Ok(0) => break,
                    Ok(n) => fed += n,
                    Err(e) => return Sniffed::Bad(format!("malformed TLS ClientHello: {e}")),
                }
                match acceptor.accept() {
                    Ok(Some(accepted)) => {
                        let sni = accepted.client_hello().server_name().map(str::to_string);
                        return Sniffed::Tls { sni, buf };
                    }
                    Ok(None) => {}
                    Err((e, _)) => return Sniffed::Bad(format!("malformed TLS ClientHello: {e}")),
                }
            }
            if buf.len() > MAX_SNIFF {
                return Sniffed::Bad("TLS ClientHello too large".into());
            }
            match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
                Err(_) => return Sniffed::Bad("TLS ClientHello not complete in time".into()),
                Ok(Ok(0)) => return Sniffed::Closed,
                Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Sniffed::Bad(format!("read failed: {e}")),
            }
        }
    }
    // An HTTP/1 request starts with an uppercase method token and a space.
    loop {
        let token_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
        if token_len > 0 && buf.get(token_len) == Some(&b' ') {
            return Sniffed::Http { buf };
        }
        if token_len < buf.len() || token_len > 20 {
            return Sniffed::Other { buf };
        }
        match tokio::time::timeout_at(deadline, io.read(&mut chunk)).await {
            Err(_) => return Sniffed::Other { buf },
            Ok(Ok(0)) => return Sniffed::Other { buf },
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Sniffed::Bad(format!("read failed: {e}")),
        }
    }
}

/// Carries one allowed connection and writes its audit line. `io` is already metered. The
/// connection closes when `phase`, which it was decided under, ends.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn carry<S>(
    inner: Arc<Inner>,
    mut io: S,
    decided: Decided,
    tcp: TcpStream,
    addr: SocketAddr,
    via: Via,
    meter: Arc<Meter>,
    phase: Arc<PhaseState>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut rec = AuditRecord::new(
        &inner.sandbox_id,
        phase.phase,
        AuditEvent::Connection,
        via,
        decided.dest(),
        Verdict::Allow,
    );
    rec.addr = Some(addr);
    rec.rule = Some(decided.rule.to_string());
    let limits = inner.limits.clone();
    let inspect = inner.must_intercept(&phase, &decided);
    let work = async {
        match sniff(&mut io, decided.port, inspect, limits.handshake_timeout).await {
            Sniffed::Tls { sni, buf } => match check_sni(sni.as_deref(), &decided.name) {
                Err(reason) => deny(&mut rec, reason),
                Ok(()) if inspect => {
                    rec.mode = Some(Mode::TlsIntercept);
                    intercept(
                        inner.clone(),
                        Prefixed::new(buf, io),
                        decided,
                        tcp,
                        addr,
                        via,
                        meter.clone(),
                        phase.clone(),
                    )
                    .await
                }
                Ok(()) => {
                    rec.mode = Some(Mode::TlsPassthrough);
                    let mut tcp = tcp;
                    splice(&mut io, &mut tcp, &buf, &meter, limits.idle_timeout)
                        .await
                        .map_err(|e| e.to_string())
                }
            },
            Sniffed::Http { buf } => {
                rec.mode = Some(Mode::Http);
                let fwd = Arc::new(Forwarder::new(
                    inner.clone(),
                    decided,
                    Upstream::Plain,
                    via,
                    Some((tcp, addr)),
                    phase.clone(),
                )
                .with_upgrades());
                serve_http(&inner, Prefixed::new(buf, io), fwd, &meter).await
            }
            sniffed @ (Sniffed::Other { .. } | Sniffed::Silent) => {
                let buf = match sniffed {
                    Sniffed::Other { buf } => buf,
                    _ => Vec::new(),
                };
                if decided.port == 443 || decided.port == 80 {
                    deny(
                        &mut rec,
                        format!("traffic on port {} is neither TLS nor HTTP", decided.port),
                    )
                } else if decided.rule.restricts_requests() {
                    deny(&mut rec, "the allow rule limits methods or paths, but the traffic is neither TLS nor HTTP".into())
                } else if inspect {
                    deny(
                        &mut rec,
                        "this host is inspected (secrets or --inspect-all), but the traffic is neither TLS nor HTTP"
                            .into(),
                    )
                } else {
                    rec.mode = Some(Mode::Tcp);
                    let mut tcp = tcp;
                    splice(&mut io, &mut tcp, &buf, &meter, limits.idle_timeout)
                        .await
                        .map_err(|e| e.to_string())
                }
            }
            Sniffed::Closed => Ok(()),
            Sniffed::Bad(reason) => deny(&mut rec, reason),
        }
    };
    // Dropping `work` closes both sides of the connection.
    let (result, cut): (Result<(), String>, bool) = tokio::select! {
        r = work => (r, false),
        () = phase.ended.cancelled() => (Err(format!("closed: the {} phase ended", phase.phase)), true),
    };
    if let Err(e) = result {
        if rec.decision == Verdict::Allow {
            rec.reason = Some(e);
        }
    }
    if cut {
        rec.flags.push("phase_ended".into());
    }
    if meter
        .budget_exhausted
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        rec.flags.push("byte_budget_exhausted".into());
    }
    rec.bytes_up = meter.up();
    rec.bytes_down = meter.down();
    inner.auditor.emit(&rec);
}

fn deny(rec: &mut AuditRecord, reason: String) -> Result<(), String> {
    rec.decision = Verdict::Deny;
    rec.reason = Some(reason);
    Ok(())
}

/// The ClientHello must name exactly the destination that was decided on.
fn check_sni(sni: Option<&str>, name: &HostName) -> Result<(), String> {
    let Some(sni) = sni else {
        return Err(format!(
            "TLS ClientHello has no server name; expected {name}"
        ));
    };
    match HostName::parse(sni) {
        Ok(n) if &n == name => Ok(()),
        _ => Err(format!(
            "TLS server name {} does not match destination {name}",
            crate::audit::sanitize(sni)
        )),
    }
}

#[allow(clippy::too_many_arguments)]
async fn intercept<S>(
    inner: Arc<Inner>,
    io: Prefixed<S>,
    decided: Decided,
    tcp: TcpStream,
    addr: SocketAddr,
    via: Via,
    meter: Arc<Meter>,
    phase: Arc<PhaseState>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let base = inner
        .ca
        .server_config(&decided.name)
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + inner.limits.handshake_timeout;
    let start = tokio::time::timeout_at(
        deadline,
        LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io),
    )
    .await
    .map_err(|_| "TLS handshake with the sandbox timed out".to_string())?
    .map_err(|e| format!("TLS handshake with the sandbox failed: {e}"))?;
    let (vm_h2, vm_h1) = {
        let hello = start.client_hello();
        let offered: Vec<&[u8]> = hello.alpn().map(|a| a.collect()).unwrap_or_default();
        (
            offered.contains(&&b"h2"[..]),
            offered.is_empty() || offered.contains(&&b"http/1.1"[..]),
        )
    };
    // HTTP/2 is offered to the sandbox when the upstream chose it (asked with the sandbox's own
    // offer, before the sandbox's handshake ends), or when the sandbox speaks nothing else; each
    // request is then forwarded as HTTP/2 or HTTP/1.1, whichever the upstream speaks.
    let mut upstream = None;
    let mut first = Some((tcp, addr));
    if vm_h2 {
        if let Some((tcp, _)) = first.take() {
            match phase
                .upstream_tls
                .connect(&decided.name, tcp, inner.limits.connect_timeout, true)
                .await
            {
                Ok(t) => upstream = Some(t),
                // The first request reports it (502) after a fresh attempt.
                Err(e) => tracing::debug!(error = %e, "upstream TLS failed before the sandbox's handshake"),
            }
        }
    }
    let up_h2 = upstream
        .as_ref()
        .is_some_and(|t| t.get_ref().1.alpn_protocol() == Some(b"h2"));
    let cfg = if vm_h2 && (up_h2 || !vm_h1) {
        let mut c = (*base).clone();
        c.alpn_protocols = if vm_h1 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"h2".to_vec()]
        };
        Arc::new(c)
    } else {
        base
    };
    let tls = tokio::time::timeout_at(deadline, start.into_stream(cfg))
        .await
        .map_err(|_| "TLS handshake with the sandbox timed out".to_string())?
        .map_err(|e| format!("TLS handshake with the sandbox failed: {e}"))?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let mut fwd = Forwarder::new(inner.clone(), decided, Upstream::Tls, via, first, phase);
    if let Some(t) = upstream {
        fwd = fwd.with_upstream_tls(t, vm_h2);
    }
    if h2 {
        return serve_h2(&inner, tls, Arc::new(fwd), &meter).await;
    }
    serve_http(&inner, tls, Arc::new(fwd.with_upgrades()), &meter).await
}

/// Serves HTTP/2 from the sandbox on `io`: each stream is a request forwarded (and decided) on
/// its own, concurrently.
async fn serve_h2<S>(inner: &Inner, io: S, fwd: Arc<Forwarder>, meter: &Meter) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let fwd = fwd.clone();
        let req = req.map(crate::forward::Drained::new);
        async move { Ok::<_, Infallible>(fwd.handle(req).await) }
    });
    let limits = &inner.limits;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(MAX_H2_STREAMS);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        r = conn => r.map_err(|e| e.to_string()),
        () = meter.idle(limits.idle_timeout) => Err("idle timeout".into()),
    }
}

/// Requests one sandbox HTTP/2 connection may have in flight at once.
const MAX_H2_STREAMS: u32 = 100;

/// Serves HTTP/1.1 from the sandbox on `io`, one forwarded request at a time.
async fn serve_http<S>(
    inner: &Inner,
    io: S,
    fwd: Arc<Forwarder>,
    meter: &Meter,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = {
        let fwd = fwd.clone();
        service_fn(move |req| {
            let fwd = fwd.clone();
            async move { Ok::<_, Infallible>(fwd.handle(req).await) }
        })
    };
    let limits = &inner.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_header_size(limits.max_header_bytes);
    let conn = builder.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::select! {
        r = conn => r.map_err(|e| e.to_string())?,
        () = meter.idle(limits.idle_timeout) => return Err("idle timeout".into()),
    }
    // A switched WebSocket goes on here, so the phase's end and the idle watch still close it.
    let Some(pending) = fwd.take_upgrade() else {
        return Ok(());
    };
    tokio::select! {
        r = crate::ws::relay(inner, pending) => r,
        () = meter.idle(limits.idle_timeout) => Err("idle timeout".into()),
    }
}
