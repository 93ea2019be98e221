//! Errors that stop the server from starting. Each says what the operator should change.

/// Why the server could not start. Always a local, permanent problem.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
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
