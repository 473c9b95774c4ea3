//! The command channel: `microvm ... -- CMD` gives the command microvm's own stdin, stdout
//! and stderr, byte-exact, over virtio-console (vmm/src/channel.rs, resources/init's
//! channel.rs). Real guest boots; each checks several things.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use microvm_tests::{busybox_image, guest, microvm_bin, scratch_dir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

struct Out {
    status: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = String::from_utf8_lossy(&self.stdout[..self.stdout.len().min(300)]).into_owned();
        write!(f, "exit {:?}; {} bytes on stdout, starting {head:?}\n--- stderr ---\n{}", self.status, self.stdout.len(), self.stderr)
    }
}

/// Runs microvm with `input` on its stdin (then EOF); reads its stdout with `read` (which
/// may be slow); SIGKILLs it after `timeout`.
fn run(args: &[&str], input: &[u8], read: impl FnOnce(&mut dyn Read) -> Vec<u8>) -> Out {
    let mut child = Command::new(microvm_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn microvm");
    let pid = child.id() as i32;
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            // SAFETY: signal 0 only checks that the process exists (still a zombie at worst).
            if unsafe { libc::kill(pid, 0) } != 0 {
                return;
            }
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let stdout = read(child.stdout.as_mut().unwrap());
    let status = child.wait().expect("wait for microvm").code();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap()).into_owned();
    // The killer notices the exit within 200 ms.
    killer.join().unwrap();
    Out { status, stdout, stderr }
}

fn read_all(r: &mut dyn Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).expect("read microvm's stdout");
    v
}

/// On a root that knows nothing of microvm: a binary file arrives byte-exact on stdout
/// (nothing else is there: the kernel log and the init's lines are on stderr), stdin
/// reaches the command and ends (`tr` reads it to EOF), stderr is separate, and the
/// status comes back.
#[test]
fn binary_stdout_stdin_to_eof_stderr_and_status_on_a_disk_root() {
    let dir = scratch_dir("channel-disk");
    let image = busybox_image(&dir);
    let (kernel, _) = guest();
    // `again`: see SH_CHECK (this host's PVM sometimes crashes a process as it starts).
    let script = format!("{} again cat /bin/busybox; again tr a-z A-Z; echo out; echo err >&2; exit 3", microvm_tests::SH_CHECK);
    let args = [
        "--kernel", kernel.to_str().unwrap(),
        "--disk", image.to_str().unwrap(),
        "-v", "--cmdline", "quiet",
        "--", "sh", "-c", &script,
    ];
    let out = run(&args, b"abc\n", read_all);
    assert_eq!(out.status, Some(3), "{out:?}");
    let mut expected = std::fs::read("/bin/busybox").unwrap();
    expected.extend_from_slice(b"ABC\nout\n");
    assert!(out.stdout == expected, "stdout is not exactly busybox + ABC + out: {out:?}");
    assert!(out.stderr.lines().any(|l| l == "err"), "{out:?}");
    // The console (the init's marker) went to stderr, not into the command's stdout.
    assert!(out.stderr.contains("MICROVM-INIT-READY"), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The host root (no --disk): 16 MiB written by the guest reach a host reader that stalls
/// for seconds and then reads in small chunks with pauses, every byte in order (the guest
/// is slowed down, nothing is dropped); a command's stdin that is closed gives it EOF.
#[test]
fn sixteen_mib_to_a_slow_reader_on_the_host_root() {
    let (kernel, _) = guest();
    // Distinct lines: a lost, repeated or reordered chunk changes the content.
    const LINES: u32 = 2_300_000;
    let expected: Vec<u8> = (1..=LINES).flat_map(|i| format!("{i}\n").into_bytes()).collect();
    assert!(expected.len() >= 16 << 20);
    let script = format!("{} again cat > /dev/null; again seq 1 {LINES}; echo done >&2", microvm_tests::SH_CHECK);
    let args = ["--kernel", kernel.to_str().unwrap(), "-v", "--cmdline", "quiet", "--", "sh", "-c", &script];
    let out = run(&args, b"", |r| {
        let mut v = Vec::new();
        let mut buf = [0u8; 4096];
        let mut stalled = false;
        loop {
            let n = r.read(&mut buf).expect("read microvm's stdout");
            if n == 0 {
                return v;
            }
            v.extend_from_slice(&buf[..n]);
            if !stalled && v.len() >= 1 << 20 {
                // Far longer than the guest needs to fill the pipe and the queue.
                std::thread::sleep(Duration::from_secs(5));
                stalled = true;
            } else if v.len() % (64 << 10) < n {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    assert_eq!(out.status, Some(0), "{out:?}");
    assert_eq!(out.stdout.len(), expected.len(), "{out:?}");
    assert!(out.stdout == expected, "the 16 MiB differ (order or content): {out:?}");
    assert!(out.stderr.lines().any(|l| l == "done"), "{out:?}");
}
