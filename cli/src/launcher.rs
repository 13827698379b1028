//! Starts the user's command in its own network, mount and UTS namespaces (plus a user namespace
//! when not root) and waits for it, passing its exit status through; it must never change the
//! host's namespaces, mounts or hostname, nor leave the command running once mirrord is gone.
//!
//! The command inherits stdio and the controlling terminal (no new session), so job control,
//! Ctrl-C and terminal programs behave as if mirrord were not there.

use std::ffi::{CStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use nix::fcntl::OFlag;
use tokio::signal::unix::{Signal, SignalKind, signal};

/// Linux's HOST_NAME_MAX: sethostname(2) refuses anything longer.
const HOST_NAME_MAX: usize = 64;

/// What to run and in which context.
#[derive(Debug, Default)]
pub struct Launch {
    pub program: OsString,
    pub args: Vec<OsString>,
    /// The command's whole environment: nothing else is inherited.
    pub env: Vec<(OsString, OsString)>,
    /// Hostname inside the new UTS namespace; empty keeps the current one.
    pub hostname: String,
    /// Descriptors the command inherits under the same number. They stay close-on-exec in
    /// mirrord, so no other child gets them; drop the `Launch` after `spawn` to close them.
    pub inherit_fds: Vec<OwnedFd>,
    /// A FUSE file system to mount in the command's mount namespace before it starts.
    pub fuse: Option<FuseMount>,
    /// The TUN device (with its addresses and routes) to create in the command's network
    /// namespace; the child hands its descriptor back through the plan's socket.
    pub tun: Option<mirrord_tunnel::TunPlan>,
    /// `(generated file, local path)`: files mirrord wrote for this command, each bound over
    /// its local path (which must exist) after the FUSE mount's own binds. The child removes
    /// the generated files once bound, so nothing is left even if mirrord is killed.
    pub files: Vec<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A FUSE connection the child mounts, and paths of it bound over local paths afterwards.
///
/// The mount sends the kernel's INIT on the connection, so the server can only start once the
/// child has mounted; and the bind mounts look paths up in the file system, so they can only
/// happen once it is served. The child therefore reports "mounted", waits for "served", then
/// binds — while mirrord's main thread is still inside `spawn`, a helper thread runs `serve`.
pub struct FuseMount {
    /// The `/dev/fuse` descriptor; the caller keeps it open until `serve` took it.
    pub device: RawFd,
    /// Where the file system is mounted (an existing directory).
    pub target: std::path::PathBuf,
    /// The mount's source name, shown in /proc/mounts.
    pub source: String,
    /// The `fd=…,rootmode=…` options of mount(2).
    pub data: String,
    pub flags: nix::mount::MsFlags,
    /// `(path inside the mount, local path)`: each bound over the local path, which must
    /// exist or be made by one of `rooms`.
    pub binds: Vec<(std::path::PathBuf, std::path::PathBuf)>,
    /// Local paths made for binds whose local path does not exist, made before the binds.
    pub rooms: Vec<Room>,
    /// Starts serving the mounted connection; false when it cannot (the command then fails).
    pub serve: Box<dyn FnOnce() -> bool + Send>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("target", &self.target)
            .field("binds", &self.binds)
            .finish_non_exhaustive()
    }
}

/// Room for overlays whose local paths do not exist, made only in the command's mount
/// namespace: a tmpfs over `dir` (their nearest existing ancestor) holding every original entry
/// of `dir` again — directories and files bound back from the covered original, symlinks
/// recreated — plus the missing paths. The host's `dir` is never written.
#[derive(Debug, Clone, PartialEq)]
pub struct Room {
    /// An existing directory, symlinks resolved; never `/`.
    pub dir: std::path::PathBuf,
    /// Its permission bits, which the tmpfs gets too.
    pub mode: u32,
    /// Its entries as they were when the plan was made.
    pub entries: Vec<(OsString, RoomEntry)>,
    /// Paths to create below `dir`, parents first, with whether each is a directory.
    pub create: Vec<(std::path::PathBuf, bool)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RoomEntry {
    Dir,
    /// Anything bound back onto an empty regular file: files, sockets, devices, FIFOs.
    File,
    Symlink(std::path::PathBuf),
}

/// One setup step done in the child between fork and exec, reported back when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStep {
    ParentDeathSignal = 1,
    UserNamespace,
    Setgroups,
    UidMap,
    GidMap,
    Namespaces,
    PrivateMounts,
    Hostname,
    Loopback,
    InheritFd,
    FuseMount,
    FuseServe,
    BindMount,
    Tunnel,
    MakeRoom,
}

impl SetupStep {
    const ALL: [SetupStep; 15] = [
        SetupStep::ParentDeathSignal,
        SetupStep::UserNamespace,
        SetupStep::Setgroups,
        SetupStep::UidMap,
        SetupStep::GidMap,
        SetupStep::Namespaces,
        SetupStep::PrivateMounts,
        SetupStep::Hostname,
        SetupStep::Loopback,
        SetupStep::InheritFd,
        SetupStep::FuseMount,
        SetupStep::FuseServe,
        SetupStep::BindMount,
        SetupStep::Tunnel,
        SetupStep::MakeRoom,
    ];

    fn from_code(code: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|s| *s as u32 == code)
    }
}

