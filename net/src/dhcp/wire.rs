//! Structural check of a raw BOOTP/DHCP message, run before `dhcproto` sees it.
//!
//! Why: dhcproto 0.15 `debug_assert!`s on some option lengths (e.g. option 80, Rapid
//! Commit, with length 1), which panics in debug builds; anything on a microvm network
//! can send such a packet. So we walk the header and every option TLV ourselves and only
//! hand over messages whose options all have the length dhcproto's decoder
//! (`dhcproto::v4::options::decode_inner`) expects for their code.
//!
//! Checked: the 236-byte fixed header plus the magic cookie, `hlen` <= 16 (dhcproto's
//! `chaddr()` slices by it), every TLV complete, the options terminated by End, option
//! overload (52) well-formed, and each option's length per [`rule`]. Like dhcproto (RFC
//! 3396), consecutive TLVs of one code count as one option with the summed length.

use std::fmt;

/// op .. file: RFC 2131 section 2.
const FIXED_HEADER: usize = 236;
/// The DHCP magic cookie 99.130.83.99 after the fixed header.
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const OPTIONS_START: usize = FIXED_HEADER + MAGIC.len();
const HLEN_OFFSET: usize = 2;
const CHADDR_LEN: usize = 16;
/// `sname` (64 bytes) and `file` (128 bytes): extra option space under option overload.
const SNAME: std::ops::Range<usize> = 44..108;
const FILE: std::ops::Range<usize> = 108..236;

const PAD: u8 = 0;
const END: u8 = 255;
const OPTION_OVERLOAD: u8 = 52;

/// Why a message was refused. Shown in the (rate-limited) drop log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Malformed {
    TooShort(usize),
    BadMagic,
    BadHlen(u8),
    /// An option's code or length byte or its data runs past its area.
    Truncated { code: u8 },
    NoEnd,
    BadLength { code: u8, len: usize },
    BadOverload(u8),
    /// Passed these checks but dhcproto still refused it.
    Undecodable,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Malformed::TooShort(n) => write!(f, "{n} bytes, shorter than a BOOTP header"),
            Malformed::BadMagic => write!(f, "no DHCP magic cookie"),
            Malformed::BadHlen(h) => write!(f, "hardware address length {h} > 16"),
            Malformed::Truncated { code } => write!(f, "option {code} truncated"),
            Malformed::NoEnd => write!(f, "options not terminated by End"),
            Malformed::BadLength { code, len } => write!(f, "option {code} has bad length {len}"),
            Malformed::BadOverload(v) => write!(f, "option overload value {v}"),
            Malformed::Undecodable => write!(f, "rejected by the DHCP decoder"),
        }
    }
}

/// What dhcproto's decoder accepts as the (summed) length of an option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LenRule {
    Any,
    Exactly(usize),
    AtLeast(usize),
    MultipleOf(usize),
}

impl LenRule {
    pub fn allows_len(self, len: usize) -> bool {
        match self {
            LenRule::Any => true,
            LenRule::Exactly(n) => len == n,
            LenRule::AtLeast(n) => len >= n,
            LenRule::MultipleOf(n) => len.is_multiple_of(n),
        }
    }
}

