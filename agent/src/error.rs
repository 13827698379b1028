//! The agent's one error type: everything that can go wrong resolving a path, serving a file
//! or reading the target's /proc, each carrying the errno a POSIX call would have failed with,
//! so a request's failure reaches the client as the protocol's `RemoteError` without losing
//! either the errno or the message. It must never drop the operation and path an `io::Error`
//! happened on: a bare errno tells a user nothing about which file was refused.
//!
//! No `From<io::Error>`: an `io::Error` is always wrapped by [`io_err`] with its operation and
//! path, which a blanket conversion through `?` would silently leave out.

use std::ffi::OsString;
use std::fmt;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("empty path")]
    EmptyPath,
    #[error("path contains a NUL byte")]
    NulByte,
    #[error("path or path component too long")]
    NameTooLong,
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: is a directory")]
    IsDirectory(String),
    #[error("{0}: too many levels of symbolic links")]
    TooManySymlinks(String),
    /// A request the agent itself refuses (read-only session, no parent of the root, …).
    #[error("{path}: {why}")]
    Refused {
        path: String,
        why: &'static str,
        errno: i32,
    },
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("permission denied reading {0} (joining another user's namespaces needs root)")]
    PermissionDenied(String),
    #[error("hostname {0:?} is not UTF-8")]
    HostnameNotUtf8(OsString),
    #[error("helper thread for {0} died")]
    ThreadPanicked(String),
    /// A system call failed; `path` may be empty when the call names no file.
    #[error("{op}{}: {source}", Spaced(.path))]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The errno a POSIX call would have failed with, for the protocol's error replies.
    pub fn errno(&self) -> i32 {
        match self {
            Error::EmptyPath | Error::NotFound(_) => libc::ENOENT,
            Error::NulByte => libc::EINVAL,
            Error::NameTooLong => libc::ENAMETOOLONG,
            Error::NotADirectory(_) => libc::ENOTDIR,
            Error::IsDirectory(_) => libc::EISDIR,
            Error::TooManySymlinks(_) => libc::ELOOP,
            Error::Refused { errno, .. } => *errno,
            Error::NoSuchProcess(_) => libc::ESRCH,
            Error::PermissionDenied(_) => libc::EACCES,
            Error::HostnameNotUtf8(_) => libc::EILSEQ,
            Error::ThreadPanicked(_) => libc::EIO,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Wraps a failed call's error (an `io::Error` or a `nix` errno) with what was attempted on
/// which path: `.map_err(io_err("read", path))`.
pub(crate) fn io_err<'a, E: Into<io::Error>>(
    op: &'static str,
    path: &'a str,
) -> impl Fn(E) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source: source.into(),
    }
}

/// A path after a space, or nothing for an empty one.
struct Spaced<'a>(&'a str);

impl fmt::Display for Spaced<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " {}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_the_operation_and_the_path() {
        let denied = io_err("open", "/etc/shadow")(io::Error::from_raw_os_error(libc::EACCES));
        assert_eq!(denied.errno(), libc::EACCES);
        assert!(
            denied
                .to_string()
                .starts_with("open /etc/shadow: Permission denied"),
            "{denied}"
        );
        let unnamed = io_err("gethostname", "")(nix::errno::Errno::ENAMETOOLONG);
        assert!(
            unnamed.to_string().starts_with("gethostname: "),
            "{unnamed}"
        );
        let custom = io_err("read", "x")(io::Error::other("no errno"));
        assert_eq!(custom.errno(), libc::EIO);
        assert_eq!(Error::IsDirectory("/etc".into()).errno(), libc::EISDIR);
    }
}
