//! The agent's Job, built as an object from typed inputs: pinned to the target's node, seeing
//! the node's processes (hostPID) with just the capabilities it needs to enter a container,
//! tolerating every taint, never retried, removed by the TTL controller after it ends, and
//! labelled with the session and the local user so stale agents can be found. Or, where Pod
//! Security forbids that, the agent as an ephemeral container of the target's pod, sharing the
//! target container's namespaces, with only the capabilities the namespace allows. The session
//! token travels only in the container's environment: it must never appear in a label, an
//! argument or a log line (its `Debug` is redacted).
//!
//! [`build_agent_job`] and [`build_agent_ephemeral`] are pure and tested against recorded JSON;
//! `api` creates the objects.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EphemeralContainer, PodSpec, PodTemplateSpec,
    ResourceRequirements, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Label every agent carries, whatever its session.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const NAME_VALUE: &str = "mirrord-agent";
/// Label naming the session that created the agent.
pub const SESSION_LABEL: &str = "mirrord/session";
/// Label naming the local user who started the session (see [`label_value`]).
pub const USER_LABEL: &str = "mirrord/user";
/// The container's name in the agent pod.
pub const CONTAINER_NAME: &str = "mirrord-agent";
/// Where the agent reads the session token from.
pub const TOKEN_ENV: &str = "MIRRORD_AGENT_TOKEN";
/// Capabilities the agent needs: join namespaces and read other processes' roots (SYS_ADMIN,
/// SYS_PTRACE) and redirect incoming traffic (NET_ADMIN).
pub const CAPABILITIES: [&str; 3] = ["SYS_ADMIN", "SYS_PTRACE", "NET_ADMIN"];
/// Capabilities an ephemeral agent asks for where the namespace allows them: redirect incoming
/// traffic (NET_ADMIN) and read the target's root and environment whatever its capabilities
/// (SYS_PTRACE). It enters no namespace, so it needs no SYS_ADMIN.
pub const EPHEMERAL_CAPABILITIES: [&str; 2] = ["NET_ADMIN", "SYS_PTRACE"];

/// The default agent image for this version; the test cluster maps the name to the locally
/// built agent.
pub fn default_image() -> String {
    format!("ghcr.io/metalbear-co/mirrord:{}", env!("CARGO_PKG_VERSION"))
}

/// The session token. Kept out of `Debug` output so that logging a spec cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(String);

impl AgentToken {
    pub fn new(token: impl Into<String>) -> Self {
        AgentToken(token.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(<redacted>)")
    }
}

/// Where the agent runs and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Beside a container: on its node, finding it by its ID.
    Container { node: String, container_id: String },
    /// In the container's pod, as an ephemeral container that shares its namespaces (its
    /// process namespace through `targetContainerName`), finding it by its ID, with
    /// `capabilities` added (those the namespace's Pod Security level allows).
    InPod {
        pod: String,
        container: String,
        container_id: String,
        capabilities: Vec<String>,
    },
    /// On its own, in the namespace; it serves its own network, without privileges.
    Targetless,
}

/// Everything the agent Job is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentJobSpec {
    /// Short lowercase alphanumeric session id; names the Job `mirrord-agent-<session>`.
    pub session: String,
    /// The local user name, as given; made into a label value by [`label_value`].
    pub user: String,
    pub namespace: String,
    pub image: String,
    /// `None` leaves the cluster's default (`IfNotPresent` for a tagged image).
    pub image_pull_policy: Option<String>,
    /// TCP port the agent listens on in its pod.
    pub port: u16,
    /// The agent exits after this many seconds without a session.
    pub idle_ttl_secs: u64,
    /// The TTL controller removes the finished Job (and its pod) after this many seconds.
    pub ttl_after_finished_secs: i32,
    /// Run the container privileged instead of adding [`CAPABILITIES`] (clusters whose runtime
    /// refuses setns without it).
    pub privileged: bool,
    pub placement: Placement,
    pub token: AgentToken,
}

/// The agent's name for a session: its Job's, or its ephemeral container's.
pub fn job_name(session: &str) -> String {
    format!("mirrord-agent-{session}")
}

/// A label value from any string: at most 63 characters of `[A-Za-z0-9._-]`, starting and
/// ending alphanumeric; other characters become `_`, and an empty result becomes `unknown`.
pub fn label_value(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    let trimmed = mapped.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "unknown".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// The labels of an agent of this session and user (on the Job and its pod).
pub fn agent_labels(session: &str, user: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_owned(), NAME_VALUE.to_owned()),
        (SESSION_LABEL.to_owned(), label_value(session)),
        (USER_LABEL.to_owned(), label_value(user)),
    ])
}

