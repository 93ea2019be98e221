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
use rustls::crypto::CryptoProvider;
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
    /// How many trust anchors `verified` has: none, and no next hop can be verified.
    pub anchors: usize,
    /// Why the system's trust store gave none, when it gave none.
    pub system_errors: Vec<String>,
}

impl TlsClients {
    /// Builds both; `extra_ca` adds trust anchors from a PEM file. The system's trust store
    /// is found as OpenSSL finds it: `SSL_CERT_FILE` and `SSL_CERT_DIR` when set, otherwise
    /// the distribution's bundle (Debian's, Red Hat's, SUSE's, Alpine's, the BSDs').
    pub fn new(extra_ca: Option<&Path>) -> Result<TlsClients, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        let system = rustls_native_certs::load_native_certs();
        let (mut anchors, _) = roots.add_parsable_certificates(system.certs);
        let system_errors = if anchors == 0 {
            system.errors.iter().map(ToString::to_string).collect()
        } else {
            Vec::new()
        };
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path)
                .map_err(|e| format!("--outbound-tls-ca {}: {e}", path.display()))?;
            let (added, left_out) = add_pem(&mut roots, &pem)
                .map_err(|e| format!("--outbound-tls-ca {}: {e}", path.display()))?;
            if left_out > 0 && added > 0 {
                tracing::warn!(
                    "--outbound-tls-ca {}: {left_out} of its certificates cannot be trust \
                     anchors and are left out ({added} taken)",
                    path.display()
                );
            }
            if added == 0 && left_out > 0 {
                return Err(format!(
                    "--outbound-tls-ca {}: none of its {left_out} certificates can be a trust \
                     anchor",
                    path.display()
                ));
            }
            if added == 0 {
                return Err(format!(
                    "--outbound-tls-ca {}: no certificate in it",
                    path.display()
                ));
            }
            anchors += added;
        }
        let verified = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsClients {
            unverified: unverified_client()?,
            verified: Arc::new(verified),
            anchors,
            system_errors,
        })
    }

    /// For `--outbound-tls required`: an error saying why no next hop could be verified when
    /// there is no trust anchor at all, which would otherwise defer every message until it
    /// is returned.
    pub fn check_required(&self) -> Result<(), String> {
        if self.anchors > 0 {
            return Ok(());
        }
        let why = if self.system_errors.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.system_errors.join("; "))
        };
        Err(format!(
            "--outbound-tls required: no trust anchor to verify next hops with: the system's \
             trust store has none{why}; install the CA certificates (ca-certificates), point \
             SSL_CERT_FILE or SSL_CERT_DIR at them, or give --outbound-tls-ca"
        ))
    }
}

/// A client configuration that encrypts without checking the server's certificate (see
/// [`EncryptOnly`]): opportunistic TLS, and the load generator's sessions.
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

/// Adds the certificates of a PEM file as trust anchors: how many, and how many could not be
/// taken. A PEM block that cannot be read (a file cut or damaged) fails the whole file: a CA
/// left out without a word would defer the mail of the next hops it signs until it is
/// returned. A certificate that is no trust anchor to rustls is left out and counted (whole
/// distribution bundles hold a few such roots), for the caller to say.
fn add_pem(roots: &mut RootCertStore, pem: &[u8]) -> Result<(usize, usize), String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .enumerate()
        .map(|(i, c)| c.map_err(|e| format!("PEM block {} cannot be read ({e})", i + 1)))
        .collect::<Result<_, _>>()?;
    Ok(roots.add_parsable_certificates(certs))
}

/// Accepts any certificate, and the handshake's signature made with it without checking it:
/// a certificate nobody verifies binds the session to no one (whoever could change the
/// handshake would present a certificate of its own), so that check adds nothing, and it
/// parses the certificate strictly (X.509 version 3 only, RSA keys of 2048 bits or more),
/// which failed the handshakes of old MTAs with certificates made otherwise: their mail then
/// went in cleartext. Opportunistic TLS encrypts wherever the next hop can (RFC 7435).
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
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
