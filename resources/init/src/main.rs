//! microvm's guest init: PID 1 of the initramfs microvm builds in memory (see
//! vmm/src/guestinit.rs). It mounts the root (a disk or the host's files over virtio-fs),
//! the kernel filesystems, tmpfs and the shares; switches into the root; brings the
//! network up with its own DHCP client; runs the command from the kernel command line (or a
//! shell on the console); reaps orphans; and reports the command's status through
//! microvm's exit device. Static, and needs nothing from the root filesystem.
//!
//! It never panics on purpose: every failure prints one `microvm-init: ...` line and
//! reports its own status (125 init failed, 126 not executable, 127 not found).

mod channel;
mod dhcp;
mod mounts;
mod net;
mod protocol;
mod run;
mod sys;

use protocol::Params;
use sys::{Fail, Result};

const HOSTNAME: &str = "microvm";

fn main() {
    std::panic::set_hook(Box::new(|info| {
        sys::say(format_args!("bug: {info}"));
        run::power_off(sys::STATUS_INIT_FAILED);
    }));
    let status = match boot() {
        Ok(status) => status,
        Err(Fail { msg, status }) => {
            sys::say(msg);
            status
        }
    };
    run::power_off(status)
}

fn boot() -> Result<u8> {
    if std::process::id() != 1 {
        return Err(Fail::new("must run as PID 1: it is the init of microvm's guests"));
    }
    mounts::early()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").map_err(|e| Fail::io("cannot read /proc/cmdline", e))?;
    let params = Params::parse(&cmdline);
    run::set_exit_device(params.exit_device);
    if let Some(e) = params.errors.first() {
        return Err(Fail::new(e.to_string()));
    }
    let root = mounts::mount_root(&params)?;
    mounts::switch_root()?;
    if let Err(e) = sys::sethostname(HOSTNAME) {
        sys::say(format_args!("cannot set the hostname: {e}"));
    }
    let dns = net::up();
    net::write_resolv_conf(&dns, root.writable);
    let mut params = params;
    if params.wait {
        // Snapshots are taken here: the command arrives in the restored VM.
        channel::wait_for_command(&mut params)?;
        if params.renew {
            // Restored onto a network where another VM holds the saved address: microvm's
            // DHCP server has another lease for this MAC.
            let dns = net::renew();
            net::write_resolv_conf(&dns, root.writable);
        }
    }
    run::run(&params)
}
