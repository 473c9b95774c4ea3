//! DHCP leases of one network, shared by all microvm processes on it through the file
//! `<state>/net/NAME/leases` (flock'ed while read-modify-written).
//!
//! Text format, one lease per line: `MAC IP EXPIRES_UNIX_SECS`.
//! A MAC keeps its address for as long as the network exists (stable addresses across VM
//! restarts); an expired lease is only reclaimed for another MAC when the .2-.254 pool is
//! otherwise full. When nothing has expired either, a VM joining the network takes the
//! least recently renewed lease of a MAC no live VM on the network holds: VMs that come and
//! go with fresh MACs (a CI system's) would otherwise fill the pool within one lease time.
//! A new MAC gets the lowest free address, or on an overlay network the first free of its
//! own candidates (see [`super::derive`]), checked by a probe first.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::spec::{MacAddr, Subnet};

/// First and last host number handed out (.1 is the gateway).
pub(crate) const POOL_FIRST: u8 = 2;
pub(crate) const POOL_LAST: u8 = 254;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Lease {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub expires: u64,
}

/// All leases of a network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct LeaseTable {
    pub leases: Vec<Lease>,
}

impl LeaseTable {
    /// Parses the file, skipping malformed lines, addresses outside the pool and duplicates
    /// (first wins), so a damaged file never yields two MACs on one address.
    pub fn parse(text: &str, subnet: Subnet) -> LeaseTable {
        let mut table = LeaseTable::default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(mac), Some(ip), Some(exp)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let (Ok(mac), Ok(ip), Ok(expires)) = (mac.parse::<MacAddr>(), ip.parse::<Ipv4Addr>(), exp.parse::<u64>())
            else {
                continue;
            };
            if !in_pool(subnet, ip) || table.leases.iter().any(|l| l.ip == ip || l.mac == mac) {
                continue;
            }
            table.leases.push(Lease { mac, ip, expires });
        }
        table
    }

    pub fn render(&self) -> String {
        self.leases.iter().map(|l| format!("{} {} {}\n", l.mac, l.ip, l.expires)).collect()
    }

    #[cfg(test)]
    pub fn get(&self, mac: MacAddr) -> Option<Ipv4Addr> {
        self.leases.iter().find(|l| l.mac == mac).map(|l| l.ip)
    }

    /// The MAC's address, renewed until `now + lease_secs`; a new one if it has none:
    /// `want` if it is given and no live VM holds it (see [`LeaseTable::take_wanted`]), else
    /// the lowest free pool address, else the address of the longest-expired lease, else
    /// (with `live`, the MACs of the network's live VMs) that of the least recently renewed
    /// lease of a MAC not in `live`. `None` when every address is leased, unexpired and
    /// (with `live`) held by a live VM.
    pub fn allocate(
        &mut self,
        mac: MacAddr,
        want: Option<Ipv4Addr>,
        subnet: Subnet,
        now: u64,
        lease_secs: u64,
        live: Option<&[MacAddr]>,
    ) -> Option<Ipv4Addr> {
        let pool = (POOL_FIRST..=POOL_LAST).map(|n| subnet.host(n));
        self.allocate_from(mac, want, subnet, now.saturating_add(lease_secs), now, live, pool, |_| false)
    }

    /// Like [`LeaseTable::allocate`] for overlay networks: a new MAC gets the first of its
    /// derived candidates that no lease here holds and `in_use` (a probe of the overlay)
    /// does not report taken.
    #[allow(clippy::too_many_arguments)]
    pub fn allocate_derived(
        &mut self,
        mac: MacAddr,
        want: Option<Ipv4Addr>,
        subnet: Subnet,
        now: u64,
        lease_secs: u64,
        live: Option<&[MacAddr]>,
        in_use: impl FnMut(Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        let candidates = super::derive::candidates(mac).map(|n| subnet.host(n));
        self.allocate_from(mac, want, subnet, now.saturating_add(lease_secs), now, live, candidates, in_use)
    }

    /// [`LeaseTable::allocate`], with a new address taken from `candidates` in order: the first
    /// that no lease holds and `in_use` does not report taken.
    #[allow(clippy::too_many_arguments)]
    fn allocate_from(
        &mut self,
        mac: MacAddr,
        want: Option<Ipv4Addr>,
        subnet: Subnet,
        expires: u64,
        now: u64,
        live: Option<&[MacAddr]>,
        candidates: impl Iterator<Item = Ipv4Addr>,
        mut in_use: impl FnMut(Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        if let Some(l) = self.leases.iter_mut().find(|l| l.mac == mac) {
            l.expires = expires;
            return Some(l.ip);
        }
        if let Some(ip) = self.take_wanted(mac, want, subnet, now, expires, live, &mut in_use) {
            return Some(ip);
        }
        let free = candidates.filter(|ip| !self.leases.iter().any(|l| l.ip == *ip)).find(|ip| !in_use(*ip));
        if let Some(ip) = free {
            self.leases.push(Lease { mac, ip, expires });
            return Some(ip);
        }
        self.reclaim(mac, now, expires, live)
    }

    /// Gives `mac` the address `want` (a restored guest's, which it still has configured) if
    /// it is in the pool and no live VM holds it: free (and, on an overlay, not answered on
    /// another host: `in_use`), expired, or leased to a MAC that no live VM on the network has
    /// (a VM that left). None otherwise; the caller then allocates as for any VM.
    #[allow(clippy::too_many_arguments)]
    fn take_wanted(
        &mut self,
        mac: MacAddr,
        want: Option<Ipv4Addr>,
        subnet: Subnet,
        now: u64,
        expires: u64,
        live: Option<&[MacAddr]>,
        mut in_use: impl FnMut(Ipv4Addr) -> bool,
    ) -> Option<Ipv4Addr> {
        let ip = want.filter(|ip| in_pool(subnet, *ip))?;
        match self.leases.iter_mut().find(|l| l.ip == ip) {
            None if !in_use(ip) => self.leases.push(Lease { mac, ip, expires }),
            Some(l) if l.expires <= now || live.is_some_and(|live| !live.contains(&l.mac)) => {
                l.mac = mac;
                l.expires = expires;
            }
            _ => return None,
        }
        Some(ip)
    }

    /// The address of the longest-expired lease, else (with `live`) of the least recently
    /// renewed lease of a MAC not in `live`: now `mac`'s.
    fn reclaim(&mut self, mac: MacAddr, now: u64, expires: u64, live: Option<&[MacAddr]>) -> Option<Ipv4Addr> {
        let any_expired = self.leases.iter().any(|l| l.expires <= now);
        let takable = |l: &Lease| {
            if any_expired {
                l.expires <= now
            } else {
                live.is_some_and(|live| !live.contains(&l.mac))
            }
        };
        let oldest = self.leases.iter_mut().filter(|l| takable(l)).min_by_key(|l| l.expires)?;
        oldest.mac = mac;
        oldest.expires = expires;
        Some(oldest.ip)
    }
}

fn in_pool(subnet: Subnet, ip: Ipv4Addr) -> bool {
    subnet.contains(ip) && (POOL_FIRST..=POOL_LAST).contains(&ip.octets()[3])
}

/// The shared lease file of one network.
#[derive(Clone, Debug)]
pub(crate) struct LeaseFile {
    path: PathBuf,
    subnet: Subnet,
    lease_secs: u64,
    /// New MACs get derived addresses (overlay networks).
    derived: bool,
}

impl LeaseFile {
    pub fn new(path: PathBuf, subnet: Subnet, lease_secs: u64) -> LeaseFile {
        LeaseFile { path, subnet, lease_secs, derived: false }
    }

    /// For an overlay network: new MACs get derived addresses.
    pub fn derived(self) -> LeaseFile {
        LeaseFile { derived: true, ..self }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Allocates (or renews) the MAC's lease under the file lock (reclaiming only expired
    /// leases: the DHCP server does not know who else is on the network).
    pub fn allocate(&self, mac: MacAddr) -> io::Result<Option<Ipv4Addr>> {
        self.allocate_checked(mac, None, None, |_| false)
    }

    /// Like [`LeaseFile::allocate`]; on an overlay network a new address is first offered
    /// to `in_use` (which probes the overlay, under the file lock, so two processes on this
    /// host never probe for one address at once).
    /// `live`: see [`LeaseTable::allocate`].
    pub fn allocate_checked(
        &self,
        mac: MacAddr,
        want: Option<Ipv4Addr>,
        live: Option<&[MacAddr]>,
        in_use: impl FnMut(Ipv4Addr) -> bool,
    ) -> io::Result<Option<Ipv4Addr>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if self.derived {
            self.update(|t| t.allocate_derived(mac, want, self.subnet, now, self.lease_secs, live, in_use))
        } else {
            self.update(|t| t.allocate(mac, want, self.subnet, now, self.lease_secs, live))
        }
    }

    /// Current table (read under the lock).
    #[cfg(test)]
    pub fn read(&self) -> io::Result<LeaseTable> {
        self.update(|t| t.clone())
    }

    /// Read-modify-write under an exclusive flock. Written in place (not rename) because the
    /// lock lives on this inode.
    fn update<T>(&self, f: impl FnOnce(&mut LeaseTable) -> T) -> io::Result<T> {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.path)?;
        file.lock()?;
        let mut text = String::new();
        file.read_to_string(&mut text)?;
        let mut table = LeaseTable::parse(&text, self.subnet);
        let out = f(&mut table);
        let new = table.render();
        if new != text {
            file.seek(SeekFrom::Start(0))?;
            file.set_len(0)?;
            file.write_all(new.as_bytes())?;
            file.sync_data()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u16) -> MacAddr {
        let b = n.to_be_bytes();
        MacAddr([0x52, 0x54, 0, 0, b[0], b[1]])
    }

    fn subnet() -> Subnet {
        Subnet::from_octets(10, 200, 0)
    }

    #[test]
    fn stable_and_unique() {
        let mut t = LeaseTable::default();
        let a = t.allocate(mac(1), None, subnet(), 100, 3600, None).unwrap();
        let b = t.allocate(mac(2), None, subnet(), 100, 3600, None).unwrap();
        assert_eq!(a, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(b, Ipv4Addr::new(10, 200, 0, 3));
        assert_eq!(t.allocate(mac(1), None, subnet(), 5000, 3600, None), Some(a), "same MAC, same IP");
        assert_eq!(t.leases[0].expires, 8600, "renewed");
        let reparsed = LeaseTable::parse(&t.render(), subnet());
        assert_eq!(reparsed, t);
    }

    #[test]
    fn pool_exhaustion_and_reclaim() {
        let mut t = LeaseTable::default();
        for n in 0..253 {
            assert!(t.allocate(mac(n), None, subnet(), 100, 10, None).is_some());
        }
        let ips: std::collections::HashSet<_> = t.leases.iter().map(|l| l.ip).collect();
        assert_eq!(ips.len(), 253);
        assert!(ips.iter().all(|ip| (2..=254).contains(&ip.octets()[3])));
        // Full and nothing expired yet.
        assert_eq!(t.allocate(mac(999), None, subnet(), 105, 10, None), None);
        // After expiry the oldest lease is reused.
        t.leases[17].expires = 50;
        let ip = t.allocate(mac(999), None, subnet(), 200, 10, None).unwrap();
        assert_eq!(ip, t.leases[17].ip);
        assert_eq!(t.get(mac(17)), None);
        assert_eq!(t.get(mac(999)), Some(ip));
    }

    #[test]
    fn a_joining_vm_reclaims_the_lease_of_a_mac_no_live_vm_holds() {
        let mut t = LeaseTable::default();
        for n in 0..253 {
            // Renewed at different times: mac(n)'s lease expires at 1000 + n.
            assert!(t.allocate(mac(n), None, subnet(), 100 + u64::from(n), 900, None).is_some());
        }
        let live: Vec<MacAddr> = (0..253).filter(|n| n % 2 == 0).map(mac).collect();
        // Nothing expired: the DHCP server (no view of the users) still finds the pool full...
        assert_eq!(t.allocate(mac(999), None, subnet(), 500, 900, None), None);
        // ...and so does a join while every MAC is live.
        let all: Vec<MacAddr> = (0..253).map(mac).collect();
        assert_eq!(t.allocate(mac(999), None, subnet(), 500, 900, Some(&all)), None);
        // A join takes the least recently renewed lease of a MAC gone from the network.
        let ip = t.allocate(mac(999), None, subnet(), 500, 900, Some(&live)).unwrap();
        assert_eq!(t.get(mac(1)), None, "mac(1): the oldest idle lease");
        assert_eq!(t.get(mac(999)), Some(ip));
        assert!(live.iter().all(|m| t.get(*m).is_some()), "a live VM's lease is never taken");
        // An expired lease still goes first, idle or not.
        t.leases.iter_mut().find(|l| l.mac == mac(200)).unwrap().expires = 10;
        let ip2 = t.allocate(mac(1000), None, subnet(), 500, 900, Some(&live)).unwrap();
        assert_eq!(t.get(mac(200)), None);
        assert_eq!(t.get(mac(1000)), Some(ip2));
    }

    #[test]
    fn parse_drops_bad_lines() {
        let text = "52:54:00:00:00:01 10.200.0.2 10\n\
                    garbage\n\
                    52:54:00:00:00:02 10.200.0.2 10\n\
                    52:54:00:00:00:01 10.200.0.9 10\n\
                    52:54:00:00:00:03 10.200.0.1 10\n\
                    52:54:00:00:00:04 10.9.0.5 10\n\
                    52:54:00:00:00:05 10.200.0.255 10\n\
                    52:54:00:00:00:06 10.200.0.6 x\n\
                    52:54:00:00:00:07 10.200.0.7 10\n";
        let t = LeaseTable::parse(text, subnet());
        let macs: Vec<u8> = t.leases.iter().map(|l| l.mac.0[5]).collect();
        assert_eq!(macs, vec![1, 7]);
    }

    #[test]
    fn derived_addresses_skip_leased_and_probed() {
        let first: Vec<Ipv4Addr> = super::super::derive::candidates(mac(1)).take(3).map(|n| subnet().host(n)).collect();
        // Alone: the first candidate, whatever the lease order.
        let mut t = LeaseTable::default();
        assert_eq!(t.allocate_derived(mac(1), None, subnet(), 100, 10, None, |_| false), Some(first[0]));
        assert_eq!(t.allocate_derived(mac(1), None, subnet(), 200, 10, None, |_| panic!("a lease needs no probe")), Some(first[0]));
        // Leased here by another MAC: the next candidate, no probe for the leased one.
        let mut t = LeaseTable::default();
        t.leases.push(Lease { mac: mac(9), ip: first[0], expires: 1 });
        let mut probed = Vec::new();
        let ip = t.allocate_derived(mac(1), None, subnet(), 100, 10, None, |ip| {
            probed.push(ip);
            false
        });
        assert_eq!((ip, probed), (Some(first[1]), vec![first[1]]));
        // Answered for on the overlay: skipped.
        let mut t = LeaseTable::default();
        let ip = t.allocate_derived(mac(1), None, subnet(), 100, 10, None, |ip| ip == first[0] || ip == first[1]);
        assert_eq!(ip, Some(first[2]));
        // Everything taken: nothing (no lease expired to reclaim).
        let mut t = LeaseTable::default();
        assert_eq!(t.allocate_derived(mac(1), None, subnet(), 100, 10, None, |_| true), None);
    }

    #[test]
    fn file_round_trip() {
        let dir = std::env::temp_dir().join(format!("mvnet-lease-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lf = LeaseFile::new(dir.join("leases"), subnet(), 3600);
        let a = lf.allocate(mac(1)).unwrap().unwrap();
        let b = lf.allocate(mac(2)).unwrap().unwrap();
        assert_ne!(a, b);
        // A second handle (another process) sees the same leases.
        let lf2 = LeaseFile::new(dir.join("leases"), subnet(), 3600);
        assert_eq!(lf2.allocate(mac(1)).unwrap(), Some(a));
        assert_eq!(lf2.read().unwrap().leases.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_restored_guest_gets_its_address_back_unless_a_live_vm_holds_it() {
        let host = |n| subnet().host(n);
        let mut t = LeaseTable::default();
        // Free: granted, though lower addresses are free too.
        assert_eq!(t.allocate(mac(1), Some(host(7)), subnet(), 100, 3600, Some(&[])), Some(host(7)));
        // A MAC with a lease keeps it, whatever it asks for.
        assert_eq!(t.allocate(mac(1), Some(host(9)), subnet(), 200, 3600, Some(&[])), Some(host(7)));
        // Held by a live VM: not taken; the first free address instead.
        assert_eq!(t.allocate(mac(2), Some(host(7)), subnet(), 100, 3600, Some(&[mac(1)])), Some(host(2)));
        assert_eq!(t.get(mac(1)), Some(host(7)));
        // Leased to a MAC that no live VM has (its VM left): taken over.
        assert_eq!(t.allocate(mac(3), Some(host(7)), subnet(), 100, 3600, Some(&[mac(2)])), Some(host(7)));
        assert_eq!(t.get(mac(1)), None);
        // Expired: taken over, even when the caller does not know who is live.
        let mut e = LeaseTable::default();
        e.allocate(mac(4), None, subnet(), 100, 10, None);
        assert_eq!(e.allocate(mac(5), Some(host(2)), subnet(), 500, 10, None), Some(host(2)));
        // Not in the pool (the gateway, another subnet): an ordinary allocation.
        let mut o = LeaseTable::default();
        assert_eq!(o.allocate(mac(6), Some(host(1)), subnet(), 100, 10, None), Some(host(2)));
        assert_eq!(o.allocate(mac(7), Some(Ipv4Addr::new(10, 9, 9, 9)), subnet(), 100, 10, None), Some(host(3)));
        // On an overlay, an address another host answers for is not taken.
        let mut d = LeaseTable::default();
        let ip = d.allocate_derived(mac(8), Some(host(40)), subnet(), 100, 10, None, |ip| ip == host(40)).unwrap();
        assert_ne!(ip, host(40));
        assert_eq!(d.allocate_derived(mac(9), Some(host(41)), subnet(), 100, 10, None, |_| false), Some(host(41)));
    }

}
