//! The thin shell that talks to the Kubernetes API: connecting (kubeconfig, contexts,
//! in-cluster), resolving targets, creating, reaching and deleting the agent, listing targets
//! and discovering the cluster's ranges. The decisions are made by the pure modules; this
//! module fetches their inputs and carries out their answers. It must never log the session
//! token, and never leave an agent behind when its start fails.

use std::collections::HashSet;
use std::fmt::Debug;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod, Service, ServiceSpec};
use k8s_openapi::api::networking::v1::ServiceCIDR;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Error;
use crate::access::{Permission, build_review, review_answer};
use crate::agent_job::{
    AgentJobSpec, Placement, SESSION_LABEL, build_agent_ephemeral, build_agent_job,
    user_agents_selector,
};
use crate::choose::{
    ChooseError, ChosenContainer, choose_container, choose_pod, close_names, match_labels_query,
    newest_job, owned_by, selector_matches, service_selector,
};
use crate::cidr::{
    ClusterCidrs, OUT_OF_RANGE_CLUSTER_IP, node_pod_cidrs, parse_refusal, pod_ip_cover,
    service_cidrs,
};
use crate::forbidden::{Forbidden, Request};
use crate::listing::{ListedTarget, Objects, list_targets};
use crate::startup::{
    Startup, ephemeral_refusal, judge_container, judge_job, judge_pod, pod_security_policy,
};
use crate::target::{Kind, TargetPath};

/// A cluster that cannot be reached must fail well before a user gives up on it.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(8);
/// How long an agent may take to start, unless the caller says otherwise.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// An agent Job with no running pod counts as stale only once it is this old: younger, it may
/// be another session of the same user still starting (pulling its image, say).
const STALE_AFTER: Duration = Duration::from_secs(180);
/// Pause between two looks at a starting or disappearing agent: every look is one or two
/// small API requests, and each pause is time the user waits at the start and the end of every
/// session (half of it on average), so it is short.
const POLL: Duration = Duration::from_millis(100);
/// How long deleting an agent usually waits for its Job and pod to be gone.
pub const AGENT_GONE_WITHIN: Duration = Duration::from_secs(60);
/// What the agent prints once it accepts sessions.
const LISTENING_LINE: &str = "listening on ";

/// A connection to one cluster, with the namespace its context defaults to.
#[derive(Clone)]
pub struct Cluster {
    client: Client,
    namespace: String,
    server: String,
    /// The API server's `gitVersion`, as it answered when connected.
    version: String,
}

/// The pod and container a target path resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPod {
    pub pod: String,
    pub node: String,
    pub pod_ip: Option<IpAddr>,
    pub container: ChosenContainer,
}

/// A resolved target: the namespace, and the pod unless the session is targetless.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub namespace: String,
    pub pod: Option<ResolvedPod>,
}

impl Resolved {
    /// Where the agent must run to serve this target as a Job.
    pub fn placement(&self) -> Placement {
        match &self.pod {
            Some(pod) => Placement::Container {
                node: pod.node.clone(),
                container_id: pod.container.id.clone(),
            },
            None => Placement::Targetless,
        }
    }

    /// Where the agent runs as an ephemeral container of the target's pod, with
    /// `capabilities`; a targetless session has no pod to join and keeps its Job.
    pub fn placement_in_pod(&self, capabilities: Vec<String>) -> Placement {
        match &self.pod {
            Some(pod) => Placement::InPod {
                pod: pod.pod.clone(),
                container: pod.container.name.clone(),
                container_id: pod.container.id.clone(),
                capabilities,
            },
            None => Placement::Targetless,
        }
    }
}

/// A started agent: its name (its Job's, or its ephemeral container's), its pod and the port it
/// listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub namespace: String,
    pub job: String,
    pub pod: String,
    pub port: u16,
}

