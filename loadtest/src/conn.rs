//! A connection in cleartext or inside TLS (after STARTTLS), for either side, with reads that
//! give up after a timeout so that no session can wait forever: postern's own connection type.

pub use postern_server::conn::Conn;
