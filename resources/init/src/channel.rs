//! The command channel's guest end: the virtio-console ports microvm names
//! `protocol::PORT_STDIN/STDOUT/STDERR` (vmm/src/channel.rs), opened for the command's fds
//! 0, 1 and 2. Without them (a kernel without CONFIG_VIRTIO_CONSOLE) the command gets the
//! console, after a one-line warning.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::protocol::{Params, COMMAND_MESSAGE_MAX, PORT_CONTROL, PORT_STDERR, PORT_STDIN, PORT_STDOUT, READY_MESSAGE};
use crate::sys::{self, Fail, Result};

/// How long the ports may take to appear after the driver bound the device (the kernel
/// creates them from a workqueue as microvm's control messages arrive; in practice they
/// are there long before init runs).
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(10);
/// virtio device ID of a console (virtio 1.x, 5).
const VIRTIO_ID_CONSOLE: &str = "0x0003";

/// The stdio ports opened before a snapshot (see `wait_for_command`): a restore then starts
/// the command without scanning sysfs again (every guest kernel instruction counts where
/// they are emulated).
static PREOPENED: std::sync::Mutex<Option<[OwnedFd; 3]>> = std::sync::Mutex::new(None);

/// The command's stdin, stdout and stderr ports, opened; None (after a warning) when the
/// kernel did not give them.
pub fn open_ports() -> Option<[OwnedFd; 3]> {
    if let Some(ports) = PREOPENED.lock().ok().and_then(|mut p| p.take()) {
        return Some(ports);
    }
    open_ports_now()
}

fn open_ports_now() -> Option<[OwnedFd; 3]> {
    match console_device() {
        Device::Absent => {
            sys::say("no virtio-console device: the command's stdin/stdout/stderr are the console");
            return None;
        }
        Device::NoDriver => {
            sys::say("the kernel has no virtio-console driver (CONFIG_VIRTIO_CONSOLE): the command's stdin/stdout/stderr are the console");
            return None;
        }
        Device::Bound => {}
    }
    let deadline = Instant::now() + WAIT;
    let names = [PORT_STDIN, PORT_STDOUT, PORT_STDERR];
    let devs = loop {
        let found = names.map(find_port);
        if let [Some(a), Some(b), Some(c)] = found {
            break [a, b, c];
        }
        if Instant::now() >= deadline {
            sys::say(format_args!("the command channel's ports did not appear in {}s (the kernel has {}): the command's stdin/stdout/stderr are the console", WAIT.as_secs(), ports_seen()));
            return None;
        }
        std::thread::sleep(POLL);
    };
    let flags = [libc::O_RDONLY, libc::O_WRONLY, libc::O_WRONLY];
    let mut fds = Vec::with_capacity(3);
    for (dev, flag) in devs.iter().zip(flags) {
        match open(dev, flag) {
            Ok(fd) => fds.push(fd),
            Err(e) => {
                sys::say(format_args!("cannot open {dev}: {e}: the command's stdin/stdout/stderr are the console"));
                return None;
            }
        }
    }
    // A port's host side is open once microvm's PORT_OPEN arrived; before that a read
    // returns 0 (EOF). microvm announces stdin first and the guest handles the control
    // messages in order, so when stdout and stderr are connected stdin was connected too
    // (and may since have been closed for real: microvm's stdin ended).
    while !fds[1..].iter().all(host_connected) {
        if Instant::now() >= deadline {
            sys::say("microvm never opened the command channel's ports: the command's stdin/stdout/stderr are the console");
            return None;
        }
        std::thread::sleep(POLL);
    }
    let [a, b, c]: [OwnedFd; 3] = fds.try_into().ok()?;
    Some([a, b, c])
}

