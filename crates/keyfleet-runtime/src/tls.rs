//! TLS for every keyfleet listener and client, with rustls and its `ring` provider.
//!
//! Servers: [`ServerTls`] (a certificate chain and key, optionally a client CA that makes
//! client certificates mandatory) turns a bound `TcpListener` into a stream of established TLS
//! connections that both the gRPC server and the HTTP server consume (`serve::accept`). Each
//! handshake runs in its own task under a deadline and a cap on handshakes in flight, so a
//! client that connects and says nothing never blocks the accept loop.
//!
//! Clients: [`ClientTls`] (a CA bundle, optionally a client certificate) configures tonic
//! channels (through `client::endpoint`) and reqwest (`rustls_client_config`).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::server::TlsStream;

/// A TLS handshake that has not finished by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many handshakes in flight per listener; more connections are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 512;

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(&'static str),
    #[error("the TLS key holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey,
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("invalid client CA: {0}")]
    ClientCa(#[from] rustls::server::VerifierBuilderError),
    #[error("{0} needs both a certificate and a key")]
    HalfIdentity(&'static str),
}

/// PEM text that may hold a private key: never printed.
#[derive(Clone)]
struct SecretPem(Arc<Vec<u8>>);

impl std::fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn certs(pem: &[u8], what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| TlsError::NoKey)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(pem: &[u8]) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(pem, "the CA bundle")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// A server's TLS identity, and the CA its clients' certificates must chain to (mTLS).
#[derive(Clone, Debug)]
pub struct ServerTls {
    cert_pem: Arc<Vec<u8>>,
    key_pem: SecretPem,
    client_ca_pem: Option<Arc<Vec<u8>>>,
}

impl ServerTls {
    /// From PEM text: the certificate chain (leaf first) and its private key.
    pub fn from_pem(cert_pem: Vec<u8>, key_pem: Vec<u8>) -> Result<ServerTls, TlsError> {
        let tls = ServerTls {
            cert_pem: Arc::new(cert_pem),
            key_pem: SecretPem(Arc::new(key_pem)),
            client_ca_pem: None,
        };
        tls.rustls_config(&[])?;
        Ok(tls)
    }

    /// Requires every client to present a certificate that chains to `ca_pem`.
    pub fn with_client_ca(mut self, ca_pem: Vec<u8>) -> Result<ServerTls, TlsError> {
        self.client_ca_pem = Some(Arc::new(ca_pem));
        self.rustls_config(&[])?;
        Ok(self)
    }

    /// `--tls-cert`, `--tls-key` and optionally `--tls-client-ca`, read and checked now.
    pub fn from_files(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerTls, TlsError> {
        let tls = ServerTls::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?)?;
        match client_ca {
            Some(ca) => tls.with_client_ca(read(ca, "--tls-client-ca")?),
            None => Ok(tls),
        }
    }

    /// True when clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// A rustls server configuration offering `alpn` (e.g. `h2` for gRPC).
    pub fn rustls_config(&self, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca)?),
                    provider(),
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(
            certs(&self.cert_pem, "the TLS certificate")?,
            key(&self.key_pem.0)?,
        )?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// What a client trusts and, for mTLS, presents.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    /// CA bundle (PEM) to trust instead of the built-in web PKI roots.
    ca_pem: Option<Arc<Vec<u8>>>,
    /// Client certificate chain and key (PEM), presented when the server asks.
    identity: Option<(Arc<Vec<u8>>, SecretPem)>,
}

impl ClientTls {
    /// Trusts `ca_pem` only.
    pub fn with_ca(mut self, ca_pem: Vec<u8>) -> Result<ClientTls, TlsError> {
        roots(&ca_pem)?;
        self.ca_pem = Some(Arc::new(ca_pem));
        Ok(self)
    }

