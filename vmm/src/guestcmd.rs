//! `-- COMMAND ARGS...` travels to the guest init as `microvm.cmd=<base64>` on the kernel
//! command line: the arguments are shell-quoted into one command line (so the init runs
//! exactly those words with `sh -c`), then base64-encoded so no quoting or spaces reach the
//! kernel's parameter parser.

use base64::Engine;

/// Quotes one word for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The value of `microvm.cmd=` for `args`.
pub fn encode(args: &[String]) -> String {
    let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    base64::engine::general_purpose::STANDARD.encode(line.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("exit 7"), "'exit 7'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn encodes_a_quoted_line() {
        let args = vec!["sh".to_string(), "-c".into(), "exit 7".into()];
        let decoded = base64::engine::general_purpose::STANDARD.decode(encode(&args)).unwrap();
        assert_eq!(decoded, b"sh -c 'exit 7'");
        assert!(!encode(&args).contains(' '));
    }
}
