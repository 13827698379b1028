//! Asynchronous packet I/O on the TUN descriptor received from the launched process; it never
//! parses or alters packets (that is the netstack's job).
//!
//! A plain tokio `AsyncFd` rather than `tun_rs::AsyncDevice::from_fd`. tun-rs's gain on Linux
//! is offload, and its offload is built for a device that feeds a wire of ~1,500 bytes: it
//! splits each large segment the kernel hands over into MTU-sized packets and computes their
//! checksums. The netstack takes a 64 KiB segment whole (the device's MTU is 65520), so all it
//! needs from offload is the virtio-net header in front of each packet: see [`TunDevice`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// The largest packet a TUN device carries: buffers of this size never truncate a packet.
pub const MAX_PACKET: usize = 65535;

/// `struct virtio_net_hdr` (10 bytes, native byte order on a TUN device), in front of every
/// packet read or written on a device created with `IFF_VNET_HDR`.
const VNET_HDR_LEN: usize = 10;

/// `flags` of a virtio-net header: the checksum at `csum_start + csum_offset` is partial.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;

/// One IP packet per read and per write (`IFF_TUN | IFF_NO_PI`).
///
/// On a device created with offload ([`crate::TunPlan::with_offload`]: `IFF_VNET_HDR` and
/// `TUNSETOFFLOAD` with checksum and TCP segmentation offload), the kernel neither computes
/// the checksums of the packets it hands over nor cuts a TCP send into MTU-sized segments: a
/// packet may carry a partial checksum (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), which the netstack,
/// reading a local kernel, does not verify, and a TCP segment of up to 64 KiB, which it takes
/// whole. A packet written either has complete checksums ([`TunDevice::send`]: the kernel
/// verifies them) or a partial TCP checksum ([`TunDevice::send_partial`]: the kernel treats it
/// as it treats its own sends, and a local socket takes it without a checksum pass). The header
/// is read and written with the packet in one `readv`/`writev`.
pub struct TunDevice {
    fd: AsyncFd<OwnedFd>,
    /// Each packet is preceded by a virtio-net header (`IFF_VNET_HDR`).
    vnet_hdr: bool,
}

