//! A FUSE file system showing the target's files: every kernel request becomes an agent
//! [`FsRequest`] sent through a [`Backend`], answered asynchronously on a tokio runtime. It must
//! never block the FUSE session thread on the agent: a slow agent only delays the requests that
//! wait for it, and a lost one turns into `EIO` after at most [`Options::request_timeout`].
//!
//! Mounting: [`mount`] mounts on a path of the calling process's mount namespace (tests, simple
//! callers). A launcher that mounts inside another process's mount namespace instead opens
//! `/dev/fuse`, has that process call `mount(2)` with [`mount_data`], and then serves the
//! already-mounted descriptor with [`serve_fd`].

mod cache;
mod fs;
pub mod inodes;
pub mod links;
mod prefetch;
mod readers;

use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use mirrord_protocol::RemoteError;
use mirrord_protocol::fs::{FsRequest, FsResponse};

pub use fs::RemoteFs;

/// A boxed, sendable future, as [`Backend::call`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Answers file-system requests: the CLI plugs in its agent client, tests the agent's
/// `fs::serve` in-process. Many calls may be in flight at once.
pub trait Backend: Send + Sync + 'static {
    /// A lost connection should be an error with `EIO` (or anything else), never a future that
    /// stays pending forever; the file system times calls out anyway.
    fn call(&self, request: FsRequest) -> BoxFuture<Result<FsResponse, RemoteError>>;
}

/// How the file system behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// When false every changing operation fails with `EROFS` before reaching the agent, and the
    /// mount itself is read-only.
    pub writable: bool,
    /// How long the kernel trusts attributes (size, mtime…) before asking again.
    pub attr_ttl: Duration,
    /// How long the kernel trusts that a name exists (or which inode it names).
    pub entry_ttl: Duration,
    /// Longest wait for one agent answer before the request fails with `EIO`.
    pub request_timeout: Duration,
    /// Shown as the mount's source in `/proc/mounts`.
    pub fs_name: String,
    /// Where the launched process sees the pod's root (`MIRRORD_REMOTE_ROOT`); symlink targets
    /// that could lead out of the mount are rewritten under it (see [`links`]). [`mount`] fills
    /// in its own mount point when this is `None`; with `None` in [`serve_fd`] targets are shown
    /// verbatim, which is only safe when the pod root is the process's `/`.
    pub mountpoint: Option<PathBuf>,
    /// Whether extended attributes are read from the pod. Off, the first `getxattr` or
    /// `listxattr` is answered `ENOSYS`, and the kernel answers every later one itself
    /// (`EOPNOTSUPP`) for the whole mount: `ls -l` probes two attributes of every file it
    /// shows, each a round trip otherwise.
    pub xattrs: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            writable: false,
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            fs_name: "mirrord".to_owned(),
            mountpoint: None,
            xattrs: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("open /dev/fuse: {0} (is the fuse module loaded, and may this user open it?)")]
    OpenDevice(#[source] io::Error),
    #[error("mount FUSE on {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("FUSE session: {0}")]
    Session(#[source] io::Error),
}

/// Largest read or write the kernel sends in one request, and what one agent request carries.
pub const MAX_IO: u32 = mirrord_protocol::bulk::MAX_FILE_READ;

/// Opens a new FUSE connection (`/dev/fuse`), for [`mount_data`] and [`serve_fd`].
pub fn open_device() -> Result<OwnedFd, FuseError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(OwnedFd::from)
        .map_err(FuseError::OpenDevice)
}

/// The `data` argument of `mount(2)` (type `fuse`, source [`Options::fs_name`]) for a FUSE
/// connection whose descriptor is `fd` *in the process calling mount*. `uid`/`gid` own the
/// mount: only they may use it, as no `allow_other` is given.
pub fn mount_data(fd: RawFd, uid: u32, gid: u32) -> String {
    format!("fd={fd},rootmode=40000,user_id={uid},group_id={gid},max_read={MAX_IO}")
}

/// `mount(2)` flags for the options: always nosuid and nodev (a pod's setuid binaries or device
/// nodes must not gain power on this machine), read-only unless writable.
pub fn mount_flags(options: &Options) -> nix::mount::MsFlags {
    use nix::mount::MsFlags;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !options.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    flags
}

/// A served FUSE connection. Dropping it does not unmount: the mount goes when its mount
/// namespace does, or through [`Mounted`].
pub struct Served {
    session: fuser::BackgroundSession,
}

impl Served {
    /// Waits until the kernel ends the connection (the file system was unmounted everywhere).
    pub fn join(self) -> io::Result<()> {
        self.session.join()
    }
}

/// Serves an already-mounted FUSE connection: someone called `mount(2)` with [`mount_data`] for
/// `fd` (possibly in another mount namespace). Call it only after that mount succeeded: it
/// blocks until the kernel's INIT arrives, which `mount(2)` sends. Returns once INIT is answered; the
/// requests are then served on a background thread, and answered on `fs`'s runtime.
pub fn serve_fd(fs: RemoteFs, fd: OwnedFd) -> Result<Served, FuseError> {
    let mut config = fuser::Config::default();
    // Two readers, each on its own clone of the device: no request ever blocks a reader, but a
    // parallel reader (rg) keeps one busy with answers from the caches.
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session = fuser::Session::from_fd(fs, fd, fuser::SessionACL::Owner, config)
        .map_err(FuseError::Session)?;
    let session = session.spawn().map_err(FuseError::Session)?;
    Ok(Served { session })
}

/// A file system mounted by [`mount`] in this process's mount namespace; dropping it unmounts
/// (lazily, so a busy mount never blocks the drop) and waits for the session thread.
pub struct Mounted {
    mountpoint: PathBuf,
    served: Option<Served>,
}

impl Mounted {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the session to end.
    pub fn unmount(mut self) -> Result<(), FuseError> {
        self.unmount_inner()
    }

    fn unmount_inner(&mut self) -> Result<(), FuseError> {
        let Some(served) = self.served.take() else {
            return Ok(());
        };
        nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH).map_err(
            |source| FuseError::Mount {
                path: self.mountpoint.clone(),
                source,
            },
        )?;
        served.join().map_err(FuseError::Session)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_inner() {
            tracing::warn!("unmounting the remote file system: {error}");
        }
    }
}

/// Mounts `fs` on `mountpoint` in the calling process's mount namespace, owned by the caller's
/// uid and gid. Needs `CAP_SYS_ADMIN` there (root, or a user namespace's root).
pub fn mount(mut fs: RemoteFs, mountpoint: &Path) -> Result<Mounted, FuseError> {
    fs.set_default_mountpoint(mountpoint);
    let device = open_device()?;
    let data = mount_data(
        device.as_raw_fd(),
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    nix::mount::mount(
        Some(fs.options().fs_name.as_str()),
        mountpoint,
        Some("fuse"),
        mount_flags(fs.options()),
        Some(data.as_str()),
    )
    .map_err(|source| FuseError::Mount {
        path: mountpoint.to_owned(),
        source,
    })?;
    match serve_fd(fs, device) {
        Ok(served) => Ok(Mounted {
            mountpoint: mountpoint.to_owned(),
            served: Some(served),
        }),
        Err(error) => {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            Err(error)
        }
    }
}
