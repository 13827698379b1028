//! How much of its buffers each TCP connection may use, so that many busy connections cost a
//! bounded amount of memory while a lone bulk transfer still gets its full window.
//!
//! A connection's receive and send buffers are mappings of the full size
//! ([`crate::buffers`]), but smoltcp (patched, `third_party/smoltcp/PATCHED.md`) uses only
//! their first *capacity* bytes: the receive window never exceeds it, and pages beyond it are
//! never written. Each buffer starts at a few pages. A buffer that the stack finds full
//! again after more went through it (`core.rs`, `Memory::full_and_draining`) — the app waits
//! for our window while we read, or our writer waits for room while the app reads — doubles,
//! up to the full size, while the growth of all connections together stays within the budget;
//! a full buffer nobody drains would only hold more. A connection that goes idle drops back
//! to the first capacity and returns its growth to the budget. So N connections cost at most `N × 2 × first + budget` of buffer memory
//! however busy they are, and one connection alone grows to the full size within a few
//! window's worth of data.

use smoltcp::socket::tcp;

/// The capacities and the budget they grow within.
#[derive(Debug)]
pub(crate) struct Capacity {
    /// Each buffer's capacity when its connection starts or goes idle.
    first: usize,
    /// How far all connections' buffers together may grow beyond `first`.
    budget: usize,
    /// How far they have grown.
    grown: usize,
}

impl Capacity {
    pub(crate) fn new(first: usize, budget: usize) -> Self {
        Self {
            first,
            budget,
            grown: 0,
        }
    }

    /// Sets a new socket's buffers to the first capacity (before it connects or listens, so
    /// the window scale still covers the whole buffer).
    pub(crate) fn start(&self, socket: &mut tcp::Socket) {
        socket.set_recv_capacity(self.first);
        socket.set_send_capacity(self.first);
    }

    /// Doubles the socket's receive buffer if `rx` and its send buffer if `tx`, within the
    /// budget; true if the receive buffer grew (its larger window is then worth announcing at
    /// once).
    pub(crate) fn grow(&mut self, socket: &mut tcp::Socket, rx: bool, tx: bool) -> bool {
        let mut rx_grown = false;
        let now = socket.recv_capacity();
        if rx && let Some(to) = self.grant(now, socket.max_recv_capacity()) {
            // Growing always fits what the buffer holds; the check keeps the books right.
            rx_grown = socket.set_recv_capacity(to);
            if !rx_grown {
                self.grown -= to - now;
            }
        }
        let now = socket.send_capacity();
        if tx
            && let Some(to) = self.grant(now, socket.max_send_capacity())
            && !socket.set_send_capacity(to)
        {
            self.grown -= to - now;
        }
        rx_grown
    }

    /// Takes budget for doubling a buffer of capacity `now` (at most to `max`): the new
    /// capacity, or None when it is already full size or the budget is spent.
    fn grant(&mut self, now: usize, max: usize) -> Option<usize> {
        let to = now.saturating_mul(2).min(max);
        let more = to.checked_sub(now).filter(|&more| more > 0)?;
        (self.grown + more <= self.budget).then(|| {
            self.grown += more;
            to
        })
    }

    /// Drops an empty receive buffer back to the first capacity.
    pub(crate) fn shrink_recv(&mut self, socket: &mut tcp::Socket) {
        let now = socket.recv_capacity();
        if now > self.first && socket.set_recv_capacity(self.first) {
            self.grown -= now - self.first;
        }
    }

    /// Drops an empty send buffer back to the first capacity.
    pub(crate) fn shrink_send(&mut self, socket: &mut tcp::Socket) {
        let now = socket.send_capacity();
        if now > self.first && socket.set_send_capacity(self.first) {
            self.grown -= now - self.first;
        }
    }

    /// The socket is going away: its growth returns to the budget.
    pub(crate) fn forget(&mut self, socket: &tcp::Socket) {
        let grown = socket.recv_capacity().saturating_sub(self.first)
            + socket.send_capacity().saturating_sub(self.first);
        self.grown -= grown;
    }

    #[cfg(test)]
    pub(crate) fn grown(&self) -> usize {
        self.grown
    }
}

#[cfg(test)]
mod tests {
    use smoltcp::storage::RingBuffer;

    /// The ring's contents, oldest first.
    fn contents(ring: &mut RingBuffer<u8>) -> Vec<u8> {
        let mut out = vec![0; ring.len()];
        let n = ring.read_allocated(0, &mut out);
        out.truncate(n);
        out
    }

    #[test]
    fn a_ring_uses_only_its_capacity_and_keeps_its_contents_when_it_changes() {
        let mut storage = [0u8; 64];
        let mut ring = RingBuffer::new(&mut storage[..]);
        ring.set_capacity(8, 0);
        assert_eq!(ring.capacity(), 8);
        assert_eq!(ring.max_capacity(), 64);
        assert_eq!(
            ring.enqueue_slice(&[1; 20]),
            8,
            "the window is the capacity"
        );
        // Make the contents wrap around the end of the first 8 bytes.
        assert_eq!(ring.dequeue_slice(&mut [0; 6]), 6);
        assert_eq!(ring.enqueue_slice(&[2, 3, 4, 5]), 4);
        assert_eq!(contents(&mut ring), [1, 1, 2, 3, 4, 5]);
        ring.set_capacity(16, 0);
        assert_eq!(
            contents(&mut ring),
            [1, 1, 2, 3, 4, 5],
            "growing keeps the order"
        );
        assert_eq!(ring.enqueue_slice(&[6; 20]), 10);
        assert_eq!(ring.len(), 16);
        drop(ring);
        assert!(
            storage[16..].iter().all(|&b| b == 0),
            "nothing beyond the capacity is written"
        );
    }

    #[test]
    fn a_ring_keeps_unallocated_bytes_it_is_told_to_keep() {
        let mut storage = [0u8; 32];
        let mut ring = RingBuffer::new(&mut storage[..]);
        ring.set_capacity(8, 0);
        assert_eq!(ring.enqueue_slice(&[0; 6]), 6);
        assert_eq!(ring.dequeue_slice(&mut [0; 5]), 5);
        assert_eq!(ring.enqueue_slice(&[1]), 1);
        // Out-of-order bytes held beyond a gap of one, wrapping around the end.
        assert_eq!(ring.write_unallocated(1, &[8, 9, 10]), 3);
        ring.set_capacity(16, 2 + 4);
        assert_eq!(ring.write_unallocated(0, &[7]), 1);
        ring.enqueue_unallocated(4);
        assert_eq!(contents(&mut ring), [0, 1, 7, 8, 9, 10]);
    }

    #[test]
    #[should_panic(expected = "capacity below its contents")]
    fn a_ring_cannot_shrink_below_its_contents() {
        let mut storage = [0u8; 32];
        let mut ring = RingBuffer::new(&mut storage[..]);
        assert_eq!(ring.enqueue_slice(&[1; 10]), 10);
        ring.set_capacity(8, 0);
    }
}
