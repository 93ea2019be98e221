//! Inputs shared by postern's benchmarks: realistic command streams and message bodies,
//! generated deterministically so every run measures the same bytes.
#![forbid(unsafe_code)]

/// A pipelined command stream: `transactions` transactions of MAIL, three RCPTs, BDAT, RSET.
pub fn command_stream(transactions: usize) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut lines = 0;
    for i in 0..transactions {
        for line in [
            format!("MAIL FROM:<sender{i}@origin.example.com> SIZE=10240 BODY=8BITMIME"),
            format!("RCPT TO:<first.recipient{i}@destination.example.net>"),
            format!("RCPT TO:<second{i}@destination.example.net> NOTIFY=FAILURE,DELAY"),
            "RCPT TO:<third@[192.0.2.1]>".to_owned(),
            "BDAT 10240 LAST".to_owned(),
            "RSET".to_owned(),
            "NOOP".to_owned(),
            "EHLO client.example.org".to_owned(),
        ] {
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
            lines += 1;
        }
    }
    (out, lines)
}

/// A dot-stuffed DATA body of about `size` bytes (76-column text, some dot lines), ended by
/// `.CRLF`, as it arrives on the wire.
pub fn data_wire(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(
        b"From: a@example.com\r\nTo: b@example.net\r\nSubject: benchmark\r\n\r\n",
    );
    let mut n: u32 = 12345;
    while out.len() < size {
        n = n.wrapping_mul(1_103_515_245).wrapping_add(12345);
        if n % 50 == 0 {
            out.extend_from_slice(b"..a line that started with a dot\r\n");
            continue;
        }
        for k in 0..74u32 {
            out.push(b'a' + ((n >> (k % 16)) % 26) as u8);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}
