//! Stream ids and per-stream credit flow control for one connection: who may open which id, how
//! many bytes each side may still send, and when to grant the peer more. It never buffers data,
//! performs I/O or tracks half-close; the async layer owns those and asks this state machine
//! before every send and after every receive.
//!
//! Each stream starts with [`INITIAL_WINDOW`] bytes of send credit in both directions. A receiver
//! grants credit back only as its consumer drains bytes, so one stalled consumer stops only its
//! own stream. How much it grants back is its own choice, within two bounds that hold whatever
//! the peer does:
//!
//! - a stream's window never exceeds [`MAX_WINDOW`], and a sender refuses credit beyond it;
//! - a stream's window grows (doubling) only while the window is what it waits on — the peer
//!   spent all its credit and the consumer drained everything it sent — and never beyond a fair
//!   share of [`CONNECTION_BUDGET`] among the open streams; when more streams open, a window
//!   above its new share shrinks by granting back less than was drained.
//!
//! A window granted before more streams opened is cut back only as its consumer drains (a
//! stalled stream keeps what it had), so growth beyond the initial window also needs room in
//! the budget left by all the other streams' windows. What a peer can make us buffer is
//! therefore at most `CONNECTION_BUDGET + streams × INITIAL_WINDOW` per connection (a datagram
//! stream counts [`DATAGRAM_WINDOW`]), and a lone bulk stream still reaches the full window.

use std::collections::HashMap;

use crate::bulk::MAX_DATA_CHUNK;
use crate::error::ProtocolError;
use crate::messages::{StreamFrame, StreamId, StreamTarget};

/// Send credit each side has on a new byte stream, and the least window one is ever given:
/// small, since a thousand busy streams may each hold it at both ends.
pub const INITIAL_WINDOW: u32 = 16 * 1024;

/// The same for a datagram stream: a datagram is never split, so its window always holds the
/// largest one.
pub const DATAGRAM_WINDOW: u32 = 64 * 1024;

/// The most send credit a stream may ever hold: enough for one bulk transfer at full speed.
pub const MAX_WINDOW: u32 = 512 * 1024;

/// The receive windows of all the streams of one connection together, as far as the fair share
/// allows: with more than `CONNECTION_BUDGET / MAX_WINDOW` (16) streams open, each gets an equal
/// part, but never less than its initial window.
pub const CONNECTION_BUDGET: u32 = 8 * 1024 * 1024;

/// Most streams open at once on one connection, whoever opened them. A peer's open beyond it is
/// refused (the stream alone, not the connection): each open stream costs the other side a
/// socket and a task, so a flood of opens from one session must not use up what the others
/// need. Far above what one app opens at once (the load target is 1,000 concurrent flows).
pub const MAX_STREAMS: usize = 4096;

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

/// What a stream carries, which decides its least window and when credit goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bytes, drained a few at a time perhaps: credit goes back in batches of a quarter window,
    /// so a reader of a few bytes per read does not cause a `Credit` frame per read.
    Bytes,
    /// Whole datagrams, one per `Data` frame: once everything delivered is drained, the peer's
    /// credit is topped up to the whole window at once, since its next datagram may need all of
    /// it.
    Datagrams,
}

impl Kind {
    pub fn of(target: &StreamTarget) -> Kind {
        match target {
            StreamTarget::Udp(_) => Kind::Datagrams,
            StreamTarget::Tcp(_) | StreamTarget::Incoming(_) => Kind::Bytes,
        }
    }

