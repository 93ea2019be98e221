//! TLS for the server side: a rustls configuration from PEM files.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;

use crate::error::StartError;

/// Loads a certificate chain and its private key (PEM) into a rustls server configuration
/// (TLS 1.2 and 1.3, rustls' safe defaults, ring as the crypto provider).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, StartError> {
    let bad = |path: &Path, why: String| StartError::Tls(format!("{}: {why}", path.display()));
    let mut reader = BufReader::new(File::open(cert).map_err(|e| bad(cert, e.to_string()))?);
    let certs = rustls_pemfile::certs(&mut reader)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(cert, "no certificate found".into()));
    }
    let key_pem = std::fs::read(key).map_err(|e| bad(key, e.to_string()))?;
    // PKCS#8 `ENCRYPTED PRIVATE KEY`, or a legacy PEM with `Proc-Type: 4,ENCRYPTED`.
    if key_pem.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(bad(
            key,
            "the private key is encrypted; postern needs it unencrypted (for example \
             `openssl pkey -in KEY -out KEY.plain`, then keep that file private)"
                .into(),
        ));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| bad(key, e.to_string()))?
        .ok_or_else(|| {
            bad(
                key,
                "no private key found (PEM, PKCS#1, PKCS#8 or SEC1)".into(),
            )
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| {
            StartError::Tls(format!(
                "{} and {}: {e}; the key must be the one of the first certificate in the \
                 file (the server's own, followed by its chain)",
                cert.display(),
                key.display()
            ))
        })?;
    Ok(Arc::new(config))
}