/// The `labelSelector` that finds every agent of a user.
pub fn user_agents_selector(user: &str) -> String {
    format!(
        "{NAME_LABEL}={NAME_VALUE},{USER_LABEL}={}",
        label_value(user)
    )
}

/// The agent's command line after its entrypoint (the image's entrypoint is the agent).
pub fn agent_args(spec: &AgentJobSpec) -> Vec<String> {
    let mut args = vec!["--listen".to_owned(), format!("0.0.0.0:{}", spec.port)];
    match &spec.placement {
        Placement::Container { container_id, .. } => {
            args.extend(["--container-id".to_owned(), container_id.clone()]);
        }
        // An ephemeral container cannot be removed: the agent ends with its session.
        Placement::InPod { container_id, .. } => args.extend([
            "--container-id".to_owned(),
            container_id.clone(),
            "--in-target-pod".to_owned(),
            "--once".to_owned(),
        ]),
        Placement::Targetless => {}
    }
    args.extend(["--idle-ttl".to_owned(), spec.idle_ttl_secs.to_string()]);
    args
}

/// The agent container's security context: privileged, or with `capabilities` added.
fn security_context(privileged: bool, capabilities: &[String]) -> Option<SecurityContext> {
    if privileged {
        return Some(SecurityContext {
            privileged: Some(true),
            ..Default::default()
        });
    }
    (!capabilities.is_empty()).then(|| SecurityContext {
        capabilities: Some(Capabilities {
            add: Some(capabilities.to_vec()),
            drop: None,
        }),
        ..Default::default()
    })
}

fn token_env(spec: &AgentJobSpec) -> Option<Vec<EnvVar>> {
    Some(vec![EnvVar {
        name: TOKEN_ENV.to_owned(),
        value: Some(spec.token.0.clone()),
        value_from: None,
    }])
}

/// The agent as an ephemeral container of the target's pod: named after the session (a pod
/// keeps every ephemeral container it was given, so each session's needs its own name), in the
/// target container's process namespace. Ephemeral containers may declare no ports or
/// resources. Placements other than [`Placement::InPod`] give a container that targets nothing.
pub fn build_agent_ephemeral(spec: &AgentJobSpec) -> EphemeralContainer {
    let (target_container_name, capabilities) = match &spec.placement {
        Placement::InPod {
            container,
            capabilities,
            ..
        } => (Some(container.clone()), capabilities.as_slice()),
        _ => (None, &[][..]),
    };
    EphemeralContainer {
        name: job_name(&spec.session),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(agent_args(spec)),
        env: token_env(spec),
        security_context: security_context(spec.privileged, capabilities),
        target_container_name,
        ..Default::default()
    }
}

