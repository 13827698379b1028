//! A session's agent in a Kubernetes cluster: resolves the target through the API, starts the
//! agent Job beside the target's container (or adds the agent to the target's pod as an
//! ephemeral container), reaches it by port-forward, and deletes the Job when the session ends,
//! whichever way it ends. It changes nothing else in the cluster, and never prints or logs the
//! session token.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;
use mirrord_kube::access;
use mirrord_kube::api::AGENT_GONE_WITHIN;
use mirrord_kube::cidr::ClusterCidrs;
use mirrord_kube::{AgentJobSpec, AgentPod, AgentToken, Cluster, Resolved, TargetPath};
use mirrord_link::endpoint::split_stream;

use crate::client::{AgentClient, ClientError, lock};

/// The port the agent listens on inside its own pod (not the target's network namespace, which
/// it joins only for the sockets it opens there).
pub const AGENT_PORT: u16 = 61337;
/// How long the agent may take to start, by default (`agent.startup_timeout`).
pub const DEFAULT_STARTUP_TIMEOUT: Duration = mirrord_kube::DEFAULT_STARTUP_TIMEOUT;
/// Seconds an agent stays without a session before exiting (`agent.communication_timeout`).
pub const DEFAULT_COMMUNICATION_TIMEOUT: u64 = 30;
/// Seconds the cluster keeps a finished agent Job (`agent.ttl`).
pub const DEFAULT_JOB_TTL: u64 = 10;

/// How to reach the cluster and how to run the agent there; flags over the config file.
#[derive(Debug, Clone, Default)]
pub struct KubeSettings {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
    /// The target's namespace; default: the context's.
    pub namespace: Option<String>,
    /// Where the agent runs; default: the target's namespace.
    pub agent_namespace: Option<String>,
    pub image: Option<String>,
    pub startup_timeout: Option<Duration>,
    pub communication_timeout: Option<u64>,
    pub job_ttl: Option<u64>,
    pub privileged: bool,
    /// Add the agent to the target's pod as an ephemeral container instead of starting a Job.
    pub ephemeral: bool,
    pub verbose: bool,
}

/// An agent this session created, to be removed when it ends.
#[derive(Clone)]
pub struct ClusterAgent {
    cluster: Cluster,
    namespace: String,
    job: String,
    /// The pod the agent was added to as an ephemeral container, which cannot be removed.
    in_pod: Option<String>,
    /// Seconds the agent stays without a session before exiting, and the finished Job's TTL:
    /// how long what a failed deletion leaves lasts.
    idle_ttl_secs: u64,
    job_ttl_secs: u64,
}

/// How long the end of a session waits for an API server that cannot be reached (restarting,
/// say) to delete the agent, before saying what it leaves: a control plane's restart takes
/// seconds to a minute, and its garbage collector, which removes the Job's pod, may take
/// another minute to catch up (tests/cluster: ~45 s after a 20 s outage). The user can end the
/// wait with Ctrl-C.
const CLEANUP_PATIENCE: Duration = Duration::from_secs(120);
/// Pause between two attempts to reach it.
const CLEANUP_RETRY: Duration = Duration::from_secs(1);

impl ClusterAgent {
    /// Deletes the Job and its pod, and waits until they are gone. An API server that cannot
    /// be reached is waited for, up to [`CLEANUP_PATIENCE`] and interruptible, said in one line;
    /// any other failure, or the end of that wait, is one line naming what is left and how long
    /// it stays. An ephemeral agent exits by itself when its session ends (or, if it never got
    /// one, at its idle timeout); that it stays in the pod is said once.
    pub async fn delete(self) {
        if let Some(pod) = &self.in_pod {
            crate::output::note(format!(
                "the agent {} exits with the session; the pod {pod} keeps a terminated ephemeral container until it is restarted",
                self.job
            ));
            return;
        }
        let deleted = self
            .cluster
            .delete_agent(&self.namespace, &self.job, AGENT_GONE_WITHIN)
            .await;
        let failed = match deleted {
            Ok(()) => return,
            Err(error) if error.is_unreachable() => {
                crate::output::warn(format!(
                    "{error}; deleting agent job {}/{} once it answers (up to {} s; Ctrl-C leaves the job)",
                    self.namespace,
                    self.job,
                    CLEANUP_PATIENCE.as_secs()
                ));
                tokio::select! {
                    retried = self.retry_delete() => match retried {
                        Ok(()) => {
                            crate::output::warn(format!(
                                "the cluster answers again; agent job {}/{} deleted",
                                self.namespace, self.job
                            ));
                            return;
                        }
                        Err(error) => error.to_string(),
                    },
                    () = interrupted() => "interrupted while waiting for the cluster".to_owned(),
                }
            }
            Err(error) => error.to_string(),
        };
        crate::output::error(left_behind(
            &self.namespace,
            &self.job,
            &failed,
            self.idle_ttl_secs,
            self.job_ttl_secs,
        ));
    }

