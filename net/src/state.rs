//! Shared on-disk state of named networks, for several microvm processes on one host.
//!
//! ```text
//! $MICROVM_RUN_DIR (default /run/microvm)/<netns inode>/
//!     lock                 flock'ed around every network setup/teardown (never deleted)
//!     net/NAME/network     mode, subnet, uplink, allow-host; an overlay's vni, peers, dev, mtu
//!     net/NAME/users       one line per attached NIC: pid starttime tap vm_id
//!     net/NAME/leases      DHCP leases (see dhcp::lease), flock'ed on its own
//! ```
//! The network-namespace inode keeps namespaces apart: /run is shared by all of them.
//! One lock for the whole namespace (not one per network) because subnet picking looks at
//! every network, and because a lock file inside a directory that teardown deletes would
//! let a waiter lock a deleted file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::spec::{Overlay, Subnet};

/// Environment variable overriding `/run/microvm`.
pub const RUN_DIR_ENV: &str = "MICROVM_RUN_DIR";
/// Where microvm keeps its runtime state unless `$MICROVM_RUN_DIR` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/microvm";

/// State-file errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {} is corrupt (line '{line}'); remove it or run microvm's stale cleanup", path.display())]
    Corrupt { path: PathBuf, line: String },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StateError + 'a {
    move |source| StateError::Io { action, path: path.to_path_buf(), source }
}

/// The state directory of the calling thread's network namespace.
#[derive(Clone, Debug)]
pub(crate) struct StateRoot {
    dir: PathBuf,
}

/// Holds the namespace-wide lock; released on drop (closing the fd drops the flock).
#[derive(Debug)]
pub(crate) struct StateLock {
    file: Option<File>,
}

/// How many `StateLock`s of this process exist (for [`StateRoot::lock_within`]).
static HELD_HERE: AtomicUsize = AtomicUsize::new(0);

impl Drop for StateLock {
    fn drop(&mut self) {
        if self.file.is_some() {
            HELD_HERE.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl StateRoot {
    /// `$MICROVM_RUN_DIR/<netns inode>`, created if missing.
    pub fn open() -> Result<StateRoot, StateError> {
        let base = std::env::var_os(RUN_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR));
        let ns = Path::new("/proc/self/ns/net");
        let ino = fs::metadata(ns).map_err(io_err("identify the network namespace via", ns))?.ino();
        let dir = base.join(ino.to_string());
        let nets = dir.join("net");
        fs::create_dir_all(&nets).map_err(io_err("create state directory", &nets))?;
        Ok(StateRoot { dir })
    }

    /// The state directory of a namespace found earlier with [`StateRoot::open`].
    pub fn at(dir: PathBuf) -> StateRoot {
        StateRoot { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock_file(&self) -> Result<(File, PathBuf), StateError> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open lock file", &path))?;
        Ok((file, path))
    }

    /// Takes the namespace-wide lock (blocking).
    pub fn lock(&self) -> Result<StateLock, StateError> {
        let (file, path) = self.lock_file()?;
        file.lock().map_err(io_err("lock", &path))?;
        HELD_HERE.fetch_add(1, Ordering::SeqCst);
        Ok(StateLock { file: Some(file) })
    }

    /// For teardown in a dying process, which must not block forever: the lock if it can
    /// be had within `timeout`. If this process itself holds it (a thread of ours that
    /// panicked while holding it, or one that the coming exit will stop), waiting cannot
    /// help: after a short wait we proceed without it, since no other process can be
    /// inside the lock while we hold it. `None`: another process kept it all along.
    pub fn lock_within(&self, timeout: Duration) -> Result<Option<StateLock>, StateError> {
        const HELD_HERE_WAIT: Duration = Duration::from_millis(500);
        let (file, path) = self.lock_file()?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => {
                    HELD_HERE.fetch_add(1, Ordering::SeqCst);
                    return Ok(Some(StateLock { file: Some(file) }));
                }
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
            }
            let waited = start.elapsed();
            if HELD_HERE.load(Ordering::SeqCst) > 0 && waited >= HELD_HERE_WAIT {
                tracing::warn!("state lock held by this dying process; tearing down without it");
                return Ok(Some(StateLock { file: None }));
            }
            if waited >= timeout {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn net_dir(&self, name: &str) -> PathBuf {
        self.dir.join("net").join(name)
    }

    /// Names of all networks with a state directory.
    pub fn networks(&self) -> Result<Vec<String>, StateError> {
        let nets = self.dir.join("net");
        let mut out = Vec::new();
        let rd = match fs::read_dir(&nets) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("list", &nets)(e)),
        };
        for entry in rd.flatten() {
            if let Some(name) = entry.file_name().to_str() {
                if crate::spec::check_network_name(name).is_ok() {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub fn read_record(&self, name: &str) -> Result<Option<NetworkRecord>, StateError> {
        let path = self.net_dir(name).join("network");
        match read_opt(&path)? {
            None => Ok(None),
            Some(text) => NetworkRecord::parse(&text)
                .map(Some)
                .map_err(|line| StateError::Corrupt { path, line }),
        }
    }

    pub fn write_record(&self, name: &str, rec: &NetworkRecord) -> Result<(), StateError> {
        let dir = self.net_dir(name);
        fs::create_dir_all(&dir).map_err(io_err("create state directory", &dir))?;
        write_atomic(&dir.join("network"), &rec.render())
    }

    pub fn read_users(&self, name: &str) -> Result<Vec<UserEntry>, StateError> {
        let path = self.net_dir(name).join("users");
        let text = read_opt(&path)?.unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match UserEntry::parse(line) {
                Some(u) => out.push(u),
                None => tracing::warn!(path = %path.display(), line, "ignoring corrupt users line"),
            }
        }
        Ok(out)
    }

    pub fn write_users(&self, name: &str, users: &[UserEntry]) -> Result<(), StateError> {
        let dir = self.net_dir(name);
        fs::create_dir_all(&dir).map_err(io_err("create state directory", &dir))?;
        let text: String = users.iter().map(|u| u.render() + "\n").collect();
        write_atomic(&dir.join("users"), &text)
    }

    /// The TAPs kept for reuse by a network's next VMs (see `network::pool`), oldest
    /// first. Lines that are not one of our generated TAP names are dropped with a warning.
    pub fn read_pool(&self, name: &str) -> Result<Vec<String>, StateError> {
        let path = self.net_dir(name).join("pool");
        let text = read_opt(&path)?.unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if crate::tap::pid_from_tap_name(line).is_some() && crate::spec::check_ifname("tap", line).is_ok() {
                out.push(line.to_string());
            } else {
                tracing::warn!(path = %path.display(), line, "ignoring corrupt pool line");
            }
        }
        Ok(out)
    }

    pub fn write_pool(&self, name: &str, taps: &[String]) -> Result<(), StateError> {
        let dir = self.net_dir(name);
        fs::create_dir_all(&dir).map_err(io_err("create state directory", &dir))?;
        let text: String = taps.iter().map(|t| format!("{t}\n")).collect();
        write_atomic(&dir.join("pool"), &text)
    }

    /// Removes a network's state directory (gone already is fine).
    pub fn remove_network(&self, name: &str) -> Result<(), StateError> {
        let dir = self.net_dir(name);
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &dir)(e)),
            _ => Ok(()),
        }
    }
}

fn read_opt(path: &Path) -> Result<Option<String>, StateError> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// Write to a temp file then rename, so a crash never leaves a truncated file.
pub(crate) fn write_atomic(path: &Path, text: &str) -> Result<(), StateError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, text).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("replace", path))
}

