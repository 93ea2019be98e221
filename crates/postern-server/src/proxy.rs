//! The PROXY protocol (HAProxy's, versions 1 and 2) for connections from a load balancer in
//! `--proxy-from`: the header it sends before anything else names the real client, which is
//! then the session's client everywhere (connection limits, relay checks, the trace header,
//! the log). Parsed by the `ppp` crate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_lite::io::AsyncReadExt;
use glommio::net::TcpStream;
use ppp::{v1, v2, HeaderResult, PartialResult};

/// The longest header taken: a version 1 line is at most 107 octets; version 2 carries TLVs
/// (a cloud load balancer's endpoint ID, TLS facts) that stay far below this.
pub(crate) const MAX_HEADER: usize = 4096;

/// The longest version 1 line, its CR LF included.
const V1_MAX: usize = 107;

/// How long a connection from a load balancer has to send its header (the protocol asks
/// for it at once, in one piece).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The least it has, whatever `--command-timeout` says: a TCP retransmission's worth (the
/// protocol asks for at least 3 s).
pub(crate) const HEADER_TIMEOUT_LEAST: Duration = Duration::from_secs(3);

/// What [`read_header`] says of a connection closed before it sent anything: a balancer's
/// plain TCP health check, not a failure.
pub(crate) const CLOSED_BEFORE_A_BYTE: &str = "closed before a byte";

/// What a header says of the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Proxied {
    /// The real client, and the address it reached (the load balancer's).
    Client {
        /// The client.
        source: SocketAddr,
        /// The address it connected to.
        destination: SocketAddr,
    },
    /// The load balancer's own connection (a version 2 LOCAL command, its health check): the
    /// connection's own addresses stand.
    Local,
    /// A client the balancer cannot name (a version 1 `UNKNOWN`, a version 2 PROXY for a
    /// UNIX socket or of an unspecified family).
    Unknown,
}

/// The twelve octets a version 2 header begins with.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// A version 2 header's fixed part: the signature, the version and command, the family and
/// transport, and the length of what follows.
const V2_FIXED: usize = 16;

