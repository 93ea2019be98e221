//! The one error type of postern-load. Every variant is a local problem the operator fixes
//! (a flag, a file, a limit of the machine); what peers do wrong is counted, not raised.

use std::net::SocketAddr;

/// Why postern-load cannot start or finish a run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A flag value could not be read.
    #[error("invalid value for {flag}: {why}")]
    Flag {
        /// The flag, with its dashes.
        flag: &'static str,
        /// What was wrong with it.
        why: String,
    },
    /// The target resolves to an address that is not loopback and `--allow-remote` was not given.
    #[error(
        "refusing --target {addr}: it is not a loopback address; pass --allow-remote to load a \
         remote server (only one you are allowed to load)"
    )]
    RemoteTarget {
        /// The first non-loopback address found.
        addr: SocketAddr,
    },
    /// The target name did not resolve.
    #[error("cannot resolve --target {target}: {why}")]
    Resolve {
        /// The name as given.
        target: String,
        /// The resolver's answer.
        why: String,
    },
    /// A glommio executor could not start (io_uring missing, locked-memory limit too low).
    #[error("{0}")]
    Executor(String),
    /// A listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// The system's answer.
        source: std::io::Error,
    },
    /// A TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// An output or input file could not be written or read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The system's answer.
        source: std::io::Error,
    },
    /// The latency plot could not be drawn.
    #[error("plot {path}: {why}")]
    Plot {
        /// The SVG file.
        path: String,
        /// The plotting library's answer.
        why: String,
    },
    /// Something the run needs failed in a way the operator can only report.
    #[error("{0}")]
    Internal(String),
}

impl LoadError {
    /// Whether the operator fixes this by changing a flag (exit code 2).
    pub fn is_flag(&self) -> bool {
        matches!(
            self,
            LoadError::Flag { .. } | LoadError::RemoteTarget { .. } | LoadError::Resolve { .. }
        )
    }

    /// A flag error.
    pub fn flag(flag: &'static str, why: impl Into<String>) -> Self {
        LoadError::Flag {
            flag,
            why: why.into(),
        }
    }

    /// A file named by `flag` that cannot be made: a wrong flag value, found before the run.
    pub fn flag_file(flag: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        LoadError::flag(flag, format!("{}: {source}", path.display()))
    }

    /// A file error.
    pub fn file(path: &std::path::Path, source: std::io::Error) -> Self {
        LoadError::File {
            path: path.display().to_string(),
            source,
        }
    }
}
