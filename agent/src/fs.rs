//! File-system service for the CLI's FUSE mount: answers [`FsRequest`]s on the target's files,
//! resolving every path inside the target's root on each request, and must never touch a file
//! outside that root.
//!
//! Operations on a file's contents open the file itself with [`open_in_root`]. Operations on a
//! directory entry (lstat, readlink, create, mkdir, unlink, rmdir, rename, symlink) open the
//! entry's PARENT with [`open_in_root`] and act on the last name with the `*at` syscalls relative
//! to that descriptor, never following a final symlink, so neither a symlink nor a concurrent
//! rename can move the operation out of the root.
//!
//! System calls go through `nix`; `unsafe` is left only for the xattr calls it does not wrap
//! (`getxattr`, `listxattr`, `listxattrat`) and for owning the bare fd its `openat` returns.
//!
//! Write access: [`serve`] refuses every changing request with `EROFS` unless `writable`. The
//! CLI's FUSE mount refuses writes itself in read-only mode; the flag is the agent's own guard,
//! set per call by whoever dispatches (today the session's server passes `true`: the client
//! proved the session token and picked its mode).

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::Path;

use mirrord_protocol::fs::{
    Attr, BatchedFile, DirEntry, DirPage, FileBatch, FileKind, FsRequest, FsResponse,
    MAX_BATCH_BYTES, MAX_BATCH_FILE, MAX_BATCH_FILES, MAX_DIR_PAGE, MAX_FILE_WRITE, MAX_XATTR,
    SetAttr, SetTime, StatFs, Timestamp,
};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FchmodatFlags, Mode, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags};

use crate::confine::open_in_root;
use crate::error::{Error, io_err};
use crate::files::{self, FileBytes};

fn refused(path: &str, why: &'static str, errno: i32) -> Error {
    Error::Refused {
        path: path.to_owned(),
        why,
        errno,
    }
}

/// The answer to one request: a response, or a read's bytes, which may wait in a pipe to be
/// spliced into the connection.
#[derive(Debug)]
pub enum Answer {
    Response(FsResponse),
    Read(FileBytes),
}

impl Answer {
    /// The answer as a response, with a read's bytes in memory.
    pub fn into_response(self) -> Result<FsResponse, Error> {
        match self {
            Answer::Response(response) => Ok(response),
            Answer::Read(bytes) => bytes
                .into_vec()
                .map(FsResponse::Data)
                .map_err(io_err("read", "")),
        }
    }
}

/// Answers one request on the files under `root` (normally `/proc/PID/root`). Blocks on the
/// target's file system: call it from a blocking thread.
pub fn serve(root: &Path, request: FsRequest, writable: bool) -> Result<Answer, Error> {
    if request.is_write() && !writable {
        return Err(refused("", "read-only session", libc::EROFS));
    }
    if let FsRequest::Read { path, offset, len } = request {
        return files::read(root, &path, offset, len).map(Answer::Read);
    }
    respond(root, request).map(Answer::Response)
}

/// Every request but reads.
fn respond(root: &Path, request: FsRequest) -> Result<FsResponse, Error> {
    match request {
        FsRequest::Stat { path, follow } => stat(root, &path, follow).map(FsResponse::Attr),
        FsRequest::ReadDir {
            path,
            offset,
            xattrs,
        } => read_dir(root, &path, offset, xattrs).map(FsResponse::Dir),
        // `serve` hands every read to `files::read` before calling this.
        FsRequest::Read { .. } => unreachable!("reads are answered by files::read"),
        FsRequest::ReadLink { path } => {
            let (dir, name) = parent(root, &path)?;
            nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name.as_c_str())
                .map(|target| FsResponse::Data(target.into_vec()))
                .map_err(io_err("readlink", &path))
        }
        FsRequest::StatFs { path } => stat_fs(root, &path).map(FsResponse::StatFs),
        FsRequest::ReadFiles { dir, names } => {
            read_files(root, &dir, &names).map(FsResponse::Files)
        }
        FsRequest::GetXattr { path, name } => get_xattr(root, &path, &name).map(FsResponse::Data),
        FsRequest::ListXattr { path } => list_xattr(root, &path).map(FsResponse::Data),
        FsRequest::Create {
            path,
            mode,
            exclusive,
        } => create(root, &path, mode, exclusive).map(FsResponse::Attr),
        FsRequest::Write { path, offset, data } => write(root, &path, offset, &data),
        FsRequest::SetAttr { path, set } => set_attr(root, &path, &set).map(FsResponse::Attr),
        FsRequest::Mkdir { path, mode } => {
            let (dir, name) = parent(root, &path)?;
            let at = io_err("mkdir", &path);
            // Every bit of 0o7777 is a `Mode` flag, so nothing the client asked for is dropped.
            let mode = Mode::from_bits_truncate(mode & 0o7777);
            nix::sys::stat::mkdirat(Some(dir.as_raw_fd()), name.as_c_str(), mode).map_err(&at)?;
            fstatat(dir.as_raw_fd(), &name)
                .map(FsResponse::Attr)
                .map_err(at)
        }
        FsRequest::Rmdir { path } => {
            let (dir, name) = parent(root, &path)?;
            nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                name.as_c_str(),
                UnlinkatFlags::RemoveDir,
            )
            .map(|()| FsResponse::Done)
            .map_err(io_err("rmdir", &path))
        }
        FsRequest::Unlink { path } => {
            let (dir, name) = parent(root, &path)?;
            nix::unistd::unlinkat(
                Some(dir.as_raw_fd()),
                name.as_c_str(),
                UnlinkatFlags::NoRemoveDir,
            )
            .map(|()| FsResponse::Done)
            .map_err(io_err("unlink", &path))
        }
        FsRequest::Rename { from, to, flags } => {
            let (from_dir, from_name) = parent(root, &from)?;
            let (to_dir, to_name) = parent(root, &to)?;
            // Unknown bits go to the kernel as they came, which answers EINVAL for them.
            nix::fcntl::renameat2(
                Some(from_dir.as_raw_fd()),
                from_name.as_c_str(),
                Some(to_dir.as_raw_fd()),
                to_name.as_c_str(),
                RenameFlags::from_bits_retain(flags),
            )
            .map(|()| FsResponse::Done)
            .map_err(io_err("rename", &from))
        }
        FsRequest::Symlink { path, target } => {
            let (dir, name) = parent(root, &path)?;
            let target = CString::new(target).map_err(|_| Error::NulByte)?;
            let at = io_err("symlink", &path);
            nix::unistd::symlinkat(target.as_c_str(), Some(dir.as_raw_fd()), name.as_c_str())
                .map_err(&at)?;
            fstatat(dir.as_raw_fd(), &name)
                .map(FsResponse::Attr)
                .map_err(at)
        }
        FsRequest::Fsync { path, datasync } => {
            let file = open_in_root(root, &path, read_flags())?;
            let synced = if datasync {
                file.sync_data()
            } else {
                file.sync_all()
            };
            synced
                .map(|()| FsResponse::Done)
                .map_err(io_err("fsync", &path))
        }
    }
}

