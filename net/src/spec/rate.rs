//! `rate=` / `pps=` limits of a NIC (parsed with the `options` crate's RATE and COUNT).

/// Per-NIC rate limits parsed from `rate=` and `pps=`; applied by the virtio-net device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateSpec {
    /// Bandwidth limit in bytes per second (`rate=`), in each direction.
    pub bytes_per_sec: Option<u64>,
    /// Packet limit in packets per second (`pps=`), in each direction.
    pub ops_per_sec: Option<u64>,
}

impl RateSpec {
    /// True when neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec.is_none() && self.ops_per_sec.is_none()
    }
}
