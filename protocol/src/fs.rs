//! File-system messages: the requests the CLI's FUSE mount sends about the target's files and
//! the agent's answers. Every path is absolute in the pod's view (or relative to its root, which
//! means the same) and is resolved by the agent inside the target's root on every request; these
//! types never carry a host path or a file descriptor.

use bincode::{Decode, Encode};

/// Most entries in one [`DirPage`]. With names of at most 255 bytes and one [`Attr`] each, a page
/// stays far under [`crate::bulk::MAX_FRAME_LEN`].
pub const MAX_DIR_PAGE: u32 = 1024;
/// Most bytes one [`FsRequest::Write`] may carry, so the request always fits in a frame.
pub const MAX_FILE_WRITE: u32 = crate::bulk::MAX_FILE_READ;
/// Most bytes of one extended attribute value or name list (the kernel's `XATTR_SIZE_MAX`).
pub const MAX_XATTR: u32 = 64 * 1024;
/// Most files in one [`FsRequest::ReadFiles`].
pub const MAX_BATCH_FILES: usize = 64;
/// Largest file a [`FsRequest::ReadFiles`] batch carries; larger ones are left out.
pub const MAX_BATCH_FILE: u64 = 64 * 1024;
/// Most content bytes in one [`FileBatch`], so the answer always fits in a frame.
pub const MAX_BATCH_BYTES: usize = crate::bulk::MAX_FILE_READ as usize;
/// Most bytes of a [`DirEntry`]'s extended attribute names; longer lists are left out (the
/// client then asks for them), so a full page still fits in a frame.
pub const MAX_DIR_XATTRS: usize = 256;

/// One file-system request; answered by one [`FsResponse`] or a `RemoteError` carrying errno.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum FsRequest {
    /// Attributes of `path`: of a final symlink itself unless `follow` (`lstat` vs `stat`).
    /// → [`FsResponse::Attr`]
    Stat { path: String, follow: bool },
    /// Entries of the directory `path` with their `lstat` attributes, without `.` and `..`,
    /// starting at entry number `offset`; with each entry's extended attribute names when
    /// `xattrs` (a syscall per entry, so only asked for when wanted). → [`FsResponse::Dir`]
    ReadDir {
        path: String,
        offset: u64,
        xattrs: bool,
    },
    /// Up to `len` bytes (at most [`crate::bulk::MAX_FILE_READ`]) from `offset`; fewer bytes
    /// mean end of file. → [`FsResponse::Data`]
    Read { path: String, offset: u64, len: u32 },
    /// The raw target of the symlink `path`. → [`FsResponse::Data`]
    ReadLink { path: String },
    /// Usage of the file system holding `path`. → [`FsResponse::StatFs`]
    StatFs { path: String },
    /// The value of extended attribute `name` of `path` (not following a final symlink).
    /// → [`FsResponse::Data`]
    GetXattr { path: String, name: Vec<u8> },
    /// The NUL-separated names of `path`'s extended attributes. → [`FsResponse::Data`]
    ListXattr { path: String },
    /// Creates a regular file (opening an existing one unless `exclusive`); a final symlink is
    /// never followed. → [`FsResponse::Attr`]
    Create {
        path: String,
        mode: u32,
        exclusive: bool,
    },
    /// Writes `data` (at most [`MAX_FILE_WRITE`] bytes) at `offset`. → [`FsResponse::Written`]
    Write {
        path: String,
        offset: u64,
        data: Vec<u8>,
    },
    /// chmod / chown / truncate / utimens, in that order; `None` leaves a field alone.
    /// → [`FsResponse::Attr`] after the change
    SetAttr { path: String, set: SetAttr },
    /// → [`FsResponse::Attr`] of the new directory
    Mkdir { path: String, mode: u32 },
    /// → [`FsResponse::Done`]
    Rmdir { path: String },
    /// → [`FsResponse::Done`]
    Unlink { path: String },
    /// `renameat2(2)`; `flags` are its `RENAME_*` flags. → [`FsResponse::Done`]
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    /// Creates the symlink `path` holding `target` verbatim (an absolute target means the pod's
    /// `/`). → [`FsResponse::Attr`] of the link
    Symlink { path: String, target: String },
    /// `fsync`/`fdatasync` of `path`. → [`FsResponse::Done`]
    Fsync { path: String, datasync: bool },
    /// The whole contents of the directory `dir`'s entries `names` (at most
    /// [`MAX_BATCH_FILES`], single components), in that order, stopping before the total
    /// would pass [`MAX_BATCH_BYTES`]. Only regular files of at most [`MAX_BATCH_FILE`] bytes
    /// come back (a final symlink is not followed); any other name is left out, not an
    /// error. → [`FsResponse::Files`]
    ReadFiles { dir: String, names: Vec<String> },
}

