//! Every external program that microvm, the tests or the tools execute is in tools/host-deps
//! (the one list the README's commands install from), or comes with every Debian system (a
//! package of priority "required"). A new `Command::new("tool")` or a new tool in a script
//! without a line in tools/host-deps fails here — the fresh-machine break this prevents was
//! `nft` missing on a machine where only `tools/demo` had been run.
//!
//! The scan is deliberately simple: `Command::new("X")` and shell text handed to `sh(...)`
//! in Rust, list literals and `sh(...)` in the Python tools, and command positions in the
//! bash tools. Quoted strings in scripts are not scanned (they hold guest commands and data).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use microvm_tests::workspace_root;

/// Programs found, each with the first file that runs it.
type Found = BTreeMap<String, String>;

#[test]
fn every_program_run_is_a_declared_host_dependency() {
    let root = workspace_root();
    let declared = declared(&root);
    let mut found = Found::new();
    for dir in ["vmm", "net", "devices", "tests", "resources"] {
        for file in files(&root.join(dir)) {
            if file.extension().is_some_and(|e| e == "rs") {
                scan_rust(&read(&file), &rel(&root, &file), &mut found);
            }
        }
    }
    for file in files(&root.join("tools")).into_iter().chain([root.join(".ci/run")]) {
        let text = read(&file);
        if text.starts_with("#!/usr/bin/env python3") {
            scan_python(&text, &rel(&root, &file), &mut found);
        } else {
            scan_shell(&text, &rel(&root, &file), &mut found);
        }
    }
    // The scan must see the programs we know are there, or it scans nothing.
    for known in ["nft", "ip", "busybox", "cargo", "make"] {
        assert!(found.contains_key(known), "scanner missed {known}: {found:?}");
    }
    let mut missing = Vec::new();
    for (prog, file) in &found {
        if !declared.contains(prog) && !from_required_package(prog) {
            missing.push(format!("{prog} (run by {file})"));
        }
    }
    assert!(
        missing.is_empty(),
        "programs run by the code or tools but not listed in tools/host-deps \
         (and not part of every Debian system): {missing:?}"
    );
}

