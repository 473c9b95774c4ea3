//! Network: `lo` up, then every Ethernet interface up and configured by DHCP, all at once,
//! with short timeouts (this is CI). Configures what busybox udhcpc's script did for the
//! test guest before: address/netmask/broadcast, a default route via the first router,
//! and resolv.conf (search domain, name servers). Addresses and routes are set with the
//! classic SIOCSIF*/SIOCADDRT ioctls: a few lines each, where netlink would need a message
//! builder.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::dhcp::{self, Lease};
use crate::sys;

/// How long all interfaces together may wait for their leases.
const DHCP_DEADLINE: Duration = Duration::from_secs(10);
/// Resend DISCOVER/REQUEST this often while waiting.
const DHCP_RETRY: Duration = Duration::from_secs(1);
const DHCP_CLIENT_PORT: u16 = 68;
const DHCP_SERVER_PORT: u16 = 67;
const ARPHRD_ETHER: &str = "1";

/// The name servers and search domain learnt (for resolv.conf).
#[derive(Default)]
pub struct Dns {
    pub servers: Vec<Ipv4Addr>,
    pub domain: Option<String>,
}

/// Brings up every interface; failures are reported per interface and never fatal (the
/// command may not need the network).
pub fn up() -> Dns {
    up_with(false)
}

/// Configures every interface again (`microvm.renew`, see protocol.rs): each Ethernet
/// interface's address is removed first, so that its DHCP messages go out from 0.0.0.0, as at
/// boot. From the old address, microvm's guard would drop them: another VM holds it now.
pub fn renew() -> Dns {
    up_with(true)
}

/// [`up`]; with `clear`, each Ethernet interface's address is removed before its DHCP.
fn up_with(clear: bool) -> Dns {
    let mut names: Vec<String> = match std::fs::read_dir("/sys/class/net") {
        Ok(d) => d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
        Err(e) => {
            sys::say(format_args!("no network: cannot list /sys/class/net: {e}"));
            return Dns::default();
        }
    };
    names.sort();
    let ctl = match socket(libc::SOCK_DGRAM) {
        Ok(s) => s,
        Err(e) => {
            sys::say(format_args!("no network: cannot open an IPv4 socket: {e}"));
            return Dns::default();
        }
    };
    if let Err(e) = set_up(&ctl, "lo") {
        sys::say(format_args!("lo: cannot bring it up: {e}"));
    }
    let mut clients = Vec::new();
    for name in names.iter().filter(|n| is_ethernet(n)) {
        if clear {
            // Setting 0.0.0.0 removes the interface's IPv4 address (and its routes).
            let cleared = ifreq(name).and_then(|mut r| {
                r.ifr_ifru.ifru_addr = sockaddr(Ipv4Addr::UNSPECIFIED);
                ioctl(&ctl, libc::SIOCSIFADDR, &mut r)
            });
            if let Err(e) = cleared {
                sys::say(format_args!("{name}: cannot remove its address: {e}"));
            }
        }
        match Client::new(&ctl, name) {
            Ok(c) => clients.push(c),
            Err(e) => sys::say(format_args!("{name}: cannot start DHCP: {e}")),
        }
    }
    let leases = run_dhcp(&mut clients);
    let mut dns = Dns::default();
    let mut have_default = false;
    for (c, lease) in clients.iter().zip(leases) {
        let Some(lease) = lease else {
            sys::say(format_args!("{}: no DHCP lease within {} s", c.name, DHCP_DEADLINE.as_secs()));
            continue;
        };
        if let Err(e) = configure(&ctl, &c.name, &lease, !have_default) {
            sys::say(format_args!("{}: cannot configure {:?}: {e}", c.name, lease.address));
            continue;
        }
        have_default |= lease.router.is_some();
        if dns.servers.is_empty() && !lease.dns.is_empty() {
            dns = Dns { servers: lease.dns, domain: lease.domain };
        }
    }
    dns
}

fn is_ethernet(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{name}/type")).is_ok_and(|t| t.trim() == ARPHRD_ETHER)
}