pub fn build_agent_job(spec: &AgentJobSpec) -> Job {
    let labels = agent_labels(&spec.session, &spec.user);
    let targeted = matches!(spec.placement, Placement::Container { .. });
    let capabilities: Vec<String> = CAPABILITIES.iter().map(|c| (*c).to_owned()).collect();
    let container = Container {
        name: CONTAINER_NAME.to_owned(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(agent_args(spec)),
        env: token_env(spec),
        ports: Some(vec![ContainerPort {
            name: Some("session".to_owned()),
            container_port: i32::from(spec.port),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".to_owned())),
                ("memory".to_owned(), Quantity("32Mi".to_owned())),
            ])),
            ..Default::default()
        }),
        security_context: targeted
            .then(|| security_context(spec.privileged, &capabilities))
            .flatten(),
        ..Default::default()
    };
    let (node_name, host_pid, tolerations) = match &spec.placement {
        Placement::Container { node, .. } => (
            Some(node.clone()),
            Some(true),
            Some(vec![Toleration {
                operator: Some("Exists".to_owned()),
                ..Default::default()
            }]),
        ),
        Placement::Targetless | Placement::InPod { .. } => (None, None, None),
    };
    // A mesh sidecar in the agent's pod would hold it not-ready and intercept its port.
    let annotations = BTreeMap::from([
        ("sidecar.istio.io/inject".to_owned(), "false".to_owned()),
        ("linkerd.io/inject".to_owned(), "disabled".to_owned()),
    ]);
    Job {
        metadata: ObjectMeta {
            name: Some(job_name(&spec.session)),
            namespace: Some(spec.namespace.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            ttl_seconds_after_finished: Some(spec.ttl_after_finished_secs),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    restart_policy: Some("Never".to_owned()),
                    node_name,
                    host_pid,
                    tolerations,
                    // The agent never talks to the API.
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(2),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(placement: Placement) -> AgentJobSpec {
        AgentJobSpec {
            session: "k3x9q2m7za".into(),
            user: "alice@laptop".into(),
            namespace: "shop".into(),
            image: "ghcr.io/metalbear-co/mirrord:0.1.0".into(),
            image_pull_policy: None,
            port: 7400,
            idle_ttl_secs: 60,
            ttl_after_finished_secs: 30,
            privileged: false,
            placement,
            token: AgentToken::new("not-a-real-token"),
        }
    }

    fn targeted() -> AgentJobSpec {
        spec(Placement::Container {
            node: "mrdc-node".into(),
            container_id: format!("mrdc://{}", "ab".repeat(32)),
        })
    }

    /// Compares a built object with `tests/fixtures/NAME`; `MIRRORD_UPDATE_FIXTURES=1` rewrites
    /// it instead.
    fn assert_fixture(name: &str, built: &impl serde::Serialize) {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let built = serde_json::to_value(built).unwrap();
        if std::env::var_os("MIRRORD_UPDATE_FIXTURES").is_some() {
            let text = serde_json::to_string_pretty(&built).unwrap() + "\n";
            std::fs::write(&path, text).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let recorded: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(built, recorded, "{name} differs from the built object");
    }

    #[test]
    fn targeted_job_matches_recorded() {
        assert_fixture("agent-job.json", &build_agent_job(&targeted()));
    }

    #[test]
    fn targetless_job_matches_recorded() {
        assert_fixture(
            "agent-job-targetless.json",
            &build_agent_job(&spec(Placement::Targetless)),
        );
    }

    fn in_pod(capabilities: &[&str]) -> AgentJobSpec {
        spec(Placement::InPod {
            pod: "web-5d8f7c9b4-x2x9z".into(),
            container: "web".into(),
            container_id: format!("mrdc://{}", "ab".repeat(32)),
            capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        })
    }

    #[test]
    fn ephemeral_agent_matches_recorded() {
        assert_fixture(
            "agent-ephemeral.json",
            &build_agent_ephemeral(&in_pod(&EPHEMERAL_CAPABILITIES)),
        );
    }

    #[test]
    fn ephemeral_agent_without_capabilities_has_no_security_context() {
        let container = build_agent_ephemeral(&in_pod(&[]));
        assert_eq!(container.security_context, None);
        assert_eq!(container.target_container_name.as_deref(), Some("web"));
        assert_eq!(container.ports, None);
        assert_eq!(container.resources, None);
        let args = container.args.unwrap().join(" ");
        assert!(
            args.ends_with("--in-target-pod --once --idle-ttl 60"),
            "{args}"
        );
        let debug = format!("{:?}", in_pod(&[]));
        assert!(!debug.contains("not-a-real-token"), "{debug}");
    }

    #[test]
    fn privileged_replaces_the_capabilities() {
        let job = build_agent_job(&AgentJobSpec {
            privileged: true,
            ..targeted()
        });
        let pod = job.spec.unwrap().template.spec.unwrap();
        let context = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(context.privileged, Some(true));
        assert_eq!(context.capabilities, None);
    }

    #[test]
    fn token_stays_out_of_labels_args_and_debug() {
        let spec = targeted();
        let job = build_agent_job(&spec);
        let debug = format!("{spec:?}");
        assert!(!debug.contains("not-a-real-token"), "{debug}");
        let args = agent_args(&spec).join(" ");
        assert!(!args.contains("not-a-real-token"));
        assert_eq!(
            args,
            format!(
                "--listen 0.0.0.0:7400 --container-id mrdc://{} --idle-ttl 60",
                "ab".repeat(32)
            )
        );
        let labels = serde_json::to_string(&job.metadata.labels).unwrap();
        assert!(!labels.contains("not-a-real-token"));
    }

    #[test]
    fn label_values_are_valid_for_any_user() {
        assert_eq!(label_value("alice"), "alice");
        assert_eq!(label_value("DOMAIN\\bob smith"), "DOMAIN_bob_smith");
        assert_eq!(label_value("_x_"), "x");
        assert_eq!(label_value(""), "unknown");
        assert_eq!(label_value("@@@"), "unknown");
        assert_eq!(label_value(&"a".repeat(100)).len(), 63);
        assert_eq!(
            user_agents_selector("alice@laptop"),
            "app.kubernetes.io/name=mirrord-agent,mirrord/user=alice_laptop"
        );
        assert_eq!(job_name("k3x9"), "mirrord-agent-k3x9");
        assert!(default_image().starts_with("ghcr.io/metalbear-co/mirrord:"));
    }
}
