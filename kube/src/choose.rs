//! Choosing the pod and container a target path means, over objects already fetched: a
//! workload's pods are those its selector matches (and, where it owns them, that it owns); of
//! those, a running and ready pod is chosen, the oldest first so repeated sessions land on the
//! same pod. It must never choose a pod that is not running and ready, nor guess a container
//! when several could be meant.
//!
//! Everything here is pure over k8s-openapi objects, so the rules are tested on recorded
//! objects; `api` fetches them.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

/// The annotation `kubectl exec`/`logs` honour for the container to use by default.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";

/// Containers a service mesh injects beside the application: never the one a user means.
pub const MESH_CONTAINERS: [&str; 8] = [
    "istio-proxy",
    "istio-init",
    "istio-validation",
    "linkerd-proxy",
    "linkerd-init",
    "linkerd-network-validator",
    "kuma-sidecar",
    "vault-agent",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChooseError {
    #[error("{what} not found in namespace {namespace}{}", suggest(.close))]
    NotFound {
        what: String,
        namespace: String,
        /// Names of the same kind in that namespace that are close to the one asked for.
        close: Vec<String>,
    },
    #[error("{what} has no running and ready pod ({})", pod_list(.pods))]
    NoReadyPod {
        what: String,
        /// Each candidate pod with its phase and readiness, e.g. `web-1 Pending`.
        pods: Vec<String>,
    },
    #[error("{what} selects no pods: it has no selector")]
    NoSelector { what: String },
    #[error("{what} has no job yet (no run so far)")]
    NoJob { what: String },
    #[error(
        "pod {pod} has several containers ({}); choose one with /container/NAME",
        .containers.join(", ")
    )]
    SeveralContainers {
        pod: String,
        containers: Vec<String>,
    },
    #[error("pod {pod} has no container {container} (it has {})", .containers.join(", "))]
    NoSuchContainer {
        pod: String,
        container: String,
        containers: Vec<String>,
    },
    #[error("container {container} of pod {pod} has not started (no container ID yet)")]
    NotStarted { pod: String, container: String },
    #[error("pod {pod} has no {field} in its status")]
    MissingStatus { pod: String, field: &'static str },
}

fn suggest(close: &[String]) -> String {
    if close.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", close.join(", "))
    }
}

fn pod_list(pods: &[String]) -> String {
    if pods.is_empty() {
        "no pods at all".to_owned()
    } else {
        pods.join(", ")
    }
}

/// Whether a label selector (matchLabels and matchExpressions, ANDed) selects these labels.
/// An empty selector selects everything, as in Kubernetes; an unknown operator selects nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        let value = labels.get(&req.key);
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// The `matchLabels` part as a `labelSelector` query, so the API filters most pods out before
/// [`selector_matches`] applies the whole selector.
pub fn match_labels_query(selector: &LabelSelector) -> String {
    selector
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether the object's owner references name `uid`.
pub fn owned_by(meta: &ObjectMeta, uid: &str) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|owner| owner.uid == uid)
}

/// A Service's selector as a label selector; `None` when it has none (it then selects no pods:
/// its endpoints are managed by hand).
pub fn service_selector(selector: Option<&BTreeMap<String, String>>) -> Option<LabelSelector> {
    let labels = selector.filter(|s| !s.is_empty())?;
    Some(LabelSelector {
        match_labels: Some(labels.clone()),
        match_expressions: None,
    })
}

