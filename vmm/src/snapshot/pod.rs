//! Serde for KVM's C state structs: each one is saved as a base64 string of its exact bytes
//! (zerocopy's views, which kvm-bindings derives with its `serde` feature).
//!
//! Written here rather than using kvm-bindings' own serde impls because those zero-pad or
//! truncate a blob of the wrong length (meant for kernels that grow a struct); a snapshot is
//! read on the same microvm format, so a length mismatch is an error, never a guess.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s.as_bytes()).map_err(D::Error::custom)
}

/// One struct: `#[serde(with = "pod")]`.
pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&B64.encode(v.as_bytes()))
}

pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    let bytes = decode(d)?;
    T::read_from_bytes(&bytes).map_err(|_| {
        D::Error::custom(format!(
            "expected {} bytes, got {}",
            std::mem::size_of::<T>(),
            bytes.len()
        ))
    })
}

/// A list of structs, as one blob: `#[serde(with = "pod::vec")]`. Its length is only bounded
/// by the state file's size here; callers check counts in their `validate()`.
pub mod vec {
    use super::*;

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        v: &[T],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v.as_bytes()))
    }

    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
        let bytes = decode(d)?;
        let size = std::mem::size_of::<T>();
        if size == 0 || bytes.len() % size != 0 {
            return Err(D::Error::custom(format!(
                "{} bytes is not a whole number of {size}-byte entries",
                bytes.len()
            )));
        }
        bytes
            .chunks_exact(size)
            .map(|c| T::read_from_bytes(c).map_err(|_| D::Error::custom("bad entry")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_cpuid_entry2, kvm_regs};
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    struct T {
        #[serde(with = "super")]
        regs: kvm_regs,
        #[serde(with = "super::vec")]
        list: Vec<kvm_cpuid_entry2>,
    }

    #[test]
    fn round_trip_and_exact_lengths() {
        let t = T {
            regs: kvm_regs {
                rip: 0x1234,
                r15: u64::MAX,
                ..Default::default()
            },
            list: vec![
                kvm_cpuid_entry2 {
                    function: 7,
                    eax: 9,
                    ..Default::default()
                };
                3
            ],
        };
        let json = serde_json::to_string(&t).unwrap();
        let back: T = serde_json::from_str(&json).unwrap();
        assert_eq!((back.regs.rip, back.regs.r15), (0x1234, u64::MAX));
        assert_eq!(back.list.len(), 3);
        assert_eq!((back.list[2].function, back.list[2].eax), (7, 9));

        // One byte short (base64 of 143 bytes) and a ragged list are refused.
        use base64::Engine;
        let short = super::B64.encode([0u8; std::mem::size_of::<kvm_regs>() - 1]);
        let ragged = super::B64.encode([0u8; std::mem::size_of::<kvm_cpuid_entry2>() + 1]);
        let good_list = super::B64.encode([0u8; std::mem::size_of::<kvm_cpuid_entry2>()]);
        let good_regs = super::B64.encode([0u8; std::mem::size_of::<kvm_regs>()]);
        let bad1 = format!(r#"{{"regs":"{short}","list":"{good_list}"}}"#);
        let bad2 = format!(r#"{{"regs":"{good_regs}","list":"{ragged}"}}"#);
        let bad3 = format!(r#"{{"regs":"not base64!","list":"{good_list}"}}"#);
        for bad in [bad1, bad2, bad3] {
            assert!(serde_json::from_str::<T>(&bad).is_err(), "{bad}");
        }
    }
}
