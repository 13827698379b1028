//! The `mirrord` command: resolves the target, reaches its agent and launches the user's
//! command or shell in the target's context. It composes the other crates and never changes
//! anything outside the launched process's own namespaces.

pub mod args;
pub mod client;
pub mod cluster_agent;
pub mod completion;
pub mod config;
pub mod dns;
pub mod doctor;
pub mod envfilter;
pub mod exit;
pub mod forward;
pub mod generated;
pub mod incoming;
pub mod launcher;
pub mod listeners;
pub mod local_agent;
pub mod logging;
pub mod net;
pub mod output;
pub mod remote_fs;
pub mod run;
pub mod target;
pub mod verify;