/// O_NONBLOCK: a FIFO without a writer must not hang the agent. O_NOCTTY: a pod's tty must not
/// become the agent's.
fn read_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY
}

/// Opens the directory holding `path`'s last component (resolved inside the root) and returns
/// it with that component, which is then acted on with `*at` calls and is never `.` or `..`.
fn parent(root: &Path, path: &str) -> Result<(File, CString), Error> {
    let trimmed = path.trim_end_matches('/');
    let (dir, name) = match trimmed.rfind('/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (".", trimmed),
    };
    match name {
        // The root itself has no parent inside the root.
        "" => return Err(refused(path, "the root has no parent", libc::EBUSY)),
        "." | ".." => return Err(refused(path, "not a plain name", libc::EINVAL)),
        _ => {}
    }
    let dir = if dir.is_empty() { "/" } else { dir };
    let file = open_in_root(root, dir, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    let name = CString::new(name).map_err(|_| Error::NulByte)?;
    if name.as_bytes().len() > 255 {
        return Err(Error::NameTooLong);
    }
    Ok((file, name))
}

fn stat(root: &Path, path: &str, follow: bool) -> Result<Attr, Error> {
    let mut flags = OFlag::O_PATH;
    if !follow {
        // With O_PATH the kernel hands back the link itself, which fstat then describes.
        flags |= OFlag::O_NOFOLLOW;
    }
    let file = open_in_root(root, path, flags)?;
    fstat(file.as_raw_fd()).map_err(io_err("stat", path))
}

/// Describes `fd` itself ("" + AT_EMPTY_PATH), also an O_PATH descriptor of a symlink.
fn fstat(fd: RawFd) -> nix::Result<Attr> {
    nix::sys::stat::fstatat(Some(fd), "", AtFlags::AT_EMPTY_PATH).map(|st| attr(&st))
}

/// Describes the entry `name` of `dir` itself: AT_SYMLINK_NOFOLLOW keeps the call off a link's
/// target.
fn fstatat(dir: RawFd, name: &CStr) -> nix::Result<Attr> {
    nix::sys::stat::fstatat(Some(dir), name, AtFlags::AT_SYMLINK_NOFOLLOW).map(|st| attr(&st))
}

fn time(secs: i64, nanos: i64) -> Timestamp {
    Timestamp {
        secs,
        nanos: nanos.clamp(0, 999_999_999) as u32,
    }
}

fn attr(st: &libc::stat) -> Attr {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        libc::S_IFIFO => FileKind::Fifo,
        libc::S_IFSOCK => FileKind::Socket,
        libc::S_IFCHR => FileKind::CharDevice,
        libc::S_IFBLK => FileKind::BlockDevice,
        _ => FileKind::File,
    };
    Attr {
        ino: st.st_ino,
        dev: st.st_dev,
        kind,
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        mode: st.st_mode & 0o7777,
        nlink: st.st_nlink.min(u32::MAX as libc::nlink_t) as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        blksize: st.st_blksize.clamp(0, u32::MAX as libc::blksize_t) as u32,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
    }
}