impl std::fmt::Display for SetupStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetupStep::ParentDeathSignal => "setting the parent-death signal (prctl)",
            SetupStep::UserNamespace => "creating a user namespace (unshare CLONE_NEWUSER)",
            SetupStep::Setgroups => "writing /proc/self/setgroups",
            SetupStep::UidMap => "writing /proc/self/uid_map",
            SetupStep::GidMap => "writing /proc/self/gid_map",
            SetupStep::Namespaces => "creating network, mount and UTS namespaces (unshare)",
            SetupStep::PrivateMounts => "making all mounts private (mount --make-rprivate /)",
            SetupStep::Hostname => "setting the hostname",
            SetupStep::Loopback => "bringing up the loopback interface",
            SetupStep::InheritFd => "passing a descriptor to the command",
            SetupStep::FuseMount => "mounting the remote file system (FUSE)",
            SetupStep::FuseServe => "waiting for mirrord to serve the remote file system",
            SetupStep::BindMount => "overlaying a remote path on its local path (bind mount)",
            SetupStep::Tunnel => "creating the network tunnel",
            SetupStep::MakeRoom => {
                "making room for an overlay whose local path does not exist (tmpfs and binds)"
            }
        })
    }
}

/// Errors carry their OS error in the message rather than as a `source`, so that printing the
/// error (even with `{:#}`) gives exactly one line.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{program}: command not found")]
    NotFound { program: String },
    #[error("{program}: cannot execute: {err}")]
    NotExecutable { program: String, err: io::Error },
    #[error(
        "cannot create a user namespace ({step}: {err}): unprivileged user namespaces are \
         disabled on this machine; enable them (as root) with `sysctl -w \
         kernel.unprivileged_userns_clone=1`, `sysctl -w user.max_user_namespaces=15000` or \
         `sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, whichever this system \
         has, or run mirrord as root"
    )]
    UserNamespacesDisabled { step: SetupStep, err: io::Error },
    #[error("cannot set up the command's namespaces: {step} failed: {err}")]
    Setup { step: SetupStep, err: io::Error },
    #[error("{0}")]
    Tunnel(mirrord_tunnel::TunError),
    #[error("invalid hostname {hostname:?}: {reason}")]
    InvalidHostname {
        hostname: String,
        reason: &'static str,
    },
    #[error("cannot start {program}: {err}")]
    Spawn { program: String, err: io::Error },
    #[error("cannot {what}: {err}")]
    Io { what: &'static str, err: io::Error },
}

impl LaunchError {
    /// The exit status mirrord should end with, like env(1) and docker: 127 when the command
    /// does not exist, 126 when it cannot be executed, 125 when mirrord itself failed.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::NotFound { .. } => 127,
            LaunchError::NotExecutable { .. } => 126,
            _ => 125,
        }
    }
}

/// The command's exit code, or 128+N when it died by signal N (as shells report it).
pub fn exit_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        // wait(2) only reports exits and deaths; a stopped status never reaches here.
        (None, None) => 1,
    }
}

/// Everything the child needs between fork and exec, prepared before the fork: the child may
/// only make raw async-signal-safe syscalls on these buffers (no allocation, no locks).
struct ChildPlan {
    /// `(uid_map, gid_map)` contents when a user namespace is needed.
    user_maps: Option<(Vec<u8>, Vec<u8>)>,
    hostname: Option<Vec<u8>>,
    inherit_fds: Vec<RawFd>,
    parent: libc::pid_t,
    report_fd: RawFd,
    /// SIGTTOU's disposition before mirrord ignored it, for the command to start with.
    sigttou: Option<libc::sigaction>,
    fuse: Option<ChildFuse>,
    tun: Option<mirrord_tunnel::TunPlan>,
    /// `(generated file, local path)`, see [`Launch::files`].
    files: Vec<(std::ffi::CString, std::ffi::CString)>,
}

/// [`FuseMount`] as NUL-terminated buffers and raw descriptors, for the child.
struct ChildFuse {
    source: std::ffi::CString,
    target: std::ffi::CString,
    data: std::ffi::CString,
    flags: libc::c_ulong,
    binds: Vec<(std::ffi::CString, std::ffi::CString)>,
    rooms: Vec<ChildRoom>,
    /// child --"mounted"--> mirrord's serving thread.
    mounted_tx: RawFd,
    /// mirrord's serving thread --"served"--> child.
    served_rx: RawFd,
}

const SETGROUPS: &CStr = c"/proc/self/setgroups";
const UID_MAP: &CStr = c"/proc/self/uid_map";
const GID_MAP: &CStr = c"/proc/self/gid_map";
const ROOT: &CStr = c"/";

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Writes `data` to the file at `path` in one write(2), as /proc map files require.
/// Async-signal-safe.
fn write_whole_file(path: &CStr, data: &[u8]) -> Result<(), i32> {
    // SAFETY: raw syscalls on a valid NUL-terminated path and a live buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let written = libc::write(fd, data.as_ptr().cast(), data.len());
        let result = if written < 0 {
            Err(errno())
        } else if written as usize != data.len() {
            Err(libc::EIO)
        } else {
            Ok(())
        };
        libc::close(fd);
        result
    }
}

/// Sets IFF_UP on `lo` of the current network namespace. Async-signal-safe.
fn loopback_up() -> Result<(), i32> {
    // SAFETY: raw syscalls; `req` lives on this stack frame for both ioctls.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(errno());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as libc::c_char;
        }
        let mut result = Ok(());
        if libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            result = Err(errno());
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &req) < 0 {
                result = Err(errno());
            }
        }
        libc::close(sock);
        result
    }
}

