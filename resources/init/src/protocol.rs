//! The kernel command line between microvm and its guest init: the one definition of every
//! parameter, compiled into both sides (the init as `mod protocol`, the vmm as a `#[path]`
//! module in vmm/src/guestinit.rs), so neither can drift. Uses only std and base64.
//!
//! Standard kernel parameters the init honours as the kernel would (the last occurrence
//! wins, so the user's `--cmdline` overrides what microvm put before it):
//!
//! | parameter        | meaning                                                              |
//! |------------------|----------------------------------------------------------------------|
//! | `root=DEV`       | a block device (`/dev/vda`); with `rootfstype=virtiofs`, a virtio-fs tag |
//! | `rootfstype=T`   | filesystem type; default: each block filesystem of /proc/filesystems |
//! | `rootflags=OPTS` | filesystem-specific mount options                                    |
//! | `ro` / `rw`      | mount the root read-only (the default, as in the kernel) or read-write |
//!
//! microvm's own (values that may hold any byte are base64, standard alphabet, padded):
//!
//! | parameter                   | meaning                                                  |
//! |-----------------------------|----------------------------------------------------------|
//! | `microvm.argv=B64`          | the command: each word followed by a NUL byte. Absent: a shell on the console |
//! | `microvm.cwd=B64`           | the command's working directory (default `/`)            |
//! | `microvm.share=TAG,B64[,ro]`| mount virtio-fs `TAG` at the path B64 (repeatable)       |
//! | `microvm.term=TERM`         | `TERM` for the command (default `linux`)                 |
//! | `microvm.exitdev=0xADDR`    | physical address of microvm's exit device (a 32-bit write of the status) |
//! | `microvm.wait`              | the command comes later, over the control port (below)   |
//! | `microvm.snapshot`          | (with `microvm.wait`) the VM is saved at READY: first read the programs a restored command most likely runs, so the saved page cache has them |
//! | `microvm.renew`             | (control port only) a restored guest's address went to another VM: configure every interface by DHCP again before the command |
//!
//! # Waiting for the command (snapshots, long commands)
//!
//! With `microvm.wait` the init does everything up to the command (root, mounts, network),
//! then opens the port named [`PORT_CONTROL`], writes [`READY_MESSAGE`] and reads one line:
//! the command, as the `microvm.argv=`, `microvm.cwd=` and `microvm.term=` words above,
//! space-separated, ending in `\n` (at most [`COMMAND_MESSAGE_MAX`] bytes). A line without
//! `microvm.argv=` starts a shell on the console. microvm snapshots the VM when READY
//! arrives (`--snapshot-to`), and a restore (`--restore`) writes the command line; so does
//! a boot whose command is too long for the kernel command line.

// Each side uses half of this file (the vmm writes, the init reads).
#![allow(dead_code)]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// The virtio-fs tag of the host root (no `--disk`, no `--initrd`).
pub const ROOT_TAG: &str = "microvm-root";
/// `rootfstype=` of a virtio-fs root.
pub const VIRTIOFS: &str = "virtiofs";

pub const ARGV: &str = "microvm.argv";
pub const CWD: &str = "microvm.cwd";
pub const SHARE: &str = "microvm.share";
pub const TERM: &str = "microvm.term";
pub const EXIT_DEVICE: &str = "microvm.exitdev";
pub const WAIT: &str = "microvm.wait";
pub const RENEW: &str = "microvm.renew";
pub const SNAPSHOT: &str = "microvm.snapshot";

/// The control port: READY from the init, then the command from microvm (see above).
pub const PORT_CONTROL: &str = "microvm.control";
/// What the init writes on the control port when it waits for the command.
pub const READY_MESSAGE: &[u8] = b"READY\n";
/// The longest command line the init reads from the control port.
pub const COMMAND_MESSAGE_MAX: usize = 256 * 1024;

/// The command line a restore writes on the control port: `words` (`argv_param`, ...)
/// space-separated, then a newline.
pub fn command_message<W: AsRef<str>>(words: &[W]) -> Vec<u8> {
    let mut line = words.iter().map(AsRef::as_ref).collect::<Vec<_>>().join(" ").into_bytes();
    line.push(b'\n');
    line
}

/// Names of the virtio-console ports of the command channel (vmm/src/channel.rs): the
/// command's stdin, stdout and stderr (`/sys/class/virtio-ports/*/name`). microvm attaches
/// them when its init runs a command; the init gives them to the command as fds 0, 1, 2.
pub const PORT_STDIN: &str = "microvm.stdin";
pub const PORT_STDOUT: &str = "microvm.stdout";
pub const PORT_STDERR: &str = "microvm.stderr";

