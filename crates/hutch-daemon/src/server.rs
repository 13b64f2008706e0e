//! Listening: plain HTTP on loopback, HTTPS (rustls) anywhere else, HTTP/1.1 with upgrades (WebSocket) and
//! HTTP/2, a cap on open connections, and graceful shutdown (stop accepting, let requests finish, bounded).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::DaemonError;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7707";
const MAX_CONNECTIONS: usize = 1024;
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Serves `router` on `listener` until `shutdown` resolves, then drains open requests (bounded).
pub async fn serve(listener: TcpListener, tls: Option<Arc<rustls::ServerConfig>>, router: Router, shutdown: impl Future<Output = ()>) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
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
        let _ = tcp.set_nodelay(true);
        let svc = TowerToHyperService::new(router.clone());
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let builder = auto::Builder::new(TokioExecutor::new());
            let r = match acceptor {
                Some(acc) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acc.accept(tcp)).await {
                    Ok(Ok(tls)) => watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(tls), svc).into_owned()).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake: {e}");
                        return;
                    }
                    Err(_) => return,
                },
                None => watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc).into_owned()).await,
            };
            if let Err(e) = r {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown()).await.is_err() {
        tracing::warn!("some connections were still open after {DRAIN_TIMEOUT:?}; closing them");
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