    fn least_window(self) -> u32 {
        match self {
            Kind::Bytes => INITIAL_WINDOW,
            Kind::Datagrams => DATAGRAM_WINDOW,
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
    kind: Kind,
    /// Bytes we may still send.
    send_credit: u32,
    /// The receive window we currently allow the peer: what it may have in flight plus what
    /// waits here for our consumer. Between the kind's least window and [`MAX_WINDOW`].
    window: u32,
    /// Bytes the peer may still send before it must wait for our `Credit`.
    recv_credit: u32,
    /// Bytes delivered to our consumer that it has not drained yet.
    held: u32,
}

impl StreamState {
    fn new(kind: Kind) -> Self {
        let window = kind.least_window();
        Self {
            kind,
            send_credit: window,
            window,
            recv_credit: window,
            held: 0,
        }
    }
}

/// A stream's share of [`CONNECTION_BUDGET`] when `open` streams are open, before its kind's
/// least window.
fn fair_share(open: usize) -> u32 {
    let open = u32::try_from(open.max(1)).unwrap_or(u32::MAX);
    (CONNECTION_BUDGET / open).min(MAX_WINDOW)
}

#[derive(Debug)]
pub struct Mux {
    side: Side,
    next_id: u32,
    streams: HashMap<StreamId, StreamState>,
    /// The peer's credit plus what waits for our consumers, over all streams: what the peer
    /// may make us hold right now.
    committed: u64,
}

impl Mux {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            next_id: side.first_id(),
            streams: HashMap::new(),
            committed: 0,
        }
    }

    /// Registers a locally opened stream under the next free id of our parity. Ids wrap around
    /// after `u32::MAX`, skipping ids still open. (Running out would take 2³¹ open streams, far
    /// beyond what memory allows, so the search always ends.)
    pub fn open(&mut self, kind: Kind) -> StreamId {
        loop {
            let id = StreamId(self.next_id);
            self.next_id = self.next_id.checked_add(2).unwrap_or(self.side.first_id());
            if let std::collections::hash_map::Entry::Vacant(slot) = self.streams.entry(id) {
                let stream = slot.insert(StreamState::new(kind));
                self.committed += u64::from(stream.recv_credit);
                return id;
            }
        }
    }

    /// Registers a stream the peer opened. [`ProtocolError::TooManyStreams`] refuses this one
    /// stream (the caller answers it as failed); every other error breaks the protocol.
    pub fn on_open(&mut self, id: StreamId, kind: Kind) -> Result<(), ProtocolError> {
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
                let stream = slot.insert(StreamState::new(kind));
                self.committed += u64::from(stream.recv_credit);
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
        if len > stream.recv_credit as usize {
            return Err(ProtocolError::FlowControlViolation {
                id,
                len,
                window: stream.recv_credit,
            });
        }
        // Checked just above: `len <= recv_credit`, and `recv_credit + held <= MAX_WINDOW`.
        stream.recv_credit -= len as u32;
        stream.held += len as u32;
        Ok(DataVerdict::Deliver)
    }

    /// Our consumer drained `len` bytes of `id`; returns the `Credit` frame to send, if any.
    ///
    /// The stream's window first follows its fair share of the connection's budget and what the
    /// other streams leave of it (shrinking if more streams opened since), and doubles within it when the peer had spent all its
    /// credit and this drain emptied everything it sent: the window, not the consumer, is then
    /// what the stream waits on. The peer is granted what lifts its credit plus what is still
    /// held here back to the window, once that is worth a frame (see [`Kind`]); a window that
    /// shrank is reached by granting less than was drained.
    ///
    /// Draining more than was delivered is clamped: a caller's miscount must not let the peer
    /// send more than the window.
    pub fn on_consumed(&mut self, id: StreamId, len: usize) -> Option<StreamFrame> {
        let share = fair_share(self.streams.len());
        let stream = self.streams.get_mut(&id)?;
        // Clamped to `held`, a u32.
        let drained = len.min(stream.held as usize) as u32;
        stream.held -= drained;
        self.committed -= u64::from(drained);
        // Beyond its least window, a stream grows only into what the others leave of the
        // budget: windows granted before more streams opened (a stalled stream's) still count.
        let others = self.committed - u64::from(stream.recv_credit + stream.held);
        let room = u64::from(CONNECTION_BUDGET).saturating_sub(others);
        // At most `share`, a u32.
        let share = (room.min(u64::from(share)) as u32).max(stream.kind.least_window());
        stream.window = stream.window.min(share);
        if stream.recv_credit == 0 && stream.held == 0 {
            stream.window = stream.window.saturating_mul(2).min(share);
        }
        let committed = stream.recv_credit + stream.held;
        let bytes = stream.window.checked_sub(committed).filter(|&n| n > 0)?;
        let worth_a_frame = match stream.kind {
            Kind::Bytes => bytes >= stream.window / 4,
            Kind::Datagrams => stream.held == 0,
        };
        if !worth_a_frame {
            return None;
        }
        stream.recv_credit += bytes;
        self.committed += u64::from(bytes);
        Some(StreamFrame::Credit { id, bytes })
    }

