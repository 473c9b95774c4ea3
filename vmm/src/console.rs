//! Where the guest's serial console (ttyS0: kernel log, and today also the `-- CMD`
//! output) goes, and the post-mortem that prints its last lines when a run ends badly.
//!
//! | mode                          | console goes to                                   |
//! |-------------------------------|---------------------------------------------------|
//! | no command (interactive)      | stdout (+ `--console-log FILE`)                   |
//! | `-- CMD`, no command channel  | stdout, unless `-v` (stderr) / `--console-log`    |
//! | `-- CMD` with command channel | `-v`: stderr; `--console-log`: FILE; else nowhere |
//!
//! In every mode the last `TAIL_BYTES` stay in memory; after a kernel panic, a VM fault or
//! a timeout the last `TAIL_LINES` are printed to stderr, unless the console was already
//! on stderr or on a terminal. The command channel (the command's stdin/stdout/stderr
//! over virtio-console) does not exist yet: until it does, the command's output travels
//! over ttyS0 too, so it stays on stdout by default.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use devices::legacy::{ConsoleOutput, ConsoleTail, ConsoleWriter, TAIL_BYTES};
use thiserror::Error;

use crate::config::VmConfig;

/// How many console lines the post-mortem prints.
pub const TAIL_LINES: usize = 60;

#[derive(Debug, Error)]
pub enum ConsoleError {
    #[error("cannot create --console-log file '{path}'")]
    LogFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The console's destinations for one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsolePlan {
    pub stdout: bool,
    pub stderr: bool,
    pub file: Option<PathBuf>,
}

impl ConsolePlan {
    /// `command_channel`: the guest command's output has its own channel (virtio-console),
    /// so ttyS0 carries only the kernel log and need not be on stdout.
    pub fn new(config: &VmConfig, command_channel: bool) -> Self {
        let file = config.console_log.clone();
        if config.command.is_empty() {
            // Interactive: the console is the user's terminal. -v adds nothing to it.
            return ConsolePlan {
                stdout: true,
                stderr: false,
                file,
            };
        }
        let stdout = !command_channel && !config.verbose && file.is_none();
        ConsolePlan {
            stdout,
            stderr: config.verbose,
            file,
        }
    }

    /// Whether a bad ending should repeat the console's last lines on stderr: not when
    /// they are already there (on stderr, or on the same terminal or file as stderr).
    pub fn post_mortem_wanted(&self) -> bool {
        if self.stderr {
            return false;
        }
        if self.stdout {
            let out = std::io::stdout();
            return !(out.is_terminal() || same_file(out.as_fd(), std::io::stderr().as_fd()));
        }
        true
    }
}

fn same_file(a: std::os::fd::BorrowedFd, b: std::os::fd::BorrowedFd) -> bool {
    matches!((file_id(a), file_id(b)), (Some(x), Some(y)) if x == y)
}

/// (device, inode) of what `fd` refers to.
fn file_id(fd: std::os::fd::BorrowedFd) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: fstat fills the zeroed stat buffer for a descriptor we borrow.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid, writable stat.
    (unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == 0).then_some((st.st_dev, st.st_ino))
}

/// The console sink for the serial device, and the tail the VMM reads after the run.
pub fn open(
    plan: &ConsolePlan,
    panicked: Arc<AtomicBool>,
) -> Result<(ConsoleWriter, Arc<ConsoleTail>), ConsoleError> {
    let mut outputs = Vec::new();
    if plan.stdout {
        outputs.push(ConsoleOutput::new("stdout", Box::new(std::io::stdout())));
    }
    if plan.stderr {
        outputs.push(ConsoleOutput::new("stderr", Box::new(std::io::stderr())));
    }
    if let Some(path) = &plan.file {
        outputs.push(ConsoleOutput::new(path.display().to_string(), log_sink(path)?));
    }
    let tail = Arc::new(ConsoleTail::new(TAIL_BYTES));
    Ok((ConsoleWriter::new(outputs, tail.clone(), panicked), tail))
}

