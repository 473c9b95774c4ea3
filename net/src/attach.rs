//! `attach`: turn a `NetSpec` into an open TAP plus whatever host plumbing the mode needs.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::bridge::Rtnl;
use crate::dhcp::DhcpRegistration;
use crate::network::{self, JoinRequest, Membership, TapCleanup};
use crate::spec::{MacAddr, NetMode, NetSpec, SpecError, Subnet};
use crate::state::NetKind;
use crate::tap::{Tap, TapError};
use crate::NetError;

/// A guest NIC's host side. End it with [`Attachment::release`], which tears down in order
/// and reports errors: the DHCP server stops answering for its MAC, the TAP is closed and
/// deleted (unless it was an existing `tap=NAME`, or it goes into the pool of a named network
/// that stays, see `network::pool`), and the process leaves the named network, which goes
/// away with its last user (and its pooled TAPs with it). Dropping an attachment that was not
/// released does the same as a fallback, logging errors instead.
#[derive(Debug)]
pub struct Attachment {
    /// Some until torn down.
    host: Option<HostSide>,
    tap_fd: RawFd,
    tap_name: String,
    mac: MacAddr,
    network: Option<(String, Subnet)>,
    bridge: Option<String>,
    /// The guest's address on its named network (its lease).
    ip: Option<Ipv4Addr>,
}

/// What tearing down undoes, in teardown order.
#[derive(Debug)]
struct HostSide {
    dhcp: Option<DhcpRegistration>,
    tap: Tap,
    tap_cleanup: Option<TapCleanup>,
    membership: Option<Membership>,
}

