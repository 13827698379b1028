//! What a process holds, from /proc: resident memory and open descriptors, for tests that bound
//! them and for benchmarks that report them.

use crate::leftovers::live_processes;

/// One look at a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Resident memory (VmRSS), KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
}

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} MB, {} fds",
            self.rss_kib as f64 / 1024.0,
            self.fds
        )
    }
}

/// `None` once the process is gone.
pub fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(Usage { rss_kib, fds })
}

/// The first process named `comm` among `root`'s descendants.
pub fn descendant(root: u32, comm: &str) -> Option<u32> {
    let processes = live_processes();
    let parent_of = |pid: i32| processes.iter().find(|p| p.pid == pid).map(|p| p.ppid);
    processes
        .iter()
        .filter(|p| p.comm == comm)
        .find(|p| {
            let mut pid = p.ppid;
            while pid > 1 {
                if pid == root as i32 {
                    return true;
                }
                pid = parent_of(pid).unwrap_or(0);
            }
            false
        })
        .map(|p| p.pid as u32)
}