/// An object's UID as the set of owners [`Cluster::selected_pods`] takes.
fn uid(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> HashSet<String> {
    HashSet::from([meta.uid.clone().unwrap_or_default()])
}

/// The error chain of `error` on one line.
fn chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// Turns an API error into the crate's: a 403 names what was refused, anything else says
/// what was being done.
fn api_error(request: Request<'_>) -> impl FnOnce(kube::Error) -> Error + '_ {
    move |error| match &error {
        kube::Error::Api(status) if status.code == 403 => {
            Error::Forbidden(Forbidden::new(request, &status.message))
        }
        kube::Error::Api(status) => Error::Api {
            action: describe(request),
            reason: status.message.clone(),
        },
        other => Error::Api {
            action: describe(request),
            reason: chain(other),
        },
    }
}

/// Whether a failed request may pass later unchanged: it could not be sent or its answer was cut
/// off (connection refused or reset: the API server is down or restarting), or the server said
/// it cannot serve now (429, 5xx). A refusal (403, 404, 409, 422) will not change.
fn transient(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

fn describe(request: Request<'_>) -> String {
    let resource = if request.group.is_empty() {
        request.resource.to_owned()
    } else {
        format!("{}.{}", request.resource, request.group)
    };
    match request.namespace {
        Some(ns) => format!("{} {resource} in namespace {ns}", request.verb),
        None => format!("{} {resource}", request.verb),
    }
}

/// The request an API call on `K` makes.
fn request_for<'a, K: Resource<DynamicType = ()>>(
    verb: &'a str,
    resource: &'a str,
    namespace: Option<&'a str>,
) -> Request<'a> {
    Request {
        verb,
        resource,
        group: group_of::<K>(),
        namespace,
    }
}

fn group_of<K: Resource<DynamicType = ()>>() -> &'static str {
    // The group is a constant of each k8s-openapi type; the few used here are listed so the
    // request description stays 'static without leaking.
    match K::group(&()).as_ref() {
        "apps" => "apps",
        "batch" => "batch",
        "networking.k8s.io" => "networking.k8s.io",
        _ => "",
    }
}

impl Cluster {
    /// Connects as kubectl would: `kubeconfig` if given, else `KUBECONFIG` (several paths
    /// merged) or `~/.kube/config`, else the in-cluster service account; `context` overrides the
    /// current context. Fails within [`CONNECT_TIMEOUT`] when the server does not answer.
    pub async fn connect(
        kubeconfig: Option<&Path>,
        context: Option<&str>,
    ) -> Result<Cluster, Error> {
        let options = KubeConfigOptions {
            context: context.map(str::to_owned),
            ..Default::default()
        };
        let config = match kubeconfig {
            Some(path) => {
                let file = Kubeconfig::read_from(path)
                    .map_err(|e| Error::Kubeconfig(format!("{}: {}", path.display(), chain(&e))))?;
                Config::from_custom_kubeconfig(file, &options)
                    .await
                    .map_err(|e| Error::Kubeconfig(chain(&e)))?
            }
            None => match Config::from_kubeconfig(&options).await {
                Ok(config) => config,
                // In a pod there is no kubeconfig; a named context cannot be in-cluster.
                Err(file_error) if context.is_none() => Config::incluster().map_err(|e| {
                    Error::Kubeconfig(format!(
                        "{}; not in a cluster either: {}",
                        chain(&file_error),
                        chain(&e)
                    ))
                })?,
                Err(file_error) => return Err(Error::Kubeconfig(chain(&file_error))),
            },
        };
        let server = config.cluster_url.to_string();
        let namespace = config.default_namespace.clone();
        let client = Client::try_from(config).map_err(|e| Error::Unreachable {
            server: server.clone(),
            reason: chain(&e),
        })?;
        let version = match tokio::time::timeout(CONNECT_TIMEOUT, client.apiserver_version()).await
        {
            Ok(Ok(info)) => info.git_version,
            Ok(Err(e)) => {
                return Err(Error::Unreachable {
                    server,
                    reason: chain(&e),
                });
            }
            Err(_) => {
                return Err(Error::Unreachable {
                    server,
                    reason: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                });
            }
        };
        Ok(Cluster {
            client,
            namespace,
            server,
            version,
        })
    }

    /// The API server's version (`v1.37.2`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Asks the API server whether the caller holds `permission` (a SelfSubjectAccessReview,
    /// which every authenticated user may create). `Err(Some(reason))` when it said no with
    /// a reason.
    pub async fn can_i(
        &self,
        permission: &Permission,
    ) -> Result<Result<(), Option<String>>, Error> {
        let reviews: Api<SelfSubjectAccessReview> = Api::all(self.client.clone());
        let answer = reviews
            .create(&PostParams::default(), &build_review(permission))
            .await
            .map_err(api_error(Request {
                verb: "create",
                resource: "selfsubjectaccessreviews",
                group: "authorization.k8s.io",
                namespace: None,
            }))?;
        Ok(review_answer(&answer))
    }

