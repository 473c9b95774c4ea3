//! Host quirks. On "PVM" nested KVM (the `kvm_pvm` module) the guest's ring-0 code is
//! emulated and its CPUID shows the host's features whatever KVM_SET_CPUID2 says, so
//! features the emulator can't run must be hidden on the guest command line, and the
//! TSC-deadline timer (which hangs the guest there) avoided. See ENVIRONMENT notes in the
//! README. On ordinary KVM none of this applies.

use std::path::Path;

const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Guest command-line parameters that make Linux boot on a PVM host.
pub const PVM_CMDLINE: &[&str] = &[
    "clearcpuid=xsave,smap,smep,popcnt,cx16,pcid,invpcid,fsgsbase,rdrand,rdseed,avx,avx2,avx512f,pku,umip",
    "lapic=notscdeadline",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// Ordinary hardware-assisted KVM.
    Kvm,
    /// Nested PVM KVM.
    Pvm,
}

impl Host {
    pub fn detect() -> Host {
        Self::detect_at(Path::new(PVM_MODULE))
    }

    fn detect_at(module: &Path) -> Host {
        if module.exists() {
            Host::Pvm
        } else {
            Host::Kvm
        }
    }

    /// Extra guest command-line parameters for this host.
    pub fn cmdline_quirks(self) -> &'static [&'static str] {
        match self {
            Host::Kvm => &[],
            Host::Pvm => PVM_CMDLINE,
        }
    }
}

/// The kernel honours only the last `clearcpuid=`: a user's own list would silently drop
/// the quirk's (and the guest would die on the first hidden instruction). So a user's
/// `clearcpuid=` is merged into the quirk's list. Returns (quirk params, rest of the user's
/// command line).
pub fn merge_user_params(quirks: &[&str], user: &str) -> (Vec<String>, String) {
    let (clear, rest): (Vec<&str>, Vec<&str>) =
        user.split_whitespace().partition(|w| w.starts_with("clearcpuid="));
    let extra: Vec<&str> = clear.iter().filter_map(|w| w.strip_prefix("clearcpuid=")).collect();
    let quirks = quirks
        .iter()
        .map(|q| match q.strip_prefix("clearcpuid=") {
            Some(list) if !extra.is_empty() => format!("clearcpuid={list},{}", extra.join(",")),
            _ => q.to_string(),
        })
        .collect();
    (quirks, rest.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_clearcpuid_is_merged() {
        let (q, rest) = merge_user_params(PVM_CMDLINE, "quiet clearcpuid=sse4_2 loglevel=3");
        assert_eq!(rest, "quiet loglevel=3");
        assert!(q[0].starts_with("clearcpuid=xsave,") && q[0].ends_with(",umip,sse4_2"), "{q:?}");
        assert_eq!(q[1], "lapic=notscdeadline");
        let (q, rest) = merge_user_params(PVM_CMDLINE, "quiet");
        assert_eq!(q, PVM_CMDLINE.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(rest, "quiet");
    }

    #[test]
    fn detection_follows_the_module_dir() {
        let dir = std::env::temp_dir().join(format!("mvq-{}", std::process::id()));
        assert_eq!(Host::detect_at(&dir), Host::Kvm);
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Host::detect_at(&dir), Host::Pvm);
        std::fs::remove_dir(&dir).unwrap();
        assert!(Host::Kvm.cmdline_quirks().is_empty());
        assert!(Host::Pvm.cmdline_quirks().iter().any(|q| q.starts_with("clearcpuid=")));
    }
}