/// The `--console-log` sink. A path naming microvm's own stdout or stderr (`/dev/stdout`,
/// or the file they were redirected to) is written through that descriptor: a second open
/// would truncate the file and write at its own offset, over the command's output.
fn log_sink(path: &Path) -> Result<Box<dyn Write + Send>, ConsoleError> {
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        let named = (meta.dev(), meta.ino());
        if file_id(std::io::stdout().as_fd()) == Some(named) {
            return Ok(Box::new(std::io::stdout()));
        }
        if file_id(std::io::stderr().as_fd()) == Some(named) {
            return Ok(Box::new(std::io::stderr()));
        }
    }
    Ok(Box::new(create_log(path)?))
}

fn create_log(path: &Path) -> Result<File, ConsoleError> {
    File::create(path).map_err(|source| ConsoleError::LogFile {
        path: path.to_path_buf(),
        source,
    })
}

/// Prints the console's last lines to stderr, framed so they can't pass for microvm's own.
pub fn print_post_mortem(tail: &ConsoleTail) {
    let lines = tail.last_lines(TAIL_LINES);
    if lines.is_empty() {
        eprintln!("microvm: the guest console printed nothing");
        return;
    }
    let mut text = format!(
        "microvm: last {} lines of the guest console:\n",
        lines.len()
    );
    for l in &lines {
        text.push_str("  | ");
        text.push_str(l);
        text.push('\n');
    }
    eprint!("{text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(command: bool, verbose: bool, log: Option<&str>) -> VmConfig {
        VmConfig {
            command: if command {
                vec!["true".into()]
            } else {
                Vec::new()
            },
            verbose,
            console_log: log.map(PathBuf::from),
            ..Default::default()
        }
    }

    #[test]
    fn plans() {
        let p = |c, v, l, channel| ConsolePlan::new(&config(c, v, l), channel);
        let plan = |stdout, stderr, file: Option<&str>| ConsolePlan {
            stdout,
            stderr,
            file: file.map(PathBuf::from),
        };
        // Interactive: always stdout; -v changes nothing; a log file is added.
        assert_eq!(p(false, false, None, false), plan(true, false, None));
        assert_eq!(p(false, true, None, true), plan(true, false, None));
        assert_eq!(
            p(false, false, Some("c.log"), false),
            plan(true, false, Some("c.log"))
        );
        // Command, before the command channel: stdout unless -v or --console-log.
        assert_eq!(p(true, false, None, false), plan(true, false, None));
        assert_eq!(p(true, true, None, false), plan(false, true, None));
        assert_eq!(
            p(true, false, Some("c.log"), false),
            plan(false, false, Some("c.log"))
        );
        assert_eq!(
            p(true, true, Some("c.log"), false),
            plan(false, true, Some("c.log"))
        );
        // Command channel: never stdout.
        assert_eq!(p(true, false, None, true), plan(false, false, None));
        assert_eq!(p(true, true, None, true), plan(false, true, None));
    }

    #[test]
    fn post_mortem_only_when_the_console_is_not_on_stderr() {
        assert!(!plan_on_stderr().post_mortem_wanted());
        let hidden = ConsolePlan {
            stdout: false,
            stderr: false,
            file: Some("c.log".into()),
        };
        assert!(hidden.post_mortem_wanted());
    }

    fn plan_on_stderr() -> ConsolePlan {
        ConsolePlan {
            stdout: false,
            stderr: true,
            file: None,
        }
    }

    #[test]
    fn log_file_errors_name_the_path() {
        let plan = ConsolePlan {
            stdout: false,
            stderr: false,
            file: Some("/nonexistent-dir/c.log".into()),
        };
        let err = open(&plan, Arc::default())
            .err()
            .expect("cannot create in a missing directory");
        assert!(err.to_string().contains("/nonexistent-dir/c.log"), "{err}");
    }
}
