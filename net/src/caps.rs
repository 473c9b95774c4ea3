//! Privilege check. Reads CapEff from /proc/self/status instead of calling capget(2): no
//! unsafe code and no extra crate for one bit.

/// CAP_NET_ADMIN's bit number (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;

/// Whether the process has CAP_NET_ADMIN in its effective set. If the status file cannot
/// be read, returns true and lets the kernel decide (EPERM is mapped later).
pub(crate) fn has_net_admin() -> bool {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(text) => cap_eff_has(&text, CAP_NET_ADMIN).unwrap_or(true),
        Err(_) => true,
    }
}

fn cap_eff_has(status: &str, bit: u32) -> Option<bool> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    let mask = u64::from_str_radix(line.trim(), 16).ok()?;
    Some(mask & (1u64 << bit) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_capeff() {
        assert_eq!(cap_eff_has("Name:\tx\nCapEff:\t000001ffffffffff\n", 12), Some(true));
        assert_eq!(cap_eff_has("CapEff:\t0000000000000000\n", 12), Some(false));
        assert_eq!(cap_eff_has("CapEff:\t0000000000001000\n", 12), Some(true));
        assert_eq!(cap_eff_has("nothing", 12), None);
        assert_eq!(cap_eff_has("CapEff:\tzz", 12), None);
    }
}
