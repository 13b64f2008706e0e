//! The listeners: HTTPS and HTTP on 127.0.0.1 port 0, the same on ports 443 and 80 of a random
//! loopback address when this process may bind them, and a UDP counter; served by a runtime on a
//! thread of their own until the test net is dropped.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{oneshot, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::routes::{Conn, Routes};
use crate::{io_err, Log, TestNetError};

/// Connections served at once per listener; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 512;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Running {
    pub(crate) https: SocketAddr,
    pub(crate) http: SocketAddr,
    pub(crate) udp: SocketAddr,
    pub(crate) web: Option<IpAddr>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Bound {
    https: TcpListener,
    http: TcpListener,
    udp: UdpSocket,
    /// HTTPS on 443 and HTTP on 80 of one loopback address.
    web: Option<(TcpListener, TcpListener)>,
}

/// A loopback address other test nets are unlikely to hold (all of 127/8 is loopback on Linux).
fn random_loopback(attempt: u32) -> Ipv4Addr {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u32(attempt);
    let [a, b, c, ..] = h.finish().to_le_bytes();
    Ipv4Addr::new(127, a.max(1), b, c.clamp(2, 254))
}

/// Ports 443 and 80 are privileged: without the right to bind them the test net has no web
/// ports, and tests that need them say so.
async fn bind_web() -> Option<(TcpListener, TcpListener)> {
    for attempt in 0..8 {
        let ip = random_loopback(attempt);
        match TcpListener::bind((ip, 443)).await {
            Ok(https) => match TcpListener::bind((ip, 80)).await {
                Ok(http) => return Some((https, http)),
                Err(_) => continue,
            },
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return None,
            Err(_) => continue,
        }
    }
    None
}

async fn bind() -> Result<Bound, TestNetError> {
    let https = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io_err("cannot bind the HTTPS listener"))?;
    let http = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io_err("cannot bind the HTTP listener"))?;
    let port = https
        .local_addr()
        .map_err(io_err("HTTPS listener address"))?
        .port();
    // Same port number as HTTPS when free, where QUIC to that name would go.
    let udp = match UdpSocket::bind(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(_) => UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(io_err("cannot bind the UDP socket"))?,
    };
    Ok(Bound {
        https,
        http,
        udp,
        web: bind_web().await,
    })
}

impl Running {
    pub(crate) fn start(
        tls: Arc<ServerConfig>,
        routes: Routes,
        log: Arc<Log>,
    ) -> Result<Running, TestNetError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hutch-testnet")
            .enable_all()
            .build()
            .map_err(io_err("cannot start the test net's runtime"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hutch-testnet".into())
            .spawn(move || {
                rt.block_on(async move {
                    let bound = match bind().await {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let addrs = (bound.https.local_addr(), bound.http.local_addr(), bound.udp.local_addr());
                    let (Ok(https), Ok(http), Ok(udp)) = addrs else {
                        let _ = ready_tx.send(Err(TestNetError::ServerThread));
                        return;
                    };
                    let web_ip = bound.web.as_ref().and_then(|(l, _)| l.local_addr().ok()).map(|a| a.ip());
                    let _ = ready_tx.send(Ok((https, http, udp, web_ip)));
                    let routes = Arc::new(routes);
                    let acceptor = TlsAcceptor::from(tls);
                    let web = async {
                        match bound.web {
                            Some((https, http)) => {
                                tokio::join!(serve_tls(https, acceptor.clone(), routes.clone(), log.clone()), serve_plain(http, routes.clone(), log.clone()));
                            }
                            None => std::future::pending::<()>().await,
                        }
                    };
                    tokio::select! {
                        _ = stop_rx => {}
                        () = serve_tls(bound.https, acceptor.clone(), routes.clone(), log.clone()) => {}
                        () = serve_plain(bound.http, routes.clone(), log.clone()) => {}
                        () = count_udp(bound.udp, log.clone()) => {}
                        () = web => {}
                    }
                });
                // Dropping the runtime here cancels every connection task.
            })
            .map_err(io_err("cannot start the test net's thread"))?;
        let (https, http, udp, web) = ready_rx.recv().map_err(|_| TestNetError::ServerThread)??;
        Ok(Running {
            https,
            http,
            udp,
            web,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_http<S>(io: S, routes: Arc<Routes>, log: Arc<Log>, conn: Conn, h2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: hyper::Request<Incoming>| {
        let (routes, log, conn) = (routes.clone(), log.clone(), conn.clone());
        async move { Ok::<_, Infallible>(crate::routes::handle(&routes, &log, &conn, req).await) }
    });
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(TokioIo::new(io), svc)
            .await;
        return;
    }
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades()
        .await;
}

/// Accepts connections on `listener` until it fails for good, at most `max` served at once (more wait in the
/// accept queue), each handed to `serve` in a task of its own.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, max: usize, serve: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        // Like production servers; without it small responses can wait for a delayed ACK.
        let _ = tcp.set_nodelay(true);
        let conn = serve(tcp);
        tokio::spawn(async move {
            let _permit = permit;
            conn.await;
        });
    }
}

async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    routes: Arc<Routes>,
    log: Arc<Log>,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    accept_loop(listener, MAX_CONNECTIONS, move |tcp| {
        let (acceptor, routes, log) = (acceptor.clone(), routes.clone(), log.clone());
        async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let sni = tls.get_ref().1.server_name().map(str::to_string);
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    serve_http(tls, routes, log, Conn { tls: true, sni, port }, h2).await;
                }
                _ => {
                    log.tls_handshakes_failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    })
    .await;
}

async fn serve_plain(listener: TcpListener, routes: Arc<Routes>, log: Arc<Log>) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    accept_loop(listener, MAX_CONNECTIONS, move |tcp| {
        let (routes, log) = (routes.clone(), log.clone());
        async move { serve_http(tcp, routes, log, Conn { tls: false, sni: None, port }, false).await }
    })
    .await;
}

async fn count_udp(sock: UdpSocket, log: Arc<Log>) {
    let mut buf = vec![0u8; 65536];
    loop {
        if sock.recv_from(&mut buf).await.is_ok() {
            log.udp_datagrams
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
