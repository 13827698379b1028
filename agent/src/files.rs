//! File service: reads files of the target's filesystem on the CLI's behalf, always through
//! [`open_in_root`], and must never open a path any other way.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::fcntl::OFlag;

use crate::confine::{ConfineError, open_in_root};

/// Largest single read served; `len` comes from the wire, and this keeps one request from
/// making the agent allocate gigabytes. Shorter reads are normal `pread` semantics.
pub const MAX_READ_LEN: u32 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Confine(#[from] ConfineError),
    #[error("{0}: is a directory")]
    IsDirectory(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl FileError {
    /// The errno a POSIX call would have failed with, for the file protocol's error replies.
    pub fn errno(&self) -> i32 {
        match self {
            FileError::Confine(e) => e.errno(),
            FileError::IsDirectory(_) => libc::EISDIR,
            FileError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Reads up to `len` bytes (at most [`MAX_READ_LEN`]) at `offset` of `path` inside `root`;
/// fewer bytes mean end of file.
pub fn read_file(root: &Path, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, FileError> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer shows up;
    // it changes nothing for regular files. O_NOCTTY: a pod's tty must not become ours.
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = open_in_root(root, path, flags)?;
    let io_err = |op, source| FileError::Io {
        op,
        path: path.to_owned(),
        source,
    };
    let meta = file.metadata().map_err(|e| io_err("stat", e))?;
    if meta.is_dir() {
        return Err(FileError::IsDirectory(path.to_owned()));
    }
    read_at(&file, offset, len.min(MAX_READ_LEN) as usize).map_err(|e| io_err("read", e))
}

/// `pread` until `want` bytes or end of file: one `pread` may return less on some files. The
/// bytes go into uninitialised capacity: zeroing a megabyte first costs as much as reading it.
fn read_at(file: &File, offset: u64, want: usize) -> io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::with_capacity(want);
    while buf.len() < want {
        let at = offset
            .checked_add(buf.len() as u64)
            .and_then(|at| libc::off_t::try_from(at).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let missing = want - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..missing];
        // SAFETY: `spare` is valid for writes of `spare.len()` bytes, the most pread writes;
        // `file` is an open descriptor for the whole call.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        match usize::try_from(n) {
            Ok(0) => break,
            // SAFETY: pread just initialised the first `n` (at most `missing`) spare bytes.
            Ok(n) => unsafe { buf.set_len(buf.len() + n) },
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A fake pod root removed on drop.
    struct Root(PathBuf);

    impl Root {
        fn new(tag: &str) -> Root {
            let dir = std::env::temp_dir()
                .join(format!("mirrord-agent-files-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(dir.join("etc")).unwrap();
            std::fs::write(dir.join("etc/hostname"), "pod-1\n").unwrap();
            std::os::unix::fs::symlink("/etc/hostname", dir.join("link")).unwrap();
            nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
            Root(dir)
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_ranges_and_errors_carry_errnos() {
        let root = Root::new("read");
        let r = &root.0;
        assert_eq!(read_file(r, "/etc/hostname", 0, 100).unwrap(), b"pod-1\n");
        assert_eq!(read_file(r, "link", 4, 100).unwrap(), b"1\n");
        assert_eq!(read_file(r, "etc/hostname", 1, 2).unwrap(), b"od");
        assert_eq!(read_file(r, "etc/hostname", 100, 10).unwrap(), b"");
        assert_eq!(read_file(r, "../../etc/hostname", 0, 0).unwrap(), b"");
        let errno = |p: &str| read_file(r, p, 0, 10).err().map(|e| e.errno());
        assert_eq!(errno("etc"), Some(libc::EISDIR));
        assert_eq!(errno("/"), Some(libc::EISDIR));
        assert_eq!(errno("etc/missing"), Some(libc::ENOENT));
        assert_eq!(errno("etc/hostname/"), Some(libc::ENOTDIR));
        assert_eq!(errno("a\0b"), Some(libc::EINVAL));
        // A FIFO without a writer must not hang the agent.
        assert_eq!(errno("fifo"), Some(libc::ESPIPE));
        let err = read_file(r, "etc", 0, 1).err().map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some("etc: is a directory"));
    }

    #[test]
    fn huge_lengths_are_capped() {
        let root = Root::new("big");
        let big = root.0.join("big");
        std::fs::write(&big, vec![7u8; MAX_READ_LEN as usize + 10]).unwrap();
        let got = read_file(&root.0, "big", 0, u32::MAX).unwrap();
        assert_eq!(got.len(), MAX_READ_LEN as usize);
        let tail = read_file(&root.0, "big", MAX_READ_LEN as u64, u32::MAX).unwrap();
        assert_eq!(tail.len(), 10);
    }
}
