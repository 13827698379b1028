//! The target's files for the launched process: its root mounted (FUSE, served through the
//! agent) at a fresh directory exported as `MIRRORD_REMOTE_ROOT`, and chosen remote paths
//! overlaid at their own path. Everything lives in the command's private mount namespace, so
//! nothing is ever mounted in the host's; the only host-side trace is the empty mount-point
//! directory, removed when the session ends (and swept by the next run after a `kill -9`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::ValueEnum;
use mirrord_fusefs::{Backend, BoxFuture, Options, RemoteFs};
use mirrord_protocol::fs::{FileKind, FsRequest, FsResponse};
use mirrord_protocol::{RemoteError, Request, Response};

use crate::client::{AgentClient, ClientError};
use crate::launcher::{FuseMount, Room, RoomEntry};

/// How much of the target's file system the command sees (`--fs-mode`, `feature.fs.mode`).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FsMode {
    /// Only `$MIRRORD_REMOTE_ROOT` (read-only); every local path stays local.
    Local,
    /// `$MIRRORD_REMOTE_ROOT` and the overlays, read-only.
    #[default]
    Read,
    /// `$MIRRORD_REMOTE_ROOT` and the overlays, writable.
    Write,
}

/// Remote paths overlaid at their own path unless the mode is `local`: what in-cluster clients
/// and name lookups expect to find.
pub const DEFAULT_OVERLAYS: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/var/run/secrets/kubernetes.io/serviceaccount",
];

/// Name prefix of the directories in the temp directory that hold a mount point (`root`).
const MOUNTPOINT_PREFIX: &str = "mirrord-remote-";

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct FsSettings {
    pub mode: FsMode,
    /// Extra overlays (`--fs-remote`, `feature.fs.read_only`, `feature.fs.read_write`).
    pub overlays: Vec<PathBuf>,
    /// Paths never overlaid (`feature.fs.local`), default overlays included.
    pub local: Vec<PathBuf>,
    /// Extended attributes from the pod (`--fs-xattrs`, `feature.fs.xattrs`).
    pub xattrs: bool,
}

/// The empty directory the remote root is mounted on; removed on drop.
pub struct MountPoint {
    /// `$TMPDIR/mirrord-remote-PID`, holding only the mount point: `$MIRRORD_REMOTE_ROOT/..`
    /// is a directory of ours and `/..` of the pod is two levels up, where the pod's top-level
    /// names (`etc`, `var`…) are not found.
    dir: PathBuf,
    path: PathBuf,
}

