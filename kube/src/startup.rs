//! How an agent's start is going, judged from its pod, its Job and the Job's events: running,
//! still on its way, or failed for a reason a user can act on (an image that cannot be pulled,
//! a pod that cannot be scheduled, admission refusing it — with the Pod Security level named).
//! A failure must be reported as soon as it is certain, never only at the timeout.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Running,
    /// Not there yet; what it is waiting for.
    Waiting(String),
    /// It will not start; why, in one line.
    Failed(String),
}

/// Waiting reasons of a container that will not go away by waiting.
const FATAL_WAITING: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

fn join_reason(reason: Option<&str>, message: Option<&str>) -> String {
    match (reason, message.filter(|m| !m.is_empty())) {
        (Some(reason), Some(message)) => format!("{reason}: {message}"),
        (Some(reason), None) => reason.to_owned(),
        (None, Some(message)) => message.to_owned(),
        (None, None) => "no reason given".to_owned(),
    }
}

/// Judges one container of the agent (of `image`) by its status.
pub fn judge_container(container: &ContainerStatus, image: &str) -> Startup {
    let Some(state) = &container.state else {
        return Startup::Waiting("container has no state yet".to_owned());
    };
    if let Some(waiting) = &state.waiting {
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if FATAL_WAITING.contains(&reason) {
            let detail = join_reason(Some(reason), waiting.message.as_deref());
            return Startup::Failed(format!("image {image} cannot be run: {detail}"));
        }
        return Startup::Waiting(format!("container {reason}"));
    }
    if let Some(terminated) = &state.terminated {
        let detail = join_reason(terminated.reason.as_deref(), terminated.message.as_deref());
        return Startup::Failed(format!(
            "the agent exited with code {} ({detail}); see kubectl logs",
            terminated.exit_code
        ));
    }
    if state.running.is_some() {
        Startup::Running
    } else {
        Startup::Waiting("container not started yet".to_owned())
    }
}

/// Judges the agent's pod.
pub fn judge_pod(pod: &Pod) -> Startup {
    let Some(status) = &pod.status else {
        return Startup::Waiting("pod has no status yet".to_owned());
    };
    let image = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    for container in status.container_statuses.iter().flatten() {
        if let failed @ Startup::Failed(_) = judge_container(container, &image) {
            return failed;
        }
    }
    for condition in status.conditions.iter().flatten() {
        if condition.type_ == "PodScheduled"
            && condition.status == "False"
            && condition.reason.as_deref() == Some("Unschedulable")
        {
            return Startup::Failed(format!(
                "the agent pod cannot be scheduled: {}",
                condition.message.as_deref().unwrap_or("no reason given")
            ));
        }
    }
    let phase = status.phase.as_deref().unwrap_or("Unknown");
    match phase {
        "Failed" | "Succeeded" => Startup::Failed(format!(
            "the agent pod ended ({phase}): {}",
            join_reason(status.reason.as_deref(), status.message.as_deref())
        )),
        "Running" => {
            let running = status
                .container_statuses
                .iter()
                .flatten()
                .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
            if running {
                Startup::Running
            } else {
                Startup::Waiting("pod Running, container not yet".to_owned())
            }
        }
        _ => {
            let waiting = status
                .container_statuses
                .iter()
                .flatten()
                .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
                .next();
            Startup::Waiting(match waiting {
                Some(reason) => format!("pod {phase}, container {reason}"),
                None => format!("pod {phase}"),
            })
        }
    }
}

/// Judges a Job that has no pod yet: a failed Job, or a pod that could not be created (the
/// Job controller's `FailedCreate` events, where admission refusals appear).
pub fn judge_job(job: Option<&Job>, events: &[Event]) -> Startup {
    let failed = job
        .and_then(|j| j.status.as_ref())
        .into_iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .find(|c| c.type_ == "Failed" && c.status == "True");
    if let Some(condition) = failed {
        return Startup::Failed(format!(
            "the agent Job failed: {}",
            join_reason(condition.reason.as_deref(), condition.message.as_deref())
        ));
    }
    let refusal = events
        .iter()
        .rev()
        .filter(|e| e.reason.as_deref() == Some("FailedCreate"))
        .find_map(|e| e.message.as_deref());
    match refusal {
        Some(message) => Startup::Failed(job_refusal(message)),
        None => Startup::Waiting("no pod created yet".to_owned()),
    }
}

