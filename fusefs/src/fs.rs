//! The `fuser::Filesystem`: turns kernel requests into agent requests. Every handler checks its
//! arguments, takes the reply object into a task on the runtime and returns at once, so the
//! session thread never waits for the agent.
//!
//! What can be answered without the agent, and which listings to fetch, is decided by the
//! policy in `cache.rs`; the handlers here act on its answers, make the agent calls and reply.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, KernelConfig,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow,
};
use mirrord_protocol::fs::{
    Attr, DirEntry, FileKind, FsRequest, FsResponse, SetAttr, SetTime, Timestamp,
};
use tokio::runtime::Handle;

use crate::cache::{Cache, Listed, Listing, Lookup, Xattrs};
use crate::inodes::{Inodes, ROOT_INO, join, parent_and_name};
use crate::prefetch::{Prefetch, batchable};
use crate::{Backend, MAX_IO, Options};

/// The file system; cheap to share, all state behind one `Arc`.
pub struct RemoteFs {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn Backend>,
    runtime: Handle,
    options: Options,
    inodes: Mutex<Inodes>,
    /// Listings of open directories, by handle: read in full at `opendir`, so `readdir` calls
    /// (a few KiB each) never wait for the agent and offsets stay stable.
    dirs: Mutex<HashMap<u64, Arc<Listing>>>,
    next_fh: AtomicU64,
    /// What the agent said recently and when to ask again (see `cache.rs`). Never held across
    /// an await, nor while taking another lock.
    cache: Mutex<Cache<PendingListing>>,
    /// Small files fetched with their directory (see `prefetch.rs`); the same lock rules.
    prefetch: Mutex<Prefetch>,
    /// Batches being fetched, by directory: readers of one directory share one.
    batches: Mutex<HashMap<String, PendingBatch>>,
}

/// A batch being fetched: whoever awaits it first runs the fetch, the others wait for it.
type PendingBatch = Arc<tokio::sync::OnceCell<()>>;

/// A listing being fetched: whoever awaits it first runs the fetch, the others share its result.
type PendingListing = Arc<tokio::sync::OnceCell<Result<Arc<Listing>, Errno>>>;

