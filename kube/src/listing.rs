//! What `mirrord ls` shows: the target paths a namespace offers, in upstream mirrord's form
//! (`pod/NAME[/container/NAME]`, `deployment/NAME`, …). Only what could be targeted now is
//! listed: running pods, and workloads and Services that select pods; never a pod owned by a
//! Job of a CronJob twice under different names is a concern of the caller, not hidden here.

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;

use crate::choose::MESH_CONTAINERS;
use crate::target::{Kind, TargetPath};

/// The objects of one namespace (or of all), as listed.
#[derive(Debug, Clone, Default)]
pub struct Objects {
    pub pods: Vec<Pod>,
    pub deployments: Vec<Deployment>,
    pub statefulsets: Vec<StatefulSet>,
    pub replicasets: Vec<ReplicaSet>,
    pub jobs: Vec<Job>,
    pub cronjobs: Vec<CronJob>,
    pub services: Vec<Service>,
}

/// A listed target and the namespace it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedTarget {
    pub namespace: String,
    pub path: TargetPath,
}

fn object(kind: Kind, namespace: String, name: String, container: Option<String>) -> ListedTarget {
    ListedTarget {
        namespace,
        path: TargetPath::Object {
            kind,
            name,
            container,
        },
    }
}

/// Every target path, sorted by namespace and then as printed. A running pod with several
/// application containers is listed once per container; mesh sidecars are never listed.
/// ReplicaSets owned by a Deployment are left out (the Deployment is the target a user means).
pub fn list_targets(objects: &Objects) -> Vec<ListedTarget> {
    let mut out = Vec::new();
    for pod in &objects.pods {
        let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
        if !running || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let apps: Vec<&str> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| c.name.as_str())
            .filter(|name| !MESH_CONTAINERS.contains(name))
            .collect();
        let ns = pod.namespace().unwrap_or_default();
        match apps.as_slice() {
            [_] => out.push(object(Kind::Pod, ns, pod.name_any(), None)),
            _ => out.extend(
                apps.iter()
                    .map(|c| object(Kind::Pod, ns.clone(), pod.name_any(), Some((*c).to_owned()))),
            ),
        }
    }
    let named = |kind, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        object(
            kind,
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
            None,
        )
    };
    out.extend(
        objects
            .deployments
            .iter()
            .map(|o| named(Kind::Deployment, &o.metadata)),
    );
    out.extend(
        objects
            .statefulsets
            .iter()
            .map(|o| named(Kind::StatefulSet, &o.metadata)),
    );
    out.extend(
        objects
            .replicasets
            .iter()
            .filter(|rs| {
                !rs.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.kind == "Deployment")
            })
            .map(|o| named(Kind::ReplicaSet, &o.metadata)),
    );
    out.extend(objects.jobs.iter().map(|o| named(Kind::Job, &o.metadata)));
    out.extend(
        objects
            .cronjobs
            .iter()
            .map(|o| named(Kind::CronJob, &o.metadata)),
    );
    out.extend(
        objects
            .services
            .iter()
            .filter(|s| {
                s.spec
                    .as_ref()
                    .and_then(|spec| spec.selector.as_ref())
                    .is_some_and(|sel| !sel.is_empty())
            })
            .map(|o| named(Kind::Service, &o.metadata)),
    );
    out.sort_by_key(|t| (t.namespace.clone(), t.path.to_string()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> serde_json::Value {
        crate::test_fixture::fixture(name)
    }

    #[test]
    fn recorded_namespace_lists_pods_workloads_and_services() {
        let pods = serde_json::from_value(fixture("web-pods.json")["items"].clone()).unwrap();
        let objects = Objects {
            pods,
            deployments: vec![serde_json::from_value(fixture("web-deployment.json")).unwrap()],
            services: vec![serde_json::from_value(fixture("web-service.json")).unwrap()],
            ..Default::default()
        };
        let listed: Vec<String> = list_targets(&objects)
            .iter()
            .map(|t| format!("{} {}", t.namespace, t.path))
            .collect();
        let pods: Vec<&String> = listed.iter().filter(|l| l.contains(" pod/")).collect();
        assert_eq!(pods.len(), 3, "{listed:?}");
        assert!(
            listed.contains(&"mrdc-smoke deployment/web".to_owned()),
            "{listed:?}"
        );
        assert!(
            listed.contains(&"mrdc-smoke service/web".to_owned()),
            "{listed:?}"
        );
        assert!(
            listed.contains(&"mrdc-smoke pod/client".to_owned()),
            "{listed:?}"
        );
    }

    #[test]
    fn pods_with_several_apps_are_listed_per_container() {
        let mut pod: Pod =
            serde_json::from_value(fixture("web-pods.json")["items"][0].clone()).unwrap();
        let spec = pod.spec.as_mut().unwrap();
        let template = spec.containers[0].clone();
        spec.containers = ["app", "worker", "istio-proxy"]
            .iter()
            .map(|n| k8s_openapi::api::core::v1::Container {
                name: n.to_string(),
                ..template.clone()
            })
            .collect();
        let name = pod.name_any();
        let listed: Vec<String> = list_targets(&Objects {
            pods: vec![pod],
            ..Default::default()
        })
        .iter()
        .map(|t| t.path.to_string())
        .collect();
        assert_eq!(
            listed,
            vec![
                format!("pod/{name}/container/app"),
                format!("pod/{name}/container/worker")
            ]
        );
    }
}
