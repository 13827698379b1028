//! Stream ids and per-stream credit flow control for one connection: who may open which id, how
//! many bytes each side may still send, and when to grant the peer more. It never buffers data,
//! performs I/O or tracks half-close; the async layer owns those and asks this state machine
//! before every send and after every receive.
//!
//! Each stream starts with [`INITIAL_WINDOW`] bytes of send credit in both directions. A receiver
//! grants credit back only as its consumer drains bytes, so one stalled consumer stops only its
//! own stream, and what a peer can make us buffer per stream is bounded by the window.

use std::collections::HashMap;

use crate::bulk::MAX_DATA_CHUNK;
use crate::error::ProtocolError;
use crate::messages::{StreamFrame, StreamId};

/// Send credit each side has on a new stream, and the most it may ever hold.
pub const INITIAL_WINDOW: u32 = 512 * 1024;

/// Most streams open at once on one connection, whoever opened them. A peer's open beyond it is
/// refused (the stream alone, not the connection): each open stream costs the other side a
/// socket and a task, so a flood of opens from one session must not use up what the others
/// need. Far above what one app opens at once (the load target is 1,000 concurrent flows).
pub const MAX_STREAMS: usize = 4096;

/// Credit is returned in batches of at least this much, so a reader consuming a few bytes at a
/// time does not cause a `Credit` frame per read.
const CREDIT_BATCH: u32 = INITIAL_WINDOW / 4;

/// Which end of the connection this multiplexer runs on; decides the parity of ids it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Opens odd ids (1, 3, 5, …).
    Client,
    /// Opens even ids (2, 4, …); 0 is never used.
    Agent,
}

impl Side {
    fn first_id(self) -> u32 {
        match self {
            Side::Client => 1,
            Side::Agent => 2,
        }
    }

    fn opens(self, id: StreamId) -> bool {
        match self {
            Side::Client => !id.0.is_multiple_of(2),
            Side::Agent => id.0 != 0 && id.0.is_multiple_of(2),
        }
    }

    fn peer(self) -> Side {
        match self {
            Side::Client => Side::Agent,
            Side::Agent => Side::Client,
        }
    }
}

/// What to do with a `Data` frame that passed flow control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerdict {
    /// Hand the bytes to the stream's consumer.
    Deliver,
    /// The stream is already closed or reset here; data in flight when that happened is a legal
    /// race, not an error, and is dropped.
    Discard,
}

#[derive(Debug, Clone)]
struct StreamState {
    /// Bytes we may still send.
    send_credit: u32,
    /// Bytes the peer may still send before it must wait for our `Credit`.
    recv_window: u32,
    /// Bytes our consumer drained that we have not yet granted back.
    owed: u32,
}

impl StreamState {
    fn new() -> Self {
        Self {
            send_credit: INITIAL_WINDOW,
            recv_window: INITIAL_WINDOW,
            owed: 0,
        }
    }
}

#[derive(Debug)]
pub struct Mux {
    side: Side,
    next_id: u32,
    streams: HashMap<StreamId, StreamState>,
}

