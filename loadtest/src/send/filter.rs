//! Hides PIPELINING from the client session when `--pipelining` is not given.
//!
//! postern-proto's client pipelines whenever the server offers it, as a relay should. To
//! measure a server the way an older client loads it, the sender passes the greeting and EHLO
//! replies through this filter, which drops the PIPELINING line, so the client session sends
//! one command per reply exactly as it does with a server that never offered it. Only the
//! replies before the session is ready pass through here; transaction replies go straight in.

use postern_proto::reply::{write_reply_line, ParsedReply, ReplyParser};

/// Re-writes complete replies without a PIPELINING line.
#[derive(Debug, Default)]
pub struct NoPipelining {
    parser: ReplyParser,
}

impl NoPipelining {
    /// Moves every complete reply at the start of `input` into `out` (without PIPELINING) and
    /// returns how many input bytes were used. A malformed reply is passed on as it is, for
    /// the client session to refuse.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut pos = 0;
        loop {
            match self.parser.parse(&input[pos..]) {
                ParsedReply::Complete { reply, consumed } => {
                    pos += consumed;
                    let lines: Vec<&String> = reply
                        .lines
                        .iter()
                        .enumerate()
                        .filter(|(i, l)| *i == 0 || !l.eq_ignore_ascii_case("PIPELINING"))
                        .map(|(_, l)| l)
                        .collect();
                    for (i, line) in lines.iter().enumerate() {
                        let text = match (i, reply.enhanced) {
                            (0, Some(e)) => format!("{e} {line}"),
                            _ => (*line).clone(),
                        };
                        write_reply_line(out, reply.code, i + 1 == lines.len(), &text);
                    }
                }
                ParsedReply::Incomplete { consumed } => return pos + consumed,
                ParsedReply::Error { .. } => {
                    out.extend_from_slice(&input[pos..]);
                    self.parser = ReplyParser::new();
                    return input.len();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelining_line_is_dropped_and_the_rest_kept() {
        let mut f = NoPipelining::default();
        let mut out = Vec::new();
        let input = b"220 mx ESMTP\r\n250-mx Hello\r\n250-PIPELINING\r\n250-SIZE 10\r\n250 PIPELINING\r\n250-par";
        let used = f.filter(input, &mut out);
        assert_eq!(used, input.len() - b"250-par".len());
        assert_eq!(
            String::from_utf8_lossy(&out),
            "220 mx ESMTP\r\n250-mx Hello\r\n250 SIZE 10\r\n"
        );
    }

    #[test]
    fn enhanced_codes_survive() {
        let mut f = NoPipelining::default();
        let mut out = Vec::new();
        f.filter(b"250 2.0.0 Ok\r\n", &mut out);
        assert_eq!(out, b"250 2.0.0 Ok\r\n");
    }
}
