//! Container lookup: turns a Kubernetes container ID (`containerd://HEX`, `mrdc://HEX`, …) into
//! the PID of that container's init process, and must never pick a process outside that
//! container (a runtime shim, a `conmon` monitor, another container whose ID merely starts
//! with the same digits).
//!
//! Every runtime puts a container's processes in a cgroup whose path carries the container's
//! full ID, so scanning `/proc/*/cgroup` finds them without talking to a runtime socket (whose
//! location differs between distributions and is the most common failure of agents that do).
//! [`ContainerId::parse`] and [`ContainerId::matches_cgroup`] are the pure core; [`find_pid`]
//! reads `/proc`.

use std::fmt;
use std::io;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error(
        "container ID {0:?} is not RUNTIME://HEX (e.g. containerd://…, cri-o://…, docker://…, mrdc://…)"
    )]
    BadId(String),
    #[error(
        "no process of container {0} found in /proc (is the agent running with hostPID, or in the target's pod?)"
    )]
    NotFound(String),
    #[error("cannot list /proc: {0}")]
    ListProc(#[source] io::Error),
}

/// A container ID as `status.containerStatuses[].containerID` gives it: the runtime's name and
/// the hexadecimal ID, validated so it can only ever match as a whole cgroup path component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerId {
    runtime: String,
    hex: String,
}

/// Prefixes that systemd-managed runtimes put before the ID in a `.scope` unit name. A
/// monitor's scope (`crio-conmon-HEX.scope`) has a different prefix and so never matches.
const SCOPE_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-", "docker-", "libpod-"];

impl ContainerId {
    pub fn parse(id: &str) -> Result<Self, ContainerError> {
        let bad = || ContainerError::BadId(id.to_owned());
        let (runtime, hex) = id.split_once("://").ok_or_else(bad)?;
        let runtime_ok = !runtime.is_empty()
            && runtime
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        // Runtimes print full IDs (64 digits); demanding at least 12 keeps an abbreviated ID
        // from matching several containers.
        let hex_ok = hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        if !runtime_ok || !hex_ok {
            return Err(bad());
        }
        Ok(ContainerId {
            runtime: runtime.to_owned(),
            hex: hex.to_ascii_lowercase(),
        })
    }

    /// Whether `/proc/PID/cgroup` content puts the process in this container: one of its
    /// lines (cgroup v2's `0::PATH` or a v1 hierarchy's `N:CONTROLLERS:PATH`) has a path
    /// component that is the ID itself (cgroupfs driver: `/kubepods/burstable/pod<uid>/HEX`,
    /// the test cluster's `/mrdc-cluster/pods/pod<uid>/HEX`) or a runtime's scope unit for it
    /// (systemd driver: `cri-containerd-HEX.scope`, `crio-HEX.scope`, `docker-HEX.scope`).
    pub fn matches_cgroup(&self, cgroup_file: &str) -> bool {
        cgroup_file
            .lines()
            .filter_map(|line| line.splitn(3, ':').nth(2))
            .flat_map(|path| path.split('/'))
            .any(|component| self.is_component(component))
    }

    fn is_component(&self, component: &str) -> bool {
        if component == self.hex {
            return true;
        }
        let Some(unit) = component.strip_suffix(".scope") else {
            return false;
        };
        SCOPE_PREFIXES
            .iter()
            .any(|prefix| unit.strip_prefix(prefix) == Some(self.hex.as_str()))
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.runtime, self.hex)
    }
}

