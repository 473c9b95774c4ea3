//! The serial console's sink: copies guest output to the host and watches it for a kernel
//! panic, so microvm can exit non-zero when the guest resets after panicking.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Printed by every Linux panic() before it reboots (with `panic=-1`).
pub const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

pub struct ConsoleWriter<W: Write + Send> {
    out: W,
    /// The tail of the output so far, long enough to find a marker split across writes.
    window: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl<W: Write + Send> ConsoleWriter<W> {
    pub fn new(out: W, panicked: Arc<AtomicBool>) -> Self {
        ConsoleWriter {
            out,
            window: Vec::with_capacity(PANIC_MARKER.len() * 2),
            panicked,
        }
    }
}

impl<W: Write + Send> Write for ConsoleWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.panicked.load(Ordering::Relaxed) {
            self.window.extend_from_slice(buf);
            if self.window.windows(PANIC_MARKER.len()).any(|w| w == PANIC_MARKER) {
                self.panicked.store(true, Ordering::SeqCst);
            }
            let keep = PANIC_MARKER.len() - 1;
            if self.window.len() > keep {
                self.window.drain(..self.window.len() - keep);
            }
        }
        // The guest writes a byte at a time: flush so the console is live.
        self.out.write_all(buf)?;
        self.out.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_marker_split_across_bytes() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = ConsoleWriter::new(Vec::new(), flag.clone());
        for b in b"[ 1.0] Kernel panic - not syncing: VFS".iter() {
            w.write_all(&[*b]).unwrap();
            if flag.load(Ordering::SeqCst) {
                break;
            }
        }
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = ConsoleWriter::new(Vec::new(), flag.clone());
        w.write_all(b"Kernel is fine, not panicking\n").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        assert_eq!(w.out, b"Kernel is fine, not panicking\n");
    }
}