impl Mux {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            next_id: side.first_id(),
            streams: HashMap::new(),
        }
    }

    /// Registers a locally opened stream under the next free id of our parity. Ids wrap around
    /// after `u32::MAX`, skipping ids still open. (Running out would take 2³¹ open streams, far
    /// beyond what memory allows, so the search always ends.)
    pub fn open(&mut self) -> StreamId {
        loop {
            let id = StreamId(self.next_id);
            self.next_id = self.next_id.checked_add(2).unwrap_or(self.side.first_id());
            if let std::collections::hash_map::Entry::Vacant(slot) = self.streams.entry(id) {
                slot.insert(StreamState::new());
                return id;
            }
        }
    }

    /// Registers a stream the peer opened. [`ProtocolError::TooManyStreams`] refuses this one
    /// stream (the caller answers it as failed); every other error breaks the protocol.
    pub fn on_open(&mut self, id: StreamId) -> Result<(), ProtocolError> {
        if !self.side.peer().opens(id) {
            return Err(ProtocolError::StreamIdParity(id));
        }
        let open = self.streams.len();
        match self.streams.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => Err(ProtocolError::StreamIdInUse(id)),
            std::collections::hash_map::Entry::Vacant(_) if open >= MAX_STREAMS => {
                Err(ProtocolError::TooManyStreams { max: MAX_STREAMS })
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(StreamState::new());
                Ok(())
            }
        }
    }

    /// Bytes we may still send on `id`; 0 for unknown streams.
    pub fn send_credit(&self, id: StreamId) -> u32 {
        self.streams.get(&id).map_or(0, |s| s.send_credit)
    }

    /// Takes up to `min(want, credit, MAX_DATA_CHUNK)` bytes of send credit; 0 means wait for
    /// `Credit` (or the stream is unknown).
    pub fn take_send_credit(&mut self, id: StreamId, want: usize) -> usize {
        let Some(stream) = self.streams.get_mut(&id) else {
            return 0;
        };
        let n = want.min(stream.send_credit as usize).min(MAX_DATA_CHUNK);
        // `n <= send_credit`, a u32, so the cast is lossless.
        stream.send_credit -= n as u32;
        n
    }

    /// The peer sent `len` data bytes on `id`.
    pub fn on_data(&mut self, id: StreamId, len: usize) -> Result<DataVerdict, ProtocolError> {
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(DataVerdict::Discard);
        };
        if len > stream.recv_window as usize {
            return Err(ProtocolError::FlowControlViolation {
                id,
                len,
                window: stream.recv_window,
            });
        }
        // Checked just above: `len <= recv_window`.
        stream.recv_window -= len as u32;
        Ok(DataVerdict::Deliver)
    }

    /// Our consumer drained `len` bytes of `id`; returns a `Credit` frame to send once at least
    /// a quarter window is owed, so credit goes back in batches.
    ///
    /// Draining more than was delivered is clamped: a caller's miscount must not let the peer
    /// send more than the window.
    pub fn on_consumed(&mut self, id: StreamId, len: usize) -> Option<StreamFrame> {
        let stream = self.streams.get_mut(&id)?;
        let undrained = INITIAL_WINDOW - stream.recv_window - stream.owed;
        // Clamped to `undrained`, a u32.
        stream.owed += len.min(undrained as usize) as u32;
        if stream.owed < CREDIT_BATCH {
            return None;
        }
        let bytes = std::mem::take(&mut stream.owed);
        stream.recv_window += bytes;
        Some(StreamFrame::Credit { id, bytes })
    }

    /// The peer granted `bytes` more credit on `id`. Credit for an unknown stream is ignored: it
    /// may have been in flight when we closed the stream.
    pub fn on_credit(&mut self, id: StreamId, bytes: u32) -> Result<(), ProtocolError> {
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        match stream.send_credit.checked_add(bytes) {
            Some(credit) if credit <= INITIAL_WINDOW => {
                stream.send_credit = credit;
                Ok(())
            }
            _ => Err(ProtocolError::CreditOverflow { id }),
        }
    }

    /// Forgets the stream (after `Reset`, `OpenFailed`, or both directions shut down); its id
    /// may then be opened again.
    pub fn close(&mut self, id: StreamId) {
        self.streams.remove(&id);
    }

    pub fn contains(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends up to `want` bytes from `tx` to `rx` on `id` the way the async layer would: take
    /// credit, then the receiver checks the data. Returns the bytes sent.
    fn send(tx: &mut Mux, rx: &mut Mux, id: StreamId, mut want: usize) -> usize {
        let mut sent = 0;
        loop {
            let n = tx.take_send_credit(id, want);
            if n == 0 {
                return sent;
            }
            assert_eq!(rx.on_data(id, n), Ok(DataVerdict::Deliver));
            sent += n;
            want -= n;
        }
    }

    /// Receiver drains `len` bytes; any credit it emits is applied to the sender.
    fn consume(rx: &mut Mux, tx: &mut Mux, id: StreamId, len: usize) -> Option<u32> {
        let frame = rx.on_consumed(id, len)?;
        let StreamFrame::Credit { id: cid, bytes } = frame else {
            panic!("on_consumed returns only Credit, got {frame:?}");
        };
        assert_eq!(cid, id);
        assert_eq!(tx.on_credit(id, bytes), Ok(()));
        Some(bytes)
    }

    fn pair() -> (Mux, Mux, StreamId) {
        let mut client = Mux::new(Side::Client);
        let mut agent = Mux::new(Side::Agent);
        let id = client.open();
        assert_eq!(agent.on_open(id), Ok(()));
        (client, agent, id)
    }

    const WINDOW: usize = INITIAL_WINDOW as usize;

    #[test]
    fn ids_have_the_openers_parity() {
        let mut client = Mux::new(Side::Client);
        let mut agent = Mux::new(Side::Agent);
        let c: Vec<u32> = (0..4).map(|_| client.open().0).collect();
        let a: Vec<u32> = (0..4).map(|_| agent.open().0).collect();
        assert_eq!(c, [1, 3, 5, 7]);
        assert_eq!(a, [2, 4, 6, 8]);
        for id in a {
            assert_eq!(client.on_open(StreamId(id)), Ok(()));
        }
        for id in c {
            assert_eq!(agent.on_open(StreamId(id)), Ok(()));
        }
        assert_eq!(client.len(), 8);
        // The peer may not open ids of our parity, nor 0.
        assert_eq!(
            client.on_open(StreamId(9)),
            Err(ProtocolError::StreamIdParity(StreamId(9)))
        );
        assert_eq!(
            client.on_open(StreamId(0)),
            Err(ProtocolError::StreamIdParity(StreamId(0)))
        );
        assert_eq!(
            agent.on_open(StreamId(10)),
            Err(ProtocolError::StreamIdParity(StreamId(10)))
        );
    }

    #[test]
    fn id_reuse_rejected_until_closed() {
        let (_client, mut agent, id) = pair();
        assert_eq!(agent.on_open(id), Err(ProtocolError::StreamIdInUse(id)));
        agent.close(id);
        assert!(!agent.contains(id));
        assert_eq!(agent.on_open(id), Ok(()));
    }

    #[test]
    fn local_ids_wrap_and_skip_open_ones() {
        let mut agent = Mux::new(Side::Agent);
        let two = agent.open();
        assert_eq!(two, StreamId(2));
        agent.next_id = u32::MAX - 1;
        assert_eq!(agent.open(), StreamId(u32::MAX - 1));
        // Wraps past 0 and skips 2, still open.
        assert_eq!(agent.open(), StreamId(4));

        let mut client = Mux::new(Side::Client);
        client.next_id = u32::MAX;
        assert_eq!(client.open(), StreamId(u32::MAX));
        assert_eq!(client.open(), StreamId(1));
    }

    #[test]
    fn sender_stops_at_zero_credit_and_credit_reopens_it() {
        let (mut client, mut agent, id) = pair();
        assert_eq!(client.send_credit(id), INITIAL_WINDOW);
        // Chunks are capped.
        assert_eq!(client.take_send_credit(id, usize::MAX), MAX_DATA_CHUNK);
        assert_eq!(agent.on_data(id, MAX_DATA_CHUNK), Ok(DataVerdict::Deliver));
        assert_eq!(
            send(&mut client, &mut agent, id, usize::MAX),
            WINDOW - MAX_DATA_CHUNK
        );
        assert_eq!(client.send_credit(id), 0);
        assert_eq!(client.take_send_credit(id, 1), 0);

        assert_eq!(consume(&mut agent, &mut client, id, 1000), None);
        assert_eq!(client.take_send_credit(id, 1), 0);
        let granted = consume(&mut agent, &mut client, id, WINDOW / 4).expect("batch reached");
        assert_eq!(granted as usize, 1000 + WINDOW / 4);
        assert_eq!(
            send(&mut client, &mut agent, id, usize::MAX),
            granted as usize
        );
    }

    #[test]
    fn a_stalled_stream_does_not_block_another() {
        let (mut client, mut agent, stalled) = pair();
        let busy = client.open();
        assert_eq!(agent.on_open(busy), Ok(()));
        // The stalled stream's consumer never drains.
        assert_eq!(send(&mut client, &mut agent, stalled, usize::MAX), WINDOW);
        assert_eq!(client.take_send_credit(stalled, 1), 0);
        // The other stream moves ten windows' worth while the first stays stuck.
        let mut moved = 0;
        while moved < 10 * WINDOW {
            let n = send(&mut client, &mut agent, busy, WINDOW);
            assert!(n > 0, "busy stream starved after {moved} bytes");
            moved += n;
            consume(&mut agent, &mut client, busy, n);
        }
        assert_eq!(client.send_credit(stalled), 0);
    }

    #[test]
    fn receiving_beyond_the_window_is_a_violation() {
        let (_client, mut agent, id) = pair();
        assert_eq!(agent.on_data(id, WINDOW - 10), Ok(DataVerdict::Deliver));
        assert_eq!(
            agent.on_data(id, 11),
            Err(ProtocolError::FlowControlViolation {
                id,
                len: 11,
                window: 10
            })
        );
        assert_eq!(agent.on_data(id, 10), Ok(DataVerdict::Deliver));
        assert!(agent.on_data(id, 1).is_err());
    }

    #[test]
    fn credit_is_batched() {
        let (mut client, mut agent, id) = pair();
        send(&mut client, &mut agent, id, WINDOW);
        let mut frames = 0;
        let mut granted = 0;
        // A reader draining 100 bytes at a time.
        for _ in 0..WINDOW / 100 {
            if let Some(bytes) = consume(&mut agent, &mut client, id, 100) {
                frames += 1;
                granted += bytes as usize;
                assert!(bytes >= CREDIT_BATCH);
            }
        }
        assert_eq!(frames, 3);
        assert_eq!(client.send_credit(id) as usize, granted);
    }

    #[test]
    fn consuming_more_than_delivered_is_clamped() {
        let (mut client, mut agent, id) = pair();
        assert_eq!(send(&mut client, &mut agent, id, 1000), 1000);
        assert_eq!(agent.on_consumed(id, usize::MAX), None);
        send(&mut client, &mut agent, id, WINDOW);
        let granted = consume(&mut agent, &mut client, id, WINDOW).expect("window drained");
        assert_eq!(granted, INITIAL_WINDOW);
        assert_eq!(client.send_credit(id), INITIAL_WINDOW);
    }

    #[test]
    fn credit_overflow_rejected() {
        let (mut client, _agent, id) = pair();
        assert_eq!(
            client.on_credit(id, 1),
            Err(ProtocolError::CreditOverflow { id })
        );
        assert_eq!(
            client.on_credit(id, u32::MAX),
            Err(ProtocolError::CreditOverflow { id })
        );
        assert_eq!(client.take_send_credit(id, 100), 100);
        assert_eq!(client.on_credit(id, 100), Ok(()));
        assert_eq!(client.send_credit(id), INITIAL_WINDOW);
    }

    #[test]
    fn data_and_credit_after_close_are_discarded() {
        let (mut client, mut agent, id) = pair();
        assert_eq!(client.take_send_credit(id, 10), 10);
        agent.close(id);
        assert_eq!(agent.on_data(id, 10), Ok(DataVerdict::Discard));
        assert_eq!(agent.on_consumed(id, 10), None);
        assert_eq!(agent.on_credit(id, 10), Ok(()));
        assert_eq!(agent.send_credit(id), 0);
        assert_eq!(agent.take_send_credit(id, 10), 0);
        assert!(agent.is_empty());
        client.close(id);
        assert!(client.is_empty());
    }

    #[test]
    fn opens_beyond_the_limit_are_refused_one_by_one() {
        let mut agent = Mux::new(Side::Agent);
        let mut client = Mux::new(Side::Client);
        let ids: Vec<StreamId> = (0..MAX_STREAMS).map(|_| client.open()).collect();
        for &id in &ids {
            assert_eq!(agent.on_open(id), Ok(()));
        }
        let one_more = client.open();
        assert_eq!(
            agent.on_open(one_more),
            Err(ProtocolError::TooManyStreams { max: MAX_STREAMS })
        );
        // The refused stream was not registered; the open ones go on, and a closed one
        // makes room.
        assert!(!agent.contains(one_more));
        assert_eq!(agent.on_data(ids[0], 10), Ok(DataVerdict::Deliver));
        agent.close(ids[0]);
        assert_eq!(agent.on_open(one_more), Ok(()));
        // Streams this side opened count too.
        assert_eq!(agent.len(), MAX_STREAMS);
        let mut full = Mux::new(Side::Agent);
        for _ in 0..MAX_STREAMS {
            full.open();
        }
        assert_eq!(
            full.on_open(StreamId(1)),
            Err(ProtocolError::TooManyStreams { max: MAX_STREAMS })
        );
    }
}
