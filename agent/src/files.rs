//! File service: reads files of the target's filesystem on the CLI's behalf, always through
//! [`open_in_root`], and must never open a path any other way.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::fcntl::OFlag;

use mirrord_link::piped::{PIPED_MIN, PipedBytes};
use mirrord_protocol::bulk::MAX_FILE_READ;

use crate::confine::open_in_root;
use crate::error::{Error, io_err};

/// A file's bytes on their way to the client.
#[derive(Debug)]
pub enum FileBytes {
    /// In a pipe, to be spliced into the connection (large reads of regular files).
    Piped(PipedBytes),
    Copied(Vec<u8>),
}

impl FileBytes {
    /// The bytes in memory, drained from their pipe if they are in one (for the agent's own
    /// use of a file, and for callers that cannot splice).
    pub fn into_vec(self) -> io::Result<Vec<u8>> {
        match self {
            FileBytes::Copied(bytes) => Ok(bytes),
            FileBytes::Piped(piped) => {
                let mut bytes = vec![0; piped.len()];
                let mut filled = 0;
                while filled < bytes.len() {
                    match nix::unistd::read(piped.pipe().as_raw_fd(), &mut bytes[filled..]) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => filled += n,
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(errno) => return Err(errno.into()),
                    }
                }
                Ok(bytes)
            }
        }
    }
}

/// The agent's one way to read a file: up to `len` bytes (at most [`MAX_FILE_READ`], whatever
/// the wire asked) at `offset` of `path` inside `root`; fewer bytes mean end of file. A large
/// read of a regular file is left in a pipe, to be spliced into the connection; the rest is
/// copied.
pub fn read(root: &Path, path: &str, offset: u64, len: u32) -> Result<FileBytes, Error> {
    let (file, meta) = open_for_reading(root, path)?;
    let len = len.min(MAX_FILE_READ) as usize;
    // Only regular files: splicing from a FIFO would consume what a failed attempt leaves.
    if meta.is_file()
        && len >= PIPED_MIN
        && let Some(piped) =
            PipedBytes::from_file(&file, offset, len).map_err(io_err("read", path))?
    {
        return Ok(FileBytes::Piped(piped));
    }
    read_at(&file, offset, len)
        .map(FileBytes::Copied)
        .map_err(io_err("read", path))
}

fn open_for_reading(root: &Path, path: &str) -> Result<(File, std::fs::Metadata), Error> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer shows up;
    // it changes nothing for regular files. O_NOCTTY: a pod's tty must not become ours.
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = open_in_root(root, path, flags)?;
    let meta = file.metadata().map_err(io_err("stat", path))?;
    if meta.is_dir() {
        return Err(Error::IsDirectory(path.to_owned()));
    }
    Ok((file, meta))
}

/// `pread` until `want` bytes or end of file: one `pread` may return less on some files. The
/// bytes go into uninitialised capacity: zeroing a megabyte first costs as much as reading it.
pub(crate) fn read_at(file: &File, offset: u64, want: usize) -> io::Result<Vec<u8>> {
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

    /// Reads into memory, whichever way the bytes came.
    fn read_file(root: &Path, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, Error> {
        read(root, path, offset, len).map(|bytes| bytes.into_vec().unwrap())
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
    fn piped_reads_hold_exactly_the_bytes_a_copied_read_would() {
        let root = Root::new("piped");
        let r = &root.0;
        let content: Vec<u8> = (0..3 * MAX_FILE_READ + 777)
            .map(|i| (i % 253) as u8)
            .collect();
        std::fs::write(r.join("big"), &content).unwrap();
        let mib = MAX_FILE_READ as u64;
        // (offset, len): aligned, unaligned, the short tail, past the end, small.
        for (offset, len) in [
            (0, mib),
            (mib, mib),
            (100, mib),
            (3 * mib, mib),
            (9 * mib, mib),
            (5, 1000),
        ] {
            let bytes = read(r, "big", offset, len as u32).unwrap();
            let piped = matches!(bytes, FileBytes::Piped(_));
            let start = (offset as usize).min(content.len());
            let end = (start + len as usize).min(content.len());
            assert_eq!(
                bytes.into_vec().unwrap(),
                &content[start..end],
                "at {offset}+{len}"
            );
            if offset == 0 {
                assert!(piped, "a large aligned read of a regular file goes by pipe");
            }
            if len < PIPED_MIN as u64 {
                assert!(!piped, "a small read is copied");
            }
        }
        // Not a regular file: never spliced (a FIFO would lose what a failed attempt took).
        let errno = read(r, "fifo", 0, MAX_FILE_READ).err().map(|e| e.errno());
        assert_eq!(errno, Some(libc::ESPIPE));
        let errno = read(r, "etc", 0, MAX_FILE_READ).err().map(|e| e.errno());
        assert_eq!(errno, Some(libc::EISDIR));
    }

    #[test]
    fn huge_lengths_are_capped() {
        let root = Root::new("big");
        let big = root.0.join("big");
        std::fs::write(&big, vec![7u8; MAX_FILE_READ as usize + 10]).unwrap();
        let got = read_file(&root.0, "big", 0, u32::MAX).unwrap();
        assert_eq!(got.len(), MAX_FILE_READ as usize);
        let tail = read_file(&root.0, "big", MAX_FILE_READ as u64, u32::MAX).unwrap();
        assert_eq!(tail.len(), 10);
    }
}
