//! Against a real cluster (tests/cluster): a user targets `deployment/web`; mirrord resolves it,
//! starts the agent beside the pod, reaches it through port-forward, opens a session and sees
//! the pod's environment and hostname; then removes the agent and nothing of it is left.
//!
//! Runs only when MIRRORD_TEST_KUBECONFIG names a kubeconfig, inside the cluster's network
//! namespace:
//! `MIRRORD_TEST_KUBECONFIG=/var/lib/mrdc-cluster/pki/admin.kubeconfig nsenter
//! --net=/run/netns/mrdc-world -- cargo test --release -p mirrord-kube --test cluster`

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mirrord_kube::agent_job::{SESSION_LABEL, default_image};
use mirrord_kube::choose::ChooseError;
use mirrord_kube::{AgentJobSpec, AgentToken, Cluster, Error, TargetPath};
use mirrord_link::greet::greet;
use mirrord_protocol::frame::{self, FrameDecoder};
use mirrord_protocol::greeting::Greeting;
use mirrord_protocol::handshake::{check_welcome, client_hello};
use mirrord_protocol::messages::{AgentMessage, ClientMessage, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const AGENT_PORT: u16 = 7400;

fn kubeconfig() -> Option<PathBuf> {
    match std::env::var_os("MIRRORD_TEST_KUBECONFIG") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            eprintln!(
                "skipped: set MIRRORD_TEST_KUBECONFIG to a kubeconfig of tests/cluster (and run inside netns mrdc-world)"
            );
            None
        }
    }
}

/// A short lowercase id, unique enough for one test run's names.
fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{:x}",
        (nanos ^ u128::from(std::process::id()) << 32) & 0xff_ffff_ffff
    )
}

fn deployment(namespace: &str) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web",
                        "image": "python-http",
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "env": [{"name": "GREETING", "value": "hello-from-the-pod"}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
                    }]
                }
            }
        }
    }))
    .expect("the Deployment literal is valid")
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, message: &ClientMessage) {
    let mut buf = Vec::new();
    frame::encode(message, &mut buf).expect("encode");
    stream.write_all(&buf).await.expect("write to the agent");
}

async fn receive<S: AsyncRead + Unpin>(stream: &mut S, decoder: &mut FrameDecoder) -> AgentMessage {
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(message) = decoder.next::<AgentMessage>().expect("a valid frame") {
            return message;
        }
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
            .await
            .expect("the agent answers within 20 s")
            .expect("read from the agent");
        assert!(n > 0, "the agent closed the session");
        decoder.push(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_target_session_through_port_forward() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    // RUST_LOG=mirrord_kube=debug shows the agent's start and the port-forward's errors.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = Cluster::connect(Some(&kubeconfig), None)
        .await
        .expect("connect");
    let ns = format!("mirrord-kube-it-{}", unique());
    let namespaces: Api<Namespace> = Api::all(cluster.client().clone());
    let namespace: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).expect("namespace");
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create the namespace");
    // Run as a task so that a failed assertion still reaches the cleanup below.
    let task = {
        let (cluster, ns) = (cluster.clone(), ns.clone());
        tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(240), scenario(&cluster, &ns)).await
        })
    };
    let outcome = task.await;
    // Whatever happened, the namespace goes (with the Deployment in it).
    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    match outcome {
        Ok(finished) => finished.expect("the scenario finishes within 240 s"),
        Err(failed) => std::panic::resume_unwind(failed.into_panic()),
    }
}

