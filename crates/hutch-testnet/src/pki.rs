//! The test internet's own PKI: a throwaway CA (never a real root) and one server certificate
//! for the names the tests use.

use std::sync::Arc;

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

use crate::TestNetError;

pub(crate) struct TestPki {
    pub(crate) ca_pem: String,
    pub(crate) server_config: Arc<ServerConfig>,
}

impl TestPki {
    pub(crate) fn new(names: &[&str]) -> Result<TestPki, TestNetError> {
        let ca_key = rcgen::KeyPair::generate().map_err(TestNetError::Pki)?;
        let mut ca_params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(TestNetError::Pki)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Hutch testnet CA (tests only)");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca_params.self_signed(&ca_key).map_err(TestNetError::Pki)?;

        let leaf_key = rcgen::KeyPair::generate().map_err(TestNetError::Pki)?;
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut leaf_params = rcgen::CertificateParams::new(sans).map_err(TestNetError::Pki)?;
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "hutch testnet server");
        leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf_params
            .signed_by(&leaf_key, &ca, &ca_key)
            .map_err(TestNetError::Pki)?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TestNetError::Tls)?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone(), ca.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
            )
            .map_err(TestNetError::Tls)?;
        // Like most public servers: HTTP/2 for clients that offer it.
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TestPki {
            ca_pem: ca.pem(),
            server_config: Arc::new(cfg),
        })
    }
}
