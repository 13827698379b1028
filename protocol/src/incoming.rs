//! Incoming traffic: which of the target's ports a session takes over and how, and what the agent
//! tells the CLI about each connection it hands over.
//!
//! The CLI subscribes a port with [`crate::Request::Subscribe`]. From then on the agent redirects
//! the port's new incoming TCP connections in the target's network namespace and, for each one
//! (or, with an [`HttpFilter`], for each client connection with a matching request), opens a
//! stream towards the CLI with [`crate::StreamTarget::Incoming`]. The CLI connects that stream to
//! the local app from the client's address.

use std::net::SocketAddr;

use bincode::{Decode, Encode};

#[derive(Encode, Decode, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IncomingMode {
    /// The original app keeps answering; the session gets a copy of each connection's inbound
    /// bytes, and whatever the local app answers is discarded.
    Mirror,
    /// The session answers the client; the original app never sees the connection (or, with a
    /// filter, the matching requests).
    Steal,
}

#[derive(Encode, Decode, Debug, Clone, PartialEq)]
pub struct Subscription {
    /// The target's port, as its clients connect to it.
    pub port: u16,
    pub mode: IncomingMode,
    /// Only HTTP requests that match go to the session, request by request; `None` takes every
    /// connection whole.
    pub filter: Option<HttpFilter>,
    /// Steal the port even though another session already steals it without a filter
    /// (`on_concurrent_steal = "override"`); otherwise such a subscription is refused.
    pub override_steal: bool,
}

/// Which HTTP requests a filtered subscription takes. Patterns are regular expressions
/// (the `regex` crate's syntax), matched case-insensitively and unanchored.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub enum HttpFilter {
    /// Matches a header as the line `Name: value`.
    Header(String),
    /// Matches the request's path (with its query string).
    Path(String),
    /// Matches the method (`GET`, `POST`…).
    Method(String),
    /// Every one of them matches.
    AllOf(Vec<HttpFilter>),
    /// At least one of them matches.
    AnyOf(Vec<HttpFilter>),
}

/// An incoming connection handed to the session, as the stream's target.
#[derive(Encode, Decode, Debug, Clone, PartialEq, Eq)]
pub struct IncomingConnection {
    /// The subscribed port of the target this connection came to.
    pub port: u16,
    /// The client's address: the local app sees the connection come from it.
    pub peer: SocketAddr,
    /// The connection's original destination in the target (its address and `port`).
    pub destination: SocketAddr,
    pub mode: IncomingMode,
}
