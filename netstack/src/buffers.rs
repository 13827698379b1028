//! Memory for the TCP sockets' receive and send buffers that follows use.
//!
//! Each buffer is a private anonymous mapping of the full size (the advertised window needs
//! it), but a page of it only becomes resident when smoltcp first writes to it, so a flow costs
//! what it has had in flight, not its maximum. An idle flow's empty buffers are handed back to
//! the kernel ([`Region::release`]). A closed flow's buffers wait in a [`Pool`] for the next
//! connection, sparing the mapping and unmapping of two regions per connection; they keep
//! their first pages (what every connection uses) and give back only what the flow grew into,
//! so a short connection costs no `madvise` and its successor no page faults.

use std::ptr::NonNull;

/// One buffer's mapping.
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
    /// How many bytes from the start may have been written since the pages were last given
    /// back: what the socket was allowed to use ([`Region::may_use`]).
    touched: usize,
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
            touched: 0,
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

    /// Records that the socket may now write the first `bytes` of the region (its buffer's
    /// capacity): only those are given back later.
    pub(crate) fn may_use(&mut self, bytes: usize) {
        self.touched = self.touched.max(bytes.min(self.len));
    }

    /// Gives the pages back to the kernel; they read as zeros when touched again.
    ///
    /// Call it only while the socket's ring buffer holds nothing: smoltcp writes a byte of its
    /// ring before it ever reads it, so it never sees the zeros this leaves behind.
    pub(crate) fn release(&mut self) {
        self.release_beyond(0);
    }

    /// Gives back the pages beyond the first `keep` bytes (rounded up to a page), if any may
    /// have been written; no system call otherwise.
    fn release_beyond(&mut self, keep: usize) {
        let from = keep.next_multiple_of(PAGE).min(self.len);
        if self.touched > from {
            // SAFETY: the range lies within this private anonymous mapping (`from` is a page
            // boundary); MADV_DONTNEED only replaces its pages with zero-fill-on-demand ones.
            unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add(from).cast(),
                    self.touched - from,
                    libc::MADV_DONTNEED,
                );
            }
        }
        self.touched = self.touched.min(from);
    }
}

/// The page size every Linux architecture mirrord runs on has (a smaller guess only costs a
/// page kept).
const PAGE: usize = 4096;

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
    /// Bytes at the start of each pooled region that stay resident.
    keep: usize,
    free: Vec<Region>,
}

/// Regions kept beyond the live connections: enough for a burst of new connections, little
/// enough that the address space left mapped stays small and what stays resident (`keep`
/// bytes of each) too.
const KEEP: usize = 256;

impl Pool {
    /// Regions of `len` bytes whose first `keep` bytes stay resident while pooled.
    pub(crate) fn new(len: usize, keep: usize) -> Self {
        Self {
            len,
            keep,
            free: Vec::new(),
        }
    }

    pub(crate) fn take(&mut self) -> Region {
        self.free.pop().unwrap_or_else(|| Region::map(self.len))
    }

    /// Takes back a region whose socket is gone.
    pub(crate) fn put(&mut self, mut region: Region) {
        if self.free.len() < KEEP && region.len == self.len {
            region.release_beyond(self.keep);
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
        let mut pool = Pool::new(1 << 20, 0);
        let mut region = pool.take();
        assert_eq!(resident(&region), 0, "a fresh region costs no memory");
        region.may_use(10_000);
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

    #[test]
    fn a_pooled_region_keeps_its_first_pages_and_gives_back_what_it_grew_into() {
        let mut pool = Pool::new(1 << 20, 16 * 1024);
        let mut region = pool.take();
        region.may_use(16 * 1024);
        // SAFETY: the only slice of the region, dropped before the region goes back.
        let storage = unsafe { region.storage() };
        storage[..16 * 1024].fill(1);
        pool.put(region);
        let mut region = pool.take();
        assert_eq!(
            resident(&region),
            4,
            "a connection that never grew leaves its 4 pages"
        );
        region.may_use(256 * 1024);
        // SAFETY: as above.
        let storage = unsafe { region.storage() };
        storage[..256 * 1024].fill(2);
        assert_eq!(resident(&region), 64);
        pool.put(region);
        let mut region = pool.take();
        assert_eq!(resident(&region), 4, "what it grew into is given back");
        region.release();
        assert_eq!(
            resident(&region),
            0,
            "an idle connection gives back everything"
        );
    }
}
