//! The launched process's TUN device: created and configured inside its network namespace by
//! the forked child, handed to mirrord over a Unix socket, and pumped asynchronously there; it
//! never touches the host's own interfaces or routes.
//!
//! Lifecycle:
//! 1. before the fork, [`TunPlan::new`] validates the configuration and creates the socket pair;
//! 2. between fork and exec, the child (already in its new network namespace) calls
//!    [`TunPlan::create_in_child`], which only makes async-signal-safe syscalls;
//! 3. after spawn returned, mirrord calls [`TunReceiver::receive`] to get the TUN descriptor and
//!    wraps it in a [`TunDevice`], then [`TunReceiver::receive_listener_socket`] for the
//!    namespace's `sock_diag` socket (the command's listening ports).

mod device;
mod setup;

pub use device::{MAX_PACKET, TunDevice};
pub use setup::{DEFAULT_MTU, DEFAULT_NAME, TunError, TunPlan, TunReceiver, TunStep};
