//! The grammar of microvm's command-line option values: `HEAD,key=value,switch` specs
//! (`--disk`, `--net`, `--share`), sizes and rates. One parser, one size grammar, one
//! rate grammar, one error shape (`bad --FLAG 'SPEC': REASON`, one line).
//!
//! Its own crate, with no dependencies, because two crates parse with it: `vmm` (`--disk`,
//! `--share`, `--memory`) and `net` (`--net`, whose `NetSpec` is net's own type), and net is
//! the floor below vmm, so it cannot use vmm. Hand-written rather than a crate from
//! crates.io: the grammar is a few lines, and we want typed, exact one-line errors that
//! name the spec.
//!
//! ```text
//! SPEC    = HEAD { "," ITEM }           empty items (a trailing comma) are ignored
//! ITEM    = KEY "=" VALUE | SWITCH      each key or switch at most once
//! SIZE    = INT [ K | M | G | T ] [ "iB" ]   binary: 1K = 1024; no suffix = bytes;
//!                                             letters in any case (4G, 512m, 1GiB)
//! RATE    = NUMBER [ UNIT ] [ "/s" ]     a rate per second, converted to bytes/s:
//!   bytes/s: no unit, K/M/G/T (decimal: 10M = 10,000,000), B, KB/kB, MB, GB, TB (decimal),
//!            KiB, MiB, GiB, TiB (binary)
//!   bits/s:  bit, kbit, Mbit, Gbit, Tbit (decimal; any case: 50mbit = 50Mbit), /8
//!   NUMBER may have up to 9 decimals (1.5Gbit); the result must be >= 1 byte/s.
//!   `5mb` is refused as ambiguous (bits or bytes?).
//! COUNT   = INT [ K | M | G ]            operations or packets per second, decimal, >= 1
//! ```

mod rate;
mod size;

pub use rate::{parse_count, parse_rate};
pub use size::parse_size;

/// Why a spec was refused. Displays as one line, without the spec (see [`OptionError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("missing {0}")]
    MissingHead(&'static str),
    #[error("unknown option '{option}' (allowed: {allowed})")]
    UnknownOption { option: String, allowed: String },
    #[error("option '{0}' given twice")]
    Duplicate(String),
    #[error("option '{0}' needs a value ({0}=...)")]
    MissingValue(String),
    #[error("option '{0}' takes no value")]
    UnexpectedValue(String),
    #[error("bad size '{0}': expected a whole number with an optional K, M, G or T suffix (binary; e.g. 4G)")]
    Size(String),
    #[error("bad rate '{value}': {why}")]
    Rate { value: String, why: &'static str },
    #[error("bad count '{0}': expected a whole number >= 1 with an optional K, M or G suffix (e.g. 1000 or 10K)")]
    Count(String),
    /// A check of the spec's own (a bad MAC, a relative path...).
    #[error("{0}")]
    Invalid(String),
}

/// A refused spec: `bad --disk 'x.img,size=lots': bad size 'lots': ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad {flag} '{spec}': {reason}")]
pub struct OptionError {
    pub flag: &'static str,
    pub spec: String,
    pub reason: Reason,
}

/// The keys one kind of spec accepts.
#[derive(Debug, Clone, Copy)]
pub struct OptionParser {
    flag: &'static str,
    head: &'static str,
    values: &'static [&'static str],
    /// (switch as written, the name it sets): lets `ro` mean `readonly`.
    switches: &'static [(&'static str, &'static str)],
}

impl OptionParser {
    /// `flag` names the option in errors (`--disk`), `head` the first item (`PATH`).
    pub const fn new(flag: &'static str, head: &'static str) -> Self {
        OptionParser { flag, head, values: &[], switches: &[] }
    }