/// The length rule for option `code`, read off dhcproto 0.15's `decode_inner`. The first
/// four arms are the ones where dhcproto would panic (`debug_assert!`) rather than fail;
/// the others make its decoder fail, which silently drops every later option, so they are
/// refused up front too. Codes not listed are strings, byte blobs, domain lists or unknown
/// options, read as whatever length they have.
pub(crate) fn rule(code: u8) -> LenRule {
    match code {
        // debug_assert!(len == 0): Rapid Commit.
        80 => LenRule::Exactly(0),
        // debug_assert!(len == 3): Client Network Interface (type, major, minor).
        94 => LenRule::Exactly(3),
        // debug_assert!(len == 4): bulk leasequery times.
        152..=155 => LenRule::Exactly(4),
        // debug_assert!(len >= 3): Client FQDN (flags, rcode1, rcode2, name).
        81 => LenRule::AtLeast(3),
        // read_ipv4(len): exactly one address.
        1 | 16 | 28 | 32 | 50 | 54 | 118 | 150 => LenRule::Exactly(4),
        // read_ipv4s(len): a list of addresses.
        3..=11 | 41 | 42 | 44 | 45 | 48 | 49 | 65 | 68..=76 | 89 | 92 => LenRule::MultipleOf(4),
        // read_pair_ipv4s(len): address pairs.
        21 | 33 => LenRule::MultipleOf(8),
        // read_u32 / read_i32.
        2 | 24 | 35 | 38 | 51 | 58 | 59 | 91 | 106 => LenRule::AtLeast(4),
        // read_u16.
        13 | 22 | 26 | 57 | 93 => LenRule::AtLeast(2),
        // read_u8 / read_bool (151: a status byte, then `len - 1` bytes of text).
        19 | 20 | 23 | 27 | 29..=31 | 34 | 36 | 37 | 39 | 46 | 52 | 53 | 116 | 151 | 156 | 157 => {
            LenRule::AtLeast(1)
        }
        _ => LenRule::Any,
    }
}

/// Checks `buf` as described in the module docs.
pub(crate) fn check(buf: &[u8]) -> Result<(), Malformed> {
    if buf.len() < OPTIONS_START {
        return Err(Malformed::TooShort(buf.len()));
    }
    if buf[FIXED_HEADER..OPTIONS_START] != MAGIC {
        return Err(Malformed::BadMagic);
    }
    let hlen = buf[HLEN_OFFSET];
    if usize::from(hlen) > CHADDR_LEN {
        return Err(Malformed::BadHlen(hlen));
    }
    let overload = check_area(&buf[OPTIONS_START..], true)?;
    match overload {
        None => Ok(()),
        Some(v @ 1..=3) => {
            if v & 1 != 0 {
                check_area(&buf[FILE], false)?;
            }
            if v & 2 != 0 {
                check_area(&buf[SNAME], false)?;
            }
            Ok(())
        }
        Some(v) => Err(Malformed::BadOverload(v)),
    }
}

/// Walks one option area up to End. Returns the option-overload value if the area holds
/// option 52 (allowed only in the main area, `main`).
fn check_area(area: &[u8], main: bool) -> Result<Option<u8>, Malformed> {
    let mut overload = None;
    // The option being summed over consecutive TLVs of one code: (code, total length).
    let mut run: Option<(u8, usize)> = None;
    let mut pos = 0;
    loop {
        let Some(&code) = area.get(pos) else {
            return Err(Malformed::NoEnd);
        };
        if code == PAD || code == END {
            // Pad and End end a run (dhcproto decodes the option it has before them).
            finish(run.take())?;
            if code == END {
                return Ok(overload);
            }
            pos += 1;
            continue;
        }
        let len = usize::from(*area.get(pos + 1).ok_or(Malformed::Truncated { code })?);
        let data = area.get(pos + 2..pos + 2 + len).ok_or(Malformed::Truncated { code })?;
        if code == OPTION_OVERLOAD {
            if !main {
                return Err(Malformed::BadOverload(data.first().copied().unwrap_or(0)));
            }
            overload = data.first().copied();
        }
        run = match run {
            Some((c, total)) if c == code => Some((c, total + len)),
            other => {
                finish(other)?;
                Some((code, len))
            }
        };
        pos += 2 + len;
    }
}

