//! IPv4 /24 subnets of named networks (`subnet=A.B.C.0/24`).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;

use super::SpecError;

/// An IPv4 /24 network: gateway `.1` (on the bridge), DHCP range `.2`-`.254`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Subnet(Ipv4Net);

impl Subnet {
    /// Prefix length of every microvm subnet.
    pub const PREFIX_LEN: u8 = 24;

    /// The /24 whose first three bytes are `a.b.c`.
    pub fn from_octets(a: u8, b: u8, c: u8) -> Subnet {
        // A /24 prefix length is always valid, so this cannot fail; fall back to the
        // default route net rather than panicking to satisfy the no-panic rule.
        Subnet(Ipv4Net::new(Ipv4Addr::new(a, b, c, 0), Self::PREFIX_LEN).unwrap_or_default())
    }

    /// Network address (`A.B.C.0`).
    pub fn network(&self) -> Ipv4Addr {
        self.0.network()
    }

    /// Gateway address on the bridge (`A.B.C.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        self.host(1)
    }

    /// Address `A.B.C.n`.
    pub fn host(&self, n: u8) -> Ipv4Addr {
        let o = self.0.network().octets();
        Ipv4Addr::new(o[0], o[1], o[2], n)
    }

    /// `255.255.255.0`.
    pub fn netmask(&self) -> Ipv4Addr {
        self.0.netmask()
    }

    /// Whether `ip` is inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.0.contains(&ip)
    }

    /// Whether this subnet and `other` share any address.
    pub(crate) fn overlaps(&self, other: &Ipv4Net) -> bool {
        let other = other.trunc();
        self.0.contains(&other.network()) || other.contains(&self.0.network())
    }

    /// As an `ipnet` network.
    pub(crate) fn as_net(&self) -> Ipv4Net {
        self.0
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for Subnet {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| SpecError::InvalidSubnet { value: s.to_string(), reason };
        let net: Ipv4Net = s
            .parse()
            .map_err(|_| bad("expected an IPv4 /24 network like 10.77.0.0/24"))?;
        if net.prefix_len() != Self::PREFIX_LEN {
            return Err(bad("only /24 subnets are supported"));
        }
        if net.addr() != net.network() {
            return Err(bad("host bits are set; write the network address, like 10.77.0.0/24"));
        }
        let first = net.network().octets()[0];
        let reserved = first == 0
            || first == 127
            || first >= 224
            || net.network().is_link_local();
        if reserved {
            return Err(bad("reserved range (0/8, 127/8, 169.254/16, multicast or class E)"));
        }
        Ok(Subnet(net))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        let s: Subnet = "10.77.0.0/24".parse().unwrap();
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(s.host(254), Ipv4Addr::new(10, 77, 0, 254));
        assert!(s.contains(Ipv4Addr::new(10, 77, 0, 99)));
        assert!(!s.contains(Ipv4Addr::new(10, 77, 1, 99)));
        assert_eq!(s.to_string(), "10.77.0.0/24");
        assert_eq!(Subnet::from_octets(10, 77, 0), s);
    }

    #[test]
    fn rejects() {
        for bad in [
            "10.77.0.0", "10.77.0.0/16", "10.77.0.5/24", "127.0.0.0/24", "224.1.2.0/24",
            "169.254.3.0/24", "0.1.2.0/24", "10.77.0.0/33", "x", "",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad} should fail");
        }
    }

    #[test]
    fn overlap() {
        let s = Subnet::from_octets(10, 200, 3);
        assert!(s.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(s.overlaps(&"10.200.3.7/32".parse().unwrap()));
        assert!(s.overlaps(&"10.200.3.0/24".parse().unwrap()));
        assert!(s.overlaps(&"10.200.3.77/25".parse().unwrap()));
        assert!(!s.overlaps(&"10.200.4.0/24".parse().unwrap()));
        assert!(!s.overlaps(&"192.0.2.0/24".parse().unwrap()));
    }
}