/// Kind of a named network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NetKind {
    Nat,
    HostOnly,
}

impl NetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NetKind::Nat => "nat",
            NetKind::HostOnly => "host-only",
        }
    }
}

/// The `network` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NetworkRecord {
    pub kind: NetKind,
    pub subnet: Subnet,
    pub uplink: Option<String>,
    /// Guests may connect to the host (`allow-host`); fixed when the network is created.
    pub allow_host: bool,
    /// Spans hosts over VXLAN.
    pub overlay: Option<Overlay>,
    /// The overlay guests' MTU, once its VXLAN port exists.
    pub guest_mtu: Option<u32>,
}

impl NetworkRecord {
    pub fn render(&self) -> String {
        let mut s = format!("mode={}\nsubnet={}\n", self.kind.as_str(), self.subnet);
        if let Some(u) = &self.uplink {
            s += &format!("uplink={u}\n");
        }
        if self.allow_host {
            s += "allow-host=yes\n";
        }
        if let Some(o) = &self.overlay {
            let peers: Vec<String> = o.peers.iter().map(|p| p.to_string()).collect();
            s += &format!("vni={}\npeers={}\n", o.vni, peers.join("+"));
            if let Some(d) = &o.dev {
                s += &format!("dev={d}\n");
            }
            if let Some(m) = o.mtu {
                s += &format!("mtu={m}\n");
            }
        }
        if let Some(m) = self.guest_mtu {
            s += &format!("guest-mtu={m}\n");
        }
        s
    }