impl ChildFuse {
    /// Mounts, hands over to the server, then binds. Async-signal-safe.
    fn mount(&self) -> Result<(), (SetupStep, i32)> {
        // SAFETY: raw syscalls on NUL-terminated buffers prepared before the fork.
        unsafe {
            check(libc::mount(
                self.source.as_ptr(),
                self.target.as_ptr(),
                c"fuse".as_ptr(),
                self.flags,
                self.data.as_ptr().cast(),
            ))
            .map_err(|err| (SetupStep::FuseMount, err))?;
            let byte = [1u8];
            if libc::write(self.mounted_tx, byte.as_ptr().cast(), 1) != 1 {
                return Err((SetupStep::FuseServe, errno()));
            }
            let mut served = [0u8];
            // EOF means mirrord could not serve the file system (or died).
            if libc::read(self.served_rx, served.as_mut_ptr().cast(), 1) != 1 {
                return Err((SetupStep::FuseServe, libc::ENOTCONN));
            }
        }
        for room in &self.rooms {
            room.make().map_err(|err| (SetupStep::MakeRoom, err))?;
        }
        bind_all(&self.binds)
    }
}

/// [`Room`] as NUL-terminated buffers, for the child.
struct ChildRoom {
    dir: std::ffi::CString,
    /// `mode=…` for the tmpfs.
    data: std::ffi::CString,
    /// A descriptor number the parent holds open (on /dev/null) so the child can put its
    /// O_PATH descriptor of the covered `dir` there, under a number known in advance.
    slot: RawFd,
    /// `(source through /proc/self/fd/SLOT, target in the tmpfs, kind)`.
    entries: Vec<(std::ffi::CString, std::ffi::CString, ChildEntry)>,
    create: Vec<(std::ffi::CString, bool)>,
}

enum ChildEntry {
    Dir,
    File,
    Symlink(std::ffi::CString),
}

impl ChildRoom {
    /// Async-signal-safe. The descriptor is opened here, after the mount namespace was
    /// unshared, because bind mounts only take sources of the caller's own namespace.
    fn make(&self) -> Result<(), i32> {
        // SAFETY: raw syscalls on NUL-terminated buffers prepared before the fork.
        unsafe {
            let fd = libc::open(
                self.dir.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            );
            if fd < 0 {
                return Err(errno());
            }
            let moved = libc::dup3(fd, self.slot, libc::O_CLOEXEC);
            libc::close(fd);
            check(moved)?;
            check(libc::mount(
                c"mirrord".as_ptr(),
                self.dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                self.data.as_ptr().cast(),
            ))?;
            for (source, target, kind) in &self.entries {
                match kind {
                    ChildEntry::Symlink(to) => check(libc::symlink(to.as_ptr(), target.as_ptr()))?,
                    ChildEntry::Dir => {
                        check(libc::mkdir(target.as_ptr(), 0o755))?;
                        bind_recursive(source, target)?;
                    }
                    ChildEntry::File => {
                        create_file(target)?;
                        bind_recursive(source, target)?;
                    }
                }
            }
            for (path, is_dir) in &self.create {
                if *is_dir {
                    check(libc::mkdir(path.as_ptr(), 0o755))?;
                } else {
                    create_file(path)?;
                }
            }
        }
        Ok(())
    }
}

/// An empty regular file at `path`, as a bind target. Async-signal-safe.
fn create_file(path: &std::ffi::CStr) -> Result<(), i32> {
    // SAFETY: raw syscalls on a NUL-terminated buffer.
    unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        );
        if fd < 0 {
            return Err(errno());
        }
        libc::close(fd);
    }
    Ok(())
}

/// `mount --rbind source target`: submounts come along. Async-signal-safe.
fn bind_recursive(source: &std::ffi::CStr, target: &std::ffi::CStr) -> Result<(), i32> {
    // SAFETY: raw syscall on NUL-terminated buffers.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })
}

/// The child's side of `room`, with `slot` as its descriptor number.
fn child_room(room: &Room, slot: RawFd) -> Result<ChildRoom, LaunchError> {
    let covered = std::path::PathBuf::from(format!("/proc/self/fd/{slot}"));
    let entries = room
        .entries
        .iter()
        .map(|(name, kind)| {
            let kind = match kind {
                RoomEntry::Dir => ChildEntry::Dir,
                RoomEntry::File => ChildEntry::File,
                RoomEntry::Symlink(to) => ChildEntry::Symlink(c_path(to)?),
            };
            Ok((
                c_path(&covered.join(name))?,
                c_path(&room.dir.join(name))?,
                kind,
            ))
        })
        .collect::<Result<_, LaunchError>>()?;
    let create = room
        .create
        .iter()
        .map(|(path, is_dir)| Ok((c_path(path)?, *is_dir)))
        .collect::<Result<_, LaunchError>>()?;
    Ok(ChildRoom {
        dir: c_path(&room.dir)?,
        data: c_string(
            format!("mode={:04o}", room.mode & 0o7777).as_bytes(),
            "pass the tmpfs options",
        )?,
        slot,
        entries,
        create,
    })
}

/// Bind-mounts each source over its target. Async-signal-safe.
fn bind_all(binds: &[(std::ffi::CString, std::ffi::CString)]) -> Result<(), (SetupStep, i32)> {
    for (source, target) in binds {
        // SAFETY: raw syscall on NUL-terminated buffers prepared before the fork.
        check(unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        })
        .map_err(|err| (SetupStep::BindMount, err))?;
    }
    Ok(())
}

fn c_path(path: &Path) -> Result<std::ffi::CString, LaunchError> {
    c_string(path.as_os_str().as_bytes(), "pass a mount path")
}

fn c_path_pairs(
    pairs: &[(std::path::PathBuf, std::path::PathBuf)],
) -> Result<Vec<(std::ffi::CString, std::ffi::CString)>, LaunchError> {
    pairs
        .iter()
        .map(|(source, target)| Ok((c_path(source)?, c_path(target)?)))
        .collect()
}

fn c_string(text: &[u8], what: &'static str) -> Result<std::ffi::CString, LaunchError> {
    std::ffi::CString::new(text).map_err(|_| LaunchError::Io {
        what,
        err: io::Error::from_raw_os_error(libc::EINVAL),
    })
}