/// A parameter microvm sent that the init cannot read.
#[derive(Debug, PartialEq, Eq)]
pub struct BadParam {
    pub name: &'static str,
    pub value: String,
}

impl std::fmt::Display for BadParam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad kernel parameter {}={}", self.name, self.value)
    }
}

/// A virtio-fs share the init mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The virtio-fs tag: `[A-Za-z0-9._-]`, at most 36 bytes (the virtio-fs limit).
    pub tag: String,
    /// Absolute guest path.
    pub path: Vec<u8>,
    pub read_only: bool,
}

/// Whether `tag` can travel in `microvm.share=` (and is a valid virtio-fs tag).
pub fn valid_tag(tag: &str) -> bool {
    !tag.is_empty() && tag.len() <= 36 && tag.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Share {
    /// `microvm.share=...`; None when the tag is not `valid_tag`.
    pub fn param(&self) -> Option<String> {
        if !valid_tag(&self.tag) {
            return None;
        }
        let ro = if self.read_only { ",ro" } else { "" };
        Some(format!("{SHARE}={},{}{ro}", self.tag, B64.encode(&self.path)))
    }

    fn parse(value: &str) -> Option<Share> {
        let mut parts = value.split(',');
        let tag = parts.next().filter(|t| valid_tag(t))?.to_string();
        let path = B64.decode(parts.next()?).ok().filter(|p| p.first() == Some(&b'/') && !p.contains(&0))?;
        let read_only = match parts.next() {
            None => false,
            Some("ro") => true,
            Some(_) => return None,
        };
        parts.next().is_none().then_some(Share { tag, path, read_only })
    }
}

/// `microvm.argv=...` for `words` (each word is taken as bytes; a NUL inside one is
/// impossible in a real argv).
pub fn argv_param<W: AsRef<[u8]>>(words: &[W]) -> String {
    let mut raw = Vec::new();
    for w in words {
        raw.extend_from_slice(w.as_ref());
        raw.push(0);
    }
    format!("{ARGV}={}", B64.encode(raw))
}

/// `microvm.cwd=...`.
pub fn cwd_param(path: &[u8]) -> String {
    format!("{CWD}={}", B64.encode(path))
}

/// `microvm.exitdev=...`.
pub fn exit_device_param(addr: u64) -> String {
    format!("{EXIT_DEVICE}={addr:#x}")
}

/// Everything the init reads from /proc/cmdline.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Params {
    pub root: Option<String>,
    pub rootfstype: Option<String>,
    pub rootflags: Option<String>,
    /// `rw` seen last (the kernel's default is read-only).
    pub read_write: bool,
    pub argv: Option<Vec<Vec<u8>>>,
    pub cwd: Option<Vec<u8>>,
    pub shares: Vec<Share>,
    pub term: Option<String>,
    pub exit_device: Option<u64>,
    /// `microvm.wait`: the command comes over the control port.
    pub wait: bool,
    /// `microvm.renew`: configure the network again before the command.
    pub renew: bool,
    /// `microvm.snapshot`: the VM is saved at READY.
    pub snapshot: bool,
    /// Parameters of microvm's that could not be read (the init reports the first, after
    /// it has learnt where the exit device is).
    pub errors: Vec<BadParam>,
}

impl Params {
    pub fn parse(cmdline: &str) -> Params {
        let mut p = Params::default();
        for word in split_cmdline(cmdline) {
            if let Err(e) = p.take(&word) {
                p.errors.push(e);
            }
        }
        p
    }