impl HostSide {
    /// Every step runs even if an earlier one failed; the first error is returned.
    ///
    /// Deleting a link makes the kernel wait for an RCU barrier (~20 ms for a TAP here,
    /// ~40-50 ms for a bridge, whatever the machine's speed), so the TAP is deleted on a
    /// helper thread while this one leaves the network, which deletes the bridge if this was
    /// its last user: the two waits overlap instead of adding up. Nothing else depends on
    /// their order (the VM no longer runs; the TAP's guard still goes only after the TAP).
    fn release(self) -> Result<(), NetError> {
        let HostSide { dhcp, tap, mut tap_cleanup, mut membership } = self;
        let mut first: Option<NetError> = None;
        let mut keep = |r: Result<(), NetError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(d) = dhcp {
            keep(d.release().map_err(NetError::from));
        }
        // On a network that stays, the TAP is kept in its pool for the next VM: then
        // closing it is all that is left (no deletion, no RCU barrier to wait for).
        if let (Some(t), Some(m)) = (tap_cleanup.as_mut(), membership.as_mut()) {
            if m.leave_pooling(&tap, t) {
                drop(tap);
                return first.map_or(Ok(()), Err);
            }
        }
        drop(tap);
        tracing::debug!("TAP closed");
        match (tap_cleanup, membership) {
            (Some(t), Some(m)) => std::thread::scope(|s| {
                // Should no thread start, the closure is dropped unrun and the TapCleanup
                // in it deletes the TAP on drop (its fallback), before the network is left.
                let tap_job = std::thread::Builder::new()
                    .name("net-release".into())
                    .spawn_scoped(s, move || t.release_alone())
                    .ok();
                keep(m.release());
                if let Some(job) = tap_job {
                    keep(job.join().unwrap_or(Err(NetError::ReleasePanicked)));
                }
            }),
            // Nothing to overlap with.
            (t, m) => {
                if let Some(t) = t {
                    keep(t.release());
                }
                if let Some(m) = m {
                    keep(m.release());
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Attachment {
    fn new(host: HostSide, mac: MacAddr, network: Option<(String, Subnet)>, bridge: Option<String>) -> Attachment {
        Attachment { tap_fd: host.tap.fd(), tap_name: host.tap.name().to_string(), host: Some(host), mac, network, bridge, ip: None }
    }

    /// Tears the host side down (see the type's docs) and returns the first error; the
    /// remaining steps run regardless.
    pub fn release(mut self) -> Result<(), NetError> {
        let _span = tracing::info_span!("release", tap = %self.tap_name).entered();
        self.host.take().map_or(Ok(()), HostSide::release)
    }

    /// The TAP fd (opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header size 12,
    /// blocking, close-on-exec). Owned by the attachment: do not close it; keep the
    /// attachment alive while the fd is in use.
    pub fn tap_fd(&self) -> RawFd {
        self.tap_fd
    }

    /// The TAP interface name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    /// The guest's MAC.
    pub fn mac(&self) -> [u8; 6] {
        self.mac.0
    }

    /// TUNSETOFFLOAD with [`TUN_F_CSUM`](crate::TUN_F_CSUM), [`TUN_F_TSO4`](crate::TUN_F_TSO4), ... flags.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        crate::tap::set_offload(self.tap_fd, flags).map_err(|source| TapError::Offload {
            name: self.tap_name.clone(),
            flags,
            source,
        })
    }

    /// The guest's address on its named network (the lease microvm's DHCP server hands it).
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.ip
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

impl Drop for Attachment {
    /// Fallback for attachments not ended by `release`.
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            if let Err(e) = host.release() {
                tracing::warn!(tap = %self.tap_name, error = &e as &dyn std::error::Error, "NIC teardown incomplete");
            }
        }
    }
}

impl AsRawFd for Attachment {
    fn as_raw_fd(&self) -> RawFd {
        self.tap_fd
    }
}

/// Sets up the host side of one guest NIC. `vm_id` identifies the VM (e.g. pid-based) and,
/// with `nic_index`, derives the default MAC. Nothing is left half-created on error.
pub fn attach(spec: &NetSpec, vm_id: &str, nic_index: u32) -> Result<Attachment, NetError> {
    attach_wanting(spec, vm_id, nic_index, None)
}

/// [`attach`], and on a named network, gives the guest `want_ip` if no live VM holds it: a
/// restored guest's address, which it still has configured (see `dhcp::lease_for`).
pub fn attach_wanting(spec: &NetSpec, vm_id: &str, nic_index: u32, want_ip: Option<Ipv4Addr>) -> Result<Attachment, NetError> {
    if matches!(spec.mode, NetMode::None) {
        return Err(SpecError::NothingToAttach.into());
    }
    // One netlink connection for the attachment's whole life: setup, then teardown.
    let rtnl = Arc::new(Rtnl::new()?);
    network::preflight_with(spec, &rtnl)?;
    let mac = spec.mac_for(vm_id, nic_index);
    let _span = tracing::info_span!("attach", net = %spec, vm_id, nic_index).entered();
    match &spec.mode {
        NetMode::None => Err(SpecError::NothingToAttach.into()),
        NetMode::Tap { name } => {
            let tap = Tap::open_existing(name)?;
            let host = HostSide { dhcp: None, tap, tap_cleanup: None, membership: None };
            Ok(Attachment::new(host, mac, None, None))
        }
        NetMode::Bridge { bridge, vlan } => {
            let br = rtnl.existing_bridge(bridge)?;
            // Only the MAC is enforced: addresses on a foreign bridge are not ours to know.
            let (tap, tap_cleanup) = network::create_tap(&rtnl, None, mac, None)?;
            rtnl.set_master(tap.index(), tap.name(), br.index)?;
            if let Some(vid) = vlan {
                // The guest runs later: no frame of it crosses before the port is in `vid`.
                let default_pvid = rtnl.vlan_ready_bridge(bridge)?;
                rtnl.set_access_vlan(tap.index(), tap.name(), *vid, default_pvid)?;
            }
            tracing::info!(tap = tap.name(), bridge, ?vlan, %mac, "attached TAP to bridge");
            let host = HostSide { dhcp: None, tap, tap_cleanup: Some(tap_cleanup), membership: None };
            Ok(Attachment::new(host, mac, None, Some(bridge.clone())))
        }
        NetMode::Nat { name, subnet, uplink, tap, allow_host, overlay } => {
            let resolved = network::resolve_overlay(name, overlay.as_ref(), *subnet)?;
            join(&rtnl, JoinRequest {
                kind: NetKind::Nat,
                name,
                subnet: resolved.as_ref().map(|(_, s)| *s).or(*subnet),
                uplink: uplink.as_deref(),
                tap: tap.as_deref(),
                mac,
                vm_id,
                allow_host: *allow_host,
                overlay: resolved.as_ref().map(|(o, _)| o),
                want_ip,
            })
        }
        NetMode::HostOnly { name, subnet, tap, allow_host, overlay } => {
            let resolved = network::resolve_overlay(name, overlay.as_ref(), *subnet)?;
            join(&rtnl, JoinRequest {
                kind: NetKind::HostOnly,
                name,
                subnet: resolved.as_ref().map(|(_, s)| *s).or(*subnet),
                uplink: None,
                tap: tap.as_deref(),
                mac,
                vm_id,
                allow_host: *allow_host,
                overlay: resolved.as_ref().map(|(o, _)| o),
                want_ip,
            })
        }
    }
}

fn join(rtnl: &Arc<Rtnl>, req: JoinRequest<'_>) -> Result<Attachment, NetError> {
    let (name, mac) = (req.name, req.mac);
    let j = network::join(&req, rtnl)?;
    let host = HostSide { dhcp: Some(j.dhcp), tap: j.tap, tap_cleanup: Some(j.tap_cleanup), membership: Some(j.membership) };
    let mut att = Attachment::new(host, mac, Some((name.to_string(), j.subnet)), Some(j.bridge));
    att.ip = Some(j.ip);
    Ok(att)
}
