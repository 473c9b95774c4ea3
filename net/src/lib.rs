//! Host-side networking for microvm: TAP, bridges, NAT rules, DHCP. No KVM here.
