//! The session handshake: the CLI's `Hello` carries the protocol version and the session token,
//! the agent answers `Welcome` or `Rejected`. These functions only judge messages; sending,
//! timeouts and closing the connection belong to the caller.

use subtle::ConstantTimeEq;

use crate::error::ProtocolError;
use crate::messages::{
    AgentMessage, ClientMessage, Hello, PROTOCOL_VERSION, RejectReason, Welcome,
};

/// The first message a client sends.
pub fn client_hello(token: &[u8]) -> ClientMessage {
    ClientMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        token: token.to_vec(),
    })
}

/// The agent's check of the first message: version first, then token compared in constant time
/// so a client cannot learn the token byte by byte from response times.
///
/// An empty `expected_token` accepts nobody: an agent started without a token must fail closed
/// rather than open a session to anyone who can reach it.
pub fn accept_hello(first: &ClientMessage, expected_token: &[u8]) -> Result<Welcome, RejectReason> {
    let ClientMessage::Hello(hello) = first else {
        return Err(RejectReason::HelloExpected);
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(RejectReason::VersionMismatch {
            agent: PROTOCOL_VERSION,
            client: hello.version,
        });
    }
    // `ct_eq` on slices of different lengths is false without comparing contents; the length of
    // the token is not secret.
    let token_ok: bool = hello.token.as_slice().ct_eq(expected_token).into();
    if expected_token.is_empty() || !token_ok {
        return Err(RejectReason::BadToken);
    }
    Ok(Welcome {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// The client's check of the agent's reply to `Hello`.
pub fn check_welcome(reply: AgentMessage) -> Result<Welcome, ProtocolError> {
    match reply {
        AgentMessage::Welcome(welcome) if welcome.version == PROTOCOL_VERSION => Ok(welcome),
        AgentMessage::Welcome(welcome) => {
            Err(ProtocolError::Rejected(RejectReason::VersionMismatch {
                agent: welcome.version,
                client: PROTOCOL_VERSION,
            }))
        }
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
        let welcome = accept_hello(&client_hello(TOKEN), TOKEN).expect("right token");
        assert_eq!(welcome.version, PROTOCOL_VERSION);
        assert_eq!(welcome.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            check_welcome(AgentMessage::Welcome(welcome.clone())),
            Ok(welcome)
        );
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
    fn wrong_version_rejected_before_token() {
        let hello = ClientMessage::Hello(Hello {
            version: PROTOCOL_VERSION + 1,
            token: b"wrong".to_vec(),
        });
        assert_eq!(
            accept_hello(&hello, TOKEN),
            Err(RejectReason::VersionMismatch {
                agent: PROTOCOL_VERSION,
                client: PROTOCOL_VERSION + 1
            })
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
        for reason in [
            RejectReason::BadToken,
            RejectReason::HelloExpected,
            RejectReason::VersionMismatch {
                agent: 7,
                client: PROTOCOL_VERSION,
            },
        ] {
            assert_eq!(
                check_welcome(AgentMessage::Rejected(reason.clone())),
                Err(ProtocolError::Rejected(reason))
            );
        }
        assert_eq!(
            check_welcome(AgentMessage::Welcome(Welcome {
                version: PROTOCOL_VERSION + 1,
                agent_version: "9.9.9".into(),
            })),
            Err(ProtocolError::Rejected(RejectReason::VersionMismatch {
                agent: PROTOCOL_VERSION + 1,
                client: PROTOCOL_VERSION
            }))
        );
        let others = [
            AgentMessage::Ping { nonce: 1 },
            AgentMessage::Pong { nonce: 1 },
            AgentMessage::Response {
                id: 1,
                response: Ok(crate::messages::Response::FileData(vec![])),
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