impl FsRequest {
    /// Whether the request changes the target's files, so a read-only session refuses it.
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            FsRequest::Stat { .. }
                | FsRequest::ReadDir { .. }
                | FsRequest::Read { .. }
                | FsRequest::ReadLink { .. }
                | FsRequest::StatFs { .. }
                | FsRequest::GetXattr { .. }
                | FsRequest::ListXattr { .. }
                | FsRequest::ReadFiles { .. }
        )
    }
}

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum FsResponse {
    Attr(Attr),
    Dir(DirPage),
    /// File bytes, a symlink target, an xattr value or a NUL-separated xattr name list.
    Data(Vec<u8>),
    StatFs(StatFs),
    /// Bytes written.
    Written(u32),
    Done,
    Files(FileBatch),
}

/// Small files' contents in one answer: each file's name, attributes and length, and all their
/// bytes one after another in `data`.
#[derive(Encode, Decode, Debug, Clone, Default, PartialEq, Eq)]
pub struct FileBatch {
    pub files: Vec<BatchedFile>,
    pub data: Vec<u8>,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct BatchedFile {
    pub name: String,
    /// Taken on the open file, so they describe the bytes sent.
    pub attr: Attr,
    pub len: u32,
}

impl FileBatch {
    /// Each file with its bytes; `None` when the lengths do not add up to `data`.
    pub fn split(&self) -> Option<Vec<(&BatchedFile, &[u8])>> {
        let mut rest = self.data.as_slice();
        let mut files = Vec::with_capacity(self.files.len());
        for file in &self.files {
            let len = usize::try_from(file.len).ok()?;
            if len > rest.len() {
                return None;
            }
            let (bytes, after) = rest.split_at(len);
            files.push((file, bytes));
            rest = after;
        }
        rest.is_empty().then_some(files)
    }
}

/// What changes in a [`FsRequest::SetAttr`].
#[derive(Encode, Decode, Debug, Clone, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// Permission bits (`0o7777`).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    /// The agent's clock at the time of the change.
    Now,
    At(Timestamp),
}

/// Seconds and nanoseconds since the Unix epoch, as in `struct timespec`.
#[derive(Encode, Decode, Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    pub secs: i64,
    /// Always below 1,000,000,000.
    pub nanos: u32,
}

#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

/// A remote `struct stat`.
#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    /// The remote `st_ino`; with `dev`, identifies the file on the remote side.
    pub ino: u64,
    pub dev: u64,
    pub kind: FileKind,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    /// Permission bits only (`0o7777`); the type is in `kind`.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub blksize: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// One path component, never `.` or `..`.
    pub name: String,
    pub attr: Attr,
    /// The entry's own extended attribute names as `llistxattr` gives them (each
    /// NUL-terminated), when asked for, readable and no longer than [`MAX_DIR_XATTRS`]: with
    /// them a client answers probes for absent names (`ls -l` makes two per file) itself.
    pub xattrs: Option<Vec<u8>>,
}

/// One page of a directory listing.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct DirPage {
    pub entries: Vec<DirEntry>,
    /// The `offset` of the next page, `None` when this page ends the listing.
    pub next: Option<u64>,
}