/// Lists one page. Pages are addressed by entry index in `readdir` order; the CLI reads a whole
/// listing in one go, so a directory changing between pages can at worst repeat or skip an
/// entry of that listing, as `readdir(3)` may.
fn read_dir(root: &Path, path: &str, offset: u64, xattrs: bool) -> Result<DirPage, Error> {
    let dir = open_in_root(root, path, read_flags() | OFlag::O_DIRECTORY)?;
    let at = io_err("readdir", path);
    // The magic link reopens exactly the directory just resolved, with no lookup by name.
    let proc_path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut entries = Vec::new();
    let mut index = 0u64;
    let mut xattr_buf = vec![0u8; mirrord_protocol::fs::MAX_DIR_XATTRS];
    for entry in std::fs::read_dir(proc_path).map_err(&at)? {
        let name = entry.map_err(&at)?.file_name();
        if index < offset {
            index += 1;
            continue;
        }
        if entries.len() == MAX_DIR_PAGE as usize {
            return Ok(DirPage {
                entries,
                next: Some(index),
            });
        }
        index += 1;
        // A name the wire can't carry (not UTF-8) is left out rather than mangled.
        let Some(text) = name.to_str() else { continue };
        let Ok(c_name) = CString::new(name.as_bytes()) else {
            continue;
        };
        let attr = match fstatat(dir.as_raw_fd(), &c_name) {
            Ok(attr) => attr,
            // Removed since the listing was read: as if it had never been listed.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(at(e.into())),
        };
        entries.push(DirEntry {
            name: text.to_owned(),
            attr,
            xattrs: xattrs
                .then(|| xattr_names_at(dir.as_raw_fd(), &c_name, &mut xattr_buf))
                .flatten(),
        });
    }
    Ok(DirPage {
        entries,
        next: None,
    })
}

/// The small regular files `names` of `dir`, whole, as [`FsRequest::ReadFiles`] says: a name
/// that is not one plain component, not a regular file (a link is not followed), larger than
/// [`MAX_BATCH_FILE`], gone, unreadable, or changing while read is left out; the batch stops
/// before [`MAX_BATCH_BYTES`]. Nothing but a regular file is ever opened, so a FIFO or a
/// device in the pod is never touched.
fn read_files(root: &Path, dir: &str, names: &[String]) -> Result<FileBatch, Error> {
    let at = open_in_root(root, dir, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    let mut batch = FileBatch::default();
    for name in names.iter().take(MAX_BATCH_FILES) {
        let plain = !name.is_empty() && name != "." && name != ".." && !name.contains('/');
        let Some(c_name) = plain.then(|| CString::new(name.as_str()).ok()).flatten() else {
            continue;
        };
        let small_file = |attr: &Attr| attr.kind == FileKind::File && attr.size <= MAX_BATCH_FILE;
        match fstatat(at.as_raw_fd(), &c_name) {
            Ok(attr) if small_file(&attr) => {}
            _ => continue,
        }
        let flags = read_flags() | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let Ok(fd) = nix::fcntl::openat(
            Some(at.as_raw_fd()),
            c_name.as_c_str(),
            flags,
            Mode::empty(),
        ) else {
            continue;
        };
        // SAFETY: openat just returned this descriptor, owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        // Swapped for something else since the first look: only what is open now counts.
        let attr = match fstat(file.as_raw_fd()) {
            Ok(attr) if small_file(&attr) => attr,
            _ => continue,
        };
        let Ok(bytes) = files::read_at(&file, 0, MAX_BATCH_FILE as usize + 1) else {
            continue;
        };
        // Written to while read: its attributes no longer describe these bytes.
        if bytes.len() as u64 != attr.size {
            continue;
        }
        if batch.data.len() + bytes.len() > MAX_BATCH_BYTES {
            break;
        }
        batch.files.push(BatchedFile {
            name: name.clone(),
            attr,
            len: bytes.len() as u32,
        });
        batch.data.extend_from_slice(&bytes);
    }
    Ok(batch)
}

/// listxattrat(2) (Linux 6.13; the same number on every architecture since the syscall table
/// was unified), which names the file relative to a directory without a path walk through
/// /proc.
const SYS_LISTXATTRAT: libc::c_long = 465;

/// The extended attribute names of `name` in `dir` itself (a symlink is not followed: the
/// name is one component of a confined directory), if readable and no longer than `buf`.
fn xattr_names_at(dir: RawFd, name: &CString, buf: &mut [u8]) -> Option<Vec<u8>> {
    // SAFETY: `name` is NUL-terminated and `dir` is live; `buf` is writable for its length.
    let mut n = unsafe {
        libc::syscall(
            SYS_LISTXATTRAT,
            dir,
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            buf.as_mut_ptr(),
            buf.len(),
        ) as isize
    };
    if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // An older kernel: the same file through the directory's magic link.
        let mut path = format!("/proc/self/fd/{dir}/").into_bytes();
        path.extend_from_slice(name.as_bytes_with_nul());
        // SAFETY: `path` ends with the name's NUL; `buf` is writable for its length.
        n = unsafe { libc::llistxattr(path.as_ptr().cast(), buf.as_mut_ptr().cast(), buf.len()) };
    }
    // ERANGE (too long for the page), ENOTSUP, EACCES…: the client asks when it needs them.
    let n = usize::try_from(n).ok()?;
    // Most files have none: an empty Vec costs no allocation.
    Some(buf.get(..n)?.to_vec())
}

