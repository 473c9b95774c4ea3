//! An initramfs written in memory: the "newc" cpio format the kernel unpacks
//! (Documentation/driver-api/early-userspace/buffer-format.rst), uncompressed (on nested
//! KVM the guest kernel's inflate is emulated and costs minutes).
//!
//! Written here rather than with a crate: the format is a 110-byte ASCII header, the name,
//! the data and 4-byte padding; the cpio crates on crates.io are readers/writers of files
//! on disk with more API than these forty lines, and none is rust-vmm-kept.

use thiserror::Error;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Error)]
pub enum CpioError {
    #[error("initramfs entry name '{0}' is empty, absolute, or holds a NUL byte")]
    BadName(String),
    #[error("initramfs entry '{name}' is too large ({size} bytes)")]
    TooLarge { name: String, size: usize },
}

/// A newc archive being written.
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Cpio::new()
    }
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio { buf: Vec::new(), next_ino: 1 }
    }

    /// A directory, e.g. `dir("dev", 0o755)`. Parents must come first.
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A character device node, e.g. `char_dev("dev/console", 0o600, 5, 1)`.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> Result<(), CpioError> {
        self.entry(name, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.header(TRAILER, 0, 1, (0, 0), 0, 0);
        self.buf
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) -> Result<(), CpioError> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') || name == TRAILER {
            return Err(CpioError::BadName(name.to_string()));
        }
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge { name: name.to_string(), size: data.len() })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, mode, nlink, rdev, size, ino);
        self.buf.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// Header, name, NUL, padding to 4 bytes. uid/gid 0, mtime 0, no checksum.
    fn header(&mut self, name: &str, mode: u32, nlink: u32, (rmaj, rmin): (u32, u32), size: u32, ino: u32) {
        let namesize = name.len() as u32 + 1;
        self.buf.extend_from_slice(MAGIC);
        for field in [ino, mode, 0, 0, nlink, 0, size, 0, 0, rmaj, rmin, namesize, 0] {
            self.buf.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};

    /// (name, mode, rdev major, rdev minor, data) of each entry, trailer included.
    type Entry = (String, u32, u32, u32, Vec<u8>);

    /// A minimal newc reader, independent of the writer's code.
    fn read(mut b: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut at = 0usize;
        loop {
            assert_eq!(&b[..6], MAGIC, "bad magic at offset {at}");
            let field = |i: usize| u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap();
            let (mode, size, rmaj, rmin, namesize) = (field(1), field(6) as usize, field(9), field(10), field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1]).unwrap().to_string();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = b[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            at += next;
            let done = name == TRAILER;
            out.push((name, mode, rmaj, rmin, data));
            if done {
                assert_eq!(next, b.len(), "bytes after the trailer");
                return out;
            }
            b = &b[next..];
        }
    }

    fn sample() -> Vec<u8> {
        let mut c = Cpio::new();
        c.dir("dev", 0o755).unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        c.file("init", 0o755, b"#!/bin/sh\necho odd-length\n").unwrap();
        c.file("e", 0o644, b"").unwrap();
        c.finish()
    }

    #[test]
    fn parses_back() {
        let a = sample();
        assert_eq!(a.len() % 4, 0);
        let e = read(&a);
        let names: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "e", TRAILER]);
        assert_eq!(e[0].1, 0o040755);
        assert_eq!((e[1].1, e[1].2, e[1].3), (0o020600, 5, 1));
        assert_eq!((e[2].1, e[2].4.as_slice()), (0o100755, &b"#!/bin/sh\necho odd-length\n"[..]));
        assert!(e[3].4.is_empty());
    }

    #[test]
    fn bad_names() {
        let mut c = Cpio::new();
        for n in ["", "/init", "a\0b", TRAILER] {
            assert!(matches!(c.file(n, 0o644, b"x"), Err(CpioError::BadName(_))), "{n:?}");
        }
    }

    /// GNU cpio (a build-guest prerequisite) extracts it: same files, modes and nodes.
    #[test]
    fn gnu_cpio_extracts_it() {
        let dir = std::env::temp_dir().join(format!("microvm-cpio-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.cpio");
        std::fs::write(&archive, sample()).unwrap();
        let out = dir.join("x");
        std::fs::create_dir(&out).unwrap();
        let st = std::process::Command::new("cpio")
            .args(["-idm", "--quiet", "-H", "newc", "-F"])
            .arg(&archive)
            .current_dir(&out)
            .status()
            .expect("run cpio (apt-get install cpio)");
        assert!(st.success());
        assert_eq!(std::fs::read(out.join("init")).unwrap(), b"#!/bin/sh\necho odd-length\n");
        assert_eq!(std::fs::metadata(out.join("init")).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read(out.join("e")).unwrap(), b"");
        assert!(out.join("dev").is_dir());
        // Only root can make device nodes; the tests run as root here.
        let console = std::fs::metadata(out.join("dev/console")).unwrap();
        assert!(console.file_type().is_char_device());
        assert_eq!(console.rdev(), libc::makedev(5, 1));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