#[test]
fn scanner_finds_commands_in_each_language() {
    let mut f = Found::new();
    scan_rust(r#"let c = Command::new("nft").arg("-f"); ns.sh(&format!("ip link add {x} type veth && busybox httpd -p 80"));"#, "a.rs", &mut f);
    scan_python(r#"subprocess.run(["qemu-system-x86_64", "-M"]); sh(f"{ns} tcpdump -i {dev} | tee x")"#, "b.py", &mut f);
    scan_shell("set -e\nfoo() { :; }\necho \"$((SECONDS - 1)) s\"\nif ! jq . x; then exec env A=1 iperf3 -c x; fi\necho 'wget not-a-command'\nX=$(dnsmasq --help)\nfoo\n", "c.sh", &mut f);
    let got: BTreeSet<&str> = f.keys().map(String::as_str).collect();
    for want in ["nft", "ip", "busybox", "qemu-system-x86_64", "tcpdump", "tee", "jq", "iperf3", "dnsmasq"] {
        assert!(got.contains(want), "missed {want}: {got:?}");
    }
    for not in ["SECONDS", "wget", "foo", "echo", "set", "if", "exec", "env", "x", "httpd"] {
        assert!(!got.contains(not), "{not} is not a program run here: {got:?}");
    }
    // A declared dependency is recognised, and a made-up one is not "required".
    assert!(declared(&workspace_root()).contains("nft"));
    assert!(!from_required_package("surely-not-a-program-xyz"));
    assert!(from_required_package("sed"));
}

/// Program names (first column) of `tools/host-deps --list`.
fn declared(root: &Path) -> BTreeSet<String> {
    let out = Command::new(root.join("tools/host-deps")).arg("--list").output().expect("run tools/host-deps --list");
    assert!(out.status.success(), "tools/host-deps --list failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let progs: BTreeSet<String> = text.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect();
    assert!(progs.len() > 5, "tools/host-deps --list printed too little: {text}");
    progs
}

/// Whether `prog` is on PATH and owned by a Debian package of priority "required"
/// (coreutils, sed, grep, util-linux, ...), which every Debian system has.
fn from_required_package(prog: &str) -> bool {
    let Ok(out) = Command::new("sh").args(["-c", "command -v \"$1\"", "sh", prog]).output() else { return false };
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !path.starts_with('/') {
        return false; // a shell builtin is not a program; not installed is not "required"
    }
    // Merged /usr: dpkg may know the file under /bin or /usr/bin, or only by its target.
    let mut paths = vec![path.clone()];
    if let Ok(real) = std::fs::canonicalize(&path) {
        paths.push(real.display().to_string());
    }
    let mut candidates = Vec::new();
    for p in paths {
        candidates.push(p.strip_prefix("/usr").map_or_else(|| format!("/usr{p}"), String::from));
        candidates.push(p);
    }
    candidates.iter().any(|p| {
        let Ok(out) = Command::new("dpkg").args(["-S", p]).output() else { return false };
        let owner = String::from_utf8_lossy(&out.stdout);
        let Some(pkg) = owner.lines().find(|l| !l.starts_with("diversion")).and_then(|l| l.split(':').next()) else { return false };
        let Ok(out) = Command::new("dpkg-query").args(["-W", "-f", "${Priority} ${Essential}", pkg]).output() else { return false };
        let info = String::from_utf8_lossy(&out.stdout);
        out.status.success() && (info.starts_with("required") || info.ends_with("yes"))
    })
}

fn scan_rust(text: &str, file: &str, found: &mut Found) {
    let code: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
    let text = code.as_str();
    for lit in literals_after(text, "Command::new(") {
        add(found, &lit, file);
    }
    for call in ["sh(&format!(", "sh(\""] {
        for lit in literals_after(text, call) {
            scan_shell(&lit, file, found);
        }
    }
}

fn scan_python(text: &str, file: &str, found: &mut Found) {
    for lit in literals_after(text, "([") {
        add(found, &lit, file);
    }
    for lit in literals_after(text, "which(") {
        add(found, &lit, file);
    }
    for call in ["sh(f", "sh("] {
        for lit in literals_after(text, call) {
            scan_shell(&lit, file, found);
        }
    }
}

/// The string literal right after each occurrence of `prefix` (an optional `f` or `&`
/// prefix and whitespace allowed), unescaped just enough for scanning.
fn literals_after(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let glued = rest[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
        rest = &rest[i + prefix.len()..];
        if glued && prefix.starts_with(|c: char| c.is_alphanumeric()) {
            continue; // `scan_shell(` is not `sh(`
        }
        let s = rest.trim_start();
        let Some(body) = s.strip_prefix('"') else { continue };
        let mut lit = String::new();
        let mut chars = body.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        lit.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => lit.push(c),
            }
        }
        out.push(lit);
    }
    out
}

const SHELL_WORDS: &[&str] = &[
    "if", "then", "else", "elif", "fi", "for", "while", "until", "do", "done", "case", "esac", "in", "function",
    "time", "!", "{", "}", "[[", "]]", "[", "test", "echo", "printf", "cd", "local", "export", "set", "trap", "read",
    "shift", "return", "exit", "exec", "eval", "source", ".", ":", "true", "false", "wait", "kill", "declare", "readonly",
    "unset", "mapfile", "compgen", "type", "command", "builtin", "let", "getopts", "umask", "ulimit", "break", "continue",
    "env", "sudo", "$SUDO", "timeout", "nice", "setsid", "pushd", "popd", "hash", "shopt", "jobs", "disown", "pwd",
    "_Q_",
];

/// Command-position words of shell text: the first word of every command, after
/// assignments and wrappers (`exec`, `env`, `sudo`, `timeout N`, `ip netns exec NS`).
fn scan_shell(text: &str, file: &str, found: &mut Found) {
    let clean = shell_code(text);
    let functions: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.trim().split_once("()").map(|(name, _)| name.trim()))
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .map(String::from)
        .collect();
    for line in clean.lines() {
        let mut words = line.split_whitespace().peekable();
        // A case pattern (`a|b)`) was split at its `|`s; its last piece ends in ')'.
        while let Some(w) = words.next() {
            if w.contains('=') && !w.starts_with('=') || w.starts_with('-') || w.chars().all(|c| c.is_ascii_digit()) {
                continue; // assignment, option or number (env A=1, timeout 10, ...)
            }
            if w.len() > 2 && w.starts_with('{') && w.ends_with('}') {
                continue; // a format placeholder such as `{ns}` holding a wrapper
            }
            if matches!(w, "then" | "do" | "else" | "elif" | "if" | "while" | "until" | "!" | "{" | "exec" | "env" | "sudo" | "$SUDO" | "timeout" | "nice" | "setsid" | "command" | "time") {
                continue;
            }
            if w == "ip" && words.peek() == Some(&"netns") {
                let mut ahead = words.clone();
                ahead.next();
                if ahead.next() == Some("exec") {
                    add(found, "ip", file);
                    ahead.next(); // the namespace
                    words = ahead;
                    continue;
                }
            }
            if !SHELL_WORDS.contains(&w) && !functions.contains(w) {
                add(found, w, file);
            }
            break;
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Code; the count is the open `(` not yet closed in this frame.
    Code(u32),
    Single,
    Double,
    /// `NAME=( ... )`: data, skipped.
    Array(u32),
}

/// The code of shell text, one simple command per line: comments, quoted strings
/// (replaced by `_Q_`), array literals, case patterns and here-document bodies are
/// removed; `$( ... )` inside double quotes is kept as code.
fn shell_code(text: &str) -> String {
    let mut out = String::new();
    let mut stack = vec![Mode::Code(0)];
    let mut heredoc: Option<String> = None;
    // Where the current line of the text begins in `out` (case patterns start there).
    let mut line_start = 0;
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let prev = if i == 0 { '\n' } else { chars[i - 1] };
        let mode = *stack.last().unwrap();
        i += 1;
        match mode {
            Mode::Code(depth) => match c {
                '\n' => {
                    out.push('\n');
                    line_start = out.len();
                    if let Some(tag) = heredoc.take() {
                        // Skip the body up to the line that is just the tag.
                        while i < chars.len() {
                            let end = chars[i..].iter().position(|&c| c == '\n').map_or(chars.len(), |p| i + p);
                            let line: String = chars[i..end].iter().collect();
                            i = end + 1;
                            if line.trim() == tag {
                                break;
                            }
                        }
                    }
                }
                '#' if prev.is_whitespace() || prev == ';' => {
                    while i < chars.len() && chars[i] != '\n' {
                        i += 1;
                    }
                }
                '\\' => i += 1,
                '\'' => stack.push(Mode::Single),
                '"' => stack.push(Mode::Double),
                '<' if next == Some('<') && chars.get(i + 1) != Some(&'<') => {
                    let rest: String = chars[i + 1..].iter().take_while(|&&c| c != '\n').collect();
                    let tag: String = rest
                        .trim_start_matches('-')
                        .trim_start()
                        .trim_start_matches(['\'', '"'])
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !tag.is_empty() {
                        heredoc = Some(tag);
                    }
                    out.push(' ');
                    i += 1;
                }
                '=' if next == Some('(') => {
                    // NAME=( ... ) or NAME+=( ... ): drop NAME too.
                    let word_start = out.rfind(|c: char| c.is_whitespace()).map_or(0, |p| p + 1);
                    out.truncate(word_start);
                    i += 1;
                    stack.push(Mode::Array(1));
                }
                '(' if next == Some('(') => {
                    i += 1;
                    stack.push(Mode::Array(2)); // (( arithmetic ))
                }
                '$' if next == Some('(') && chars.get(i + 1) == Some(&'(') => {
                    i += 2;
                    stack.push(Mode::Array(2)); // $(( arithmetic ))
                }
                '$' if next == Some('(') => {
                    i += 1;
                    out.push('\n');
                    stack.push(Mode::Code(0));
                }
                '(' => {
                    *stack.last_mut().unwrap() = Mode::Code(depth + 1);
                    out.push('\n');
                }
                ')' if depth > 0 => {
                    *stack.last_mut().unwrap() = Mode::Code(depth - 1);
                    out.push('\n');
                }
                ')' if stack.len() > 1 => {
                    stack.pop();
                    out.push('\n');
                }
                ')' => {
                    // A case pattern: drop the pattern written on this line so far.
                    out.truncate(line_start.min(out.len()));
                    out.push('\n');
                }
                '|' | ';' | '&' | '`' => out.push('\n'),
                c => out.push(c),
            },
            Mode::Single => {
                if c == '\'' {
                    stack.pop();
                    out.push_str("_Q_");
                }
            }
            Mode::Double => match c {
                '\\' => i += 1,
                '"' => {
                    stack.pop();
                    out.push_str("_Q_");
                }
                '$' if next == Some('(') && chars.get(i + 1) == Some(&'(') => {
                    i += 2;
                    stack.push(Mode::Array(2)); // "$(( arithmetic ))"
                }
                '$' if next == Some('(') => {
                    i += 1;
                    out.push('\n');
                    stack.push(Mode::Code(0));
                }
                _ => {}
            },
            Mode::Array(depth) => match c {
                '\\' => i += 1,
                '\'' => {
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                }
                '"' => {
                    while i < chars.len() && chars[i] != '"' {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                '(' => *stack.last_mut().unwrap() = Mode::Array(depth + 1),
                ')' if depth == 1 => {
                    stack.pop();
                }
                ')' => *stack.last_mut().unwrap() = Mode::Array(depth - 1),
                _ => {}
            },
        }
    }
    out
}

fn add(found: &mut Found, word: &str, file: &str) {
    let w = word.trim();
    let ok = !w.is_empty()
        && !w.starts_with(['$', '/', '.', '~', '-', '{', '<', '>'])
        && !w.contains(['/', '$', '{', '}', '"', '\'', '*', '[', ']', '<', '>', '%'])
        && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c));
    if ok {
        found.entry(w.to_string()).or_insert_with(|| file.to_string());
    }
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        // host_deps.rs is this scanner: its examples are not programs it runs.
        if name == "target" || name.to_string_lossy().starts_with('.') || name == "host_deps.rs" {
            continue;
        }
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}
