//! The one reader of a session's messages: it answers the peer's pings, pings a silent peer and
//! gives up on one that stays silent after a ping (the protocol's [`Keepalive`] decides when),
//! and hands every other message to the caller. Both binaries read their sessions through it,
//! so liveness works the same way at both ends.

use bincode::Decode;
use mirrord_protocol::bulk::Bulk;
use mirrord_protocol::keepalive::{Keepalive, KeepaliveAction, PEER_TIMEOUT, PING_INTERVAL};
use mirrord_protocol::{AgentMessage, ClientMessage};
use std::time::Duration;
use tokio::io::AsyncRead;
use tokio::sync::mpsc;
use tokio::time::sleep_until;

use crate::frames::{FrameReader, LinkError};

/// A keepalive message, whichever direction it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    Ping(u64),
    Pong(u64),
}

/// A direction's message type, as far as keepalive is concerned.
pub trait Heartbeat: Decode<()> + Bulk {
    /// The other direction's message type, in which pings and pongs are answered.
    type Reply;
    fn beat(&self) -> Option<Beat>;
    fn ping(nonce: u64) -> Self::Reply;
    fn pong(nonce: u64) -> Self::Reply;
}

impl Heartbeat for ClientMessage {
    type Reply = AgentMessage;
    fn beat(&self) -> Option<Beat> {
        match *self {
            ClientMessage::Ping { nonce } => Some(Beat::Ping(nonce)),
            ClientMessage::Pong { nonce } => Some(Beat::Pong(nonce)),
            _ => None,
        }
    }
    fn ping(nonce: u64) -> AgentMessage {
        AgentMessage::Ping { nonce }
    }
    fn pong(nonce: u64) -> AgentMessage {
        AgentMessage::Pong { nonce }
    }
}

impl Heartbeat for AgentMessage {
    type Reply = ClientMessage;
    fn beat(&self) -> Option<Beat> {
        match *self {
            AgentMessage::Ping { nonce } => Some(Beat::Ping(nonce)),
            AgentMessage::Pong { nonce } => Some(Beat::Pong(nonce)),
            _ => None,
        }
    }
    fn ping(nonce: u64) -> ClientMessage {
        ClientMessage::Ping { nonce }
    }
    fn pong(nonce: u64) -> ClientMessage {
        ClientMessage::Pong { nonce }
    }
}

/// Reads a session's messages, keeping it alive meanwhile.
pub struct Inbox<R> {
    reader: FrameReader<R>,
    keepalive: Keepalive,
}

impl<R: AsyncRead + Unpin> Inbox<R> {
    /// With the protocol's ping interval and peer timeout, counted from now.
    pub fn new(reader: FrameReader<R>) -> Inbox<R> {
        Inbox::with_periods(reader, PING_INTERVAL, PEER_TIMEOUT)
    }

    pub fn with_periods(reader: FrameReader<R>, interval: Duration, timeout: Duration) -> Inbox<R> {
        Inbox {
            reader,
            keepalive: Keepalive::new(interval, timeout, std::time::Instant::now()),
        }
    }

    /// The next message that is not a ping or pong. Pings and pongs for the peer go out through
    /// `out_tx`. Fails with [`LinkError::PeerDead`] when a pinged peer stayed silent, and
    /// [`LinkError::Closed`] at a clean end of stream. Cancel-safe.
    pub async fn next<M, O>(&mut self, out_tx: &mpsc::Sender<O>) -> Result<M, LinkError>
    where
        M: Heartbeat,
        O: From<M::Reply>,
    {
        loop {
            let deadline = tokio::time::Instant::from_std(self.keepalive.next_deadline());
            tokio::select! {
                message = self.reader.next::<M>() => {
                    let message = message?;
                    let now = std::time::Instant::now();
                    match message.beat() {
                        None => {
                            self.keepalive.on_receive(now);
                            return Ok(message);
                        }
                        Some(Beat::Ping(nonce)) => {
                            self.keepalive.on_receive(now);
                            // A full or closed writer: the session is ending anyway.
                            let _ = out_tx.send(M::pong(nonce).into()).await;
                        }
                        Some(Beat::Pong(nonce)) => self.keepalive.on_pong(nonce, now),
                    }
                }
                () = sleep_until(deadline) => match self.keepalive.poll(std::time::Instant::now()) {
                    KeepaliveAction::Idle => {}
                    KeepaliveAction::SendPing { nonce } => {
                        let _ = out_tx.send(M::ping(nonce).into()).await;
                    }
                    KeepaliveAction::PeerDead => return Err(LinkError::PeerDead),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrord_protocol::frame::encode;
    use mirrord_protocol::{Request, StreamFrame, StreamId};
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn pings_are_answered_and_other_messages_handed_over() {
        let (mut peer, ours) = tokio::io::duplex(4096);
        let mut inbox = Inbox::new(FrameReader::new(ours));
        let (out_tx, mut out_rx) = mpsc::channel::<AgentMessage>(4);
        let mut bytes = Vec::new();
        encode(&ClientMessage::Ping { nonce: 7 }, &mut bytes).unwrap();
        encode(&ClientMessage::Pong { nonce: 1 }, &mut bytes).unwrap();
        let request = ClientMessage::Request {
            id: 1,
            request: Request::TargetInfo,
        };
        encode(&request, &mut bytes).unwrap();
        peer.write_all(&bytes).await.unwrap();
        assert_eq!(
            inbox.next::<ClientMessage, _>(&out_tx).await.unwrap(),
            request
        );
        assert_eq!(out_rx.try_recv().unwrap(), AgentMessage::Pong { nonce: 7 });
        assert!(out_rx.try_recv().is_err(), "a pong is not answered");
    }

    #[tokio::test]
    async fn a_silent_peer_is_pinged_then_given_up() {
        let (_peer, ours) = tokio::io::duplex(4096);
        let mut inbox = Inbox::with_periods(
            FrameReader::new(ours),
            Duration::from_millis(20),
            Duration::from_millis(60),
        );
        let (out_tx, mut out_rx) = mpsc::channel::<ClientMessage>(4);
        let error = inbox.next::<AgentMessage, _>(&out_tx).await.unwrap_err();
        assert!(matches!(error, LinkError::PeerDead), "{error}");
        assert_eq!(out_rx.try_recv().unwrap(), ClientMessage::Ping { nonce: 1 });
    }

    #[tokio::test]
    async fn a_busy_peer_stays_alive() {
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        let mut inbox = Inbox::with_periods(
            FrameReader::new(ours),
            Duration::from_millis(20),
            Duration::from_millis(40),
        );
        let (out_tx, _out_rx) = mpsc::channel::<ClientMessage>(64);
        let frame = AgentMessage::Stream(StreamFrame::Reset { id: StreamId(2) });
        for _ in 0..10 {
            let mut bytes = Vec::new();
            encode(&frame, &mut bytes).unwrap();
            peer.write_all(&bytes).await.unwrap();
            assert_eq!(inbox.next::<AgentMessage, _>(&out_tx).await.unwrap(), frame);
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
}
