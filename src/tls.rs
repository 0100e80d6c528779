//! TLS client configuration: one crypto provider (ring) and one root store (webpki roots plus
//! an integration's optional `ca_file`) for both the upstream pool and the token client.
//!
//! reqwest and hyper-rustls each pick their own provider and roots by default; two providers
//! in one process make rustls panic when a config is built without naming one. Everything
//! here names its provider explicitly, so no process-wide default is ever needed.
//! Verification is always on: nothing in this crate builds a verifier that skips checks.
//!
//! It also owns what a failed verification means: [`explain`] turns rustls's (and webpki's)
//! certificate errors into the cause and the fix, for the upstream's 502 and the token
//! endpoint's fetch error alike. It does not classify or log errors; its callers do.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustls::{CertificateError, ExtendedKeyPurpose, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::UnixTime;

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

/// Which server a TLS failure is about; it names the setting a fix goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    Upstream,
    TokenEndpoint,
}

impl Peer {
    fn key(self) -> &'static str {
        match self {
            Peer::Upstream => "upstream",
            Peer::TokenEndpoint => "token_url",
        }
    }
}

/// Where the fix to an unknown issuer goes: points users at the README's section.
const PRIVATE_CA: &str = "the README's \"Private CA\" section has the two openssl commands";

/// A failed handshake as the cause and the fix, then rustls's own words in parentheses (what
/// a search engine knows). rustls's text alone misleads: a CA certificate served as the
/// server's own reads `Other(OtherError(CaUsedAsEndEntity))`, and the old advice "add it with
/// ca_file" sent people back to a ca_file that already held it.
pub(crate) fn explain(err: &rustls::Error, peer: Peer, ca_file: Option<&Path>) -> String {
    let plain = match err {
        rustls::Error::InvalidCertificate(cert) => explain_certificate(cert, peer, ca_file),
        rustls::Error::InvalidMessage(_) => format!(
            "the server did not answer in TLS; check that {} names a TLS port (a plain-HTTP port answers like this)",
            peer.key()
        ),
        _ => "the TLS handshake failed".to_string(),
    };
    format!("{plain} (rustls: {err})")
}

/// The cause and fix of one certificate error, as webpki reports it through rustls: the
/// `*Context` variants carry the times, names and key purposes that make the message exact;
/// errors rustls has no variant for arrive as `Other` wrapping a `webpki::Error`.
pub(crate) fn explain_certificate(
    err: &CertificateError,
    peer: Peer,
    ca_file: Option<&Path>,
) -> String {
    let key = peer.key();
    match err {
        CertificateError::ExpiredContext { time, not_after } => format!(
            "the server's certificate expired at {} ({} ago by this host's clock); renew it on the server, or fix this host's clock if it is wrong",
            rfc3339(*not_after),
            ago(*not_after, *time)
        ),
        CertificateError::Expired => "the server's certificate has expired (or its validity period is invalid); renew it on the server, or fix this host's clock if it is wrong".to_string(),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "the server's certificate is valid only from {} ({} from now by this host's clock); check this host's clock (NTP) or the certificate's start date",
            rfc3339(*not_before),
            ago(*time, *not_before)
        ),
        CertificateError::NotValidYet => "the server's certificate is not valid yet; check this host's clock (NTP) or the certificate's start date".to_string(),
        CertificateError::NotValidForNameContext { expected, presented } => {
            let expected = expected.to_str();
            let names = if presented.is_empty() {
                "names no host (it has no subjectAltName, and the common name is not read)".to_string()
            } else {
                let mut names: Vec<String> = presented.iter().take(8).map(|n| san(n)).collect();
                if presented.len() > names.len() {
                    names.push(format!("and {} more", presented.len() - names.len()));
                }
                format!("is for {}", names.join(", "))
            };
            format!(
                "the server's certificate {names}, not for {expected}, the host in {key}; use a host name the certificate names in {key}, or issue the certificate with {expected} in its subjectAltName"
            )
        }
        CertificateError::NotValidForName => format!(
            "the server's certificate is not for the host in {key}; use a host name the certificate names, or issue the certificate with that host in its subjectAltName"
        ),
        CertificateError::UnknownIssuer => match ca_file {
            Some(path) => format!(
                "the server's certificate was not issued by a CA tokengate trusts (the public web roots and ca_file {}); put the CA that issued it in ca_file, or, if it is there, make the server send the intermediate certificates between its own and that CA",
                path.display()
            ),
            None => format!(
                "the server's certificate was not issued by a CA tokengate trusts (the public web roots; no ca_file is set); if {key} uses a private CA, or a TLS-inspecting proxy re-signs the traffic, add that CA's certificate with ca_file (verification cannot be turned off)"
            ),
        },
        CertificateError::InvalidPurposeContext { presented, .. } => {
            let has: Vec<String> = presented.iter().map(purpose).collect();
            format!(
                "the server's certificate is not allowed for TLS servers: its extendedKeyUsage is {} and lacks serverAuth; issue it with extendedKeyUsage = serverAuth ({PRIVATE_CA})",
                if has.is_empty() { "empty".to_string() } else { has.join(", ") }
            )
        }
        CertificateError::InvalidPurpose => format!(
            "the server's certificate is not allowed for TLS servers: its extendedKeyUsage lacks serverAuth; issue it with extendedKeyUsage = serverAuth ({PRIVATE_CA})"
        ),
        CertificateError::BadSignature => "the server's certificate is not validly signed by the CA it names as its issuer; a trusted CA has that name but another key, often ca_file holding another CA of the same name (one made again): put the CA that issued the server's certificate in ca_file".to_string(),
        CertificateError::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CaUsedAsEndEntity) => format!(
                "the server presents a CA certificate (basicConstraints CA:TRUE, as `openssl req -x509` makes by default) as its own, and rustls accepts a CA certificate only as an issuer, never as the server's certificate, even when it is in ca_file; issue the server a certificate signed by that CA and keep the CA in ca_file ({PRIVATE_CA})"
            ),
            Some(webpki::Error::EndEntityUsedAsCa) => format!(
                "the certificate that signed the server's is not a CA certificate (no basicConstraints CA:TRUE); sign the server's certificate with a CA made as one ({PRIVATE_CA})"
            ),
            Some(webpki::Error::UnsupportedCertVersion) => format!(
                "the server's certificate is X.509 version 1 (made without extensions), which rustls refuses; issue a version 3 certificate with a subjectAltName ({PRIVATE_CA})"
            ),
            _ => "the server's certificate was refused".to_string(),
        },
        _ => "the server's certificate was refused".to_string(),
    }
}