impl RemoteFs {
    /// `runtime` runs the agent calls; it must outlive the mount.
    pub fn new(backend: Arc<dyn Backend>, runtime: Handle, options: Options) -> Self {
        let cache = Mutex::new(Cache::new(options.attr_ttl, options.writable));
        let options_ttl = options.attr_ttl;
        RemoteFs {
            inner: Arc::new(Inner {
                backend,
                runtime,
                options,
                inodes: Mutex::new(Inodes::new()),
                dirs: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                cache,
                prefetch: Mutex::new(Prefetch::new(options_ttl)),
                batches: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// Before the mount is served, nothing else holds `inner`, so the options can still change.
    pub(crate) fn set_default_mountpoint(&mut self, mountpoint: &Path) {
        if let Some(inner) = Arc::get_mut(&mut self.inner)
            && inner.options.mountpoint.is_none()
        {
            inner.options.mountpoint = Some(mountpoint.to_owned());
        }
    }

    /// Runs `f` on the runtime with the shared state; the caller returns right away.
    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fut = f(self.inner.clone());
        self.inner.runtime.spawn(fut);
    }

    fn path(&self, ino: INodeNo) -> Result<String, Errno> {
        self.inner.path(ino.0)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        Ok(join(&self.path(parent)?, component(name)?))
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.inner.options.writable {
            Ok(())
        } else {
            Err(Errno::EROFS)
        }
    }
}

/// The kernel's `NAME_MAX`: FUSE passes names up to 1,024 bytes, but no file system of the pod
/// holds a longer one than this, and a local file system would answer `ENAMETOOLONG`.
const NAME_MAX: usize = 255;

/// A name the kernel asks about, as the agent takes it: `ENAMETOOLONG` past [`NAME_MAX`] (not
/// `ENOENT` from a cached listing), `EINVAL` when it is not UTF-8.
fn component(name: &OsStr) -> Result<&str, Errno> {
    if name.len() > NAME_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    name.to_str().ok_or(Errno::EINVAL)
}

impl Inner {
    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        // A panic while holding the lock leaves the table consistent (every update is a
        // single map operation), so a poisoned lock is still usable.
        self.inodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache(&self) -> MutexGuard<'_, Cache<PendingListing>> {
        // Likewise: each of its maps is updated by single operations.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replies to `open`: the kernel keeps the file's cached pages if its mtime and size are
    /// those of the previous open.
    fn opened(&self, ino: u64, attr: &Attr, reply: ReplyOpen) {
        self.cache().remember(ino, attr, Instant::now());
        let unchanged = self.inodes().reopened(ino, (attr.mtime, attr.size));
        let mut flags = if unchanged {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        // Nothing is buffered here (writes go straight to the agent), so a `close` needs no
        // FLUSH request: one FUSE round trip less per file read (kernel >= 5.17; ignored before).
        flags |= FopenFlags::FOPEN_NOFLUSH;
        reply.opened(FileHandle(0), flags)
    }

    /// The listing of `dir` on a read-only mount: the fresh one if there is one, else the one
    /// being fetched, else fetched now (and kept).
    async fn shared_listing(&self, dir: &str) -> Result<Arc<Listing>, Errno> {
        let listed = self
            .cache()
            .listing_or_fetch(dir, Instant::now(), PendingListing::default);
        match listed {
            Listed::Fresh(listing) => Ok(listing),
            Listed::Fetching(pending) => self.fetched_listing(dir, pending).await,
        }
    }

    /// The result of the fetch `pending` of `dir`'s listing, running it unless someone else
    /// already is.
    async fn fetched_listing(
        &self,
        dir: &str,
        pending: PendingListing,
    ) -> Result<Arc<Listing>, Errno> {
        let result = pending
            .get_or_init(|| async {
                let entries = self.list(dir, false).await?;
                Ok(self.cache().store(dir, entries, Instant::now()))
            })
            .await
            .clone();
        self.cache()
            .fetch_ended(dir, |other| Arc::ptr_eq(other, &pending));
        result
    }

    /// `dir` was just opened: fetches the sibling listings a tree walk is likely to want next.
    fn list_ahead(self: &Arc<Self>, dir: &str) {
        let ahead = self
            .cache()
            .walk_ahead(dir, Instant::now(), PendingListing::default);
        for (sibling, pending) in ahead {
            let inner = self.clone();
            // A failure here is the walk's to see when it opens the directory itself.
            self.runtime
                .spawn(async move { inner.fetched_listing(&sibling, pending).await.map(drop) });
        }
    }

    fn open_listing(&self, listing: Arc<Listing>, reply: ReplyOpen) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.dirs().insert(fh, listing);
        reply.opened(FileHandle(fh), FopenFlags::empty())
    }

    /// The extended attribute names of `path`, found as `probe` says: known, or from its
    /// directory listed now with every entry's names. `None`: ask about the one file.
    async fn xattr_names(&self, path: &str, probe: Xattrs) -> Option<Vec<u8>> {
        match probe {
            Xattrs::Known(names) => Some(names),
            Xattrs::Ask => None,
            Xattrs::ListDir(dir) => {
                // Failing to list just means asking about the one file.
                let entries = self.list(&dir, true).await.ok()?;
                let now = Instant::now();
                let mut cache = self.cache();
                cache.store(&dir, entries, now);
                cache.xattr_names(path, now)
            }
        }
    }
    fn prefetch(&self) -> MutexGuard<'_, Prefetch> {
        self.prefetch.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn batches(&self) -> MutexGuard<'_, HashMap<String, PendingBatch>> {
        self.batches.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bytes of the small file `path` (inode `ino`) from its directory's batch, fetching
    /// the batch now if the reader goes through that directory (see `prefetch.rs`); `None`:
    /// read it from the agent as usual. Never on a writable mount, whose files this session
    /// itself may be changing.
    async fn batched(&self, ino: u64, path: &str) -> Option<Arc<[u8]>> {
        if self.options.writable {
            return None;
        }
        let now = Instant::now();
        let attr = self.cache().known_attr(ino, path, now)?;
        let (dir, name) = parent_and_name(path)?;
        if !batchable(attr.kind, attr.size) {
            return None;
        }
        let listed = self.cache().listing(dir, now);
        if !self.prefetch().wants_batch(dir, listed.is_some(), now) {
            return None;
        }
        let pending = self.batches().entry(dir.to_owned()).or_default().clone();
        pending
            .get_or_init(|| async {
                let listing = match listed {
                    Some(listing) => listing,
                    // A failed listing only means no batch.
                    None => match self.shared_listing(dir).await {
                        Ok(listing) => listing,
                        Err(_) => return,
                    },
                };
                let names = self.prefetch().plan(dir, &listing, name, Instant::now());
                if names.is_empty() {
                    return;
                }
                let request = FsRequest::ReadFiles {
                    dir: dir.to_owned(),
                    names,
                };
                let asked = Instant::now();
                // A failed batch only means reading file by file.
                if let Ok(FsResponse::Files(batch)) = self.call(request).await {
                    self.prefetch().store(dir, &batch, asked);
                }
            })
            .await;
        {
            let mut batches = self.batches();
            if batches
                .get(dir)
                .is_some_and(|current| Arc::ptr_eq(current, &pending))
            {
                batches.remove(dir);
            }
        }
        self.prefetch().get(path, Instant::now())
    }

    fn dirs(&self) -> MutexGuard<'_, HashMap<u64, Arc<Listing>>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, ino: u64) -> Result<String, Errno> {
        self.inodes()
            .path(ino)
            .map(str::to_owned)
            .ok_or(Errno::ESTALE)
    }

    /// One agent call, bounded in time; every failure is an errno.
    async fn call(&self, request: FsRequest) -> Result<FsResponse, Errno> {
        match tokio::time::timeout(self.options.request_timeout, self.backend.call(request)).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(Errno::from_i32(error.errno)),
            Err(_elapsed) => {
                tracing::warn!(timeout = ?self.options.request_timeout, "agent did not answer a file request");
                Err(Errno::EIO)
            }
        }
    }

    async fn attr_call(&self, request: FsRequest) -> Result<Attr, Errno> {
        match self.call(request).await? {
            FsResponse::Attr(attr) => Ok(attr),
            _ => Err(Errno::EIO),
        }
    }

    async fn data_call(&self, request: FsRequest) -> Result<Vec<u8>, Errno> {
        match self.call(request).await? {
            FsResponse::Data(data) => Ok(data),
            _ => Err(Errno::EIO),
        }
    }

    async fn done_call(&self, request: FsRequest) -> Result<(), Errno> {
        match self.call(request).await? {
            FsResponse::Done => Ok(()),
            _ => Err(Errno::EIO),
        }
    }

    /// Replies to a lookup of `path` answered from its directory's listing: the entry, or
    /// ENOENT when the listing does not have it.
    fn listed_entry(&self, path: &str, attr: Option<&Attr>, reply: ReplyEntry) {
        match attr {
            Some(attr) => self.entry(path, attr, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Replies with a new entry for `path`, counting the kernel's lookup of it.
    fn entry(&self, path: &str, attr: &Attr, reply: ReplyEntry) {
        let ino = self.inodes().lookup(path, attr);
        self.numbered_entry(ino, attr, reply)
    }

    /// Replies with the entry of `ino`, whose lookup the inode table has already counted.
    fn numbered_entry(&self, ino: u64, attr: &Attr, reply: ReplyEntry) {
        self.cache().remember(ino, attr, Instant::now());
        let attr = file_attr(ino, attr);
        reply.entry_with_ttls(
            &self.options.attr_ttl,
            &self.options.entry_ttl,
            &attr,
            Generation(0),
        );
    }

    /// The whole directory `path`, with each entry's extended attribute names if `xattrs`.
    async fn list(&self, path: &str, xattrs: bool) -> Result<Vec<DirEntry>, Errno> {
        let mut entries = Vec::new();
        let mut offset = 0;
        loop {
            let request = FsRequest::ReadDir {
                path: path.to_owned(),
                offset,
                xattrs,
            };
            let FsResponse::Dir(page) = self.call(request).await? else {
                return Err(Errno::EIO);
            };
            entries.extend(page.entries);
            match page.next {
                // A next offset that does not advance would loop forever.
                Some(next) if next > offset => offset = next,
                Some(_) => return Err(Errno::EIO),
                None => return Ok(entries),
            }
        }
    }
}

fn system_time(t: Timestamp) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(t.nanos.min(999_999_999)));
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(t.secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs()) + nanos
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp {
            secs: d.as_secs().min(i64::MAX as u64) as i64,
            nanos: d.subsec_nanos(),
        },
        Err(before) => {
            let d = before.duration();
            let (secs, nanos) = if d.subsec_nanos() == 0 {
                (-(d.as_secs() as i64), 0)
            } else {
                (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
            };
            Timestamp { secs, nanos }
        }
    }
}

fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(timestamp(t)),
    })
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

