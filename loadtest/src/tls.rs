//! TLS settings: the sink's server side from PEM files, and the sender's client side, which
//! does not check the server's certificate. postern-load measures servers its operator runs,
//! usually with a throw-away certificate; it never carries mail anybody reads, so an
//! unverified session costs nothing here, while verifying would make every test and benchmark
//! distribute a CA first.

use std::path::Path;
use std::sync::Arc;

use crate::error::LoadError;

/// A server configuration from a certificate chain and its key (PEM), as postern's own (the
/// sink answers to any name, so the certificate's names are not checked).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, LoadError> {
    postern_server::tls::server_config(cert, key, None)
        .map(|(config, _)| config)
        .map_err(|e| {
            // Files that do not hold a usable chain and key: a wrong flag value, named once
            // (the server's message already says TLS).
            let why = e.to_string();
            let why = why.strip_prefix("TLS: ").unwrap_or(&why).to_owned();
            LoadError::flag("--tls-cert/--tls-key", why)
        })
}

/// A client configuration that accepts any server certificate (see the module notes), the
/// one postern's relay uses for opportunistic TLS.
pub fn client_config() -> Result<Arc<rustls::ClientConfig>, LoadError> {
    postern_relay::tls::unverified_client().map_err(LoadError::Tls)
}