async fn scenario(cluster: &Cluster, ns: &str) {
    // A user's workload.
    let deployments: Api<Deployment> = Api::namespaced(cluster.client().clone(), ns);
    deployments
        .create(&PostParams::default(), &deployment(ns))
        .await
        .expect("create the Deployment");

    // mirrord resolves `deployment/web` once a pod is ready.
    let target: TargetPath = "deployment/web".parse().expect("target path");
    let resolved = loop {
        match cluster.resolve(&target, Some(ns)).await {
            Ok(resolved) => break resolved,
            Err(Error::Choose(ChooseError::NoReadyPod { .. })) => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(other) => panic!("resolve: {other}"),
        }
    };
    let pod = resolved.pod.clone().expect("a targeted pod");
    println!(
        "resolved {target} -> pod {} on node {}, container {} ({}), ip {:?}",
        pod.pod, pod.node, pod.container.name, pod.container.id, pod.pod_ip
    );
    assert!(pod.pod.starts_with("web-"), "{}", pod.pod);
    assert_eq!(pod.container.name, "web");
    assert!(pod.container.id.starts_with("mrdc://"));

    // The same pod through a Service that selects it, and by its own name and container.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(cluster.client().clone(), ns);
    let service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": ns},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}
    }))
    .expect("the Service literal is valid");
    services
        .create(&PostParams::default(), &service)
        .await
        .expect("create the Service");
    for path in [
        "service/web".to_owned(),
        format!("pod/{}/container/web", pod.pod),
    ] {
        let target: TargetPath = path.parse().expect("target path");
        let again = cluster.resolve(&target, Some(ns)).await.expect("resolve");
        assert_eq!(again.pod.as_ref(), Some(&pod), "{path}");
    }

    // A typo gets a suggestion.
    let typo: TargetPath = "deployment/wbe".parse().expect("target path");
    let err = cluster
        .resolve(&typo, Some(ns))
        .await
        .expect_err("no such deployment");
    assert_eq!(
        err.to_string(),
        format!("deployment/wbe not found in namespace {ns}; did you mean web?")
    );

    // `mirrord ls` shows it.
    let listed: Vec<String> = cluster
        .list_targets(Some(ns))
        .await
        .expect("list targets")
        .iter()
        .map(|t| t.path.to_string())
        .collect();
    println!("ls: {listed:?}");
    assert!(listed.contains(&"deployment/web".to_owned()));
    assert!(listed.contains(&"service/web".to_owned()));
    assert!(listed.contains(&format!("pod/{}", pod.pod)));

    let cidrs = cluster.discover_cidrs().await.expect("discover CIDRs");
    for range in cidrs.pods.iter().chain(&cidrs.services) {
        println!("cidr {} from {}", range.net, range.source);
    }
    assert!(
        cidrs
            .pods
            .iter()
            .any(|c| c.net.to_string() == "10.244.0.0/24")
    );
    assert!(
        cidrs
            .services
            .iter()
            .any(|c| c.net.to_string() == "10.96.0.0/16")
    );

    // The agent starts beside the pod.
    let session = unique();
    let token = format!("token-{session}-{}", unique());
    let spec = AgentJobSpec {
        session: session.clone(),
        user: "kube-it".to_owned(),
        namespace: ns.to_owned(),
        image: default_image(),
        image_pull_policy: None,
        port: AGENT_PORT,
        idle_ttl_secs: 60,
        ttl_after_finished_secs: 30,
        privileged: false,
        placement: resolved.placement(),
        token: AgentToken::new(token.clone()),
    };
    let started = std::time::Instant::now();
    let agent = cluster
        .create_agent(&spec, mirrord_kube::DEFAULT_STARTUP_TIMEOUT)
        .await
        .expect("the agent starts");
    println!(
        "agent job {} pod {} listening after {:?}",
        agent.job,
        agent.pod,
        started.elapsed()
    );

    // A session through port-forward: hello, welcome, then the target's info.
    let mut stream = cluster
        .port_forward(ns, &agent.pod, agent.port)
        .await
        .expect("port-forward");
    let mut decoder = FrameDecoder::new();
    let (mut read, mut write) = tokio::io::split(&mut stream);
    let agent_greeting = greet(&mut read, &mut write, &Greeting::ours("kube-test"))
        .await
        .expect("greeting");
    assert!(agent_greeting.compatible(), "{agent_greeting:?}");
    send(&mut stream, &client_hello(token.as_bytes())).await;
    check_welcome(receive(&mut stream, &mut decoder).await).expect("welcome");
    println!(
        "welcome: protocol {} agent {}",
        agent_greeting.version, agent_greeting.software
    );
    send(
        &mut stream,
        &ClientMessage::Request {
            id: 1,
            request: Request::TargetInfo,
        },
    )
    .await;
    let info = match receive(&mut stream, &mut decoder).await {
        AgentMessage::Response {
            id: 1,
            response: Ok(Response::TargetInfo(info)),
        } => info,
        other => panic!("expected the target info, got {other:?}"),
    };
    println!(
        "target info: hostname {}, pid {:?}, addresses {:?}, {} env vars",
        info.hostname,
        info.pid,
        info.addresses,
        info.env.len()
    );
    assert!(
        info.env
            .contains(&("GREETING".to_owned(), "hello-from-the-pod".to_owned())),
        "{:?}",
        info.env
    );
    assert_eq!(info.hostname, pod.pod);
    if let Some(ip) = pod.pod_ip {
        assert!(
            info.addresses.iter().any(|(a, _)| *a == ip),
            "{:?}",
            info.addresses
        );
    }
    drop(stream);

    // A running agent is not stale.
    let removed = cluster
        .remove_stale_agents("kube-it")
        .await
        .expect("remove stale agents");
    assert!(
        !removed.iter().any(|r| r.ends_with(&agent.job)),
        "{removed:?}"
    );

    // The agent goes, and nothing of it stays.
    cluster
        .delete_agent(ns, &agent.job, mirrord_kube::api::AGENT_GONE_WITHIN)
        .await
        .expect("delete the agent");
    let jobs: Api<Job> = Api::namespaced(cluster.client().clone(), ns);
    let pods: Api<Pod> = Api::namespaced(cluster.client().clone(), ns);
    assert!(jobs.get_opt(&agent.job).await.expect("get job").is_none());
    let left = pods
        .list(&ListParams::default().labels(&format!("{SESSION_LABEL}={session}")))
        .await
        .expect("list pods");
    assert!(
        left.items.is_empty(),
        "agent pods left: {:?}",
        left.items.len()
    );
    println!("agent {} and its pod are gone", agent.job);
}