    /// Parses the file; `Err(line)` names the offending line.
    pub fn parse(text: &str) -> Result<NetworkRecord, String> {
        let (mut kind, mut subnet, mut uplink, mut allow_host) = (None, None, None, false);
        let (mut vni, mut peers, mut dev, mut mtu, mut guest_mtu) = (None, None, None, None, None);
        let num = |line: &str, v: &str| v.parse::<u32>().map_err(|_| line.to_string());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once('=').ok_or_else(|| line.to_string())?;
            match k {
                "vni" => vni = Some(num(line, v)?),
                "peers" => {
                    let list: Result<Vec<std::net::Ipv4Addr>, _> = v.split('+').map(str::parse).collect();
                    peers = Some(list.map_err(|_| line.to_string())?);
                }
                "dev" => {
                    crate::spec::check_ifname("dev", v).map_err(|_| line.to_string())?;
                    dev = Some(v.to_string());
                }
                "mtu" => mtu = Some(num(line, v)?),
                "guest-mtu" => guest_mtu = Some(num(line, v)?),
                "mode" if v == "nat" => kind = Some(NetKind::Nat),
                "mode" if v == "host-only" => kind = Some(NetKind::HostOnly),
                "subnet" => subnet = Some(v.parse::<Subnet>().map_err(|_| line.to_string())?),
                "uplink" => {
                    crate::spec::check_ifname("uplink", v).map_err(|_| line.to_string())?;
                    uplink = Some(v.to_string());
                }
                "allow-host" if v == "yes" => allow_host = true,
                _ => return Err(line.to_string()),
            }
        }
        let overlay = match (vni, peers) {
            (Some(vni), Some(peers)) => Some(Overlay { vni, peers, dev, mtu }),
            (None, None) => None,
            _ => return Err("(an overlay needs both vni and peers)".to_string()),
        };
        match (kind, subnet) {
            (Some(kind), Some(subnet)) => Ok(NetworkRecord { kind, subnet, uplink, allow_host, overlay, guest_mtu }),
            _ => Err("(missing mode or subnet)".to_string()),
        }
    }
}

/// One attached NIC of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UserEntry {
    pub pid: u32,
    /// Process start time (clock ticks since boot, /proc/PID/stat field 22): tells a live
    /// owner from a new process that reused its pid.
    pub start: u64,
    pub tap: String,
    pub vm_id: String,
    /// The guest's MAC (None in entries written before it was recorded).
    pub mac: Option<crate::spec::MacAddr>,
}

impl UserEntry {
    /// `pid start tap vm_id [mac]`, the vm_id percent-encoded (see [`encode_field`]) so
    /// any string, e.g. a disk path with spaces, reads back unchanged.
    pub fn render(&self) -> String {
        let mut line = format!("{} {} {} {}", self.pid, self.start, self.tap, encode_field(&self.vm_id));
        if let Some(mac) = self.mac {
            line += &format!(" {mac}");
        }
        line
    }

    pub fn parse(line: &str) -> Option<UserEntry> {
        let mut it = line.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        let start = it.next()?.parse().ok()?;
        let tap = it.next()?.to_string();
        crate::spec::check_ifname("tap", &tap).ok()?;
        // Informational only: a field that does not decode (written by an older version)
        // is kept as it is rather than losing the entry.
        let raw = it.next().unwrap_or("-");
        let vm_id = decode_field(raw).unwrap_or_else(|| raw.to_string());
        let mac = it.next().and_then(|m| m.parse().ok());
        Some(UserEntry { pid, start, tap, vm_id, mac })
    }

    /// Whether `other` is the same NIC: pid, process start time and TAP name identify an
    /// entry (a TAP name is unique in the namespace while its process lives); the vm_id is
    /// only informational.
    pub fn same_nic(&self, other: &UserEntry) -> bool {
        (self.pid, self.start, &self.tap) == (other.pid, other.start, &other.tap)
    }

    /// Whether the owning process still runs.
    pub fn alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start)
    }
}

