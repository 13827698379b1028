//! What a session needs the cluster to allow, as data `mirrord doctor` checks one by one: every
//! RBAC permission mirrord uses (each asked of the API server as a SelfSubjectAccessReview), and
//! whether a namespace's Pod Security level admits the agent Job. It only decides; it never
//! calls the API (`api` asks the questions), and it must never call a permission optional that a
//! session cannot start without.
//!
//! [`permissions`] and [`job_admission`] are pure; [`build_review`] is tested against recorded
//! JSON.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};

use crate::target::Kind;

/// Whether a session can go without a permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Without it no session starts.
    Required,
    /// Without it a session starts but does less; the text says what is lost.
    Optional(&'static str),
}

/// One permission mirrord uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub verb: &'static str,
    pub resource: &'static str,
    pub subresource: Option<&'static str>,
    /// API group; empty for the core group.
    pub group: &'static str,
    /// `None` at the cluster scope.
    pub namespace: Option<String>,
    pub need: Need,
}

impl Permission {
    /// `jobs.batch`, `pods/portforward`: the resource as RBAC rules and kubectl name it.
    pub fn resource_name(&self) -> String {
        let mut name = self.resource.to_owned();
        if !self.group.is_empty() {
            name = format!("{name}.{}", self.group);
        }
        if let Some(sub) = self.subresource {
            name = format!("{}/{sub}", self.resource);
            if !self.group.is_empty() {
                name.push_str(&format!(" ({})", self.group));
            }
        }
        name
    }

    /// The kubectl command that asks the same question.
    pub fn can_i(&self) -> String {
        let qualified = if self.group.is_empty() {
            self.resource.to_owned()
        } else {
            format!("{}.{}", self.resource, self.group)
        };
        let mut line = format!("kubectl auth can-i {} {qualified}", self.verb);
        if let Some(sub) = self.subresource {
            line.push_str(&format!(" --subresource={sub}"));
        }
        match &self.namespace {
            Some(ns) => line.push_str(&format!(" -n {ns}")),
            None => line.push_str(" --all-namespaces"),
        }
        line
    }
}

impl fmt::Display for Permission {
    /// `create jobs.batch in namespace shop`, `list nodes at cluster scope`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.resource_name())?;
        match &self.namespace {
            Some(ns) => write!(f, " in namespace {ns}"),
            None => f.write_str(" at cluster scope"),
        }
    }
}

fn permission(
    verb: &'static str,
    resource: &'static str,
    group: &'static str,
    namespace: Option<&str>,
    need: Need,
) -> Permission {
    Permission {
        verb,
        resource,
        subresource: None,
        group,
        namespace: namespace.map(str::to_owned),
        need,
    }
}

/// The objects `api::Cluster::resolve` reads for a target of `kind`, as (verb, resource, group).
fn resolution(kind: Kind) -> &'static [(&'static str, &'static str, &'static str)] {
    match kind {
        Kind::Pod => &[("get", "pods", "")],
        Kind::Deployment => &[
            ("get", "deployments", "apps"),
            ("list", "replicasets", "apps"),
            ("list", "pods", ""),
        ],
        Kind::StatefulSet => &[("get", "statefulsets", "apps"), ("list", "pods", "")],
        Kind::ReplicaSet => &[("get", "replicasets", "apps"), ("list", "pods", "")],
        Kind::Job => &[("get", "jobs", "batch"), ("list", "pods", "")],
        Kind::CronJob => &[
            ("get", "cronjobs", "batch"),
            ("list", "jobs", "batch"),
            ("list", "pods", ""),
        ],
        Kind::Service => &[("get", "services", ""), ("list", "pods", "")],
    }
}

