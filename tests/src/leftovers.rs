//! The "nothing left behind" check: tagged processes, orphaned agents, FUSE mounts, fixture
//! namespaces and mirrord temp files. Whatever it finds it also removes, so one failing test
//! cannot leak into the machine or into the next test; it must never touch anything outside
//! the world or not started by this run.

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{FixtureError, PREFIX, Result, netns};

/// Environment variable tagging every process started for one test (see
/// [`Scene`](crate::process::Scene)); the checks find a test's processes by it.
pub const SCENE_MARKER: &str = "MRDT_SCENE";

/// How long a process may take to go away after the test is done with it.
const SETTLE: Duration = Duration::from_secs(3);

/// FUSE mounts present when the world was entered (copied from the machine; not ours).
static FUSE_BASELINE: OnceLock<BTreeSet<String>> = OnceLock::new();

pub(crate) fn remember_world_baseline() -> Result<()> {
    let _ = FUSE_BASELINE.set(fuse_mounts()?);
    Ok(())
}

/// Processes of one scene, orphaned agents, FUSE mounts and the scene's namespaces.
pub fn check_scene(scene_id: &str, namespaces: &[String]) -> Result<()> {
    let tag = format!("{SCENE_MARKER}={scene_id}");
    settle(|| {
        let mut found = Found::default();
        found.processes(
            |p| p.environ.iter().any(|e| e == &tag),
            "process of this test",
        );
        found.orphaned_agents();
        found.fuse()?;
        let present = netns::fixture_namespaces()?;
        found
            .namespaces
            .extend(namespaces.iter().filter(|n| present.contains(n)).cloned());
        Ok(found)
    })
}

/// End of run: nothing of any scene, no fixture netns, no `/tmp/mirrord*`, no FUSE mount.
pub fn check_world() -> Result<()> {
    let our_scenes = format!("{SCENE_MARKER}={}{}-", PREFIX, std::process::id());
    settle(|| {
        let mut found = Found::default();
        found.processes(
            |p| p.environ.iter().any(|e| e.starts_with(&our_scenes)),
            "process of a test",
        );
        found.orphaned_agents();
        found.fuse()?;
        found.namespaces = netns::fixture_namespaces()?;
        found.tmp_files()?;
        Ok(found)
    })
}

/// Polls until clean or [`SETTLE`] passed; then removes what is left and reports it.
fn settle(mut look: impl FnMut() -> Result<Found>) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let found = look()?;
        if found.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let report = found.describe();
            found.remove();
            return Err(FixtureError::LeftBehind(report));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[derive(Default)]
struct Found {
    processes: Vec<(i32, String)>,
    namespaces: Vec<String>,
    fuse: Vec<String>,
    tmp: Vec<String>,
}

pub(crate) struct ProcessInfo {
    pub(crate) pid: i32,
    pub(crate) ppid: i32,
    pub(crate) comm: String,
    cmdline: String,
    environ: Vec<String>,
    mount_ns: Option<std::path::PathBuf>,
}

impl Found {
    fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.namespaces.is_empty()
            && self.fuse.is_empty()
            && self.tmp.is_empty()
    }

    fn processes(&mut self, matches: impl Fn(&ProcessInfo) -> bool, what: &str) {
        for p in live_processes() {
            if p.pid != std::process::id() as i32 && matches(&p) && !self.has(p.pid) {
                self.processes
                    .push((p.pid, format!("{what}: pid {} `{}`", p.pid, p.cmdline)));
            }
        }
    }

    /// A `mirrord-agent` of this world whose parent is neither a running `mirrord` nor this
    /// test binary (hand-started agents) was abandoned by a mirrord that exited. An agent is
    /// its guard (`mirrord-guard`, the process mirrord started) with the serving
    /// `mirrord-agent` as its child: the guard is judged by its parent, its child by the guard.
    fn orphaned_agents(&mut self) {
        let ours = std::process::id() as i32;
        let our_mount_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
        let processes = live_processes();
        for p in &processes {
            let agent = p.comm == "mirrord-agent" || p.comm == "mirrord-guard";
            if !agent || p.mount_ns != our_mount_ns || p.ppid == ours {
                continue;
            }
            let parent_is = |comm: &str| {
                processes
                    .iter()
                    .any(|parent| parent.pid == p.ppid && parent.comm == comm)
            };
            let served_by_its_guard = p.comm == "mirrord-agent" && parent_is("mirrord-guard");
            if !parent_is("mirrord") && !served_by_its_guard && !self.has(p.pid) {
                self.processes.push((
                    p.pid,
                    format!("orphaned agent: pid {} `{}`", p.pid, p.cmdline),
                ));
            }
        }
    }

    fn fuse(&mut self) -> Result<()> {
        let baseline = FUSE_BASELINE.get().cloned().unwrap_or_default();
        self.fuse = fuse_mounts()?.difference(&baseline).cloned().collect();
        Ok(())
    }

    fn tmp_files(&mut self) -> Result<()> {
        let entries = std::fs::read_dir("/tmp").map_err(FixtureError::io("/tmp"))?;
        self.tmp = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("mirrord"))
            .map(|name| format!("/tmp/{name}"))
            .collect();
        Ok(())
    }

    fn has(&self, pid: i32) -> bool {
        self.processes.iter().any(|(p, _)| *p == pid)
    }

    fn describe(&self) -> String {
        let mut lines: Vec<String> = self.processes.iter().map(|(_, d)| d.clone()).collect();
        lines.extend(self.namespaces.iter().map(|n| format!("netns {n}")));
        lines.extend(self.fuse.iter().map(|m| format!("FUSE mount {m}")));
        lines.extend(self.tmp.iter().map(|t| format!("temp file {t}")));
        lines.join("; ")
    }

    fn remove(&self) {
        for (pid, _) in &self.processes {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
        }
        for name in &self.namespaces {
            netns::delete_namespace(name);
        }
        for mount_point in &self.fuse {
            let _ = nix::mount::umount2(mount_point.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        for path in &self.tmp {
            let _ = std::fs::remove_dir_all(path).or_else(|_| std::fs::remove_file(path));
        }
    }
}

/// Mount points whose filesystem type is FUSE, as the world sees them.
fn fuse_mounts() -> Result<BTreeSet<String>> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(FixtureError::io("/proc/self/mounts"))?;
    Ok(mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let mount_point = fields.nth(1)?;
            let fs_type = fields.next()?;
            fs_type.starts_with("fuse").then(|| mount_point.to_owned())
        })
        .collect())
}

/// Every process still running (zombies excluded: they hold nothing and their parent reaps them).
pub(crate) fn live_processes() -> Vec<ProcessInfo> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(process_info)
        .collect()
}

fn process_info(pid: i32) -> Option<ProcessInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain spaces and parentheses; the fields after the last ')' are fixed.
    let (head, tail) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let mut fields = tail.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let ppid = fields.next()?.parse().ok()?;
    let split = |bytes: Vec<u8>| -> Vec<String> {
        bytes
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let environ = split(std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default());
    let cmdline =
        split(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).join(" ");
    Some(ProcessInfo {
        pid,
        ppid,
        comm,
        cmdline,
        environ,
        mount_ns: std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok(),
    })
}
