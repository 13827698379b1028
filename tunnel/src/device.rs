//! Asynchronous packet I/O on the TUN descriptor received from the launched process; it never
//! parses or alters packets (that is the netstack's job).
//!
//! A plain tokio `AsyncFd` rather than `tun_rs::AsyncDevice::from_fd`: tun-rs's real gain on
//! Linux is offload (GSO/GRO through `IFF_VNET_HDR`), which must be requested when the device is
//! created and which its `from_fd` cannot know about; without it, tun-rs would be the same
//! `read`/`write` on the same `AsyncFd`, plus a dependency.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The largest packet a TUN device carries: buffers of this size never truncate a packet.
pub const MAX_PACKET: usize = 65535;

/// One IP packet per read and per write (`IFF_TUN | IFF_NO_PI`: no extra header).
pub struct TunDevice {
    fd: AsyncFd<OwnedFd>,
}

impl TunDevice {
    /// Takes the descriptor from [`crate::TunReceiver::receive`] and makes it non-blocking.
    /// Must be called inside a Tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<TunDevice> {
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an OwnedFd's descriptor stays open and the same until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(TunDevice { fd })
    }

    /// Waits for one packet and copies it into `buf`. A buffer shorter than the packet gets
    /// its beginning only: use [`MAX_PACKET`] (or the MTU) bytes.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |fd| read(fd.as_raw_fd(), buf))
            .await
    }

    /// Waits for at least one packet, then reads as many as are queued, up to `bufs.len()`,
    /// without waiting again. `lens[i]` gets the length of the packet in `bufs[i]`; returns the
    /// number of packets read (at least 1).
    pub async fn recv_batch<B: AsMut<[u8]>>(
        &self,
        bufs: &mut [B],
        lens: &mut [usize],
    ) -> io::Result<usize> {
        let max = bufs.len().min(lens.len());
        if max == 0 {
            return Ok(0);
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut count = 0;
            while count < max {
                match read(self.fd.as_raw_fd(), bufs[count].as_mut()) {
                    Ok(n) => {
                        lens[count] = n;
                        count += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) if count == 0 => return Err(e),
                    // Report what was read; the error comes back on the next call.
                    Err(_) => break,
                }
            }
            if count > 0 {
                return Ok(count);
            }
        }
    }

    /// Writes one whole IP packet.
    pub async fn send(&self, packet: &[u8]) -> io::Result<()> {
        let written = self
            .fd
            .async_io(Interest::WRITABLE, |fd| {
                // SAFETY: write(2) from a live buffer of the given length.
                let n =
                    unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await?;
        if written == packet.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the TUN device took part of a packet",
            ))
        }
    }
}

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into a live buffer of the given length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl AsFd for TunDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsRawFd for TunDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A SOCK_SEQPACKET pair keeps packet boundaries like a TUN, without needing one.
    fn packet_pair() -> (OwnedFd, OwnedFd) {
        let mut fds = [-1; 2];
        // SAFETY: socketpair(2) writes two descriptors into the array.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0);
        // SAFETY: just created, owned by nothing else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[tokio::test]
    async fn batches_drain_what_is_queued_without_waiting_again() {
        let (device_end, peer) = packet_pair();
        let tun = TunDevice::new(device_end).expect("device");
        for packet in [&b"one"[..], b"two", b"three"] {
            write_all(&peer, packet);
        }
        let mut bufs = vec![vec![0u8; 64]; 2];
        let mut lens = [0usize; 2];
        assert_eq!(tun.recv_batch(&mut bufs, &mut lens).await.ok(), Some(2));
        assert_eq!(&bufs[0][..lens[0]], b"one");
        assert_eq!(&bufs[1][..lens[1]], b"two");
        assert_eq!(tun.recv_batch(&mut bufs, &mut lens).await.ok(), Some(1));
        assert_eq!(&bufs[0][..lens[0]], b"three");

        tun.send(b"reply").await.expect("send");
        let mut buf = [0u8; 16];
        assert_eq!(read(peer.as_raw_fd(), &mut buf).ok(), Some(5));
        assert_eq!(&buf[..5], b"reply");
        write_all(&peer, b"single");
        assert_eq!(tun.recv(&mut buf).await.ok(), Some(6));
        assert_eq!(&buf[..6], b"single");
    }

    fn write_all(fd: &OwnedFd, packet: &[u8]) {
        // SAFETY: write(2) from a live buffer of the given length.
        let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        assert_eq!(n, packet.len() as isize);
    }
}
