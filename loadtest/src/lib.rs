//! postern-load is the load generator and sink that postern's throughput claims are measured
//! with: `send` drives many SMTP sessions from one glommio executor per core through
//! postern-proto's client state machine, and `sink` answers them through postern-proto's
//! server state machine, discarding (or recording) what it receives.
//!
//! Both sides only move bytes: the SMTP grammar, pipelining and dot-stuffing live in
//! postern-proto, so the generator exercises the same code the relay uses. Nothing here blocks
//! an executor: files (the sink's record, the sender's logs) are written by plain threads
//! that the executors hand batches to, and every loop is bounded by a message count, a
//! deadline or a read timeout. Costs per message on the sending side: one atomic ticket, one
//! formatted header block and one write for small bodies (large bodies are written from a
//! shared padding buffer without copying).

pub mod cli;
pub mod conn;
pub mod error;
pub mod executors;
pub mod mix;
pub mod send;
pub mod sink;
pub mod target;
pub mod tls;
pub mod units;

pub use error::LoadError;
