//! TAP devices: created with the `tun` crate (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), plus the
//! two ioctls the crate lacks (TUNSETVNETHDRSZ, TUNSETOFFLOAD).
//!
//! `tun` 0.8 supports IFF_VNET_HDR (`PlatformConfig::vnet_hdr`) but only one queue
//! (IFF_MULTI_QUEUE is refused), which is all the virtio-net device uses today.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use tun::AbstractDevice;

pub use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};

/// Size of `struct virtio_net_hdr_v1` that the virtio-net device reads and writes.
pub const VNET_HDR_LEN: i32 = 12;

/// TAP device errors.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot create TAP device {name}")]
    Create {
        name: String,
        #[source]
        source: tun::Error,
    },
    #[error("cannot open TAP device {name}")]
    Open {
        name: String,
        #[source]
        source: tun::Error,
    },
    #[error("TAP device {name} does not exist (create it first, e.g. ip tuntap add {name} mode tap)")]
    NotFound { name: String },
    #[error("interface {name} exists but is not a TAP device")]
    NotTap { name: String },
    #[error("interface name {name} is already taken")]
    NameTaken { name: String },
    #[error("no free TAP name (mvtap-*) for this process")]
    NoFreeName,
    #[error("cannot set the virtio-net header size on TAP device {name}")]
    VnetHdrSize {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {} persistence of TAP device {name}", if *on { "set" } else { "clear" })]
    Persist {
        name: String,
        on: bool,
        #[source]
        source: io::Error,
    },
    #[error("cannot set offload flags {flags:#x} on TAP device {name}")]
    Offload {
        name: String,
        flags: u32,
        #[source]
        source: io::Error,
    },
}

fn tun_err_is(e: &tun::Error, errno: i32) -> bool {
    matches!(e, tun::Error::Io(io) if io.raw_os_error() == Some(errno))
}

impl TapError {
    /// True when the user can fix it by changing `--net` or privileges.
    pub fn is_bad_input(&self) -> bool {
        match self {
            TapError::NotFound { .. } | TapError::NotTap { .. } | TapError::NameTaken { .. } => true,
            TapError::Create { source, .. } | TapError::Open { source, .. } => {
                tun_err_is(source, libc::EPERM)
                    || tun_err_is(source, libc::EACCES)
                    || tun_err_is(source, libc::EBUSY)
            }
            _ => false,
        }
    }
}

/// An open TAP device. Closing it deletes a TAP we created: it is persistent only while it
/// sits unused in a network's pool (see `network::pool`), so a crashed process leaves no
/// TAP behind.
pub struct Tap {
    dev: tun::Device,
    name: String,
    created: bool,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tap")
            .field("name", &self.name)
            .field("fd", &self.dev.as_raw_fd())
            .field("created", &self.created)
            .finish()
    }
}