/// One subjectAltName as webpki renders it (`DnsName("a.example")`, `IpAddress(10.0.0.1)`),
/// without the wrapper. It comes from the server, and goes into log lines and `/status`: no
/// control characters, cut short.
fn san(presented: &str) -> String {
    let bare = presented
        .strip_prefix("DnsName(\"")
        .and_then(|n| n.strip_suffix("\")"))
        .or_else(|| {
            presented
                .strip_prefix("IpAddress(")
                .and_then(|n| n.strip_suffix(')'))
        })
        .unwrap_or(presented);
    bare.chars().filter(|c| !c.is_control()).take(100).collect()
}

fn purpose(p: &ExtendedKeyPurpose) -> String {
    match p {
        ExtendedKeyPurpose::ServerAuth => "serverAuth".to_string(),
        ExtendedKeyPurpose::ClientAuth => "clientAuth".to_string(),
        ExtendedKeyPurpose::Other(oid) => oid
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("."),
    }
}

fn rfc3339(t: UnixTime) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t.as_secs())).to_string()
}

/// `later - earlier` as a person says it: whole days past one, else to the second (a clock
/// a few minutes off is worth seeing exactly).
fn ago(earlier: UnixTime, later: UnixTime) -> String {
    const DAY: u64 = 24 * 3600;
    match later.as_secs().saturating_sub(earlier.as_secs()) {
        secs if secs >= 2 * DAY => format!("{} days", secs / DAY),
        secs => humantime::format_duration(Duration::from_secs(secs)).to_string(),
    }
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

    fn cert(err: CertificateError, ca_file: Option<&Path>) -> String {
        explain(
            &rustls::Error::InvalidCertificate(err),
            Peer::TokenEndpoint,
            ca_file,
        )
    }

    #[test]
    fn a_ca_certificate_served_as_the_servers_own_is_named_with_its_fix() {
        let other = rustls::OtherError(Arc::new(webpki::Error::CaUsedAsEndEntity));
        let text = cert(
            CertificateError::Other(other),
            Some(Path::new("/etc/ca.pem")),
        );
        assert!(text.contains("presents a CA certificate"), "{text}");
        assert!(
            text.contains("issue the server a certificate signed by that CA"),
            "{text}"
        );
        assert!(text.contains("\"Private CA\""), "{text}");
        // rustls's own words stay, for searching.
        assert!(text.contains("CaUsedAsEndEntity"), "{text}");
    }

    #[test]
    fn each_certificate_error_names_its_cause_and_fix() {
        let t = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let text = cert(
            CertificateError::ExpiredContext {
                time: t(1_700_000_000 + 90),
                not_after: t(1_700_000_000),
            },
            None,
        );
        assert!(
            text.contains("expired at 2023-11-14T22:13:20Z (1m 30s ago"),
            "{text}"
        );
        assert!(text.contains("renew it"), "{text}");

        let text = cert(
            CertificateError::NotValidForNameContext {
                expected: rustls_pki_types::ServerName::try_from("localhost")
                    .expect("a DNS name")
                    .to_owned(),
                presented: vec!["DnsName(\"otherhost\")".into()],
            },
            None,
        );
        assert!(text.contains("certificate is for otherhost, not"), "{text}");
        assert!(
            text.contains("not for localhost, the host in token_url"),
            "{text}"
        );
        assert!(text.contains("subjectAltName"), "{text}");

        let text = cert(
            CertificateError::UnknownIssuer,
            Some(Path::new("/etc/ca.pem")),
        );
        assert!(text.contains("ca_file /etc/ca.pem"), "{text}");
        assert!(text.contains("intermediate"), "{text}");
        let text = cert(CertificateError::UnknownIssuer, None);
        assert!(text.contains("no ca_file is set"), "{text}");

        let text = cert(
            CertificateError::InvalidPurposeContext {
                required: ExtendedKeyPurpose::ServerAuth,
                presented: vec![ExtendedKeyPurpose::ClientAuth],
            },
            None,
        );
        assert!(
            text.contains("extendedKeyUsage is clientAuth and lacks serverAuth"),
            "{text}"
        );

        let text = explain(
            &rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
            Peer::Upstream,
            None,
        );
        assert!(text.contains("if upstream uses a private CA"), "{text}");
    }
}