/// Prepares the child's side of `fuse` and starts the thread that serves it once mounted.
fn prepare_fuse(fuse: Option<FuseMount>) -> Result<(Option<ChildFuse>, Vec<OwnedFd>), LaunchError> {
    let Some(fuse) = fuse else {
        return Ok((None, Vec::new()));
    };
    let binds = c_path_pairs(&fuse.binds)?;
    let mut held = Vec::new();
    let mut rooms = Vec::new();
    for room in &fuse.rooms {
        let slot: OwnedFd = File::open("/dev/null")
            .map_err(io_err("reserve a descriptor for an overlay"))?
            .into();
        rooms.push(child_room(room, slot.as_raw_fd())?);
        held.push(slot);
    }
    let (mounted_rx, mounted_tx) = pipe(OFlag::O_CLOEXEC)?;
    let (served_rx, served_tx) = pipe(OFlag::O_CLOEXEC)?;
    let child = ChildFuse {
        source: c_string(fuse.source.as_bytes(), "pass the mount source")?,
        target: c_path(&fuse.target)?,
        data: c_string(fuse.data.as_bytes(), "pass the mount options")?,
        flags: fuse.flags.bits(),
        binds,
        rooms,
        mounted_tx: mounted_tx.as_raw_fd(),
        served_rx: served_rx.as_raw_fd(),
    };
    let serve = fuse.serve;
    std::thread::Builder::new()
        .name("fuse-handover".into())
        .spawn(move || {
            let mut mounted = [0u8];
            // EOF: the child failed before mounting (its error is reported by spawn).
            if File::from(mounted_rx).read_exact(&mut mounted).is_ok() && serve() {
                let _ = File::from(served_tx).write_all(&[1]);
            }
        })
        .map_err(io_err("start the file-system handover thread"))?;
    // Kept open by the caller until `spawn` returns, so the child has them across the fork.
    held.extend([mounted_tx, served_rx]);
    Ok((Some(child), held))
}

fn check(ret: libc::c_int) -> Result<(), i32> {
    if ret < 0 { Err(errno()) } else { Ok(()) }
}

impl ChildPlan {
    /// Runs in the forked child of a multi-threaded process: only async-signal-safe syscalls.
    fn run(&self) -> io::Result<()> {
        let failure = self
            .steps()
            .map_err(|(step, err)| (step as u32, err))
            .and_then(|()| {
                match &self.tun {
                    // The tunnel's own step goes in the upper half of the step code.
                    Some(tun) => tun.create_in_child().map_err(|(tun_step, err)| {
                        (SetupStep::Tunnel as u32 | tun_step.code() << 16, err)
                    }),
                    None => Ok(()),
                }
            });
        match failure {
            Ok(()) => Ok(()),
            Err((code, err)) => {
                let mut record = [0u8; 8];
                record[..4].copy_from_slice(&code.to_ne_bytes());
                record[4..].copy_from_slice(&err.to_ne_bytes());
                // SAFETY: write(2) of a stack buffer; the parent reads the record only if all
                // 8 bytes made it (a pipe write this small is atomic).
                unsafe { libc::write(self.report_fd, record.as_ptr().cast(), record.len()) };
                Err(io::Error::from_raw_os_error(err))
            }
        }
    }

    fn steps(&self) -> Result<(), (SetupStep, i32)> {
        use SetupStep::*;
        let at = |step: SetupStep| move |err: i32| (step, err);
        // A Ctrl-C during the setup is for the command-to-be: the handler mirrord installed
        // before the fork would swallow it here and the command would start anyway. With the
        // default action it ends the child, and mirrord ends with its 130.
        for signal in [libc::SIGINT, libc::SIGQUIT] {
            // SAFETY: signal(2) is async-signal-safe and changes only this process's disposition.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
        if let Some(action) = &self.sigttou {
            // SAFETY: sigaction(2) with an action read from the kernel before the fork.
            unsafe { libc::sigaction(libc::SIGTTOU, action, std::ptr::null_mut()) };
        }
        // Set first so a mirrord killed during setup takes the child along, and again last
        // because credential changes clear it. The signal fires when the *thread* that forked
        // exits, which is why `spawn` must run on a thread that outlives the command.
        self.parent_death_signal().map_err(at(ParentDeathSignal))?;
        if let Some((uid_map, gid_map)) = &self.user_maps {
            // SAFETY: raw syscalls with constant arguments.
            check(unsafe { libc::unshare(libc::CLONE_NEWUSER) }).map_err(at(UserNamespace))?;
            // gid_map may only be written by an unprivileged user once setgroups is denied.
            write_whole_file(SETGROUPS, b"deny").map_err(at(Setgroups))?;
            write_whole_file(UID_MAP, uid_map).map_err(at(UidMap))?;
            write_whole_file(GID_MAP, gid_map).map_err(at(GidMap))?;
        }
        // SAFETY: raw syscall with constant arguments.
        check(unsafe {
            libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS | libc::CLONE_NEWUTS)
        })
        .map_err(at(Namespaces))?;
        // Mounts made later inside the namespace must never propagate to the host.
        // SAFETY: raw syscall on a constant path; null fs type, source and data are allowed.
        check(unsafe {
            libc::mount(
                std::ptr::null(),
                ROOT.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        })
        .map_err(at(PrivateMounts))?;
        if let Some(name) = &self.hostname {
            // SAFETY: the buffer outlives the call and its length is passed.
            check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
                .map_err(at(Hostname))?;
        }
        loopback_up().map_err(at(Loopback))?;
        if let Some(fuse) = &self.fuse {
            fuse.mount()?;
        }
        bind_all(&self.files)?;
        for (generated, _) in &self.files {
            // SAFETY: raw syscall on a NUL-terminated buffer prepared before the fork.
            unsafe { libc::unlink(generated.as_ptr()) };
        }
        for &fd in &self.inherit_fds {
            // SAFETY: fcntl on a descriptor the parent keeps open across the fork.
            check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }).map_err(at(InheritFd))?;
        }
        self.parent_death_signal().map_err(at(ParentDeathSignal))
    }

    fn parent_death_signal(&self) -> Result<(), i32> {
        // SAFETY: raw syscalls with constant arguments.
        unsafe {
            check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
            ))?;
            // mirrord died before the signal was armed: nobody is left to serve the command.
            if libc::getppid() != self.parent {
                libc::_exit(125);
            }
        }
        Ok(())
    }
}