    /// Keys that take a value (`size=4G`).
    pub const fn values(mut self, keys: &'static [&'static str]) -> Self {
        self.values = keys;
        self
    }

    /// Keys without a value, each with the name it sets (`("ro", "readonly")`).
    pub const fn switches(mut self, switches: &'static [(&'static str, &'static str)]) -> Self {
        self.switches = switches;
        self
    }

    /// An error about `spec` for this flag.
    pub fn error(&self, spec: &str, reason: Reason) -> OptionError {
        OptionError { flag: self.flag, spec: spec.to_string(), reason }
    }

    fn allowed(&self) -> String {
        let mut names: Vec<String> = self.values.iter().map(|k| format!("{k}=")).collect();
        names.extend(self.switches.iter().map(|(s, _)| s.to_string()));
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    }

    /// Splits `spec` into its head and items and checks every key; values are typed by
    /// the caller through [`Options`].
    pub fn parse<'a>(&self, spec: &'a str) -> Result<Options<'a>, OptionError> {
        let bad = |reason| Err(self.error(spec, reason));
        let head = head(spec);
        if head.is_empty() {
            return bad(Reason::MissingHead(self.head));
        }
        let mut opts = Options { parser: *self, spec, head, values: Vec::new(), switches: Vec::new() };
        for item in spec.split(',').skip(1).map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item, None),
            };
            let seen = opts.values.iter().any(|(k, _)| *k == key)
                || opts.switches.iter().any(|s| *s == key || self.canonical(key) == Some(s));
            if let Some(&k) = self.values.iter().find(|k| **k == key) {
                match value {
                    _ if seen => return bad(Reason::Duplicate(key.to_string())),
                    Some(v) if !v.is_empty() => opts.values.push((k, v)),
                    _ => return bad(Reason::MissingValue(key.to_string())),
                }
            } else if let Some(name) = self.canonical(key) {
                if seen {
                    return bad(Reason::Duplicate(key.to_string()));
                }
                if value.is_some() {
                    return bad(Reason::UnexpectedValue(key.to_string()));
                }
                opts.switches.push(name);
            } else {
                return bad(Reason::UnknownOption { option: key.to_string(), allowed: self.allowed() });
            }
        }
        Ok(opts)
    }

    fn canonical(&self, switch: &str) -> Option<&'static str> {
        self.switches.iter().find(|(s, _)| *s == switch).map(|(_, name)| *name)
    }
}

/// The first item of a spec, trimmed (`nat:lab` in `nat:lab,rate=1Mbit`).
pub fn head(spec: &str) -> &str {
    spec.split(',').next().unwrap_or_default().trim()
}

/// A parsed spec; typed accessors turn bad values into [`OptionError`]s naming the spec.
#[derive(Debug)]
pub struct Options<'a> {
    parser: OptionParser,
    spec: &'a str,
    head: &'a str,
    values: Vec<(&'static str, &'a str)>,
    switches: Vec<&'static str>,
}

impl<'a> Options<'a> {
    pub fn head(&self) -> &'a str {
        self.head
    }

    /// The raw value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// True if the switch (by the name it sets) was given.
    pub fn has(&self, name: &str) -> bool {
        self.switches.contains(&name)
    }

    /// An error about this spec.
    pub fn error(&self, reason: Reason) -> OptionError {
        self.parser.error(self.spec, reason)
    }

    /// `key=` as a size in bytes ([`parse_size`]).
    pub fn size(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.typed(key, |v| parse_size(v).ok_or_else(|| Reason::Size(v.to_string())))
    }

    /// `key=` as a rate in bytes per second ([`parse_rate`]).
    pub fn rate(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.typed(key, |v| parse_rate(v).map_err(|why| Reason::Rate { value: v.to_string(), why }))
    }

    /// `key=` as a count per second ([`parse_count`]).
    pub fn count(&self, key: &str) -> Result<Option<u64>, OptionError> {
        self.typed(key, |v| parse_count(v).ok_or_else(|| Reason::Count(v.to_string())))
    }

    /// `key=` through the value type's own `FromStr` (a MAC, a subnet...).
    pub fn parsed<T>(&self, key: &str) -> Result<Option<T>, OptionError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        self.typed(key, |v| v.parse::<T>().map_err(|e| Reason::Invalid(e.to_string())))
    }

    fn typed<T>(&self, key: &str, f: impl FnOnce(&'a str) -> Result<T, Reason>) -> Result<Option<T>, OptionError> {
        self.get(key).map(f).transpose().map_err(|r| self.error(r))
    }
}

#[cfg(test)]
mod tests;
