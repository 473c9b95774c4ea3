//! Host-side networking for microvm: TAP devices, bridges, NAT rules, DHCP. No KVM here.
//!
//! ```no_run
//! # fn main() -> Result<(), net::NetError> {
//! net::cleanup_stale()?; // at startup: forget networks of crashed microvm processes
//! let spec: net::NetSpec = "nat:lab,subnet=10.77.0.0/24,rate=50Mbit".parse()?;
//! spec.preflight()?; // read-only host checks: capabilities, bridges, interfaces
//! let att = net::attach(&spec, "vm-1234", 0)?;
//! let _fd = att.tap_fd(); // readv/writev with a 12-byte virtio_net_hdr_v1
//! att.set_offload(net::TUN_F_CSUM | net::TUN_F_TSO4)?;
//! att.release()?; // TAP deleted; the network too if this was its last user
//! # Ok(()) }
//! ```
//!
//! * `--net` syntax and rate units: [`NetSpec`] (module docs of `spec`).
//! * Named networks (`nat:NAME`, `host-only:NAME`) get bridge `mvbr-NAME` with the gateway
//!   `.1/24`, rules in nftables `table ip microvm` (NAT: masquerade out of the uplink;
//!   isolation between networks; host-only: no forwarding), and a DHCP responder thread per
//!   process answering for that process's MACs (leases `.2`-`.254`, stable per MAC).
//! * Networks across hosts: `bridge=BR,vlan=N` makes the TAP an untagged access port of
//!   VLAN N on a VLAN-filtering bridge; a named network with `vxlan=VNI,peers=...` (or a
//!   definition file `$MICROVM_NETWORKS_DIR/NAME.toml`, see `spec::overlay`) gets a VXLAN
//!   port `mvvx-NAME` flooding to its peers, a gateway MAC shared by every host, a filter
//!   keeping gateway and DHCP traffic off the overlay, addresses derived from the guest's
//!   MAC and probed for on the overlay, and the VXLAN MTU offered by DHCP.
//! * Several microvm processes share a network through state under `$MICROVM_RUN_DIR`
//!   (default `/run/microvm`)`/<netns inode>/net/NAME/` (flock'ed); the last user to leave
//!   tears it down. `net.ipv4.ip_forward` is set for NAT and never reverted.
//! * Errors: [`NetError`], one line each, causes via `source()`;
//!   [`NetError::is_bad_input`] separates user errors from runtime failures.
//! * Panics: a process using this crate should, in its panic hook, return early when
//!   [`panic_is_contained`] (a contained decoder panic, handled here) and otherwise call
//!   [`emergency_teardown`] before exiting, so a panic never leaves networking behind.

mod attach;
mod bridge;
mod caps;
mod contain;
mod dhcp;
mod emergency;
mod error;
mod network;
mod nft;
mod ratelog;
mod spec;
mod state;
mod tap;
mod thread_hook;

pub use attach::{attach, attach_wanting, Attachment};
pub use bridge::BridgeError;
pub use contain::panic_is_contained;
pub use dhcp::{server_running as dhcp_server_running, stats as dhcp_stats, DhcpError, DhcpStats, LEASE_SECS};
pub use emergency::emergency_teardown;
pub use error::NetError;
pub use network::{cleanup_stale, teardown_all, NetworkError};
pub use nft::{NftError, TABLE as NFT_TABLE};
pub use spec::{
    MacAddr, NetMode, NetSpec, NetworkDef, Overlay, OverlayError, RateSpec, SpecError, Subnet, BRIDGE_PREFIX,
    DEFAULT_NETWORK, DEFAULT_NETWORKS_DIR, MAX_NETWORK_NAME, NETWORKS_DIR_ENV, TAP_PREFIX, VLAN_RANGE, VXLAN_PREFIX,
};
pub use state::{StateError, DEFAULT_RUN_DIR, RUN_DIR_ENV};
pub use thread_hook::{set_thread_start_hook, HookError, ThreadStartHook};
pub use tap::{set_offload as set_tap_offload, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, VNET_HDR_LEN};

/// Entry points for the cargo-fuzz targets in `net/fuzz` (feature `fuzzing`); not API.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::dhcp::fuzz_packet as dhcp_packet;

    /// `--net` spec parsing and its pure checks: any input is refused or accepted, never a panic.
    pub fn net_spec(text: &str) {
        if let Ok(spec) = text.parse::<crate::NetSpec>() {
            let _ = spec.to_string();
            let _ = spec.mac_for("fuzz", 0);
        }
    }
}
