//! The programs under test and one test's worth of them: locating the built binaries, the
//! [`Scene`] that tags every process a test starts so the leftover check can find it, and an
//! agent started by hand. It must never leave a process running when a fixture is dropped.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::command::{command_line, first_line, kill_group};
use crate::leftovers::SCENE_MARKER;
use crate::{FixtureError, PREFIX, Result, world};

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
            PREFIX,
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