/// One whitespace-free field: `%`, whitespace and control characters become `%XX` (per
/// UTF-8 byte); the empty string is `-` (and a literal `-` is `%2D`).
fn encode_field(s: &str) -> String {
    if s.is_empty() {
        return "-".to_string();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '%' || c.is_whitespace() || c.is_control() || (c == '-' && s.len() == 1) {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out += &format!("%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Inverse of [`encode_field`]; `None` for a malformed escape or invalid UTF-8.
fn decode_field(s: &str) -> Option<String> {
    if s == "-" {
        return Some(String::new());
    }
    let mut bytes = Vec::with_capacity(s.len());
    let mut it = s.bytes();
    while let Some(b) = it.next() {
        if b == b'%' {
            let hex = [it.next()?, it.next()?];
            bytes.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            bytes.push(b);
        }
    }
    String::from_utf8(bytes).ok()
}

/// Start time of `pid` from /proc/PID/stat, or `None` if there is no such process.
pub(crate) fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may contain spaces and
/// parentheses, so count from the last ')'.
fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// This process's (pid, start time).
pub(crate) fn self_identity() -> (u32, u64) {
    let pid = std::process::id();
    (pid, process_start_time(pid).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip() {
        let r = NetworkRecord { kind: NetKind::Nat, subnet: Subnet::from_octets(10, 200, 3), uplink: Some("eth0".into()), allow_host: false, overlay: None, guest_mtu: None };
        assert_eq!(NetworkRecord::parse(&r.render()).unwrap(), r);
        let r = NetworkRecord { kind: NetKind::HostOnly, subnet: Subnet::from_octets(10, 200, 4), uplink: None, allow_host: true, overlay: None, guest_mtu: None };
        assert_eq!(NetworkRecord::parse(&r.render()).unwrap(), r);
        let peers = vec![std::net::Ipv4Addr::new(192, 0, 2, 11), std::net::Ipv4Addr::new(192, 0, 2, 12)];
        for (dev, mtu) in [(None, None), (Some("eth0".to_string()), Some(1400))] {
            let overlay = Some(Overlay { vni: 4242, peers: peers.clone(), dev, mtu });
            let r = NetworkRecord { overlay, guest_mtu: Some(1400), ..r.clone() };
            assert_eq!(NetworkRecord::parse(&r.render()).unwrap(), r);
        }
        assert!(NetworkRecord::parse("mode=nat\nsubnet=10.1.1.0/24\nvni=3\n").is_err(), "vni without peers");
        assert!(NetworkRecord::parse("mode=nat\nsubnet=10.1.1.0/24\nvni=3\npeers=1.2.3\n").is_err());
        assert!(NetworkRecord::parse("mode=nat\n").is_err());
        assert!(NetworkRecord::parse("mode=weird\nsubnet=10.1.1.0/24").is_err());
        assert!(NetworkRecord::parse("garbage").is_err());
    }

    #[test]
    fn user_round_trip() {
        for vm_id in ["vm 1", "/var/lib/my vms/disk 1.img", "", "-", "--", "100%\tdone\n", "tab\there", "ünï cödé", "%41"] {
            let u = UserEntry { pid: 42, start: 777, tap: "mvtap-16-0".into(), vm_id: vm_id.into(), mac: None };
            let line = u.render();
            assert_eq!(line.split_whitespace().count(), 4, "{line}");
            let parsed = UserEntry::parse(&line).unwrap();
            assert_eq!(parsed, u, "{line}");
            assert!(parsed.same_nic(&u));
        }
        // Files written before the encoding still parse (their vm_id had '_' for blanks).
        assert_eq!(UserEntry::parse("1 2 mvtap-1-0 vm_1").unwrap().vm_id, "vm_1");
        assert_eq!(UserEntry::parse("1 2 mvtap-1-0 bad%zz").unwrap().vm_id, "bad%zz");
        let u = UserEntry { pid: 42, start: 777, tap: "mvtap-16-0".into(), vm_id: "a".into(), mac: Some("52:54:00:12:34:56".parse().unwrap()) };
        assert!(u.same_nic(&UserEntry { vm_id: "b".into(), ..u.clone() }));
        assert!(!u.same_nic(&UserEntry { tap: "mvtap-16-1".into(), ..u.clone() }));
        assert!(!u.same_nic(&UserEntry { start: 778, ..u.clone() }));
        assert!(!u.same_nic(&UserEntry { pid: 43, ..u.clone() }));
        assert!(UserEntry::parse("x 1 t").is_none());
        assert!(UserEntry::parse("1 2").is_none());
        assert!(UserEntry::parse("1 2 bad/name").is_none());
    }

    #[test]
    fn lock_within_a_dying_process() {
        let dir = std::env::temp_dir().join(format!("mvnet-lock-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let root = StateRoot::at(dir.clone());
        // Free: a real lock at once.
        let lock = root.lock_within(Duration::from_secs(5)).unwrap().unwrap();
        assert!(lock.file.is_some());
        drop(lock);
        // Held by this process (e.g. by a thread that panicked holding it): waiting cannot
        // help, so after a short wait the caller proceeds without it.
        let held = root.lock().unwrap();
        let start = Instant::now();
        let lock = root.lock_within(Duration::from_secs(5)).unwrap().unwrap();
        assert!(lock.file.is_none());
        assert!(start.elapsed() < Duration::from_secs(3), "{:?}", start.elapsed());
        drop((lock, held));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn start_time_parsing() {
        let stat = "1234 (a) b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21";
        assert_eq!(parse_start_time(stat), Some(424242));
        assert_eq!(parse_start_time("garbage"), None);
        let (pid, start) = self_identity();
        assert!(start > 0);
        assert!(UserEntry { pid, start, tap: "t".into(), vm_id: "v".into(), mac: None }.alive());
        assert!(!UserEntry { pid, start: start + 1, tap: "t".into(), vm_id: "v".into(), mac: None }.alive());
    }
}
