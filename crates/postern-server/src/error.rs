//! Errors that stop the server from starting. Each says what the operator should change.

/// Why the server could not start. Always a local, permanent problem.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}{}", bind_advice(source, addr))]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// An executor could not be created (io_uring, memlock).
    #[error("{0}")]
    Executor(String),
    /// The spool directory is not usable.
    #[error("spool: {0}")]
    Spool(String),
    /// The metrics listener could not be started.
    #[error("metrics listener: {0}")]
    Metrics(String),
}

/// What to do about a bind that failed, where the error alone does not say it.
fn bind_advice(e: &std::io::Error, addr: &std::net::SocketAddr) -> String {
    match e.raw_os_error() {
        Some(libc::EACCES) if (1..1024).contains(&addr.port()) => {
            "; ports below 1024 need root or the CAP_NET_BIND_SERVICE capability \
             (AmbientCapabilities=CAP_NET_BIND_SERVICE in a systemd unit)"
                .into()
        }
        Some(libc::EADDRNOTAVAIL) => {
            "; that address is not one of this machine's (see `ip addr`; 0.0.0.0 and [::] take all)"
                .into()
        }
        _ => String::new(),
    }
}