/// The kernel's view of a remote file: our inode number, the remote's everything else.
fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime: system_time(a.ctime),
        crtime: system_time(a.ctime),
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: a.blksize,
        flags: 0,
    }
}

/// `.` and `..` for a listing; the kernel ignores their attributes in readdirplus.
fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Sends `result` through `reply`, or its errno.
macro_rules! reply_or {
    ($reply:ident, $result:expr, |$v:pat_param| $ok:expr) => {
        match $result {
            Ok($v) => $ok,
            Err(errno) => $reply.error(errno),
        }
    };
}

/// access(2) for `mask` (`R_OK|W_OK|X_OK` bits, 0 for existence) by `uid`/`gid` on `attr`.
fn access_allowed(attr: &Attr, uid: u32, gid: u32, mask: i32, writable: bool) -> Result<(), Errno> {
    let wanted = (mask & 0o7) as u32;
    if wanted & 0o2 != 0 && !writable {
        return Err(Errno::EROFS);
    }
    let any_exec = attr.mode & 0o111 != 0 || attr.kind == FileKind::Dir;
    let allowed = if uid == 0 {
        // root may read and write anything, and execute what anyone may execute.
        0o6 | if any_exec { 0o1 } else { 0 }
    } else if attr.uid == uid {
        (attr.mode >> 6) & 0o7
    } else if attr.gid == gid {
        (attr.mode >> 3) & 0o7
    } else {
        attr.mode & 0o7
    };
    if wanted & !allowed == 0 {
        Ok(())
    } else {
        Err(Errno::EACCES)
    }
}