/// The newest of a CronJob's jobs (by creation time, then name).
pub fn newest_job<'a>(jobs: impl IntoIterator<Item = &'a Job>) -> Option<&'a Job> {
    jobs.into_iter().max_by(|a, b| {
        let key = |j: &'a Job| {
            (
                j.metadata.creation_timestamp.as_ref().map(|t| t.0),
                j.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    })
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn is_running_and_ready(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && phase == Some("Running") && is_ready(pod)
}

/// How a pod that was passed over is described: `NAME PHASE[ not ready][ terminating]`.
fn describe(pod: &Pod) -> String {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown");
    let mut line = format!("{name} {phase}");
    if phase == "Running" && !is_ready(pod) {
        line.push_str(" not ready");
    }
    if pod.metadata.deletion_timestamp.is_some() {
        line.push_str(" terminating");
    }
    line
}

/// Of a workload's pods, the oldest one that is running and ready (then by name).
pub fn choose_pod<'a>(what: &str, pods: &'a [Pod]) -> Result<&'a Pod, ChooseError> {
    pods.iter()
        .filter(|pod| is_running_and_ready(pod))
        .min_by(|a, b| {
            let key = |p: &'a Pod| {
                (
                    p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    p.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        })
        .ok_or_else(|| ChooseError::NoReadyPod {
            what: what.to_owned(),
            pods: pods.iter().map(describe).collect(),
        })
}

/// The container a session targets, with what the agent needs to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChosenContainer {
    pub name: String,
    /// `RUNTIME://HEX` from the pod status.
    pub id: String,
}