/// `microvm.wait`: says READY on the control port and reads the command line microvm
/// sends (see protocol.rs), into `params`.
pub fn wait_for_command(params: &mut Params) -> Result<()> {
    if !matches!(console_device(), Device::Bound) {
        return Err(Fail::new("microvm.wait needs the command channel (a virtio-console and its driver)"));
    }
    let deadline = Instant::now() + WAIT;
    let dev = loop {
        if let Some(dev) = find_port(PORT_CONTROL) {
            break dev;
        }
        if Instant::now() >= deadline {
            return Err(Fail::new(format!("the control port did not appear in {}s (the kernel has {})", WAIT.as_secs(), ports_seen())));
        }
        std::thread::sleep(POLL);
    };
    let fd = open(&dev, libc::O_RDWR).map_err(|e| Fail::io(format_args!("cannot open {dev}"), e))?;
    let mut port = std::fs::File::from(fd);
    use std::io::{Read, Write};
    if params.snapshot {
        warm_page_cache();
    }
    if let (Some(ports), Ok(mut slot)) = (open_ports_now(), PREOPENED.lock()) {
        *slot = Some(ports);
    }
    port.write_all(READY_MESSAGE).map_err(|e| Fail::io("cannot say READY on the control port", e))?;
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.ends_with(b"\n") {
        match port.read(&mut buf) {
            // The host side not open yet (or closed and reopened by a restore): wait.
            Ok(0) => std::thread::sleep(POLL),
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Fail::io("cannot read the command from the control port", e)),
        }
        if line.len() > COMMAND_MESSAGE_MAX {
            return Err(Fail::new("the command from the control port is too long"));
        }
    }
    let text = std::str::from_utf8(&line).map_err(|_| Fail::new("the command from the control port is not text"))?;
    let sent = Params::parse(text.trim_end());
    if let Some(e) = sent.errors.first() {
        return Err(Fail::new(e.to_string()));
    }
    params.argv = sent.argv;
    params.renew = sent.renew;
    params.cwd = sent.cwd.or(params.cwd.take());
    params.term = sent.term.or(params.term.take());
    Ok(())
}

/// Reads the programs a restored command will most likely exec (the shell, which on the
/// usual roots is busybox, and `/bin/true`) so they are in the page cache the snapshot saves:
/// otherwise every restore reads them from the disk again, through the (emulated, on some
/// hosts) guest kernel's block and filesystem code. Only before a snapshot (a boot whose
/// long command comes this way runs it right away). Each file once: on a busybox root all
/// three are the same ~2 MB. Best effort: a missing file is fine.
fn warm_page_cache() {
    use std::io::Read;
    let mut buf = vec![0u8; 256 * 1024];
    let mut done = Vec::new();
    for path in ["/bin/sh", "/bin/true", "/usr/bin/env"] {
        let Ok(real) = std::fs::canonicalize(path) else {
            continue;
        };
        if done.contains(&real) {
            continue;
        }
        if let Ok(mut f) = std::fs::File::open(&real) {
            while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
        }
        done.push(real);
    }
}

enum Device {
    Absent,
    NoDriver,
    Bound,
}

/// Whether a virtio console exists and has a driver.
fn console_device() -> Device {
    let Ok(entries) = std::fs::read_dir("/sys/bus/virtio/devices") else {
        return Device::Absent;
    };
    let mut seen = Device::Absent;
    for e in entries.flatten() {
        let id = std::fs::read_to_string(e.path().join("device")).unwrap_or_default();
        if id.trim() == VIRTIO_ID_CONSOLE {
            if e.path().join("driver").exists() {
                return Device::Bound;
            }
            seen = Device::NoDriver;
        }
    }
    seen
}

/// `/dev/vportNpM` of the port named `name`, once its name is known.
fn find_port(name: &str) -> Option<String> {
    let (port, _) = ports().into_iter().find(|(_, n)| n.as_deref() == Some(name))?;
    let dev = format!("/dev/{port}");
    // devtmpfs creates the node with the device; wait for it like for the name.
    Path::new(&dev).exists().then_some(dev)
}

/// The ports the kernel has created (`vportNpM`), each with its name once microvm's
/// PORT_NAME has arrived.
fn ports() -> Vec<(String, Option<String>)> {
    let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") else {
        return Vec::new();
    };
    entries
        .flatten()
        .map(|e| {
            let name = std::fs::read_to_string(e.path().join("name")).ok();
            (e.file_name().to_string_lossy().into_owned(), name.map(|n| n.trim_end_matches('\n').to_string()))
        })
        .collect()
}

/// The ports the kernel created, for a timeout's message: `vport2p0=microvm.stdin, vport2p1`
/// (a port without a name yet has none), or `no ports`.
fn ports_seen() -> String {
    let mut seen: Vec<String> = ports()
        .into_iter()
        .map(|(port, name)| match name {
            Some(n) => format!("{port}={n}"),
            None => port,
        })
        .collect();
    if seen.is_empty() {
        return "no ports".into();
    }
    seen.sort();
    seen.join(", ")
}

fn open(path: &str, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let c = sys::cstring(path.as_bytes())?;
    // SAFETY: a NUL-terminated path; the descriptor is checked and then owned.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// No POLLHUP: the port's host side is open.
fn host_connected(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one live pollfd; zero timeout.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r >= 0 && p.revents & libc::POLLHUP == 0
}
