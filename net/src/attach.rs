//! `attach`: turn a `NetSpec` into an open TAP plus whatever host plumbing the mode needs.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};

use crate::bridge::Rtnl;
use crate::dhcp::DhcpRegistration;
use crate::network::{self, JoinRequest, Membership, TapCleanup};
use crate::spec::{MacAddr, NetMode, NetSpec, SpecError, Subnet};
use crate::state::NetKind;
use crate::tap::{Tap, TapError};
use crate::NetError;

/// A guest NIC's host side. Dropping it tears everything down: the DHCP server stops
/// answering for its MAC, the TAP is closed and deleted (unless it was an existing
/// `tap=NAME`), and the named network goes away with its last user.
#[derive(Debug)]
pub struct Attachment {
    // Held for their Drop; fields drop in this order.
    _dhcp: Option<DhcpRegistration>,
    tap: Tap,
    _tap_cleanup: Option<TapCleanup>,
    _membership: Option<Membership>,
    mac: MacAddr,
    network: Option<(String, Subnet)>,
    bridge: Option<String>,
}

impl Attachment {
    /// The TAP fd (opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header size 12,
    /// blocking, close-on-exec). Owned by the attachment: do not close it; keep the
    /// attachment alive while the fd is in use.
    pub fn tap_fd(&self) -> RawFd {
        self.tap.fd()
    }

    /// The TAP interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// The guest's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac.0
    }

    /// TUNSETOFFLOAD with [`TUN_F_CSUM`](crate::TUN_F_CSUM), [`TUN_F_TSO4`](crate::TUN_F_TSO4), ... flags.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        self.tap.set_offload(flags)
    }

    /// The named network (`nat`/`host-only`), if any.
    pub fn network(&self) -> Option<&str> {
        self.network.as_ref().map(|(n, _)| n.as_str())
    }

    /// Subnet of the named network.
    pub fn subnet(&self) -> Option<Subnet> {
        self.network.as_ref().map(|(_, s)| *s)
    }

    /// Gateway (host) address of the named network, which is also its DHCP server.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.subnet().map(|s| s.gateway())
    }

    /// Bridge the TAP is plugged into (`mvbr-NAME` or `bridge=BR`).
    pub fn bridge(&self) -> Option<&str> {
        self.bridge.as_deref()
    }
}

impl AsRawFd for Attachment {
    fn as_raw_fd(&self) -> RawFd {
        self.tap.fd()
    }
}

/// Sets up the host side of one guest NIC. `vm_id` identifies the VM (e.g. pid-based) and,
/// with `nic_index`, derives the default MAC. Nothing is left half-created on error.
pub fn attach(spec: &NetSpec, vm_id: &str, nic_index: u32) -> Result<Attachment, NetError> {
    spec.preflight()?;
    let mac = spec.mac_for(vm_id, nic_index);
    let _span = tracing::info_span!("attach", net = %spec, vm_id, nic_index).entered();
    match &spec.mode {
        NetMode::None => Err(SpecError::NothingToAttach.into()),
        NetMode::Tap { name } => {
            let tap = Tap::open_existing(name)?;
            Ok(Attachment { _dhcp: None, tap, _tap_cleanup: None, _membership: None, mac, network: None, bridge: None })
        }
        NetMode::Bridge { bridge } => {
            let rtnl = Rtnl::new()?;
            let br = rtnl.existing_bridge(bridge)?;
            let (tap, tap_cleanup) = network::create_tap(&rtnl, None)?;
            rtnl.set_master(tap.index(), tap.name(), br.index)?;
            tracing::info!(tap = tap.name(), bridge, %mac, "attached TAP to bridge");
            Ok(Attachment {
                _dhcp: None,
                tap,
                _tap_cleanup: Some(tap_cleanup),
                _membership: None,
                mac,
                network: None,
                bridge: Some(bridge.clone()),
            })
        }
        NetMode::Nat { name, subnet, uplink, tap } => join(NetKind::Nat, name, *subnet, uplink.as_deref(), tap.as_deref(), mac, vm_id),
        NetMode::HostOnly { name, subnet, tap } => join(NetKind::HostOnly, name, *subnet, None, tap.as_deref(), mac, vm_id),
    }
}

fn join(
    kind: NetKind,
    name: &str,
    subnet: Option<Subnet>,
    uplink: Option<&str>,
    tap: Option<&str>,
    mac: MacAddr,
    vm_id: &str,
) -> Result<Attachment, NetError> {
    let j = network::join(&JoinRequest { kind, name, subnet, uplink, tap, mac, vm_id })?;
    Ok(Attachment {
        _dhcp: Some(j.dhcp),
        tap: j.tap,
        _tap_cleanup: Some(j.tap_cleanup),
        _membership: Some(j.membership),
        mac,
        network: Some((name.to_string(), j.subnet)),
        bridge: Some(j.bridge),
    })
}
