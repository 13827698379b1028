//! Reusable end-to-end fixtures: a fake pod (own net + mount + uts namespaces) attached by veth
//! to a fake cluster netns, plus helpers to drive the real `mirrord` and `mirrord-agent` binaries
//! and to prove nothing was left behind.
//!
//! Nothing here may send a packet from the machine's own network namespace: every fixture assumes
//! it runs inside the isolated "world" that [`world::enter`] sets up, and refuses to run outside.
//!
//! Modules are layered; each uses only those listed before it (and this root's error type):
//! [`command`] runs one command; [`netns`] lists and deletes the fixtures' namespaces;
//! [`leftovers`] finds and removes what a test left behind; [`world`] enters the isolated world;
//! [`process`] locates the binaries and tags a test's processes ([`Scene`]); [`cluster`] builds
//! the fake cluster and pods; [`pty`] runs a program on a terminal.

pub mod cluster;
pub mod command;
pub mod leftovers;
pub mod netns;
pub mod process;
pub mod pty;
pub mod usage;
pub mod world;

pub use cluster::{Cluster, HttpServer, Pod, PodBuilder};
pub use command::Output;
pub use leftovers::{check_scene, check_world};
pub use process::{HandStartedAgent, Scene, agent_binary, mirrord_binary};
pub use pty::Pty;

use std::time::Duration;

/// Every namespace, interface and temp file a fixture creates starts with this prefix.
pub const PREFIX: &str = "mrdt-";

/// Everything a fixture can fail with; tests turn these into failures with their message.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error(
        "fixtures must run inside the isolated e2e world (env {marker} unset); refusing to touch the machine's network"
    )]
    OutsideWorld { marker: &'static str },
    #[error("could not start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed (exit {code}): {stderr}")]
    CommandFailed {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error(
        "`{command}` did not finish within {timeout:?}; output so far: stdout={stdout:?} stderr={stderr:?}"
    )]
    Timeout {
        command: String,
        timeout: Duration,
        stdout: String,
        stderr: String,
    },
    #[error("{what} did not become ready within {timeout:?}: {detail}")]
    NotReady {
        what: String,
        timeout: Duration,
        detail: String,
    },
    #[error(
        "binary `{name}` not found at {path} (build with `cargo build --release --workspace` or set {env})"
    )]
    BinaryMissing {
        name: &'static str,
        path: String,
        env: &'static str,
    },
    #[error("left behind: {0}")]
    LeftBehind(String),
    #[error("pty: {0}")]
    Pty(String),
    #[error("i/o on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("system call {call}: {source}")]
    Sys {
        call: &'static str,
        #[source]
        source: nix::Error,
    },
}

impl FixtureError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| FixtureError::Io { what, source }
    }

    pub(crate) fn sys(call: &'static str) -> impl FnOnce(nix::Error) -> Self {
        move |source| FixtureError::Sys { call, source }
    }
}

pub type Result<T, E = FixtureError> = std::result::Result<T, E>;
