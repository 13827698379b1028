//! Running one command with a deadline: capturing its output, reporting its exit code as a shell
//! would, and reading a server's first line. It must never leave a process running after a
//! timeout; it knows nothing of scenes, namespaces or the world.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::{FixtureError, Result};

/// Enough for a fixture step (`ip`, `nsenter`); a hung step fails quickly.
pub const SHORT: Duration = Duration::from_secs(10);

/// What a finished command produced.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code; a death by signal N is reported as 128+N, like a shell does.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    /// One readable block for assertion messages.
    pub fn describe(&self) -> String {
        format!(
            "exit {} after {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Exit code as a shell reports it: death by signal N becomes 128+N.
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

/// Program and arguments, for messages.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Running a [`Command`] with a deadline.
pub trait Run {
    /// Runs to completion (stdin from /dev/null), capturing stdout/stderr. On timeout the whole
    /// process group is killed and [`FixtureError::Timeout`] carries the output so far.
    fn run(&mut self, timeout: Duration) -> Result<Output>;
}

impl Run for Command {
    fn run(&mut self, timeout: Duration) -> Result<Output> {
        run(self, timeout)
    }
}

/// See [`Run::run`].
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so a timeout can kill whatever the command started as well.
        .process_group(0)
        .spawn()
        .map_err(|source| FixtureError::Spawn {
            program: command_line(cmd),
            source,
        })?;
    let stdout = Capture::start(child.stdout.take());
    let stderr = Capture::start(child.stderr.take());
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                kill_group(&mut child);
                return Err(FixtureError::io(command_line(cmd))(source));
            }
        }
    };
    // A grandchild still holding the pipes keeps the capture open; that counts as a hang too.
    let finished = status.is_some() && stdout.wait_until(deadline) && stderr.wait_until(deadline);
    match status {
        Some(status) if finished => Ok(Output {
            code: exit_code(status),
            stdout: stdout.text(),
            stderr: stderr.text(),
            elapsed: started.elapsed(),
        }),
        _ => {
            kill_group(&mut child);
            Err(FixtureError::Timeout {
                command: command_line(cmd),
                timeout,
                stdout: stdout.text(),
                stderr: stderr.text(),
            })
        }
    }
}

/// Like [`run`] but a non-zero exit is an error; for fixture plumbing, not for the code under test.
pub fn run_checked(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let output = run(cmd, timeout)?;
    if output.code != 0 {
        return Err(FixtureError::CommandFailed {
            command: command_line(cmd),
            code: output.code,
            stderr: output.stderr,
        });
    }
    Ok(output)
}

/// Kills the whole process group `child` leads (started with `process_group(0)`), then reaps it.
pub(crate) fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}

/// Collects one pipe in a thread, so a caller can read what came so far while the writer runs;
/// `done_rx` fires at EOF.
pub struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    done_rx: mpsc::Receiver<()>,
}

impl Capture {
    pub fn start(pipe: Option<impl Read + Send + 'static>) -> Capture {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = mpsc::channel();
        if let Some(mut pipe) = pipe {
            let sink = Arc::clone(&bytes);
            thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if let Ok(mut all) = sink.lock() {
                                all.extend_from_slice(&chunk[..n]);
                            }
                        }
                    }
                }
                let _ = done_tx.send(());
            });
        }
        Capture { bytes, done_rx }
    }

    /// Whether the pipe reached EOF by `deadline`.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        self.done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    /// Whether what came so far contains `needle` by `deadline`.
    pub fn contains_by(&self, needle: &str, deadline: Instant) -> bool {
        while !self.text().contains(needle) {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(100));
        }
        true
    }

    /// What came so far.
    pub fn text(&self) -> String {
        self.bytes
            .lock()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

/// The first line of `stdout`, or None on EOF/timeout; keeps draining afterwards so the
/// writer never blocks or dies of SIGPIPE.
pub fn first_line(stdout: ChildStdout, timeout: Duration) -> Option<String> {
    let (line_tx, line_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        if matches!(reader.read_line(&mut line), Ok(1..)) {
            let _ = line_tx.send(line);
        }
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    line_rx.recv_timeout(timeout).ok()
}

/// A server a test started, in its own process group; killed with its group when dropped.
pub struct Background(Child);

impl Background {
    /// Spawns `cmd` in a new process group with stdout piped (and stdin from /dev/null), and
    /// returns it with its first line (its readiness, by convention), or None if none came
    /// within `timeout`.
    pub fn start(mut cmd: Command, timeout: Duration) -> Result<(Background, Option<String>)> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| FixtureError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let stdout = child.stdout.take();
        let server = Background(child);
        Ok((server, stdout.and_then(|out| first_line(out, timeout))))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.0.wait();
    }
}
