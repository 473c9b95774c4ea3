//! microvm's own guest init (resources/init, built and embedded by vmm/build.rs) and the
//! in-memory initramfs that carries it: when microvm boots it, and the kernel parameters
//! it hands it (defined once, in resources/init/src/protocol.rs, shared with the init).
//!
//! microvm boots its own init
//! - with `-- CMD` on a `--disk` root, so the command runs on any root image, even one
//!   that knows nothing of microvm (the image's own init is not run);
//! - with neither `--disk` nor `--initrd`: the host's `/` over virtio-fs (tag `ROOT_TAG`),
//!   read-only, the current directory as the working directory.
//!
//! A `--disk` root without a command boots the image's own init; a user `--initrd` is the
//! user's own early userspace. Both still get `microvm.argv=` and `microvm.exitdev=`.

use thiserror::Error;

use crate::boot::initramfs::{Cpio, CpioError};
use crate::config::{VmConfig, CMDLINE_MAX};
use crate::layout::EXIT_DEVICE_ADDR;

#[path = "../../resources/init/src/protocol.rs"]
pub mod protocol;

pub use protocol::ROOT_TAG;

/// The init, a static binary built by build.rs.
static INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/microvm-init"));

#[derive(Debug, Error)]
pub enum GuestInitError {
    #[error(
        "the guest command is too long: the kernel command line would be {len} bytes, the limit is {max} \
         (the command takes {command} of them, encoded)"
    )]
    CommandTooLong { len: usize, max: usize, command: usize },
    #[error("cannot build microvm's initramfs")]
    Initramfs(#[from] CpioError),
    #[error("virtio-fs tag '{0}' cannot be used (1-36 of A-Z a-z 0-9 . _ -)")]
    BadTag(String),
    #[error("cannot read the current directory (the guest command's working directory)")]
    Cwd(#[source] std::io::Error),
}

impl GuestInitError {
    pub fn is_usage(&self) -> bool {
        matches!(self, GuestInitError::CommandTooLong { .. } | GuestInitError::BadTag(_) | GuestInitError::Cwd(_))
    }
}

/// The root microvm's own init mounts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Root {
    /// `/dev/vda` (`root=/dev/vda ro|rw` as for any disk root).
    Disk,
    /// The host's `/` over virtio-fs, read-only.
    Host,
}

/// Whether microvm boots its own init, and on which root; None: the image's or the user's.
pub fn own_init(config: &VmConfig) -> Option<Root> {
    match (config.initrd.is_some(), config.disks.is_empty(), config.command.is_empty()) {
        (true, _, _) => None,
        (false, true, _) => Some(Root::Host),
        (false, false, false) => Some(Root::Disk),
        // A snapshot's init waits for the command a restore sends.
        (false, false, true) if config.snapshot_to.is_some() || config.from_snapshot => Some(Root::Disk),
        (false, false, true) => None,
    }
}

/// The initramfs: the init and the few nodes it needs before /dev is mounted.
pub fn initramfs() -> Result<Vec<u8>, GuestInitError> {
    let mut c = Cpio::new();
    for dir in ["dev", "proc", "sys", "newroot"] {
        c.dir(dir, 0o755)?;
    }
    // The kernel opens it as init's stdin/stdout/stderr; without it the init is mute.
    c.char_dev("dev/console", 0o600, 5, 1)?;
    c.file("init", 0o755, INIT)?;
    Ok(c.finish())
}

/// `root=...` for the host root (the disk root's comes from vm.rs like any disk's).
pub fn host_root_params() -> String {
    format!("root={ROOT_TAG} rootfstype={} ro", protocol::VIRTIOFS)
}

/// microvm's own parameters for the init: the exit device, the command, the virtio-fs
/// `shares` to mount, and for the host root the working directory; the host's TERM when it
/// is a plain name.
pub fn params(config: &VmConfig, root: Option<Root>, shares: &[protocol::Share]) -> Result<Vec<String>, GuestInitError> {
    let mut p = vec![protocol::exit_device_param(EXIT_DEVICE_ADDR)];
    for s in shares {
        p.push(s.param().ok_or_else(|| GuestInitError::BadTag(s.tag.clone()))?);
    }
    if root.is_some() {
        p.extend(term_param());
    }
    if root == Some(Root::Host) {
        use std::os::unix::ffi::OsStrExt;
        let cwd = std::env::current_dir().map_err(GuestInitError::Cwd)?;
        p.push(protocol::cwd_param(cwd.as_os_str().as_bytes()));
    }
    let snapshot = config.snapshot_to.is_some();
    if snapshot || !command_on_cmdline(config) {
        p.push(protocol::WAIT.to_string());
        if snapshot {
            p.push(protocol::SNAPSHOT.to_string());
        }
    } else if !config.command.is_empty() {
        p.push(protocol::argv_param(&config.command));
    }
    Ok(p)
}

