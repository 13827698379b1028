//! Path confinement: turns a path requested over the wire into a file inside the target's root,
//! and must never let `..`, a symlink (absolute, relative or chained) or a rename reach a file
//! outside that root.
//!
//! Two layers. [`resolve`] is a pure resolver over a [`Lookup`]: it applies POSIX path
//! semantics (`..` after a symlink applies to the link's target, a trailing slash demands a
//! directory, at most [`MAX_SYMLINKS`] links) with the root as a ceiling, and absolute symlink
//! targets mean what they mean inside the pod. [`open_in_root`] opens for real, race-free:
//! `openat2(2)` with `RESOLVE_IN_ROOT` on a directory fd of the root where the kernel has it
//! (Linux 5.6+), otherwise a walk of `O_PATH` descriptors driven by [`resolve`].
//!
//! The root is normally `/proc/PID/root`; opening it as a directory fd follows that magic link
//! into the pod's mount namespace once, and every later lookup is relative to that fd, so the
//! agent sees the pod's mounts without joining its mount namespace.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use crate::error::{Error, io_err};

/// Symlinks followed in one resolution before giving up with `ELOOP` (the kernel's limit too).
pub const MAX_SYMLINKS: u32 = 40;
/// Longest accepted request, as the kernel's `PATH_MAX` (which counts the terminating NUL).
const PATH_MAX: usize = 4096;
/// Longest accepted component, as the kernel's `NAME_MAX`.
const NAME_MAX: usize = 255;
/// Mode for files created through `O_CREAT`; the agent's umask still applies.
const CREATE_MODE: Mode = Mode::from_bits_truncate(0o644);
/// `openat2` returns `EAGAIN` when a rename or mount raced a `..` lookup; retrying is the
/// documented answer, and a bounded count keeps a hostile pod from pinning the agent.
const OPENAT2_RETRIES: usize = 16;

/// What a path names, as seen without following a final symlink (`lstat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    /// A symlink and its (raw, unresolved) target.
    Symlink(PathBuf),
    /// Anything that is neither a directory nor a symlink: a file, device, socket, FIFO.
    Other,
    Missing,
}

/// Looks up one path relative to the root. `path` is never empty (the root is a directory by
/// definition), never absolute, and has no `.`/`..` components; every proper prefix of it was
/// earlier answered [`Entry::Dir`].
pub trait Lookup {
    fn entry(&mut self, path: &Path) -> io::Result<Entry>;
}

/// Where a request lands: `path` is relative to the root (empty for the root itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    /// [`Entry::Dir`], [`Entry::Other`], [`Entry::Missing`] (only ever for the last component,
    /// so a caller may create it), or [`Entry::Symlink`] when the final link was not followed.
    pub kind: Entry,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Name(OsString),
    Parent,
    /// A trailing `/` or `/.`: what came before must be a directory, and a final symlink is
    /// followed whatever `follow_final` says (as the kernel does).
    MustBeDir,
}

/// Splits a path into steps; `.` and empty components vanish, a trailing one becomes
/// [`Step::MustBeDir`].
fn steps(path: &[u8]) -> Vec<Step> {
    let mut out = Vec::new();
    let mut raw = path.split(|b| *b == b'/').peekable();
    while let Some(component) = raw.next() {
        let last = raw.peek().is_none();
        match component {
            b"" | b"." if last => out.push(Step::MustBeDir),
            b"" | b"." => {}
            b".." => out.push(Step::Parent),
            name => out.push(Step::Name(OsStr::from_bytes(name).to_os_string())),
        }
    }
    out
}

/// Rejects what no kernel path call would accept, before anything is looked up.
fn validate(requested: &str) -> Result<(), Error> {
    if requested.is_empty() {
        return Err(Error::EmptyPath);
    }
    if requested.as_bytes().contains(&0) {
        return Err(Error::NulByte);
    }
    if requested.len() >= PATH_MAX || requested.split('/').any(|c| c.len() > NAME_MAX) {
        return Err(Error::NameTooLong);
    }
    Ok(())
}

/// The pod's view of a root-relative path, for error messages.
fn shown(path: &Path) -> String {
    format!("/{}", path.display())
}

