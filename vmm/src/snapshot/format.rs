//! The snapshot directory: `DIR/memory` (guest RAM, sparse) and `DIR/state`.
//!
//! `state` is a 32-byte header then a JSON body:
//!
//! ```text
//! 0   16  magic "microvm-snapshot"
//! 16   4  format version (u32 LE), FORMAT_VERSION
//! 20   4  CRC-32 of the body (u32 LE)
//! 24   8  body length (u64 LE), = file length - 32, at most MAX_STATE_BYTES
//! 32   .  body: SnapshotState as JSON (KVM structs as base64 blobs)
//! ```
//!
//! JSON because the body is small (~15 KiB per vCPU, parsed in well under a millisecond) and
//! device states come as opaque `serde_json::Value`s from the devices crate; the checksum
//! catches damage that would still parse. Nothing is trusted before the header, checksum and
//! `validate()` pass: a bad snapshot is an error, never a panic or a huge allocation.
//!
//! A snapshot is written into `DIR.tmp-<pid>` beside DIR, every file and the directory
//! fsync'd, and only then renamed to DIR (an existing snapshot at DIR is swapped out
//! atomically with RENAME_EXCHANGE). A crash at any point leaves either the old DIR or the
//! new one, never a half-written DIR; a leftover `DIR.tmp-<pid>` of a dead process is removed
//! by the next save to DIR and never read.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::memory::{self, MemoryRange};
use super::state::{VcpuState, VmState};
use super::{host_cpu_vendor, SnapshotError};
use crate::config::{MAX_MEMORY_MIB, MAX_VCPUS};
use crate::memory::GuestMemoryMmap;

/// Bumped whenever the layout of `state` or `memory` changes; other versions are refused.
/// 2: virtio devices skip GSI 9 (layout::VIRTIO_GSIS), so a fifth device's line moved.
pub const FORMAT_VERSION: u32 = 2;
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
const MAGIC: &[u8; 16] = b"microvm-snapshot";
pub(crate) const HEADER_LEN: usize = 32;
/// Far above a real state (32 vCPUs ~ 0.5 MiB), far below a harmful allocation.
pub const MAX_STATE_BYTES: u64 = 16 << 20;

/// Everything in `state`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The microvm that wrote it (informational; FORMAT_VERSION decides compatibility).
    pub microvm_version: String,
    /// CPUID leaf 0 of the host that took it; a restore needs the same vendor.
    pub cpu_vendor: String,
    /// Guest TSC frequency (kHz) at save time, 0 if KVM could not say.
    pub tsc_khz: u32,
    /// Guest RAM layout and where each range is in `memory` (filled in by `save`).
    pub memory: Vec<MemoryRange>,
    /// The VM configuration as the user gave it (the VMM's to define).
    pub config: serde_json::Value,
    pub vm: VmState,
    /// One per vCPU, in vCPU index order.
    pub vcpus: Vec<VcpuState>,
    /// Per-device states, opaque here (the devices crate's to define).
    pub devices: serde_json::Value,
}

impl SnapshotState {
    /// A state for this host and microvm; `save` fills in the memory layout.
    pub fn new(
        vm: VmState,
        vcpus: Vec<VcpuState>,
        config: serde_json::Value,
        devices: serde_json::Value,
    ) -> Self {
        SnapshotState {
            microvm_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu_vendor: host_cpu_vendor(),
            tsc_khz: vcpus.first().map_or(0, |v| v.tsc_khz),
            memory: Vec::new(),
            config,
            vm,
            vcpus,
            devices,
        }
    }

    pub(crate) fn validate(&self) -> Result<u64, String> {
        if self.vcpus.is_empty() || self.vcpus.len() > MAX_VCPUS as usize {
            return Err(format!("{} vCPUs (1 to {MAX_VCPUS})", self.vcpus.len()));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            v.validate().map_err(|e| format!("vCPU {i}: {e}"))?;
        }
        self.vm.validate()?;
        memory::validate_ranges(&self.memory, MAX_MEMORY_MIB << 20)
    }
}

/// A snapshot that passed every check, with its memory file open.
#[derive(Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub state: SnapshotState,
    memory: Arc<File>,
}

impl Snapshot {
    /// Guest RAM mapped MAP_PRIVATE from the memory file; give it to KVM with
    /// `snapshot::memory::register`.
    pub fn map_memory(&self) -> Result<GuestMemoryMmap, SnapshotError> {
        memory::map(
            &self.memory,
            &self.dir.join(MEMORY_FILE),
            &self.state.memory,
        )
    }
}