/// A remote `struct statvfs`.
#[derive(Encode, Decode, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl crate::bulk::Bulk for FsRequest {
    fn bulk_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            FsRequest::Write { data, .. } => Some(data),
            _ => None,
        }
    }
}

impl crate::bulk::Bulk for FsResponse {
    fn bulk_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            FsResponse::Data(data) => Some(data),
            FsResponse::Files(batch) => Some(&mut batch.data),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::{Bulk, MAX_FILE_READ, MAX_FRAME_LEN};
    use crate::frame::{FrameDecoder, encode, encode_with_bulk};
    use crate::messages::{AgentMessage, ClientMessage, Request, Response};

    fn attr(kind: FileKind) -> Attr {
        let t = Timestamp {
            secs: -1,
            nanos: 999_999_999,
        };
        Attr {
            ino: u64::MAX,
            dev: 0x803,
            kind,
            size: 1 << 40,
            blocks: 8,
            mode: 0o4755,
            nlink: 2,
            uid: 1000,
            gid: u32::MAX,
            rdev: 0,
            blksize: 4096,
            atime: t,
            mtime: Timestamp::default(),
            ctime: t,
        }
    }

    fn every_request() -> Vec<FsRequest> {
        let p = || "/var/run/secrets/kubernetes.io/serviceaccount/token".to_owned();
        vec![
            FsRequest::Stat {
                path: p(),
                follow: true,
            },
            FsRequest::ReadDir {
                path: "/".into(),
                offset: 1024,
                xattrs: true,
            },
            FsRequest::Read {
                path: p(),
                offset: u64::MAX,
                len: MAX_FILE_READ,
            },
            FsRequest::ReadLink { path: p() },
            FsRequest::StatFs { path: p() },
            FsRequest::GetXattr {
                path: p(),
                name: b"user.x".to_vec(),
            },
            FsRequest::ListXattr { path: p() },
            FsRequest::ReadFiles {
                dir: p(),
                names: vec!["ü".into(); MAX_BATCH_FILES],
            },
            FsRequest::Create {
                path: p(),
                mode: 0o600,
                exclusive: true,
            },
            FsRequest::Write {
                path: p(),
                offset: 7,
                data: vec![1; MAX_FILE_WRITE as usize],
            },
            FsRequest::SetAttr {
                path: p(),
                set: SetAttr {
                    mode: Some(0o644),
                    uid: Some(0),
                    gid: None,
                    size: Some(0),
                    atime: Some(SetTime::Now),
                    mtime: Some(SetTime::At(Timestamp { secs: 5, nanos: 6 })),
                },
            },
            FsRequest::SetAttr {
                path: p(),
                set: SetAttr::default(),
            },
            FsRequest::Mkdir {
                path: p(),
                mode: 0o755,
            },
            FsRequest::Rmdir { path: p() },
            FsRequest::Unlink { path: p() },
            FsRequest::Rename {
                from: p(),
                to: "/b".into(),
                flags: 1,
            },
            FsRequest::Symlink {
                path: "/l".into(),
                target: "/etc/shadow".into(),
            },
            FsRequest::Fsync {
                path: p(),
                datasync: false,
            },
        ]
    }

    fn every_response() -> Vec<FsResponse> {
        let kinds = [
            FileKind::File,
            FileKind::Dir,
            FileKind::Symlink,
            FileKind::Fifo,
            FileKind::Socket,
            FileKind::CharDevice,
            FileKind::BlockDevice,
        ];
        let mut out: Vec<FsResponse> = kinds.iter().map(|k| FsResponse::Attr(attr(*k))).collect();
        out.extend([
            FsResponse::Dir(DirPage {
                entries: vec![DirEntry {
                    name: "ü".into(),
                    attr: attr(FileKind::File),
                    xattrs: Some(b"user.a\0".to_vec()),
                }],
                next: Some(1),
            }),
            FsResponse::Dir(DirPage {
                entries: vec![],
                next: None,
            }),
            FsResponse::Data(vec![0; MAX_FILE_READ as usize]),
            FsResponse::StatFs(StatFs {
                blocks: 1,
                bfree: 2,
                bavail: 3,
                files: 4,
                ffree: 5,
                bsize: 4096,
                namelen: 255,
                frsize: 4096,
            }),
            FsResponse::Written(u32::MAX),
            FsResponse::Done,
            full_batch(),
        ]);
        out
    }

