//! A test world for guest networking: a "host" namespace where microvm runs, wired by a
//! veth to an "internet" namespace running a small HTTP server, and helpers to start
//! guests inside it. Everything is deleted on drop (namespaces, server, scratch files).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{wire_internet, Netns, TempDir, INTERNET_ADDR};
use crate::{guest_with_own_rootfs, microvm_bin, scratch_dir, Run};

pub struct World {
    pub host: Netns,
    pub inet: Netns,
    pub run_dir: TempDir,
    www: TempDir,
    httpd: Option<Child>,
}

impl World {
    /// host + internet namespaces; an HTTP server on INTERNET_ADDR:80 serving `/hello.txt`
    /// ("hello-internet") and `/cgi-bin/who` (prints the client address it sees).
    pub fn new() -> World {
        crate::netns::outer();
        let host = Netns::new("host");
        let inet = Netns::new("inet");
        wire_internet(&host, &inet);
        let www = TempDir::new();
        std::fs::create_dir_all(www.path.join("cgi-bin")).unwrap();
        std::fs::write(www.path.join("hello.txt"), "hello-internet\n").unwrap();
        let cgi = www.path.join("cgi-bin/who");
        std::fs::write(&cgi, "#!/bin/sh\necho Content-Type: text/plain\necho\necho REMOTE=$REMOTE_ADDR\n").unwrap();
        crate::netns::sh(&format!("chmod 755 {}", cgi.display()));
        let httpd = Command::new("ip")
            .args(["netns", "exec", &inet.name, "busybox", "httpd", "-f", "-p"])
            .arg(format!("{INTERNET_ADDR}:80"))
            .arg("-h")
            .arg(&www.path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start busybox httpd");
        World { host, inet, run_dir: TempDir::new(), www, httpd: Some(httpd) }
    }

    /// Starts microvm in the host namespace with the test guest, `nets` and the guest
    /// command `script`. Each guest gets its own copy of the rootfs.
    pub fn spawn_guest(&self, name: &str, nets: &[&str], script: &str) -> Guest {
        let dir = scratch_dir(&format!("net-{name}"));
        let (kernel, root) = guest_with_own_rootfs(&dir);
        let mut args: Vec<String> = vec![
            "--kernel".into(), kernel.display().to_string(),
            "--disk".into(), root.display().to_string(),
            "--cmdline".into(), "quiet".into(),
            // The console (the init's READY line) and the command's output (the command
            // channel) in one stream, as the network tests read them.
            "--console-log".into(), "/dev/stdout".into(),
        ];
        for n in nets {
            args.push("--net".into());
            args.push(n.to_string());
        }
        let script = format!("{}{}{script}", crate::SH_CHECK, crate::SH_AGAIN_COMMANDS);
        args.extend(["--".into(), "sh".into(), "-c".into(), script]);
        self.spawn(name, &args, dir)
    }

    /// Starts microvm with raw `args` in the host namespace.
    pub fn spawn(&self, name: &str, args: &[String], dir: PathBuf) -> Guest {
        self.spawn_env(name, args, dir, &[])
    }

    /// Like `spawn`, with extra environment variables for microvm.
    pub fn spawn_env(&self, name: &str, args: &[String], dir: PathBuf, envs: &[(&str, &str)]) -> Guest {
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host.name])
            .arg(microvm_bin())
            .args(args)
            .env("MICROVM_RUN_DIR", &self.run_dir.path)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn microvm");
        Guest { name: name.to_string(), child, dir, stdout, stderr, start: Instant::now() }
    }

    /// Runs microvm with `args` in the host namespace and waits for it.
    pub fn run(&self, name: &str, args: &[String], timeout: Duration) -> Run {
        self.spawn(name, args, scratch_dir(name)).wait(timeout)
    }

    /// microvm's links (bridges, TAPs) and nftables table left in the host namespace.
    pub fn leftovers(&self) -> Vec<String> {
        let mut left: Vec<String> = self
            .host
            .sh("ip -o link show")
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("mvbr-") || n.starts_with("mvtap-"))
            .collect();
        if self.host.try_sh("nft list table ip microvm") {
            left.push("nft table ip microvm".into());
        }
        // The bridge table may stay (empty); no TAP's anti-spoofing guard may.
        let bridge_table = self.host.try_sh("nft list table bridge microvm").then(|| self.host.sh("nft list table bridge microvm"));
        // A guard is set elements keyed by the TAP's name (`"TAP" : jump …`, `"TAP" . MAC`);
        // the table's other quoted strings are rule comments, which have blanks.
        let mut guarded: Vec<&str> =
            bridge_table.iter().flat_map(|t| t.split('"').skip(1).step_by(2)).filter(|name| !name.contains(' ')).collect();
        guarded.sort_unstable();
        guarded.dedup();
        left.extend(guarded.into_iter().map(|tap| format!("nft guard {tap}")));
        left
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut h) = self.httpd.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        let _ = &self.www;
    }
}

pub struct Guest {
    pub name: String,
    pub child: Child,
    pub dir: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    start: Instant,
}

impl Guest {
    pub fn stdout_now(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr_now(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until the guest's init prints MICROVM-INIT-READY (true) or microvm exits or
    /// `timeout` passes (false). Tests start guests in waves with this: on hosts where the
    /// guest kernel is emulated, a guest starved of CPU spends its share in the timer tick
    /// and makes no progress, so more than ~2 booting guests per 2 cores never boot.
    pub fn wait_ready(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.stdout_now().contains("MICROVM-INIT-READY") {
                return true;
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }

    /// Waits for exit (SIGKILL after `timeout` from now) and collects the output.
    pub fn wait(mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s.code(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                _ => {
                    let _ = self.child.kill();
                    break self.child.wait().ok().and_then(|s| s.code());
                }
            }
        };
        let run = Run {
            status,
            stdout: self.stdout_now(),
            stderr: self.stderr_now(),
            elapsed: self.start.elapsed(),
        };
        let _ = std::fs::remove_dir_all(&self.dir);
        run
    }
}

/// A guest is never left running, also when its test panics.
impl Drop for Guest {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
