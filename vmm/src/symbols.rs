//! Names for guest kernel addresses, from the kernel's System.map: register dumps and
//! fault messages say `RIP=0xffffffff8104c2e3 <exc_page_fault+0x13>`.
//!
//! The map is read once, on first use (a register dump or a fault, on a vCPU thread, never
//! in a signal handler), into a sorted Vec; most runs never read it at all. The file is
//! opened up front, before the vCPU threads' seccomp filters (which allow no open), and
//! read on first use with plain read(2) calls.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// Largest offset into a symbol we still name: beyond that the address is past the end of
/// the last function, not inside it.
const MAX_OFFSET: u64 = 1 << 20;

/// A kernel's text symbols, sorted by address.
#[derive(Debug, Default)]
pub struct SymbolMap {
    symbols: Vec<(u64, String)>,
}

impl SymbolMap {
    /// Parses System.map text (`ffffffff81000000 T _text` lines); keeps text symbols.
    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                matches!(kind, "T" | "t" | "W" | "w").then(|| (addr, name.to_string()))
            })
            .collect();
        // Stable: of symbols at one address the last listed wins (`startup_64` over `_text`).
        symbols.sort_by_key(|(addr, _)| *addr);
        SymbolMap { symbols }
    }

    /// The symbol containing `addr` and the offset into it.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.symbols.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (start, name) = &self.symbols[i];
        let offset = addr - start;
        (offset < MAX_OFFSET).then_some((name.as_str(), offset))
    }

    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }
}

/// A System.map that is parsed when first needed; shared by the vCPU threads.
#[derive(Debug, Default)]
pub struct Symbols {
    path: Option<PathBuf>,
    /// Opened by `new`, taken and read on first use.
    file: Mutex<Option<io::Result<File>>>,
    map: OnceLock<SymbolMap>,
}

impl Symbols {
    pub fn new(path: Option<PathBuf>) -> Self {
        let file = Mutex::new(path.as_ref().map(File::open));
        Symbols { path, file, map: OnceLock::new() }
    }

    /// `" <name+0xoff>"` for `addr`, or an empty string when unknown (no map, or no symbol).
    pub fn describe(&self, addr: u64) -> String {
        let Some(path) = &self.path else { return String::new() };
        let map = self.map.get_or_init(|| match read_all(&self.file) {
            Ok(text) => SymbolMap::parse(&text),
            Err(e) => {
                tracing::warn!("cannot read {}: {e}", path.display());
                SymbolMap::default()
            }
        });
        match map.lookup(addr) {
            Some((name, offset)) => format!(" <{name}+{offset:#x}>"),
            None => String::new(),
        }
    }
}

/// Reads the opened map with read(2) only: std's `read_to_string` would first stat the
/// file for a size hint (statx), which the vCPU filter does not allow.
fn read_all(file: &Mutex<Option<io::Result<File>>>) -> io::Result<String> {
    let taken = file.lock().unwrap_or_else(|e| e.into_inner()).take();
    let mut file = taken.unwrap_or_else(|| Err(io::Error::other("already read")))?;
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81000000 T startup_64
ffffffff8104c2d0 T exc_page_fault
ffffffff8104c400 t helper
ffffffff82000000 D some_data
ffffffff8104c500 W weak_fn
0000000000000000 A absolute
garbage line
";

    #[test]
    fn lookup() {
        let m = SymbolMap::parse(MAP);
        assert_eq!(m.len(), 5, "text symbols only");
        assert_eq!(m.lookup(0xffffffff8104c2e3), Some(("exc_page_fault", 0x13)));
        assert_eq!(m.lookup(0xffffffff8104c400), Some(("helper", 0)));
        assert_eq!(m.lookup(0xffffffff8104c501), Some(("weak_fn", 1)));
        assert_eq!(m.lookup(0xffffffff80000000), None, "below the first symbol");
        assert_eq!(m.lookup(0xffffffff8204c501), None, "far past the last symbol");
        assert_eq!(m.lookup(0xffffffff81000005), Some(("startup_64", 5)));
    }

    #[test]
    fn describe_is_lazy_and_quiet_without_a_map() {
        assert_eq!(Symbols::new(None).describe(0x1000), "");
        let path = std::env::temp_dir().join(format!("mv-sysmap-{}", std::process::id()));
        std::fs::write(&path, MAP).unwrap();
        let s = Symbols::new(Some(path.clone()));
        assert!(s.map.get().is_none(), "not read before first use");
        assert_eq!(s.describe(0xffffffff8104c2e3), " <exc_page_fault+0x13>");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(s.describe(0xffffffff8104c401), " <helper+0x1>", "parsed once");
        assert_eq!(Symbols::new(Some(path)).describe(0xffffffff8104c401), "", "missing map: no names");
    }
}