/// Every permission a session against a target of `kind` (`None`: targetless, which resolves
/// nothing) in `target_ns` needs, with its agent in `agent_ns` (as a Job), or added to the
/// target's pod when `ephemeral`; the same permission is listed once, required if any use
/// requires it.
pub fn permissions(
    kind: Option<Kind>,
    target_ns: &str,
    agent_ns: &str,
    ephemeral: bool,
) -> Vec<Permission> {
    use Need::{Optional, Required};
    let target = Some(target_ns);
    let mut list: Vec<Permission> = kind
        .map_or(&[][..], resolution)
        .iter()
        .map(|(verb, resource, group)| permission(verb, resource, group, target, Required))
        .collect();
    let logs = |namespace| Permission {
        subresource: Some("log"),
        ..permission(
            "get",
            "pods",
            "",
            namespace,
            Optional(
                "the agent is taken as ready once it runs, and a failed agent's last words are not shown",
            ),
        )
    };
    let port_forward = |namespace| Permission {
        subresource: Some("portforward"),
        ..permission("create", "pods", "", namespace, Required)
    };
    if ephemeral && kind.is_some() {
        // The agent joins the target's pod: added to it, watched there until it listens.
        list.extend([
            Permission {
                subresource: Some("ephemeralcontainers"),
                ..permission("patch", "pods", "", target, Required)
            },
            permission("get", "pods", "", target, Required),
            port_forward(target),
            logs(target),
        ]);
    } else {
        let agent = Some(agent_ns);
        list.extend([
            // The agent Job: created, watched until its pod runs, deleted at the end.
            permission("create", "jobs", "batch", agent, Required),
            permission("get", "jobs", "batch", agent, Required),
            permission("delete", "jobs", "batch", agent, Required),
            permission("list", "pods", "", agent, Required),
            port_forward(agent),
            logs(agent),
            permission(
                "list",
                "events",
                "",
                agent,
                Optional("a refused agent pod is reported only at the startup timeout"),
            ),
            permission(
                "list",
                "jobs",
                "batch",
                None,
                Optional("your stale agents are not cleaned up"),
            ),
        ]);
    }
    list.extend([
        permission(
            "list",
            "nodes",
            "",
            None,
            Optional("the pod ranges are guessed from pod addresses (list pods at cluster scope)"),
        ),
        permission(
            "list",
            "servicecidrs",
            "networking.k8s.io",
            None,
            Optional("the Service range is asked by a dry-run Service instead"),
        ),
    ]);
    let mut unique: Vec<Permission> = Vec::new();
    for wanted in list {
        match unique.iter_mut().find(|p| {
            (p.verb, p.resource, p.subresource, p.group, &p.namespace)
                == (
                    wanted.verb,
                    wanted.resource,
                    wanted.subresource,
                    wanted.group,
                    &wanted.namespace,
                )
        }) {
            Some(known) if wanted.need == Need::Required => known.need = Need::Required,
            Some(_) => {}
            None => unique.push(wanted),
        }
    }
    unique
}

/// The review that asks the API server whether the caller holds `permission`.
pub fn build_review(permission: &Permission) -> SelfSubjectAccessReview {
    SelfSubjectAccessReview {
        metadata: Default::default(),
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(permission.verb.to_owned()),
                resource: Some(permission.resource.to_owned()),
                subresource: permission.subresource.map(str::to_owned),
                group: Some(permission.group.to_owned()),
                namespace: permission.namespace.clone(),
                ..Default::default()
            }),
            non_resource_attributes: None,
        },
        status: None,
    }
}

/// The API server's answer to a review: allowed, or not with its reason when it gave one.
pub fn review_answer(review: &SelfSubjectAccessReview) -> Result<(), Option<String>> {
    match &review.status {
        Some(status) if status.allowed && status.denied != Some(true) => Ok(()),
        Some(status) => Err(status
            .reason
            .clone()
            .or_else(|| status.evaluation_error.clone())
            .filter(|reason| !reason.is_empty())),
        None => Err(None),
    }
}

/// The label that sets a namespace's enforced Pod Security level.
pub const ENFORCE_LABEL: &str = "pod-security.kubernetes.io/enforce";

