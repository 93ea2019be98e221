//! postern-proto owns everything postern knows about the SMTP language: the line framer, the
//! DATA and BDAT body decoders, the dot-stuffing encoder, the command and reply grammar, and
//! the server and client session state machines.
//!
//! It does no I/O, has no async, and reads no clock: bytes go in, replies and events come out,
//! and the embedding (the server, the relay, the load generator) moves bytes and keeps time.
//! Parsers borrow from the caller's buffer and report how much they consumed; the hot path
//! (framing, command parsing, body decoding) allocates nothing per line. Every length a peer
//! controls has a named cap in [`limits`]. The only `unsafe` is the AVX2 block classifier of
//! the DATA fast path, in the `scan` module.

pub mod address;
pub mod bdat;
pub mod client;
pub mod command;
pub mod crlf;
pub mod data;
pub mod envelope;
pub mod framer;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod params;
pub mod reply;
mod scan;
pub mod server;
pub mod stuff;
pub mod text;

pub use address::{ForwardPath, Host, Mailbox, PathError, ReversePath};
pub use command::{Command, CommandError};
pub use envelope::{Envelope, Recipient};
pub use params::{BodyType, MailParams, Notify, RcptParams, Ret};
pub use reply::{EnhancedCode, Reply, ReplyParser, StaticReply};
pub use server::{BareNewlinePolicy, Event, RefusedMessage, ServerConfig, ServerSession, Step};
