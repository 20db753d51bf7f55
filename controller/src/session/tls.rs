//! The controller's side of the brokers' mutual TLS: its own certificate,
//! and the CA every broker's client certificate must be signed by. A
//! broker's identity is the name in its certificate, so the CA is the
//! cluster's membership list: whoever it signed may register that name.

use std::path::PathBuf;
use std::sync::Arc;

use mm_protocols::cluster_tls::{load_certs, load_roots};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio_rustls::TlsAcceptor;

/// The files of the controller's TLS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA that signs brokers' certificates.
    pub ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(pub String);

/// An acceptor that demands a client certificate signed by `files.ca`.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = load_roots(&files.ca).map_err(TlsError)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError(format!("client verifier: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError(format!("{}: {e}", files.key.display())))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert).map_err(TlsError)?, key)
        .map_err(|e| TlsError(format!("{} and {}: {e}", files.cert.display(), files.key.display())))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The name a (verified) client certificate is for: the cluster protocol's
/// rule (common name, else first DNS name), the one the broker uses to
/// default its host name.
pub fn certificate_name(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    mm_protocols::cluster_tls::certificate_name(cert).map_err(TlsError)
}