fn agent_spec(ns: &str, placement: mirrord_kube::Placement) -> AgentJobSpec {
    let session = unique();
    AgentJobSpec {
        session: session.clone(),
        // Not the session test's user: its stale-agent sweep must not touch these.
        user: "kube-it-start".to_owned(),
        namespace: ns.to_owned(),
        image: default_image(),
        image_pull_policy: None,
        port: AGENT_PORT,
        idle_ttl_secs: 30,
        ttl_after_finished_secs: 30,
        privileged: false,
        placement,
        token: AgentToken::new(format!("token-{session}")),
    }
}

/// Starts that cannot succeed fail at once with the reason, and leave no Job behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_agent_starts_say_why_and_leave_nothing() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let cluster = Cluster::connect(Some(&kubeconfig), None)
        .await
        .expect("connect");
    let ns = format!("mirrord-kube-psa-{}", unique());
    let namespaces: Api<Namespace> = Api::all(cluster.client().clone());
    // A namespace that enforces the baseline Pod Security level, as many clusters do.
    let namespace: Namespace = serde_json::from_value(serde_json::json!({"metadata": {
        "name": ns,
        "labels": {"pod-security.kubernetes.io/enforce": "baseline"}
    }}))
    .expect("namespace");
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create the namespace");
    let task = {
        let (cluster, ns) = (cluster.clone(), ns.clone());
        tokio::spawn(async move {
            let targeted = mirrord_kube::Placement::Container {
                node: "mrdc-node".to_owned(),
                container_id: format!("mrdc://{}", "0".repeat(64)),
            };
            let started = std::time::Instant::now();
            let err = cluster
                .create_agent(&agent_spec(&ns, targeted), Duration::from_secs(30))
                .await
                .expect_err("baseline refuses hostPID");
            println!("after {:?}: {err}", started.elapsed());
            assert!(
                err.to_string()
                    .contains("rejected by Pod Security baseline:latest"),
                "{err}"
            );
            assert!(started.elapsed() < Duration::from_secs(20));

            // Targetless needs no privilege, but this image is unknown to the node.
            let mut spec = agent_spec(&ns, mirrord_kube::Placement::Targetless);
            spec.image = "no-such-image:1".to_owned();
            let err = cluster
                .create_agent(&spec, Duration::from_secs(30))
                .await
                .expect_err("unknown image");
            println!("{err}");
            assert!(err.to_string().contains("ErrImageNeverPull"), "{err}");

            let jobs: Api<Job> = Api::namespaced(cluster.client().clone(), &ns);
            let left = jobs.list(&ListParams::default()).await.expect("list jobs");
            assert!(left.items.is_empty(), "{} jobs left", left.items.len());

            // An agent that does not run yet may be another session still starting: the sweep
            // leaves it alone until it is three minutes old (the cluster sets creation times,
            // so the removal of an old one is not shown here).
            let mut stale = agent_spec(&ns, mirrord_kube::Placement::Targetless);
            stale.user = "kube-it-stale".to_owned();
            stale.image = "no-such-image:1".to_owned();
            let job = mirrord_kube::agent_job::build_agent_job(&stale);
            jobs.create(&PostParams::default(), &job)
                .await
                .expect("create a stale agent");
            let removed = cluster
                .remove_stale_agents("kube-it-stale")
                .await
                .expect("remove stale agents");
            assert_eq!(removed, Vec::<String>::new());
            let name = mirrord_kube::agent_job::job_name(&stale.session);
            jobs.get(&name).await.expect("a young agent is kept");
            jobs.delete(&name, &DeleteParams::background())
                .await
                .expect("delete the young agent");
        })
    };
    let outcome = task.await;
    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    if let Err(failed) = outcome {
        std::panic::resume_unwind(failed.into_panic());
    }
}

/// A user without the right to create Jobs learns which right is missing and how to check it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restricted_user_is_told_what_was_refused() {
    let Some(kubeconfig) = kubeconfig() else {
        return;
    };
    let restricted = kubeconfig.with_file_name("restricted-user.kubeconfig");
    let cluster = Cluster::connect(Some(&restricted), None)
        .await
        .expect("connect");
    let err = cluster
        .create_agent(
            &agent_spec("default", mirrord_kube::Placement::Targetless),
            Duration::from_secs(10),
        )
        .await
        .expect_err("restricted-user may not create jobs");
    println!("{err}");
    assert_eq!(
        err.to_string(),
        "forbidden: user restricted-user may not create jobs.batch in namespace default; check with: kubectl auth can-i create jobs.batch -n default"
    );
}