    /// The largest batch: the most files, sharing the most bytes.
    fn full_batch() -> FsResponse {
        let each = MAX_BATCH_BYTES / MAX_BATCH_FILES;
        FsResponse::Files(FileBatch {
            files: (0..MAX_BATCH_FILES)
                .map(|i| BatchedFile {
                    name: format!("{i:0>255}"),
                    attr: attr(FileKind::File),
                    len: each as u32,
                })
                .collect(),
            data: vec![7; each * MAX_BATCH_FILES],
        })
    }

    #[test]
    fn a_batch_splits_into_its_files_only_when_the_lengths_add_up() {
        let file = |name: &str, len| BatchedFile {
            name: name.into(),
            attr: attr(FileKind::File),
            len,
        };
        let batch = FileBatch {
            files: vec![file("a", 2), file("b", 0), file("c", 3)],
            data: b"aaccc".to_vec(),
        };
        let split = batch.split().expect("adds up");
        let got: Vec<(&str, &[u8])> = split.iter().map(|(f, b)| (f.name.as_str(), *b)).collect();
        assert_eq!(got, [("a", &b"aa"[..]), ("b", b""), ("c", b"ccc")]);
        let short = FileBatch {
            data: b"aacc".to_vec(),
            ..batch.clone()
        };
        assert_eq!(short.split(), None);
        let long = FileBatch {
            data: b"aaccc!".to_vec(),
            ..batch
        };
        assert_eq!(long.split(), None);
    }

    /// In a frame of its own, then with its bulk (if any) apart.
    fn round_trip<M>(msg: M)
    where
        M: bincode::Encode + bincode::Decode<()> + Bulk + Clone + PartialEq + std::fmt::Debug,
    {
        let mut out = Vec::new();
        assert_eq!(encode(&msg, &mut out), Ok(()), "{msg:?}");
        let mut split = msg.clone();
        let bulk = encode_with_bulk(&mut split, &mut out).expect("encodes");
        out.extend_from_slice(&bulk);
        let mut dec = FrameDecoder::new();
        dec.push(&out);
        assert_eq!(dec.next::<M>(), Ok(Some(msg.clone())));
        assert_eq!(dec.next::<M>(), Ok(Some(msg)));
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn every_fs_message_round_trips_in_a_frame() {
        for (id, request) in every_request().into_iter().enumerate() {
            assert_eq!(request.is_write(), id >= 8, "{request:?}");
            round_trip(ClientMessage::Request {
                id: id as u64,
                request: Request::Fs(request),
            });
        }
        for (id, response) in every_response().into_iter().enumerate() {
            round_trip(AgentMessage::Response {
                id: id as u64,
                response: Ok(Response::Fs(response)),
            });
        }
    }

    #[test]
    fn a_full_directory_page_fits_in_a_frame() {
        let entry = DirEntry {
            name: "n".repeat(255),
            attr: attr(FileKind::File),
            xattrs: Some(vec![b'x'; MAX_DIR_XATTRS]),
        };
        let page = FsResponse::Dir(DirPage {
            entries: vec![entry; MAX_DIR_PAGE as usize],
            next: Some(u64::MAX),
        });
        let mut out = Vec::new();
        let msg = AgentMessage::Response {
            id: u64::MAX,
            response: Ok(Response::Fs(page)),
        };
        assert_eq!(encode(&msg, &mut out), Ok(()));
        assert!(out.len() < MAX_FRAME_LEN / 2, "{} bytes", out.len());
    }
}