/// Reads the failing step the child reported, if any. The pipe is non-blocking and the child
/// has already been reaped by the failed spawn, so this never waits.
fn read_report(report_rx: &OwnedFd) -> Option<(SetupStep, u32, i32)> {
    let mut record = [0u8; 8];
    // SAFETY: read(2) into a stack buffer of the given length.
    let n = unsafe {
        libc::read(
            report_rx.as_raw_fd(),
            record.as_mut_ptr().cast(),
            record.len(),
        )
    };
    if n != record.len() as isize {
        return None;
    }
    let code = u32::from_ne_bytes([record[0], record[1], record[2], record[3]]);
    let err = i32::from_ne_bytes([record[4], record[5], record[6], record[7]]);
    SetupStep::from_code(code & 0xffff).map(|step| (step, code >> 16, err))
}

/// Turns a failed spawn into the error a user can act on.
fn classify(
    program: &str,
    spawn_err: io::Error,
    report: Option<(SetupStep, u32, i32)>,
) -> LaunchError {
    if let Some((SetupStep::Tunnel, detail, errno)) = report
        && let Some(tun_step) = mirrord_tunnel::TunStep::from_code(detail)
    {
        return LaunchError::Tunnel(mirrord_tunnel::TunError::from_child(tun_step, errno));
    }
    if let Some((step, _, errno)) = report {
        let err = io::Error::from_raw_os_error(errno);
        let userns_refused = match step {
            // ENOSPC: user.max_user_namespaces=0; EPERM: kernel.unprivileged_userns_clone=0 or
            // a seccomp/LSM rule; EINVAL: kernels built without user namespaces.
            SetupStep::UserNamespace => {
                matches!(
                    errno,
                    libc::EPERM | libc::ENOSPC | libc::EINVAL | libc::EUSERS
                )
            }
            // AppArmor's restriction lets unshare succeed but denies the maps.
            SetupStep::Setgroups | SetupStep::UidMap | SetupStep::GidMap => {
                matches!(errno, libc::EPERM | libc::EACCES)
            }
            _ => false,
        };
        return if userns_refused {
            LaunchError::UserNamespacesDisabled { step, err }
        } else {
            LaunchError::Setup { step, err }
        };
    }
    let program = program.to_owned();
    match spawn_err.raw_os_error() {
        Some(libc::ENOENT) => LaunchError::NotFound { program },
        Some(libc::EACCES | libc::ENOEXEC | libc::EISDIR | libc::EPERM) => {
            LaunchError::NotExecutable {
                program,
                err: spawn_err,
            }
        }
        _ => LaunchError::Spawn {
            program,
            err: spawn_err,
        },
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> LaunchError {
    move |err| LaunchError::Io { what, err }
}

fn pipe(flags: OFlag) -> Result<(OwnedFd, OwnedFd), LaunchError> {
    nix::unistd::pipe2(flags).map_err(|e| LaunchError::Io {
        what: "create a pipe",
        err: e.into(),
    })
}

/// Signals mirrord handles while the command runs. Installed before the fork so there is no
/// moment where Ctrl-C kills mirrord instead of reaching the command; a caught signal is reset
/// to its default by execve, so the command itself is unaffected.
struct ForwardedSignals {
    /// Terminal-generated: the terminal also delivers them to the command's process group,
    /// which is the one to react. tokio keeps these handlers for the life of the process.
    interrupt: Signal,
    quit: Signal,
    /// Sent to mirrord alone (kill, a closing terminal's session leader): passed on.
    terminate: Signal,
    hangup: Signal,
}

impl ForwardedSignals {
    fn install() -> Result<Self, LaunchError> {
        let install = |kind| signal(kind).map_err(io_err("install signal handlers"));
        Ok(Self {
            interrupt: install(SignalKind::interrupt())?,
            quit: install(SignalKind::quit())?,
            terminate: install(SignalKind::terminate())?,
            hangup: install(SignalKind::hangup())?,
        })
    }
}

/// Keeps mirrord usable on its terminal after the command: an interactive shell child moves
/// itself to its own foreground process group, and if it dies without handing the terminal
/// back, mirrord (now in the background) would be stopped by SIGTTOU on its next write (with
/// `stty tostop`) or terminal change. While the command runs SIGTTOU is ignored, which also
/// keeps mirrord's own log lines from stopping it; on drop the foreground group and SIGTTOU's
/// previous disposition are restored.
struct TerminalGuard {
    /// The terminal mirrord's process group was in the foreground of at spawn time.
    foreground_tty: Option<RawFd>,
    previous_ttou: Option<libc::sigaction>,
}

impl TerminalGuard {
    /// Called before the fork, so mirrord never writes to a terminal the command has taken;
    /// the child restores `previous_ttou` before exec.
    fn engage() -> Self {
        let foreground_tty = (0..=2).find(|&fd| {
            // SAFETY: plain queries on standard descriptors.
            unsafe { libc::isatty(fd) == 1 && libc::tcgetpgrp(fd) == libc::getpgrp() }
        });
        // SAFETY: sigaction with a zeroed (SIG_IGN-filled) action and a valid out pointer.
        let previous_ttou = unsafe {
            let mut ignore: libc::sigaction = std::mem::zeroed();
            ignore.sa_sigaction = libc::SIG_IGN;
            let mut previous: libc::sigaction = std::mem::zeroed();
            (libc::sigaction(libc::SIGTTOU, &ignore, &mut previous) == 0).then_some(previous)
        };
        Self {
            foreground_tty,
            previous_ttou,
        }
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // SAFETY: terminal and signal syscalls on values obtained in `engage`.
        unsafe {
            if let Some(fd) = self.foreground_tty {
                let ours = libc::getpgrp();
                if libc::tcgetpgrp(fd) != ours && libc::tcsetpgrp(fd, ours) != 0 {
                    tracing::debug!(error = %io::Error::last_os_error(), "cannot take the terminal back");
                }
            }
            if let Some(previous) = &self.previous_ttou {
                libc::sigaction(libc::SIGTTOU, previous, std::ptr::null_mut());
            }
        }
    }
}

/// A running command. Dropping it without `wait` kills the command.
pub struct Launched {
    // Field order is drop order: the child is killed before the terminal is taken back.
    child: tokio::process::Child,
    pid: u32,
    signals: ForwardedSignals,
    _terminal: TerminalGuard,
}

impl Launched {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the command exits within `within` (looked at without reaping it).
    pub async fn exits_within(&self, within: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // SAFETY: waitid(2) on our own child with WNOWAIT: nothing is reaped, the struct is
            // zeroed and ours.
            let exited = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    self.pid,
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                ) == 0
                    && info.si_pid() != 0
            };
            if exited || tokio::time::Instant::now() >= deadline {
                return exited;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Waits for the command to exit and returns its [`exit_code`]. Meanwhile SIGINT and
    /// SIGQUIT are left to the command (the terminal sends them to its process group), the
    /// first SIGTERM and every SIGHUP are forwarded, and a repeated SIGTERM kills the command
    /// (an interactive shell ignores SIGTERM). Stops of the command are not tracked: its
    /// process group (or the interactive shell) handles job control.
    pub async fn wait(mut self) -> Result<i32, LaunchError> {
        let mut terminations = 0u32;
        let status = loop {
            tokio::select! {
                status = self.child.wait() => break status.map_err(io_err("wait for the command"))?,
                Some(()) = self.signals.interrupt.recv() => {}
                Some(()) = self.signals.quit.recv() => {}
                Some(()) = self.signals.terminate.recv() => {
                    terminations += 1;
                    let sig = if terminations == 1 { libc::SIGTERM } else { libc::SIGKILL };
                    self.forward(sig);
                }
                Some(()) = self.signals.hangup.recv() => self.forward(libc::SIGHUP),
            }
        };
        Ok(exit_code(status))
    }

    fn forward(&self, sig: libc::c_int) {
        tracing::debug!(pid = self.pid, sig, "forwarding signal to the command");
        // The child is not reaped before `wait` returns, so the pid cannot have been reused.
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) };
    }
}

