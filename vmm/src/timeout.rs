//! `--timeout DURATION`: a timerfd in the event loop. When it fires, every vCPU prints its
//! registers (so a CI log shows where a hung guest was), then the VM stops through the same
//! ordered path as SIGTERM and microvm exits 124, like `timeout(1)`.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use crate::exit::{ExitReason, ExitSignal};

/// How long the vCPUs get to print their registers before teardown goes on regardless.
const DUMP_LIMIT: Duration = Duration::from_secs(1);

/// Parses `90s`, `10m`, `1h`, `500ms`, or a plain number of seconds (`1.5` allowed).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 0.001,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return None;
    }
    let secs = number.parse::<f64>().ok()? * scale;
    // Zero would never fire; a year is surely a typo.
    (secs > 0.0 && secs <= 365.0 * 86400.0).then(|| Duration::from_secs_f64(secs))
}

/// `Duration` as the user would write it: 90s, 10m, 1h30m0s, 0.5s.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        return format!("{}s", d.as_secs_f64());
    }
    match (secs / 3600, secs % 3600 / 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, s) => format!("{h}h{m}m{s}s"),
    }
}

pub struct Deadline {
    timer: TimerFd,
    after: Duration,
    exit: Arc<ExitSignal>,
    vcpus: Vec<libc::pthread_t>,
}

impl Deadline {
    /// Arms the timer now: the deadline counts from VM creation, not from the first event.
    pub fn start(after: Duration, exit: Arc<ExitSignal>) -> std::io::Result<Self> {
        let mut timer = TimerFd::new()?;
        timer.reset(after, None)?;
        Ok(Deadline {
            timer,
            after,
            exit,
            vcpus: Vec::new(),
        })
    }

    pub fn set_vcpu_threads(&mut self, threads: Vec<libc::pthread_t>) {
        self.vcpus = threads;
    }

    fn expire(&mut self) {
        if self.exit.is_set() {
            return; // the VM is stopping anyway (its vCPU threads may be gone)
        }
        eprintln!(
            "microvm: --timeout {} expired: stopping the VM; vCPU registers:",
            format_duration(self.after)
        );
        crate::debug::dump_and_wait(&self.vcpus, DUMP_LIMIT);
        self.exit.set(ExitReason::Timeout(self.after));
    }
}

impl MutEventSubscriber for Deadline {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN)) {
            // Without the timer the VM could run for ever: stop it now instead.
            eprintln!("microvm: cannot watch the --timeout timer: {e:?}");
            self.exit
                .set(ExitReason::Fault("cannot watch the --timeout timer".into()));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() != self.timer.as_raw_fd() {
            return;
        }
        // Readable means expired: wait() returns the expiration count without blocking.
        let _ = self.timer.wait();
        let _ = ops.remove(events);
        self.expire();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("90s"), Some(Duration::from_secs(90)));
        assert_eq!(d("10m"), Some(Duration::from_secs(600)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("20"), Some(Duration::from_secs(20)));
        assert_eq!(d("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(d("250ms"), Some(Duration::from_millis(250)));
        for bad in [
            "", "s", "0", "0s", "-5", "5x", "5 s", "1.", ".5", "1e3", "1h30m", "400d", "9999999h",
        ] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formatting() {
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
    }
}