/// What the scan needs to know of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcStat {
    /// Clock ticks after boot at which the process started.
    start_time: u64,
    kernel_thread: bool,
}

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat` (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

/// Parses `/proc/PID/stat`. The command name (field 2) is in parentheses and may itself hold
/// spaces and parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so field N is at index N - 3.
    let flags: u64 = fields.get(9 - 3)?.parse().ok()?;
    let start_time: u64 = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat {
        start_time,
        kernel_thread: flags & PF_KTHREAD != 0,
    })
}

/// The container's init process among the matching ones: the one that started first (a PID
/// can wrap around, a start time cannot), the lower PID on a tie.
fn pick_init(candidates: impl IntoIterator<Item = (u32, ProcStat)>) -> Option<u32> {
    candidates
        .into_iter()
        .filter(|(_, stat)| !stat.kernel_thread)
        .min_by_key(|(pid, stat)| (stat.start_time, *pid))
        .map(|(pid, _)| pid)
}

/// Finds the PID of the container's init process by scanning `proc` (normally `/proc`; the
/// agent must see the node's PID namespace, i.e. run with `hostPID`). Processes that exit
/// during the scan are skipped.
pub fn find_pid(proc: &Path, id: &ContainerId) -> Result<u32, ContainerError> {
    let entries = std::fs::read_dir(proc).map_err(ContainerError::ListProc)?;
    let candidates = entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let dir = proc.join(pid.to_string());
            let cgroup = std::fs::read_to_string(dir.join("cgroup")).ok()?;
            if !id.matches_cgroup(&cgroup) {
                return None;
            }
            let stat = parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
            Some((pid, stat))
        });
    pick_init(candidates).ok_or_else(|| ContainerError::NotFound(id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "3f1c0de5a4b2e6f7091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f70";

    fn id(runtime: &str) -> ContainerId {
        ContainerId::parse(&format!("{runtime}://{HEX}")).unwrap()
    }

    #[test]
    fn ids_of_every_runtime_parse_and_print_back() {
        for runtime in ["containerd", "cri-o", "docker", "mrdc"] {
            let text = format!("{runtime}://{HEX}");
            assert_eq!(ContainerId::parse(&text).unwrap().to_string(), text);
        }
        let upper = format!("docker://{}", HEX.to_ascii_uppercase());
        assert_eq!(
            ContainerId::parse(&upper).unwrap().to_string(),
            format!("docker://{HEX}")
        );
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            HEX,
            "containerd://",
            "://abcdefabcdef",
            "containerd://abc",
            "containerd://../../etc/passwd",
            "containerd://abcdefabcdef/x",
            "con tainerd://abcdefabcdef",
        ] {
            assert!(
                matches!(ContainerId::parse(bad), Err(ContainerError::BadId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn cgroup_path_styles_of_each_runtime_match() {
        let cases = [
            (
                "containerd",
                format!("0::/kubepods/burstable/pod1a2b-3c4d/{HEX}\n"),
            ),
            (
                "containerd",
                format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b_3c4d.slice/cri-containerd-{HEX}.scope\n"
                ),
            ),
            (
                "cri-o",
                format!(
                    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a2b.slice/crio-{HEX}.scope\n"
                ),
            ),
            (
                "docker",
                format!(
                    "12:memory:/kubepods.slice/kubepods-pod1a2b.slice/docker-{HEX}.scope\n0::/\n"
                ),
            ),
            ("docker", format!("4:cpu,cpuacct:/docker/{HEX}\n")),
            // Read from inside a private cgroup namespace (the agent's own container): the
            // path is relative to the reader's cgroup and climbs out of it first.
            (
                "containerd",
                format!("0::/../../kubepods-besteffort-pod1a2b.slice/cri-containerd-{HEX}.scope\n"),
            ),
            (
                "mrdc",
                format!("0::/system.slice/mrdc-cluster/pods/pod0d9e8f7a-1b2c/{HEX}\n"),
            ),
        ];
        for (runtime, cgroup) in cases {
            assert!(id(runtime).matches_cgroup(&cgroup), "{runtime}: {cgroup}");
        }
    }

    #[test]
    fn other_processes_do_not_match() {
        let other = HEX.replace('3', "4");
        let cases = [
            "0::/\n".to_owned(),
            "0::/init.scope\n".to_owned(),
            // The CRI-O monitor lives beside the container, not in it.
            format!("0::/kubepods.slice/kubepods-pod1.slice/crio-conmon-{HEX}.scope\n"),
            // The pod's other container, and an ID that merely starts with ours.
            format!("0::/kubepods/pod1/{other}\n"),
            format!("0::/kubepods/pod1/{HEX}0\n"),
            format!("0::/kubepods/pod1/{}\n", &HEX[..12]),
            format!("0::/kubepods.slice/cri-containerd-{HEX}.scope.d\n"),
        ];
        for cgroup in cases {
            assert!(!id("containerd").matches_cgroup(&cgroup), "{cgroup}");
        }
    }

    #[test]
    fn stat_is_read_past_a_tricky_command_name() {
        // Fields after the name: state ppid pgrp session tty tpgid flags(9) … starttime(22).
        let stat = "42 (we ird) (x)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 777 1000 50 18446744073709551615";
        assert_eq!(
            parse_stat(stat),
            Some(ProcStat {
                start_time: 777,
                kernel_thread: false
            })
        );
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat(kthread).map(|s| s.kernel_thread), Some(true));
        assert_eq!(parse_stat("1 (init) S 0"), None);
    }

    #[test]
    fn init_is_the_oldest_user_process() {
        let stat = |start_time, kernel_thread| ProcStat {
            start_time,
            kernel_thread,
        };
        // PID 7 wrapped around after 300 started: it is younger.
        let found = pick_init([
            (300, stat(10, false)),
            (7, stat(50, false)),
            (2, stat(1, true)),
            (301, stat(10, false)),
        ]);
        assert_eq!(found, Some(300));
        assert_eq!(pick_init([(2, stat(1, true))]), None);
    }

    #[test]
    fn scan_of_the_real_proc_finds_nothing_for_an_unknown_id() {
        // No process runs in a container with this made-up ID, so the scan of the real /proc
        // must come back empty rather than pick some process.
        let fake = id("mrdc");
        assert!(matches!(
            find_pid(Path::new("/proc"), &fake),
            Err(ContainerError::NotFound(_))
        ));
    }
}