/// Resolves `requested` (relative or absolute, both meaning "from the root") inside the root.
/// A final symlink is followed when `follow_final` is set (like `stat`), else reported (like
/// `lstat`/`O_NOFOLLOW`).
pub fn resolve(
    requested: &str,
    follow_final: bool,
    lookup: &mut impl Lookup,
) -> Result<Resolved, Error> {
    validate(requested)?;
    let mut pending: VecDeque<Step> = steps(requested.as_bytes()).into();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(step) = pending.pop_front() {
        let name = match step {
            // Only directories were ever pushed onto `resolved`, so the demand holds already.
            Step::MustBeDir => continue,
            // The ceiling: `..` at the root stays at the root, as it does for `/..` on a host.
            Step::Parent => {
                resolved.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let last = pending.iter().all(|s| *s == Step::MustBeDir);
        let trailing_slash = last && !pending.is_empty();
        let path: PathBuf = resolved.iter().chain(std::iter::once(&name)).collect();
        let entry = lookup.entry(&path).map_err(|source| Error::Io {
            op: "lookup",
            path: shown(&path),
            source,
        })?;
        match entry {
            Entry::Dir => resolved.push(name),
            Entry::Other if last && !trailing_slash => {
                return Ok(Resolved {
                    path,
                    kind: Entry::Other,
                });
            }
            Entry::Other => return Err(Error::NotADirectory(shown(&path))),
            Entry::Missing if last => {
                return Ok(Resolved {
                    path,
                    kind: Entry::Missing,
                });
            }
            Entry::Missing => return Err(Error::NotFound(shown(&path))),
            Entry::Symlink(target) if last && !trailing_slash && !follow_final => {
                return Ok(Resolved {
                    path,
                    kind: Entry::Symlink(target),
                });
            }
            Entry::Symlink(target) => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::TooManySymlinks(shown(&path)));
                }
                let bytes = target.as_os_str().as_bytes();
                if bytes.is_empty() {
                    return Err(Error::NotFound(shown(&path)));
                }
                // An absolute target starts again from the root, i.e. the pod's `/`; a
                // relative one continues from the link's directory, which `resolved` still is.
                if bytes[0] == b'/' {
                    resolved.clear();
                }
                for step in steps(bytes).into_iter().rev() {
                    pending.push_front(step);
                }
            }
        }
    }
    Ok(Resolved {
        path: resolved.into_iter().collect(),
        kind: Entry::Dir,
    })
}

/// Set once `openat2` turned out to be missing (`ENOSYS`: kernel before 5.6, or a seccomp
/// profile that hides it), so later opens go straight to the walk.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// Opens `requested` inside `root` with `flags` (`O_CLOEXEC` is always added; `O_NOFOLLOW`
/// means the final symlink is not followed; `O_CREAT` creates with mode 0644 minus umask).
/// No path component, symlink target or concurrent rename can make it open a file outside
/// `root`.
pub fn open_in_root(root: &Path, requested: &str, flags: OFlag) -> Result<File, Error> {
    validate(requested)?;
    let root_fd = open_root(root)?;
    if !OPENAT2_MISSING.load(Ordering::Relaxed) {
        match openat2_in_root(root_fd.as_fd(), requested, flags) {
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOSYS) => {
                OPENAT2_MISSING.store(true, Ordering::Relaxed);
            }
            // Seccomp profiles older than openat2 answer EPERM for it; but EPERM is also a real
            // open(2) answer (O_NOATIME, immutable files), so the walk decides, and openat2
            // stays in use for the next request.
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::EPERM) => {}
            done => return done,
        }
    }
    open_by_walk(root_fd.as_fd(), requested, flags)
}

/// Follows the root path itself (including the `/proc/PID/root` magic link) exactly once.
fn open_root(root: &Path) -> Result<OwnedFd, Error> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(root, flags, Mode::empty()).map_err(|source| Error::Io {
        op: "open root",
        path: root.display().to_string(),
        source: source.into(),
    })?;
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else (nix 0.29 hands
    // out a bare RawFd).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn create_mode(flags: OFlag) -> Mode {
    if flags.contains(OFlag::O_CREAT) || flags.contains(OFlag::O_TMPFILE) {
        CREATE_MODE
    } else {
        Mode::empty()
    }
}

fn openat2_in_root(root: BorrowedFd, requested: &str, flags: OFlag) -> Result<File, Error> {
    let open_err = io_err("open", requested);
    let c_path = CString::new(requested).map_err(|_| Error::NulByte)?;
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(create_mode(flags))
        // NO_MAGICLINKS: the pod's own /proc is inside the root, and its magic links
        // (/proc/self/root, /proc/N/fd/M) would otherwise lead back out to the agent's view.
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    for _ in 0..OPENAT2_RETRIES {
        match nix::fcntl::openat2(root.as_raw_fd(), c_path.as_c_str(), how) {
            // SAFETY: openat2 just returned this fd and nobody else owns it (nix 0.29 hands
            // out a bare RawFd).
            Ok(fd) => return Ok(unsafe { File::from_raw_fd(fd) }),
            Err(Errno::EAGAIN) => continue,
            Err(errno) => return Err(open_err(errno)),
        }
    }
    Err(open_err(Errno::EAGAIN))
}

