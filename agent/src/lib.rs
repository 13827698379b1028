//! The remote half of mirrord. It runs beside the target (locally for `pid/` targets, in the
//! pod for Kubernetes ones), joins the target's network namespace for every socket it opens,
//! and serves the target's environment, hostname and files — never anything outside the
//! target's root, and nothing to a client that did not present the session token.

pub mod confine;
pub mod container;
pub mod error;
pub mod files;
pub mod fs;
pub mod incoming;
pub mod netns;
pub mod server;
pub mod target;