    /// Tries the deletion again while the API server cannot be reached, and waits for the Job
    /// and pod to go, all within [`CLEANUP_PATIENCE`].
    async fn retry_delete(&self) -> Result<(), mirrord_kube::Error> {
        let deadline = Instant::now() + CLEANUP_PATIENCE;
        loop {
            tokio::time::sleep(CLEANUP_RETRY).await;
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(CLEANUP_RETRY);
            match self
                .cluster
                .delete_agent(&self.namespace, &self.job, left)
                .await
            {
                Err(error) if error.is_unreachable() && Instant::now() < deadline => {
                    tracing::debug!("deleting the agent: {error}; trying again");
                }
                done => return done,
            }
        }
    }
}

/// Until Ctrl-C or SIGTERM; never, if neither can be watched.
async fn interrupted() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = terminate => {}
        () = interrupt => {}
    }
}

/// The line for an agent Job a session could not delete: what is left, why, how long it stays
/// and how to remove it now.
fn left_behind(namespace: &str, job: &str, why: &str, idle_secs: u64, ttl_secs: u64) -> String {
    format!(
        "agent job {namespace}/{job} is left in the cluster ({why}); its agent exits once it has had no session for {idle_secs} s and the cluster removes the job {ttl_secs} s later, or now: kubectl delete job -n {namespace} {job}"
    )
}

/// Where the Job of an agent being started is recorded, so that whoever abandons the start
/// (Ctrl-C) can delete it.
pub type Starting = Arc<Mutex<Option<ClusterAgent>>>;

/// A session's agent, running and connected.
pub struct Started {
    pub agent: ClusterAgent,
    pub client: AgentClient,
    /// The target, for the session banner: `deployment/web → pod web-1 (container app) on node n`.
    pub label: String,
    /// The cluster's pod and Service ranges, routed through the agent.
    pub cidrs: Vec<IpNet>,
}

/// Progress while the agent starts, on stderr: on a terminal one line with a turning spinner,
/// each step replacing the last; otherwise, and under `-v` (which adds each step's time), a line
/// per step.
struct Progress {
    verbose: bool,
    spinner: Option<Spinner>,
    step: Option<(String, Instant)>,
    started: Instant,
}

impl Progress {
    fn new(verbose: bool) -> Progress {
        let spinner = (std::io::stderr().is_terminal() && !verbose && !crate::output::quiet())
            .then(Spinner::start);
        Progress {
            verbose,
            spinner,
            step: None,
            started: Instant::now(),
        }
    }

    fn step(&mut self, what: String) {
        self.finish();
        match &self.spinner {
            Some(spinner) => spinner.show(&what),
            None => crate::output::note(format!("{what}…")),
        }
        self.step = Some((what, Instant::now()));
    }

    /// A line of its own (a warning), printed above the spinner.
    fn note(&self, line: &str) {
        match &self.spinner {
            Some(spinner) => spinner.print_above(line),
            None if crate::output::quiet() => {}
            None => eprintln!("{line}"),
        }
    }

    fn finish(&mut self) {
        if let Some((what, since)) = self.step.take()
            && self.verbose
        {
            crate::output::note(format!("  {what}: {} ms", since.elapsed().as_millis()));
        }
    }

    fn done(mut self) {
        self.finish();
        if self.verbose {
            crate::output::note(format!(
                "agent ready in {} ms",
                self.started.elapsed().as_millis()
            ));
        }
    }
}

/// The spinner's frames, one per [`SPIN_TICK`].
const SPIN_FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
const SPIN_TICK: Duration = Duration::from_millis(100);