/// The Pod Security level a message says was violated (`baseline:latest`), if any.
pub fn pod_security_policy(message: &str) -> Option<&str> {
    let start = message.find("violates PodSecurity \"")? + "violates PodSecurity \"".len();
    let rest = &message[start..];
    Some(&rest[..rest.find('"')?])
}

/// One line for an agent (`subject`) the API refused to create, with `fix` where Pod Security
/// refused it.
fn refusal(message: &str, subject: &str, fix: &str) -> String {
    let message = message.strip_prefix("Error creating: ").unwrap_or(message);
    match pod_security_policy(message) {
        Some(policy) => {
            let detail = message
                .split_once(&format!("\"{policy}\": "))
                .map_or("", |(_, d)| d);
            format!("{subject} was rejected by Pod Security {policy} ({detail}); {fix}")
        }
        None => format!("{subject} was not created: {message}"),
    }
}

/// One line for an agent Job's pod the API refused to create.
pub fn job_refusal(message: &str) -> String {
    refusal(
        message,
        "the agent pod",
        "run with --ephemeral (agent.ephemeral) to add the agent to the target's pod instead, or run the agent in a namespace whose pod-security.kubernetes.io/enforce level is privileged (agent.namespace)",
    )
}

/// One line for an ephemeral agent the API refused to add to the target's pod.
pub fn ephemeral_refusal(message: &str) -> String {
    refusal(
        message,
        "the ephemeral agent",
        "ask an admin to lower the namespace's pod-security.kubernetes.io/enforce level to baseline, or run a Job agent in a namespace at privileged (agent.namespace)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixture::fixture;

    #[test]
    fn recorded_running_agent_is_running() {
        let pod: Pod = fixture("agent-pod-running.json");
        assert_eq!(judge_pod(&pod), Startup::Running);
    }

    #[test]
    fn recorded_unknown_image_fails_at_once() {
        let pod: Pod = fixture("agent-pod-bad-image.json");
        let Startup::Failed(line) = judge_pod(&pod) else {
            panic!("not a failure");
        };
        assert!(
            line.starts_with("image no-such-image:1 cannot be run: ErrImageNeverPull"),
            "{line}"
        );
    }

    #[test]
    fn pending_pod_waits_and_unschedulable_fails() {
        let mut pod: Pod = fixture("agent-pod-running.json");
        let status = pod.status.as_mut().unwrap();
        status.phase = Some("Pending".into());
        status.container_statuses = None;
        assert_eq!(judge_pod(&pod), Startup::Waiting("pod Pending".into()));
        let status = pod.status.as_mut().unwrap();
        status.conditions = Some(vec![k8s_openapi::api::core::v1::PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/1 nodes are available: 1 Insufficient cpu.".into()),
            ..Default::default()
        }]);
        assert_eq!(
            judge_pod(&pod),
            Startup::Failed(
                "the agent pod cannot be scheduled: 0/1 nodes are available: 1 Insufficient cpu."
                    .into()
            )
        );
    }

    #[test]
    fn pod_security_refusal_names_the_level() {
        let event: Event = fixture("agent-event-pod-security.json");
        let Startup::Failed(line) = judge_job(None, &[event]) else {
            panic!("not a failure");
        };
        assert!(
            line.starts_with("the agent pod was rejected by Pod Security baseline:latest (non-default capabilities (container"),
            "{line}"
        );
        assert!(!line.contains('\n'));
        assert!(line.contains("run with --ephemeral"), "{line}");
        assert_eq!(
            judge_job(None, &[]),
            Startup::Waiting("no pod created yet".into())
        );
        assert_eq!(
            job_refusal("Error creating: pods \"x\" is forbidden: exceeded quota: q"),
            "the agent pod was not created: pods \"x\" is forbidden: exceeded quota: q"
        );
    }
}
