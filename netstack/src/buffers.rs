//! Memory for the TCP sockets' receive and send buffers that follows use.
//!
//! Each buffer is a private anonymous mapping of the full size (the advertised window needs
//! it), but a page of it only becomes resident when smoltcp first writes to it, so a flow costs
//! what it has had in flight, not its maximum. An idle flow's empty buffers are handed back to
//! the kernel ([`Region::release`]) and so are a closed flow's, which then wait in a [`Pool`]
//! for the next connection, sparing the mapping and unmapping of two regions per connection.

use std::ptr::NonNull;

/// One buffer's mapping.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; nothing about it is thread-bound.
unsafe impl Send for Region {}

impl Region {
    fn map(len: usize) -> Region {
        // SAFETY: a fresh private anonymous mapping aliases nothing; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            // As the global allocator does when memory runs out.
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(len, 1)
                    .unwrap_or(std::alloc::Layout::new::<u8>()),
            );
        }
        Region {
            // Cannot fail: mmap never returns null on success (address 0 is never mapped).
            ptr: NonNull::new(ptr.cast()).unwrap_or(NonNull::dangling()),
            len,
        }
    }

    /// The region as smoltcp's buffer storage.
    ///
    /// # Safety
    /// The returned slice must be dropped (its socket removed from the socket set) before this
    /// region is released to a pool or dropped, and no other slice of it may be alive.
    pub(crate) unsafe fn storage(&mut self) -> &'static mut [u8] {
        // SAFETY: the mapping is `len` bytes long, readable and writable, and the caller keeps
        // it alive and unaliased for as long as the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Gives the pages back to the kernel; they read as zeros when touched again.
    ///
    /// Call it only while the socket's ring buffer holds nothing: smoltcp writes a byte of its
    /// ring before it ever reads it, so it never sees the zeros this leaves behind.
    pub(crate) fn release(&self) {
        // SAFETY: the range is exactly this private anonymous mapping; MADV_DONTNEED only
        // replaces its pages with zero-fill-on-demand ones.
        unsafe {
            libc::madvise(self.ptr.as_ptr().cast(), self.len, libc::MADV_DONTNEED);
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `map` with this length and is unmapped only here.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// Released regions of one size, kept for new connections.
pub(crate) struct Pool {
    len: usize,
    free: Vec<Region>,
}

/// Regions kept beyond the live connections: enough for a burst of new connections, little
/// enough that the address space left mapped stays small (nothing of them is resident).
const KEEP: usize = 256;

impl Pool {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            len,
            free: Vec::new(),
        }
    }

    pub(crate) fn take(&mut self) -> Region {
        self.free.pop().unwrap_or_else(|| Region::map(self.len))
    }

    /// Takes back a region whose socket is gone.
    pub(crate) fn put(&mut self, region: Region) {
        if self.free.len() < KEEP && region.len == self.len {
            region.release();
            self.free.push(region);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident pages of the region, by mincore.
    fn resident(region: &Region) -> usize {
        let page = 4096;
        let mut pages = vec![0u8; region.len.div_ceil(page)];
        // SAFETY: the range is the region's mapping; `pages` has one byte per page.
        let rc =
            unsafe { libc::mincore(region.ptr.as_ptr().cast(), region.len, pages.as_mut_ptr()) };
        assert_eq!(rc, 0);
        pages.iter().filter(|&&p| p & 1 == 1).count()
    }

    #[test]
    fn pages_are_resident_only_once_written_and_until_released() {
        let mut pool = Pool::new(1 << 20);
        let mut region = pool.take();
        assert_eq!(resident(&region), 0, "a fresh region costs no memory");
        // SAFETY: the only slice of the region, dropped before the region goes back.
        let storage = unsafe { region.storage() };
        storage[..10_000].fill(7);
        assert_eq!(
            resident(&region),
            3,
            "10,000 bytes written touch three pages"
        );
        assert!(storage[..10_000].iter().all(|&b| b == 7));
        region.release();
        assert_eq!(resident(&region), 0);
        pool.put(region);
        let region = pool.take();
        assert_eq!(resident(&region), 0, "a pooled region comes back empty");
    }
}
