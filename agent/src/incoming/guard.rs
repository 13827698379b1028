//! The guard: the agent's original process, which forks the serving agent before anything else
//! starts and whose one job from then on is to remove the agent's nftables table from the
//! target's network namespace once the serving process is gone — by exit, panic, SIGKILL or the
//! OOM killer. It must never outlive that cleanup, and never be stopped before it by a signal
//! meant for the agent.
//!
//! The serving child holds the write end of a pipe (close-on-exec, so `nft` children never keep
//! it open); the kernel closes it however the child dies, and the guard reads end-of-file. The
//! child writes one byte before it first creates the table ("armed"), so an agent that never
//! redirected anything costs no `nft` run at exit. The guard stays the parent, as upstream's
//! does: the pid a user, the CLI or a container runtime knows is the guard's, so a container
//! does not end (and have its processes killed) before the cleanup, and the guard's exit
//! status is the serving process's. SIGTERM, SIGINT, SIGHUP and SIGQUIT sent to the guard (or
//! to the whole process group) are passed on to the serving process, and the guard cleans up
//! after it.
//!
//! Only a SIGKILL of the guard itself (a whole container killed at once) can leave the table;
//! the serving process dies with it (`PR_SET_PDEATHSIG`), and the next agent's sweep
//! ([`super::Incoming::sweep_stale`]) removes the table, as its name says its owner is dead.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sched::CloneFlags;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, pipe2};

use super::nft;

/// The serving agent's end: dropping it (or dying) sets the guard to work.
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

/// The guard's side, run by the original process instead of serving.
pub struct GuardProcess {
    pipe: File,
    serving: Pid,
    table: String,
    netns: Option<File>,
    nft: std::path::PathBuf,
}

pub enum Forked {
    /// This is the serving agent; keep the guard's end alive for as long as it serves.
    Agent(Guard),
    /// This is the guard: run it and exit with its status.
    Guard(GuardProcess),
}

/// Forks the serving agent, leaving this process as the guard of `table` in the network
/// namespace `netns` (the agent's own if `None`). Must be called while the process has one
/// thread: the child goes on running ordinary Rust code, which after a fork is only sound
/// when no other thread could have held a lock.
pub fn fork_guard(table: String, netns: Option<File>, nft: &nft::Nft) -> io::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(io::Error::other(format!(
            "the guard must be forked before any thread starts ({threads} threads run)"
        )));
    }
    let guard_pid = nix::unistd::getpid();
    let (read_end, write_end): (OwnedFd, OwnedFd) = pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: the process is single-threaded (checked above), so the child's copy of every
    // lock and allocator state is consistent and it may run any code.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => {
            drop(write_end);
            Ok(Forked::Guard(GuardProcess {
                pipe: File::from(read_end),
                serving: child,
                table,
                netns,
                nft: nft.program().to_owned(),
            }))
        }
        ForkResult::Child => {
            drop(read_end);
            // A serving agent without its guard could leave a table nobody removes (and its
            // owner, the guard, would look dead to the next agent's sweep): die with it.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The guard takes these signals and passes them on, whatever this process was
            // started with: an agent started in the background (`&`, nohup) inherits SIGINT
            // and SIGQUIT ignored, and would then ignore what the guard passes on.
            for signal in FORWARDED {
                // SAFETY: restoring the default disposition installs no handler.
                unsafe { nix::sys::signal::signal(signal, SigHandler::SigDfl) }?;
            }
            if nix::unistd::getppid() != guard_pid {
                return Err(io::Error::other("the guard died as the agent started"));
            }
            Ok(Forked::Agent(Guard {
                pipe: File::from(write_end),
                armed: AtomicBool::new(false),
            }))
        }
    }
}

/// The signals the guard passes on to the serving process.
const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// The last signal the guard received and has yet to pass on; 0 for none.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn note_signal(signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    PENDING.store(signal, Ordering::SeqCst);
}

impl GuardProcess {
    /// Waits for the serving agent to end, removes its table if it was armed, and returns the
    /// agent's exit status as a shell reports it (128+N after signal N).
    pub fn run(self) -> io::Result<u8> {
        // Not SA_RESTART: a signal interrupts the read below, which then passes it on.
        let note = SigAction::new(
            SigHandler::Handler(note_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        for signal in FORWARDED {
            // SAFETY: the handler only stores to an atomic.
            unsafe { sigaction(signal, &note) }?;
        }
        let _ = nix::sys::prctl::set_name(c"mirrord-guard");
        // Whoever waits for the agent's stdout to close waits for the serving process only.
        let null = File::options().read(true).write(true).open("/dev/null")?;
        for std_fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
            nix::unistd::dup2(null.as_raw_fd(), std_fd)?;
        }
        if let Some(netns) = &self.netns {
            nix::sched::setns(netns, CloneFlags::CLONE_NEWNET)?;
        }
        let armed = self.wait_for_the_end()?;
        let cleaned = if armed { self.delete_table() } else { Ok(()) };
        let status = loop {
            match waitpid(self.serving, None) {
                Ok(WaitStatus::Exited(_, code)) => break u8::try_from(code).unwrap_or(1),
                Ok(WaitStatus::Signaled(_, signal, _)) => break 128u8.wrapping_add(signal as u8),
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(error) => return Err(error.into()),
            }
        };
        cleaned.map(|()| status)
    }

    /// Reads the pipe until the serving process is gone; whether it armed the guard.
    fn wait_for_the_end(&self) -> io::Result<bool> {
        let mut armed = false;
        let mut byte = [0u8; 1];
        loop {
            match (&self.pipe).read(&mut byte) {
                Ok(0) => return Ok(armed),
                Ok(_) => armed = true,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {
                    let signal = PENDING.swap(0, Ordering::SeqCst);
                    if let Ok(signal) = Signal::try_from(signal) {
                        // Already gone is fine: end of file follows.
                        let _ = nix::sys::signal::kill(self.serving, signal);
                    }
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn delete_table(&self) -> io::Result<()> {
        let mut child = std::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            // An nft that exits before reading (EPIPE) says why in its status and stderr.
            let _ = stdin.write_all(nft::delete(&self.table).as_bytes());
        }
        let output = child.wait_with_output()?;
        if output.status.success() {
            return Ok(());
        }
        match nft::Cause::classify(&String::from_utf8_lossy(&output.stderr)) {
            // Without nftables in the kernel no table can exist: nothing was left (the
            // serving agent already told the user why it could not redirect).
            nft::Cause::NoKernelSupport => Ok(()),
            cause => Err(io::Error::other(format!(
                "nft could not remove table inet {}: {cause}",
                self.table
            ))),
        }
    }
}
