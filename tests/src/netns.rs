//! The fixtures' named network namespaces (`ip netns`): listing those a fixture created, and
//! deleting one with everything running in it. It must never touch a namespace whose name does
//! not start with [`PREFIX`].

use std::process::Command;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::command::{SHORT, run, run_checked};
use crate::{PREFIX, Result};

/// Names of fixture namespaces (`ip netns list` entries starting with [`PREFIX`]).
pub fn fixture_namespaces() -> Result<Vec<String>> {
    let out = run_checked(Command::new("ip").args(["netns", "list"]), SHORT)?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Kills every process in the named netns, then deletes it; best effort, for Drop and cleanup.
pub fn delete_namespace(name: &str) {
    if let Ok(out) = run(Command::new("ip").args(["netns", "pids", name]), SHORT) {
        for pid in out.stdout.split_whitespace().filter_map(|p| p.parse().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let _ = run(Command::new("ip").args(["netns", "del", name]), SHORT);
}