/// A Pod Security Standards level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Privileged,
    Baseline,
    Restricted,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Privileged => "privileged",
            Level::Baseline => "baseline",
            Level::Restricted => "restricted",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespace's enforced level, and whether a label set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSecurity {
    pub level: Level,
    /// False when the namespace has no enforce label: the API server's default then applies,
    /// which is `privileged` unless the cluster's admission configuration says otherwise.
    pub labelled: bool,
}

/// The enforced level of a namespace with `labels`. An unknown value is taken as the strictest
/// level, as the admission plugin refuses such a namespace's pods.
pub fn pod_security(labels: Option<&BTreeMap<String, String>>) -> PodSecurity {
    match labels.and_then(|labels| labels.get(ENFORCE_LABEL)) {
        None => PodSecurity {
            level: Level::Privileged,
            labelled: false,
        },
        Some(value) => PodSecurity {
            level: match value.as_str() {
                "privileged" => Level::Privileged,
                "baseline" => Level::Baseline,
                _ => Level::Restricted,
            },
            labelled: true,
        },
    }
}

/// Whether `level` admits the agent Job's pod: `Err` names what it forbids. A targeted agent
/// has hostPID and [`crate::agent_job::CAPABILITIES`]; a targetless one has neither, but runs as
/// root without the restricted level's settings.
pub fn job_admission(level: Level, targeted: bool) -> Result<(), String> {
    match (level, targeted) {
        (Level::Privileged, _) | (Level::Baseline, false) => Ok(()),
        (_, true) => Err(format!(
            "{level} forbids the agent's hostPID and capabilities {}",
            crate::agent_job::CAPABILITIES.join(", ")
        )),
        (Level::Restricted, false) => Err(
            "restricted forbids the agent running as root, with its capabilities and no seccomp profile".to_owned(),
        ),
    }
}

/// The capabilities an ephemeral agent is given in a namespace at `level`: those it asks for
/// where Pod Security allows them (privileged), none under baseline or restricted, which admit
/// none of them.
pub fn ephemeral_capabilities(level: Level) -> Vec<String> {
    match level {
        Level::Privileged => crate::agent_job::EPHEMERAL_CAPABILITIES
            .iter()
            .map(|c| (*c).to_owned())
            .collect(),
        Level::Baseline | Level::Restricted => Vec::new(),
    }
}

