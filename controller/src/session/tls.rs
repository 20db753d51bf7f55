//! The controller's side of the brokers' mutual TLS: its own certificate,
//! and the CA every broker's client certificate must be signed by. A
//! broker's identity is the name in its certificate, so the CA is the
//! cluster's membership list: whoever it signed may register that name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
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

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError(format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: bad certificate: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!("{}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

/// An acceptor that demands a client certificate signed by `files.ca`.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&files.ca)? {
        roots.add(cert).map_err(|e| TlsError(format!("{}: {e}", files.ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError(format!("client verifier: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError(format!("{}: {e}", files.key.display())))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, key)
        .map_err(|e| TlsError(format!("{} and {}: {e}", files.cert.display(), files.key.display())))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The name a (verified) client certificate is for: its common name, or
/// failing that its first DNS name; the broker applies the same rule to
/// default its host name.
pub fn certificate_name(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError(format!("cannot parse the client certificate: {e}")))?;
    if let Some(cn) = parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()) {
        return Ok(cn.to_owned());
    }
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                return Ok((*dns).to_owned());
            }
        }
    }
    Err(TlsError("the client certificate names no host".into()))
}