    fn take(&mut self, word: &str) -> Result<(), BadParam> {
        let p = self;
        {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (word, None),
            };
            let bad = |name: &'static str| BadParam { name, value: value.unwrap_or_default().to_string() };
            match (key, value) {
                ("ro", None) => p.read_write = false,
                (WAIT, None) => p.wait = true,
                (RENEW, None) => p.renew = true,
                (SNAPSHOT, None) => p.snapshot = true,
                ("rw", None) => p.read_write = true,
                ("root", Some(v)) => p.root = Some(v.to_string()),
                ("rootfstype", Some(v)) => p.rootfstype = Some(v.to_string()),
                ("rootflags", Some(v)) => p.rootflags = Some(v.to_string()),
                (ARGV, Some(v)) => p.argv = Some(decode_words(v).ok_or_else(|| bad(ARGV))?),
                (CWD, Some(v)) => {
                    p.cwd = Some(B64.decode(v).ok().filter(|c| !c.is_empty() && !c.contains(&0)).ok_or_else(|| bad(CWD))?)
                }
                (SHARE, Some(v)) => p.shares.push(Share::parse(v).ok_or_else(|| bad(SHARE))?),
                (TERM, Some(v)) => p.term = Some(v.to_string()),
                (EXIT_DEVICE, Some(v)) => {
                    let hex = v.strip_prefix("0x").ok_or_else(|| bad(EXIT_DEVICE))?;
                    p.exit_device = Some(u64::from_str_radix(hex, 16).map_err(|_| bad(EXIT_DEVICE))?);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The words of `microvm.argv=` (None: not base64, empty, or not NUL-terminated).
fn decode_words(value: &str) -> Option<Vec<Vec<u8>>> {
    let raw = B64.decode(value).ok()?;
    let body = raw.strip_suffix(&[0])?;
    Some(body.split(|b| *b == 0).map(<[u8]>::to_vec).collect())
}

/// Splits a kernel command line as the kernel's `next_arg()` does: on whitespace outside
/// double quotes, with the quotes removed.
pub fn split_cmdline(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let (mut in_quote, mut any) = (false, false);
    for c in line.chars() {
        match c {
            '"' => {
                in_quote = !in_quote;
                any = true;
            }
            c if c.is_whitespace() && !in_quote => {
                if any {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_round_trips_any_bytes() {
        let words: Vec<&[u8]> = vec![b"printf", b"%s|", b"a b", b"c'd", b"", "\u{e9}t\u{e9} \"q\"".as_bytes(), b"\xff\x01"];
        let param = argv_param(&words);
        assert!(!param.contains(' ') && !param.contains('"'), "{param}");
        let p = Params::parse(&format!("console=ttyS0 {param} quiet"));
        assert_eq!(p.argv.unwrap(), words.iter().map(|w| w.to_vec()).collect::<Vec<_>>());
        // One empty word is not the same as no words.
        assert_eq!(Params::parse(&argv_param(&[b""])).argv.unwrap(), vec![Vec::<u8>::new()]);
    }

    #[test]
    fn a_command_line_with_renew_asks_for_the_network_again() {
        let words = [RENEW.to_string(), argv_param(&[b"true"])];
        let line = command_message(&words);
        let p = Params::parse(std::str::from_utf8(&line).unwrap().trim_end());
        assert!(p.renew && p.errors.is_empty());
        assert!(!Params::parse(&argv_param(&[b"true"])).renew);
    }

    #[test]
    fn standard_root_params_last_wins() {
        let p = Params::parse("root=/dev/vda rw quiet root=\"/dev/vdb\" rootflags=data=ordered ro");
        assert_eq!(p.root.as_deref(), Some("/dev/vdb"));
        assert_eq!(p.rootflags.as_deref(), Some("data=ordered"));
        assert!(!p.read_write);
        assert!(Params::parse("rw").read_write);
        assert!(!Params::parse("").read_write);
    }

    #[test]
    fn shares_cwd_exitdev() {
        let s = Share { tag: "t0".into(), path: b"/home/me/a dir".to_vec(), read_only: true };
        let line = format!("{} {} {} microvm.term=xterm", s.param().unwrap(), cwd_param(b"/x y"), exit_device_param(0xd000_0000));
        let p = Params::parse(&line);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.shares, vec![s]);
        assert_eq!(p.cwd.as_deref(), Some(&b"/x y"[..]));
        assert_eq!(p.exit_device, Some(0xd000_0000));
        assert_eq!(p.term.as_deref(), Some("xterm"));
        assert!(Share { tag: "bad tag".into(), path: b"/".to_vec(), read_only: false }.param().is_none());
    }

    #[test]
    fn bad_values_are_errors() {
        for line in [
            "microvm.argv=!!!",
            "microvm.argv=YQ==", // "a" without its NUL
            "microvm.argv=",
            "microvm.cwd=",
            "microvm.share=t",
            "microvm.share=t,cmVs",    // "rel": not absolute
            "microvm.share=t,Lw==,rx", // unknown flag
            "microvm.share=t/x,Lw==",
            "microvm.exitdev=123",
            "microvm.exitdev=0xzz",
        ] {
            let p = Params::parse(&format!("quiet {line} rw"));
            assert_eq!(p.errors.len(), 1, "{line}");
            assert!(p.read_write, "the rest is still read: {line}");
        }
    }

    #[test]
    fn splitting() {
        assert_eq!(split_cmdline("  a \"b c\"  d=\"e f\" \"\" "), vec!["a", "b c", "d=e f", ""]);
    }
}