/// What a save cost.
#[derive(Clone, Copy, Debug)]
pub struct SaveStats {
    pub memory: memory::WriteStats,
    pub state_bytes: u64,
    /// Writing both files (without fsync).
    pub write: Duration,
    /// fsync of both files and the directory, and the rename.
    pub sync: Duration,
}

/// Writes the snapshot to `dir` atomically (see the module comment). `state.memory` is
/// replaced by the layout of `mem`. The VM must be paused.
pub fn save(
    dir: &Path,
    state: &SnapshotState,
    mem: &GuestMemoryMmap,
) -> Result<SaveStats, SnapshotError> {
    save_with(dir, state, mem, |_| Ok(()))
}

/// [`save`], with `extra` writing (and fsyncing) more files into the temporary directory
/// before it becomes DIR: they appear atomically with the rest.
pub fn save_with(
    dir: &Path,
    state: &SnapshotState,
    mem: &GuestMemoryMmap,
    extra: impl FnOnce(&Path) -> Result<(), SnapshotError>,
) -> Result<SaveStats, SnapshotError> {
    let (tmp, mut stats) = write_tmp(dir, state, mem)?;
    if let Err(e) = extra(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let t = Instant::now();
    if let Err(e) = commit(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    stats.sync += t.elapsed();
    Ok(stats)
}

/// Reads and checks the snapshot in `dir`.
pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let missing = |reason: &str| SnapshotError::Missing {
        dir: dir.to_path_buf(),
        reason: reason.to_string(),
    };
    if !dir.is_dir() {
        return Err(missing("not a directory"));
    }
    let file = match File::open(&state_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing("it has no state file"))
        }
        Err(source) => {
            return Err(SnapshotError::Unreadable {
                path: state_path,
                source,
            })
        }
    };
    let state = read_state(file, &state_path)?;

    let corrupt = |path: &Path, reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if state.cpu_vendor != host_cpu_vendor() {
        return Err(SnapshotError::Vendor {
            snapshot: state.cpu_vendor,
            host: host_cpu_vendor(),
        });
    }
    let mem_len = state.validate().map_err(|r| corrupt(&state_path, r))?;

    let mem_path = dir.join(MEMORY_FILE);
    let memory = File::open(&mem_path).map_err(|source| SnapshotError::Unreadable {
        path: mem_path.clone(),
        source,
    })?;
    let len = memory
        .metadata()
        .map_err(|source| SnapshotError::Unreadable {
            path: mem_path.clone(),
            source,
        })?
        .len();
    if len != mem_len {
        return Err(corrupt(
            &mem_path,
            format!("memory file is {len} bytes, the state says {mem_len}"),
        ));
    }
    Ok(Snapshot {
        dir: dir.to_path_buf(),
        state,
        memory: Arc::new(memory),
    })
}

fn read_state(file: File, path: &Path) -> Result<SnapshotState, SnapshotError> {
    let io = |source| SnapshotError::Unreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    // Never more than a valid state can be, whatever the file's size.
    file.take(HEADER_LEN as u64 + MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    parse_state(&bytes, path)
}

/// Header checks, then the JSON body (`validate` comes after, in `load`).
pub(crate) fn parse_state(bytes: &[u8], path: &Path) -> Result<SnapshotState, SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(corrupt(format!("truncated: {} bytes", bytes.len())));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(16);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    let crc = u32_at(20);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[24..32]);
    let body_len = u64::from_le_bytes(len8);
    let body = &bytes[HEADER_LEN..];
    if body_len > MAX_STATE_BYTES {
        return Err(corrupt(format!(
            "state body of {body_len} bytes (at most {MAX_STATE_BYTES})"
        )));
    }
    if body.len() as u64 != body_len {
        return Err(corrupt(format!(
            "truncated or padded: the header says {body_len} bytes of state, the file has {}",
            body.len()
        )));
    }
    if crc32fast::hash(body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(format!("bad state: {e}")))
}

