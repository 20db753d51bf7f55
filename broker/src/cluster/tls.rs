//! The broker's TLS client identity for the controller session: its
//! certificate and key (the broker's identity), and the CA that must have
//! signed the controller's certificate.

use std::path::Path;
use std::sync::Arc;

use mm_protocols::cluster_tls::{certificate_name, load_certs, load_roots};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio_rustls::TlsConnector;

use super::ClusterError;

fn tls(e: String) -> ClusterError {
    ClusterError::Tls(e)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, ClusterError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| ClusterError::Tls(format!("{}: cannot read the private key: {e}", path.display())))
}

/// A connector presenting `cert`/`key` and trusting only `ca`; returns it
/// and the name in `cert`.
pub fn connector(cert: &Path, key: &Path, ca: &Path) -> Result<(TlsConnector, String), ClusterError> {
    let roots = load_roots(ca).map_err(tls)?;
    let chain = load_certs(cert).map_err(tls)?;
    let name = certificate_name(&chain[0]).map_err(tls)?;
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
