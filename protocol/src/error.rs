//! The protocol crate's one error type: everything that can go wrong while framing, handshaking,
//! multiplexing or keeping a connection alive. It only describes failures; it never decides how a
//! caller recovers (every variant here ends the connection except where a caller says otherwise).

use std::fmt;

use crate::messages::{RejectReason, StreamId};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    #[error("could not encode a message: {0}")]
    Encode(String),
    #[error("malformed message from the peer: {0}")]
    Decode(String),
    #[error("a frame carried {extra} bytes after its message")]
    TrailingBytes { extra: usize },
    #[error("a frame carried bulk bytes for a message that has no place for them")]
    UnexpectedBulk,
    #[error("{0}")]
    Rejected(RejectReason),
    #[error("unexpected message: {0}")]
    UnexpectedMessage(&'static str),
    #[error("stream {} is not open", .0.0)]
    UnknownStream(StreamId),
    #[error("the peer opened stream {} which is already open", .0.0)]
    StreamIdInUse(StreamId),
    /// The peer opened a stream with an id only we may open (or the reserved id 0).
    #[error("the peer opened stream {} whose id belongs to this side", .0.0)]
    StreamIdParity(StreamId),
    #[error("the peer sent {len} bytes on stream {} with only {window} bytes of credit", .id.0)]
    FlowControlViolation {
        id: StreamId,
        len: usize,
        window: u32,
    },
    #[error("the peer granted stream {} more credit than the window allows", .id.0)]
    CreditOverflow { id: StreamId },
    /// The peer opened a stream while `max` were open: that stream is refused, the connection
    /// goes on.
    #[error("{max} streams are open, the most one connection may have")]
    TooManyStreams { max: usize },
}

/// One line a user can act on; the CLI prints it as is.
impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadToken => f.write_str("the agent rejected the session token"),
            Self::HelloExpected => {
                f.write_str("the agent expected a Hello as the first message of the session")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_reads_as_one_line() {
        let reasons = [RejectReason::BadToken, RejectReason::HelloExpected];
        for reason in reasons {
            let line = ProtocolError::Rejected(reason).to_string();
            assert!(!line.is_empty() && !line.contains('\n'), "{line:?}");
        }
        assert_eq!(
            ProtocolError::Rejected(RejectReason::BadToken).to_string(),
            "the agent rejected the session token"
        );
    }

    #[test]
    fn frame_too_large_message() {
        let e = ProtocolError::FrameTooLarge { len: 10, max: 5 };
        assert_eq!(e.to_string(), "frame of 10 bytes exceeds the 5-byte limit");
    }
}