fn socket(kind: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `ifreq` for `name` (at most IFNAMSIZ-1 bytes, as the kernel guarantees).
fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= r.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn ioctl<T>(sock: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes the structure `req` expects (ifreq or rtentry), alive
    // and exclusively borrowed for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), req as _, arg as *mut T) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut r = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(sock, libc::SIOCSIFFLAGS, &mut r)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; any bytes are a valid sockaddr.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Address, netmask, broadcast; the default route when `default_route` and the lease has
/// a router.
fn configure(sock: &OwnedFd, name: &str, lease: &Lease, default_route: bool) -> io::Result<()> {
    let ip = lease.address.ok_or_else(|| io::Error::other("the lease has no address"))?;
    let mask = lease.netmask.unwrap_or_else(|| default_mask(ip));
    let brd = lease.broadcast.unwrap_or(Ipv4Addr::from(u32::from(ip) | !u32::from(mask)));
    for (req, addr) in [(libc::SIOCSIFADDR, ip), (libc::SIOCSIFNETMASK, mask), (libc::SIOCSIFBRDADDR, brd)] {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr(addr);
        ioctl(sock, req, &mut r)?;
    }
    if let Some(mtu) = lease.mtu {
        let mut r = ifreq(name)?;
        r.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        ioctl(sock, libc::SIOCSIFMTU, &mut r)?;
    }
    if let (true, Some(gw)) = (default_route, lease.router) {
        let dev = sys::cstring(name.as_bytes())?;
        // SAFETY: rtentry is plain data (and a null rt_dev); all-zero is valid.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        rt.rt_dev = dev.as_ptr().cast_mut();
        // The kernel reads rt_dev during the call; `dev` outlives it. A route that exists
        // already (the network configured again after a restore) is the one wanted.
        match ioctl(sock, libc::SIOCADDRT, &mut rt) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            r => r?,
        }
    }
    Ok(())
}

fn default_mask(ip: Ipv4Addr) -> Ipv4Addr {
    match ip.octets()[0] {
        0..=127 => Ipv4Addr::new(255, 0, 0, 0),
        128..=191 => Ipv4Addr::new(255, 255, 0, 0),
        _ => Ipv4Addr::new(255, 255, 255, 0),
    }
}

/// One interface's DHCP exchange.
struct Client {
    name: String,
    mac: [u8; 6],
    xid: u32,
    sock: OwnedFd,
    /// The offer being requested; None while discovering.
    offer: Option<(Ipv4Addr, Ipv4Addr)>,
    next_send: Instant,
}

impl Client {
    fn new(ctl: &OwnedFd, name: &str) -> io::Result<Client> {
        set_up(ctl, name)?;
        let mac = read_mac(name)?;
        let sock = socket(libc::SOCK_DGRAM | libc::SOCK_NONBLOCK)?;
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_BROADCAST] {
            setsockopt(&sock, opt, std::ptr::from_ref(&one).cast(), size_of_val(&one))?;
        }
        setsockopt(&sock, libc::SO_BINDTODEVICE, name.as_ptr().cast(), name.len())?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: DHCP_CLIENT_PORT.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid sockaddr_in and its size.
        let r = unsafe {
            libc::bind(sock.as_raw_fd(), std::ptr::from_ref(&addr).cast(), size_of_val(&addr) as libc::socklen_t)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Client { name: name.to_string(), mac, xid: xid(mac), sock, offer: None, next_send: Instant::now() })
    }

    fn send(&mut self) {
        let msg = dhcp::build(self.xid, self.mac, self.offer);
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: DHCP_SERVER_PORT.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(Ipv4Addr::BROADCAST.octets()) },
            sin_zero: [0; 8],
        };
        // SAFETY: msg and `to` are live for the call; sizes are theirs.
        let _ = unsafe {
            libc::sendto(
                self.sock.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                std::ptr::from_ref(&to).cast(),
                size_of_val(&to) as libc::socklen_t,
            )
        };
        self.next_send = Instant::now() + DHCP_RETRY;
    }

    /// Reads every waiting datagram; Some(lease) once acknowledged.
    fn receive(&mut self) -> Option<Lease> {
        let mut buf = [0u8; 1500];
        loop {
            // SAFETY: buf is live and writable for its length.
            let n = unsafe { libc::recv(self.sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                return None;
            };
            let Some(lease) = dhcp::parse(&buf[..n], self.xid, self.mac) else {
                continue;
            };
            match (lease.kind, self.offer) {
                (dhcp::OFFER, None) => {
                    if let (Some(ip), Some(server)) = (lease.address, lease.server) {
                        self.offer = Some((ip, server));
                        self.send();
                    }
                }
                (dhcp::ACK, Some((ip, _))) if lease.address == Some(ip) => return Some(lease),
                (dhcp::NAK, Some(_)) => {
                    self.offer = None;
                    self.send();
                }
                _ => {}
            }
        }
    }
}