/// Starts `launch` in new network + mount + UTS namespaces (and a user namespace when not
/// root) with exactly `launch.env`, stdio and the controlling terminal inherited.
///
/// Must be called inside a Tokio runtime, from a thread that outlives the command: the
/// command gets SIGKILL when the thread that forked it exits (PR_SET_PDEATHSIG follows the
/// thread, not the process), so never call this from `spawn_blocking`. The CLI calls it from
/// the `block_on` future on the main thread.
pub fn spawn(mut launch: Launch) -> Result<Launched, LaunchError> {
    let program = launch.program.to_string_lossy().into_owned();
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(LaunchError::Spawn {
            program,
            err: io::Error::other("the launcher needs a Tokio runtime"),
        });
    }
    let hostname = validate_hostname(&launch.hostname)?;
    // SAFETY: geteuid/getegid cannot fail.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let user_maps = (euid != 0).then(|| {
        (
            format!("{euid} {euid} 1\n").into_bytes(),
            format!("{egid} {egid} 1\n").into_bytes(),
        )
    });
    let (report_rx, report_tx) = pipe(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let (fuse, fuse_fds) = prepare_fuse(launch.fuse.take())?;
    let mut plan = ChildPlan {
        user_maps,
        hostname,
        inherit_fds: launch.inherit_fds.iter().map(AsRawFd::as_raw_fd).collect(),
        parent: std::process::id() as libc::pid_t,
        report_fd: report_tx.as_raw_fd(),
        sigttou: None,
        fuse,
        tun: launch.tun.take(),
        files: c_path_pairs(&launch.files)?,
    };
    let signals = ForwardedSignals::install()?;
    let terminal = TerminalGuard::engage();
    plan.sigttou = terminal.previous_ttou;

    let mut command = tokio::process::Command::new(&launch.program);
    command
        .args(&launch.args)
        .env_clear()
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true);
    // SAFETY: `ChildPlan::run` only makes async-signal-safe syscalls on buffers prepared above.
    unsafe { command.pre_exec(move || plan.run()) };
    let spawned = command.spawn();
    drop(report_tx);
    // The child has exec'd or failed: the handover thread now sees EOF if it never mounted.
    drop(fuse_fds);
    drop(launch);
    let child = spawned.map_err(|err| classify(&program, err, read_report(&report_rx)))?;
    let pid = child.id().ok_or_else(|| LaunchError::Spawn {
        program: program.clone(),
        err: io::Error::other("the command exited before its pid was known"),
    })?;
    tracing::debug!(pid, program, "command started in its own namespaces");
    Ok(Launched {
        child,
        pid,
        signals,
        _terminal: terminal,
    })
}