impl fuser::Filesystem for RemoteFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        use fuser::InitFlags;
        // Each is optional: an older kernel without one just does without.
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // Drops cached pages when a refreshed mtime or size shows the file changed.
            InitFlags::FUSE_AUTO_INVAL_DATA,
            // Symlink targets stay in the page cache: a pod's symlink never changes in place
            // (`ln -sf` makes a new one, a new inode here), so this keeps the TTL's promise.
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(flag);
        }
        let _ = config.set_max_write(MAX_IO);
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        // Readahead and concurrent readers keep several agent reads in flight.
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let pid = req.pid();
        let (dir, name) = match (self.path(parent), component(name)) {
            (Ok(dir), Ok(name)) => (dir, name.to_owned()),
            (Err(errno), _) | (_, Err(errno)) => return reply.error(errno),
        };
        let path = join(&dir, &name);
        let lookup = self.inner.cache().lookup(&dir, &name, pid, Instant::now());
        let fetch_listing = match lookup {
            // Answered right here when a listing knows: a hop to the runtime costs a wake-up.
            Lookup::Listed(attr) => return self.inner.listed_entry(&path, attr.as_ref(), reply),
            Lookup::FetchListing => true,
            Lookup::Ask => false,
        };
        self.spawn(|inner| async move {
            // Failing to list (no read permission, say) just means asking for the name.
            if fetch_listing && let Ok(listing) = inner.shared_listing(&dir).await {
                let attr = listing.attr(&name);
                inner.cache().looked_up(pid, attr);
                return inner.listed_entry(&path, attr, reply);
            }
            let stat = FsRequest::Stat {
                path: path.clone(),
                follow: false,
            };
            reply_or!(reply, inner.attr_call(stat).await, |attr| {
                inner.cache().looked_up(pid, Some(&attr));
                inner.entry(&path, &attr, reply)
            });
        });
    }

    /// No remote file is a terminal or supports device controls; answering here keeps tools
    /// that probe with `TCGETS` (Python's `open`, `isatty`) from costing a round trip.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.cache().forget(ino.0);
        self.inner.inodes().forget(ino.0, nlookup);
    }

    /// Answered from the pod's attributes as the kernel's own permission check would, so
    /// `test -x`, `which` and git's probes behave as on a local disk.
    fn access(
        &self,
        req: &Request,
        ino: INodeNo,
        mask: fuser::AccessFlags,
        reply: fuser::ReplyEmpty,
    ) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let (uid, gid) = (req.uid(), req.gid());
        self.spawn(|inner| async move {
            let stat = FsRequest::Stat {
                path,
                follow: false,
            };
            let writable = inner.options.writable;
            reply_or!(
                reply,
                inner.attr_call(stat).await.and_then(|attr| access_allowed(
                    &attr,
                    uid,
                    gid,
                    mask.bits(),
                    writable
                )),
                |()| reply.ok()
            );
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        self.spawn(|inner| async move {
            let stat = FsRequest::Stat {
                path,
                follow: false,
            };
            reply_or!(reply, inner.attr_call(stat).await, |attr| {
                inner.cache().remember(ino.0, &attr, Instant::now());
                reply.attr(&inner.options.attr_ttl, &file_attr(ino.0, &attr))
            });
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let path = match self.writable().and_then(|()| self.path(ino)) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: set_time(atime),
            mtime: set_time(mtime),
        };
        self.spawn(|inner| async move {
            let request = FsRequest::SetAttr { path, set };
            reply_or!(reply, inner.attr_call(request).await, |attr| reply
                .attr(&inner.options.attr_ttl, &file_attr(ino.0, &attr)));
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        self.spawn(|inner| async move {
            let request = FsRequest::ReadLink { path: path.clone() };
            reply_or!(reply, inner.data_call(request).await, |target| {
                match (&inner.options.mountpoint, String::from_utf8(target)) {
                    (Some(mountpoint), Ok(target)) => {
                        let mountpoint = mountpoint.to_string_lossy();
                        reply.data(
                            crate::links::local_target(&mountpoint, &path, &target).as_bytes(),
                        )
                    }
                    (None, Ok(target)) => reply.data(target.as_bytes()),
                    // Not UTF-8: can't be placed under the mount point safely.
                    (_, Err(_)) => reply.error(Errno::EIO),
                }
            });
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let request = |path| {
            Ok(FsRequest::Mkdir {
                path,
                mode: mode & !umask & 0o7777,
            })
        };
        self.make(parent, name, reply, request, Inner::numbered_entry);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |path| FsRequest::Unlink { path });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, reply, |path| FsRequest::Rmdir { path });
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let request = |path| {
            let target = target.to_str().ok_or(Errno::EINVAL)?.to_owned();
            Ok(FsRequest::Symlink { path, target })
        };
        self.make(parent, link_name, reply, request, Inner::numbered_entry);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let paths = self
            .writable()
            .and_then(|()| Ok((self.child(parent, name)?, self.child(newparent, newname)?)));
        let (from, to) = match paths {
            Ok(paths) => paths,
            Err(errno) => return reply.error(errno),
        };
        self.spawn(|inner| async move {
            let request = FsRequest::Rename {
                from: from.clone(),
                to: to.clone(),
                flags: flags.bits(),
            };
            reply_or!(reply, inner.done_call(request).await, |()| {
                let mut inodes = inner.inodes();
                if flags.contains(RenameFlags::RENAME_EXCHANGE) {
                    // Both names still exist, each naming the other's file: forget both mappings
                    // and let the next lookups number them afresh.
                    inodes.removed(&from);
                    inodes.removed(&to);
                } else {
                    inodes.renamed(&from, &to);
                }
                drop(inodes);
                reply.ok()
            });
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writes = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        let path = match self.path(ino) {
            Ok(_) if writes && !self.inner.options.writable => return reply.error(Errno::EROFS),
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        // Attributes from a lookup or a listing within the TTL: answered here, no round trip.
        let known = self.inner.cache().known_attr(ino.0, &path, Instant::now());
        if let Some(attr) = known {
            return self.inner.opened(ino.0, &attr, reply);
        }
        self.spawn(|inner| async move {
            let stat = FsRequest::Stat {
                path,
                follow: false,
            };
            reply_or!(reply, inner.attr_call(stat).await, |attr| inner
                .opened(ino.0, &attr, reply));
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let held = self.inner.prefetch().get(&path, Instant::now());
        if let Some(bytes) = held {
            return reply.data(part(&bytes, offset, size));
        }
        self.spawn(|inner| async move {
            if let Some(bytes) = inner.batched(ino.0, &path).await {
                return reply.data(part(&bytes, offset, size));
            }
            let request = FsRequest::Read {
                path,
                offset,
                len: size.min(MAX_IO),
            };
            reply_or!(reply, inner.data_call(request).await, |data| reply
                .data(&data));
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let path = match self.writable().and_then(|()| self.path(ino)) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        // max_write is MAX_IO, so a larger write is a kernel we don't understand.
        if data.len() > MAX_IO as usize {
            return reply.error(Errno::EINVAL);
        }
        let data = data.to_vec();
        self.spawn(|inner| async move {
            let request = FsRequest::Write { path, offset, data };
            match inner.call(request).await {
                Ok(FsResponse::Written(n)) => reply.written(n),
                Ok(_) => reply.error(Errno::EIO),
                Err(errno) => reply.error(errno),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes go straight to the agent; nothing is buffered here.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        let path = match self.writable().and_then(|()| self.path(ino)) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        self.spawn(|inner| async move {
            let request = FsRequest::Fsync { path, datasync };
            reply_or!(reply, inner.done_call(request).await, |()| reply.ok());
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        if self.inner.options.writable {
            // Always the directory as it is now: a writer expects to see what it just did.
            return self.spawn(|inner| async move {
                let listing = inner.list(&path, false).await.map(Listing::new);
                reply_or!(reply, listing, |listing| inner
                    .open_listing(Arc::new(listing), reply));
            });
        }
        let fresh = self.inner.cache().listing(&path, Instant::now());
        if let Some(listing) = fresh {
            self.inner.open_listing(listing, reply);
        } else {
            let path = path.clone();
            self.spawn(|inner| async move {
                // The names a reader of the directory goes on to look up, as fresh as the rest.
                let listing = inner.shared_listing(&path).await;
                reply_or!(reply, listing, |listing| inner.open_listing(listing, reply));
            });
        }
        self.inner.list_ahead(&path);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let (Some(listing), Ok(dir)) = (self.inner.dirs().get(&fh.0).cloned(), self.path(ino))
        else {
            return reply.error(Errno::EBADF);
        };
        let inodes = self.inner.inodes();
        // Offsets: entry i of [., .., listing…] carries i + 1, the offset to resume after it.
        let entries = listing.entries();
        let total = entries.len() as u64 + 2;
        for i in offset..total {
            let full = match i {
                0 => reply.add(ino, 1, FileType::Directory, "."),
                1 => reply.add(INodeNo(ROOT_INO), 2, FileType::Directory, ".."),
                _ => {
                    let entry = &entries[(i - 2) as usize];
                    let known = inodes.peek(&join(&dir, &entry.name));
                    // readdir's d_ino is informational; a name not looked up yet shows the
                    // remote number (never 0, which would hide the entry).
                    let shown = known.unwrap_or(entry.attr.ino.max(1));
                    let kind = file_type(entry.attr.kind);
                    reply.add(INodeNo(shown), i + 1, kind, &entry.name)
                }
            };
            if full {
                break;
            }
        }
        drop(inodes);
        reply.ok();
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let (Some(listing), Ok(dir)) = (self.inner.dirs().get(&fh.0).cloned(), self.path(ino))
        else {
            return reply.error(Errno::EBADF);
        };
        let ttl = self.inner.options.entry_ttl;
        let entries = listing.entries();
        let total = if offset == 0 && self.inner.cache().names_only(req.pid()) {
            // Only `.` and `..` here. The kernel asks for the rest with plain readdir, unless a
            // lookup in this directory has asked it for attributes since.
            2
        } else {
            entries.len() as u64 + 2
        };
        let mut inodes = self.inner.inodes();
        for i in offset..total {
            let full = match i {
                // The kernel skips `.` and `..` here: no lookup is counted for them.
                0 => reply.add(ino, 1, ".", &ttl, &dot_attr(ino.0), Generation(0)),
                1 => reply.add(
                    INodeNo(ROOT_INO),
                    2,
                    "..",
                    &ttl,
                    &dot_attr(ROOT_INO),
                    Generation(0),
                ),
                _ => {
                    let entry = &entries[(i - 2) as usize];
                    let path = join(&dir, &entry.name);
                    // Every entry the kernel receives counts as one lookup of it.
                    // (No `remember`: the listing itself holds the attributes for `open`.)
                    let child = inodes.lookup(&path, &entry.attr);
                    let attr = file_attr(child, &entry.attr);
                    let full = reply.add(
                        INodeNo(child),
                        i + 1,
                        &entry.name,
                        &ttl,
                        &attr,
                        Generation(0),
                    );
                    if full {
                        inodes.forget(child, 1);
                    }
                    full
                }
            };
            if full {
                break;
            }
        }
        drop(inodes);
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.dirs().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        self.spawn(|inner| async move {
            match inner.call(FsRequest::StatFs { path }).await {
                Ok(FsResponse::StatFs(s)) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
                ),
                Ok(_) => reply.error(Errno::EIO),
                Err(errno) => reply.error(errno),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if !self.inner.options.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let name = std::os::unix::ffi::OsStrExt::as_bytes(name).to_vec();
        let probe = self.inner.cache().xattrs(&path, Instant::now());
        if let Xattrs::Known(names) = &probe
            && !lists(names, &name)
        {
            // Known absent: `ls -l` probes two names per file, almost always absent.
            return reply.error(Errno::NO_XATTR);
        }
        self.spawn(|inner| async move {
            if let Some(names) = inner.xattr_names(&path, probe).await
                && !lists(&names, &name)
            {
                return reply.error(Errno::NO_XATTR);
            }
            let request = FsRequest::GetXattr { path, name };
            reply_or!(reply, inner.data_call(request).await, |value| xattr_reply(
                reply, size, &value
            ));
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.inner.options.xattrs {
            return reply.error(Errno::ENOSYS);
        }
        let path = match self.path(ino) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let probe = self.inner.cache().xattrs(&path, Instant::now());
        if let Xattrs::Known(names) = &probe {
            return xattr_reply(reply, size, names);
        }
        self.spawn(|inner| async move {
            if let Some(names) = inner.xattr_names(&path, probe).await {
                return xattr_reply(reply, size, &names);
            }
            let request = FsRequest::ListXattr { path };
            reply_or!(reply, inner.data_call(request).await, |names| xattr_reply(
                reply, size, &names
            ));
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let request = |path| {
            Ok(FsRequest::Create {
                path,
                mode: mode & !umask & 0o7777,
                exclusive: flags & libc::O_EXCL != 0,
            })
        };
        self.make(parent, name, reply, request, |inner, ino, attr, reply| {
            // create is also an open: the next open compares its state with this one.
            inner.inodes().reopened(ino, (attr.mtime, attr.size));
            reply.created(
                &inner.options.entry_ttl,
                &file_attr(ino, attr),
                Generation(0),
                FileHandle(0),
                FopenFlags::empty(),
            )
        });
    }
}

/// The replies of the calls that make a file (mkdir, symlink, create), which fail alike.
trait MadeReply: Send + 'static {
    fn error(self, errno: Errno);
}

impl MadeReply for ReplyEntry {
    fn error(self, errno: Errno) {
        ReplyEntry::error(self, errno)
    }
}

impl MadeReply for ReplyCreate {
    fn error(self, errno: Errno) {
        ReplyCreate::error(self, errno)
    }
}

impl RemoteFs {
    /// What mkdir, symlink and create share: on a writable mount, the agent makes `name` in
    /// `parent` as `request` (given the new path) says; the inode table numbers the new file,
    /// counting the kernel's lookup of it, and `made` replies with it.
    fn make<R: MadeReply>(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reply: R,
        request: impl FnOnce(String) -> Result<FsRequest, Errno>,
        made: impl FnOnce(&Inner, u64, &Attr, R) + Send + 'static,
    ) {
        let made_at = self
            .writable()
            .and_then(|()| self.child(parent, name))
            .and_then(|path| Ok((path.clone(), request(path)?)));
        let (path, request) = match made_at {
            Ok(made_at) => made_at,
            Err(errno) => return reply.error(errno),
        };
        self.spawn(|inner| async move {
            reply_or!(reply, inner.attr_call(request).await, |attr| {
                let ino = inner.inodes().lookup(&path, &attr);
                made(&inner, ino, &attr, reply)
            });
        });
    }

    fn remove(
        &self,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
        request: impl FnOnce(String) -> FsRequest,
    ) {
        let path = match self.writable().and_then(|()| self.child(parent, name)) {
            Ok(path) => path,
            Err(errno) => return reply.error(errno),
        };
        let request = request(path.clone());
        self.spawn(|inner| async move {
            reply_or!(reply, inner.done_call(request).await, |()| {
                inner.inodes().removed(&path);
                reply.ok()
            });
        });
    }
}

/// Whether the NUL-separated extended attribute `names` include `name`.
fn lists(names: &[u8], name: &[u8]) -> bool {
    names.split(|&b| b == 0).any(|listed| listed == name)
}

/// The `size` bytes of `bytes` from `offset`, fewer at its end.
fn part(bytes: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = usize::try_from(offset).map_or(bytes.len(), |o| o.min(bytes.len()));
    let end = start.saturating_add(size as usize).min(bytes.len());
    &bytes[start..end]
}

/// xattr replies: `size` 0 asks for the length only; a smaller buffer than needed is ERANGE.
fn xattr_reply(reply: ReplyXattr, size: u32, value: &[u8]) {
    match u32::try_from(value.len()) {
        Ok(len) if size == 0 => reply.size(len),
        Ok(len) if len <= size => reply.data(value),
        _ => reply.error(Errno::ERANGE),
    }
}

#[cfg(test)]
mod access_tests {
    use super::*;

    fn attr(kind: FileKind, mode: u32, uid: u32, gid: u32) -> Attr {
        let epoch = Timestamp { secs: 0, nanos: 0 };
        Attr {
            ino: 1,
            dev: 1,
            kind,
            size: 0,
            blocks: 0,
            mode,
            nlink: 1,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            atime: epoch,
            mtime: epoch,
            ctime: epoch,
        }
    }

    #[test]
    fn follows_unix_permission_rules() {
        let script = attr(FileKind::File, 0o750, 1000, 100);
        assert_eq!(
            access_allowed(&script, 1000, 1, libc::X_OK | libc::R_OK, true),
            Ok(())
        );
        assert_eq!(access_allowed(&script, 2000, 100, libc::X_OK, true), Ok(()));
        assert_eq!(
            access_allowed(&script, 2000, 200, libc::R_OK, true),
            Err(Errno::EACCES)
        );
        assert_eq!(access_allowed(&script, 2000, 200, 0, true), Ok(()));
        let data = attr(FileKind::File, 0o644, 1000, 100);
        assert_eq!(
            access_allowed(&data, 0, 0, libc::X_OK, true),
            Err(Errno::EACCES)
        );
        assert_eq!(
            access_allowed(&data, 0, 0, libc::R_OK | libc::W_OK, true),
            Ok(())
        );
        assert_eq!(
            access_allowed(&data, 0, 0, libc::W_OK, false),
            Err(Errno::EROFS)
        );
        let dir = attr(FileKind::Dir, 0o700, 5, 5);
        assert_eq!(access_allowed(&dir, 0, 0, libc::X_OK, true), Ok(()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_convert_both_ways() {
        for t in [
            Timestamp { secs: 0, nanos: 0 },
            Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789,
            },
            Timestamp {
                secs: -1,
                nanos: 500,
            },
            Timestamp {
                secs: -86_400,
                nanos: 0,
            },
        ] {
            assert_eq!(timestamp(system_time(t)), t);
        }
    }
}
