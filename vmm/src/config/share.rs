//! `--share HOSTDIR[,at=GUESTPATH][,tag=T][,ro]`: a host directory the guest mounts over
//! virtio-fs, at the same path unless `at=` says otherwise. Parse, validate, preflight.

use std::path::PathBuf;

use options::{OptionError, OptionParser, Reason};
use thiserror::Error;

const PARSER: OptionParser = OptionParser::new("--share", "HOSTDIR")
    .values(&["at", "tag"])
    .switches(&[("ro", "readonly"), ("readonly", "readonly")]);

/// Longest virtio-fs tag: the `tag` field of struct virtio_fs_config.
pub const MAX_TAG_LEN: usize = devices::virtio::fs::TAG_MAX_LEN;

/// A share that cannot be used as asked.
#[derive(Debug, Error)]
pub enum ShareCheckError {
    #[error("bad --share '{share}': {why}")]
    Invalid { share: String, why: String },
    #[error("cannot share '{path}'")]
    Missing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot share '{0}': not a directory")]
    NotADirectory(PathBuf),
}

/// One `--share`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareConfig {
    /// The host directory.
    pub host: PathBuf,
    /// Where the guest mounts it (absolute); `None`: the host path.
    pub guest: Option<PathBuf>,
    /// The virtio-fs tag; `None`: `share0`, `share1`, ... by position
    /// (see [`tag_or_default`](Self::tag_or_default)).
    pub tag: Option<String>,
    pub read_only: bool,
}

impl std::str::FromStr for ShareConfig {
    type Err = OptionError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let o = PARSER.parse(spec)?;
        let share = ShareConfig {
            host: PathBuf::from(o.head()),
            guest: o.get("at").map(PathBuf::from),
            tag: o.get("tag").map(str::to_string),
            read_only: o.has("readonly"),
        };
        share.check().map_err(|why| o.error(Reason::Invalid(why)))?;
        Ok(share)
    }
}

impl ShareConfig {
    /// The tag of the share at position `index` among all shares.
    pub fn tag_or_default(&self, index: usize) -> String {
        self.tag.clone().unwrap_or_else(|| format!("share{index}"))
    }

    /// Pure checks (also run while parsing a spec).
    pub fn validate(&self) -> Result<(), ShareCheckError> {
        self.check().map_err(|why| ShareCheckError::Invalid { share: self.host.display().to_string(), why })
    }

    fn check(&self) -> Result<(), String> {
        if self.host.as_os_str().is_empty() {
            return Err("missing HOSTDIR".into());
        }
        if let Some(at) = &self.guest {
            if !at.is_absolute() {
                return Err(format!("at={} must be an absolute guest path", at.display()));
            }
            if at.parent().is_none() {
                return Err("at=/ would hide the guest's root; pick a directory".into());
            }
        }
        // The rule is the init protocol's (the tag travels in `microvm.share=`); here only
        // the message says which part of it failed.
        if let Some(tag) = self.tag.as_deref().filter(|t| !crate::guestinit::protocol::valid_tag(t)) {
            if tag.is_empty() || tag.len() > MAX_TAG_LEN {
                return Err(format!("tag '{tag}' must have 1 to {MAX_TAG_LEN} bytes"));
            }
            return Err(format!("tag '{tag}': only letters, digits, '_', '.' and '-' are allowed"));
        }
        Ok(())
    }

    /// Read-only host check: the host directory exists.
    pub fn preflight(&self) -> Result<(), ShareCheckError> {
        let meta = std::fs::metadata(&self.host)
            .map_err(|source| ShareCheckError::Missing { path: self.host.clone(), source })?;
        if !meta.is_dir() {
            return Err(ShareCheckError::NotADirectory(self.host.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ShareConfig, OptionError> {
        s.parse()
    }

    #[test]
    fn specs() {
        assert_eq!(p("/src").unwrap(), ShareConfig { host: "/src".into(), guest: None, tag: None, read_only: false });
        assert_eq!(
            p("data,at=/mnt/data,tag=d1,ro").unwrap(),
            ShareConfig { host: "data".into(), guest: Some("/mnt/data".into()), tag: Some("d1".into()), read_only: true }
        );
        assert!(p("/x,readonly").unwrap().read_only);
        assert_eq!(p("/x").unwrap().tag_or_default(3), "share3");
        assert_eq!(p("/x,tag=mine").unwrap().tag_or_default(3), "mine");
    }

    #[test]
    fn errors_name_the_spec_on_one_line() {
        for (spec, needle) in [
            ("", "missing HOSTDIR"),
            ("/x,at=rel/path", "at=rel/path must be an absolute guest path"),
            ("/x,at=/", "would hide the guest's root"),
            ("/x,tag=a b", "only letters"),
            ("/x,tag=0123456789012345678901234567890123456", "1 to 36 bytes"),
            ("/x,at=", "option 'at' needs a value"),
            ("/x,rw", "unknown option 'rw'"),
            ("/x,ro,ro", "given twice"),
        ] {
            let e = p(spec).unwrap_err().to_string();
            assert!(e.starts_with(&format!("bad --share '{spec}': ")) && e.contains(needle) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn validate_and_preflight() {
        let s = ShareConfig { host: "/x".into(), guest: Some("rel".into()), tag: None, read_only: false };
        assert!(s.validate().unwrap_err().to_string().contains("absolute"));
        let dir = std::env::temp_dir();
        ShareConfig { host: dir.clone(), guest: None, tag: None, read_only: true }.preflight().unwrap();
        let missing = ShareConfig { host: dir.join("mv-no-such-share-dir"), guest: None, tag: None, read_only: false };
        assert!(matches!(missing.preflight(), Err(ShareCheckError::Missing { .. })));
        let file = ShareConfig { host: "/proc/self/status".into(), guest: None, tag: None, read_only: false };
        assert!(matches!(file.preflight(), Err(ShareCheckError::NotADirectory(_))));
    }
}
