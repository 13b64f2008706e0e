//! Listening: plain HTTP on loopback, HTTPS (rustls) anywhere else, HTTP/1.1 with upgrades (WebSocket) and
//! HTTP/2, and graceful shutdown (stop accepting, let requests finish, bounded). Connections are held to
//! [`ConnLimits`]: a client without a token cannot exhaust them, because a connection that has not carried an
//! authenticated request is closed when idle for a few seconds, and is the first to go (oldest first, per client
//! address and overall) when a new connection needs its place. Request bodies must keep moving.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::DaemonError;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7707";
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How many connections the daemon holds, and for how long it waits on a client.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one client address that have not carried an authenticated request.
    pub per_address: usize,
    /// How long a connection without an authenticated request may sit without a request in progress (a request
    /// whose headers are still arriving counts as none).
    pub unauthenticated_idle: Duration,
    /// How long an authenticated connection may sit with no request in progress.
    pub idle: Duration,
    /// Longest wait for the next piece of a request body.
    pub body: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 1024,
            per_address: 64,
            unauthenticated_idle: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            body: Duration::from_secs(30),
        }
    }
}

/// One open connection, as the request handlers see it (a request extension).
#[derive(Debug)]
pub struct ConnState {
    id: u64,
    addr: IpAddr,
    authenticated: AtomicBool,
    in_flight: AtomicUsize,
    last_active: Mutex<Instant>,
    close: CancellationToken,
}

impl ConnState {
    /// Called once a request on this connection carried a valid token: from then on the connection is not
    /// evicted for newcomers and gets the longer idle timeout.
    pub fn mark_authenticated(&self) {
        self.authenticated.store(true, Ordering::SeqCst);
    }

    fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::SeqCst)
    }

    fn touch(&self) {
        *self.last_active.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn last_active(&self) -> Instant {
        *self.last_active.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Every open connection, oldest first (ids grow).
struct Registry {
    limits: ConnLimits,
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<ConnState>>>,
}

impl Registry {
    /// Makes room for a connection from `addr` and registers it; `None` when every open connection is an
    /// authenticated one and the cap is reached.
    fn admit(&self, addr: IpAddr) -> Option<Arc<ConnState>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let unauth_here: Vec<u64> = open.values().filter(|c| c.addr == addr && !c.is_authenticated()).map(|c| c.id).collect();
        if unauth_here.len() >= self.limits.per_address {
            for id in &unauth_here[..=unauth_here.len() - self.limits.per_address] {
                if let Some(c) = open.remove(id) {
                    c.close.cancel();
                }
            }
        }
        if open.len() >= self.limits.max_connections {
            let oldest = open.values().find(|c| !c.is_authenticated()).map(|c| c.id);
            match oldest.and_then(|id| open.remove(&id)) {
                Some(c) => c.close.cancel(),
                None => return None,
            }
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let c = Arc::new(ConnState {
            id,
            addr,
            authenticated: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_active: Mutex::new(Instant::now()),
            close: CancellationToken::new(),
        });
        open.insert(id, c.clone());
        Some(c)
    }

    fn remove(&self, id: u64) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }
}

/// Resolves when the connection should be closed: evicted, or idle past its limit with no request in progress.
async fn idle_watch(c: Arc<ConnState>, limits: ConnLimits) {
    loop {
        let limit = if c.is_authenticated() { limits.idle } else { limits.unauthenticated_idle };
        let deadline = if c.in_flight.load(Ordering::SeqCst) > 0 {
            Instant::now() + Duration::from_secs(1)
        } else {
            let at = c.last_active() + limit;
            if at <= Instant::now() {
                return;
            }
            at
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            _ = c.close.cancelled() => return,
        }
    }
}

/// Counts a request as in progress until its response body is done (or dropped).
struct InFlight(Arc<ConnState>);

impl InFlight {
    fn start(c: Arc<ConnState>) -> InFlight {
        c.in_flight.fetch_add(1, Ordering::SeqCst);
        c.touch();
        InFlight(c)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted as in progress.
struct TrackedBody {
    inner: axum::body::Body,
    _flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails when the client sends nothing for `limit` (a declared size that never arrives).
struct TimeoutBody {
    inner: hyper::body::Incoming,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: nothing arrived for {0:?}")]
struct BodyStalled(Duration);

impl http_body::Body for TimeoutBody {
    type Data = axum::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                let limit = self.limit;
                self.timer.as_mut().reset(Instant::now() + limit);
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => match self.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled(self.limit))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The rule for where the daemon may listen: anything but loopback needs TLS and at least one token.
pub fn check_listen(addr: SocketAddr, tls: Option<&TlsFiles>, tokens: usize) -> Result<(), String> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if tls.is_none() {
        return Err(format!("listening on {addr} (not loopback) requires TLS: give --tls-cert and --tls-key"));
    }
    if tokens == 0 {
        return Err(format!("listening on {addr} (not loopback) requires API tokens; create one with `hutch token create --name NAME`"));
    }
    Ok(())
}

/// Reads a PEM certificate chain and private key into a rustls server config (HTTP/2 and HTTP/1.1 by ALPN).
pub fn tls_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, DaemonError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |p: &Path, m: String| DaemonError::BadInput(format!("{}: {m}", p.display()));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad(&files.cert, format!("cannot read a PEM certificate: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&files.cert, format!("bad PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad(&files.cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad(&files.key, format!("cannot read a PEM private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DaemonError::Internal(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&files.cert, format!("the certificate and key do not form a usable pair: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Raises this process's soft limit on open files to its hard limit (at most 65536), so that the connection
/// cap, not the descriptor table, is what bounds clients.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let want = hard.min(65536);
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want, hard);
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then drains open requests (bounded).
pub async fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, router: Router, limits: ConnLimits, shutdown: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let registry = Arc::new(Registry { limits: limits.clone(), next: AtomicU64::new(0), open: Mutex::new(BTreeMap::new()) });
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(conn) = registry.admit(peer.ip()) else {
            tracing::debug!(%peer, "refused a connection: every connection is taken by authenticated clients");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let c = Connection { conn, peer: peer.to_string(), principal: None, router: router.clone(), registry: registry.clone(), limits: limits.clone() };
        c.spawn(tcp, acceptor.clone(), graceful.watcher());
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections were still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// The identity the kernel vouches for on a unix-socket connection (its peer's uid, mapped by
/// [`crate::peer::principal_for_uid`]). Only the unix listener inserts it; the API's authentication takes it
/// instead of a bearer token.
#[derive(Debug, Clone)]
pub struct PeerPrincipal(pub crate::auth::Principal);

/// Serves `router` on a unix socket until `shutdown` resolves: each connection is its peer's identity
/// (`SO_PEERCRED` uid, through `identify`), so it is authenticated from the start; who may connect at all is the
/// socket file's mode and group. A peer `identify` refuses gets its connection closed.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    router: Router,
    limits: ConnLimits,
    identify: impl Fn(u32) -> Result<crate::auth::Principal, String>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let registry = Arc::new(Registry { limits: limits.clone(), next: AtomicU64::new(0), open: Mutex::new(BTreeMap::new()) });
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accept on the unix socket: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                tracing::warn!("no peer credentials on a unix connection: {e}");
                continue;
            }
        };
        let principal = match identify(uid) {
            Ok(p) => p,
            Err(why) => {
                tracing::warn!(uid, "refused a unix connection: {why}");
                continue;
            }
        };
        // Every unix peer is local and identified: its connections count against the cap but are never the
        // unauthenticated ones evicted for newcomers.
        let Some(conn) = registry.admit(IpAddr::from([127, 0, 0, 0])) else { continue };
        conn.mark_authenticated();
        let c = Connection { conn, peer: format!("uid {uid}"), principal: Some(PeerPrincipal(principal)), router: router.clone(), registry: registry.clone(), limits: limits.clone() };
        c.spawn(stream, None, graceful.watcher());
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections were still open after {DRAIN_TIMEOUT:?}; closing them");
    }
}

/// One accepted connection and what serving it needs.
struct Connection {
    conn: Arc<ConnState>,
    peer: String,
    principal: Option<PeerPrincipal>,
    router: Router,
    registry: Arc<Registry>,
    limits: ConnLimits,
}

impl Connection {
    /// Serves HTTP on `io` (after a TLS handshake when `acceptor` is given) on a task of its own.
    fn spawn<I>(self, io: I, acceptor: Option<tokio_rustls::TlsAcceptor>, watcher: hyper_util::server::graceful::Watcher)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Connection { conn, peer, principal, router, registry, limits } = self;
        let (c, body_limit) = (conn.clone(), limits.body);
        let svc = tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let flight = InFlight::start(c.clone());
            let mut req = req.map(|inner| axum::body::Body::new(TimeoutBody { inner, limit: body_limit, timer: Box::pin(tokio::time::sleep(body_limit)) }));
            req.extensions_mut().insert(c.clone());
            if let Some(p) = &principal {
                req.extensions_mut().insert(p.clone());
            }
            let mut router = router.clone();
            async move {
                let resp = tower::Service::call(&mut router, req).await?;
                Ok::<_, std::convert::Infallible>(resp.map(|inner| axum::body::Body::new(TrackedBody { inner, _flight: flight })))
            }
        });
        let svc = TowerToHyperService::new(svc);
        tokio::spawn(async move {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.unauthenticated_idle);
            let serve = async {
                match acceptor {
                    Some(acc) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acc.accept(io)).await {
                        Ok(Ok(tls)) => watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(tls), svc).into_owned()).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake: {e}");
                            Ok(())
                        }
                        Err(_) => Ok(()),
                    },
                    None => watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(io), svc).into_owned()).await,
                }
            };
            tokio::select! {
                r = serve => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, "connection: {e}");
                    }
                }
                _ = idle_watch(conn.clone(), limits) => tracing::debug!(%peer, "closed an idle or evicted connection"),
            }
            registry.remove(conn.id);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_tls_and_tokens() {
        let tls = TlsFiles { cert: "c".into(), key: "k".into() };
        assert!(check_listen("127.0.0.1:7707".parse().unwrap(), None, 0).is_ok());
        assert!(check_listen("[::1]:7707".parse().unwrap(), None, 0).is_ok());
        assert!(check_listen("0.0.0.0:7707".parse().unwrap(), None, 1).unwrap_err().contains("--tls-cert"));
        assert!(check_listen("0.0.0.0:7707".parse().unwrap(), Some(&tls), 0).unwrap_err().contains("token create"));
        assert!(check_listen("10.1.2.3:7707".parse().unwrap(), Some(&tls), 1).is_ok());
    }
}