fn openat(dir: BorrowedFd, name: &OsStr, flags: OFlag, mode: Mode) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(Some(dir.as_raw_fd()), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: `fd` was just returned by openat(2) and is owned by nobody else (nix 0.29 hands
    // out a bare RawFd).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// [`Lookup`] over real directory fds: each component is opened `O_PATH|O_NOFOLLOW` relative to
/// its parent's fd, so a symlink or rename swapped in later can't redirect components already
/// walked, and `..` is answered by [`resolve`] from fds held here, never by the kernel.
/// (Unlike openat2, it can't notice a held directory being moved out of the root mid-walk;
/// that needs write access outside the root, which the pod's processes don't have.)
struct FdWalk<'a> {
    root: BorrowedFd<'a>,
    /// Every directory answered so far, by root-relative path; [`resolve`] only ever asks about
    /// children of these.
    dirs: HashMap<PathBuf, OwnedFd>,
}

impl FdWalk<'_> {
    fn dir(&self, path: &Path) -> io::Result<BorrowedFd<'_>> {
        if path.as_os_str().is_empty() {
            return Ok(self.root);
        }
        self.dirs
            .get(path)
            .map(|fd| fd.as_fd())
            // `resolve` guarantees the parent was looked up; reaching this is a bug, not a panic.
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }

    fn parent_and_name<'p>(&self, path: &'p Path) -> io::Result<(BorrowedFd<'_>, &'p OsStr)> {
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        let parent = path.parent().unwrap_or(Path::new(""));
        Ok((self.dir(parent)?, name))
    }
}

impl Lookup for FdWalk<'_> {
    fn entry(&mut self, path: &Path) -> io::Result<Entry> {
        let (parent, name) = self.parent_and_name(path)?;
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW;
        let fd = match openat(parent, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(Entry::Missing),
            Err(e) => return Err(e),
        };
        let mode = nix::sys::stat::fstat(fd.as_raw_fd())?.st_mode & libc::S_IFMT;
        match mode {
            libc::S_IFDIR => {
                self.dirs.insert(path.to_owned(), fd);
                Ok(Entry::Dir)
            }
            libc::S_IFLNK => read_link(fd.as_fd()).map(Entry::Symlink),
            _ => Ok(Entry::Other),
        }
    }
}

/// Reads the target of the symlink `fd` (opened `O_PATH|O_NOFOLLOW`) itself points at: ""
/// with an O_PATH symlink fd reads that link (Linux 2.6.39+).
fn read_link(fd: BorrowedFd) -> io::Result<PathBuf> {
    Ok(nix::fcntl::readlinkat(Some(fd.as_raw_fd()), "")?.into())
}

