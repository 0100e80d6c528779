//! TLS client configuration: one crypto provider (ring) and one root store (webpki roots plus
//! an integration's optional `ca_file`) for both the upstream pool and the token client.
//!
//! reqwest and hyper-rustls each pick their own provider and roots by default; two providers
//! in one process make rustls panic when a config is built without naming one. Everything
//! here names its provider explicitly, so no process-wide default is ever needed.
//! Verification is always on: nothing in this crate builds a verifier that skips checks.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read ca_file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("ca_file {path} holds no usable PEM certificate: {reason}")]
    Pem { path: String, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Build(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| TlsError::Pem {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| TlsError::Pem {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsError::Pem {
                path: shown,
                reason: "no CERTIFICATE block found".into(),
            });
        }
    }
    Ok(roots)
}

/// The client configuration for one integration. It carries no ALPN list: hyper-rustls adds
/// h2 and http/1.1 itself (and refuses a config that has one), and the token client, given
/// none, speaks HTTP/1.1, which every token endpoint does.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth())
}