    /// The peer granted `bytes` more credit on `id`. Credit for an unknown stream is ignored: it
    /// may have been in flight when we closed the stream.
    pub fn on_credit(&mut self, id: StreamId, bytes: u32) -> Result<(), ProtocolError> {
        let Some(stream) = self.streams.get_mut(&id) else {
            return Ok(());
        };
        match stream.send_credit.checked_add(bytes) {
            Some(credit) if credit <= MAX_WINDOW => {
                stream.send_credit = credit;
                Ok(())
            }
            _ => Err(ProtocolError::CreditOverflow { id }),
        }
    }

    /// Forgets the stream (after `Reset`, `OpenFailed`, or both directions shut down); its id
    /// may then be opened again.
    pub fn close(&mut self, id: StreamId) {
        if let Some(stream) = self.streams.remove(&id) {
            self.committed -= u64::from(stream.recv_credit + stream.held);
        }
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

    /// One round of a bulk transfer with a prompt consumer: the sender sends all its credit,
    /// the receiver drains all of it. Returns the bytes that moved.
    fn round(tx: &mut Mux, rx: &mut Mux, id: StreamId) -> usize {
        let sent = send(tx, rx, id, usize::MAX);
        consume(rx, tx, id, sent);
        sent
    }

    fn pair_of(kind: Kind) -> (Mux, Mux, StreamId) {
        let mut client = Mux::new(Side::Client);
        let mut agent = Mux::new(Side::Agent);
        let id = client.open(kind);
        assert_eq!(agent.on_open(id, kind), Ok(()));
        (client, agent, id)
    }

    fn pair() -> (Mux, Mux, StreamId) {
        pair_of(Kind::Bytes)
    }

    /// Opens `n` more client streams on both sides.
    fn open_more(client: &mut Mux, agent: &mut Mux, n: usize) -> Vec<StreamId> {
        (0..n)
            .map(|_| {
                let id = client.open(Kind::Bytes);
                assert_eq!(agent.on_open(id, Kind::Bytes), Ok(()));
                id
            })
            .collect()
    }

    const WINDOW: usize = INITIAL_WINDOW as usize;
    const MAX: usize = MAX_WINDOW as usize;

    #[test]
    fn ids_have_the_openers_parity() {
        let mut client = Mux::new(Side::Client);
        let mut agent = Mux::new(Side::Agent);
        let c: Vec<u32> = (0..4).map(|_| client.open(Kind::Bytes).0).collect();
        let a: Vec<u32> = (0..4).map(|_| agent.open(Kind::Bytes).0).collect();
        assert_eq!(c, [1, 3, 5, 7]);
        assert_eq!(a, [2, 4, 6, 8]);
        for id in a {
            assert_eq!(client.on_open(StreamId(id), Kind::Bytes), Ok(()));
        }
        for id in c {
            assert_eq!(agent.on_open(StreamId(id), Kind::Bytes), Ok(()));
        }
        assert_eq!(client.len(), 8);
        // The peer may not open ids of our parity, nor 0.
        assert_eq!(
            client.on_open(StreamId(9), Kind::Bytes),
            Err(ProtocolError::StreamIdParity(StreamId(9)))
        );
        assert_eq!(
            client.on_open(StreamId(0), Kind::Bytes),
            Err(ProtocolError::StreamIdParity(StreamId(0)))
        );
        assert_eq!(
            agent.on_open(StreamId(10), Kind::Bytes),
            Err(ProtocolError::StreamIdParity(StreamId(10)))
        );
    }

    #[test]
    fn id_reuse_rejected_until_closed() {
        let (_client, mut agent, id) = pair();
        assert_eq!(
            agent.on_open(id, Kind::Bytes),
            Err(ProtocolError::StreamIdInUse(id))
        );
        agent.close(id);
        assert!(!agent.contains(id));
        assert_eq!(agent.on_open(id, Kind::Bytes), Ok(()));
    }

    #[test]
    fn local_ids_wrap_and_skip_open_ones() {
        let mut agent = Mux::new(Side::Agent);
        let two = agent.open(Kind::Bytes);
        assert_eq!(two, StreamId(2));
        agent.next_id = u32::MAX - 1;
        assert_eq!(agent.open(Kind::Bytes), StreamId(u32::MAX - 1));
        // Wraps past 0 and skips 2, still open.
        assert_eq!(agent.open(Kind::Bytes), StreamId(4));

        let mut client = Mux::new(Side::Client);
        client.next_id = u32::MAX;
        assert_eq!(client.open(Kind::Bytes), StreamId(u32::MAX));
        assert_eq!(client.open(Kind::Bytes), StreamId(1));
    }

    #[test]
    fn sender_stops_at_zero_credit_and_credit_reopens_it() {
        let (mut client, mut agent, id) = pair();
        assert_eq!(client.send_credit(id), INITIAL_WINDOW);
        // A new stream may send one small window.
        assert_eq!(client.take_send_credit(id, usize::MAX), WINDOW);
        assert_eq!(agent.on_data(id, WINDOW), Ok(DataVerdict::Deliver));
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
    fn a_lone_bulk_stream_grows_to_the_largest_window() {
        let (mut client, mut agent, id) = pair();
        // Each round the sender spends all its credit and the consumer drains it all: the
        // window is what the stream waits on, so it doubles, up to the largest.
        let moved: Vec<usize> = (0..8).map(|_| round(&mut client, &mut agent, id)).collect();
        assert_eq!(
            moved,
            [
                WINDOW,
                2 * WINDOW,
                4 * WINDOW,
                8 * WINDOW,
                16 * WINDOW,
                MAX,
                MAX,
                MAX
            ]
        );
        assert_eq!(client.send_credit(id), MAX_WINDOW);
    }

    #[test]
    fn a_consumer_that_lags_does_not_grow_its_window() {
        let (mut client, mut agent, id) = pair();
        send(&mut client, &mut agent, id, usize::MAX);
        // The consumer drains half of what it holds each time: credit goes back as it drains,
        // but something always waits here, so the window is not what the stream waits on.
        for _ in 0..20 {
            consume(&mut agent, &mut client, id, WINDOW / 2);
            send(&mut client, &mut agent, id, usize::MAX);
            assert_eq!(client.send_credit(id), 0);
        }
        assert_eq!(round(&mut client, &mut agent, id), 0, "all was held");
        // Draining everything the peer sent is what grows it.
        assert_eq!(
            consume(&mut agent, &mut client, id, WINDOW),
            Some(2 * INITIAL_WINDOW)
        );
    }

    #[test]
    fn many_busy_streams_share_the_connection_budget() {
        let budget = CONNECTION_BUDGET as usize;
        for streams in [10, 100, 1000] {
            let (mut client, mut agent, first) = pair();
            let mut ids = open_more(&mut client, &mut agent, streams - 1);
            ids.push(first);
            for _ in 0..10 {
                for &id in &ids {
                    round(&mut client, &mut agent, id);
                }
            }
            // What the sender may have in flight toward the receiver on all streams at once.
            let outstanding: usize = ids.iter().map(|&id| client.send_credit(id) as usize).sum();
            let share = (budget / streams).clamp(WINDOW, MAX);
            assert!(
                ids.iter()
                    .all(|&id| client.send_credit(id) as usize <= share),
                "{streams} streams"
            );
            assert!(
                outstanding <= budget.max(streams * WINDOW),
                "{streams} streams: {outstanding} bytes outstanding"
            );
            // Ten busy streams each reach the largest window; a thousand keep the least.
            match streams {
                10 => assert_eq!(outstanding, 10 * MAX),
                1000 => assert_eq!(outstanding, 1000 * WINDOW),
                _ => assert!(outstanding > budget / 2, "{outstanding}"),
            }
        }
    }

    #[test]
    fn a_grown_window_shrinks_when_more_streams_open() {
        let (mut client, mut agent, big) = pair();
        while client.send_credit(big) < MAX_WINDOW {
            round(&mut client, &mut agent, big);
        }
        let others = open_more(&mut client, &mut agent, 255);
        let share = CONNECTION_BUDGET / 256;
        assert!(share < MAX_WINDOW);
        // The credit already granted stays the peer's to spend; what the consumer drains from
        // it is granted back only down to the new share.
        assert_eq!(send(&mut client, &mut agent, big, usize::MAX), MAX);
        let mut granted = 0;
        for _ in 0..MAX / MAX_DATA_CHUNK {
            granted += consume(&mut agent, &mut client, big, MAX_DATA_CHUNK).unwrap_or(0);
        }
        assert_eq!(granted, share, "less was granted back than was drained");
        for _ in 0..5 {
            assert_eq!(round(&mut client, &mut agent, big), share as usize);
        }
        // Once the others close, it may grow again.
        for id in others {
            client.close(id);
            agent.close(id);
        }
        for _ in 0..4 {
            round(&mut client, &mut agent, big);
        }
        assert_eq!(client.send_credit(big), MAX_WINDOW);
    }

    #[test]
    fn windows_held_by_stalled_streams_leave_the_others_their_least() {
        let (mut client, mut agent, first) = pair();
        let mut stalled = open_more(&mut client, &mut agent, 15);
        stalled.push(first);
        for &id in &stalled {
            while client.send_credit(id) < MAX_WINDOW {
                round(&mut client, &mut agent, id);
            }
            // Its consumer stops: the whole window waits here, undrained.
            assert_eq!(send(&mut client, &mut agent, id, usize::MAX), MAX);
        }
        // Sixteen stalled streams hold the whole budget; the busy ones that open after them
        // still flow, with no more than their least window each.
        let busy = open_more(&mut client, &mut agent, 100);
        for _ in 0..10 {
            for &id in &busy {
                assert_eq!(round(&mut client, &mut agent, id), WINDOW);
            }
        }
        let held = 16 * MAX + busy.len() * WINDOW;
        assert!(held <= CONNECTION_BUDGET as usize + (16 + busy.len()) * WINDOW);
        // Once the stalled ones drain and close, the busy ones may grow into their share.
        for &id in &stalled {
            consume(&mut agent, &mut client, id, MAX);
            client.close(id);
            agent.close(id);
        }
        for &id in &busy {
            round(&mut client, &mut agent, id);
        }
        for &id in &busy {
            assert_eq!(round(&mut client, &mut agent, id), 2 * WINDOW);
        }
    }

    #[test]
    fn a_stalled_stream_does_not_block_another() {
        let (mut client, mut agent, stalled) = pair();
        let busy = client.open(Kind::Bytes);
        assert_eq!(agent.on_open(busy, Kind::Bytes), Ok(()));
        // The stalled stream's consumer never drains.
        assert_eq!(send(&mut client, &mut agent, stalled, usize::MAX), WINDOW);
        assert_eq!(client.take_send_credit(stalled, 1), 0);
        // The other stream moves ten of the largest windows' worth while the first stays stuck.
        let mut moved = 0;
        while moved < 10 * MAX {
            let n = round(&mut client, &mut agent, busy);
            assert!(n > 0, "busy stream starved after {moved} bytes");
            moved += n;
        }
        assert_eq!(client.send_credit(stalled), 0);
        assert_eq!(client.send_credit(busy), MAX_WINDOW);
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
    fn receiving_beyond_a_grown_window_is_a_violation() {
        let (mut client, mut agent, id) = pair();
        for _ in 0..5 {
            round(&mut client, &mut agent, id);
        }
        // The peer honours the grown window but not one byte more.
        assert_eq!(agent.on_data(id, MAX), Ok(DataVerdict::Deliver));
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
                assert!(bytes >= INITIAL_WINDOW / 4);
            }
        }
        assert_eq!(frames, 3);
        assert_eq!(client.send_credit(id) as usize, granted);
    }

    #[test]
    fn datagrams_get_their_credit_back_whole() {
        let (mut client, mut agent, id) = pair_of(Kind::Datagrams);
        // The largest datagram fits in a datagram stream's window.
        assert_eq!(client.send_credit(id), DATAGRAM_WINDOW);
        // Each datagram, once drained, tops the sender up to the whole window again, so the
        // largest datagram always fits once the receiver has caught up.
        for len in [100, 1500, 65_507] {
            assert_eq!(send(&mut client, &mut agent, id, len), len);
            assert_eq!(consume(&mut agent, &mut client, id, len), Some(len as u32));
            assert_eq!(client.send_credit(id), DATAGRAM_WINDOW);
        }
        // While one waits to be drained, nothing goes back yet.
        send(&mut client, &mut agent, id, 300);
        assert_eq!(consume(&mut agent, &mut client, id, 100), None);
        assert_eq!(consume(&mut agent, &mut client, id, 200), Some(300));
        // However many streams open, a datagram stream keeps room for the largest datagram.
        let mut crowd = Mux::new(Side::Agent);
        for _ in 0..MAX_STREAMS - 1 {
            crowd.open(Kind::Bytes);
        }
        let mut peer = Mux::new(Side::Client);
        let udp = peer.open(Kind::Datagrams);
        assert_eq!(crowd.on_open(udp, Kind::Datagrams), Ok(()));
        assert_eq!(send(&mut peer, &mut crowd, udp, 65_507), 65_507);
        assert_eq!(consume(&mut crowd, &mut peer, udp, 65_507), Some(65_507));
        assert_eq!(peer.send_credit(udp), DATAGRAM_WINDOW);
    }

    #[test]
    fn consuming_more_than_delivered_is_clamped() {
        let (mut client, mut agent, id) = pair();
        assert_eq!(send(&mut client, &mut agent, id, 1000), 1000);
        assert_eq!(agent.on_consumed(id, usize::MAX), None);
        send(&mut client, &mut agent, id, WINDOW);
        // However much the caller says it drained, the peer may send one grown window, no more.
        consume(&mut agent, &mut client, id, usize::MAX).expect("window drained");
        assert_eq!(client.send_credit(id), 2 * INITIAL_WINDOW);
        assert_eq!(agent.on_consumed(id, usize::MAX), None);
        assert_eq!(agent.on_data(id, 2 * WINDOW), Ok(DataVerdict::Deliver));
        assert!(agent.on_data(id, 1).is_err());
    }

    #[test]
    fn credit_overflow_rejected() {
        let (mut client, _agent, id) = pair();
        // A peer may grow the window up to the largest, and not beyond.
        assert_eq!(client.on_credit(id, MAX_WINDOW - INITIAL_WINDOW), Ok(()));
        assert_eq!(client.send_credit(id), MAX_WINDOW);
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
        assert_eq!(client.send_credit(id), MAX_WINDOW);
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
        let ids: Vec<StreamId> = (0..MAX_STREAMS).map(|_| client.open(Kind::Bytes)).collect();
        for &id in &ids {
            assert_eq!(agent.on_open(id, Kind::Bytes), Ok(()));
        }
        let one_more = client.open(Kind::Bytes);
        assert_eq!(
            agent.on_open(one_more, Kind::Bytes),
            Err(ProtocolError::TooManyStreams { max: MAX_STREAMS })
        );
        // The refused stream was not registered; the open ones go on, and a closed one
        // makes room.
        assert!(!agent.contains(one_more));
        assert_eq!(agent.on_data(ids[0], 10), Ok(DataVerdict::Deliver));
        agent.close(ids[0]);
        assert_eq!(agent.on_open(one_more, Kind::Bytes), Ok(()));
        // Streams this side opened count too.
        assert_eq!(agent.len(), MAX_STREAMS);
        let mut full = Mux::new(Side::Agent);
        for _ in 0..MAX_STREAMS {
            full.open(Kind::Bytes);
        }
        assert_eq!(
            full.on_open(StreamId(1), Kind::Bytes),
            Err(ProtocolError::TooManyStreams { max: MAX_STREAMS })
        );
    }
}
