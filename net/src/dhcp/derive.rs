//! Addresses on overlay networks: derived from the guest's MAC, so that hosts which share
//! no lease file still agree, and a VM moved to another host (same disk, so same default
//! MAC; or the same `mac=`) gets its address back.
//!
//! A MAC's candidates are the pool's 253 host numbers (.2-.254) in an order of its own:
//! `first = h mod 253`, then steps of `step` (coprime to 253 = 11 * 23, so each number
//! comes exactly once), where `h` is FNV-1a of the MAC. The lease allocator takes the first
//! candidate that is neither leased on this host nor answered for on the overlay (an ARP
//! probe, see `network::probe`).

use super::lease::{POOL_FIRST, POOL_LAST};
use crate::spec::{fnv1a64, MacAddr};

/// Size of the pool (.2-.254).
const POOL: u32 = (POOL_LAST - POOL_FIRST + 1) as u32;

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The host numbers (last octet) `mac` tries, in order: each of .2-.254 exactly once.
pub(crate) fn candidates(mac: MacAddr) -> impl Iterator<Item = u8> {
    let mut input = b"microvm-overlay-address\0".to_vec();
    input.extend_from_slice(&mac.0);
    let h = fnv1a64(&input);
    let first = (h % u64::from(POOL)) as u32;
    // 1..=252, moved up to the next number coprime to the pool size.
    let mut step = 1 + ((h >> 32) % u64::from(POOL - 1)) as u32;
    while gcd(step, POOL) != 1 {
        step = step % (POOL - 1) + 1;
    }
    (0..POOL).map(move |i| {
        let n = (first + i * step) % POOL;
        // n < 253, so the sum stays <= 254.
        POOL_FIRST + n as u8
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn every_address_once_in_a_stable_order() {
        for n in 0..500 {
            let c: Vec<u8> = candidates(mac(n)).collect();
            assert_eq!(c.len(), 253);
            let mut sorted = c.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted, (2..=254).collect::<Vec<u8>>(), "mac {n}");
            assert_eq!(c, candidates(mac(n)).collect::<Vec<u8>>(), "deterministic");
        }
    }

    #[test]
    fn fixed_across_builds() {
        // Hosts running different microvm builds must agree: the function is part of the
        // on-the-wire behaviour. These values pin it.
        let c: Vec<u8> = candidates(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])).take(3).collect();
        assert_eq!(c, PINNED.to_vec());
    }
    const PINNED: [u8; 3] = [48, 44, 40];

    #[test]
    fn spread_over_the_pool() {
        // 2000 MACs: every first candidate is used, none by more than a few times the mean.
        let mut hits = [0u32; 256];
        for n in 0..2000 {
            hits[usize::from(candidates(mac(n)).next().unwrap())] += 1;
        }
        let used = hits[2..=254].iter().filter(|&&h| h > 0).count();
        assert!(used > 240, "{used}");
        assert!(hits.iter().all(|&h| h < 30), "{hits:?}");
        // Two MACs with the same first candidate usually part at the second.
        let mut same_first = 0;
        let mut same_second = 0;
        for a in 0..300 {
            for b in (a + 1)..300 {
                let (ca, cb): (Vec<u8>, Vec<u8>) = (candidates(mac(a)).take(2).collect(), candidates(mac(b)).take(2).collect());
                if ca[0] == cb[0] {
                    same_first += 1;
                    same_second += u32::from(ca[1] == cb[1]);
                }
            }
        }
        assert!(same_first > 0 && same_second * 4 < same_first, "{same_first} {same_second}");
    }
}
