//! Host directories in the guest over virtio-fs: which directories (`--share`, and the host
//! root + working directory when the guest has no disk and no initrd), the virtiofsd that
//! serves each one, and the private state directory holding their sockets.
//!
//! Lifecycle (see `virtiofsd.rs`): one virtiofsd per share, started before the VM runs, in its
//! own process group (the terminal's Ctrl-C is the guest's) with PR_SET_PDEATHSIG, so it dies
//! with microvm even on SIGKILL or a panic. microvm connects to its socket (the one connection
//! virtiofsd accepts), watches its pidfd in the event loop (its death ends the VM with an
//! error: the guest's file system requests would otherwise wait for ever), and on every exit
//! path shuts the connection down, waits for the daemon (bounded), and removes the state
//! directory.
//!
//! The guest side: the init mounts each share by tag; [`plan`] is the list it needs (tag,
//! guest path, read-only), [`ROOT_TAG`] is the host root.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::VmConfig;

pub use crate::virtiofsd::{kill_all_now, Shares};

/// Tag of the host's `/`, shared read-only as the guest's root when the guest has neither
/// `--disk` nor `--initrd`.
pub use crate::guestinit::protocol::ROOT_TAG;
/// Tag of the current directory, shared writable (and mounted at the same path) together
/// with the host root.
pub const CWD_TAG: &str = "microvm-cwd";
/// Tags `--share` may not use.
pub const RESERVED_TAGS: [&str; 2] = [ROOT_TAG, CWD_TAG];
/// Environment variable naming the virtiofsd binary to use.
pub const VIRTIOFSD_ENV: &str = "MICROVM_VIRTIOFSD";
/// How to get virtiofsd (the Rust one; Debian 12 has no package).
pub const VIRTIOFSD_INSTALL: &str =
    "apt-get install -y libseccomp-dev libcap-ng-dev && cargo install virtiofsd --locked";

#[derive(Debug, Error)]
pub enum ShareError {
    #[error("virtiofsd not found ({0}); it serves --share and the host-root guest: install it with `{VIRTIOFSD_INSTALL}` or set {VIRTIOFSD_ENV}=/path/to/virtiofsd")]
    VirtiofsdMissing(String),
    #[error("--share {path}: {reason}")]
    HostDir { path: PathBuf, reason: String },
    #[error("cannot find the current directory to share it")]
    Cwd(#[source] std::io::Error),
    #[error("cannot create microvm's state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket path {0} is too long for a unix socket (set MICROVM_RUN_DIR to a shorter directory)")]
    SocketPath(PathBuf),
    #[error("cannot start {bin}")]
    Spawn {
        bin: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch virtiofsd (pidfd_open)")]
    Pidfd(#[source] std::io::Error),
    #[error("virtiofsd for share '{tag}' ({host}) exited at startup ({status}); its messages are above")]
    EarlyExit { tag: String, host: PathBuf, status: String },
    #[error("virtiofsd for share '{tag}' did not listen on {socket} within {secs} s")]
    StartTimeout { tag: String, socket: PathBuf, secs: u64 },
    #[error("share '{tag}': cannot set up the virtio-fs device")]
    Device {
        tag: String,
        #[source]
        source: devices::virtio::fs::FsError,
    },
}

impl ShareError {
    /// Errors of the user's input or environment (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ShareError::VirtiofsdMissing(_) | ShareError::HostDir { .. } | ShareError::SocketPath(_)
        )
    }
}

/// One directory the guest gets, resolved: what the guest init mounts (`tag` at `guest`,
/// read-only or not) and what virtiofsd serves (`host`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    /// Canonical host path.
    pub host: PathBuf,
    /// Absolute guest path (`/` for the host root).
    pub guest: PathBuf,
    pub read_only: bool,
}

impl Share {
    /// True for the host-root share (the guest's `/`).
    pub fn is_root(&self) -> bool {
        self.tag == ROOT_TAG
    }
}

/// True when the guest's root is the host's `/` over virtio-fs: no `--disk`, no `--initrd`.
pub fn host_root(config: &VmConfig) -> bool {
    config.disks.is_empty() && config.initrd.is_none()
}

/// How many virtio-fs devices `config` needs, at most (pure: the working-directory share is
/// counted even though it is left out when the working directory is `/`).
pub fn count(config: &VmConfig) -> usize {
    config.shares.len() + if host_root(config) { RESERVED_TAGS.len() } else { 0 }
}

