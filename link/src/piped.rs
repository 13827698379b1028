//! File bytes that go to the client without passing through the agent's memory: `splice` moves
//! references to the file's cached pages into a pipe, and from the pipe into the socket. A
//! `pread` and a `write` of the same megabyte copy it twice; this halves the agent's CPU per
//! byte of a large read. The pages are the file's own until the client has received them, so
//! a write to the file meanwhile can show in the bytes sent, as it can in a `pread` that races
//! the write.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// Reads shorter than this are copied: a pipe costs more than a few pages.
pub const PIPED_MIN: usize = 64 * 1024;

/// Exactly `len` bytes of a file, held in a pipe of their own until written out.
#[derive(Debug)]
pub struct PipedBytes {
    read_end: OwnedFd,
    len: usize,
}

impl PipedBytes {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn pipe(&self) -> BorrowedFd<'_> {
        self.read_end.as_fd()
    }

    /// The bytes of `file` from `offset` up to `len` or its end, in a pipe. `None` when they
    /// cannot all go into one (a file system without splice, a pipe that cannot grow to `len`,
    /// a read that is not page-aligned filling the pipe early): the caller reads them instead.
    pub fn from_file(file: &File, offset: u64, len: usize) -> io::Result<Option<PipedBytes>> {
        let Some((read_end, write_end)) = pipe_for(len)? else {
            return Ok(None);
        };
        let mut filled = 0;
        while filled < len {
            let mut at = libc::off64_t::try_from(offset + filled as u64)
                .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            // SAFETY: both descriptors are open for the call; `at` is a valid offset pointer.
            let n = unsafe {
                libc::splice(
                    file.as_raw_fd(),
                    &mut at,
                    write_end.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - filled,
                    libc::SPLICE_F_NONBLOCK,
                )
            };
            match n {
                0 => break,
                n if n > 0 => filled += n as usize,
                _ => {
                    let error = io::Error::last_os_error();
                    match error.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        // No splice for this file, or the pipe is full before `len`.
                        Some(libc::EINVAL | libc::EAGAIN | libc::ENOSYS) => return Ok(None),
                        _ => return Err(error),
                    }
                }
            }
        }
        Ok(Some(PipedBytes {
            read_end,
            len: filled,
        }))
    }
}

/// A pipe that holds `len` bytes, or `None` if it cannot be made that big (the per-user pipe
/// limits) or made at all for lack of descriptors. Both ends non-blocking: a full or empty pipe is an answer, never a wait.
fn pipe_for(len: usize) -> io::Result<Option<(OwnedFd, OwnedFd)>> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            // Out of descriptors: the read can still be copied.
            Some(libc::EMFILE | libc::ENFILE) => Ok(None),
            _ => Err(error),
        };
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let wanted = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
    // SAFETY: F_SETPIPE_SZ on an open pipe; the kernel rounds the size up to whole pages.
    let size = unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
    if size < 0 || (size as usize) < len {
        return Ok(None);
    }
    Ok(Some((read_end, write_end)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn temp_file(tag: &str, bytes: &[u8]) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("mirrord-piped-{tag}-{}", std::process::id()));
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        let file = File::open(&path).unwrap();
        (path, file)
    }

    fn drain(piped: &PipedBytes) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pipe = File::from(piped.pipe().try_clone_to_owned().unwrap());
        let mut chunk = vec![0; 64 * 1024];
        while out.len() < piped.len() {
            let n = pipe.read(&mut chunk).unwrap();
            out.extend_from_slice(&chunk[..n]);
        }
        out
    }

    #[test]
    fn a_file_range_comes_through_the_pipe_whole_and_stops_at_the_end() {
        let bytes: Vec<u8> = (0..3 * 1024 * 1024 + 123)
            .map(|i: u32| (i % 251) as u8)
            .collect();
        let (path, file) = temp_file("range", &bytes);
        let piped = PipedBytes::from_file(&file, 4096, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(drain(&piped), &bytes[4096..4096 + (1 << 20)]);
        // The last megabyte is short: the file ends.
        let tail = (3 << 20) as u64;
        let piped = PipedBytes::from_file(&file, tail, 1 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(drain(&piped), &bytes[tail as usize..]);
        let past = PipedBytes::from_file(&file, 1 << 30, 1 << 20)
            .unwrap()
            .unwrap();
        assert!(past.is_empty());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_file_without_splice_is_left_to_the_caller() {
        // /dev/zero: splice works for it on some kernels and not on others; either way the
        // answer is all of it or none.
        let zero = File::open("/dev/zero").unwrap();
        if let Some(piped) = PipedBytes::from_file(&zero, 0, 128 * 1024).unwrap() {
            assert_eq!(drain(&piped), vec![0; 128 * 1024]);
        }
    }
}
