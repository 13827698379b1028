//! Starts a `mirrord-agent` on this machine for a `pid/` or `targetless` target, with a fresh
//! random token, listening on an abstract Unix socket of a random name (no file to leave
//! behind, and less CPU per byte than loopback TCP), and stops it when the session ends. It
//! never leaves an agent behind: the agent is killed on every exit path, and by the kernel if
//! this process dies.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use mirrord_link::endpoint::Endpoint;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::target::Target;

/// How long the agent may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum LocalAgentError {
    #[error("target {target} not found: no process with pid {pid}")]
    NoSuchProcess { target: Target, pid: u32 },
    #[error(
        "cannot start the agent {path}: {source}; set MIRRORD_AGENT_PATH to the mirrord-agent binary"
    )]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent failed to start: {0}")]
    Failed(String),
    #[error("the agent did not start within {START_TIMEOUT:?}")]
    Timeout,
    #[error("cannot make a session token or socket name: {0}")]
    Token(getrandom::Error),
}

pub struct LocalAgent {
    child: Child,
    pub addr: Endpoint,
    pub token: Vec<u8>,
}

/// `$MIRRORD_AGENT_PATH`, else `mirrord-agent` beside this executable, else from `PATH`.
fn agent_path() -> PathBuf {
    if let Some(path) = std::env::var_os("MIRRORD_AGENT_PATH") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("mirrord-agent")))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("mirrord-agent"))
}

/// `N` random bytes in hex.
fn random_hex<const N: usize>() -> Result<String, LocalAgentError> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(LocalAgentError::Token)?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

impl LocalAgent {
    /// Spawns the agent and waits until it listens. Must be called from the thread that stays
    /// alive for the whole session (the agent gets SIGTERM when that thread exits).
    pub async fn start(target: &Target, idle_ttl: u64) -> Result<LocalAgent, LocalAgentError> {
        let mut args: Vec<OsString> = vec![
            "--listen".into(),
            format!("unix:@mirrord-agent-{}", random_hex::<8>()?).into(),
            "--idle-ttl".into(),
            idle_ttl.to_string().into(),
        ];
        if let Target::Pid(pid) = *target {
            // Checked here too so the common mistake gets its one line without an agent start.
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                return Err(LocalAgentError::NoSuchProcess {
                    target: target.clone(),
                    pid,
                });
            }
            args.extend(["--target-pid".into(), pid.to_string().into()]);
        }
        let token = random_hex::<32>()?.into_bytes();
        let path = agent_path();
        let mut command = Command::new(&path);
        command
            .args(&args)
            .env(
                "MIRRORD_AGENT_TOKEN",
                String::from_utf8_lossy(&token).as_ref(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: Ctrl-C at the terminal is for the command, and mirrord
            // still needs the agent to finish the session cleanly.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|source| LocalAgentError::Spawn { path, source })?;

        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(LocalAgentError::Failed(
                "its output was not captured".into(),
            ));
        };
        let mut stdout = BufReader::new(stdout).lines();
        let mut stderr = BufReader::new(stderr).lines();
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            let mut last_error = None;
            let mut stderr_open = true;
            loop {
                tokio::select! {
                    line = stdout.next_line() => match line {
                        Ok(Some(line)) => if let Some(addr) = line.strip_prefix("listening on ") {
                            return addr.trim().parse::<Endpoint>().map_err(|error| LocalAgentError::Failed(error.to_string()));
                        },
                        // Stdout closed before the address: the agent is exiting.
                        _ => break,
                    },
                    line = stderr.next_line(), if stderr_open => match line {
                        Ok(Some(line)) => last_error = Some(line.trim_start_matches("mirrord-agent: ").to_owned()),
                        _ => stderr_open = false,
                    },
                }
            }
            while stderr_open {
                match stderr.next_line().await {
                    Ok(Some(line)) => last_error = Some(line.trim_start_matches("mirrord-agent: ").to_owned()),
                    _ => stderr_open = false,
                }
            }
            let status = child.wait().await.map(|status| status.to_string()).unwrap_or_default();
            Err(LocalAgentError::Failed(last_error.unwrap_or_else(|| format!("it exited ({status}) without a word"))))
        })
        .await
        .map_err(|_| LocalAgentError::Timeout)??;

        // After startup the agent only logs warnings; show them, marked as the agent's.
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                if crate::output::quiet() {
                    continue;
                }
                eprintln!(
                    "mirrord-agent: {}",
                    line.trim_start_matches("mirrord-agent: ")
                );
            }
        });
        Ok(LocalAgent { child, addr, token })
    }

    /// Stops the agent and reaps it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet so cannot be reused.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
