//! The wire protocol between the mirrord CLI and its agent: the greeting, messages,
//! length-prefixed framing, the handshake, stream multiplexing with per-stream credit flow control and keepalive.
//!
//! This crate never performs I/O and never reads a clock: callers feed it bytes and instants and
//! act on what it returns, so every rule here is unit-tested without sockets.

pub mod bulk;
pub mod error;
pub mod frame;
pub mod fs;
pub mod greeting;
pub mod handshake;
pub mod incoming;
pub mod keepalive;
pub mod messages;
pub mod mux;

pub use error::ProtocolError;
pub use messages::*;
