//! The broker's TLS client identity for the controller session: its
//! certificate and key (the broker's identity), and the CA that must have
//! signed the controller's certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use super::ClusterError;

fn pem_error(path: &Path, what: &str) -> impl FnOnce(rustls::pki_types::pem::Error) -> ClusterError {
    let message = format!("{}: {what}", path.display());
    move |e| ClusterError::Tls(format!("{message}: {e}"))
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClusterError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error(path, "cannot read certificates"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(path, "bad certificate"))?;
    if certs.is_empty() {
        return Err(ClusterError::Tls(format!("{}: no certificate in the file", path.display())));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ClusterError> {
    PrivateKeyDer::from_pem_file(path).map_err(pem_error(path, "cannot read the private key"))
}

/// The name a certificate is for: its common name, or failing that its
/// first DNS name. The controller applies the same rule to the broker's
/// certificate, so both sides agree on the host's name.
pub fn certificate_name(cert: &CertificateDer<'_>) -> Result<String, ClusterError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| ClusterError::Tls(format!("cannot parse the certificate: {e}")))?;
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
    Err(ClusterError::Tls("the certificate names no host (no common name, no DNS name)".into()))
}

/// A connector presenting `cert`/`key` and trusting only `ca`; returns it
/// and the name in `cert`.
pub fn connector(cert: &Path, key: &Path, ca: &Path) -> Result<(TlsConnector, String), ClusterError> {
    let mut roots = RootCertStore::empty();
    for ca_cert in load_certs(ca)? {
        roots.add(ca_cert).map_err(|e| ClusterError::Tls(format!("{}: {e}", ca.display())))?;
    }
    let chain = load_certs(cert)?;
    let name = certificate_name(&chain[0])?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClusterError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, load_key(key)?)
        .map_err(|e| ClusterError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// The name the controller's certificate must carry: `--controller-name`,
/// else the host part of `--controller` (an IP address is checked against
/// the certificate's IP addresses).
pub fn server_name(controller: &str, explicit: Option<&str>) -> Result<ServerName<'static>, ClusterError> {
    let host = match explicit {
        Some(name) => name,
        None => match controller.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => controller,
        },
    };
    ServerName::try_from(host.to_owned())
        .map_err(|e| ClusterError::Tls(format!("{host:?} is not a valid name for the controller: {e}")))
}