/// The fallback when `openat2` is missing: [`resolve`] over an [`FdWalk`], then one last
/// `openat` relative to an fd already held.
fn open_by_walk(root: BorrowedFd, requested: &str, flags: OFlag) -> Result<File, Error> {
    let mut walk = FdWalk {
        root,
        dirs: HashMap::new(),
    };
    let follow_final = !flags.contains(OFlag::O_NOFOLLOW);
    let resolved = resolve(requested, follow_final, &mut walk)?;
    let open_err = io_err("open", requested);
    let fd = match resolved.kind {
        // Re-opening the held fd through "." can't be redirected by a rename.
        Entry::Dir => {
            let dir = walk.dir(&resolved.path).map_err(&open_err)?;
            openat(dir, OsStr::new("."), flags, create_mode(flags))
        }
        Entry::Missing if requested.ends_with('/') => {
            let errno = if flags.contains(OFlag::O_CREAT) {
                libc::EISDIR
            } else {
                libc::ENOENT
            };
            Err(io::Error::from_raw_os_error(errno))
        }
        // O_NOFOLLOW on the last step: a symlink swapped in after the walk fails with ELOOP
        // instead of being followed by the kernel, and an unfollowed link gets the kernel's
        // own O_NOFOLLOW answer (ELOOP, or the link itself with O_PATH).
        Entry::Other | Entry::Missing | Entry::Symlink(_) => {
            let (parent, name) = walk.parent_and_name(&resolved.path).map_err(&open_err)?;
            openat(parent, name, flags | OFlag::O_NOFOLLOW, create_mode(flags))
        }
    }
    .map_err(&open_err)?;
    Ok(File::from(fd))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Read;

    /// An in-memory tree: root-relative path → entry; absent paths are missing.
    struct Tree(HashMap<PathBuf, Entry>);

    impl Tree {
        fn new(entries: &[(&str, Entry)]) -> Self {
            Tree(
                entries
                    .iter()
                    .map(|(p, e)| (PathBuf::from(p), e.clone()))
                    .collect(),
            )
        }
    }

    impl Lookup for Tree {
        fn entry(&mut self, path: &Path) -> io::Result<Entry> {
            assert!(!path.as_os_str().is_empty() && !path.is_absolute());
            Ok(self.0.get(path).cloned().unwrap_or(Entry::Missing))
        }
    }

    fn link(target: &str) -> Entry {
        Entry::Symlink(PathBuf::from(target))
    }

    /// The pod's tree: /etc/shadow, /app/data/file, and links of every kind.
    fn pod() -> Tree {
        Tree::new(&[
            ("etc", Entry::Dir),
            ("etc/shadow", Entry::Other),
            ("app", Entry::Dir),
            ("app/data", Entry::Dir),
            ("app/data/file", Entry::Other),
            ("app/abs", link("/etc/shadow")),
            ("app/escape", link("../../../../etc/shadow")),
            ("app/data/up", link("../..")),
            ("app/todata", link("data")),
            ("app/deep", link("data/file")),
            ("app/absdir", link("/app/data")),
            ("loop1", link("loop2")),
            ("loop2", link("/loop1")),
            ("self", link(".")),
            ("empty", link("")),
            ("app/chain1", link("chain2")),
            ("app/chain2", link("../app/data/up/../../etc")),
        ])
    }

    fn ok(requested: &str) -> Resolved {
        match resolve(requested, true, &mut pod()) {
            Ok(r) => r,
            Err(e) => panic!("{requested}: {e}"),
        }
    }

    fn at(path: &str, kind: Entry) -> Resolved {
        Resolved {
            path: PathBuf::from(path),
            kind,
        }
    }

    fn errno(requested: &str, follow: bool) -> i32 {
        match resolve(requested, follow, &mut pod()) {
            Ok(r) => panic!("{requested}: resolved to {r:?}"),
            Err(e) => e.errno(),
        }
    }

    #[test]
    fn dot_dot_never_climbs_above_the_root() {
        assert_eq!(ok("/../../etc/shadow"), at("etc/shadow", Entry::Other));
        assert_eq!(ok("../../../etc/shadow"), at("etc/shadow", Entry::Other));
        assert_eq!(
            ok("app/../../../../etc/./shadow"),
            at("etc/shadow", Entry::Other)
        );
        assert_eq!(ok(".."), at("", Entry::Dir));
        assert_eq!(ok("/"), at("", Entry::Dir));
        assert_eq!(ok("//app//data/"), at("app/data", Entry::Dir));
    }

    #[test]
    fn absolute_symlink_means_the_pods_path() {
        assert_eq!(ok("/app/abs"), at("etc/shadow", Entry::Other));
        assert_eq!(ok("app/absdir/file"), at("app/data/file", Entry::Other));
    }

    #[test]
    fn relative_symlink_cannot_escape() {
        assert_eq!(ok("/app/escape"), at("etc/shadow", Entry::Other));
        // up -> ../.. from app/data reaches the root, then `..` more stays there.
        assert_eq!(
            ok("app/data/up/../../etc/shadow"),
            at("etc/shadow", Entry::Other)
        );
        assert_eq!(ok("app/chain1/shadow"), at("etc/shadow", Entry::Other));
    }

    #[test]
    fn dot_dot_applies_after_following_a_link() {
        // todata -> data: app/todata/.. is app (a lexical cleaner would say app/ too, but
        // absdir -> /app/data shows the difference: its parent is /app, not the link's dir).
        assert_eq!(ok("app/todata/.."), at("app", Entry::Dir));
        assert_eq!(
            ok("etc/../app/absdir/../data/file"),
            at("app/data/file", Entry::Other)
        );
        // deep -> data/file: `..` after a link to a file is ENOTDIR, as in the kernel.
        assert_eq!(errno("app/deep/..", true), libc::ENOTDIR);
    }

    #[test]
    fn loops_and_link_limits() {
        assert_eq!(errno("loop1", true), libc::ELOOP);
        assert_eq!(errno("loop2/x", false), libc::ELOOP);
        // 40 links are fine, the 41st is not.
        let forty = format!("/{}etc", "self/".repeat(40));
        assert_eq!(ok(&forty), at("etc", Entry::Dir));
        let forty_one = format!("/{}etc", "self/".repeat(41));
        assert_eq!(errno(&forty_one, true), libc::ELOOP);
    }

    #[test]
    fn final_symlink_follow_flag() {
        let r = resolve("app/abs", false, &mut pod());
        assert_eq!(r.ok(), Some(at("app/abs", link("/etc/shadow"))));
        // A trailing slash forces the final link to be followed.
        let r = resolve("app/absdir/", false, &mut pod());
        assert_eq!(r.ok(), Some(at("app/data", Entry::Dir)));
        // Intermediate links are always followed.
        let r = resolve("app/todata/file", false, &mut pod());
        assert_eq!(r.ok(), Some(at("app/data/file", Entry::Other)));
    }

    #[test]
    fn trailing_slash_on_a_file_and_missing_paths() {
        assert_eq!(errno("etc/shadow/", true), libc::ENOTDIR);
        assert_eq!(errno("etc/shadow/.", true), libc::ENOTDIR);
        assert_eq!(errno("etc/shadow/x", true), libc::ENOTDIR);
        assert_eq!(errno("nope/x", true), libc::ENOENT);
        assert_eq!(errno("empty", true), libc::ENOENT);
        // A missing last component is reported, so a later create can use it.
        assert_eq!(ok("app/new"), at("app/new", Entry::Missing));
    }

    #[test]
    fn malformed_requests_are_rejected_before_any_lookup() {
        struct Never;
        impl Lookup for Never {
            fn entry(&mut self, path: &Path) -> io::Result<Entry> {
                panic!("looked up {path:?}");
            }
        }
        let long_name = "a".repeat(NAME_MAX + 1);
        let long_path = "a/".repeat(PATH_MAX / 2);
        for (requested, expected) in [
            ("", libc::ENOENT),
            ("etc/\0shadow", libc::EINVAL),
            (long_name.as_str(), libc::ENAMETOOLONG),
            (long_path.as_str(), libc::ENAMETOOLONG),
        ] {
            let got = resolve(requested, true, &mut Never).map_err(|e| e.errno());
            assert_eq!(got, Err(expected), "{requested:?}");
        }
    }

    #[test]
    fn lookup_errors_keep_their_errno() {
        struct Denied;
        impl Lookup for Denied {
            fn entry(&mut self, _: &Path) -> io::Result<Entry> {
                Err(io::Error::from_raw_os_error(libc::EACCES))
            }
        }
        let err = resolve("secret", true, &mut Denied).err();
        assert_eq!(err.map(|e| e.errno()), Some(libc::EACCES));
    }

    /// A scratch directory removed on drop, also when an assertion fails.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            use std::sync::atomic::AtomicU32;
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir()
                .join(format!("mirrord-agent-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake pod root on disk with the same kinds of traps as [`pod`].
    fn disk_root() -> TempDir {
        use std::os::unix::fs::symlink;
        let t = TempDir::new("confine");
        let r = &t.0;
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::create_dir_all(r.join("app/data")).unwrap();
        std::fs::write(r.join("etc/shadow"), "pod shadow").unwrap();
        std::fs::write(r.join("app/data/file"), "data").unwrap();
        symlink("/etc/shadow", r.join("app/abs")).unwrap();
        symlink("../../../../../../../../etc/shadow", r.join("app/escape")).unwrap();
        symlink("../..", r.join("app/data/up")).unwrap();
        symlink("/app/data", r.join("app/absdir")).unwrap();
        symlink("loop2", r.join("loop1")).unwrap();
        symlink("/loop1", r.join("loop2")).unwrap();
        t
    }

    type Opener = fn(BorrowedFd, &str, OFlag) -> Result<File, Error>;

    fn read_with(open: Opener, root: &Path, requested: &str, flags: OFlag) -> Result<String, i32> {
        let root_fd = open_root(root).map_err(|e| e.errno())?;
        let mut file = open(root_fd.as_fd(), requested, flags).map_err(|e| e.errno())?;
        let mut s = String::new();
        file.read_to_string(&mut s)
            .map_err(|e| e.raw_os_error().unwrap_or(0))?;
        Ok(s)
    }

    /// The walk always, and openat2 where this kernel has it.
    fn openers() -> Vec<(&'static str, Opener)> {
        let t = TempDir::new("probe");
        let probe = open_root(&t.0).map(|fd| openat2_in_root(fd.as_fd(), ".", OFlag::O_RDONLY));
        let missing = matches!(
            probe,
            Ok(Err(Error::Io { ref source, .. })) if source.raw_os_error() == Some(libc::ENOSYS)
        );
        let mut openers: Vec<(&'static str, Opener)> = vec![("walk", open_by_walk)];
        if !missing {
            openers.push(("openat2", openat2_in_root));
        }
        openers
    }

    /// Both strategies, on the same cases, must land on the fake root's files and agree on
    /// every errno.
    #[test]
    fn real_opens_stay_inside_the_root() {
        let t = disk_root();
        let rd = OFlag::O_RDONLY;
        let cases: &[(&str, OFlag, Result<&str, i32>)] = &[
            ("/etc/shadow", rd, Ok("pod shadow")),
            ("/../../../etc/shadow", rd, Ok("pod shadow")),
            ("app/abs", rd, Ok("pod shadow")),
            ("app/escape", rd, Ok("pod shadow")),
            ("app/data/up/up/../etc/shadow", rd, Err(libc::ENOENT)),
            ("app/data/up/../../etc/shadow", rd, Ok("pod shadow")),
            ("app/absdir/file", rd, Ok("data")),
            ("app/absdir/../data/file", rd, Ok("data")),
            ("etc/shadow/", rd, Err(libc::ENOTDIR)),
            ("loop1", rd, Err(libc::ELOOP)),
            ("app/abs", rd | OFlag::O_NOFOLLOW, Err(libc::ELOOP)),
            ("missing", rd, Err(libc::ENOENT)),
            ("app/\0", rd, Err(libc::EINVAL)),
        ];
        for (name, opener) in openers() {
            for (requested, flags, expected) in cases {
                let got = read_with(opener, &t.0, requested, *flags);
                let expected = expected.map(str::to_owned);
                assert_eq!(got, expected, "{name}: {requested:?}");
            }
        }
    }

    #[test]
    fn directories_and_creation() {
        let t = disk_root();
        for (name, open) in openers() {
            let root_fd = open_root(&t.0).unwrap();
            let dir = open(
                root_fd.as_fd(),
                "app/absdir/",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
            );
            assert!(dir.is_ok(), "{name}");
            let created = open(
                root_fd.as_fd(),
                "app/abs/../new",
                OFlag::O_WRONLY | OFlag::O_CREAT,
            );
            assert_eq!(
                created.err().map(|e| e.errno()),
                Some(libc::ENOTDIR),
                "{name}"
            );
            let created = open(
                root_fd.as_fd(),
                "/../app/new",
                OFlag::O_WRONLY | OFlag::O_CREAT,
            );
            assert!(created.is_ok(), "{name}");
            assert!(t.0.join("app/new").is_file());
            std::fs::remove_file(t.0.join("app/new")).unwrap();
        }
    }

    /// The agent's real situation: the root is `/proc/PID/root` of a process in another mount
    /// namespace, holding a tmpfs that only that namespace sees. Needs root and `unshare(1)`;
    /// skipped otherwise.
    #[test]
    fn root_in_another_mount_namespace() {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/unshare").exists() {
            eprintln!("skipped: needs root and unshare(1)");
            return;
        }
        let t = TempDir::new("mntns");
        let script = r#"mount -t tmpfs pod "$1" && mkdir "$1/etc" && echo pod-only > "$1/etc/shadow" && ln -s /etc/shadow "$1/link" && echo ready && exec sleep 60"#;
        let child = Command::new("/usr/bin/unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&t.0)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        /// Kills the namespace's only process; its mounts go with it.
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut child = Kill(child);
        let mut line = String::new();
        if let Some(out) = child.0.stdout.take() {
            let _ = io::BufReader::new(out).read_line(&mut line);
        }
        assert_eq!(line.trim(), "ready");
        let pod_root = PathBuf::from(format!("/proc/{}/root", child.0.id()))
            .join(t.0.strip_prefix("/").unwrap());
        let mut s = String::new();
        open_in_root(&pod_root, "/link", OFlag::O_RDONLY)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "pod-only\n");
        // The host's view of the same directory is the empty one underneath.
        assert!(!t.0.join("etc").exists());
        drop(child);
    }
}