/// The shares of `config`, in device order: the host root and working directory first (when
/// [`host_root`]), then each `--share` with its defaults filled in. Checks every host
/// directory. This is the list the guest init mounts.
pub fn plan(config: &VmConfig) -> Result<Vec<Share>, ShareError> {
    let mut shares = Vec::new();
    if host_root(config) {
        shares.push(Share { tag: ROOT_TAG.into(), host: "/".into(), guest: "/".into(), read_only: true });
        let cwd = std::env::current_dir().and_then(std::fs::canonicalize).map_err(ShareError::Cwd)?;
        if cwd != Path::new("/") {
            shares.push(Share { tag: CWD_TAG.into(), host: cwd.clone(), guest: cwd, read_only: false });
        }
    }
    for (s, tag) in config.shares.iter().zip(config.share_tags()) {
        let host = canonical_dir(&s.host)?;
        let guest = s.guest.clone().unwrap_or_else(|| host.clone());
        shares.push(Share { tag, host, guest, read_only: s.read_only });
    }
    Ok(shares)
}

fn canonical_dir(path: &Path) -> Result<PathBuf, ShareError> {
    let bad = |reason: String| ShareError::HostDir { path: path.to_path_buf(), reason };
    let canonical = std::fs::canonicalize(path).map_err(|e| bad(format!("cannot open it ({e})")))?;
    if !canonical.is_dir() {
        return Err(bad("not a directory".into()));
    }
    Ok(canonical)
}

/// The virtiofsd binary: `$MICROVM_VIRTIOFSD`, else the first of `$PATH`, `~/.cargo/bin`
/// (where `cargo install` puts it) and `/usr/libexec` (distribution packages).
pub fn find_virtiofsd() -> Result<PathBuf, ShareError> {
    if let Some(p) = std::env::var_os(VIRTIOFSD_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(ShareError::VirtiofsdMissing(format!("{VIRTIOFSD_ENV}={} is not an executable file", p.display())))
        };
    }
    let path_dirs = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    path_dirs
        .into_iter()
        .chain(home)
        .chain(std::iter::once(PathBuf::from("/usr/libexec")))
        .map(|d| d.join("virtiofsd"))
        .find(|p| is_executable(p))
        .ok_or_else(|| ShareError::VirtiofsdMissing("not in PATH, ~/.cargo/bin or /usr/libexec".into()))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ShareConfig;

    #[test]
    fn plan_fills_defaults_and_checks_dirs() {
        let tmp = std::env::temp_dir().join(format!("mvshare-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("a")).unwrap();
        std::fs::write(tmp.join("file"), b"x").unwrap();
        let a = tmp.join("a");
        let mut c = VmConfig { disks: vec!["r.img".parse().unwrap()], ..Default::default() };
        c.shares = vec![
            format!("{},tag=share0", a.display()).parse::<ShareConfig>().unwrap(),
            format!("{}/../a,ro,at=/data", a.display()).parse().unwrap(),
        ];
        let p = plan(&c).unwrap();
        let canonical = std::fs::canonicalize(&a).unwrap();
        assert_eq!(p[0], Share { tag: "share0".into(), host: canonical.clone(), guest: canonical.clone(), read_only: false });
        // share0 is taken by an explicit tag: the default skips it.
        assert_eq!(p[1], Share { tag: "share1".into(), host: canonical, guest: "/data".into(), read_only: true });
        c.shares = vec![format!("{}", tmp.join("file").display()).parse().unwrap()];
        assert!(matches!(plan(&c), Err(ShareError::HostDir { reason, .. }) if reason == "not a directory"));
        c.shares = vec![format!("{}", tmp.join("none").display()).parse().unwrap()];
        assert!(matches!(plan(&c), Err(e @ ShareError::HostDir { .. }) if e.is_usage()));
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn host_root_without_disk_or_initrd() {
        let c = VmConfig::default();
        assert!(host_root(&c));
        let p = plan(&c).unwrap();
        assert_eq!(p[0], Share { tag: ROOT_TAG.into(), host: "/".into(), guest: "/".into(), read_only: true });
        assert!(p[0].is_root());
        let cwd = std::fs::canonicalize(std::env::current_dir().unwrap()).unwrap();
        assert_eq!(p[1], Share { tag: CWD_TAG.into(), host: cwd.clone(), guest: cwd, read_only: false });
        let c = VmConfig { initrd: Some("i.cpio".into()), ..Default::default() };
        assert!(!host_root(&c) && plan(&c).unwrap().is_empty());
    }
}
