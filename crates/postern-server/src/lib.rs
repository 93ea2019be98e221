//! postern-server runs the SMTP side of postern: one glommio executor per core, each with its
//! own SO_REUSEPORT listeners, sessions that move bytes between sockets, postern-proto's server
//! state machine and the core's postern-spool, STARTTLS and implicit TLS with rustls, limits
//! and timeouts, and per-core metrics merged at scrape time.
//!
//! A session never leaves the core that accepted it, and nothing on a core's hot path takes a
//! lock or blocks: the spool's sync runs on glommio's blocking pool, the connection limits are
//! atomics, and the metrics port has a thread of its own.

pub mod config;
pub mod conn;
mod core;
pub mod delivery;
pub mod error;
mod limits;
mod listener;
pub mod metrics;
mod metrics_http;
mod proxy;
mod received;
pub mod relay;
mod runtime;
mod session;
mod store;
pub mod tls;
mod turns;
mod watchdog;

pub use config::{Settings, TlsFiles};
pub use core::{log_due_at, Deletions, StopFlag, MAX_DELETIONS_ASKED};
pub use error::StartError;
pub use postern_spool::DirLock;
pub use received::rfc5322_date;
pub use runtime::{
    check_listen, ipv6_is_dual_stack, lock_spool, memlock_limit, memlock_limit_text, note_panic,
    raise_open_file_limit, start, start_locked, start_with, still_listening, OpenFileLimit,
    Running, MIN_MEMLOCK, TLS_REFUSALS_MAX,
};
pub use turns::GiveWay;
