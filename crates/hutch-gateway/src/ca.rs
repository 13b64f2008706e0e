//! The per-sandbox interception CA: generated in host memory for one gateway, name-constrained
//! to the hosts secrets are bound to, minting and caching leaf certificates for this sandbox only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hutch_policy::{HostName, HostPattern};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::crypto::CryptoProvider;
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::GatewayError;

/// Leaf configurations kept per gateway; a sandbox naming more hosts than this starts over.
const MAX_CACHED_LEAVES: usize = 4096;

pub(crate) struct SandboxCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    provider: Arc<CryptoProvider>,
    leaves: Mutex<HashMap<HostName, Arc<ServerConfig>>>,
}

impl SandboxCa {
    /// `permitted` are the secret-bound host patterns the CA may vouch for; with none, the CA is
    /// constrained to the reserved `invalid` domain and can vouch for no real name.
    pub(crate) fn new(
        sandbox_id: &str,
        permitted: &[HostPattern],
        provider: Arc<CryptoProvider>,
    ) -> Result<SandboxCa, GatewayError> {
        let key = KeyPair::generate().map_err(GatewayError::Ca)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(GatewayError::Ca)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("Hutch sandbox {sandbox_id} CA"));
        dn.push(DnType::OrganizationName, "Hutch");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        // Guest clocks drift; a day either side keeps a fresh VM from rejecting the CA.
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(30);
        let mut subtrees: Vec<GeneralSubtree> = permitted
            .iter()
            .map(|p| match p {
                HostPattern::Exact(n) | HostPattern::Subdomains(n) => {
                    GeneralSubtree::DnsName(n.as_str().to_string())
                }
            })
            .collect();
        subtrees.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
        subtrees.dedup();
        if subtrees.is_empty() {
            subtrees.push(GeneralSubtree::DnsName("invalid".into()));
        }
        params.name_constraints = Some(NameConstraints {
            permitted_subtrees: subtrees,
            excluded_subtrees: vec![],
        });
        let cert = params.self_signed(&key).map_err(GatewayError::Ca)?;
        Ok(SandboxCa {
            cert,
            key,
            provider,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    pub(crate) fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub(crate) fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The TLS server configuration presenting a leaf for `name`, minted on first use.
    pub(crate) fn server_config(&self, name: &HostName) -> Result<Arc<ServerConfig>, GatewayError> {
        let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cfg) = leaves.get(name) {
            return Ok(cfg.clone());
        }
        let cfg = Arc::new(self.mint(name)?);
        if leaves.len() >= MAX_CACHED_LEAVES {
            leaves.clear();
        }
        leaves.insert(name.clone(), cfg.clone());
        Ok(cfg)
    }

    fn mint(&self, name: &HostName) -> Result<ServerConfig, GatewayError> {
        let key = KeyPair::generate().map_err(GatewayError::Ca)?;
        let mut params =
            CertificateParams::new(vec![name.as_str().to_string()]).map_err(GatewayError::Ca)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(7);
        let leaf = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(GatewayError::Ca)?;
        let chain = vec![leaf.der().clone(), self.cert.der().clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(GatewayError::Tls)?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(GatewayError::Tls)?;
        // HTTP/2 is not offered: one authority per connection keeps coalescing out of reach.
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn name(s: &str) -> HostName {
        HostName::parse(s).expect("name")
    }

    /// A client trusting `trusted` connects to a server presenting `server` for `sni`.
    async fn handshake(
        server: Arc<ServerConfig>,
        trusted: &SandboxCa,
        sni: &str,
    ) -> Result<(), String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(trusted.cert_der()).map_err(|e| e.to_string())?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server_side =
            tokio::spawn(async move { TlsAcceptor::from(server).accept(b).await.map(|_| ()) });
        let sni =
            rustls_pki_types::ServerName::try_from(sni.to_string()).map_err(|e| e.to_string())?;
        let r = TlsConnector::from(Arc::new(client))
            .connect(sni, a)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        let _ = server_side.await;
        r
    }

    /// Threat 13 (TLS interception pitfalls): leaves are cached per sandbox CA, another sandbox's
    /// CA is not trusted, and the CA cannot vouch for names outside its constraints.
    #[tokio::test]
    async fn threat13_ca_is_per_sandbox_and_name_constrained() {
        let ca = SandboxCa::new(
            "a",
            &[HostPattern::parse("api.test").expect("p")],
            provider(),
        )
        .expect("ca");
        let first = ca.server_config(&name("api.test")).expect("leaf");
        let again = ca.server_config(&name("api.test")).expect("leaf");
        assert!(
            Arc::ptr_eq(&first, &again),
            "leaf configs are cached per gateway"
        );
        handshake(first.clone(), &ca, "api.test")
            .await
            .expect("in-constraint leaf verifies");

        let outside = ca.server_config(&name("evil.test")).expect("leaf");
        let err = handshake(outside, &ca, "evil.test")
            .await
            .expect_err("name constraints must refuse");
        assert!(
            err.contains("NameConstraint") || err.to_lowercase().contains("name constraint"),
            "{err}"
        );

        let other = SandboxCa::new(
            "b",
            &[HostPattern::parse("api.test").expect("p")],
            provider(),
        )
        .expect("ca");
        assert_ne!(other.cert_pem(), ca.cert_pem());
        let foreign = other.server_config(&name("api.test")).expect("leaf");
        assert!(
            handshake(foreign, &ca, "api.test").await.is_err(),
            "another sandbox's leaf is not trusted"
        );

        // With no intercepted hosts the CA vouches for nothing real.
        let none = SandboxCa::new("c", &[], provider()).expect("ca");
        let leaf = none.server_config(&name("api.test")).expect("leaf");
        assert!(handshake(leaf, &none, "api.test").await.is_err());
    }
}
