//! The session handshake, after the [`crate::greeting`]s agreed on the version: the CLI's
//! `Hello` carries the session token, the agent answers `Welcome` or `Rejected`. These functions
//! only judge messages; sending, timeouts and closing the connection belong to the caller.

use subtle::ConstantTimeEq;

use crate::error::ProtocolError;
use crate::messages::{AgentMessage, ClientMessage, Hello, RejectReason};

/// The first message a client sends.
pub fn client_hello(token: &[u8]) -> ClientMessage {
    ClientMessage::Hello(Hello {
        token: token.to_vec(),
    })
}

/// The agent's check of the first message: the token, compared in constant time so a client
/// cannot learn the token byte by byte from response times.
///
/// An empty `expected_token` accepts nobody: an agent started without a token must fail closed
/// rather than open a session to anyone who can reach it.
pub fn accept_hello(first: &ClientMessage, expected_token: &[u8]) -> Result<(), RejectReason> {
    let ClientMessage::Hello(hello) = first else {
        return Err(RejectReason::HelloExpected);
    };
    // `ct_eq` on slices of different lengths is false without comparing contents; the length of
    // the token is not secret.
    let token_ok: bool = hello.token.as_slice().ct_eq(expected_token).into();
    if expected_token.is_empty() || !token_ok {
        return Err(RejectReason::BadToken);
    }
    Ok(())
}

/// The client's check of the agent's reply to `Hello`.
pub fn check_welcome(reply: AgentMessage) -> Result<(), ProtocolError> {
    match reply {
        AgentMessage::Welcome => Ok(()),
        AgentMessage::Rejected(reason) => Err(ProtocolError::Rejected(reason)),
        AgentMessage::Ping { .. } => Err(ProtocolError::UnexpectedMessage("Ping before Welcome")),
        AgentMessage::Pong { .. } => Err(ProtocolError::UnexpectedMessage("Pong before Welcome")),
        AgentMessage::Response { .. } => {
            Err(ProtocolError::UnexpectedMessage("Response before Welcome"))
        }
        AgentMessage::Stream(_) => Err(ProtocolError::UnexpectedMessage("Stream before Welcome")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Request, StreamFrame, StreamId};

    const TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn right_token_accepted() {
        assert_eq!(accept_hello(&client_hello(TOKEN), TOKEN), Ok(()));
        assert_eq!(check_welcome(AgentMessage::Welcome), Ok(()));
    }

    #[test]
    fn wrong_token_rejected() {
        let mut wrong = TOKEN.to_vec();
        wrong[31] ^= 1;
        for token in [&wrong[..], &TOKEN[..31], b"", &[TOKEN, b"x"].concat()[..]] {
            assert_eq!(
                accept_hello(&client_hello(token), TOKEN),
                Err(RejectReason::BadToken),
                "{token:?}"
            );
        }
    }

    #[test]
    fn empty_expected_token_fails_closed() {
        assert_eq!(
            accept_hello(&client_hello(b""), b""),
            Err(RejectReason::BadToken)
        );
    }

    #[test]
    fn non_hello_first_message_rejected() {
        let firsts = [
            ClientMessage::Ping { nonce: 1 },
            ClientMessage::Pong { nonce: 1 },
            ClientMessage::Request {
                id: 1,
                request: Request::TargetInfo,
            },
            ClientMessage::Stream(StreamFrame::Reset { id: StreamId(1) }),
        ];
        for first in firsts {
            assert_eq!(
                accept_hello(&first, TOKEN),
                Err(RejectReason::HelloExpected)
            );
        }
    }

    #[test]
    fn check_welcome_on_each_reply() {
        for reason in [RejectReason::BadToken, RejectReason::HelloExpected] {
            assert_eq!(
                check_welcome(AgentMessage::Rejected(reason.clone())),
                Err(ProtocolError::Rejected(reason))
            );
        }
        let others = [
            AgentMessage::Ping { nonce: 1 },
            AgentMessage::Pong { nonce: 1 },
            AgentMessage::Response {
                id: 1,
                response: Ok(crate::messages::Response::Dns(vec![])),
            },
            AgentMessage::Stream(StreamFrame::Opened { id: StreamId(2) }),
        ];
        for reply in others {
            assert!(matches!(
                check_welcome(reply),
                Err(ProtocolError::UnexpectedMessage(_))
            ));
        }
    }
}