    /// Presents `cert_pem`/`key_pem` to servers that ask for a client certificate.
    pub fn with_identity(
        mut self,
        cert_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> Result<ClientTls, TlsError> {
        certs(&cert_pem, "the client certificate")?;
        key(&key_pem)?;
        self.identity = Some((Arc::new(cert_pem), SecretPem(Arc::new(key_pem))));
        Ok(self)
    }

    /// A CA file and an optional client certificate and key, read and checked now. `flag`
    /// names the CA flag in errors (`--authority-ca`, `--ca`).
    pub fn from_files(
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
        flag: &'static str,
    ) -> Result<ClientTls, TlsError> {
        let mut tls = ClientTls::default();
        if let Some(ca) = ca {
            tls = tls.with_ca(read(ca, flag)?)?;
        }
        match (cert, key) {
            (Some(cert), Some(key)) => {
                tls.with_identity(read(cert, "--tls-cert")?, read(key, "--tls-key")?)
            }
            (None, None) => Ok(tls),
            _ => Err(TlsError::HalfIdentity("a client certificate")),
        }
    }

    /// True when nothing was configured (the web PKI roots, no client certificate).
    pub fn is_default(&self) -> bool {
        self.ca_pem.is_none() && self.identity.is_none()
    }

    /// tonic's client TLS settings.
    pub fn tonic_config(&self) -> tonic::transport::ClientTlsConfig {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let mut config = ClientTlsConfig::new();
        config = match &self.ca_pem {
            Some(ca) => config.ca_certificate(Certificate::from_pem(ca.as_slice())),
            None => config.with_webpki_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert.as_slice(), key.0.as_slice()));
        }
        config
    }

    /// A rustls client configuration (HTTP/1.1), for reqwest's `use_preconfigured_tls`.
    pub fn rustls_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let roots = match &self.ca_pem {
            Some(ca) => roots(ca)?,
            None => rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            },
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key_pem)) => builder
                .with_client_auth_cert(certs(cert, "the client certificate")?, key(&key_pem.0)?)?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// A verified client certificate that names no node (see [`certified_node_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the client certificate names no node: give it a DNS subjectAltName of 1 to 128 characters from A-Z a-z 0-9 . _ : -"
)]
pub struct CertificateNamesNoNode;

/// The node a watcher's client certificate names, on a listener with mutual TLS (the
/// certificate has already been verified against `--tls-client-ca`): its first DNS
/// subjectAltName, which must be a valid node id. `peer_certs` is what the connection presented
/// (`tonic::Request::peer_certs`): without a certificate, `Ok(None)` (the hello's node id
/// stands); with one, its name, which overrides the hello's, or [`CertificateNamesNoNode`],
/// which the caller must refuse (never fall back to the hello's: it would let a certified
/// caller choose any name).
pub fn certified_node_id(
    peer_certs: Option<&[CertificateDer<'_>]>,
) -> Result<Option<String>, CertificateNamesNoNode> {
    let Some(leaf) = peer_certs.and_then(<[_]>::first) else {
        return Ok(None);
    };
    let leaf = webpki::EndEntityCert::try_from(leaf).map_err(|_| CertificateNamesNoNode)?;
    let name = leaf
        .valid_dns_names()
        .next()
        .ok_or(CertificateNamesNoNode)?;
    if keyfleet_core::is_valid_label(name) {
        Ok(Some(name.to_owned()))
    } else {
        Err(CertificateNamesNoNode)
    }
}

/// The TLS side of accepting a connection: a handshake under [`HANDSHAKE_TIMEOUT`], at most
/// [`MAX_PENDING_HANDSHAKES`] at once (more connections are closed at once). `None` when the
/// handshake failed, timed out or was not attempted.
#[derive(Clone)]
pub(crate) struct Handshaker {
    acceptor: tokio_rustls::TlsAcceptor,
    pending: Arc<Semaphore>,
}

impl Handshaker {
    pub(crate) fn new(config: Arc<rustls::ServerConfig>) -> Handshaker {
        Handshaker {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
            pending: Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES)),
        }
    }

    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        let Ok(_permit) = self.pending.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "too many TLS handshakes in flight; closing");
            return None;
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfleet_testkit::tls::Pki;

    fn leaf(pki: &Pki, names: &[&str]) -> Vec<CertificateDer<'static>> {
        certs(&pki.client(names).0, "a test certificate").unwrap()
    }

    #[test]
    fn a_client_certificate_names_the_node_by_its_first_dns_name() {
        let pki = Pki::new("fleet CA");
        let chain = leaf(&pki, &["node-7.fleet", "other.fleet"]);
        assert_eq!(
            certified_node_id(Some(&chain)),
            Ok(Some("node-7.fleet".to_owned()))
        );
    }

    #[test]
    fn without_a_client_certificate_the_hello_names_the_node() {
        assert_eq!(certified_node_id(None), Ok(None));
        assert_eq!(certified_node_id(Some(&[])), Ok(None));
    }

    #[test]
    fn a_certificate_that_names_no_valid_node_id_is_refused() {
        let pki = Pki::new("fleet CA");
        let long = format!("{}.fleet", vec!["n".repeat(60); 3].join("."));
        for names in [&["192.0.2.7"][..], &["*.fleet"], &[long.as_str()]] {
            let chain = leaf(&pki, names);
            assert_eq!(
                certified_node_id(Some(&chain)),
                Err(CertificateNamesNoNode),
                "{names:?}"
            );
        }
        let garbage = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])];
        assert_eq!(
            certified_node_id(Some(&garbage)),
            Err(CertificateNamesNoNode)
        );
    }
}