fn finish(run: Option<(u8, usize)>) -> Result<(), Malformed> {
    match run {
        Some((code, len)) if !rule(code).allows_len(len) => Err(Malformed::BadLength { code, len }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request header with the cookie, then `opts`.
    fn msg(opts: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; FIXED_HEADER];
        b[0] = 1;
        b[1] = 1;
        b[HLEN_OFFSET] = 6;
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(opts);
        b
    }

    #[test]
    fn header() {
        assert_eq!(check(&[0; 10]), Err(Malformed::TooShort(10)));
        assert_eq!(check(&[0; 300]), Err(Malformed::BadMagic));
        let mut m = msg(&[53, 1, 1, 255]);
        assert_eq!(check(&m), Ok(()));
        m[HLEN_OFFSET] = 17;
        assert_eq!(check(&m), Err(Malformed::BadHlen(17)));
        m[HLEN_OFFSET] = 16;
        assert_eq!(check(&m), Ok(()));
    }

    #[test]
    fn options_walk() {
        assert_eq!(check(&msg(&[])), Err(Malformed::NoEnd));
        assert_eq!(check(&msg(&[0, 0, 53, 1, 1])), Err(Malformed::NoEnd));
        assert_eq!(check(&msg(&[53])), Err(Malformed::Truncated { code: 53 }));
        assert_eq!(check(&msg(&[12, 5, b'a'])), Err(Malformed::Truncated { code: 12 }));
        // Bytes after End are ignored (padding).
        assert_eq!(check(&msg(&[53, 1, 1, 255, 80, 9])), Ok(()));
        assert_eq!(check(&msg(&[80, 1, 0, 255])), Err(Malformed::BadLength { code: 80, len: 1 }));
        assert_eq!(check(&msg(&[80, 0, 255])), Ok(()));
        assert_eq!(check(&msg(&[94, 2, 1, 2, 255])), Err(Malformed::BadLength { code: 94, len: 2 }));
        assert_eq!(check(&msg(&[50, 3, 1, 2, 3, 255])), Err(Malformed::BadLength { code: 50, len: 3 }));
        assert_eq!(check(&msg(&[6, 8, 1, 1, 1, 1, 8, 8, 8, 8, 255])), Ok(()));
    }

    #[test]
    fn concatenated_options_are_summed() {
        // Two 2-byte halves of one address: fine together (RFC 3396)...
        assert_eq!(check(&msg(&[50, 2, 10, 0, 50, 2, 0, 2, 255])), Ok(()));
        // ...but a Pad in between makes them two 2-byte options, as dhcproto sees it.
        assert_eq!(check(&msg(&[50, 2, 10, 0, 0, 50, 2, 0, 2, 255])), Err(Malformed::BadLength { code: 50, len: 2 }));
        // Two zero-length Rapid Commits sum to 0; a 0 and a 1 do not pass.
        assert_eq!(check(&msg(&[80, 0, 80, 0, 255])), Ok(()));
        assert_eq!(check(&msg(&[80, 0, 80, 1, 7, 255])), Err(Malformed::BadLength { code: 80, len: 1 }));
    }

    #[test]
    fn overload() {
        let mut m = msg(&[52, 1, 1, 255]);
        // The file field is all Pad, no End.
        assert_eq!(check(&m), Err(Malformed::NoEnd));
        m[FILE.start] = 255;
        assert_eq!(check(&m), Ok(()));
        m[FILE.start..FILE.start + 4].copy_from_slice(&[80, 1, 0, 255]);
        assert_eq!(check(&m), Err(Malformed::BadLength { code: 80, len: 1 }));
        let mut m = msg(&[52, 1, 2, 255]);
        assert_eq!(check(&m), Err(Malformed::NoEnd));
        m[SNAME.start] = 255;
        assert_eq!(check(&m), Ok(()));
        m[SNAME.start..SNAME.start + 4].copy_from_slice(&[52, 1, 1, 255]);
        assert_eq!(check(&m), Err(Malformed::BadOverload(1)));
        assert_eq!(check(&msg(&[52, 1, 4, 255])), Err(Malformed::BadOverload(4)));
        assert_eq!(check(&msg(&[52, 0, 255])), Err(Malformed::BadLength { code: 52, len: 0 }));
    }
}
