//! The target process: where its namespaces, root and environment are, and what its UTS
//! namespace calls it; it must never move the agent's own threads into the target's
//! namespaces (only short-lived helper threads enter them).

use std::fs::File;
use std::io;
use std::path::PathBuf;

use nix::sched::CloneFlags;

use crate::error::{Error, io_err};

/// The variable a session token may come in; never lent to a session as part of the context.
pub const TOKEN_VAR: &str = "MIRRORD_AGENT_TOKEN";

/// The process whose context is served; `None` means the agent's own namespaces (a targetless
/// agent, or one already running inside the pod).
#[derive(Debug, Clone)]
pub struct Target {
    pid: Option<u32>,
    namespaces: Namespaces,
}

/// Whose network and UTS namespaces a target's sessions get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespaces {
    /// The target process's, which the agent enters (it runs beside the pod, e.g. on its node).
    Target,
    /// The agent's own: it runs in the target's pod (an ephemeral container), which already
    /// shares them, and may lack the privilege to enter any namespace.
    Own,
}

/// The namespaces the agent enters; each must be openable for [`Target::open`] to succeed.
const NAMESPACES: [&str; 3] = ["net", "uts", "mnt"];

impl Target {
    /// Checks that the process exists and that its namespaces (those it will enter) and root
    /// can be opened, so a later failure is not the first sign of missing privileges.
    pub fn open(pid: Option<u32>, namespaces: Namespaces) -> Result<Self, Error> {
        let Some(pid) = pid else {
            return Ok(Target {
                pid: None,
                namespaces: Namespaces::Own,
            });
        };
        let target = Target {
            pid: Some(pid),
            namespaces,
        };
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        // /proc/0 does not exist, but ask the kernel rather than special-casing it.
        std::fs::metadata(&proc_dir).map_err(|e| target.error("stat", proc_dir.clone(), e))?;
        if namespaces == Namespaces::Target {
            for ns in NAMESPACES {
                let path = proc_dir.join("ns").join(ns);
                File::open(&path).map_err(|e| target.error("open", path, e))?;
            }
        }
        let root = target.root();
        std::fs::read_dir(&root).map_err(|e| target.error("list", root, e))?;
        Ok(target)
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The process whose network and UTS namespaces the agent enters for its sessions; `None`
    /// when its own are the ones served.
    pub fn entered_pid(&self) -> Option<u32> {
        self.pid.filter(|_| self.namespaces == Namespaces::Target)
    }

    /// The target's `/`, as seen from the agent: `/proc/PID/root`, which leads into the target's
    /// mount namespace (see `confine`), or the agent's own `/`.
    pub fn root(&self) -> PathBuf {
        match self.pid {
            Some(pid) => PathBuf::from(format!("/proc/{pid}/root")),
            None => PathBuf::from("/"),
        }
    }

    /// The environment the target was started with. Entries that are not UTF-8, have no `=`
    /// or an empty name are skipped: they can't be carried or set faithfully anyway.
    /// The target's environment; without a target, the agent's own (less its token).
    pub fn env(&self) -> Result<Vec<(String, String)>, Error> {
        let Some(pid) = self.pid else {
            // The agent's own environment, less its session token: it is the agent's secret,
            // not part of the context it lends.
            return Ok(std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| !k.is_empty() && k != TOKEN_VAR)
                .collect());
        };
        let path = PathBuf::from(format!("/proc/{pid}/environ"));
        let raw = std::fs::read(&path).map_err(|e| self.error("read", path, e))?;
        Ok(parse_environ(&raw))
    }

    /// The hostname in the target's UTS namespace.
    pub fn hostname(&self) -> Result<String, Error> {
        let Some(pid) = self.entered_pid() else {
            return own_hostname();
        };
        let path = PathBuf::from(format!("/proc/{pid}/ns/uts"));
        let ns = File::open(&path).map_err(|e| self.error("open", path.clone(), e))?;
        let shown = path.display().to_string();
        // setns(CLONE_NEWUTS) changes only the calling thread, and this thread ends right
        // after gethostname, so no other code of the agent ever runs in the target's UTS
        // namespace. (A multi-threaded process may join a UTS namespace, unlike a mount one.)
        let worker = std::thread::Builder::new()
            .name("uts-probe".into())
            .spawn(move || {
                nix::sched::setns(&ns, CloneFlags::CLONE_NEWUTS).map_err(io::Error::from)?;
                nix::unistd::gethostname().map_err(io::Error::from)
            })
            .map_err(io_err("spawn thread for", &shown))?;
        let name = worker
            .join()
            .map_err(|_| Error::ThreadPanicked(shown.clone()))?
            .map_err(|e| self.error("enter", path, e))?;
        name.into_string().map_err(Error::HostnameNotUtf8)
    }

