//! Outbound TLS settings: the policy and the rustls client configurations it needs.
//!
//! Opportunistic TLS (RFC 7435) encrypts without authenticating: a next hop found through MX
//! records cannot be authenticated without DANE or MTA-STS, and refusing a self-signed
//! certificate would only push the session back to cleartext. Required TLS verifies the
//! certificate chain against the system's trust store (and `--outbound-tls-ca` when given)
//! and the host name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// When to use STARTTLS towards a next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Never.
    None,
    /// When offered, without certificate checks; a failed handshake is retried in cleartext
    /// on a new connection.
    Opportunistic,
    /// Always, with certificate checks; a next hop without STARTTLS gets a temporary failure.
    Required,
}

impl std::str::FromStr for TlsPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(TlsPolicy::None),
            "opportunistic" => Ok(TlsPolicy::Opportunistic),
            "required" => Ok(TlsPolicy::Required),
            _ => Err(format!("'{s}' is not one of none, opportunistic, required")),
        }
    }
}

/// The client configurations for both kinds of TLS.
#[derive(Clone, Debug)]
pub struct TlsClients {
    /// Encrypt only (opportunistic).
    pub unverified: Arc<ClientConfig>,
    /// Verify chain and name (required).
    pub verified: Arc<ClientConfig>,
}

impl TlsClients {
    /// Builds both; `extra_ca` adds trust anchors from a PEM file.
    pub fn new(extra_ca: Option<&Path>) -> Result<TlsClients, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for bundle in [
            Path::new("/etc/ssl/certs/ca-certificates.crt"),
            Path::new("/etc/pki/tls/certs/ca-bundle.crt"),
        ] {
            if let Ok(pem) = std::fs::read(bundle) {
                add_pem(&mut roots, &pem);
                break;
            }
        }
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path)
                .map_err(|e| format!("--outbound-tls-ca {}: {e}", path.display()))?;
            if add_pem(&mut roots, &pem) == 0 {
                return Err(format!(
                    "--outbound-tls-ca {}: no certificate in it",
                    path.display()
                ));
            }
        }
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClients {
            unverified: unverified_client()?,
            verified: Arc::new(verified),
        })
    }
}

/// A client configuration that encrypts without checking the server's certificate (handshake
/// signatures are still checked): opportunistic TLS, and the load generator's sessions.
pub fn unverified_client() -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn add_pem(roots: &mut RootCertStore, pem: &[u8]) -> usize {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    roots.add_parsable_certificates(certs).0
}

/// Accepts any certificate, but still checks the handshake signatures (so the session key is
/// bound to the certificate presented).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