/// Whether `level` admits the ephemeral agent: `Err` names what it forbids. Under baseline it
/// has no NET_ADMIN, so it cannot redirect incoming traffic.
pub fn ephemeral_admission(level: Level) -> Result<(), String> {
    match level {
        Level::Privileged | Level::Baseline => Ok(()),
        Level::Restricted => {
            Err("restricted forbids the agent running as root without a seccomp profile".to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixture::fixture;

    #[test]
    fn a_deployment_needs_its_objects_the_job_and_the_port_forward() {
        let list = permissions(Some(Kind::Deployment), "shop", "shop", false);
        let required: Vec<String> = list
            .iter()
            .filter(|p| p.need == Need::Required)
            .map(Permission::to_string)
            .collect();
        assert_eq!(
            required,
            [
                "get deployments.apps in namespace shop",
                "list replicasets.apps in namespace shop",
                "list pods in namespace shop",
                "create jobs.batch in namespace shop",
                "get jobs.batch in namespace shop",
                "delete jobs.batch in namespace shop",
                "create pods/portforward in namespace shop",
            ]
        );
        // Listed once, though both resolution and the agent's wait use it.
        assert_eq!(
            list.iter()
                .filter(|p| p.to_string() == "list pods in namespace shop")
                .count(),
            1
        );
        let optional: Vec<String> = list
            .iter()
            .filter(|p| p.need != Need::Required)
            .map(Permission::to_string)
            .collect();
        assert_eq!(
            optional,
            [
                "get pods/log in namespace shop",
                "list events in namespace shop",
                "list jobs.batch at cluster scope",
                "list nodes at cluster scope",
                "list servicecidrs.networking.k8s.io at cluster scope",
            ]
        );
    }

    #[test]
    fn an_ephemeral_agent_needs_the_pods_subresource_and_no_job() {
        let list = permissions(Some(Kind::Deployment), "shop", "agents", true);
        let required: Vec<String> = list
            .iter()
            .filter(|p| p.need == Need::Required)
            .map(Permission::to_string)
            .collect();
        assert_eq!(
            required,
            [
                "get deployments.apps in namespace shop",
                "list replicasets.apps in namespace shop",
                "list pods in namespace shop",
                "patch pods/ephemeralcontainers in namespace shop",
                "get pods in namespace shop",
                "create pods/portforward in namespace shop",
            ]
        );
        assert!(list.iter().all(|p| p.resource != "jobs"));
        assert!(list.iter().any(|p| p.can_i()
            == "kubectl auth can-i patch pods --subresource=ephemeralcontainers -n shop"));
        // A targetless session has no pod to join: its agent is a Job.
        let targetless = permissions(None, "shop", "shop", true);
        assert!(targetless.iter().any(|p| p.resource == "jobs"));
    }

    #[test]
    fn the_agent_namespace_holds_the_job_and_the_check_is_kubectls() {
        let list = permissions(Some(Kind::CronJob), "shop", "agents", false);
        let lines: Vec<String> = list.iter().map(Permission::can_i).collect();
        assert!(lines.contains(&"kubectl auth can-i get cronjobs.batch -n shop".to_owned()));
        assert!(lines.contains(&"kubectl auth can-i list jobs.batch -n shop".to_owned()));
        assert!(lines.contains(&"kubectl auth can-i create jobs.batch -n agents".to_owned()));
        assert!(lines.contains(
            &"kubectl auth can-i create pods --subresource=portforward -n agents".to_owned()
        ));
        assert!(lines.contains(&"kubectl auth can-i list nodes --all-namespaces".to_owned()));
    }

    #[test]
    fn the_review_is_the_recorded_request_and_answers_are_read() {
        let list = permissions(None, "mirrord-e2e", "mirrord-e2e", false);
        let forward = list
            .iter()
            .find(|p| p.subresource == Some("portforward"))
            .expect("port-forward is needed");
        let recorded: serde_json::Value = fixture("ssar-portforward-request.json");
        assert_eq!(
            serde_json::to_value(build_review(forward)).expect("serializable"),
            recorded
        );
        let denied: SelfSubjectAccessReview = fixture("ssar-portforward-denied.json");
        assert_eq!(review_answer(&denied), Err(None));
        let allowed: SelfSubjectAccessReview = fixture("ssar-portforward-allowed.json");
        assert_eq!(review_answer(&allowed), Ok(()));
    }

    #[test]
    fn pod_security_levels_and_the_job_agent() {
        let labels = |value: &str| BTreeMap::from([(ENFORCE_LABEL.to_owned(), value.to_owned())]);
        assert_eq!(
            pod_security(None),
            PodSecurity {
                level: Level::Privileged,
                labelled: false
            }
        );
        assert_eq!(
            pod_security(Some(&labels("baseline"))).level,
            Level::Baseline
        );
        assert_eq!(
            pod_security(Some(&labels("nonsense"))).level,
            Level::Restricted
        );
        assert_eq!(job_admission(Level::Privileged, true), Ok(()));
        assert_eq!(
            job_admission(Level::Baseline, true),
            Err("baseline forbids the agent's hostPID and capabilities SYS_ADMIN, SYS_PTRACE, NET_ADMIN".to_owned())
        );
        assert_eq!(job_admission(Level::Baseline, false), Ok(()));
        assert!(job_admission(Level::Restricted, false).is_err());
        assert_eq!(ephemeral_admission(Level::Baseline), Ok(()));
        assert!(ephemeral_admission(Level::Restricted).is_err());
        assert_eq!(
            ephemeral_capabilities(Level::Privileged),
            ["NET_ADMIN", "SYS_PTRACE"]
        );
        assert!(ephemeral_capabilities(Level::Baseline).is_empty());
    }
}
