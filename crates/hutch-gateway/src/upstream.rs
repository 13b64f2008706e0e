//! Deciding a destination and reaching it: canonical name, allow rule, one resolution (or the
//! operator's pin), classification of every address, then a dial to exactly a checked address.
//! Also the upstream TLS client, which always verifies.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hutch_policy::{classify, AllowRule, CheckedPolicy, DenyReason, HostName};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::GatewayError;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Name resolution for allowed names. The gateway asks once per connection and dials only
/// what it was told and checked.
pub trait Resolver: Send + Sync {
    fn lookup<'a>(
        &'a self,
        name: &'a HostName,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// The host's resolver (getaddrinfo via tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        name: &'a HostName,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((name.as_str(), port)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// An allowed destination with the addresses that passed the checks.
#[derive(Clone, Debug)]
pub(crate) struct Decided {
    pub(crate) name: HostName,
    pub(crate) port: u16,
    pub(crate) rule: AllowRule,
    pub(crate) addrs: Vec<SocketAddr>,
}

impl Decided {
    pub(crate) fn dest(&self) -> String {
        format!("{}:{}", self.name, self.port)
    }
}

/// A refusal: what to tell the sandbox and the audit log, and the HTTP status for proxies.
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    pub(crate) dest: String,
    pub(crate) reason: String,
    pub(crate) status: http::StatusCode,
}

impl Refusal {
    pub(crate) fn policy(dest: String, reason: &DenyReason) -> Refusal {
        Refusal {
            dest,
            reason: reason.to_string(),
            status: http::StatusCode::FORBIDDEN,
        }
    }

    pub(crate) fn message(&self) -> String {
        format!(
            "hutch: egress to {} denied by policy ({})\n",
            self.dest, self.reason
        )
    }
}

/// Canonicalizes, checks the rules, resolves once and classifies. No bytes go anywhere.
pub(crate) async fn decide(
    policy: &CheckedPolicy,
    resolver: &dyn Resolver,
    host_addrs: &[IpAddr],
    raw_name: &str,
    port: u16,
    timeout: Duration,
) -> Result<Decided, Refusal> {
    let shown = format!("{}:{}", crate::audit::sanitize(raw_name), port);
    let name = match HostName::parse(raw_name) {
        Ok(n) => n,
        Err(e) => {
            return Err(Refusal::policy(
                shown,
                &DenyReason::BadName {
                    message: e.to_string(),
                },
            ))
        }
    };
    let dest = format!("{name}:{port}");
    let rule = policy
        .check_connect(&name, port)
        .map_err(|r| Refusal::policy(dest.clone(), &r))?
        .clone();
    if let Some(pinned) = policy.pinned(&name, port) {
        // The operator chose these addresses; they may be loopback (a local test "internet").
        let addrs = pinned.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        return Ok(Decided {
            name,
            port,
            rule,
            addrs,
        });
    }
    let ips = match tokio::time::timeout(timeout, resolver.lookup(&name, port)).await {
        Ok(Ok(ips)) if !ips.is_empty() => ips,
        Ok(Ok(_)) => {
            return Err(upstream_refusal(
                dest,
                "name resolved to no addresses".into(),
            ))
        }
        Ok(Err(e)) => return Err(upstream_refusal(dest, format!("cannot resolve: {e}"))),
        Err(_) => return Err(upstream_refusal(dest, "name resolution timed out".into())),
    };
    let mut allowed = Vec::new();
    let mut refused = Vec::new();
    for ip in ips {
        let class = classify(ip, host_addrs);
        if class.is_public() {
            allowed.push(SocketAddr::new(ip, port));
        } else {
            refused.push(format!("{ip} ({class})"));
        }
    }
    if allowed.is_empty() {
        let reason = format!(
            "resolves only to forbidden addresses: {}; pin it with --resolve {name}:{port}:ADDR if this is intended",
            refused.join(", ")
        );
        return Err(Refusal::policy(
            dest,
            &DenyReason::BadName { message: reason },
        ));
    }
    Ok(Decided {
        name,
        port,
        rule,
        addrs: allowed,
    })
}

fn upstream_refusal(dest: String, reason: String) -> Refusal {
    Refusal {
        dest,
        reason,
        status: http::StatusCode::BAD_GATEWAY,
    }
}

/// Connects to the first checked address that answers.
pub(crate) async fn dial(
    d: &Decided,
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), Refusal> {
    let mut last = String::from("no address");
    for addr in &d.addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((s, *addr));
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connect timed out"),
        }
    }
    Err(upstream_refusal(
        d.dest(),
        format!("cannot connect: {last}"),
    ))
}

/// TLS to upstream servers, verified against the system roots plus `--upstream-ca`.
pub(crate) struct UpstreamTls {
    extra_roots: Vec<CertificateDer<'static>>,
    system_roots: bool,
    provider: Arc<CryptoProvider>,
    /// Built on the first intercepted connection: most sandboxes never need one, and parsing the system's
    /// roots costs tens of milliseconds at every sandbox start otherwise.
    connector: std::sync::OnceLock<Result<TlsConnector, String>>,
    /// The same, offering `h2` before `http/1.1`.
    connector_h2: std::sync::OnceLock<Result<TlsConnector, String>>,
}

/// The system's root certificates, read once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

impl UpstreamTls {
    pub(crate) fn new(
        policy: &CheckedPolicy,
        system_roots: bool,
        provider: Arc<CryptoProvider>,
    ) -> Result<UpstreamTls, GatewayError> {
        let mut extra_roots = Vec::new();
        for ca in policy.upstream_ca() {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(ca.pem.as_bytes())
                    .filter_map(Result::ok)
                    .collect();
            let mut probe = RootCertStore::empty();
            let (added, _) = probe.add_parsable_certificates(certs.iter().cloned());
            if added == 0 {
                return Err(GatewayError::UpstreamCa {
                    path: ca.path.clone(),
                });
            }
            extra_roots.extend(certs);
        }
        Ok(UpstreamTls {
            extra_roots,
            system_roots,
            provider,
            connector: std::sync::OnceLock::new(),
            connector_h2: std::sync::OnceLock::new(),
        })
    }

    fn connector(&self, offer_h2: bool) -> io::Result<&TlsConnector> {
        let cell = if offer_h2 {
            &self.connector_h2
        } else {
            &self.connector
        };
        let built = cell.get_or_init(|| {
            let mut roots = RootCertStore::empty();
            if self.system_roots {
                roots.add_parsable_certificates(system_roots().iter().cloned());
            }
            roots.add_parsable_certificates(self.extra_roots.iter().cloned());
            let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            cfg.alpn_protocols = if offer_h2 {
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            } else {
                vec![b"http/1.1".to_vec()]
            };
            Ok(TlsConnector::from(Arc::new(cfg)))
        });
        built
            .as_ref()
            .map_err(|e| io::Error::other(format!("upstream TLS configuration: {e}")))
    }

    /// TLS to `name` over `tcp`, offering `h2` too when `offer_h2` (the caller reads which
    /// protocol the server chose from the stream).
    pub(crate) async fn connect(
        &self,
        name: &HostName,
        tcp: TcpStream,
        timeout: Duration,
        offer_h2: bool,
    ) -> io::Result<TlsStream<TcpStream>> {
        let server_name = ServerName::try_from(name.as_str().to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        match tokio::time::timeout(timeout, self.connector(offer_h2)?.connect(server_name, tcp)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "upstream TLS handshake timed out",
            )),
        }
    }
}