impl MountPoint {
    fn create() -> std::io::Result<MountPoint> {
        // Only empty directories go, so nothing that is not ours can be lost.
        crate::generated::sweep_stale(MOUNTPOINT_PREFIX, |dir| {
            let _ = std::fs::remove_dir(dir.join("root"));
            std::fs::remove_dir(dir)
        });
        let dir = std::env::temp_dir().join(format!("{MOUNTPOINT_PREFIX}{}", std::process::id()));
        std::fs::create_dir(&dir)?;
        let path = dir.join("root");
        if let Err(error) = std::fs::create_dir(&path) {
            let _ = std::fs::remove_dir(&dir);
            return Err(error);
        }
        Ok(MountPoint { dir, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MountPoint {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Answers the file system's requests through the session with the agent.
struct AgentBackend(Arc<AgentClient>);

impl Backend for AgentBackend {
    fn call(&self, request: FsRequest) -> BoxFuture<Result<FsResponse, RemoteError>> {
        let client = self.0.clone();
        Box::pin(async move {
            match client.request(Request::Fs(request)).await {
                Ok(Response::Fs(response)) => Ok(response),
                Ok(_) => Err(remote_error(libc::EIO, "the agent answered something else")),
                Err(ClientError::Remote(error)) => Err(error),
                Err(error) => Err(remote_error(libc::EIO, &error.to_string())),
            }
        })
    }
}

fn remote_error(errno: i32, message: &str) -> RemoteError {
    RemoteError {
        errno,
        message: message.to_owned(),
    }
}

/// Prepares the mount for the launcher. None (after one warning line) when FUSE is not
/// available to this user, so the session still runs without the target's files.
pub async fn prepare(
    client: &Arc<AgentClient>,
    settings: &FsSettings,
) -> Option<(FuseMount, MountPoint)> {
    let device = match mirrord_fusefs::open_device() {
        Ok(device) => device,
        Err(error) => {
            crate::output::warn(format!(
                "{error}; the target's files are not available in this session"
            ));
            return None;
        }
    };
    let mountpoint = match MountPoint::create() {
        Ok(mountpoint) => mountpoint,
        Err(error) => {
            crate::output::warn(format!(
                "cannot create a mount point in {}: {error}; the target's files are not available in this session",
                std::env::temp_dir().display()
            ));
            return None;
        }
    };
    let (binds, rooms) = overlays(client, settings, mountpoint.path()).await;
    let options = Options {
        writable: settings.mode == FsMode::Write,
        mountpoint: Some(mountpoint.path().to_owned()),
        xattrs: settings.xattrs,
        ..Options::default()
    };
    let flags = mirrord_fusefs::mount_flags(&options);
    let backend: Arc<dyn Backend> = Arc::new(AgentBackend(client.clone()));
    let fs = RemoteFs::new(backend, tokio::runtime::Handle::current(), options);
    use std::os::fd::AsRawFd;
    let raw = device.as_raw_fd();
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let fuse = FuseMount {
        device: raw,
        target: mountpoint.path().to_owned(),
        source: "mirrord".to_owned(),
        data: mirrord_fusefs::mount_data(raw, uid, gid),
        flags,
        binds,
        rooms,
        serve: Box::new(move || match mirrord_fusefs::serve_fd(fs, device) {
            Ok(served) => {
                // Served until this process exits: joining would wait for every process still
                // in the command's mount namespace, which may outlive the command.
                std::mem::forget(served);
                true
            }
            Err(error) => {
                crate::output::warn(format!("cannot serve the remote file system: {error}"));
                false
            }
        }),
    };
    Some((fuse, mountpoint))
}

/// Lets the kernel read ahead up to 1 MiB per request on the mount (its default for FUSE is
/// 128 KiB), which is what makes large sequential reads fast. The setting belongs to this
/// mount's own backing device and goes away with it; it needs root, so it is best effort.
///
/// The device number comes from the command's mountinfo: this process must never make a
/// syscall on the file system it serves itself, or a `kill -9` would leave it stuck forever
/// in a request nobody can answer.
pub fn raise_readahead(pid: u32, mountpoint: &Path) {
    let mountinfo = Path::new("/proc").join(pid.to_string()).join("mountinfo");
    let result = std::fs::read_to_string(&mountinfo).and_then(|mountinfo| {
        let device = mount_device(&mountinfo, mountpoint).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the mount is not in the command's mountinfo",
            )
        })?;
        std::fs::write(format!("/sys/class/bdi/{device}/read_ahead_kb"), "1024")
    });
    if let Err(error) = result {
        tracing::debug!("cannot raise the remote file system's readahead: {error}");
    }
}

/// The `major:minor` of the mount at `mountpoint` in a mountinfo text.
fn mount_device<'a>(mountinfo: &'a str, mountpoint: &Path) -> Option<&'a str> {
    let wanted = mountpoint.to_str()?;
    mountinfo.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        (fields.nth(1)? == wanted).then_some(device)
    })
}

