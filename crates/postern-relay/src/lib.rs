//! postern-relay: outbound delivery. Routing and MX lookup, connection pools per next hop,
//! client sessions over glommio sockets, retries and DSN bounces.
//!
//! [`Relay`] is shared by all cores; the server makes one [`engine::CoreRelay`] per core
//! through [`Relay::factory`]. docs/delivery.md describes the behaviour an operator sees.

pub mod conn;
pub mod dsn;
pub mod engine;
pub mod fuzzing;
pub mod mime;
pub mod mx;
pub mod route;
pub mod tls;

pub use engine::{Relay, RelayConfig};
