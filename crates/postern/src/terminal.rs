//! Peer text made safe to show: nothing in it may move the cursor, colour the terminal, break
//! the line or reorder what follows.

use std::fmt::Write as _;

/// A peer's text (a next hop's reply, an address, a server's answer) as it is shown on a
/// terminal: control characters (a reply should hold none but tab, RFC 5321 4.2) and the
/// characters that reorder text or break the line are written as `\u{HEX}`, so that a hostile
/// or broken next hop, client or server cannot move the cursor, colour the terminal or make a
/// line read differently. A tab is a space.
/// A backslash is written `\\`, so that no text can pass for an escape of a character it
/// does not hold.
pub(crate) fn for_terminal(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if c == '\t' {
            out.push(' ');
        } else if unsafe_on_a_terminal(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

// Controls, bidi controls and line separators: what no peer text may show as itself.
pub(crate) use postern_proto::text::unfit_for_display as unsafe_on_a_terminal;
