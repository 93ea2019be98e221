//! Named caps on everything a peer controls. Every length check in the crate uses one of these.

/// Longest command line, CRLF included (RFC 5321 4.5.3.1.4). Configurable per server.
pub const MAX_COMMAND_LINE: usize = 512;
/// Extra octets a MAIL or RCPT line may have over the command line cap for the DSN
/// parameters (RFC 3461 4: 500 for NOTIFY and ORCPT on RCPT, 100 for RET and ENVID on MAIL,
/// here 500 for both).
pub const DSN_LINE_EXTRA: usize = 500;
/// Longest reply line the client side holds whole, CRLF included: a longer one has its start
/// kept and its tail skipped as it arrives (never buffered), and is read like any other.
/// RFC 5321 4.5.3.1 asks for as few limits as can be, and some servers write long reply
/// lines; beyond [`MAX_REPLY_LINE`] the text is cut. Taken as an error, a long line to a
/// body would leave the transaction's outcome unknown and the message sent again at every
/// retry.
pub const MAX_REPLY_LINE_READ: usize = 16 * 1024;
/// Longest reply line, CRLF included (RFC 5321 4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;
/// Lines of one reply the client side keeps; further lines are read and dropped (RFC 5321
/// sets no count, and an EHLO reply names one extension per line).
pub const MAX_REPLY_LINES: usize = 64;
/// Lines of one reply the client side reads at most, those dropped included: a server that
/// sends continuation lines without end would otherwise keep its connection reading (and its
/// core busy) until the reply's timeout. No server's reply comes near it (an EHLO reply
/// has a line per extension, a few dozen).
pub const MAX_REPLY_LINES_READ: usize = 1000;
/// Longest domain (RFC 5321 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Longest reverse or forward path, angle brackets included (RFC 5321 4.5.3.1.3).
pub const MAX_PATH: usize = 256;
/// Recipients a transaction must be able to hold at least (RFC 5321 4.5.3.1.8).
pub const MIN_RECIPIENTS: usize = 100;
/// Envelope octets (paths and ORCPT values) a transaction may keep for each recipient
/// `max_recipients` allows, on average: the usual address with an ORCPT takes under 100.
/// Past the budget RCPT is answered like past the recipient limit, so that a session's
/// memory does not grow with the length of what it is sent.
pub const ENVELOPE_BYTES_PER_RECIPIENT: usize = 128;
/// The least envelope budget: room for the longest reverse path and ENVID and
/// [`MIN_RECIPIENTS`] recipients of the longest form, each with the longest ORCPT (RFC 5321
/// 4.5.3.1.8 asks for 100 whatever their length).
pub const MIN_ENVELOPE_BYTES: usize =
    MAX_PATH + MAX_ENVID + MIN_RECIPIENTS * (MAX_PATH + MAX_ORCPT);
/// Longest ENVID value (RFC 3461 4.4).
pub const MAX_ENVID: usize = 100;
/// Longest ORCPT value (RFC 3461 4.2).
pub const MAX_ORCPT: usize = 500;
/// Digits accepted in a BDAT count: enough for any u64 below 10^19.
pub const MAX_DECIMAL_DIGITS: usize = 19;
/// Digits accepted in a SIZE value (RFC 1870 4: `1*20DIGIT`); past u64 it reads as too big.
pub const MAX_SIZE_DIGITS: usize = 20;
/// Error replies after which a session is ended with 421 (Postfix's hard error limit). The
/// count starts again after each message accepted, and `452 4.5.3` (too many recipients, an
/// answer RFC 5321 4.5.3.1.10 requires and clients act on) does not count below
/// [`MAX_RCPT_OVERSHOOT`].
pub const DEFAULT_MAX_ERRORS: u32 = 20;
/// Commands that move no mail forward (EHLO, HELO, RSET, NOOP, VRFY, EXPN, HELP, an empty BDAT
/// chunk not the last) between messages accepted before each further one also counts as an
/// error (Postfix's junk command limit, also 100): with the error limit, a session that sends
/// nothing else ends after 120.
pub const DEFAULT_MAX_JUNK_COMMANDS: u32 = 100;
/// RCPT commands past the recipient limit, in one transaction, answered `452 4.5.3` before
/// each further one also counts as an error (Postfix's recipient overshoot limit).
pub const MAX_RCPT_OVERSHOOT: usize = 1000;