impl Tap {
    /// Creates a new, non-persistent TAP `name`, sets the 12-byte vnet header and brings it up.
    /// The caller checked that no interface `name` exists: TUNSETIFF on an existing
    /// persistent TAP would attach to it instead of failing.
    pub(crate) fn create(name: &str) -> Result<Tap, TapError> {
        let dev = open_dev(name, true).map_err(|source| TapError::Create {
            name: name.to_string(),
            source,
        })?;
        let tap = Tap { dev, name: name.to_string(), created: true };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Opens an existing TAP as is (no up/down, no address change).
    pub(crate) fn open_existing(name: &str) -> Result<Tap, TapError> {
        let dev = open_dev(name, false).map_err(|source| TapError::Open {
            name: name.to_string(),
            source,
        })?;
        let tap = Tap { dev, name: name.to_string(), created: false };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Attaches to a pooled TAP of ours (persistent, down, on its network's bridge): the
    /// flags match [`Tap::create`]'s, the vnet header size is set again, and the offloads a
    /// previous guest negotiated are cleared (its successor has negotiated none yet). The TAP
    /// stays persistent and down: the caller replaces its guard, then makes it
    /// non-persistent and brings it up.
    pub(crate) fn attach_pooled(name: &str) -> Result<Tap, TapError> {
        let dev = open_dev(name, false).map_err(|source| TapError::Open {
            name: name.to_string(),
            source,
        })?;
        let tap = Tap { dev, name: name.to_string(), created: true };
        tap.set_vnet_hdr_size()?;
        set_offload(tap.fd(), 0).map_err(|source| TapError::Offload { name: name.to_string(), flags: 0, source })?;
        Ok(tap)
    }

    /// TUNSETPERSIST: a persistent TAP outlives its last fd (closing it is then cheap: no
    /// unregistration, whose RCU barrier costs ~20 ms); a non-persistent one is deleted
    /// with it.
    pub(crate) fn set_persist(&self, on: bool) -> Result<(), TapError> {
        // SAFETY: TUNSETPERSIST takes its flag by value (as the ioctl argument) and touches
        // no memory of ours; the fd is a TUN/TAP fd owned by `self.dev`.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETPERSIST, libc::c_ulong::from(on)) };
        if rc < 0 {
            return Err(TapError::Persist { name: self.name.clone(), on, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fd(&self) -> RawFd {
        self.dev.as_raw_fd()
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size: libc::c_int = VNET_HDR_LEN;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer; `size` lives across
        // the call and the fd is a TUN/TAP fd owned by `self.dev`.
        let rc = unsafe { libc::ioctl(self.fd(), libc::TUNSETVNETHDRSZ, &size as *const libc::c_int) };
        if rc < 0 {
            return Err(TapError::VnetHdrSize {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Current interface index (0 if the kernel does not know the name).
    pub(crate) fn index(&self) -> u32 {
        self.dev.tun_index().ok().and_then(|i| u32::try_from(i).ok()).unwrap_or(0)
    }
}

fn open_dev(name: &str, bring_up: bool) -> Result<tun::Device, tun::Error> {
    let mut config = tun::Configuration::default();
    config.tun_name(name).layer(tun::Layer::L2);
    if bring_up {
        config.up();
    }
    config.platform_config(|p| {
        p.vnet_hdr(true);
        // Only touch interface flags (configure(): up) for TAPs we create.
        p.ensure_root_privileges(bring_up);
    });
    tun::create(&config)
}

/// `mvtap-<pid base36>-<n base36>`: unique per live process, at most 15 bytes, and the
/// owner pid can be read back from the name for stale cleanup.
pub(crate) fn tap_name_for(pid: u32, n: u32) -> String {
    format!("{}{}-{}", crate::spec::TAP_PREFIX, base36(pid), base36(n))
}

/// The pid encoded by [`tap_name_for`], if `name` has that shape.
pub(crate) fn pid_from_tap_name(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(crate::spec::TAP_PREFIX)?;
    let (pid, n) = rest.split_once('-')?;
    u32::from_str_radix(n, 36).ok()?;
    u32::from_str_radix(pid, 36).ok()
}

fn base36(mut v: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(v % 36) as usize]);
        v /= 36;
        if v == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// TUNSETOFFLOAD on any TAP fd (also a dup of an [`Attachment`](crate::Attachment)'s fd, which
/// shares its file description).
pub fn set_offload(fd: RawFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the flags by value (as the ioctl argument) and touches no
    // memory of ours; on a non-TUN fd it fails with an error, nothing else.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_round_trip() {
        for (pid, n) in [(1, 0), (4_194_304, 46_655), (u32::MAX, 35), (12345, 7)] {
            let name = tap_name_for(pid, n);
            if pid <= 4_194_304 {
                assert!(name.len() <= 15, "{name}");
            }
            assert_eq!(pid_from_tap_name(&name), Some(pid), "{name}");
        }
        assert_eq!(tap_name_for(36, 1), "mvtap-10-1");
        assert_eq!(pid_from_tap_name("mvtap-zz"), None);
        assert_eq!(pid_from_tap_name("eth0"), None);
        assert_eq!(pid_from_tap_name("mvtap-!-1"), None);
    }
}
