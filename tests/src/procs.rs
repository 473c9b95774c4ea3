//! The host's processes as /proc shows them: for tests that check what microvm leaves
//! running (virtiofsd daemons, the release process that KVM destroys the VM in).

/// What /proc/PID/stat says of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Its name (`comm`, at most 15 bytes).
    pub comm: String,
    /// R, S, D, Z, ...
    pub state: char,
    pub ppid: u32,
}

/// /proc/PID/stat of `pid`, if it exists.
pub fn stat(pid: u32) -> Option<Stat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let comm = s.get(s.find('(')? + 1..s.rfind(')')?)?.to_owned();
    let mut rest = s.get(s.rfind(')')? + 2..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    Some(Stat { comm, state, ppid: rest.next()?.parse().ok()? })
}

/// Whether `pid` runs (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z')
}

/// Every pid in /proc.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc").unwrap().flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

/// The children of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    all_pids().into_iter().filter(|p| stat(*p).is_some_and(|s| s.ppid == pid)).collect()
}

/// Every descendant of `pid`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut found = children(pid);
    let mut i = 0;
    while i < found.len() {
        let more = children(found[i]);
        found.extend(more);
        i += 1;
    }
    found
}

/// The name microvm gives the process that KVM's destruction of its VM runs in
/// (`vmm::release::PROCESS_NAME`).
pub const RELEASE_PROCESS: &str = "microvm-release";

/// Whether `pid` is a microvm's release process.
pub fn is_release_process(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.comm == RELEASE_PROCESS)
}
