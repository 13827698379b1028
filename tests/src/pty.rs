//! Driving an interactive program through a real pseudo-terminal, as a user at a terminal
//! would: the program is a session leader with the pty as its controlling terminal, so job
//! control and Ctrl-C behave as they do for a person. It must never leave the session running.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nix::pty::{Winsize, openpty};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{FixtureError, Result};

/// Everything the terminal showed so far, and whether the master reached EOF.
#[derive(Default)]
struct Screen {
    bytes: Vec<u8>,
    closed: bool,
}

pub struct Pty {
    child: Child,
    master: File,
    screen: Arc<(Mutex<Screen>, Condvar)>,
    /// Output before this offset was consumed by earlier `expect` calls.
    cursor: usize,
}

impl Pty {
    /// Spawns `cmd` on a new pty (80x24) as a session leader owning it as controlling terminal.
    pub fn spawn(mut cmd: Command) -> Result<Pty> {
        let size = Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(&size, None).map_err(FixtureError::sys("openpty"))?;
        let slave = |fd: &OwnedFd| -> Result<Stdio> {
            Ok(Stdio::from(
                fd.try_clone().map_err(FixtureError::io("pty slave"))?,
            ))
        };
        cmd.stdin(slave(&pty.slave)?)
            .stdout(slave(&pty.slave)?)
            .stderr(slave(&pty.slave)?);
        // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| FixtureError::Spawn {
            program: crate::command::command_line(&cmd),
            source,
        })?;
        // The parent must hold no slave fd, or the master never sees EOF when the session ends.
        drop(cmd);
        drop(pty.slave);
        let master = File::from(pty.master);
        let mut reader = master.try_clone().map_err(FixtureError::io("pty master"))?;
        let screen = Arc::new((Mutex::new(Screen::default()), Condvar::new()));
        let shared = Arc::clone(&screen);
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            loop {
                // EIO once every slave fd is closed: the session is over.
                let n = reader.read(&mut chunk).unwrap_or(0);
                let (lock, changed) = &*shared;
                if let Ok(mut s) = lock.lock() {
                    if n == 0 {
                        s.closed = true;
                    } else {
                        s.bytes.extend_from_slice(&chunk[..n]);
                    }
                }
                changed.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        Ok(Pty {
            child,
            master,
            screen,
            cursor: 0,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `pattern` appears after what earlier calls consumed; returns the text up to
    /// and including it.
    pub fn expect(&mut self, pattern: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, changed) = &*self.screen;
        let mut screen = lock
            .lock()
            .map_err(|_| FixtureError::Pty("reader panicked".into()))?;
        loop {
            let unseen = &screen.bytes[self.cursor.min(screen.bytes.len())..];
            if let Some(at) = find(unseen, pattern.as_bytes()) {
                let end = at + pattern.len();
                let text = String::from_utf8_lossy(&unseen[..end]).into_owned();
                self.cursor += end;
                return Ok(text);
            }
            let now = Instant::now();
            if screen.closed || now >= deadline {
                return Err(FixtureError::Pty(format!(
                    "expected {pattern:?} within {timeout:?}{}; terminal showed: {:?}",
                    if screen.closed {
                        " (terminal closed)"
                    } else {
                        ""
                    },
                    String::from_utf8_lossy(unseen)
                )));
            }
            screen = changed
                .wait_timeout(screen, deadline - now)
                .map_err(|_| FixtureError::Pty("reader panicked".into()))?
                .0;
        }
    }

    /// Types `bytes` at the terminal (`b"\x03"` is Ctrl-C).
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.master
            .write_all(bytes)
            .and_then(|()| self.master.flush())
            .map_err(FixtureError::io("pty master"))
    }

    /// Everything the terminal showed so far.
    pub fn transcript(&self) -> String {
        let (lock, _) = &*self.screen;
        lock.lock()
            .map(|s| String::from_utf8_lossy(&s.bytes).into_owned())
            .unwrap_or_default()
    }

    /// Waits for the program to exit; returns its exit code (signal N → 128+N).
    pub fn wait(&mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(crate::command::exit_code(status)),
                Ok(None) if Instant::now() >= deadline => {
                    return Err(FixtureError::Pty(format!(
                        "program did not exit within {timeout:?}; terminal showed: {:?}",
                        self.transcript()
                    )));
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(FixtureError::io("pty child")(e)),
            }
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        // Job control moves jobs into their own process groups, so kill the whole session.
        let session = self.child.id() as i32;
        for pid in session_members(session) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Processes whose session id is `session` (field 6 of /proc/<pid>/stat).
fn session_members(session: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let tail = stat.rsplit_once(')')?.1.to_owned();
                    tail.split_whitespace().nth(3)?.parse::<i32>().ok()
                })
                == Some(session)
        })
        .collect()
}
