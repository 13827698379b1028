//! The session link both mirrord binaries use: where a connection runs ([`endpoint`]), the
//! greeting that opens it ([`greet`]), whole frames in and out ([`frames`]), a reader that keeps
//! the session alive ([`inbox`]), byte and datagram pipes over multiplexed streams
//! ([`streams`]), file bytes spliced into the connection ([`piped`]), and the one-line report
//! of a fatal error ([`report`]). It carries messages; what they mean is each binary's business.

pub mod endpoint;
pub mod frames;
pub mod greet;
pub mod inbox;
pub mod piped;
pub mod report;
pub mod streams;