    /// Maps the errors a /proc access gives into the messages a user can act on.
    fn error(&self, op: &'static str, path: PathBuf, source: io::Error) -> Error {
        let pid = self.pid.unwrap_or(0);
        match source.raw_os_error() {
            // ESRCH: the process exited between two reads; ENOENT also covers a zombie's ns
            // files, which are gone before the pid is.
            Some(libc::ENOENT | libc::ESRCH) => Error::NoSuchProcess(pid),
            Some(libc::EACCES | libc::EPERM) => Error::PermissionDenied(path.display().to_string()),
            _ => Error::Io {
                op,
                path: path.display().to_string(),
                source,
            },
        }
    }
}

fn own_hostname() -> Result<String, Error> {
    let name = nix::unistd::gethostname().map_err(io_err("gethostname", ""))?;
    name.into_string().map_err(Error::HostnameNotUtf8)
}

/// Parses the NUL-separated `NAME=value` list of /proc/PID/environ.
fn parse_environ(raw: &[u8]) -> Vec<(String, String)> {
    raw.split(|b| *b == 0)
        .filter_map(|entry| std::str::from_utf8(entry).ok())
        .filter_map(|entry| entry.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;

    #[test]
    fn environ_parsing_skips_what_cannot_be_carried() {
        let raw = b"A=1\0B=x=y\0\xff\xfe=bad\0NOEQUALS\0=empty\0C=\0\0";
        let parsed = parse_environ(raw);
        let expect = [("A", "1"), ("B", "x=y"), ("C", "")];
        let expect: Vec<_> = expect
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(parsed, expect);
    }

    #[test]
    fn own_context_without_pid() {
        let t = Target::open(None, Namespaces::Target).unwrap();
        assert_eq!(t.pid(), None);
        assert_eq!(t.root(), PathBuf::from("/"));
        assert!(t.env().unwrap().iter().any(|(k, _)| k == "PATH"));
        assert_eq!(t.hostname().unwrap(), own_hostname().unwrap());
    }

    #[test]
    fn missing_process_is_named() {
        // pid_max is at most 2^22, so this pid cannot exist.
        let err = Target::open(Some(u32::MAX), Namespaces::Target)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(&*format!("no process with pid {}", u32::MAX))
        );
    }

    /// The child says "ready" once it runs: `spawn` can return while the kernel is still
    /// loading the new program, when /proc/PID/environ reads as empty.
    #[test]
    fn env_of_another_process() {
        let mut child = Command::new("sh")
            .args(["-c", "echo ready; read line"])
            .env_clear()
            .env("POD_VAR", "from-pod")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready, "ready\n");
        let t = Target::open(Some(child.id()), Namespaces::Target);
        let env = t.and_then(|t| t.env());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            env.unwrap(),
            vec![("POD_VAR".to_owned(), "from-pod".to_owned())]
        );
    }

    /// A thread of this test process in its own UTS namespace stands in for the pod; /proc/TID
    /// describes that one thread. Needs root (CAP_SYS_ADMIN); skipped otherwise.
    #[test]
    fn hostname_comes_from_the_targets_uts_namespace() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let (tid_tx, tid_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let pod = std::thread::spawn(move || {
            let entered = nix::sched::unshare(CloneFlags::CLONE_NEWUTS)
                .and_then(|()| nix::unistd::sethostname("pod-uts-test"))
                .map(|()| nix::unistd::gettid().as_raw() as u32);
            let _ = tid_tx.send(entered);
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap().unwrap();
        let name = Target::open(Some(tid), Namespaces::Target).and_then(|t| t.hostname());
        drop(done_tx);
        pod.join().unwrap();
        assert_eq!(name.unwrap(), "pod-uts-test");
        assert_ne!(own_hostname().unwrap(), "pod-uts-test");
    }
}
