//! Everything mirrord says to the Kubernetes API: connecting with the user's kubeconfig,
//! resolving a target path to a pod and container, creating, reaching and deleting the agent,
//! listing targets and discovering the cluster's address ranges. It must never log the session
//! token, and never leave an agent behind when its start fails.
//!
//! The rules live in pure modules tested on recorded objects ([`target`], [`choose`],
//! [`access`], [`agent_job`], [`startup`], [`cidr`], [`forbidden`], [`listing`]); [`api`] is the thin shell
//! that fetches their inputs and carries out their answers.

pub mod access;
pub mod agent_job;
pub mod api;
pub mod choose;
pub mod cidr;
pub mod forbidden;
pub mod listing;
pub mod startup;
pub mod target;

/// The recorded API objects of `tests/fixtures`, for the pure modules' unit tests.
#[cfg(test)]
mod test_fixture {
    pub fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }
}

pub use agent_job::{AgentJobSpec, AgentToken, Placement};
pub use api::{AgentPod, Cluster, DEFAULT_STARTUP_TIMEOUT, Resolved, ResolvedPod};
pub use target::{Kind, TargetPath};

/// The crate's errors; each displays as one line a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Target(#[from] target::TargetParseError),
    #[error(transparent)]
    Choose(#[from] choose::ChooseError),
    #[error("{0}")]
    Forbidden(forbidden::Forbidden),
    #[error("cannot load the kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("cannot reach the cluster at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("cannot {action}: {reason}")]
    Api { action: String, reason: String },
    #[error("agent {job} failed to start: {reason}")]
    AgentFailed { job: String, reason: String },
    #[error("agent {job} did not start within {secs} s (see kubectl describe job {job})")]
    AgentTimeout { job: String, secs: u64 },
    #[error("port-forward to {pod}:{port}: {reason}")]
    PortForward {
        pod: String,
        port: u16,
        reason: String,
    },
}

impl Error {
    /// Whether the API server could not be reached, or answered that it cannot serve now: the
    /// same request may pass once it is back.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }
}