/// The named container; else the one the default-container annotation names; else the only
/// container that is not a mesh sidecar.
pub fn choose_container(pod: &Pod, wanted: Option<&str>) -> Result<ChosenContainer, ChooseError> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let names: Vec<String> = pod
        .spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .map(|c| c.name.clone())
        .collect();
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DEFAULT_CONTAINER_ANNOTATION))
        .filter(|name| names.contains(name));
    let name = match wanted {
        Some(wanted) if names.iter().any(|n| n == wanted) => wanted.to_owned(),
        Some(wanted) => {
            return Err(ChooseError::NoSuchContainer {
                pod: pod_name,
                container: wanted.to_owned(),
                containers: names,
            });
        }
        None => match annotated {
            Some(name) => name.clone(),
            None => {
                let apps: Vec<&String> = names
                    .iter()
                    .filter(|n| !MESH_CONTAINERS.contains(&n.as_str()))
                    .collect();
                match apps.as_slice() {
                    [only] => (*only).clone(),
                    _ => {
                        return Err(ChooseError::SeveralContainers {
                            pod: pod_name,
                            containers: names,
                        });
                    }
                }
            }
        },
    };
    let id = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .find(|s| s.name == name)
        .and_then(|s| s.container_id.clone())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| ChooseError::NotStarted {
            pod: pod_name,
            container: name.clone(),
        })?;
    Ok(ChosenContainer { name, id })
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// Up to three names close to `wanted`: within a third of its length in edits (at least two),
/// or containing it; nearest first.
pub fn close_names<'a>(wanted: &str, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let limit = (wanted.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, &str)> = names
        .into_iter()
        .filter_map(|name| {
            let distance = edit_distance(wanted, name);
            let close = distance <= limit || (wanted.len() >= 3 && name.contains(wanted));
            close.then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored.dedup();
    scored
        .into_iter()
        .take(3)
        .map(|(_, name)| name.to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixture::fixture;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn pods() -> Vec<Pod> {
        let list: serde_json::Value = fixture("web-pods.json");
        serde_json::from_value(list["items"].clone()).unwrap()
    }

    /// The recorded pods of Deployment web (the namespace also holds a `client` pod).
    fn web_pods() -> Vec<Pod> {
        let mut pods = pods();
        pods.retain(|p| {
            p.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("web-"))
        });
        assert_eq!(pods.len(), 2);
        pods
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn recorded_deployment_selects_its_pods_only() {
        let deployment: Deployment = fixture("web-deployment.json");
        let selector = deployment.spec.selector;
        assert_eq!(match_labels_query(&selector), "app=web");
        let pods = pods();
        let selected: Vec<_> = pods
            .iter()
            .filter(|p| selector_matches(&selector, &p.metadata.labels.clone().unwrap_or_default()))
            .filter_map(|p| p.metadata.name.as_deref())
            .collect();
        assert_eq!(selected.len(), 2, "{selected:?}");
        assert!(selected.iter().all(|n| n.starts_with("web-")));
    }

    #[test]
    fn recorded_service_selector_becomes_a_label_selector() {
        let service: Service = fixture("web-service.json");
        let selector = service_selector(service.spec.unwrap().selector.as_ref()).unwrap();
        assert_eq!(match_labels_query(&selector), "app=web");
        assert_eq!(service_selector(Some(&BTreeMap::new())), None);
        assert_eq!(service_selector(None), None);
    }

    #[test]
    fn match_expressions_follow_kubernetes() {
        let req = |key: &str, operator: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let selector = LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![
                req("tier", "In", &["front", "edge"]),
                req("canary", "NotIn", &["true"]),
                req("team", "Exists", &[]),
                req("legacy", "DoesNotExist", &[]),
            ]),
        };
        let good = labels(&[("app", "web"), ("tier", "edge"), ("team", "a")]);
        assert!(selector_matches(&selector, &good));
        for (k, v) in [("tier", "back"), ("canary", "true"), ("legacy", "1")] {
            let mut bad = good.clone();
            bad.insert(k.into(), v.into());
            assert!(!selector_matches(&selector, &bad), "{k}={v}");
        }
        let mut no_team = good.clone();
        no_team.remove("team");
        assert!(!selector_matches(&selector, &no_team));
        assert!(selector_matches(
            &LabelSelector::default(),
            &BTreeMap::new()
        ));
        let odd = LabelSelector {
            match_expressions: Some(vec![req("a", "Gt", &["1"])]),
            ..Default::default()
        };
        assert!(!selector_matches(&odd, &good));
    }

    #[test]
    fn recorded_pods_are_owned_by_their_replicaset() {
        let pods = pods();
        let web = pods
            .iter()
            .find(|p| p.metadata.name.as_deref().unwrap().starts_with("web-"))
            .unwrap();
        let owner = &web.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(owner.kind, "ReplicaSet");
        assert!(owned_by(&web.metadata, &owner.uid));
        assert!(!owned_by(&web.metadata, "another-uid"));
    }

    #[test]
    fn the_oldest_ready_pod_is_chosen() {
        let mut pods = web_pods();
        let chosen = choose_pod("deployment/web", &pods).unwrap();
        let first = chosen.metadata.name.clone().unwrap();
        // Not ready any more: the other one is chosen.
        for pod in &mut pods {
            if pod.metadata.name.as_deref() == Some(first.as_str()) {
                let status = pod.status.as_mut().unwrap();
                for c in status.conditions.iter_mut().flatten() {
                    if c.type_ == "Ready" {
                        c.status = "False".into();
                    }
                }
            }
        }
        let second = choose_pod("deployment/web", &pods).unwrap();
        assert_ne!(second.metadata.name.as_deref(), Some(first.as_str()));
    }

    #[test]
    fn no_ready_pod_lists_the_phases() {
        let mut pods = web_pods();
        pods[0].status.as_mut().unwrap().phase = Some("Pending".into());
        pods[1].metadata.deletion_timestamp = pods[1].metadata.creation_timestamp.clone();
        let err = choose_pod("deployment/web", &pods).unwrap_err();
        let line = err.to_string();
        assert!(
            line.starts_with("deployment/web has no running and ready pod ("),
            "{line}"
        );
        assert!(line.contains(" Pending"), "{line}");
        assert!(line.contains(" Running terminating"), "{line}");
        assert_eq!(
            choose_pod("job/x", &[]).unwrap_err().to_string(),
            "job/x has no running and ready pod (no pods at all)"
        );
    }

    #[test]
    fn recorded_single_container_is_chosen_with_its_id() {
        let pods = web_pods();
        let web = choose_pod("deployment/web", &pods).unwrap();
        let chosen = choose_container(web, None).unwrap();
        assert_eq!(chosen.name, "web");
        assert!(chosen.id.starts_with("mrdc://"), "{}", chosen.id);
        assert_eq!(choose_container(web, Some("web")).unwrap(), chosen);
        let err = choose_container(web, Some("app")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "pod {} has no container app (it has web)",
                web.metadata.name.as_deref().unwrap()
            )
        );
    }

    fn with_containers(names: &[&str]) -> Pod {
        let mut pod = pods().remove(0);
        let template = pod.spec.as_ref().unwrap().containers[0].clone();
        let status = pod
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0]
            .clone();
        pod.spec.as_mut().unwrap().containers = names
            .iter()
            .map(|n| k8s_openapi::api::core::v1::Container {
                name: n.to_string(),
                ..template.clone()
            })
            .collect();
        pod.status.as_mut().unwrap().container_statuses = Some(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| k8s_openapi::api::core::v1::ContainerStatus {
                    name: n.to_string(),
                    container_id: Some(format!("containerd://{i:064x}")),
                    ..status.clone()
                })
                .collect(),
        );
        pod
    }

    #[test]
    fn mesh_sidecars_are_passed_over() {
        let pod = with_containers(&["istio-init", "app", "istio-proxy"]);
        let chosen = choose_container(&pod, None).unwrap();
        assert_eq!(chosen.name, "app");
        assert_eq!(chosen.id, format!("containerd://{:064x}", 1));
        let linkerd = with_containers(&["linkerd-proxy", "api"]);
        assert_eq!(choose_container(&linkerd, None).unwrap().name, "api");
    }

    #[test]
    fn several_containers_need_a_choice_or_the_annotation() {
        let mut pod = with_containers(&["app", "worker"]);
        let err = choose_container(&pod, None).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("has several containers (app, worker); choose one with /container/NAME"),
            "{err}"
        );
        assert_eq!(
            choose_container(&pod, Some("worker")).unwrap().name,
            "worker"
        );
        pod.metadata.annotations = Some(labels(&[(DEFAULT_CONTAINER_ANNOTATION, "worker")]));
        assert_eq!(choose_container(&pod, None).unwrap().name, "worker");
        // An annotation naming no container is ignored rather than trusted.
        pod.metadata.annotations = Some(labels(&[(DEFAULT_CONTAINER_ANNOTATION, "gone")]));
        assert!(choose_container(&pod, None).is_err());
    }

    #[test]
    fn a_container_without_id_has_not_started() {
        let mut pod = with_containers(&["app"]);
        pod.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .container_id = None;
        assert!(matches!(
            choose_container(&pod, None),
            Err(ChooseError::NotStarted { .. })
        ));
    }

    #[test]
    fn close_names_are_suggested() {
        let names = ["web", "web-api", "worker", "postgres", "redis"];
        assert_eq!(close_names("wbe", names), vec!["web"]);
        assert_eq!(close_names("web-apj", names), vec!["web-api"]);
        assert_eq!(close_names("postgress", names), vec!["postgres"]);
        assert_eq!(close_names("api", names), vec!["web-api"]);
        assert!(close_names("nothing-like-it", names).is_empty());
        let err = ChooseError::NotFound {
            what: "deployment/wbe".into(),
            namespace: "shop".into(),
            close: close_names("wbe", names),
        };
        assert_eq!(
            err.to_string(),
            "deployment/wbe not found in namespace shop; did you mean web?"
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn newest_job_wins() {
        let job = |name: &str, secs: i64| {
            let mut job = Job::default();
            job.metadata.name = Some(name.into());
            job.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::from_second(secs).unwrap(),
                ));
            job
        };
        let jobs = [
            job("nightly-1", 100),
            job("nightly-3", 300),
            job("nightly-2", 200),
        ];
        assert_eq!(
            newest_job(&jobs).unwrap().metadata.name.as_deref(),
            Some("nightly-3")
        );
        assert!(newest_job(&[]).is_none());
    }
}
