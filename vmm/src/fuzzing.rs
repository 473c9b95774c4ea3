//! Entry points for the cargo-fuzz targets in `vmm/fuzz`: the command-line spec parsers and
//! the snapshot state-file reader, with the invariants every accepted input must satisfy.

use std::path::Path;

use crate::config::disk::DiskConfig;
use crate::config::parse_memory;
use crate::config::share::ShareConfig;
use crate::snapshot::format::{encode_state, parse_state, SnapshotState, HEADER_LEN};

/// `--disk`, `--share`, `--memory` and `--net` specs (the first input byte picks which):
/// never a panic; an accepted spec, printed back in canonical form, parses to the same value
/// (so nothing the user wrote was silently dropped or reinterpreted).
pub fn specs(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 4 {
        0 => disk(text),
        1 => share(text),
        2 => memory(text),
        _ => net(text),
    }
}

fn disk(text: &str) {
    let Ok(d) = text.parse::<DiskConfig>() else {
        return;
    };
    let _ = d.validate();
    let path = d.path.to_str().expect("the path came from a str");
    assert!(!path.is_empty() && !path.contains(','), "{path:?}");
    let mut canon = path.to_string();
    if let Some(s) = d.size {
        canon += &format!(",size={s}");
    }
    if d.read_only {
        canon += ",ro";
    }
    if d.snapshot {
        canon += ",snapshot";
    }
    if let Some(b) = &d.rate.bandwidth {
        canon += &format!(",bw={}", b.rate);
    }
    if let Some(o) = &d.rate.ops {
        canon += &format!(",iops={}", o.rate);
    }
    let again: DiskConfig = canon.parse().unwrap_or_else(|e| panic!("{canon:?}: {e}"));
    assert_eq!(again, d, "{text:?} -> {canon:?}");
}

fn share(text: &str) {
    let Ok(s) = text.parse::<ShareConfig>() else {
        return;
    };
    // Parsing already ran the pure checks: validate must agree.
    s.validate().unwrap_or_else(|e| panic!("{text:?} parsed but: {e}"));
    let mut canon = s.host.to_str().expect("from a str").to_string();
    if let Some(g) = &s.guest {
        canon += &format!(",at={}", g.to_str().expect("from a str"));
    }
    if let Some(t) = &s.tag {
        canon += &format!(",tag={t}");
    }
    if s.read_only {
        canon += ",ro";
    }
    let again: ShareConfig = canon.parse().unwrap_or_else(|e| panic!("{canon:?}: {e}"));
    assert_eq!(again, s, "{text:?} -> {canon:?}");
}

fn memory(text: &str) {
    let Ok(mib) = parse_memory(text) else {
        return;
    };
    assert_eq!(parse_memory(&mib.to_string()).ok(), Some(mib), "{text:?}");
    if mib <= u64::MAX >> 20 {
        assert_eq!(parse_memory(&format!("{mib}M")).ok(), Some(mib), "{text:?}");
    }
}

fn net(text: &str) {
    let Ok(spec) = text.parse::<net::NetSpec>() else {
        return;
    };
    let canon = spec.to_string();
    let again: net::NetSpec = canon.parse().unwrap_or_else(|e| panic!("{canon:?}: {e}"));
    assert_eq!(again, spec, "{text:?} -> {canon:?}");
    let _ = spec.mac_for("fuzz", 0);
}

/// The snapshot `state` file. The first input byte picks the mode: the bytes as the whole
/// file (header checks), or as the JSON body behind a header that is right (magic, version,
/// length, checksum), so that the fuzzer reaches the decoder and `validate`.
///
/// Invariants: never a panic (whatever the claimed lengths, nothing big is allocated: the
/// reader caps the file and the body length); a state that parses re-encodes to a file that
/// parses to the same state, with the same `validate` verdict.
pub fn snapshot_state(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let path = Path::new("fuzz/state");
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut f = Vec::with_capacity(HEADER_LEN + rest.len());
        f.extend_from_slice(b"microvm-snapshot");
        f.extend_from_slice(&crate::snapshot::format::FORMAT_VERSION.to_le_bytes());
        f.extend_from_slice(&crc32fast::hash(rest).to_le_bytes());
        f.extend_from_slice(&(rest.len() as u64).to_le_bytes());
        f.extend_from_slice(rest);
        f
    };
    let Ok(state) = parse_state(&file, path) else {
        return;
    };
    let verdict = state.validate();
    let again = parse_state(&encode_state(&state).expect("a parsed state encodes"), path)
        .expect("a re-encoded state parses");
    assert_eq!(json(&again), json(&state));
    assert_eq!(again.validate(), verdict);
}

fn json(s: &SnapshotState) -> serde_json::Value {
    serde_json::to_value(s).expect("a parsed state serializes")
}
