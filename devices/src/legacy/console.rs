//! The serial console's sink: copies guest output to wherever the VMM sends the console
//! (stdout, stderr, a log file: any number of outputs, possibly none), keeps the last
//! `TAIL_BYTES` in memory for a post-mortem, and watches for a kernel panic, so microvm can
//! exit non-zero when the guest resets after panicking.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Printed by every Linux panic() before it reboots (with `panic=-1`).
pub const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// How much recent console output `ConsoleTail` keeps.
pub const TAIL_BYTES: usize = 64 * 1024;

/// The last bytes the guest wrote to its console, bounded, so a run that ends badly can
/// still show why (a panic message, the last lines before a hang) when the console itself
/// went nowhere visible. Shared by the console writer (vCPU thread) and the VMM.
pub struct ConsoleTail {
    capacity: usize,
    bytes: Mutex<VecDeque<u8>>,
}

impl ConsoleTail {
    pub fn new(capacity: usize) -> Self {
        ConsoleTail {
            capacity,
            bytes: Mutex::new(VecDeque::with_capacity(capacity.min(TAIL_BYTES))),
        }
    }

    fn push(&self, buf: &[u8]) {
        let mut bytes = crate::virtio::lock(&self.bytes);
        // Only the last `capacity` bytes of `buf` can survive.
        let buf = &buf[buf.len().saturating_sub(self.capacity)..];
        let overflow = (bytes.len() + buf.len()).saturating_sub(self.capacity);
        bytes.drain(..overflow);
        bytes.extend(buf);
    }

    /// The last `n` lines (a trailing partial line counts), made safe to print to a
    /// terminal or a CI log: the guest is untrusted, so control characters (escape
    /// sequences, carriage returns, ...) are replaced and invalid UTF-8 is substituted.
    pub fn last_lines(&self, n: usize) -> Vec<String> {
        let bytes: Vec<u8> = crate::virtio::lock(&self.bytes).iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let mut lines: Vec<&str> = text.split('\n').collect();
        if lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        let skip = lines.len().saturating_sub(n);
        lines[skip..].iter().map(|l| sanitize(l)).collect()
    }
}

fn sanitize(line: &str) -> String {
    line.chars()
        .filter(|c| *c != '\r')
        .map(|c| {
            if c == '\t' || !c.is_control() {
                c
            } else {
                '\u{fffd}'
            }
        })
        .collect()
}

/// One destination of the console, named for the one warning printed if it fails.
pub struct ConsoleOutput {
    name: String,
    out: Box<dyn Write + Send>,
}

impl ConsoleOutput {
    pub fn new(name: impl Into<String>, out: Box<dyn Write + Send>) -> Self {
        ConsoleOutput {
            name: name.into(),
            out,
        }
    }
}

pub struct ConsoleWriter {
    outputs: Vec<ConsoleOutput>,
    tail: Arc<ConsoleTail>,
    /// The tail of the output so far, long enough to find a marker split across writes.
    window: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl ConsoleWriter {
    pub fn new(
        outputs: Vec<ConsoleOutput>,
        tail: Arc<ConsoleTail>,
        panicked: Arc<AtomicBool>,
    ) -> Self {
        ConsoleWriter {
            outputs,
            tail,
            window: Vec::with_capacity(PANIC_MARKER.len() * 2),
            panicked,
        }
    }
}

impl Write for ConsoleWriter {
    /// Never fails: an output that can't be written (a closed pipe, a full disk) is dropped
    /// after one warning, and the guest's console keeps working for the others.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.panicked.load(Ordering::Relaxed) {
            self.window.extend_from_slice(buf);
            if self
                .window
                .windows(PANIC_MARKER.len())
                .any(|w| w == PANIC_MARKER)
            {
                self.panicked.store(true, Ordering::SeqCst);
            }
            let keep = PANIC_MARKER.len() - 1;
            if self.window.len() > keep {
                self.window.drain(..self.window.len() - keep);
            }
        }
        self.tail.push(buf);
        // The guest writes a byte at a time: flush so the console is live.
        self.outputs.retain_mut(
            |o| match o.out.write_all(buf).and_then(|()| o.out.flush()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(
                        "guest console: cannot write to {}: {e}; no more console output there",
                        o.name
                    );
                    false
                }
            },
        );
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        for o in &mut self.outputs {
            let _ = o.out.flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn writer(outputs: Vec<ConsoleOutput>) -> (ConsoleWriter, Arc<ConsoleTail>, Arc<AtomicBool>) {
        let tail = Arc::new(ConsoleTail::new(TAIL_BYTES));
        let flag = Arc::new(AtomicBool::new(false));
        (
            ConsoleWriter::new(outputs, tail.clone(), flag.clone()),
            tail,
            flag,
        )
    }

    #[test]
    fn finds_marker_split_across_bytes() {
        let (mut w, _, flag) = writer(Vec::new());
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
        let sink = Sink::default();
        let (mut w, _, flag) = writer(vec![ConsoleOutput::new("test", Box::new(sink.clone()))]);
        w.write_all(b"Kernel is fine, not panicking\n").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        assert_eq!(*sink.0.lock().unwrap(), b"Kernel is fine, not panicking\n");
    }

    #[test]
    fn every_output_gets_everything_and_a_broken_one_is_dropped() {
        let (a, b) = (Sink::default(), Sink::default());
        let (mut w, tail, _) = writer(vec![
            ConsoleOutput::new("a", Box::new(a.clone())),
            ConsoleOutput::new("broken", Box::new(Broken)),
            ConsoleOutput::new("b", Box::new(b.clone())),
        ]);
        for byte in b"one\ntwo\n" {
            w.write_all(&[*byte]).unwrap();
        }
        assert_eq!(w.outputs.len(), 2);
        assert_eq!(*a.0.lock().unwrap(), b"one\ntwo\n");
        assert_eq!(*b.0.lock().unwrap(), b"one\ntwo\n");
        assert_eq!(tail.last_lines(10), vec!["one", "two"]);
    }

    #[test]
    fn tail_keeps_only_the_last_bytes_and_lines() {
        let tail = ConsoleTail::new(16);
        tail.push(b"first line\nsecond line\nthird");
        // The last 16 bytes: "econd line\nthird".
        assert_eq!(tail.last_lines(10), vec!["econd line", "third"]);
        assert_eq!(tail.last_lines(1), vec!["third"]);
        tail.push(&[b'x'; 100]);
        assert_eq!(tail.last_lines(10), vec!["x".repeat(16)]);
        assert!(ConsoleTail::new(16).last_lines(5).is_empty());
    }

    #[test]
    fn tail_is_safe_to_print() {
        let tail = ConsoleTail::new(TAIL_BYTES);
        tail.push(b"ok\r\n\x1b[2Jcleared?\x07\tend\xff\n");
        assert_eq!(
            tail.last_lines(5),
            vec!["ok", "\u{fffd}[2Jcleared?\u{fffd}\tend\u{fffd}"]
        );
    }
}
