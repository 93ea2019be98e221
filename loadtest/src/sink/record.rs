//! `--record`: one line per accepted message, `SEQ MESSAGE-ID`, taken from the message's own
//! headers, so a test can prove that nothing was lost or duplicated. Executors gather lines in
//! memory and hand full batches to a writer thread; no executor ever waits for the disk.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::error::LoadError;

/// Header bytes kept per message to find the two headers; the sender's fit in a few hundred.
const MAX_HEADER: usize = 8 * 1024;

/// A batch is handed to the writer once it is this large.
pub const BATCH: usize = 64 * 1024;

/// The headers of the message being received, up to the empty line or the cap.
#[derive(Debug, Default)]
pub struct HeaderScan {
    buf: Vec<u8>,
    done: bool,
}

impl HeaderScan {
    /// Forgets the previous message.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.done = false;
    }

    /// Looks at the next body bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        let room = MAX_HEADER - self.buf.len();
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if self.buf.len() >= MAX_HEADER || self.buf.windows(4).any(|w| w == b"\r\n\r\n") {
            self.done = true;
        }
    }

    /// Appends `SEQ MESSAGE-ID\n` to `out` (`-` for a header that is missing).
    pub fn line(&self, out: &mut Vec<u8>) {
        let mut seq: &[u8] = b"-";
        let mut id: &[u8] = b"-";
        for line in self.buf.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                break;
            }
            if let Some(v) = value(line, b"x-postern-load-seq:") {
                seq = v;
            } else if let Some(v) = value(line, b"message-id:") {
                id = v;
            }
        }
        out.extend_from_slice(seq);
        out.push(b' ');
        out.extend_from_slice(id);
        out.push(b'\n');
    }
}

fn value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let head = line.get(..name.len())?;
    if !head.eq_ignore_ascii_case(name) {
        return None;
    }
    let v = line[name.len()..].trim_ascii();
    (!v.is_empty() && !v.contains(&b' ')).then_some(v)
}

/// The writer thread and the way to it.
pub struct Recorder {
    tx: mpsc::Sender<Vec<u8>>,
    thread: JoinHandle<std::io::Result<()>>,
}

impl Recorder {
    /// Creates (truncates) `path` and starts the writer.
    pub fn start(path: &Path) -> Result<Self, LoadError> {
        let file = File::create(path).map_err(|e| LoadError::flag_file("--record", path, e))?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("postern-load-record".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(BATCH, file);
                // Bounded: ends when every sender is dropped, at the sink's exit. Each batch
                // reaches the file when it comes (the executors hand theirs over at least
                // every watch tick), so a harness reading it during the run, or after the
                // sink was killed, sees what was accepted up to then.
                for batch in rx {
                    out.write_all(&batch)?;
                    out.flush()?;
                }
                out.flush()
            })
            .map_err(|e| LoadError::file(path, e))?;
        Ok(Self { tx, thread })
    }

    /// A sender for one executor.
    pub fn sender(&self) -> mpsc::Sender<Vec<u8>> {
        self.tx.clone()
    }

    /// Waits until every batch is written.
    pub fn finish(self, path: &Path) -> Result<(), LoadError> {
        drop(self.tx);
        match self.thread.join() {
            Ok(r) => r.map_err(|e| LoadError::file(path, e)),
            Err(_) => Err(LoadError::Internal("the record writer failed".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_both_headers_across_pieces() {
        let mut scan = HeaderScan::default();
        scan.feed(b"Message-ID: <a.1@x>\r\nX-Postern-Lo");
        scan.feed(b"ad-Seq: 17\r\nSubject: x\r\n\r\nX-Postern-Load-Seq: 99\r\n");
        let mut out = Vec::new();
        scan.line(&mut out);
        assert_eq!(out, b"17 <a.1@x>\n");
        scan.reset();
        scan.feed(b"Subject: none\r\n\r\n");
        out.clear();
        scan.line(&mut out);
        assert_eq!(out, b"- -\n");
    }
}