pub(crate) fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::to_vec(state).map_err(SnapshotError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// `DIR` split into its parent (for the temporary sibling and the directory fsync) and name.
fn parent_and_name(dir: &Path) -> Result<(PathBuf, std::ffi::OsString), SnapshotError> {
    let name = dir
        .file_name()
        .ok_or_else(|| SnapshotError::NotASnapshotDir {
            dir: dir.to_path_buf(),
        })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// Steps 1-3 of a save: everything but the rename. Returns the complete temporary directory.
/// (Separate so tests can stop where a kill -9 would.)
pub(crate) fn write_tmp(
    dir: &Path,
    state: &SnapshotState,
    mem: &GuestMemoryMmap,
) -> Result<(PathBuf, SaveStats), SnapshotError> {
    let (parent, name) = parent_and_name(dir)?;
    // Refuse before writing gigabytes, and again at commit.
    check_replaceable(dir)?;
    remove_stale_tmp(&parent, &name);
    let mut tmp_name = name.clone();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = parent.join(tmp_name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err("cannot remove", &tmp))?;
    }
    // Guest memory may hold secrets: only the owner may read the snapshot.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io_err("cannot create", &tmp))?;
    match fill_tmp(&tmp, state, mem) {
        Ok(stats) => Ok((tmp, stats)),
        Err(e) => {
            // Best effort (a crash leaves it to the next save's stale-directory sweep).
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Writes and fsyncs both files in the (new, empty) temporary directory.
fn fill_tmp(
    tmp: &Path,
    state: &SnapshotState,
    mem: &GuestMemoryMmap,
) -> Result<SaveStats, SnapshotError> {
    let t = Instant::now();
    let mem_path = tmp.join(MEMORY_FILE);
    let mem_file = create_file(&mem_path)?;
    let (ranges, mem_stats) = memory::write(&mem_file, &mem_path, mem)?;
    let mut state = state.clone();
    state.memory = ranges;
    let encoded = encode_state(&state)?;
    let state_path = tmp.join(STATE_FILE);
    let mut state_file = create_file(&state_path)?;
    state_file
        .write_all(&encoded)
        .map_err(io_err("cannot write", &state_path))?;
    let write = t.elapsed();

    let t = Instant::now();
    mem_file
        .sync_all()
        .map_err(io_err("cannot fsync", &mem_path))?;
    state_file
        .sync_all()
        .map_err(io_err("cannot fsync", &state_path))?;
    sync_dir(tmp)?;
    Ok(SaveStats {
        memory: mem_stats,
        state_bytes: encoded.len() as u64,
        write,
        sync: t.elapsed(),
    })
}

fn create_file(path: &Path) -> Result<File, SnapshotError> {
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("cannot create", path))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("cannot fsync", dir))
}

/// DIR may be replaced only if it is absent, empty, or a microvm snapshot (its state file
/// starts with the magic): never clobber someone's unrelated directory.
fn check_replaceable(dir: &Path) -> Result<(), SnapshotError> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SnapshotError::Io {
                what: "cannot stat",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let not_ours = || SnapshotError::NotASnapshotDir {
        dir: dir.to_path_buf(),
    };
    if !meta.is_dir() {
        return Err(not_ours());
    }
    let mut entries = std::fs::read_dir(dir).map_err(io_err("cannot read", dir))?;
    if entries.next().is_none() {
        return Ok(());
    }
    let mut magic = [0u8; 16];
    match File::open(dir.join(STATE_FILE)).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) if &magic == MAGIC => Ok(()),
        _ => Err(not_ours()),
    }
}

/// The last step: make the temporary directory DIR.
pub(crate) fn commit(tmp: &Path, dir: &Path) -> Result<(), SnapshotError> {
    let (parent, _) = parent_and_name(dir)?;
    check_replaceable(dir)?;
    if dir.exists() {
        // Swap atomically, then delete the old snapshot (now at `tmp`).
        rename_exchange(tmp, dir)?;
        sync_dir(&parent)?;
        if let Err(e) = std::fs::remove_dir_all(tmp) {
            tracing::warn!(
                "cannot remove the previous snapshot at {}: {e}",
                tmp.display()
            );
        }
    } else {
        std::fs::rename(tmp, dir).map_err(io_err("cannot rename the snapshot to", dir))?;
        sync_dir(&parent)?;
    }
    Ok(())
}

fn rename_exchange(a: &Path, b: &Path) -> Result<(), SnapshotError> {
    let cstr = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| {
            SnapshotError::NotASnapshotDir {
                dir: p.to_path_buf(),
            }
        })
    };
    let (ca, cb) = (cstr(a)?, cstr(b)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r != 0 {
        return Err(SnapshotError::Io {
            what: "cannot replace the snapshot at",
            path: b.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Removes `NAME.tmp-<pid>` siblings left by processes that no longer exist (killed while
/// saving). Best effort: a failure only leaves garbage that nothing reads.
fn remove_stale_tmp(parent: &Path, name: &std::ffi::OsStr) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let mut prefix = name.as_bytes().to_vec();
    prefix.extend_from_slice(b".tmp-");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let Some(pid) = std::str::from_utf8(pid)
            .ok()
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid <= 0 || pid == std::process::id() as libc::pid_t || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        tracing::info!("removing {}, left by a killed save", path.display());
        if let Err(e) = std::fs::remove_dir_all(&path) {
            tracing::warn!("cannot remove {}: {e}", path.display());
        }
    }
}

fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}