/// The longest `microvm.argv=` parameter put on the kernel command line (x86's is at most
/// 2048 bytes, shared with the user's and microvm's other parameters). A longer command
/// goes over the command channel's control port instead, as a restore's does: the init
/// waits for it (`microvm.wait`), so a command's length is bounded by
/// `protocol::COMMAND_MESSAGE_MAX` (256 KiB), not by the command line.
pub const ARGV_ON_CMDLINE_MAX: usize = 1024;

/// Whether the command travels on the kernel command line (else on the control port).
pub fn command_on_cmdline(config: &VmConfig) -> bool {
    config.command.is_empty() || protocol::argv_param(&config.command).len() <= ARGV_ON_CMDLINE_MAX
}

/// `microvm.term=` with the host's TERM, if it is a plain word.
pub fn term_param() -> Option<String> {
    std::env::var("TERM").ok().filter(|t| plain_word(t)).map(|term| format!("{}={term}", protocol::TERM))
}

fn plain_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
}

/// Fails with a clear message when the command makes the command line too long.
pub fn check_length(parts: &[String], config: &VmConfig) -> Result<(), GuestInitError> {
    // Words joined by single spaces, plus the terminating NUL.
    let len = parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).map(|p| p.len() + 1).sum::<usize>();
    if len > CMDLINE_MAX && !config.command.is_empty() {
        let command = protocol::argv_param(&config.command).len();
        return Err(GuestInitError::CommandTooLong { len, max: CMDLINE_MAX, command });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    #[test]
    fn which_init() {
        let mut c = VmConfig::default();
        assert_eq!(own_init(&c), Some(Root::Host));
        c.command = vec!["true".into()];
        assert_eq!(own_init(&c), Some(Root::Host));
        c.disks.push("root.img".parse::<DiskConfig>().unwrap());
        assert_eq!(own_init(&c), Some(Root::Disk));
        c.command.clear();
        assert_eq!(own_init(&c), None, "a disk without a command boots the image's init");
        c.command = vec!["true".into()];
        c.initrd = Some("my.cpio".into());
        assert_eq!(own_init(&c), None, "a user initrd is the user's own");
    }

    #[test]
    fn initramfs_holds_the_init() {
        let a = initramfs().unwrap();
        assert!(INIT.starts_with(b"\x7fELF"), "the embedded init is not an ELF binary");
        // The init's bytes appear whole, 4-byte aligned, after their header.
        let at = a.windows(INIT.len().min(64)).position(|w| w == &INIT[..INIT.len().min(64)]).unwrap();
        assert_eq!(at % 4, 0);
        assert_eq!(&a[at..at + INIT.len()], INIT);
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn params_and_length() {
        let mut c = VmConfig { command: vec!["printf".into(), "%s|".into(), "a b".into()], ..Default::default() };
        let p = params(&c, Some(Root::Host), &[]).unwrap();
        assert_eq!(p[0], "microvm.exitdev=0xd0000000");
        assert!(p.iter().any(|x| x.starts_with("microvm.cwd=")));
        let parsed = protocol::Params::parse(&p.join(" "));
        assert_eq!(parsed.argv.unwrap(), vec![b"printf".to_vec(), b"%s|".to_vec(), b"a b".to_vec()]);
        assert!(!params(&c, Some(Root::Disk), &[]).unwrap().iter().any(|x| x.starts_with("microvm.cwd=")));
        check_length(&p, &c).unwrap();
        // A long command waits for the control port instead of taking the command line.
        c.command = vec!["x".repeat(1600)];
        assert!(!command_on_cmdline(&c));
        let p = params(&c, Some(Root::Disk), &[]).unwrap();
        assert!(p.contains(&protocol::WAIT.to_string()) && !p.iter().any(|x| x.starts_with("microvm.argv=")), "{p:?}");
        // It runs right away: the init does not read programs into the page cache for a
        // snapshot that is not taken.
        let parsed = protocol::Params::parse(&p.join(" "));
        assert!(parsed.wait && !parsed.snapshot, "{p:?}");
        let snap = VmConfig { snapshot_to: Some("/tmp/s".into()), ..Default::default() };
        let parsed = protocol::Params::parse(&params(&snap, Some(Root::Disk), &[]).unwrap().join(" "));
        assert!(parsed.wait && parsed.snapshot);
        check_length(&p, &c).unwrap();
        // The command line can still be too long (the user's own parameters).
        let mut long = p.clone();
        c.command = vec!["x".repeat(700)];
        assert!(command_on_cmdline(&c));
        long.push("y".repeat(1200));
        long.extend(params(&c, Some(Root::Disk), &[]).unwrap());
        let e = check_length(&long, &c).unwrap_err();
        assert!(e.is_usage() && e.to_string().contains("too long"), "{e}");
        let share = protocol::Share { tag: "t 1".into(), path: b"/data".to_vec(), read_only: true };
        assert!(matches!(params(&c, None, &[share]), Err(GuestInitError::BadTag(_))));
    }
}
