//! Subnet choice and collision checks (pure; the host's routes are passed in).

use ipnet::Ipv4Net;

use crate::spec::Subnet;

/// Something on the host that occupies address space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Taken {
    pub net: Ipv4Net,
    /// For messages, e.g. "route 10.0.0.0/8 dev eth0".
    pub what: String,
}

/// The first item `subnet` overlaps, if any.
pub(crate) fn collision(subnet: Subnet, taken: &[Taken]) -> Option<&Taken> {
    taken.iter().find(|t| subnet.overlaps(&t.net))
}

/// First free `10.200.X.0/24`, X from 0.
pub(crate) fn pick(taken: &[Taken]) -> Option<Subnet> {
    (0..=255u8)
        .map(|x| Subnet::from_octets(10, 200, x))
        .find(|s| collision(*s, taken).is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(net: &str) -> Taken {
        Taken { net: net.parse().unwrap(), what: format!("route {net}") }
    }

    #[test]
    fn picks_first_free() {
        assert_eq!(pick(&[]), Some(Subnet::from_octets(10, 200, 0)));
        let taken = [t("10.200.0.0/24"), t("10.200.1.128/25"), t("192.0.2.0/24")];
        assert_eq!(pick(&taken), Some(Subnet::from_octets(10, 200, 2)));
        assert_eq!(pick(&[t("10.0.0.0/8")]), None);
        assert_eq!(pick(&[t("10.200.0.0/16")]), None);
    }

    #[test]
    fn reports_collision() {
        let taken = [t("192.0.2.0/24"), t("10.77.0.0/16")];
        let hit = collision(Subnet::from_octets(10, 77, 3), &taken).unwrap();
        assert_eq!(hit.what, "route 10.77.0.0/16");
        assert!(collision(Subnet::from_octets(10, 78, 3), &taken).is_none());
    }
}