fn validate_hostname(hostname: &str) -> Result<Option<Vec<u8>>, LaunchError> {
    let invalid = |reason| LaunchError::InvalidHostname {
        hostname: hostname.to_owned(),
        reason,
    };
    if hostname.is_empty() {
        Ok(None)
    } else if hostname.len() > HOST_NAME_MAX {
        Err(invalid("longer than 64 bytes"))
    } else if hostname.contains('\0') {
        Err(invalid("contains a NUL byte"))
    } else {
        Ok(Some(hostname.as_bytes().to_vec()))
    }
}

/// A [`Launch`] for an interactive `shell` whose prompt starts with `(mirrord:LABEL) ` and
/// whose environment has `MIRRORD_TARGET=LABEL` (for users' own prompts).
///
/// bash on a terminal gets `--rcfile /dev/fd/N`, N a pipe holding: source ~/.bashrc, prefix
/// PS1, close N; nothing is written to disk. Other shells (and bash when stdin is not a
/// terminal or extra arguments are given, where no rcfile would be read) get PS1 in their
/// environment, which their rc files may override.
pub fn shell_launch(
    shell: &Path,
    label: &str,
    extra_args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    hostname: String,
) -> Result<Launch, LaunchError> {
    // SAFETY: isatty only queries the descriptor.
    let stdin_tty = unsafe { libc::isatty(0) == 1 };
    build_shell_launch(shell, label, extra_args, env, hostname, stdin_tty)
}

fn build_shell_launch(
    shell: &Path,
    label: &str,
    extra_args: Vec<OsString>,
    mut env: Vec<(OsString, OsString)>,
    hostname: String,
    stdin_tty: bool,
) -> Result<Launch, LaunchError> {
    let name = shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prompt = format!("(mirrord:{}) ", prompt_safe(label));
    set_env(&mut env, "MIRRORD_TARGET", label);
    let mut args = Vec::new();
    let mut inherit_fds = Vec::new();
    if name.starts_with("bash") && stdin_tty && extra_args.is_empty() {
        let (rc_rx, rc_tx) = pipe(OFlag::O_CLOEXEC)?;
        let fd = rc_rx.as_raw_fd();
        File::from(rc_tx)
            .write_all(bash_rcfile(&prompt, fd).as_bytes())
            .map_err(io_err("write the shell's rcfile"))?;
        args.push("--rcfile".into());
        args.push(format!("/dev/fd/{fd}").into());
        inherit_fds.push(rc_rx);
    } else if name.starts_with("zsh") {
        set_env(&mut env, "PS1", &format!("{prompt}%# "));
    } else {
        set_env(&mut env, "PS1", &format!("{prompt}$ "));
    }
    args.extend(extra_args);
    Ok(Launch {
        program: shell.as_os_str().to_owned(),
        args,
        env,
        hostname,
        inherit_fds,
        ..Launch::default()
    })
}

