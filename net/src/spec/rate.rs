//! `rate=` / `pps=` option values.
//!
//! Units (hand-parsed: the grammar is tiny and we want exact, typed errors):
//! * bits per second: `bit`, `kbit`, `Mbit`, `Gbit`, `Tbit` (SI, powers of 1000; the
//!   letters are case-insensitive, so `mbit` = `Mbit`). Converted to bytes/s by dividing
//!   by 8 (rounded down, at least 1).
//! * bytes per second: `B`, `KB`, `MB`, `GB`, `TB` (SI, 1000) and `KiB`, `MiB`, `GiB`, `TiB`
//!   (1024). The final `B` must be upper case; `5mb` is refused as ambiguous.
//! * An optional trailing `/s` is accepted (`50Mbit/s`). A bare number is refused (no unit).
//! * Decimals are allowed (`1.5Gbit`), up to 9 fractional digits.

use super::SpecError;

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

fn rate_err(value: &str, reason: &'static str) -> SpecError {
    SpecError::InvalidRate {
        value: value.to_string(),
        reason,
    }
}

/// Parses a `rate=` value into bytes per second.
pub(crate) fn parse_rate(value: &str) -> Result<u64, SpecError> {
    let s = value.strip_suffix("/s").unwrap_or(value);
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| rate_err(value, "missing unit (use e.g. 50Mbit, 800kbit or 5MB)"))?;
    let (num, unit) = s.split_at(split);
    let (mantissa, scale) = parse_decimal(num).ok_or_else(|| {
        rate_err(value, "expected a number like 50 or 1.5 before the unit")
    })?;
    let (multiplier, bits): (u128, bool) = match unit {
        "B" => (1, false),
        "KB" | "kB" => (1_000, false),
        "MB" => (1_000_000, false),
        "GB" => (1_000_000_000, false),
        "TB" => (1_000_000_000_000, false),
        "KiB" => (1 << 10, false),
        "MiB" => (1 << 20, false),
        "GiB" => (1 << 30, false),
        "TiB" => (1 << 40, false),
        u => match u.to_ascii_lowercase().as_str() {
            "bit" => (1, true),
            "kbit" => (1_000, true),
            "mbit" => (1_000_000, true),
            "gbit" => (1_000_000_000, true),
            "tbit" => (1_000_000_000_000, true),
            _ => {
                return Err(rate_err(
                    value,
                    "unknown unit (bits/s: bit, kbit, Mbit, Gbit; bytes/s: B, KB, MB, GB, KiB, MiB, GiB)",
                ))
            }
        },
    };
    let divisor = scale * if bits { 8 } else { 1 };
    let bytes = mantissa
        .checked_mul(multiplier)
        .map(|v| v / divisor)
        .ok_or_else(|| rate_err(value, "too large"))?;
    if bytes == 0 {
        return Err(rate_err(value, "must be at least 1 byte per second"));
    }
    u64::try_from(bytes).map_err(|_| rate_err(value, "too large"))
}

/// `"12.5"` -> `(125, 10)`. At most 9 fractional digits and 20 integer digits.
fn parse_decimal(s: &str) -> Option<(u128, u128)> {
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, f),
        None => (s, ""),
    };
    if int.is_empty() || int.len() > 20 || frac.len() > 9 || (s.contains('.') && frac.is_empty())
    {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = format!("{int}{frac}");
    let mantissa: u128 = digits.parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    Some((mantissa, scale))
}

/// Parses a `pps=` value: a positive integer number of packets per second.
pub(crate) fn parse_pps(value: &str) -> Result<u64, SpecError> {
    let bad = |reason| SpecError::InvalidPps {
        value: value.to_string(),
        reason,
    };
    let n: u64 = value
        .parse()
        .map_err(|_| bad("expected a whole number of packets per second, like pps=10000"))?;
    if n == 0 {
        return Err(bad("must be at least 1"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        assert_eq!(parse_rate("50Mbit").unwrap(), 6_250_000);
        assert_eq!(parse_rate("50mbit").unwrap(), 6_250_000);
        assert_eq!(parse_rate("800kbit").unwrap(), 100_000);
        assert_eq!(parse_rate("1Gbit").unwrap(), 125_000_000);
        assert_eq!(parse_rate("1.5Gbit").unwrap(), 187_500_000);
        assert_eq!(parse_rate("64bit").unwrap(), 8);
        assert_eq!(parse_rate("50Mbit/s").unwrap(), 6_250_000);
    }

    #[test]
    fn bytes() {
        assert_eq!(parse_rate("5MB").unwrap(), 5_000_000);
        assert_eq!(parse_rate("5MiB").unwrap(), 5 * 1024 * 1024);
        assert_eq!(parse_rate("100B").unwrap(), 100);
        assert_eq!(parse_rate("2kB").unwrap(), 2000);
        assert_eq!(parse_rate("0.5KiB").unwrap(), 512);
    }

    #[test]
    fn rejects() {
        for bad in [
            "", "50", "Mbit", "5mb", "5Mbps", "0Mbit", "1bit", "-5MB", "5 MB", "1.Mbit", ".5Mbit",
            "1.2.3Mbit", "99999999999999999999TB", "1.0000000001Gbit", "5XB",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn pps() {
        assert_eq!(parse_pps("10000").unwrap(), 10000);
        assert!(parse_pps("0").is_err());
        assert!(parse_pps("-1").is_err());
        assert!(parse_pps("1k").is_err());
        assert!(parse_pps("").is_err());
    }
}
