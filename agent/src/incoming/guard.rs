//! The guard: a process forked from the agent before anything else starts, whose one job is to
//! remove the agent's nftables table from the target's network namespace once the agent is
//! gone — by exit, panic, SIGKILL or its pod's deletion. It must never outlive that cleanup,
//! and never be stopped before it by a signal meant for the agent's process group.
//!
//! The agent holds the write end of a pipe (close-on-exec, so `nft` children never keep it
//! open); the kernel closes it however the agent dies, and the guard reads end-of-file. The
//! agent writes one byte before it first creates the table ("armed"), so an agent that never
//! redirected anything costs no `nft` run at exit. The agent is the parent, so whoever starts
//! and kills the agent by its pid kills the serving process, not the guard.
//!
//! Only a SIGKILL of the guard itself (a whole container killed at once) can leave the table;
//! the next agent's sweep ([`super::Incoming::sweep_stale`]) removes it, as its name says its
//! owner is dead.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sched::CloneFlags;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, fork, pipe2};

use super::nft;

/// The agent's end: dropping it (or dying) sets the guard to work.
#[derive(Debug)]
pub struct Guard {
    pipe: File,
    armed: AtomicBool,
}

impl Guard {
    /// Tells the guard a table may exist from now on; call before creating it.
    pub fn arm(&self) -> io::Result<()> {
        if !self.armed.swap(true, Ordering::SeqCst) {
            (&self.pipe).write_all(b"a")?;
        }
        Ok(())
    }
}

/// The guard's side, to be run by the forked child instead of the agent.
pub struct GuardProcess {
    pipe: File,
    table: String,
    netns: Option<File>,
    nft: std::path::PathBuf,
}

pub enum Forked {
    /// This is the agent; keep the guard alive for as long as the agent serves.
    Agent(Guard),
    /// This is the new guard process: run it and exit with its result.
    Guard(GuardProcess),
}

/// Forks the guard for `table` in the network namespace `netns` (the agent's own if `None`).
/// Must be called while the process has one thread: the child goes on running ordinary Rust
/// code, which after a fork is only sound when no other thread could have held a lock.
pub fn fork_guard(table: String, netns: Option<File>, nft: &nft::Nft) -> io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "the guard must be forked before any thread starts ({threads} threads run)"
        )));
    }
    let (read_end, write_end): (OwnedFd, OwnedFd) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the process is single-threaded (checked above), so the child's copy of every
    // lock and allocator state is consistent and it may run any code.
    match unsafe { fork() }? {
        ForkResult::Parent { .. } => {
            drop(read_end);
            Ok(Forked::Agent(Guard {
                pipe: File::from(write_end),
                armed: AtomicBool::new(false),
            }))
        }
        ForkResult::Child => {
            drop(write_end);
            Ok(Forked::Guard(GuardProcess {
                pipe: File::from(read_end),
                table,
                netns,
                nft: nft.program().to_owned(),
            }))
        }
    }
}

impl GuardProcess {
    /// Waits for the agent to end, then removes its table if it was armed.
    pub fn run(mut self) -> io::Result<()> {
        // Its own session: a signal or SIGKILL sent to the agent's process group (a terminal's
        // Ctrl-C, a supervisor killing the group) does not reach the guard. The signals a
        // session leader can still get are ignored: the agent's end is the only cue to act on.
        let _ = nix::unistd::setsid();
        // Told apart from the agent in `ps` and by whoever looks for agent processes.
        let _ = nix::sys::prctl::set_name(c"mirrord-guard");
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
        ] {
            // SAFETY: installing SIG_IGN runs no handler code.
            unsafe { signal(sig, SigHandler::SigIgn) }?;
        }
        // Whoever waits for the agent's stdout to close must not wait for the guard.
        let null = File::options().read(true).write(true).open("/dev/null")?;
        for std_fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
            nix::unistd::dup2(null.as_raw_fd(), std_fd)?;
        }
        if let Some(netns) = &self.netns {
            nix::sched::setns(netns, CloneFlags::CLONE_NEWNET)?;
        }
        let mut armed = false;
        let mut byte = [0u8; 1];
        loop {
            match self.pipe.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => armed = true,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if !armed {
            return Ok(());
        }
        self.delete_table()
    }

    fn delete_table(&self) -> io::Result<()> {
        let mut child = std::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(nft::delete(&self.table).as_bytes())?;
        }
        let status = child.wait()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "nft could not remove table inet {} ({status})",
                self.table
            )))
        }
    }
}
