//! RATE (bytes or bits per second, converted to bytes/s) and COUNT (operations per second).
//! The grammar is documented once, in the crate docs.

/// Parses a RATE into bytes per second; the error says what is wrong in a few words.
pub fn parse_rate(value: &str) -> Result<u64, &'static str> {
    let s = value.trim();
    let s = s.strip_suffix("/s").unwrap_or(s);
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let (mantissa, scale) =
        parse_decimal(num).ok_or("expected a number like 50 or 1.5, then a unit (e.g. 10M, 5MB, 50Mbit)")?;
    let (multiplier, bits): (u128, bool) = match unit {
        "" | "B" => (1, false),
        "K" | "k" | "KB" | "kB" => (1_000, false),
        "M" | "m" | "MB" => (1_000_000, false),
        "G" | "g" | "GB" => (1_000_000_000, false),
        "T" | "t" | "TB" => (1_000_000_000_000, false),
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
                return Err("unknown unit (bytes/s: 10M, B, KB, MB, GB, KiB, MiB, GiB; bits/s: bit, kbit, Mbit, Gbit)")
            }
        },
    };
    let divisor = scale * if bits { 8 } else { 1 };
    let bytes = mantissa.checked_mul(multiplier).map(|v| v / divisor).ok_or("too large")?;
    if bytes == 0 {
        return Err("must be at least 1 byte per second");
    }
    u64::try_from(bytes).map_err(|_| "too large")
}

/// `"12.5"` -> `(125, 10)`. At most 9 fractional digits and 20 integer digits.
fn parse_decimal(s: &str) -> Option<(u128, u128)> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || int.len() > 20 || frac.len() > 9 || (s.contains('.') && frac.is_empty()) {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mantissa: u128 = format!("{int}{frac}").parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
    Some((mantissa, scale))
}

/// Parses a COUNT: a whole number >= 1 with an optional decimal K/M/G suffix.
pub fn parse_count(value: &str) -> Option<u64> {
    let s = value.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (
            &s[..i],
            match c.to_ascii_uppercase() {
                'K' => 1_000,
                'M' => 1_000_000,
                'G' => 1_000_000_000,
                _ => return None,
            },
        ),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult).filter(|n| *n > 0)
}
