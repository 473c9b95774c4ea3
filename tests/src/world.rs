//! A test world for guest networking: a "host" namespace where microvm runs, wired by a
//! veth to an "internet" namespace running a small HTTP server, and helpers to start
//! guests inside it. Everything is deleted on drop (namespaces, server, scratch files).
//!
//! For networks that span hosts, [`World::hosts`] makes several host namespaces, each with
//! its own uplink into the internet namespace (host `i` is `198.51.100.(2+i)`) and an
//! underlay interface `ul0` (`192.0.2.(11+i)/24`) on a switch (bridge `ulbr`) that also
//! lives in the internet namespace, standing in for the data centre's own network.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{wire_internet, Netns, TempDir, INTERNET_ADDR};
use crate::{guest_with_own_rootfs, microvm_bin, scratch_dir, Run};

pub struct World {
    pub host: Netns,
    /// Hosts 1.. of a [`World::hosts`] world (host 0 is `host`).
    pub others: Vec<Netns>,
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
        Self::serve(host, Vec::new(), inet)
    }

    /// `n` hosts (see the module docs), all reaching the internet namespace's server.
    pub fn hosts(n: usize) -> World {
        crate::netns::outer();
        assert!((1..=8).contains(&n));
        let inet = Netns::new("inet");
        inet.sh(&format!("ip link add inetbr type bridge && ip addr add {INTERNET_ADDR}/24 dev inetbr && ip link set inetbr up"));
        inet.sh("ip link add ulbr type bridge && ip link set ulbr up");
        let hosts: Vec<Netns> = (0..n).map(|i| Netns::new(&format!("h{i}"))).collect();
        for (i, h) in hosts.iter().enumerate() {
            inet.sh(&format!("ip link add down{i} type veth peer name up0 netns {}", h.name));
            inet.sh(&format!("ip link add ul{i} type veth peer name ul0 netns {}", h.name));
            inet.sh(&format!("ip link set down{i} master inetbr up && ip link set ul{i} master ulbr up"));
            h.sh(&format!(
                "ip addr add 198.51.100.{}/24 dev up0 && ip link set up0 up && ip route add default via {INTERNET_ADDR} && \
                 ip addr add 192.0.2.{}/24 dev ul0 && ip link set ul0 up",
                2 + i,
                11 + i
            ));
        }
        let mut hosts = hosts.into_iter();
        let first = hosts.next().expect("one host at least");
        Self::serve(first, hosts.collect(), inet)
    }

    /// Host `i` of the world (0 is `host`).
    pub fn host_ns(&self, i: usize) -> &Netns {
        if i == 0 {
            &self.host
        } else {
            &self.others[i - 1]
        }
    }

    /// Starts the internet namespace's HTTP server.
    fn serve(host: Netns, others: Vec<Netns>, inet: Netns) -> World {
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
        World { host, others, inet, run_dir: TempDir::new(), www, httpd: Some(httpd) }
    }

    /// Starts microvm in the host namespace with the test guest, `nets` and the guest
    /// command `script`. Each guest gets its own copy of the rootfs.
    pub fn spawn_guest(&self, name: &str, nets: &[&str], script: &str) -> Guest {
        let dir = scratch_dir(&format!("net-{name}"));
        let (kernel, root) = guest_with_own_rootfs(&dir);
        self.spawn_guest_disk(0, name, &kernel, &root, dir, nets, script, &[])
    }

    /// Like `spawn_guest`, on host `host` with the root disk `root` (kept by the caller, e.g.
    /// to start the same VM again on another host), scratch dir `dir` and extra environment.
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_guest_disk(
        &self,
        host: usize,
        name: &str,
        kernel: &std::path::Path,
        root: &std::path::Path,
        dir: PathBuf,
        nets: &[&str],
        script: &str,
        envs: &[(&str, &str)],
    ) -> Guest {
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
        self.spawn_on(host, name, &args, dir, envs)
    }

    /// Starts microvm with raw `args` in the host namespace.
    pub fn spawn(&self, name: &str, args: &[String], dir: PathBuf) -> Guest {
        self.spawn_env(name, args, dir, &[])
    }

    /// Like `spawn`, with extra environment variables for microvm.
    pub fn spawn_env(&self, name: &str, args: &[String], dir: PathBuf, envs: &[(&str, &str)]) -> Guest {
        self.spawn_on(0, name, args, dir, envs)
    }

    /// Like `spawn_env`, in host `host`'s namespace.
    pub fn spawn_on(&self, host: usize, name: &str, args: &[String], dir: PathBuf, envs: &[(&str, &str)]) -> Guest {
        let stdout = dir.join("stdout");
        let stderr = dir.join("stderr");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.host_ns(host).name])
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
        self.leftovers_on(0)
    }

    /// microvm's links (bridges, TAPs, VXLAN ports) and nftables table and elements left in
    /// host `i`'s namespace.
    pub fn leftovers_on(&self, i: usize) -> Vec<String> {
        let host = self.host_ns(i);
        let mut left: Vec<String> = host
            .sh("ip -o link show")
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with("mvbr-") || n.starts_with("mvtap-") || n.starts_with("mvvx-"))
            .collect();
        if host.try_sh("nft list table ip microvm") {
            left.push("nft table ip microvm".into());
        }
        // The bridge table may stay (empty); no TAP's anti-spoofing guard, nor an overlay
        // port's elements, may.
        let bridge_table = host.try_sh("nft list table bridge microvm").then(|| host.sh("nft list table bridge microvm"));
        // A guard is set elements keyed by the TAP's name (`"TAP" : jump …`, `"TAP" . MAC`);
        // the table's other quoted strings are rule comments, which have blanks, and the
        // overlay rules' interface pattern `"mvvx-*"`.
        let mut guarded: Vec<&str> = bridge_table
            .iter()
            .flat_map(|t| t.split('"').skip(1).step_by(2))
            .filter(|name| !name.contains(' ') && !name.ends_with('*'))
            .collect();
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
