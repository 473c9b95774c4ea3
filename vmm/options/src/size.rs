//! SIZE: a whole number of bytes with an optional binary K/M/G/T suffix (any case), which
//! may be spelled with `iB` (`4G` = `4GiB` = 4 << 30).

/// Parses a SIZE into bytes; `None` if malformed or over `u64`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_suffix("iB").filter(|r| r.ends_with(|c: char| c.is_ascii_alphabetic())).unwrap_or(s);
    let (digits, shift) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&s[..i], unit_shift(c)?),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Bits to shift for a binary unit letter.
fn unit_shift(c: char) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        _ => return None,
    })
}