/// `/etc/hosts` as the command would see it — the target's when `fuse` overlays it, which it
/// then no longer does, else the local one — plus `extra_hosts`.
pub async fn hosts_text(
    client: &AgentClient,
    fuse: Option<&mut FuseMount>,
    extra_hosts: &[(std::net::IpAddr, &str)],
) -> std::io::Result<String> {
    let hosts = Path::new("/etc/hosts");
    let pod_hosts = fuse
        .as_deref()
        .is_some_and(|fuse| fuse.binds.iter().any(|(_, local)| local == hosts));
    let mut text = if pod_hosts {
        match client.read_small_file("/etc/hosts").await {
            Ok(data) => String::from_utf8_lossy(&data).into_owned(),
            Err(error) => {
                return Err(std::io::Error::other(format!(
                    "cannot read the target's /etc/hosts: {error}"
                )));
            }
        }
    } else {
        std::fs::read_to_string("/etc/hosts")?
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    if let Some(fuse) = fuse {
        fuse.binds.retain(|(_, local)| local != hosts);
    }
    text.push_str("# added by mirrord\n");
    for (address, name) in extra_hosts {
        text.push_str(&format!("{address}\t{name}\n"));
    }
    Ok(text)
}

/// `(path in the mount, local path)` for every overlay that exists in the target, with the
/// room to make for those whose local path does not exist (a bind mount needs an existing
/// local path of the same kind). A default overlay missing in the target is skipped quietly;
/// one the user asked for is reported, as is a local path of another kind.
async fn overlays(
    client: &AgentClient,
    settings: &FsSettings,
    root: &Path,
) -> (Vec<(PathBuf, PathBuf)>, Vec<Room>) {
    let mut rooms: Vec<Room> = Vec::new();
    let defaults = DEFAULT_OVERLAYS
        .iter()
        .filter(|_| settings.mode != FsMode::Local)
        .map(PathBuf::from);
    let requested = settings.overlays.iter().cloned();
    let mut binds: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (path, asked) in defaults
        .map(|path| (path, false))
        .chain(requested.map(|path| (path, true)))
    {
        if !path.is_absolute()
            || settings.local.contains(&path)
            || binds.iter().any(|(_, local)| *local == path)
        {
            continue;
        }
        let remote = client
            .request(Request::Fs(FsRequest::Stat {
                path: path.to_string_lossy().into_owned(),
                follow: true,
            }))
            .await;
        let remote_is_dir = match remote {
            Ok(Response::Fs(FsResponse::Attr(attr))) => attr.kind == FileKind::Dir,
            _ => {
                if asked {
                    crate::output::warn(format!(
                        "{} does not exist in the target; not overlaid",
                        path.display()
                    ));
                }
                continue;
            }
        };
        let inside = root.join(path.strip_prefix("/").unwrap_or(&path));
        match std::fs::metadata(&path) {
            Ok(local) if local.is_dir() == remote_is_dir => binds.push((inside, path)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                match plan_room(&mut rooms, &path, remote_is_dir) {
                    Ok(()) => binds.push((inside, path)),
                    Err(why) => crate::output::warn(format!(
                        "{} does not exist here and {why}; the target's is at $MIRRORD_REMOTE_ROOT{}",
                        path.display(),
                        path.display()
                    )),
                }
            }
            _ if asked => crate::output::warn(format!(
                "{} has no local counterpart of the same kind to overlay; the target's is at $MIRRORD_REMOTE_ROOT{}",
                path.display(),
                path.display()
            )),
            _ => {}
        }
    }
    (binds, rooms)
}

/// Most entries a directory may have to be covered by a [`Room`]: each is bound back one by one.
const MAX_ROOM_ENTRIES: usize = 4096;

/// Adds to `rooms` what makes `path` (missing here) exist in the command's mount namespace:
/// its nearest existing ancestor covered by a tmpfs that holds the ancestor's entries again,
/// and the missing path below it. Fails, saying why, rather than cover `/`.
fn plan_room(rooms: &mut Vec<Room>, path: &Path, is_dir: bool) -> Result<(), String> {
    let ancestor = path
        .ancestors()
        .skip(1)
        .find(|dir| dir.exists())
        .ok_or("none of its parents exists")?;
    if !ancestor.is_dir() {
        return Err(format!("{} is not a directory", ancestor.display()));
    }
    let dir = std::fs::canonicalize(ancestor)
        .map_err(|error| format!("{} cannot be resolved: {error}", ancestor.display()))?;
    if dir == Path::new("/") {
        return Err("making room for it would cover /".to_owned());
    }
    let missing = path
        .strip_prefix(ancestor)
        .map_err(|_| format!("{} is not below {}", path.display(), ancestor.display()))?;
    let room = match rooms.iter().position(|room| room.dir == dir) {
        Some(index) => &mut rooms[index],
        None => {
            rooms.push(room_for(&dir)?);
            let last = rooms.len() - 1;
            &mut rooms[last]
        }
    };
    let mut below = dir.clone();
    let count = missing.components().count();
    for (index, component) in missing.components().enumerate() {
        below.push(component);
        let entry_is_dir = index + 1 < count || is_dir;
        if !room.create.iter().any(|(made, _)| *made == below) {
            room.create.push((below.clone(), entry_is_dir));
        }
    }
    Ok(())
}

/// A [`Room`] over `dir` with its current entries, nothing to create yet.
fn room_for(dir: &Path) -> Result<Room, String> {
    use std::os::unix::fs::PermissionsExt;
    let unreadable = |error: std::io::Error| format!("{} cannot be read: {error}", dir.display());
    let mode = std::fs::metadata(dir)
        .map_err(unreadable)?
        .permissions()
        .mode();
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let kind = entry.file_type().map_err(unreadable)?;
        let kind = if kind.is_symlink() {
            RoomEntry::Symlink(std::fs::read_link(entry.path()).map_err(unreadable)?)
        } else if kind.is_dir() {
            RoomEntry::Dir
        } else {
            RoomEntry::File
        };
        entries.push((entry.file_name(), kind));
        if entries.len() > MAX_ROOM_ENTRIES {
            return Err(format!(
                "{} has over {MAX_ROOM_ENTRIES} entries to keep visible",
                dir.display()
            ));
        }
    }
    Ok(Room {
        dir: dir.to_owned(),
        mode,
        entries,
        create: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_covers_the_nearest_ancestor_and_keeps_its_entries() {
        let base = std::env::temp_dir().join(format!("mirrord-room-test-{}", std::process::id()));
        let run = base.join("run");
        std::fs::create_dir_all(run.join("lock")).unwrap();
        std::fs::write(run.join("file"), "x").unwrap();
        std::os::unix::fs::symlink("file", run.join("link")).unwrap();
        std::os::unix::fs::symlink(&run, base.join("var-run")).unwrap();
        let mut rooms = Vec::new();
        let sa = base.join("var-run/secrets/kubernetes.io/serviceaccount");
        plan_room(&mut rooms, &sa, true).unwrap();
        plan_room(&mut rooms, &base.join("var-run/secrets/extra.conf"), false).unwrap();
        let result = rooms.clone();
        std::fs::remove_dir_all(&base).unwrap();

        let [room] = result.as_slice() else {
            panic!("one room for one ancestor: {result:?}")
        };
        let run = std::fs::canonicalize(std::env::temp_dir())
            .unwrap()
            .join(run.strip_prefix(std::env::temp_dir()).unwrap());
        assert_eq!(room.dir, run, "symlinks resolved");
        let mut entries = room.entries.clone();
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            entries,
            vec![
                ("file".into(), RoomEntry::File),
                ("link".into(), RoomEntry::Symlink("file".into())),
                ("lock".into(), RoomEntry::Dir),
            ]
        );
        assert_eq!(
            room.create,
            vec![
                (run.join("secrets"), true),
                (run.join("secrets/kubernetes.io"), true),
                (run.join("secrets/kubernetes.io/serviceaccount"), true),
                (run.join("secrets/extra.conf"), false),
            ]
        );
    }

    #[test]
    fn room_is_never_made_over_the_root() {
        let mut rooms = Vec::new();
        let error = plan_room(&mut rooms, Path::new("/mirrord-no-such-dir/x"), true).unwrap_err();
        assert!(error.contains("cover /"), "{error}");
        assert!(rooms.is_empty());
    }

    #[test]
    fn finds_the_mount_device_in_mountinfo() {
        let mountinfo = "22 1 254:1 / / rw,relatime - ext4 /dev/vda rw\n\
                         97 22 0:61 / /tmp/mirrord-remote-7/root ro,nosuid - fuse mirrord ro\n";
        assert_eq!(
            mount_device(mountinfo, Path::new("/tmp/mirrord-remote-7/root")),
            Some("0:61")
        );
        assert_eq!(mount_device(mountinfo, Path::new("/tmp/other")), None);
    }
}
