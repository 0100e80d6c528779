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
    /// A `CERTIFICATE` block whose PEM framing or base64 is broken.
    #[error("ca_file {path} has a PEM block that does not decode: {reason}")]
    Pem { path: String, reason: String },
    /// A block that decodes, but whose contents are not an X.509 certificate webpki can use
    /// as a root (a truncated paste, a CSR or key labelled CERTIFICATE).
    #[error("ca_file {path}: certificate {index} (counting from 1) is not a usable X.509 certificate: {reason}")]
    NotACertificate {
        path: String,
        index: usize,
        reason: String,
    },
    /// The file holds only other PEM blocks (a private key) or no PEM at all.
    #[error("ca_file {path} holds no certificate: there is no -----BEGIN CERTIFICATE----- block")]
    NoCertificate { path: String },
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
            added += 1;
            roots.add(cert).map_err(|e| TlsError::NotACertificate {
                path: shown.clone(),
                index: added,
                reason: e.to_string(),
            })?;
        }
        if added == 0 {
            return Err(TlsError::NoCertificate { path: shown });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pem: &str) -> TlsError {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, pem).expect("write");
        client_config(Some(&path)).expect_err("a bad ca_file")
    }

    #[test]
    fn each_bad_ca_file_says_what_is_wrong_with_it() {
        let err = load("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
        assert!(err
            .to_string()
            .contains("no -----BEGIN CERTIFICATE----- block"));

        let err = load("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        assert!(matches!(err, TlsError::Pem { .. }), "{err:?}");

        // Valid base64, but not DER: a paste of the wrong thing.
        let err = load("-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n");
        assert!(
            matches!(err, TlsError::NotACertificate { index: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("certificate 1"), "{err}");
    }
}