impl TunDevice {
    /// Takes the descriptor from [`crate::TunReceiver::receive`] and makes it non-blocking.
    /// Must be called inside a Tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<TunDevice> {
        let vnet_hdr = interface_flags(fd.as_raw_fd())? & libc::IFF_VNET_HDR != 0;
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
        Ok(TunDevice { fd, vnet_hdr })
    }

    /// Whether the device was created with offload (packets carry a virtio-net header).
    pub fn offload(&self) -> bool {
        self.vnet_hdr
    }

    /// Waits for one packet and copies it into `buf`. A buffer shorter than the packet gets
    /// its beginning only: use [`MAX_PACKET`] (or the MTU) bytes.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.fd
            .async_io(Interest::READABLE, |fd| {
                read_packet(fd.as_raw_fd(), self.vnet_hdr, buf.as_mut_ptr(), buf.len())
            })
            .await
    }

    /// Waits for at least one packet, then reads as many as are queued, up to `bufs.len()`,
    /// without waiting again: each buffer is emptied and gets one packet, read into its spare
    /// capacity (give each at least [`MAX_PACKET`]), so a buffer that is reused is never
    /// zeroed or copied. Returns the number of packets read (at least 1).
    pub async fn recv_batch(&self, bufs: &mut [Vec<u8>]) -> io::Result<usize> {
        if bufs.is_empty() {
            return Ok(0);
        }
        loop {
            let mut guard = self.fd.readable().await?;
            let mut count = 0;
            while let Some(buf) = bufs.get_mut(count) {
                buf.clear();
                let spare = buf.spare_capacity_mut();
                match read_packet(
                    self.fd.as_raw_fd(),
                    self.vnet_hdr,
                    spare.as_mut_ptr().cast(),
                    spare.len(),
                ) {
                    Ok(n) => {
                        // SAFETY: the kernel wrote `n` bytes at the start of the spare capacity.
                        unsafe { buf.set_len(n) };
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

    /// Writes one whole IP packet whose checksums are complete.
    pub async fn send(&self, packet: &[u8]) -> io::Result<()> {
        // flags 0, GSO_NONE: a complete packet, whose checksums the kernel checks.
        self.write(packet, [0u8; VNET_HDR_LEN]).await
    }

    /// Writes one IP packet whose transport checksum, at `start + offset`, holds only the
    /// pseudo-header sum: the kernel takes it as partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`), which
    /// a local socket accepts without computing it. Only on a device with [`Self::offload`].
    pub async fn send_partial(&self, packet: &[u8], start: u16, offset: u16) -> io::Result<()> {
        if !self.vnet_hdr {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a partial checksum needs a TUN device with offload",
            ));
        }
        let mut header = [0u8; VNET_HDR_LEN];
        header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        // virtio-net header fields are in the host's byte order on a TUN device.
        header[6..8].copy_from_slice(&start.to_ne_bytes());
        header[8..10].copy_from_slice(&offset.to_ne_bytes());
        self.write(packet, header).await
    }

    async fn write(&self, packet: &[u8], header: [u8; VNET_HDR_LEN]) -> io::Result<()> {
        let header: &[u8] = if self.vnet_hdr { &header } else { &[] };
        let expected = header.len() + packet.len();
        let written = self
            .fd
            .async_io(Interest::WRITABLE, |fd| {
                let iov = [
                    libc::iovec {
                        iov_base: header.as_ptr().cast_mut().cast(),
                        iov_len: header.len(),
                    },
                    libc::iovec {
                        iov_base: packet.as_ptr().cast_mut().cast(),
                        iov_len: packet.len(),
                    },
                ];
                // SAFETY: writev(2) from live buffers described by `iov`.
                let n = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await?;
        if written == expected {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "the TUN device took part of a packet",
            ))
        }
    }
}

/// The device's `IFF_*` flags (TUNGETIFF).
fn interface_flags(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: an all-zero ifreq is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes an ifreq that lives on this frame.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
        let err = io::Error::last_os_error();
        // Not a TUN device (a socket pair standing in for one in tests): no header.
        if err.raw_os_error() == Some(libc::EBADFD) || err.raw_os_error() == Some(libc::ENOTTY) {
            return Ok(0);
        }
        return Err(err);
    }
    // SAFETY: TUNGETIFF filled in the flags member.
    Ok(libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }))
}

/// Reads one packet into `len` bytes at `buf`, past its virtio-net header when there is one
/// (the header is read into a scratch array and dropped: the netstack needs none of it).
fn read_packet(fd: RawFd, vnet_hdr: bool, buf: *mut u8, len: usize) -> io::Result<usize> {
    let mut header = [0u8; VNET_HDR_LEN];
    let iov = [
        libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: buf.cast(),
            iov_len: len,
        },
    ];
    let iov = if vnet_hdr { &iov[..] } else { &iov[1..] };
    // SAFETY: readv(2) into live buffers described by `iov`.
    let n = unsafe { libc::readv(fd, iov.as_ptr(), iov.len() as i32) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    if vnet_hdr {
        // A read shorter than the header carries no packet.
        Ok(n.saturating_sub(VNET_HDR_LEN))
    } else {
        Ok(n)
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
        let mut bufs: Vec<Vec<u8>> = (0..2).map(|_| Vec::with_capacity(64)).collect();
        assert_eq!(tun.recv_batch(&mut bufs).await.ok(), Some(2));
        assert_eq!(bufs[0], b"one");
        assert_eq!(bufs[1], b"two");
        assert_eq!(tun.recv_batch(&mut bufs).await.ok(), Some(1));
        assert_eq!(bufs[0], b"three");

        tun.send(b"reply").await.expect("send");
        let mut buf = [0u8; 16];
        assert_eq!(
            read_packet(peer.as_raw_fd(), false, buf.as_mut_ptr(), buf.len()).ok(),
            Some(5)
        );
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
