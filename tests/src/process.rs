//! Running the programs under test: locating the built binaries, running a command with a
//! timeout while capturing its output, and tagging every process a test starts so the leftover
//! check can find it. It must never leave a process running after a timeout.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::{FixtureError, Result, world};

/// Enough for a fixture step (`ip`, `nsenter`); a hung step fails quickly.
pub const SHORT: Duration = Duration::from_secs(10);

/// Environment variable tagging every process started for one test (see [`Scene`]).
pub const SCENE_MARKER: &str = "MRDT_SCENE";

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

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}

/// Collects one pipe in a thread; `done_rx` fires at EOF.
struct Capture {
    bytes: Arc<Mutex<Vec<u8>>>,
    done_rx: mpsc::Receiver<()>,
}

impl Capture {
    fn start(pipe: Option<impl Read + Send + 'static>) -> Capture {
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

    fn wait_until(&self, deadline: Instant) -> bool {
        self.done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    fn text(&self) -> String {
        self.bytes
            .lock()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

/// The `mirrord` binary: `$MIRRORD_BIN`, else next to the test binary's profile directory.
pub fn mirrord_binary() -> Result<PathBuf> {
    binary("mirrord", "MIRRORD_BIN")
}

/// The `mirrord-agent` binary: `$MIRRORD_AGENT_BIN`, else next to the test binary's profile directory.
pub fn agent_binary() -> Result<PathBuf> {
    binary("mirrord-agent", "MIRRORD_AGENT_BIN")
}

fn binary(name: &'static str, env: &'static str) -> Result<PathBuf> {
    let path = match std::env::var_os(env) {
        Some(path) => PathBuf::from(path),
        None => {
            // target/<profile>/deps/e2e-<hash> -> target/<profile>/
            let exe = std::env::current_exe().map_err(FixtureError::io("current_exe"))?;
            exe.parent()
                .and_then(Path::parent)
                .map(|profile| profile.join(name))
                .unwrap_or_else(|| PathBuf::from(name))
        }
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(FixtureError::BinaryMissing {
            name,
            path: path.display().to_string(),
            env,
        })
    }
}

static NEXT_SCENE: AtomicU32 = AtomicU32::new(1);

/// One test's worth of processes and files: everything started through it carries
/// `MRDT_SCENE=<id>`, its temp files live in one directory, and [`Scene::check_nothing_left`]
/// proves all of it is gone.
pub struct Scene {
    id: String,
    temp_dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
}

impl Scene {
    pub fn new(name: &str) -> Result<Scene> {
        world::require()?;
        let id = format!(
            "{}{}-{}-{}",
            world::PREFIX,
            std::process::id(),
            NEXT_SCENE.fetch_add(1, Ordering::Relaxed),
            name
        );
        let temp_dir = std::env::temp_dir().join(&id);
        std::fs::create_dir_all(&temp_dir)
            .map_err(FixtureError::io(temp_dir.display().to_string()))?;
        Ok(Scene {
            id,
            temp_dir,
            namespaces: Mutex::new(Vec::new()),
        })
    }

    /// Unique among all scenes of this run (and of concurrent runs).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A directory for this test's files, removed when the scene ends.
    pub fn temp_dir(&self) -> &Path {
        &self.temp_dir
    }

    /// A command tagged with this scene's marker.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env(SCENE_MARKER, &self.id);
        cmd
    }

    /// `mirrord`, tagged.
    pub fn mirrord(&self) -> Result<Command> {
        Ok(self.command(mirrord_binary()?))
    }

    /// `mirrord-agent`, tagged.
    pub fn agent(&self) -> Result<Command> {
        Ok(self.command(agent_binary()?))
    }

    pub(crate) fn register_namespace(&self, name: &str) {
        if let Ok(mut names) = self.namespaces.lock() {
            names.push(name.to_owned());
        }
    }

    /// Nothing this test started is still there: no tagged process, no orphaned agent, no FUSE
    /// mount, none of its namespaces. Whatever is found is killed/removed and reported.
    pub fn check_nothing_left(&self) -> Result<()> {
        let namespaces = self
            .namespaces
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default();
        crate::leftovers::check_scene(&self.id, &namespaces)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.temp_dir);
    }
}

/// A `mirrord-agent` started by hand (as a user would for `--agent-addr`), killed on drop.
pub struct HandStartedAgent {
    child: Child,
    /// As the agent printed it: `HOST:PORT` or `unix:…`.
    addr: String,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl HandStartedAgent {
    /// Spawns `cmd` (a `mirrord-agent` command with its arguments) and waits for its
    /// `listening on <addr>` line.
    pub fn start(mut cmd: Command, timeout: Duration) -> Result<HandStartedAgent> {
        let program = command_line(&cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|source| FixtureError::Spawn {
                program: program.clone(),
                source,
            })?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = Arc::clone(&stderr);
            thread::spawn(move || {
                let mut all = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                    all.extend_from_slice(&chunk[..n]);
                    if let Ok(mut shared) = sink.lock() {
                        shared.clone_from(&all);
                    }
                }
            });
        }
        let line = child
            .stdout
            .take()
            .map(|stdout| first_line(stdout, timeout));
        let mut agent = HandStartedAgent {
            child,
            addr: String::new(),
            stderr,
        };
        let line = match line {
            Some(Some(line)) => line,
            _ => {
                return Err(FixtureError::NotReady {
                    what: program,
                    timeout,
                    detail: format!("no `listening on` line; stderr: {}", agent.stderr()),
                });
            }
        };
        match line.trim().strip_prefix("listening on ") {
            Some(addr) if !addr.is_empty() => {
                agent.addr = addr.to_owned();
                Ok(agent)
            }
            _ => Err(FixtureError::NotReady {
                what: program,
                timeout,
                detail: format!("unexpected first line {line:?}"),
            }),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the agent to exit by itself; its status, or None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// What the agent logged so far, for failure messages.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for HandStartedAgent {
    fn drop(&mut self) {
        kill_group(&mut self.child);
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