fn setsockopt(sock: &OwnedFd, opt: libc::c_int, val: *const libc::c_void, len: usize) -> io::Result<()> {
    // SAFETY: callers pass a pointer to `len` live bytes.
    if unsafe { libc::setsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, opt, val, len as libc::socklen_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_mac(name: &str) -> io::Result<[u8; 6]> {
    let text = std::fs::read_to_string(Path::new("/sys/class/net").join(name).join("address"))?;
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for b in &mut mac {
        *b = parts
            .next()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| io::Error::other(format!("bad MAC address '{}'", text.trim())))?;
    }
    Ok(mac)
}

/// A transaction id: random when the kernel's pool is ready, else derived from the MAC
/// and the clock (uniqueness on one link is all it needs).
fn xid(mac: [u8; 6]) -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: b is live and writable for 4 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n == 4 {
        return u32::from_ne_bytes(b);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]) ^ nanos
}

/// Runs every client until each has a lease or the deadline passes.
fn run_dhcp(clients: &mut [Client]) -> Vec<Option<Lease>> {
    let mut leases: Vec<Option<Lease>> = vec![None; clients.len()];
    let deadline = Instant::now() + DHCP_DEADLINE;
    loop {
        let now = Instant::now();
        let pending: Vec<usize> = (0..clients.len()).filter(|i| leases[*i].is_none()).collect();
        if pending.is_empty() || now >= deadline {
            return leases;
        }
        for &i in &pending {
            if clients[i].next_send <= now {
                clients[i].send();
            }
        }
        let wake = pending.iter().map(|&i| clients[i].next_send).min().unwrap_or(deadline).min(deadline);
        let mut fds: Vec<libc::pollfd> =
            pending.iter().map(|&i| libc::pollfd { fd: clients[i].sock.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        let timeout = wake.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: fds is a live array of fds.len() pollfd structures.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        for (k, &i) in pending.iter().enumerate() {
            if fds[k].revents & libc::POLLIN != 0 {
                leases[i] = clients[i].receive();
            }
        }
    }
}

/// Writes resolv.conf for `dns`: on a writable root into /etc; on a read-only one into
/// the /run tmpfs, either where /etc/resolv.conf's symlink points (e.g. systemd-resolved's
/// /run/systemd/resolve/stub-resolv.conf) or bind-mounted over the image's file.
pub fn write_resolv_conf(dns: &Dns, root_writable: bool) {
    if dns.servers.is_empty() {
        return;
    }
    let mut text = String::new();
    if let Some(d) = &dns.domain {
        text.push_str(&format!("search {d}\n"));
    }
    for s in &dns.servers {
        text.push_str(&format!("nameserver {s}\n"));
    }
    let etc = Path::new("/etc/resolv.conf");
    let target = match std::fs::read_link(etc) {
        Ok(t) => Path::new("/etc").join(t),
        Err(_) => etc.to_path_buf(),
    };
    let on_tmpfs = target.starts_with("/run") || target.starts_with("/tmp");
    let result = if root_writable || on_tmpfs {
        target.parent().map_or(Ok(()), sys::mkdir_p).and_then(|_| std::fs::write(&target, &text))
    } else if target.exists() {
        let ours = Path::new("/run/microvm/resolv.conf");
        sys::mkdir_p(Path::new("/run/microvm"))
            .and_then(|_| std::fs::write(ours, &text))
            .and_then(|_| sys::mount(&ours.to_string_lossy(), &target, "", libc::MS_BIND, ""))
    } else {
        Err(io::Error::other("the read-only root has no /etc/resolv.conf to mount over"))
    };
    if let Err(e) = result {
        sys::say(format_args!("cannot write {}: {e}", target.display()));
    }
}
