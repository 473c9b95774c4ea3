//! The crate's top-level error.

use crate::bridge::BridgeError;
use crate::dhcp::DhcpError;
use crate::network::NetworkError;
use crate::nft::NftError;
use crate::spec::SpecError;
use crate::state::StateError;
use crate::tap::TapError;

/// Any error of this crate. Displays as one line; causes are reachable through
/// `std::error::Error::source` (the CLI prints them joined by ": ").
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A malformed `--net` spec (names the spec).
    #[error(transparent)]
    Syntax(#[from] options::OptionError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Dhcp(#[from] DhcpError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error("--net {mode} needs CAP_NET_ADMIN: run microvm as root or grant it that capability")]
    NotPermitted { mode: &'static str },
    #[error("the thread deleting a TAP device panicked")]
    ReleasePanicked,
}

impl NetError {
    /// True for errors the user can fix by changing the command line or privileges
    /// (unknown mode, bad MAC, missing bridge, subnet collision, not root...): the CLI maps
    /// these to its "bad input" exit code; everything else is a runtime failure.
    pub fn is_bad_input(&self) -> bool {
        match self {
            NetError::Syntax(_) | NetError::Spec(_) | NetError::NotPermitted { .. } => true,
            NetError::Tap(e) => e.is_bad_input(),
            NetError::Bridge(e) => e.is_bad_input(),
            NetError::Network(e) => e.is_bad_input(),
            NetError::Nft(_) | NetError::Dhcp(_) | NetError::State(_) | NetError::ReleasePanicked => false,
        }
    }
}
