//! Raw mode for the host terminal while the guest owns the console. The saved settings
//! are restored on drop, and by `restore_now()` on paths that exit the process directly.

use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Holds the terminal in raw mode; restores it when dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Switches stdin to raw mode if it is a terminal; `None` when it is not.
    pub fn enable() -> Option<RawTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it from a valid descriptor.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        *crate::bus::lock(&SAVED) = Some(t);
        let mut raw = t;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so "\n" from the guest still returns the carriage.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: `raw` is a valid termios derived from the current settings.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal(()))
    }
}

/// Restores the saved terminal settings, if any (idempotent).
pub fn restore_now() {
    if let Some(t) = crate::bus::lock(&SAVED).take() {
        // SAFETY: `t` came from tcgetattr on the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore_now();
    }
}

/// True while microvm holds the terminal in raw mode (the Ctrl-A escape is active then).
pub fn is_raw() -> bool {
    crate::bus::lock(&SAVED).is_some()
}