fn stat_fs(root: &Path, path: &str) -> Result<StatFs, Error> {
    let file = open_in_root(root, path, OFlag::O_PATH)?;
    let st = nix::sys::statvfs::fstatvfs(&file).map_err(io_err("statfs", path))?;
    Ok(StatFs {
        blocks: st.blocks(),
        bfree: st.blocks_free(),
        bavail: st.blocks_available(),
        files: st.files(),
        ffree: st.files_free(),
        bsize: st.block_size().min(u32::MAX as u64) as u32,
        namelen: st.name_max().min(u32::MAX as u64) as u32,
        frsize: st.fragment_size().min(u32::MAX as u64) as u32,
    })
}

/// The magic `/proc/self/fd/N` path of an `O_PATH` descriptor: calls that take only a path
/// (xattrs, chmod, utimens) reach exactly that inode through it, with no lookup by name.
fn fd_path(file: &File) -> CString {
    // An integer formatted into a path never contains NUL.
    CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).unwrap_or_default()
}

/// Xattrs are read from the file itself (a final symlink not followed, like `lgetxattr`).
fn xattr_target(root: &Path, path: &str) -> Result<(File, CString), Error> {
    let file = open_in_root(root, path, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
    let proc_path = fd_path(&file);
    Ok((file, proc_path))
}

fn get_xattr(root: &Path, path: &str, name: &[u8]) -> Result<Vec<u8>, Error> {
    let (_file, proc_path) = xattr_target(root, path)?;
    let name = CString::new(name).map_err(|_| Error::NulByte)?;
    let mut buf = vec![0u8; MAX_XATTR as usize];
    // SAFETY: both strings are NUL-terminated; `buf` is writable for its length.
    let n = unsafe {
        libc::getxattr(
            proc_path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io_err("getxattr", path)(io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn list_xattr(root: &Path, path: &str) -> Result<Vec<u8>, Error> {
    let (_file, proc_path) = xattr_target(root, path)?;
    let mut buf = vec![0u8; MAX_XATTR as usize];
    // SAFETY: the path is NUL-terminated; `buf` is writable for its length.
    let n = unsafe { libc::listxattr(proc_path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io_err("listxattr", path)(io::Error::last_os_error()));
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn create(root: &Path, path: &str, mode: u32, exclusive: bool) -> Result<Attr, Error> {
    let (dir, name) = parent(root, path)?;
    let mut flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    if exclusive {
        flags |= OFlag::O_EXCL;
    }
    let flags = flags | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let mode = Mode::from_bits_truncate(mode & 0o7777);
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), name.as_c_str(), flags, mode)
        .map_err(io_err("create", path))?;
    // SAFETY: openat just returned this fd and nobody else owns it (nix 0.29 hands out a bare
    // RawFd); the OwnedFd closes it on every path below.
    let file = unsafe { OwnedFd::from_raw_fd(fd) };
    fstat(file.as_raw_fd()).map_err(io_err("create", path))
}

fn write(root: &Path, path: &str, offset: u64, data: &[u8]) -> Result<FsResponse, Error> {
    if data.len() > MAX_FILE_WRITE as usize {
        return Err(refused(
            path,
            "write larger than a frame allows",
            libc::EINVAL,
        ));
    }
    let flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = open_in_root(root, path, flags)?;
    file.write_all_at(data, offset)
        .map_err(io_err("write", path))?;
    // `data.len()` is at most MAX_FILE_WRITE, so it fits.
    Ok(FsResponse::Written(data.len() as u32))
}

fn timespec(time: Option<SetTime>) -> TimeSpec {
    match time {
        None => TimeSpec::UTIME_OMIT,
        Some(SetTime::Now) => TimeSpec::UTIME_NOW,
        Some(SetTime::At(t)) => TimeSpec::new(t.secs, i64::from(t.nanos.min(999_999_999))),
    }
}

fn set_attr(root: &Path, path: &str, set: &SetAttr) -> Result<Attr, Error> {
    let target = open_in_root(root, path, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
    let proc_path = fd_path(&target);
    if let Some(mode) = set.mode {
        // The magic link names `target` only; following it is the point.
        let mode = Mode::from_bits_truncate(mode & 0o7777);
        nix::sys::stat::fchmodat(
            None,
            proc_path.as_c_str(),
            mode,
            FchmodatFlags::FollowSymlink,
        )
        .map_err(io_err("chmod", path))?;
    }
    if set.uid.is_some() || set.gid.is_some() {
        // AT_EMPTY_PATH makes the call act on the O_PATH fd itself (lchown semantics); `None`
        // is -1, leave unchanged.
        nix::unistd::fchownat(
            Some(target.as_raw_fd()),
            "",
            set.uid.map(Uid::from_raw),
            set.gid.map(Gid::from_raw),
            AtFlags::AT_EMPTY_PATH,
        )
        .map_err(io_err("chown", path))?;
    }
    if let Some(size) = set.size {
        let size = i64::try_from(size).map_err(|_| refused(path, "size", libc::EFBIG))?;
        let file = open_in_root(root, path, OFlag::O_WRONLY | OFlag::O_NONBLOCK)?;
        nix::unistd::ftruncate(&file, size).map_err(io_err("truncate", path))?;
    }
    if set.atime.is_some() || set.mtime.is_some() {
        let (atime, mtime) = (timespec(set.atime), timespec(set.mtime));
        nix::sys::stat::utimensat(
            None,
            proc_path.as_c_str(),
            &atime,
            &mtime,
            UtimensatFlags::FollowSymlink,
        )
        .map_err(io_err("utimens", path))?;
    }
    fstat(target.as_raw_fd()).map_err(io_err("stat", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// A scratch directory removed on drop, also when an assertion fails.
    use crate::confine::tests::TempDir;

    /// A fake pod root, with the host's sensitive file standing next to it.
    fn pod() -> TempDir {
        let t = TempDir::new("fs");
        let r = &t.0;
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("app/data")).unwrap();
        std::fs::write(r.join("etc/shadow"), "pod shadow").unwrap();
        std::fs::write(r.join("app/data/file"), "data").unwrap();
        symlink("/etc/shadow", r.join("app/abs")).unwrap();
        symlink("../../../../../../../etc", r.join("app/up")).unwrap();
        t
    }

    fn call(root: &Path, request: FsRequest) -> Result<FsResponse, i32> {
        serve(root, request, true)
            .and_then(Answer::into_response)
            .map_err(|e| e.errno())
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    fn attr_of(r: Result<FsResponse, i32>) -> Attr {
        match r {
            Ok(FsResponse::Attr(a)) => a,
            other => panic!("expected attr, got {other:?}"),
        }
    }

    fn data(r: Result<FsResponse, i32>) -> Vec<u8> {
        match r {
            Ok(FsResponse::Data(d)) => d,
            other => panic!("expected data, got {other:?}"),
        }
    }

    fn read_all(root: &Path, path: &str) -> Result<Vec<u8>, i32> {
        call(
            root,
            FsRequest::Read {
                path: s(path),
                offset: 0,
                len: 1 << 20,
            },
        )
        .map(|r| data(Ok(r)))
    }

    /// The names and contents of a [`FsRequest::ReadFiles`] answer.
    fn batch(root: &Path, dir: &str, names: &[&str]) -> Vec<(String, Vec<u8>)> {
        let names = names.iter().map(|n| s(n)).collect();
        match call(root, FsRequest::ReadFiles { dir: s(dir), names }) {
            Ok(FsResponse::Files(batch)) => batch
                .split()
                .expect("lengths add up")
                .into_iter()
                .map(|(file, bytes)| {
                    assert_eq!(file.attr.size, bytes.len() as u64);
                    (file.name.clone(), bytes.to_vec())
                })
                .collect(),
            other => panic!("expected files, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_holds_only_small_regular_files_of_the_directory() {
        let t = pod();
        let r = &t.0;
        let d = r.join("app/data");
        std::fs::write(d.join("two"), "2").unwrap();
        std::fs::write(d.join("big"), vec![b'x'; MAX_BATCH_FILE as usize + 1]).unwrap();
        std::fs::write(d.join("limit"), vec![b'y'; MAX_BATCH_FILE as usize]).unwrap();
        nix::unistd::mkfifo(&d.join("fifo"), Mode::from_bits_truncate(0o644)).unwrap();
        symlink("/etc/shadow", d.join("link")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        let asked = [
            "file",
            "fifo",
            "big",
            "link",
            "sub",
            "gone",
            "../../etc/shadow",
            "..",
            "",
            "two",
            "limit",
        ];
        let got = batch(r, "/app/data", &asked);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["file", "two", "limit"], "in the order asked");
        assert_eq!(got[0].1, b"data");
        assert_eq!(got[2].1.len(), MAX_BATCH_FILE as usize);
        // Confined like every path: `..` past the root stays at the pod's root.
        let confined = batch(r, "/app/up", &["shadow"]);
        assert_eq!(confined, [(s("shadow"), b"pod shadow".to_vec())]);
    }

    #[test]
    fn a_batch_stops_before_its_byte_limit() {
        let t = pod();
        let r = &t.0;
        let d = r.join("app/many");
        std::fs::create_dir(&d).unwrap();
        let names: Vec<String> = (0..MAX_BATCH_FILES).map(|i| format!("f{i}")).collect();
        for name in &names {
            std::fs::write(d.join(name), vec![b'z'; MAX_BATCH_FILE as usize]).unwrap();
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let got = batch(r, "/app/many", &names);
        let total: usize = got.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(got.len(), MAX_BATCH_BYTES / MAX_BATCH_FILE as usize);
        assert!(total <= MAX_BATCH_BYTES);
    }

    #[test]
    fn read_side_operations() {
        let t = pod();
        let r = &t.0;
        let a = attr_of(call(
            r,
            FsRequest::Stat {
                path: s("/app/abs"),
                follow: false,
            },
        ));
        assert_eq!(a.kind, FileKind::Symlink);
        let a = attr_of(call(
            r,
            FsRequest::Stat {
                path: s("/app/abs"),
                follow: true,
            },
        ));
        assert_eq!((a.kind, a.size), (FileKind::File, 10));
        let a = attr_of(call(
            r,
            FsRequest::Stat {
                path: s("/"),
                follow: false,
            },
        ));
        assert_eq!(a.kind, FileKind::Dir);
        assert_eq!(read_all(r, "app/abs"), Ok(b"pod shadow".to_vec()));
        let got = call(
            r,
            FsRequest::Read {
                path: s("/etc/shadow"),
                offset: 4,
                len: 3,
            },
        );
        assert_eq!(data(got), b"sha");
        let link = call(
            r,
            FsRequest::ReadLink {
                path: s("/app/abs"),
            },
        );
        assert_eq!(data(link), b"/etc/shadow");
        assert_eq!(
            call(
                r,
                FsRequest::ReadLink {
                    path: s("/etc/shadow")
                }
            ),
            Err(libc::EINVAL)
        );
        let Ok(FsResponse::StatFs(st)) = call(r, FsRequest::StatFs { path: s("/") }) else {
            panic!("statfs")
        };
        assert!(st.bsize > 0);
        // tmpfs/ext4 may or may not hold xattrs; listing must work and getting a missing one
        // must say ENODATA (or EOPNOTSUPP where xattrs are off).
        assert!(
            call(
                r,
                FsRequest::ListXattr {
                    path: s("/etc/shadow")
                }
            )
            .is_ok()
        );
        let got = call(
            r,
            FsRequest::GetXattr {
                path: s("/etc/shadow"),
                name: b"user.none".to_vec(),
            },
        );
        assert!(
            matches!(got, Err(libc::ENODATA) | Err(libc::EOPNOTSUPP)),
            "{got:?}"
        );
    }

    #[test]
    fn directory_listing_is_paged_with_attributes() {
        let t = pod();
        let dir = t.0.join("many");
        std::fs::create_dir(&dir).unwrap();
        let n = MAX_DIR_PAGE as usize * 2 + 5;
        for i in 0..n {
            std::fs::write(dir.join(format!("f{i}")), "x").unwrap();
        }
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let Ok(FsResponse::Dir(page)) = call(
                &t.0,
                FsRequest::ReadDir {
                    path: s("/many/"),
                    offset,
                    xattrs: false,
                },
            ) else {
                panic!("readdir")
            };
            assert!(page.entries.len() <= MAX_DIR_PAGE as usize);
            assert!(
                page.entries.iter().all(|e| e.xattrs.is_none()),
                "not asked for"
            );
            names.extend(page.entries.iter().map(|e| {
                assert_eq!((e.attr.kind, e.attr.size), (FileKind::File, 1));
                e.name.clone()
            }));
            match page.next {
                Some(next) => offset = next,
                None => break,
            }
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
        let Ok(FsResponse::Dir(page)) = call(
            &t.0,
            FsRequest::ReadDir {
                path: s("/many"),
                offset: 0,
                xattrs: true,
            },
        ) else {
            panic!("readdir with xattrs")
        };
        // Every file system here lists names (none, for these files).
        assert!(
            page.entries.iter().all(|e| e.xattrs == Some(vec![])),
            "{:?}",
            page.entries.first()
        );
        assert_eq!(
            call(
                &t.0,
                FsRequest::ReadDir {
                    path: s("etc/shadow"),
                    offset: 0,
                    xattrs: false,
                }
            ),
            Err(libc::ENOTDIR)
        );
    }

    #[test]
    fn write_side_operations() {
        let t = pod();
        let r = &t.0;
        let a = attr_of(call(
            r,
            FsRequest::Create {
                path: s("/app/new"),
                mode: 0o640,
                exclusive: true,
            },
        ));
        assert_eq!((a.kind, a.size), (FileKind::File, 0));
        let create_again = FsRequest::Create {
            path: s("/app/new"),
            mode: 0o640,
            exclusive: true,
        };
        assert_eq!(call(r, create_again), Err(libc::EEXIST));
        let w = call(
            r,
            FsRequest::Write {
                path: s("/app/new"),
                offset: 0,
                data: b"hello world".to_vec(),
            },
        );
        assert_eq!(w, Ok(FsResponse::Written(11)));
        assert_eq!(std::fs::read(r.join("app/new")).unwrap(), b"hello world");
        let set = SetAttr {
            mode: Some(0o600),
            size: Some(5),
            mtime: Some(SetTime::At(Timestamp {
                secs: 1_000_000,
                nanos: 5,
            })),
            atime: Some(SetTime::Now),
            ..SetAttr::default()
        };
        let a = attr_of(call(
            r,
            FsRequest::SetAttr {
                path: s("/app/new"),
                set,
            },
        ));
        assert_eq!((a.mode, a.size), (0o600, 5));
        assert_eq!(
            a.mtime,
            Timestamp {
                secs: 1_000_000,
                nanos: 5
            }
        );
        let set = SetAttr {
            uid: Some(1234),
            gid: Some(4321),
            ..SetAttr::default()
        };
        let a = attr_of(call(
            r,
            FsRequest::SetAttr {
                path: s("/app/new"),
                set,
            },
        ));
        assert_eq!((a.uid, a.gid), (1234, 4321));
        let meta = std::fs::metadata(r.join("app/new")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            call(
                r,
                FsRequest::Fsync {
                    path: s("/app/new"),
                    datasync: true
                }
            ),
            Ok(FsResponse::Done)
        );

        let a = attr_of(call(
            r,
            FsRequest::Mkdir {
                path: s("/app/d"),
                mode: 0o755,
            },
        ));
        assert_eq!(a.kind, FileKind::Dir);
        assert_eq!(
            call(
                r,
                FsRequest::Mkdir {
                    path: s("/app/d"),
                    mode: 0o755
                }
            ),
            Err(libc::EEXIST)
        );
        let a = attr_of(call(
            r,
            FsRequest::Symlink {
                path: s("/app/d/l"),
                target: s("/etc/shadow"),
            },
        ));
        assert_eq!(a.kind, FileKind::Symlink);
        assert_eq!(
            call(r, FsRequest::Rmdir { path: s("/app/d") }),
            Err(libc::ENOTEMPTY)
        );
        let mv = FsRequest::Rename {
            from: s("/app/new"),
            to: s("/app/d/moved"),
            flags: 0,
        };
        assert_eq!(call(r, mv), Ok(FsResponse::Done));
        assert_eq!(read_all(r, "/app/d/moved"), Ok(b"hello".to_vec()));
        let noreplace = FsRequest::Rename {
            from: s("/app/d/moved"),
            to: s("/app/d/l"),
            flags: libc::RENAME_NOREPLACE,
        };
        assert_eq!(call(r, noreplace), Err(libc::EEXIST));
        assert_eq!(
            call(r, FsRequest::Unlink { path: s("/app/d") }),
            Err(libc::EISDIR)
        );
        assert_eq!(
            call(
                r,
                FsRequest::Rmdir {
                    path: s("/app/d/moved")
                }
            ),
            Err(libc::ENOTDIR)
        );
        for p in ["/app/d/moved", "/app/d/l"] {
            assert_eq!(
                call(r, FsRequest::Unlink { path: s(p) }),
                Ok(FsResponse::Done)
            );
        }
        assert_eq!(
            call(r, FsRequest::Rmdir { path: s("/app/d") }),
            Ok(FsResponse::Done)
        );
        assert_eq!(
            call(r, FsRequest::Unlink { path: s("/app/d") }),
            Err(libc::ENOENT)
        );
        assert_eq!(call(r, FsRequest::Rmdir { path: s("/") }), Err(libc::EBUSY));
        assert_eq!(
            call(r, FsRequest::Unlink { path: s("/app/..") }),
            Err(libc::EINVAL)
        );
        assert_eq!(
            call(
                r,
                FsRequest::Mkdir {
                    path: s("/etc/shadow/x"),
                    mode: 0o755
                }
            ),
            Err(libc::ENOTDIR)
        );
        assert_eq!(read_all(r, "/app"), Err(libc::EISDIR));
    }

    #[test]
    fn read_only_sessions_refuse_every_change() {
        let t = pod();
        let changes = [
            FsRequest::Create {
                path: s("/x"),
                mode: 0o644,
                exclusive: false,
            },
            FsRequest::Write {
                path: s("/etc/shadow"),
                offset: 0,
                data: b"x".to_vec(),
            },
            FsRequest::SetAttr {
                path: s("/etc/shadow"),
                set: SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
            },
            FsRequest::Mkdir {
                path: s("/d"),
                mode: 0o755,
            },
            FsRequest::Rmdir {
                path: s("/app/data"),
            },
            FsRequest::Unlink {
                path: s("/etc/shadow"),
            },
            FsRequest::Rename {
                from: s("/etc/shadow"),
                to: s("/s"),
                flags: 0,
            },
            FsRequest::Symlink {
                path: s("/l"),
                target: s("/"),
            },
            FsRequest::Fsync {
                path: s("/etc/shadow"),
                datasync: false,
            },
        ];
        for change in changes {
            let got = serve(&t.0, change.clone(), false).map_err(|e| e.errno());
            assert_eq!(got.err(), Some(libc::EROFS), "{change:?}");
        }
        assert_eq!(
            std::fs::read(t.0.join("etc/shadow")).unwrap(),
            b"pod shadow"
        );
        let stat = FsRequest::Stat {
            path: s("/etc/shadow"),
            follow: true,
        };
        assert!(serve(&t.0, stat, false).is_ok());
    }

    #[test]
    fn nothing_escapes_the_root() {
        // The host's file sits right outside the pod root.
        let outer = TempDir::new("fs-outer");
        let r = outer.0.join("root");
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("app")).unwrap();
        std::fs::write(r.join("etc/shadow"), "pod shadow").unwrap();
        std::fs::write(outer.0.join("host-secret"), "host").unwrap();
        symlink("/etc/shadow", r.join("app/abs")).unwrap();
        symlink("../../host-secret", r.join("app/rel")).unwrap();
        symlink("../..", r.join("app/updir")).unwrap();
        symlink("/", r.join("app/rootlink")).unwrap();

        assert_eq!(read_all(&r, "/../host-secret"), Err(libc::ENOENT));
        assert_eq!(
            read_all(&r, "../../../../etc/shadow"),
            Ok(b"pod shadow".to_vec())
        );
        assert_eq!(read_all(&r, "/app/abs"), Ok(b"pod shadow".to_vec()));
        assert_eq!(read_all(&r, "/app/rel"), Err(libc::ENOENT));
        assert_eq!(read_all(&r, "/app/updir/host-secret"), Err(libc::ENOENT));
        assert_eq!(
            read_all(&r, "/app/updir/etc/shadow"),
            Ok(b"pod shadow".to_vec())
        );
        // Symlinks in parent components of entry operations resolve inside the root too.
        let c = FsRequest::Create {
            path: s("/app/updir/host-secret"),
            mode: 0o644,
            exclusive: true,
        };
        assert!(matches!(call(&r, c), Ok(FsResponse::Attr(_))));
        assert!(r.join("host-secret").exists());
        assert_eq!(std::fs::read(outer.0.join("host-secret")).unwrap(), b"host");
        let u = FsRequest::Unlink {
            path: s("/app/rootlink/../host-secret"),
        };
        assert_eq!(call(&r, u), Ok(FsResponse::Done));
        assert!(!r.join("host-secret").exists());
        assert!(outer.0.join("host-secret").exists());
        // Writing through an absolute symlink lands on the pod's file.
        let w = FsRequest::Write {
            path: s("/app/abs"),
            offset: 0,
            data: b"POD".to_vec(),
        };
        assert_eq!(call(&r, w), Ok(FsResponse::Written(3)));
        assert_eq!(std::fs::read(r.join("etc/shadow")).unwrap(), b"POD shadow");
        // Create never follows a final symlink.
        let c = FsRequest::Create {
            path: s("/app/rel"),
            mode: 0o644,
            exclusive: false,
        };
        assert_eq!(call(&r, c), Err(libc::ELOOP));
        // lstat and readlink see the link itself, not its target.
        let a = attr_of(call(
            &r,
            FsRequest::Stat {
                path: s("/app/rel"),
                follow: false,
            },
        ));
        assert_eq!(a.kind, FileKind::Symlink);
        assert_eq!(
            call(
                &r,
                FsRequest::Stat {
                    path: s("/app/rel"),
                    follow: true
                }
            ),
            Err(libc::ENOENT)
        );
        // Renames out of and into the root stay in the root.
        let out = FsRequest::Rename {
            from: s("/etc/shadow"),
            to: s("/../../stolen"),
            flags: 0,
        };
        assert_eq!(call(&r, out), Ok(FsResponse::Done));
        assert!(r.join("stolen").exists());
        assert!(!outer.0.join("stolen").exists());
        let into = FsRequest::Rename {
            from: s("/app/updir/../../host-secret"),
            to: s("/got"),
            flags: 0,
        };
        assert_eq!(call(&r, into), Err(libc::ENOENT));
        assert!(outer.0.join("host-secret").exists());
        // Mkdir/symlink through a parent symlink to `/` stay inside.
        let m = FsRequest::Mkdir {
            path: s("/app/rootlink/newdir"),
            mode: 0o700,
        };
        assert!(call(&r, m).is_ok());
        assert!(r.join("newdir").is_dir());
        // setattr on a symlink to outside changes nothing outside.
        let set = FsRequest::SetAttr {
            path: s("/app/rel"),
            set: SetAttr {
                size: Some(0),
                ..SetAttr::default()
            },
        };
        assert_eq!(call(&r, set), Err(libc::ENOENT));
        assert_eq!(std::fs::read(outer.0.join("host-secret")).unwrap(), b"host");
    }

    #[test]
    fn permission_errors_keep_their_errno() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to become nobody");
            return;
        }
        let t = pod();
        std::fs::set_permissions(&t.0, std::fs::Permissions::from_mode(0o755)).unwrap();
        let shadow = t.0.join("etc/shadow");
        std::fs::set_permissions(shadow, std::fs::Permissions::from_mode(0o600)).unwrap();
        let root = t.0.clone();
        // Raw setresuid changes only the calling thread's credentials (glibc's wrapper would
        // change every thread of the test binary), and the thread ends right after.
        let got = std::thread::spawn(move || {
            // SAFETY: plain syscalls on this thread's own credentials.
            let dropped = unsafe {
                libc::syscall(libc::SYS_setresgid, 65534, 65534, 65534) == 0
                    && libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) == 0
            };
            assert!(dropped);
            let read = FsRequest::Read {
                path: s("/etc/shadow"),
                offset: 0,
                len: 1,
            };
            let unlink = FsRequest::Unlink {
                path: s("/etc/shadow"),
            };
            [read, unlink].map(|r| serve(&root, r, true).map_err(|e| e.errno()).err())
        })
        .join()
        .unwrap();
        assert_eq!(got, [Some(libc::EACCES), Some(libc::EACCES)]);
    }
}
