//! How a client reaches a broker.

use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use vitaltrail_core::auth::Token;

use crate::{Error, Result};

/// TLS with a client certificate: the broker's CA to trust, and the
/// certificate and key this client proves itself with.
#[derive(Clone)]
pub struct ClientTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(<client certificate and key>)")
    }
}

impl ClientTls {
    /// From PEM text: the CA certificate(s) that sign the broker's
    /// certificate, this client's certificate chain, and its private key
    /// (PKCS#8; Ed25519 device keys included).
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let c = c.map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
            roots.add(c)?;
        }
        if roots.is_empty() {
            return Err(Error::Tls("no CA certificate to trust".into()));
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("client certificate: {e}")))?;
        if chain.is_empty() {
            return Err(Error::Tls("no client certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| Error::Tls(format!("client key: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(ClientTls(Arc::new(config)))
    }
}

/// A user name and password (the embedded broker's pipeline listener).
#[derive(Debug, Clone)]
pub struct Login {
    /// The MQTT user name.
    pub username: String,
    /// The password (secret; redacted in `Debug`).
    pub password: Token,
}

/// A broker and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct MqttEndpoint {
    /// Host name or IP address (with TLS, the broker's certificate must
    /// name it).
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Connect over TLS with this client certificate.
    pub tls: Option<ClientTls>,
    /// Send this user name and password.
    pub login: Option<Login>,
}

impl MqttEndpoint {
    /// A broker without TLS or credentials.
    pub fn plain(host: impl Into<String>, port: u16) -> Self {
        MqttEndpoint {
            host: host.into(),
            port,
            tls: None,
            login: None,
        }
    }

    /// `HOST:PORT`, without TLS or credentials.
    pub fn parse(addr: &str) -> Result<Self> {
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| Error::InvalidArgument(format!("{addr}: expected HOST:PORT")))?;
        let port = port
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("{addr}: bad port")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        Ok(Self::plain(host, port))
    }

    /// With TLS and this client certificate.
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// rumqttc options for a client of this endpoint.
    pub fn options(&self, client_id: &str) -> MqttOptions {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.0.clone(),
            )));
        }
        if let Some(l) = &self.login {
            o.set_credentials(l.username.clone(), l.password.expose().to_owned());
        }
        o
    }
}

impl Default for MqttEndpoint {
    fn default() -> Self {
        Self::plain("127.0.0.1", 1883)
    }
}