/// Reads the header at the start of `input`: the header and its length once it is whole,
/// None while more is needed, or why it is not one that can be taken.
pub(crate) fn parse(input: &[u8]) -> Result<Option<(Proxied, usize)>, String> {
    // A version 1 line is judged whole: cut short, the parser can take it for a bad one
    // (`... 40000 ` reads as a destination port missing).
    let v1_prefix = b"PROXY ";
    let starts_v1 = input.starts_with(v1_prefix) || v1_prefix.starts_with(input);
    if starts_v1 && memchr::memchr(b'\n', input).is_none() {
        if input.len() >= V1_MAX {
            return Err(format!("no end to a PROXY line within {V1_MAX} octets"));
        }
        return Ok(None);
    }
    // A version 2 LOCAL (the balancer's own connection) is taken whatever its address block
    // holds: the protocol has the receiver skip that block, family and all, by its length.
    if input.len() >= V2_FIXED && input.starts_with(V2_SIGNATURE) && input[12] == 0x20 {
        let len = V2_FIXED + usize::from(u16::from_be_bytes([input[14], input[15]]));
        if len > MAX_HEADER {
            return Err(format!("a PROXY header of {len} octets"));
        }
        return Ok((input.len() >= len).then_some((Proxied::Local, len)));
    }
    // Past version 2's signature the header is judged as version 2 alone: the crate's own
    // dispatch tries a bad one again as version 1 and would give that parser's reason.
    let parsed = if input.starts_with(V2_SIGNATURE) {
        HeaderResult::from(v2::Header::try_from(input))
    } else {
        HeaderResult::parse(input)
    };
    if parsed.is_incomplete() && starts_v1 {
        // Its line has ended (`PROXY TCP4 192.0.2.7` CR LF): there is nothing more to come.
        return Err("not a PROXY header (a line cut short)".into());
    }
    if parsed.is_incomplete() {
        if input.len() >= MAX_HEADER {
            return Err(format!("no PROXY header within {MAX_HEADER} octets"));
        }
        return Ok(None);
    }
    match parsed {
        HeaderResult::V1(Ok(h)) => {
            // Ports are plain decimal digits (the PROXY protocol's text, 2.1); the crate's
            // parser also takes a sign (`+25`).
            let line = h.header.trim_end_matches(['\r', '\n']);
            let fields: Vec<&str> = line.split(' ').collect();
            let digits = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
            if fields.len() == 6 && !fields[4..].iter().all(digits) {
                return Err("not a PROXY header (a port that is not a decimal number)".into());
            }
            let proxied = match h.addresses {
                v1::Addresses::Tcp4(a) => Proxied::Client {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                v1::Addresses::Tcp6(a) => Proxied::Client {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                v1::Addresses::Unknown => Proxied::Unknown,
            };
            Ok(Some((proxied, h.header.len())))
        }
        HeaderResult::V2(Ok(h)) => {
            if h.len() > MAX_HEADER {
                return Err(format!("a PROXY header of {} octets", h.len()));
            }
            // An unspecified transport (the family byte's low half 0): the protocol has the
            // receiver ignore the addresses.
            let transport_unspecified = input[13] & 0x0f == 0;
            let proxied = match (h.command, h.addresses) {
                (v2::Command::Local, _) => Proxied::Local,
                (v2::Command::Proxy, _) if transport_unspecified => Proxied::Unknown,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Proxied::Client {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Proxied::Client {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                },
                // A UNIX socket or an unspecified family carries no client address.
                (v2::Command::Proxy, _) => Proxied::Unknown,
            };
            Ok(Some((proxied, h.len())))
        }
        HeaderResult::V1(Err(e)) => Err(format!("not a PROXY header ({e})")),
        HeaderResult::V2(Err(e)) => Err(format!("not a PROXY header ({e})")),
    }
}

/// Reads the header a connection from a load balancer begins with, and nothing after it (an
/// implicit-TLS client's hello may follow in the same packet), by `deadline`.
///
/// Each look at the socket (a peek) is followed by taking the octets that belong to the
/// header: all of them while it is not whole (they cannot be anything else), the rest of it
/// once it is. So a header that comes in pieces is never looked at again before more of it
/// comes: the next peek waits for the network, and sees a close or a reset as it comes.
pub(crate) async fn read_header(tcp: &mut TcpStream, deadline: Instant) -> Result<Proxied, String> {
    let mut header: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        // `parse` refuses an unfinished header of MAX_HEADER octets: there is room.
        let room = MAX_HEADER.saturating_sub(header.len()).max(1);
        let left = deadline.saturating_duration_since(Instant::now());
        let peeked = crate::runtime::within(left, tcp.peek(&mut buf[..room])).await;
        let n = match peeked {
            None if header.is_empty() => return Err("no PROXY header in time".into()),
            None => return Err("no whole PROXY header in time".into()),
            Some(Err(e)) => {
                let e = std::io::Error::from(e);
                // A reset with nothing sent is a health check too (some end theirs so).
                if header.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset {
                    return Err(CLOSED_BEFORE_A_BYTE.into());
                }
                return Err(format!("reading the PROXY header: {e}"));
            }
            Some(Ok(0)) if header.is_empty() => return Err(CLOSED_BEFORE_A_BYTE.into()),
            Some(Ok(0)) => {
                return Err(format!(
                    "closed after {} octets of a PROXY header",
                    header.len()
                ))
            }
            Some(Ok(n)) => n,
        };
        let before = header.len();
        header.extend_from_slice(&buf[..n]);
        let take = match parse(&header)? {
            // What of this look is the header's: a header is longer than any part of it
            // found unfinished before.
            Some((proxied, len)) => match len.checked_sub(before) {
                Some(take) if take <= n => Ok((proxied, take)),
                _ => return Err("not a PROXY header (its length changed)".into()),
            },
            None => Err(n),
        };
        let len = match take {
            Ok((_, take)) | Err(take) => take,
        };
        tcp.read_exact(&mut buf[..len])
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if let Ok((proxied, _)) = take {
            return Ok(proxied);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn v2(command: u8, family: u8, addrs: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(command);
        h.push(family);
        let len = u16::try_from(addrs.len() + tlvs.len()).unwrap();
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addrs);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn version_1_names_the_client_and_its_length_leaves_what_follows() {
        let input = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n";
        let (p, len) = parse(input).unwrap().unwrap();
        assert_eq!(&input[len..], b"EHLO x\r\n");
        assert_eq!(
            p,
            Proxied::Client {
                source: "192.0.2.7:40000".parse().unwrap(),
                destination: "198.51.100.1:25".parse().unwrap(),
            }
        );
        let input = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n";
        let (p, len) = parse(input).unwrap().unwrap();
        assert_eq!(len, input.len());
        assert!(
            matches!(p, Proxied::Client { source, .. } if source == "[2001:db8::7]:40000".parse().unwrap())
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n").unwrap(),
            Some((Proxied::Unknown, 15))
        );
    }

    #[test]
    fn version_2_names_the_client_or_says_local() {
        let mut addrs = vec![192, 0, 2, 7, 198, 51, 100, 1];
        addrs.extend_from_slice(&40000u16.to_be_bytes());
        addrs.extend_from_slice(&25u16.to_be_bytes());
        // A TLV (type 0x04, NOOP) after the addresses is skipped.
        let mut h = v2(0x21, 0x11, &addrs, &[0x04, 0, 2, 1, 2]);
        let len = h.len();
        h.extend_from_slice(b"\x16\x03\x01");
        let (p, n) = parse(&h).unwrap().unwrap();
        assert_eq!(n, len);
        assert_eq!(
            p,
            Proxied::Client {
                source: "192.0.2.7:40000".parse().unwrap(),
                destination: "198.51.100.1:25".parse().unwrap(),
            }
        );
        let local = v2(0x20, 0x00, &[], &[]);
        assert_eq!(parse(&local).unwrap(), Some((Proxied::Local, 16)));
        let unspecified = v2(0x21, 0x00, &[], &[]);
        assert_eq!(parse(&unspecified).unwrap(), Some((Proxied::Unknown, 16)));
    }

    #[test]
    fn a_version_2_local_is_taken_whatever_its_address_block_and_unspecified_transport_names_no_one(
    ) {
        // LOCAL: the block is skipped by its length, family and all (an unknown family 0x41,
        // an IPv6 family with a 12-octet block), and what follows is left.
        for (family, block) in [
            (0x41u8, vec![7u8; 5]),
            (0x21, vec![0u8; 12]),
            (0x13, vec![]),
        ] {
            let mut h = v2(0x20, family, &block, &[]);
            let len = h.len();
            assert_eq!(parse(&h[..len - 1]).unwrap(), None, "{family:x}");
            h.extend_from_slice(b"EHLO x\r\n");
            assert_eq!(
                parse(&h).unwrap(),
                Some((Proxied::Local, len)),
                "{family:x}"
            );
        }
        // PROXY of an IPv4 family over an unspecified transport (0x10): no client is named.
        let mut addrs = vec![192, 0, 2, 7, 198, 51, 100, 1];
        addrs.extend_from_slice(&40000u16.to_be_bytes());
        addrs.extend_from_slice(&25u16.to_be_bytes());
        let h = v2(0x21, 0x10, &addrs, &[]);
        assert_eq!(parse(&h).unwrap(), Some((Proxied::Unknown, h.len())));
        // Over a stream (0x11), it is.
        let h = v2(0x21, 0x11, &addrs, &[]);
        assert!(matches!(
            parse(&h).unwrap(),
            Some((Proxied::Client { .. }, _))
        ));
    }

    #[test]
    fn mangled_headers_never_panic_nor_claim_more_than_was_read() {
        // Each valid header with octets changed, dropped or added here and there (a small
        // generator, seeded, so that a failure repeats).
        let mut v2_ipv6 = vec![0u8; 36];
        v2_ipv6[15] = 7;
        let seeds: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(
                0x21,
                0x11,
                &[192, 0, 2, 7, 198, 51, 100, 1, 0, 1, 0, 25],
                &[4, 0, 1, 9],
            ),
            v2(0x21, 0x21, &v2_ipv6, &[]),
            v2(0x20, 0x00, &[], &[]),
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut input = seeds[(next() % seeds.len() as u64) as usize].clone();
            for _ in 0..=(next() % 4) {
                let at = (next() as usize) % (input.len() + 1);
                match next() % 3 {
                    0 if at < input.len() => input[at] = next() as u8,
                    1 if at < input.len() => {
                        input.remove(at);
                    }
                    _ => input.insert(at, next() as u8),
                }
            }
            if let Ok(Some((_, len))) = parse(&input) {
                assert!(len > 0 && len <= input.len(), "{input:?}");
            }
        }
    }

    #[test]
    fn a_header_in_pieces_waits_and_anything_else_is_refused() {
        let whole = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n";
        for cut in 1..whole.len() {
            assert_eq!(parse(&whole[..cut]).unwrap(), None, "{cut}");
        }
        let h = v2(
            0x21,
            0x11,
            &[192, 0, 2, 7, 198, 51, 100, 1, 0, 1, 0, 25],
            &[],
        );
        for cut in 1..h.len() {
            assert_eq!(parse(&h[..cut]).unwrap(), None, "{cut}");
        }
        for bad in [
            &b"EHLO client.test\r\n"[..],
            b"PROXY TCP4 192.0.2.7\r\n",
            b"PROXY TCP4 999.0.2.7 198.51.100.1 40000 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 +1 +25\r\n",
            b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 +25\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // A version 2 header that is wrong past its signature is refused for what is wrong
        // with it as version 2, not as a version 1 line.
        let mut bad_version = v2(
            0x21,
            0x11,
            &[192, 0, 2, 7, 198, 51, 100, 1, 0, 1, 0, 25],
            &[],
        );
        bad_version[12] = 0x31;
        let reason = parse(&bad_version).unwrap_err();
        assert!(reason.contains("version 3"), "{reason}");
        let mut bad_command = bad_version.clone();
        bad_command[12] = 0x2f;
        let reason = parse(&bad_command).unwrap_err();
        assert!(reason.contains("command F"), "{reason}");
        // A version 1 line past its 107 octets never ends.
        let long = format!("PROXY TCP4 {}", "1".repeat(200));
        assert!(parse(long.as_bytes()).is_err());
    }
}