/// The terminal line of spinner frame `tick` showing step `what`.
fn spinner_line(tick: usize, what: &str) -> String {
    format!(
        "\r\x1b[K{} mirrord: {what}…",
        SPIN_FRAMES[tick % SPIN_FRAMES.len()]
    )
}

/// A thread redrawing the current step with a turning spinner; dropping it stops the thread
/// and clears the line, so what is printed next (the command's output, or an error) starts on
/// a clean line.
struct Spinner {
    state: Arc<(Mutex<SpinnerState>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct SpinnerState {
    what: String,
    stopped: bool,
}

impl Spinner {
    fn start() -> Spinner {
        let state = Arc::new((
            Mutex::new(SpinnerState {
                what: String::new(),
                stopped: false,
            }),
            std::sync::Condvar::new(),
        ));
        let shared = state.clone();
        let thread = std::thread::spawn(move || {
            let (state, wake) = &*shared;
            let mut state = lock(state);
            for tick in 0.. {
                if state.stopped {
                    break;
                }
                if !state.what.is_empty() {
                    let mut stderr = std::io::stderr().lock();
                    let _ = write!(stderr, "{}", spinner_line(tick, &state.what));
                    let _ = stderr.flush();
                }
                state = wake
                    .wait_timeout(state, SPIN_TICK)
                    .map(|(state, _)| state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            }
            eprint!("\r\x1b[K");
        });
        Spinner {
            state,
            thread: Some(thread),
        }
    }

    fn show(&self, what: &str) {
        lock(&self.state.0).what = what.to_owned();
        self.state.1.notify_one();
    }

    fn print_above(&self, line: &str) {
        // Holding the state keeps the thread from drawing meanwhile; it redraws on its tick.
        let _state = lock(&self.state.0);
        eprint!("\r\x1b[K{line}\n");
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        lock(&self.state.0).stopped = true;
        self.state.1.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Resolves `target`, starts its agent and connects to it. The Job is recorded in `starting`
/// from just before it is created; every failure after that deletes it before returning.
pub async fn start(
    target: &TargetPath,
    settings: &KubeSettings,
    starting: &Starting,
) -> anyhow::Result<Started> {
    let mut progress = Progress::new(settings.verbose);
    progress.step(format!("resolving {target}"));
    let cluster =
        Cluster::connect(settings.kubeconfig.as_deref(), settings.context.as_deref()).await?;
    let resolved = cluster
        .resolve(target, settings.namespace.as_deref())
        .await?;
    let label = describe(target, &resolved);

    let token = random_hex(32)?;
    let session = random_hex(6)?;
    let in_pod = match (&resolved.pod, settings.ephemeral) {
        (Some(pod), true) => Some(pod.pod.clone()),
        (None, true) => {
            progress.note(
                "mirrord: a targetless session has no pod to join; its agent runs as a Job (--ephemeral ignored)",
            );
            None
        }
        (_, false) => None,
    };
    let namespace = match (&in_pod, &settings.agent_namespace) {
        (Some(_), Some(asked)) if *asked != resolved.namespace => {
            progress.note(&format!(
                "mirrord: agent.namespace {asked} ignored: an ephemeral agent runs in the target's pod, in {}",
                resolved.namespace
            ));
            resolved.namespace.clone()
        }
        (Some(_), _) => resolved.namespace.clone(),
        (None, asked) => asked.clone().unwrap_or_else(|| resolved.namespace.clone()),
    };
    let placement = match &in_pod {
        Some(_) => resolved.placement_in_pod(ephemeral_capabilities(&cluster, &namespace).await),
        None => resolved.placement(),
    };
    let spec = AgentJobSpec {
        session: session.clone(),
        user: local_user(),
        namespace: namespace.clone(),
        image: settings
            .image
            .clone()
            .unwrap_or_else(mirrord_kube::agent_job::default_image),
        image_pull_policy: None,
        // An ephemeral agent listens in the target's network namespace, beside the app and
        // any other session's agent.
        port: match &in_pod {
            Some(_) => ephemeral_port()?,
            None => AGENT_PORT,
        },
        idle_ttl_secs: settings
            .communication_timeout
            .unwrap_or(DEFAULT_COMMUNICATION_TIMEOUT),
        ttl_after_finished_secs: i32::try_from(settings.job_ttl.unwrap_or(DEFAULT_JOB_TTL))
            .unwrap_or(i32::MAX),
        privileged: settings.privileged,
        placement,
        token: AgentToken::new(token.clone()),
    };
    let agent = ClusterAgent {
        cluster: cluster.clone(),
        namespace: namespace.clone(),
        job: mirrord_kube::agent_job::job_name(&session),
        in_pod: in_pod.clone(),
        idle_ttl_secs: spec.idle_ttl_secs,
        job_ttl_secs: settings.job_ttl.unwrap_or(DEFAULT_JOB_TTL),
    };
    progress.step(match (&resolved.pod, &in_pod) {
        (_, Some(pod)) => format!("adding the agent to pod {pod}"),
        (Some(pod), None) => format!("starting the agent on node {}", pod.node),
        (None, None) => format!("starting a targetless agent in namespace {namespace}"),
    });
    *lock(starting) = Some(agent.clone());
    // The cluster's ranges and the user's stale agents are looked at while the agent starts.
    let (created, cidrs, stale) = tokio::join!(
        cluster.create_agent(
            &spec,
            settings.startup_timeout.unwrap_or(DEFAULT_STARTUP_TIMEOUT)
        ),
        cluster.discover_cidrs(),
        cluster.remove_stale_agents(&spec.user),
    );
    // A failed start deleted its Job itself.
    let pod = created.inspect_err(|_| {
        lock(starting).take();
    })?;
    match stale {
        Ok(removed) if !removed.is_empty() => {
            tracing::info!("removed stale agents: {}", removed.join(", "))
        }
        Ok(_) => {}
        Err(error) => tracing::debug!("stale agents not looked for: {error}"),
    }
    let cidrs = match cidrs {
        Ok(cidrs) => routed(&cidrs, settings.verbose),
        Err(error) => {
            progress.note(&format!(
                "mirrord: the cluster's address ranges are unknown ({error}); name them with --cidr"
            ));
            Vec::new()
        }
    };

    progress.step(format!("connecting to agent pod {}", pod.pod));
    let connected = connect(&cluster, &pod, &token).await;
    let client = match connected {
        Ok(client) => client,
        Err(error) => {
            lock(starting).take();
            agent.delete().await;
            return Err(error);
        }
    };
    progress.done();
    if settings.verbose {
        crate::output::note(format!("session: {label}"));
    }
    lock(starting).take();
    Ok(Started {
        agent,
        client,
        label,
        cidrs,
    })
}

/// The capabilities an ephemeral agent asks for in `namespace`: those its Pod Security level
/// allows. A level that cannot be read is taken as privileged: admission then says what it
/// refuses.
async fn ephemeral_capabilities(cluster: &Cluster, namespace: &str) -> Vec<String> {
    let level = match cluster.namespace_labels(namespace).await {
        Ok(labels) => access::pod_security(labels.as_ref()).level,
        Err(error) => {
            tracing::debug!("the Pod Security level of {namespace} is unknown: {error}");
            access::Level::Privileged
        }
    };
    if level != access::Level::Privileged {
        tracing::info!(
            "namespace {namespace} enforces Pod Security {level}: the agent gets no NET_ADMIN, so incoming traffic cannot be redirected"
        );
    }
    access::ephemeral_capabilities(level)
}

/// A port for an ephemeral agent, which shares the pod's network namespace with the app and with
/// other sessions' agents: random in 20000-59999, clear of the fixed port of Job agents and of
/// the usual ephemeral range's busiest end.
fn ephemeral_port() -> anyhow::Result<u16> {
    let mut raw = [0u8; 2];
    getrandom::fill(&mut raw).map_err(|error| anyhow::anyhow!("no randomness: {error}"))?;
    Ok(20000 + u16::from_le_bytes(raw) % 40000)
}

/// How long reaching a started agent may keep failing before the session gives up.
const CONNECT_PATIENCE: Duration = Duration::from_secs(15);

/// Port-forwards to the agent and opens the session. A port-forward can fail on the node's
/// side while the agent is already listening (its pod's address not yet reachable from the
/// node): such a stream stays silent or ends, so it is tried again, within [`CONNECT_PATIENCE`].
async fn connect(cluster: &Cluster, pod: &AgentPod, token: &str) -> anyhow::Result<AgentClient> {
    let name = format!("pod/{}:{} (port-forward)", pod.pod, pod.port);
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        let attempt = async {
            let stream = cluster
                .port_forward(&pod.namespace, &pod.pod, pod.port)
                .await?;
            let client = AgentClient::start(split_stream(stream), &name, token.as_bytes()).await?;
            anyhow::Ok(client)
        };
        match attempt.await {
            Ok(client) => return Ok(client),
            // A refusal or a version mismatch will not change by trying again.
            Err(error)
                if Instant::now() < deadline
                    && error
                        .downcast_ref::<ClientError>()
                        .is_some_and(ClientError::may_pass) =>
            {
                tracing::debug!("port-forward to the agent: {error}; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// `deployment/web → pod web-1 (container app) on node n`, or `targetless in namespace ns`.
fn describe(target: &TargetPath, resolved: &Resolved) -> String {
    match &resolved.pod {
        Some(pod) => format!(
            "{target} → pod {} (container {}) on node {}",
            pod.pod, pod.container.name, pod.node
        ),
        None => format!("targetless in namespace {}", resolved.namespace),
    }
}

/// The ranges to route through the agent; under `-v`, each with where it came from.
fn routed(cidrs: &ClusterCidrs, verbose: bool) -> Vec<IpNet> {
    let mut nets = Vec::new();
    for (what, found) in [("pods", &cidrs.pods), ("services", &cidrs.services)] {
        for cidr in found {
            if verbose {
                crate::output::note(format!("routing {what} {} ({})", cidr.net, cidr.source));
            }
            nets.push(cidr.net);
        }
    }
    nets
}

/// `bytes` random bytes as lowercase hex.
fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut raw = vec![0u8; bytes];
    getrandom::fill(&mut raw).map_err(|error| anyhow::anyhow!("no randomness: {error}"))?;
    Ok(raw.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// Who runs mirrord, for the agent's labels: stale agents are found by it.
fn local_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| nix::unistd::getuid().to_string())
}

/// `mirrord ls`: the targets of a namespace (or all), as upstream prints them.
pub async fn list(settings: &KubeSettings, all: bool) -> anyhow::Result<Vec<(String, String)>> {
    let cluster =
        Cluster::connect(settings.kubeconfig.as_deref(), settings.context.as_deref()).await?;
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| cluster.namespace().to_owned());
    let listed = cluster
        .list_targets((!all).then_some(namespace.as_str()))
        .await
        .context("cannot list targets")?;
    Ok(listed
        .into_iter()
        .map(|target| (target.namespace, target.path.to_string()))
        .collect())
}

/// Whether a targetless session goes to a cluster: when one is configured at all.
pub fn cluster_configured(settings: &KubeSettings) -> bool {
    settings.kubeconfig.is_some()
        || settings.context.is_some()
        || settings.namespace.is_some()
        || std::env::var_os("KUBECONFIG").is_some_and(|paths| !paths.is_empty())
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("HOME")
            .is_some_and(|home| PathBuf::from(home).join(".kube/config").is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_left_behind_is_named_with_how_long_it_stays_and_how_to_remove_it() {
        assert_eq!(
            left_behind(
                "shop",
                "mirrord-agent-0a1b2c",
                "cannot reach the cluster at https://k:6443: connection refused",
                30,
                10
            ),
            "agent job shop/mirrord-agent-0a1b2c is left in the cluster (cannot reach the cluster at https://k:6443: connection refused); its agent exits once it has had no session for 30 s and the cluster removes the job 10 s later, or now: kubectl delete job -n shop mirrord-agent-0a1b2c"
        );
    }

    #[test]
    fn the_spinner_turns_in_place_and_names_the_step() {
        let lines: Vec<String> = (0..11)
            .map(|tick| spinner_line(tick, "creating the agent"))
            .collect();
        assert_eq!(lines[0], "\r\x1b[K⠋ mirrord: creating the agent…");
        assert_eq!(lines[1], "\r\x1b[K⠙ mirrord: creating the agent…");
        // Ten frames, then round again.
        assert_eq!(lines[10], lines[0]);
    }
}