/// Keeps only characters with no meaning to bash/zsh prompt expansion or shell quoting.
fn prompt_safe(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._:/@+=,-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The rcfile: bash reads it whole before running it, so closing its descriptor is safe.
fn bash_rcfile(prompt: &str, fd: RawFd) -> String {
    format!("if [ -f ~/.bashrc ]; then . ~/.bashrc; fi\nPS1='{prompt}'\"$PS1\"\nexec {fd}<&-\n")
}

fn set_env(env: &mut Vec<(OsString, OsString)>, name: &str, value: &str) {
    match env
        .iter_mut()
        .find(|(n, _)| n.as_bytes() == name.as_bytes())
    {
        Some((_, v)) => *v = value.into(),
        None => env.push((name.into(), value.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn exit_code_passes_codes_and_maps_signals() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(255 << 8)), 255);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGSEGV)), 139);
        // Core-dump flag set alongside the signal.
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGSEGV | 0x80)), 139);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[test]
    fn spawn_failures_map_to_env_exit_codes() {
        let not_found = classify("nope", io::Error::from_raw_os_error(libc::ENOENT), None);
        assert!(matches!(not_found, LaunchError::NotFound { .. }));
        assert_eq!(not_found.exit_code(), 127);
        assert_eq!(not_found.to_string(), "nope: command not found");
        for errno in [libc::EACCES, libc::ENOEXEC] {
            let e = classify("./x", io::Error::from_raw_os_error(errno), None);
            assert!(matches!(e, LaunchError::NotExecutable { .. }));
            assert_eq!(e.exit_code(), 126);
            assert!(e.to_string().starts_with("./x: cannot execute: "));
        }
        let other = classify("x", io::Error::from_raw_os_error(libc::E2BIG), None);
        assert!(matches!(other, LaunchError::Spawn { .. }));
        assert_eq!(other.exit_code(), 125);
    }

    #[test]
    fn setup_failures_name_the_step_and_userns_refusals_say_how_to_fix() {
        let spawn_err = || io::Error::from_raw_os_error(libc::EPERM);
        for (step, errno) in [
            (SetupStep::UserNamespace, libc::EPERM),
            (SetupStep::UserNamespace, libc::ENOSPC),
            (SetupStep::UserNamespace, libc::EINVAL),
            (SetupStep::UidMap, libc::EPERM),
        ] {
            let e = classify("x", spawn_err(), Some((step, 0, errno)));
            assert!(
                matches!(e, LaunchError::UserNamespacesDisabled { .. }),
                "{e}"
            );
            let msg = e.to_string();
            assert!(!msg.contains('\n'));
            for hint in [
                "kernel.unprivileged_userns_clone=1",
                "user.max_user_namespaces",
                "kernel.apparmor_restrict_unprivileged_userns=0",
                "run mirrord as root",
            ] {
                assert!(msg.contains(hint), "{msg} lacks {hint}");
            }
        }
        let e = classify(
            "x",
            spawn_err(),
            Some((SetupStep::Loopback, 0, libc::EPERM)),
        );
        assert!(matches!(
            e,
            LaunchError::Setup {
                step: SetupStep::Loopback,
                ..
            }
        ));
        assert!(e.to_string().contains("loopback"), "{e}");
        assert_eq!(e.exit_code(), 125);
    }

    #[test]
    fn setup_report_round_trips_through_the_pipe() {
        let (rx, tx) = pipe(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).expect("pipe");
        assert_eq!(read_report(&rx), None, "empty pipe reads as no report");
        let plan = ChildPlan {
            user_maps: None,
            hostname: None,
            inherit_fds: vec![],
            parent: 0,
            report_fd: tx.as_raw_fd(),
            sigttou: None,
            fuse: None,
            tun: None,
            files: vec![],
        };
        let mut record = [0u8; 8];
        record[..4].copy_from_slice(&(SetupStep::Hostname as u32).to_ne_bytes());
        record[4..].copy_from_slice(&libc::EINVAL.to_ne_bytes());
        // Same write the child does on failure.
        unsafe { libc::write(plan.report_fd, record.as_ptr().cast(), 8) };
        assert_eq!(
            read_report(&rx),
            Some((SetupStep::Hostname, 0, libc::EINVAL))
        );
        for step in SetupStep::ALL {
            assert_eq!(SetupStep::from_code(step as u32), Some(step));
        }
        assert_eq!(SetupStep::from_code(0), None);
    }

    #[test]
    fn hostnames_are_checked_before_the_fork() {
        assert_eq!(validate_hostname("").ok(), Some(None));
        assert_eq!(
            validate_hostname("pod-1").ok(),
            Some(Some(b"pod-1".to_vec()))
        );
        assert!(validate_hostname(&"a".repeat(64)).is_ok());
        assert!(validate_hostname(&"a".repeat(65)).is_err());
        assert!(validate_hostname("a\0b").is_err());
    }

    fn env_value<'a>(env: &'a [(OsString, OsString)], name: &str) -> Option<&'a OsString> {
        env.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    #[test]
    fn interactive_bash_gets_an_rcfile_pipe_with_the_prompt() {
        let env = vec![
            ("HOME".into(), "/home/me".into()),
            ("PS1".into(), "x".into()),
        ];
        let launch = build_shell_launch(
            Path::new("/bin/bash"),
            "pod/web-1",
            vec![],
            env,
            "web-1".into(),
            true,
        )
        .expect("launch");
        assert_eq!(launch.program, "/bin/bash");
        assert_eq!(launch.hostname, "web-1");
        assert_eq!(launch.inherit_fds.len(), 1);
        let fd = launch.inherit_fds[0].as_raw_fd();
        assert_eq!(
            launch.args,
            [OsString::from("--rcfile"), format!("/dev/fd/{fd}").into()]
        );
        assert_eq!(
            env_value(&launch.env, "MIRRORD_TARGET"),
            Some(&"pod/web-1".into())
        );
        // bash's own PS1 (from the environment or .bashrc) is prefixed, not replaced.
        assert_eq!(env_value(&launch.env, "PS1"), Some(&"x".into()));
        let Launch {
            mut inherit_fds, ..
        } = launch;
        let mut script = String::new();
        File::from(inherit_fds.remove(0))
            .read_to_string(&mut script)
            .expect("read rcfile");
        assert_eq!(
            script,
            format!(
                "if [ -f ~/.bashrc ]; then . ~/.bashrc; fi\n\
                 PS1='(mirrord:pod/web-1) '\"$PS1\"\nexec {fd}<&-\n"
            )
        );
    }

    #[test]
    fn other_shells_and_non_interactive_bash_get_ps1_in_env() {
        for (shell, tty, extra, ps1) in [
            ("/bin/bash", false, vec![], "(mirrord:t) $ "),
            (
                "/bin/bash",
                true,
                vec!["-c".into(), "true".into()],
                "(mirrord:t) $ ",
            ),
            ("/usr/bin/zsh", true, vec![], "(mirrord:t) %# "),
            ("/bin/sh", true, vec![], "(mirrord:t) $ "),
        ] {
            let launch: Launch = build_shell_launch(
                Path::new(shell),
                "t",
                extra.clone(),
                vec![],
                String::new(),
                tty,
            )
            .expect("launch");
            assert!(launch.inherit_fds.is_empty(), "{shell}");
            assert_eq!(launch.args, extra, "{shell}");
            assert_eq!(env_value(&launch.env, "PS1"), Some(&ps1.into()), "{shell}");
            assert_eq!(env_value(&launch.env, "MIRRORD_TARGET"), Some(&"t".into()));
        }
    }

    #[test]
    fn prompt_label_is_stripped_of_expansion_characters() {
        assert_eq!(prompt_safe("pod/a-1.b"), "pod/a-1.b");
        assert_eq!(prompt_safe("x'$(rm -rf ~)`\\"), "x___rm_-rf_____");
        let launch = build_shell_launch(
            Path::new("/bin/sh"),
            "a'b",
            vec![],
            vec![("MIRRORD_TARGET".into(), "old".into())],
            String::new(),
            false,
        )
        .expect("launch");
        // The variable keeps the exact label and is replaced, not duplicated.
        assert_eq!(launch.env.len(), 2);
        assert_eq!(
            env_value(&launch.env, "MIRRORD_TARGET"),
            Some(&"a'b".into())
        );
        assert_eq!(
            env_value(&launch.env, "PS1"),
            Some(&"(mirrord:a_b) $ ".into())
        );
    }
}