    /// The labels of `namespace`; `Ok(None)` when it does not exist.
    pub async fn namespace_labels(
        &self,
        namespace: &str,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>, Error> {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let found = namespaces
            .get_opt(namespace)
            .await
            .map_err(api_error(Request {
                verb: "get",
                resource: "namespaces",
                group: "",
                namespace: None,
            }))?;
        Ok(found.map(|ns| ns.metadata.labels.unwrap_or_default()))
    }

    /// The namespace of the kubeconfig context (or the service account's).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The API server's URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Fetches `kind/name`; when it does not exist, lists that kind to suggest close names.
    async fn get_named<K>(&self, namespace: &str, kind: Kind, name: &str) -> Result<K, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api: Api<K> = self.api(namespace);
        let plural = K::plural(&()).to_string();
        let found = api.get_opt(name).await.map_err(api_error(request_for::<K>(
            "get",
            &plural,
            Some(namespace),
        )))?;
        if let Some(object) = found {
            return Ok(object);
        }
        // Suggestions are a courtesy: a refused list still reports the object as not found.
        let names: Vec<String> = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list.items.iter().map(|o| o.name_any()).collect(),
            Err(_) => Vec::new(),
        };
        Err(ChooseError::NotFound {
            what: format!("{kind}/{name}"),
            namespace: namespace.to_owned(),
            close: close_names(name, names.iter().map(String::as_str)),
        }
        .into())
    }

    /// Pods of `namespace` that `selector` selects and, when `owners` is given, one of those
    /// owns.
    async fn selected_pods(
        &self,
        namespace: &str,
        selector: &LabelSelector,
        owners: Option<&HashSet<String>>,
    ) -> Result<Vec<Pod>, Error> {
        let pods: Api<Pod> = self.api(namespace);
        let params = ListParams::default().labels(&match_labels_query(selector));
        let list = pods
            .list(&params)
            .await
            .map_err(api_error(request_for::<Pod>(
                "list",
                "pods",
                Some(namespace),
            )))?;
        Ok(list
            .items
            .into_iter()
            .filter(|p| {
                selector_matches(
                    selector,
                    p.metadata.labels.as_ref().unwrap_or(&Default::default()),
                )
            })
            .filter(|p| owners.is_none_or(|uids| uids.iter().any(|uid| owned_by(&p.metadata, uid))))
            .collect())
    }

    /// The pods of `job`: its selector's, owned by it.
    async fn job_pods(&self, ns: &str, job: &Job) -> Result<Vec<Pod>, Error> {
        let selector = job
            .spec
            .as_ref()
            .and_then(|spec| spec.selector.clone())
            .unwrap_or_default();
        self.selected_pods(ns, &selector, Some(&uid(&job.metadata)))
            .await
    }

    /// Resolves a target path in `namespace` (default: the context's) to a pod and container.
    pub async fn resolve(
        &self,
        target: &TargetPath,
        namespace: Option<&str>,
    ) -> Result<Resolved, Error> {
        let namespace = namespace.unwrap_or(&self.namespace).to_owned();
        let TargetPath::Object {
            kind,
            name,
            container,
        } = target
        else {
            return Ok(Resolved {
                namespace,
                pod: None,
            });
        };
        let ns = namespace.as_str();
        let what = target.to_string();
        let candidates: Vec<Pod> = match kind {
            Kind::Pod => vec![self.get_named::<Pod>(ns, *kind, name).await?],
            Kind::Deployment => {
                let deployment: Deployment = self.get_named(ns, *kind, name).await?;
                let selector = deployment.spec.selector.clone();
                // Pods belong to the Deployment through its ReplicaSets.
                let replicasets: Api<ReplicaSet> = self.api(ns);
                let owner = deployment.metadata.uid.clone().unwrap_or_default();
                let owners: HashSet<String> = replicasets
                    .list(&ListParams::default().labels(&match_labels_query(&selector)))
                    .await
                    .map_err(api_error(request_for::<ReplicaSet>(
                        "list",
                        "replicasets",
                        Some(ns),
                    )))?
                    .items
                    .iter()
                    .filter(|rs| owned_by(&rs.metadata, &owner))
                    .filter_map(|rs| rs.metadata.uid.clone())
                    .collect();
                self.selected_pods(ns, &selector, Some(&owners)).await?
            }
            Kind::StatefulSet => {
                let set: StatefulSet = self.get_named(ns, *kind, name).await?;
                let selector = set.spec.selector.clone();
                self.selected_pods(ns, &selector, Some(&uid(&set.metadata)))
                    .await?
            }
            Kind::ReplicaSet => {
                let set: ReplicaSet = self.get_named(ns, *kind, name).await?;
                let selector = set.spec.selector.clone();
                self.selected_pods(ns, &selector, Some(&uid(&set.metadata)))
                    .await?
            }
            Kind::Job => {
                let job: Job = self.get_named(ns, *kind, name).await?;
                self.job_pods(ns, &job).await?
            }
            Kind::CronJob => {
                let cronjob: CronJob = self.get_named(ns, *kind, name).await?;
                let owner = cronjob.metadata.uid.clone().unwrap_or_default();
                let jobs: Api<Job> = self.api(ns);
                let jobs = jobs
                    .list(&ListParams::default())
                    .await
                    .map_err(api_error(request_for::<Job>("list", "jobs", Some(ns))))?
                    .items;
                let owned: Vec<&Job> = jobs
                    .iter()
                    .filter(|j| owned_by(&j.metadata, &owner))
                    .collect();
                let job =
                    newest_job(owned).ok_or_else(|| ChooseError::NoJob { what: what.clone() })?;
                self.job_pods(ns, job).await?
            }
            Kind::Service => {
                let service: Service = self.get_named(ns, *kind, name).await?;
                let spec = service.spec.unwrap_or_default();
                let selector = service_selector(spec.selector.as_ref())
                    .ok_or_else(|| ChooseError::NoSelector { what: what.clone() })?;
                self.selected_pods(ns, &selector, None).await?
            }
        };
        let pod = choose_pod(&what, &candidates)?;
        let pod_name = pod.name_any();
        let container = choose_container(pod, container.as_deref())?;
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .ok_or_else(|| ChooseError::MissingStatus {
                pod: pod_name.clone(),
                field: "node name",
            })?;
        let pod_ip = pod
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        Ok(Resolved {
            namespace,
            pod: Some(ResolvedPod {
                pod: pod_name,
                node,
                pod_ip,
                container,
            }),
        })
    }

    /// Creates the agent's Job and waits until its pod runs and the agent listens; fails as
    /// soon as the start is certain to fail, or after `startup_timeout`, and then deletes the
    /// Job so nothing is left behind.
    pub async fn create_agent(
        &self,
        spec: &AgentJobSpec,
        startup_timeout: Duration,
    ) -> Result<AgentPod, Error> {
        if let Placement::InPod { pod, .. } = &spec.placement {
            return self
                .create_ephemeral_agent(spec, pod, startup_timeout)
                .await;
        }
        let ns = spec.namespace.as_str();
        let job = build_agent_job(spec);
        let job_name = job.name_any();
        let jobs: Api<Job> = self.api(ns);
        jobs.create(&PostParams::default(), &job)
            .await
            .map_err(api_error(request_for::<Job>("create", "jobs", Some(ns))))?;
        tracing::debug!(job = %job_name, namespace = ns, "agent job created");
        let waited =
            tokio::time::timeout(startup_timeout, self.wait_for_agent(spec, &job_name)).await;
        let failure = match waited {
            Ok(Ok(pod)) => {
                return Ok(AgentPod {
                    namespace: ns.to_owned(),
                    job: job_name,
                    pod,
                    port: spec.port,
                });
            }
            Ok(Err(error)) => error,
            Err(_) => Error::AgentTimeout {
                job: job_name.clone(),
                secs: startup_timeout.as_secs(),
            },
        };
        if let Err(cleanup) = self.delete_agent(ns, &job_name, AGENT_GONE_WITHIN).await {
            tracing::warn!("could not delete the failed agent {job_name}: {cleanup}");
        }
        Err(failure)
    }

    /// Adds the agent to `pod` as an ephemeral container and waits until it listens; fails as
    /// soon as the start is certain to fail, or after `startup_timeout`. Nothing can be removed
    /// on failure: the pod keeps the container, which exits on its own (it never got a session,
    /// so at its idle TTL).
    async fn create_ephemeral_agent(
        &self,
        spec: &AgentJobSpec,
        pod: &str,
        startup_timeout: Duration,
    ) -> Result<AgentPod, Error> {
        let ns = spec.namespace.as_str();
        let container = build_agent_ephemeral(spec);
        let name = container.name.clone();
        let pods: Api<Pod> = self.api(ns);
        let patch = serde_json::json!({"spec": {"ephemeralContainers": [container]}});
        pods.patch_subresource(
            "ephemeralcontainers",
            pod,
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
        .map_err(|error| match &error {
            kube::Error::Api(status) if pod_security_policy(&status.message).is_some() => {
                Error::AgentFailed {
                    job: name.clone(),
                    reason: ephemeral_refusal(&status.message),
                }
            }
            kube::Error::Api(status) if status.code == 404 || status.code == 422 => Error::Api {
                action: format!("add the agent to pod {pod} in namespace {ns}"),
                reason: format!(
                    "{} (the cluster may not support ephemeral containers: they need Kubernetes 1.25 or later)",
                    status.message
                ),
            },
            _ => api_error(Request {
                verb: "patch",
                resource: "pods/ephemeralcontainers",
                group: "",
                namespace: Some(ns),
            })(error),
        })?;
        tracing::debug!(pod, container = %name, namespace = ns, "ephemeral agent added");
        let waited = tokio::time::timeout(
            startup_timeout,
            self.wait_for_ephemeral_agent(&pods, pod, &name),
        )
        .await;
        match waited {
            Ok(Ok(())) => Ok(AgentPod {
                namespace: ns.to_owned(),
                job: name,
                pod: pod.to_owned(),
                port: spec.port,
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::AgentTimeout {
                job: name,
                secs: startup_timeout.as_secs(),
            }),
        }
    }

    /// Polls the pod until its ephemeral container `name` runs and prints that it listens.
    async fn wait_for_ephemeral_agent(
        &self,
        pods: &Api<Pod>,
        pod: &str,
        name: &str,
    ) -> Result<(), Error> {
        let ns = pods.namespace().unwrap_or_default().to_owned();
        let mut last = String::new();
        loop {
            let found = pods.get(pod).await.map_err(api_error(request_for::<Pod>(
                "get",
                "pods",
                Some(&ns),
            )))?;
            let status = found
                .status
                .as_ref()
                .and_then(|s| s.ephemeral_container_statuses.as_ref())
                .and_then(|all| all.iter().find(|c| c.name == name));
            let image = found
                .spec
                .as_ref()
                .and_then(|s| s.ephemeral_containers.as_ref())
                .and_then(|all| all.iter().find(|c| c.name == name))
                .and_then(|c| c.image.clone())
                .unwrap_or_default();
            let state = match status.map(|status| judge_container(status, &image)) {
                None => Startup::Waiting("ephemeral container not created yet".to_owned()),
                Some(Startup::Running) if self.agent_listens(pods, pod, Some(name)).await => {
                    return Ok(());
                }
                Some(Startup::Running) => Startup::Waiting("agent not listening yet".to_owned()),
                Some(Startup::Failed(reason)) => {
                    Startup::Failed(self.with_last_words(pods, pod, Some(name), reason).await)
                }
                Some(waiting) => waiting,
            };
            match state {
                Startup::Failed(reason) => {
                    return Err(Error::AgentFailed {
                        job: name.to_owned(),
                        reason,
                    });
                }
                Startup::Waiting(what) if what != last => {
                    tracing::debug!(container = name, "agent: {what}");
                    last = what;
                }
                Startup::Waiting(_) | Startup::Running => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls the Job's pod until the agent prints that it listens; returns the pod's name.
    async fn wait_for_agent(&self, spec: &AgentJobSpec, job_name: &str) -> Result<String, Error> {
        let ns = spec.namespace.as_str();
        let pods: Api<Pod> = self.api(ns);
        let jobs: Api<Job> = self.api(ns);
        let events: Api<Event> = self.api(ns);
        let by_session = ListParams::default().labels(&format!("{SESSION_LABEL}={}", spec.session));
        let failed = |reason: String| Error::AgentFailed {
            job: job_name.to_owned(),
            reason,
        };
        let mut last = String::new();
        loop {
            let listed = pods
                .list(&by_session)
                .await
                .map_err(api_error(request_for::<Pod>("list", "pods", Some(ns))))?;
            let state = match listed.items.first() {
                Some(pod) => match judge_pod(pod) {
                    Startup::Running if self.agent_listens(&pods, &pod.name_any(), None).await => {
                        return Ok(pod.name_any());
                    }
                    Startup::Running => Startup::Waiting("agent not listening yet".to_owned()),
                    Startup::Failed(reason) => Startup::Failed(
                        self.with_last_words(&pods, &pod.name_any(), None, reason)
                            .await,
                    ),
                    waiting => waiting,
                },
                None => {
                    let job = jobs
                        .get_opt(job_name)
                        .await
                        .map_err(api_error(request_for::<Job>("get", "jobs", Some(ns))))?;
                    let params =
                        ListParams::default().fields(&format!("involvedObject.name={job_name}"));
                    // Events only sharpen the message; without the right to read them the
                    // start still ends at the timeout.
                    let events = events
                        .list(&params)
                        .await
                        .map(|l| l.items)
                        .unwrap_or_default();
                    judge_job(job.as_ref(), &events)
                }
            };
            match state {
                Startup::Failed(reason) => return Err(failed(reason)),
                Startup::Waiting(what) if what != last => {
                    tracing::debug!(job = job_name, "agent: {what}");
                    last = what;
                }
                // A running agent returned above; a Job without a pod is never judged running.
                Startup::Waiting(_) | Startup::Running => {}
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `reason` followed by the agent's last log line, where it says why it exited; `container`
    /// names the agent's container where the pod has others.
    async fn with_last_words(
        &self,
        pods: &Api<Pod>,
        pod: &str,
        container: Option<&str>,
        reason: String,
    ) -> String {
        let params = LogParams {
            tail_lines: Some(1),
            container: container.map(str::to_owned),
            ..Default::default()
        };
        match pods.logs(pod, &params).await {
            Ok(log) if !log.trim().is_empty() => format!("{reason}; it said: {}", log.trim()),
            _ => reason,
        }
    }

    /// Whether the agent's log says it accepts sessions. Without the right to read logs, a
    /// running container is taken as ready.
    async fn agent_listens(&self, pods: &Api<Pod>, pod: &str, container: Option<&str>) -> bool {
        let params = LogParams {
            container: container.map(str::to_owned),
            ..Default::default()
        };
        match pods.logs(pod, &params).await {
            Ok(log) => log.contains(LISTENING_LINE),
            Err(kube::Error::Api(status)) if status.code == 403 => true,
            Err(_) => false,
        }
    }

    /// A byte stream to `port` of `pod`, through the API server's port-forward.
    pub async fn port_forward(
        &self,
        namespace: &str,
        pod: &str,
        port: u16,
    ) -> Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static, Error> {
        let pods: Api<Pod> = self.api(namespace);
        let mut forwarder = pods
            .portforward(pod, &[port])
            .await
            .map_err(api_error(Request {
                verb: "create",
                resource: "pods/portforward",
                group: "",
                namespace: Some(namespace),
            }))?;
        let stream = forwarder
            .take_stream(port)
            .ok_or_else(|| Error::PortForward {
                pod: pod.to_owned(),
                port,
                reason: "the forwarder has no stream for the port".to_owned(),
            })?;
        // The forwarder's task keeps running on its own; its error channel only reports
        // that the far side (e.g. the kubelet) gave up on the port, which ends the stream.
        if let Some(errors) = forwarder.take_error(port) {
            let pod = pod.to_owned();
            tokio::spawn(async move {
                if let Some(message) = errors.await {
                    tracing::warn!("port-forward to {pod}:{port}: {message}");
                }
            });
        }
        Ok(stream)
    }

    /// [`api_error`], except that a failure which may pass later ([`transient`]) is
    /// [`Error::Unreachable`], for the caller to try again.
    fn call_error<'a>(&'a self, request: Request<'a>) -> impl FnOnce(kube::Error) -> Error + 'a {
        move |error| {
            if transient(&error) {
                Error::Unreachable {
                    server: self.server.clone(),
                    reason: chain(&error),
                }
            } else {
                api_error(request)(error)
            }
        }
    }

    /// Deletes an agent's Job and its pod, and waits until both are gone, up to `gone_within`
    /// (usually seconds; after an API server restart the garbage collector may take a minute to
    /// catch up). An API server that cannot be reached or cannot serve now is
    /// [`Error::Unreachable`]: the deletion is idempotent, so the caller may simply call again.
    pub async fn delete_agent(
        &self,
        namespace: &str,
        job: &str,
        gone_within: Duration,
    ) -> Result<(), Error> {
        let jobs: Api<Job> = self.api(namespace);
        let pods: Api<Pod> = self.api(namespace);
        match jobs.delete(job, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => {
                return Err(self.call_error(request_for::<Job>(
                    "delete",
                    "jobs",
                    Some(namespace),
                ))(e));
            }
        }
        let by_job = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        let gone = async {
            loop {
                let job_left = jobs
                    .get_opt(job)
                    .await
                    .map_err(self.call_error(request_for::<Job>("get", "jobs", Some(namespace))))?
                    .is_some();
                let pods_left = !pods
                    .list(&by_job)
                    .await
                    .map_err(self.call_error(request_for::<Pod>("list", "pods", Some(namespace))))?
                    .items
                    .is_empty();
                if !job_left && !pods_left {
                    return Ok::<(), Error>(());
                }
                tokio::time::sleep(POLL).await;
            }
        };
        tokio::time::timeout(gone_within, gone)
            .await
            .map_err(|_| Error::Api {
                action: format!("delete the agent {job} in namespace {namespace}"),
                reason: format!(
                    "its Job or pod is still there after {} s",
                    gone_within.as_secs()
                ),
            })?
    }

    /// Deletes, in every namespace, this user's agents that no longer serve anyone: Jobs older
    /// than three minutes none of whose pods is running. Returns them as `NAMESPACE/JOB`.
    pub async fn remove_stale_agents(&self, user: &str) -> Result<Vec<String>, Error> {
        let selector = ListParams::default().labels(&user_agents_selector(user));
        let jobs: Api<Job> = Api::all(self.client.clone());
        let pods: Api<Pod> = Api::all(self.client.clone());
        let jobs = jobs
            .list(&selector)
            .await
            .map_err(api_error(request_for::<Job>("list", "jobs", None)))?
            .items;
        let pods = pods
            .list(&selector)
            .await
            .map_err(api_error(request_for::<Pod>("list", "pods", None)))?
            .items;
        let mut removed = Vec::new();
        for job in jobs {
            let uid = job.metadata.uid.clone().unwrap_or_default();
            let running = pods.iter().any(|p| {
                owned_by(&p.metadata, &uid)
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            });
            // A Job this young may be another session of the same user still starting.
            let young = job
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|created| {
                    let age = k8s_openapi::jiff::Timestamp::now().duration_since(created.0);
                    age.as_secs() < STALE_AFTER.as_secs() as i64
                });
            if running || young || job.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ns = job.namespace().unwrap_or_default();
            let name = job.name_any();
            let jobs: Api<Job> = self.api(&ns);
            match jobs.delete(&name, &DeleteParams::background()).await {
                Ok(_) => removed.push(format!("{ns}/{name}")),
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => {
                    return Err(api_error(request_for::<Job>("delete", "jobs", Some(&ns)))(
                        e,
                    ));
                }
            }
        }
        Ok(removed)
    }

    /// The targets of `namespace`, or of every namespace with `None`, as `mirrord ls` shows them.
    pub async fn list_targets(&self, namespace: Option<&str>) -> Result<Vec<ListedTarget>, Error> {
        let objects = Objects {
            pods: self.list_all(namespace).await?,
            deployments: self.list_all(namespace).await?,
            statefulsets: self.list_all(namespace).await?,
            replicasets: self.list_all(namespace).await?,
            jobs: self.list_all(namespace).await?,
            cronjobs: self.list_all(namespace).await?,
            services: self.list_all(namespace).await?,
        };
        Ok(list_targets(&objects))
    }

    async fn list_all<K>(&self, namespace: Option<&str>) -> Result<Vec<K>, Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let api: Api<K> = match namespace {
            Some(ns) => self.api(ns),
            None => Api::all(self.client.clone()),
        };
        let plural = K::plural(&()).to_string();
        Ok(api
            .list(&ListParams::default())
            .await
            .map_err(api_error(request_for::<K>("list", &plural, namespace)))?
            .items)
    }

    /// The cluster's pod and Service ranges, each with where it was learnt. A source that is
    /// refused or missing falls through to the next; an empty list means none answered.
    pub async fn discover_cidrs(&self) -> Result<ClusterCidrs, Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let mut pods = match nodes.list(&ListParams::default()).await {
            Ok(list) => node_pod_cidrs(&list.items),
            Err(e) => {
                tracing::debug!("nodes not listed: {}", chain(&e));
                Vec::new()
            }
        };
        if pods.is_empty() {
            let all: Api<Pod> = Api::all(self.client.clone());
            let list = all
                .list(&ListParams::default())
                .await
                .map_err(api_error(request_for::<Pod>("list", "pods", None)))?;
            let ips: Vec<IpAddr> = list
                .items
                .iter()
                .filter(|p| {
                    !p.spec
                        .as_ref()
                        .and_then(|s| s.host_network)
                        .unwrap_or(false)
                })
                .filter_map(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok())
                .collect();
            pods = pod_ip_cover(&ips);
        }
        let ranges: Api<ServiceCIDR> = Api::all(self.client.clone());
        let mut services = match ranges.list(&ListParams::default()).await {
            Ok(list) => service_cidrs(&list.items),
            Err(e) => {
                tracing::debug!("ServiceCIDRs not listed: {}", chain(&e));
                Vec::new()
            }
        };
        if services.is_empty() {
            services = self.service_range_from_refusal().await?;
        }
        Ok(ClusterCidrs { pods, services })
    }

    /// Asks the apiserver to validate (dry run: nothing is created) a Service whose clusterIP
    /// lies outside every range; its refusal names the valid range.
    async fn service_range_from_refusal(&self) -> Result<Vec<crate::cidr::DiscoveredCidr>, Error> {
        let services: Api<Service> = self.api(&self.namespace);
        let probe = Service {
            metadata: kube::api::ObjectMeta {
                generate_name: Some("mirrord-cidr-probe-".to_owned()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(OUT_OF_RANGE_CLUSTER_IP.to_owned()),
                ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        };
        let params = PostParams {
            dry_run: true,
            ..Default::default()
        };
        match services.create(&params, &probe).await {
            Err(kube::Error::Api(status)) if status.code == 422 => {
                Ok(parse_refusal(&status.message))
            }
            Err(e) => Err(api_error(request_for::<Service>(
                "create",
                "services",
                Some(&self.namespace),
            ))(e)),
            Ok(_) => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_failure(code: u16, message: &str) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "code": code, "message": message, "reason": ""
        }))
        .expect("a Status");
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn a_server_away_or_overloaded_may_pass_later_and_a_refusal_never() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(transient(&kube::Error::Service(Box::new(refused))));
        for code in [429, 500, 503, 504] {
            assert!(transient(&api_failure(code, "try later")), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 422] {
            assert!(!transient(&api_failure(code, "no")), "{code}");
        }
    }

    #[test]
    fn refusals_become_forbidden_and_others_say_what_was_done() {
        let request = request_for::<Job>("create", "jobs", Some("shop"));
        assert_eq!(request.group, "batch");
        let refused = api_error(request)(api_failure(
            403,
            "jobs.batch is forbidden: User \"u\" cannot create resource \"jobs\" in API group \"batch\" in the namespace \"shop\"",
        ));
        assert_eq!(
            refused.to_string(),
            "forbidden: user u may not create jobs.batch in namespace shop; check with: kubectl auth can-i create jobs.batch -n shop"
        );
        let conflict = api_error(request)(api_failure(409, "jobs.batch \"x\" already exists"));
        assert_eq!(
            conflict.to_string(),
            "cannot create jobs.batch in namespace shop: jobs.batch \"x\" already exists"
        );
        let pods = request_for::<Pod>("list", "pods", None);
        assert_eq!(describe(pods), "list pods");
    }
}
