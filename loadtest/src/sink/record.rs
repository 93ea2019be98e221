//! `--record`: one line per accepted message, `SEQ MESSAGE-ID`, taken from the message's own
//! headers, so a test can prove that nothing was lost or duplicated. Executors gather lines in
//! memory and write them to the file before the replies that accept those messages go out.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

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

/// The record file, written by the executors themselves: each writes its lines before the
/// replies that accept those messages go out, so a sink killed at any moment has recorded
/// every message it said 250 to (a write to the page cache, which outlives the process; the
/// executors do not wait for the disk).
pub struct Recorder {
    file: File,
    failed: AtomicBool,
}

impl Recorder {
    /// Creates (truncates) `path`.
    pub fn start(path: &Path) -> Result<Arc<Self>, LoadError> {
        let file = File::create(path).map_err(|e| LoadError::flag_file("--record", path, e))?;
        Ok(Arc::new(Self {
            file,
            failed: AtomicBool::new(false),
        }))
    }

    /// Appends `lines` (whole lines) to the file, in one write where the kernel allows.
    pub fn write(&self, lines: &[u8]) {
        if (&self.file).write_all(lines).is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    /// Whether every write succeeded.
    pub fn finish(&self, path: &Path) -> Result<(), LoadError> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(LoadError::file(
                path,
                std::io::Error::other("a write of the record failed"),
            ));
        }
        Ok(())
    }
}
