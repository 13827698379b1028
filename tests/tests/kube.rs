//! mirrord against Kubernetes targets on the real test cluster (`tests/cluster`): what a user
//! runs — `mirrord exec -t deployment/web -- …` with nothing installed in the cluster — and
//! what they see, down to every error and the agent being gone afterwards.
//!
//! `scripts/test` runs this binary inside the cluster's world network namespace (no route off
//! the machine) with `MIRRORD_TEST_KUBECONFIG` naming the admin kubeconfig, once the cluster
//! is up. Without that variable there is no cluster to test against and it says so and exits.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use mirrord_tests::command::Capture;

/// The namespace of tests/cluster/manifests/mirrord-e2e.yaml.
const NS: &str = "mirrord-e2e";
/// The namespace of tests/cluster/manifests/mirrord-baseline.yaml, where Pod Security enforces
/// the baseline level.
const BASELINE_NS: &str = "mirrord-baseline";
/// Longest a mirrord session may take in these tests (an agent starts in a few seconds).
const SESSION: Duration = Duration::from_secs(90);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(Failed::from(format!($($fmt)+)));
        }
    };
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let Some(kubeconfig) = std::env::var_os("MIRRORD_TEST_KUBECONFIG") else {
        println!(
            "kube: MIRRORD_TEST_KUBECONFIG is unset: these tests run from scripts/test, inside the test cluster's network namespace"
        );
        return ExitCode::SUCCESS;
    };
    let kube = Kube {
        kubeconfig: PathBuf::from(kubeconfig),
    };
    if let Err(error) = kube.set_up() {
        eprintln!("kube: cannot set up the workloads: {error:?}");
        return ExitCode::FAILURE;
    }
    type Test = fn(&Kube) -> Result<(), Failed>;
    let tests: Vec<(&str, Test)> = vec![
        (
            "env_from_a_secret_and_the_pods_hostname",
            env_from_a_secret_and_the_pods_hostname,
        ),
        (
            "configmap_file_under_the_remote_root",
            configmap_file_under_the_remote_root,
        ),
        (
            "secrets_never_reach_a_trace_log",
            secrets_never_reach_a_trace_log,
        ),
        (
            "service_account_at_its_real_path",
            service_account_at_its_real_path,
        ),
        (
            "service_by_short_name_and_fqdn_without_cidr",
            service_by_short_name_and_fqdn_without_cidr,
        ),
        (
            "getent_resolves_kubernetes_default",
            getent_resolves_kubernetes_default,
        ),
        ("every_target_kind", every_target_kind),
        (
            "targetless_runs_in_the_namespace",
            targetless_runs_in_the_namespace,
        ),
        (
            "not_found_suggests_close_names",
            not_found_suggests_close_names,
        ),
        (
            "no_ready_pod_is_a_clear_error",
            no_ready_pod_is_a_clear_error,
        ),
        (
            "several_containers_are_listed",
            several_containers_are_listed,
        ),
        (
            "forbidden_names_the_verb_and_the_check",
            forbidden_names_the_verb_and_the_check,
        ),
        (
            "an_image_that_cannot_be_pulled_fails_fast",
            an_image_that_cannot_be_pulled_fails_fast,
        ),
        (
            "the_agent_is_gone_after_exit_ctrl_c_and_sigterm",
            the_agent_is_gone_after_exit_ctrl_c_and_sigterm,
        ),
        (
            "the_agent_is_gone_after_kill_9",
            the_agent_is_gone_after_kill_9,
        ),
        (
            "a_lost_agent_is_one_line_and_nothing_hangs",
            a_lost_agent_is_one_line_and_nothing_hangs,
        ),
        (
            "exec_plugin_with_merged_kubeconfig_paths",
            exec_plugin_with_merged_kubeconfig_paths,
        ),
        ("shell_through_a_pty", shell_through_a_pty),
        (
            "a_filter_splits_a_services_requests",
            a_filter_splits_a_services_requests,
        ),
        (
            "a_deleted_agent_pod_gives_the_port_back",
            a_deleted_agent_pod_gives_the_port_back,
        ),
        (
            "in_cluster_config_inside_a_pod",
            in_cluster_config_inside_a_pod,
        ),
        ("two_sessions_at_once", two_sessions_at_once),
        ("ls_lists_targets", ls_lists_targets),
        (
            "the_job_agent_is_refused_by_baseline_in_one_line",
            the_job_agent_is_refused_by_baseline_in_one_line,
        ),
        (
            "the_ephemeral_agent_serves_a_baseline_namespace",
            the_ephemeral_agent_serves_a_baseline_namespace,
        ),
        (
            "an_ephemeral_agent_steals_where_the_namespace_allows_it",
            an_ephemeral_agent_steals_where_the_namespace_allows_it,
        ),
        ("doctor_as_admin_all_pass", doctor_as_admin_all_pass),
        (
            "doctor_as_the_restricted_user_names_the_missing_verbs",
            doctor_as_the_restricted_user_names_the_missing_verbs,
        ),
        (
            "doctor_in_the_baseline_namespace",
            doctor_in_the_baseline_namespace,
        ),
    ];
    // These take the cluster away for a while (its API server restarted), so each runs alone:
    // it holds `cluster` for writing, every other test holds it for reading.
    let alone: Vec<(&str, Test)> = vec![(
        "a_restarted_api_server_loses_the_agent_and_leaves_none",
        a_restarted_api_server_loses_the_agent_and_leaves_none,
    )];
    let kube = std::sync::Arc::new(kube);
    let cluster = std::sync::Arc::new(std::sync::RwLock::new(()));
    let shared = tests.into_iter().map(|(name, test)| {
        let (kube, cluster) = (kube.clone(), cluster.clone());
        Trial::test(name, move || {
            let _shared = cluster.read().unwrap_or_else(PoisonError::into_inner);
            test(&kube)
        })
    });
    let alone = alone.into_iter().map(|(name, test)| {
        let (kube, cluster) = (kube.clone(), cluster.clone());
        Trial::test(name, move || {
            let _alone = cluster.write().unwrap_or_else(PoisonError::into_inner);
            test(&kube)
        })
    });
    let trials = shared.chain(alone).collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let leftover = kube.agent_jobs(None).unwrap_or_default();
    if !leftover.is_empty() {
        eprintln!("kube: agent jobs left behind: {leftover:?}");
        return ExitCode::FAILURE;
    }
    conclusion.exit_code()
}

struct Kube {
    kubeconfig: PathBuf,
}

/// The label selector of mirrord's agents, of every user or of one.
fn agents_of(user: Option<&str>) -> String {
    match user {
        Some(user) => format!("app.kubernetes.io/name=mirrord-agent,mirrord/user={user}"),
        None => "app.kubernetes.io/name=mirrord-agent".to_owned(),
    }
}

/// What a finished command printed.
struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Output {
    fn describe(&self) -> String {
        format!(
            "exit {:?}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The release binaries beside this test binary (target/release/deps/kube-…).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let release = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default();
    release.join(name)
}

/// The cluster's own multi-call binary (kubectl).
fn cluster_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/bin/mrdc-cluster")
}

/// Runs `cmd` to the end, or kills it after `limit`.
fn finish(mut cmd: Command, limit: Duration) -> Result<Output, Failed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .map_err(|error| format!("cannot start {cmd:?}: {error}"))?;
    wait(child, limit)
}

fn wait(mut child: Child, limit: Duration) -> Result<Output, Failed> {
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stdout.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(pipe) = stderr.as_mut() {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("did not finish within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

impl Kube {
    /// Longer than any `--timeout` given to kubectl here, so its own message (what it was
    /// still waiting for) is what a failure shows.
    fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<Output, Failed> {
        let mut cmd = Command::new(cluster_binary());
        cmd.arg("kubectl")
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(args);
        finish(cmd, Duration::from_secs(180))
            .map_err(|error| format!("kubectl {args:?}: {error:?}").into())
    }

    fn kubectl(&self, args: &[&str]) -> Result<String, Failed> {
        let out = self.kubectl_as(&self.kubeconfig, args)?;
        ensure!(out.code == Some(0), "kubectl {args:?}: {}", out.describe());
        Ok(out.stdout)
    }

    /// `mirrord ARGS…` with the admin's kubeconfig.
    fn mirrord_cmd(&self, args: &[&str]) -> Command {
        self.mirrord_as("mirrord-tests", args)
    }

    /// The same for a local `user`: agents are labelled with it, so a test can tell its own
    /// agents from those of tests running beside it.
    fn mirrord_as(&self, user: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary("mirrord"));
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("USER", user);
        cmd
    }

    fn mirrord(&self, args: &[&str]) -> Result<Output, Failed> {
        finish(self.mirrord_cmd(args), SESSION)
    }

    /// The restricted user's kubeconfig (tests/cluster/README.md): it may read pods and their
    /// logs, nothing else.
    fn restricted_kubeconfig(&self) -> String {
        self.kubeconfig
            .parent()
            .map(|dir| dir.join("restricted-user.kubeconfig"))
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    }

    /// `mirrord exec -n NS -t TARGET -- sh -c SCRIPT`, which must succeed; its stdout.
    fn exec(&self, target: &str, script: &str) -> Result<String, Failed> {
        let out = self.mirrord(&["exec", "-n", NS, "-t", target, "--", "sh", "-c", script])?;
        ensure!(
            out.code == Some(0),
            "mirrord exec -t {target} -- {script}: {}",
            out.describe()
        );
        Ok(out.stdout)
    }

    fn set_up(&self) -> Result<(), Failed> {
        let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/manifests");
        // A previous run's namespaces may still be terminating.
        self.kubectl(&[
            "delete",
            "namespace",
            NS,
            BASELINE_NS,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ])?;
        for manifest in ["mirrord-e2e.yaml", "mirrord-baseline.yaml"] {
            let manifest = manifests.join(manifest).to_string_lossy().into_owned();
            self.kubectl(&["apply", "-f", &manifest])?;
        }
        for deployment in ["deployment/web", "deployment/api"] {
            self.kubectl(&[
                "-n",
                BASELINE_NS,
                "rollout",
                "status",
                deployment,
                "--timeout=120s",
            ])?;
        }
        // The cron job's newest job, made now instead of at 3 am.
        self.kubectl(&[
            "-n",
            NS,
            "create",
            "job",
            "--from=cronjob/nightly",
            "nightly-now",
        ])?;
        for workload in [
            "deployment/web",
            "deployment/api",
            "deployment/orders",
            "statefulset/db",
        ] {
            self.kubectl(&["-n", NS, "rollout", "status", workload, "--timeout=120s"])?;
        }
        self.kubectl(&[
            "-n",
            NS,
            "wait",
            "--for=condition=Ready",
            "pod/duo",
            "pod/incluster",
            "pod/client",
            "--timeout=120s",
        ])?;
        for job in ["batch", "nightly-now"] {
            self.kubectl(&[
                "-n",
                NS,
                "wait",
                "--for=jsonpath={.status.ready}=1",
                &format!("job/{job}"),
                "--timeout=120s",
            ])?;
        }
        Ok(())
    }

    fn pods(&self, selector: &str) -> Result<Vec<String>, Failed> {
        let names = self.kubectl(&[
            "-n",
            NS,
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        Ok(names.split_whitespace().map(str::to_owned).collect())
    }

    /// mirrord's agent Jobs in every namespace, of every user or of one.
    fn agent_jobs(&self, user: Option<&str>) -> Result<Vec<String>, Failed> {
        let selector = agents_of(user);
        let names = self.kubectl(&[
            "get",
            "jobs",
            "-A",
            "-l",
            &selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {end}",
        ])?;
        Ok(names.split_whitespace().map(str::to_owned).collect())
    }

    /// Waits until no agent Job (and no agent pod) of `user` is left, up to `limit`.
    fn agents_gone_within(&self, user: &str, limit: Duration) -> Result<(), Failed> {
        let deadline = Instant::now() + limit;
        let selector = agents_of(Some(user));
        loop {
            let jobs = self.agent_jobs(Some(user))?;
            let pods = self.kubectl(&[
                "get",
                "pods",
                "-A",
                "-l",
                &selector,
                "-o",
                "jsonpath={.items[*].metadata.name}",
            ])?;
            if jobs.is_empty() && pods.trim().is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "agents still there after {limit:?}: jobs {jobs:?}, pods {pods}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn env_from_a_secret_and_the_pods_hostname(kube: &Kube) -> Result<(), Failed> {
    let out = kube.exec(
        "deployment/web",
        "printenv DB_PASSWORD; printenv PLAIN; hostname",
    )?;
    let lines: Vec<&str> = out.lines().collect();
    let pods = kube.pods("app=web")?;
    ensure!(
        lines.len() == 3
            && lines[0] == "s3cret-from-a-secret"
            && lines[1] == "plain-value"
            && pods.iter().any(|pod| pod == lines[2]),
        "expected the secret, the plain value and one of {pods:?} as hostname, got {out:?}"
    );
    Ok(())
}

fn configmap_file_under_the_remote_root(kube: &Kube) -> Result<(), Failed> {
    let out = kube.exec(
        "deployment/web",
        "cat \"$MIRRORD_REMOTE_ROOT/etc/app/app.yaml\"",
    )?;
    ensure!(out == "greeting: hello from a configmap\n", "got {out:?}");
    Ok(())
}

/// A session at `MIRRORD_LOG=trace` whose command prints an env value from a Secret and a
/// ConfigMap file: the command sees both, and neither they nor the session's token (read from
/// the agent's Job while it runs) reach mirrord's log, as text or as the hex a dump of the
/// port-forward's frames would show.
fn secrets_never_reach_a_trace_log(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "trace-log-test";
    const SECRET: &str = "s3cret-from-a-secret";
    const FILE: &str = "greeting: hello from a configmap";
    let child = spawn_session(
        kube,
        USER,
        &[],
        &[("MIRRORD_LOG", "trace")],
        "printenv DB_PASSWORD; cat \"$MIRRORD_REMOTE_ROOT/etc/app/app.yaml\"; sleep 5",
    )?;
    wait_for_agent(kube, USER)?;
    let token = kube.kubectl(&[
        "get",
        "jobs",
        "-A",
        "-l",
        &agents_of(Some(USER)),
        "-o",
        "jsonpath={..env[?(@.name==\"MIRRORD_AGENT_TOKEN\")].value}",
    ])?;
    let out = wait(child, SESSION)?;
    ensure!(
        out.code == Some(0) && out.stdout == format!("{SECRET}\n{FILE}\n"),
        "the session: {}",
        out.describe()
    );
    let token = token.trim();
    ensure!(token.len() >= 32, "the token in the agent's Job: {token:?}");
    // The log really is at trace: a test that saw no log line would prove nothing.
    let log = out.stderr.to_lowercase();
    ensure!(
        log.matches("trace").count() > 50,
        "expected a trace log, got {} lines",
        out.stderr.lines().count()
    );
    let hex = |text: &str| text.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    for secret in [token, SECRET, FILE] {
        for form in [secret.to_lowercase(), hex(secret)] {
            ensure!(
                !log.contains(&form),
                "mirrord's trace log holds {form:?} (from {secret:?}): {}",
                out.stderr
                    .lines()
                    .filter(|l| l.to_lowercase().contains(&form))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    Ok(())
}

fn service_account_at_its_real_path(kube: &Kube) -> Result<(), Failed> {
    let dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let out = kube.exec(
        "deployment/web",
        &format!("cat {dir}/namespace; echo; test -s {dir}/token && test -s {dir}/ca.crt && echo token-and-ca"),
    )?;
    ensure!(out == format!("{NS}\ntoken-and-ca\n"), "got {out:?}");
    Ok(())
}

/// curl tries a request up to three times: on the test cluster, a connection through a Service
/// to a pod on a freshly reused address has been seen to time out once (see the closing note of
/// 2026-11-30); a wrong answer still fails the test.
fn service_by_short_name_and_fqdn_without_cidr(kube: &Kube) -> Result<(), Failed> {
    let out = kube.exec(
        "deployment/web",
        &format!(
            "curl -sS -m 10 --retry 2 --retry-all-errors -o /dev/null -w '%{{http_code}}\\n' http://web/ && \
             curl -sS -m 10 --retry 2 --retry-all-errors -o /dev/null -w '%{{http_code}}\\n' http://web.{NS}.svc.cluster.local/"
        ),
    )?;
    ensure!(out == "200\n200\n", "got {out:?}");
    Ok(())
}

fn getent_resolves_kubernetes_default(kube: &Kube) -> Result<(), Failed> {
    let out = kube.exec("deployment/web", "getent hosts kubernetes.default")?;
    let cluster_ip = kube.kubectl(&[
        "-n",
        "default",
        "get",
        "service",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    ensure!(
        out.split_whitespace().next() == Some(cluster_ip.trim()),
        "expected {cluster_ip}, got {out:?}"
    );
    Ok(())
}

fn every_target_kind(kube: &Kube) -> Result<(), Failed> {
    let web = kube.pods("app=web")?;
    let replicaset = kube.kubectl(&[
        "-n",
        NS,
        "get",
        "replicasets",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ])?;
    let first = web.first().cloned().unwrap_or_default();
    let cases: Vec<(String, &str, Vec<String>)> = vec![
        (format!("pod/{first}"), "hostname", vec![first.clone()]),
        ("deploy/web".into(), "hostname", web.clone()),
        (format!("replicaset/{replicaset}"), "hostname", web.clone()),
        ("service/web".into(), "hostname", web.clone()),
        (
            "statefulset/db".into(),
            "printenv ROLE",
            vec!["statefulset".into()],
        ),
        ("job/batch".into(), "printenv ROLE", vec!["job".into()]),
        (
            "cronjob/nightly".into(),
            "printenv ROLE",
            vec!["cronjob".into()],
        ),
        (
            "pod/duo/container/right".into(),
            "printenv SIDE",
            vec!["right".into()],
        ),
    ];
    for (target, script, expected) in cases {
        let out = kube.exec(&target, script)?;
        ensure!(
            expected.iter().any(|want| out.trim() == want),
            "{target}: expected one of {expected:?}, got {out:?}"
        );
    }
    Ok(())
}

fn targetless_runs_in_the_namespace(kube: &Kube) -> Result<(), Failed> {
    // No pod's env or files: the agent's own pod lends its network; cluster names resolve.
    let out = kube.exec(
        "targetless",
        "printenv DB_PASSWORD || echo no-secret; curl -sS -m 10 --retry 2 --retry-all-errors -o /dev/null -w '%{http_code}\\n' http://web/",
    )?;
    ensure!(out == "no-secret\n200\n", "got {out:?}");
    // A targetless agent is placed by the scheduler: with the only node cordoned it cannot be,
    // and mirrord says so at once instead of waiting out its startup timeout. (Targeted agents
    // are pinned to their pod's node and skip the scheduler, so other tests are not affected.)
    kube.kubectl(&["cordon", "mrdc-node"])?;
    let refused = fails_with(
        kube,
        &["exec", "-n", NS, "-t", "targetless", "--", "true"],
        &["cannot be scheduled", "unschedulable"],
    );
    kube.kubectl(&["uncordon", "mrdc-node"])?;
    refused
}

/// A failing session: exit 125 and an error of one or two lines containing every `needle`.
fn fails_with(kube: &Kube, args: &[&str], needles: &[&str]) -> Result<(), Failed> {
    let out = kube.mirrord(args)?;
    let error = out.stderr.trim();
    let lines = error
        .lines()
        .filter(|line| line.starts_with("mirrord: ") && !line.ends_with('…'))
        .count();
    ensure!(
        out.code == Some(125) && needles.iter().all(|needle| error.contains(needle)) && lines <= 2,
        "expected exit 125 and {needles:?} in one or two lines: {}",
        out.describe()
    );
    Ok(())
}

fn not_found_suggests_close_names(kube: &Kube) -> Result<(), Failed> {
    fails_with(
        kube,
        &["exec", "-n", NS, "-t", "deployment/wbe", "--", "true"],
        &["wbe", "not found", "web"],
    )
}

fn no_ready_pod_is_a_clear_error(kube: &Kube) -> Result<(), Failed> {
    fails_with(
        kube,
        &["exec", "-n", NS, "-t", "deployment/unready", "--", "true"],
        &["unready", "ready"],
    )
}

fn several_containers_are_listed(kube: &Kube) -> Result<(), Failed> {
    fails_with(
        kube,
        &["exec", "-n", NS, "-t", "pod/duo", "--", "true"],
        &["left", "right", "container"],
    )
}

fn forbidden_names_the_verb_and_the_check(kube: &Kube) -> Result<(), Failed> {
    let restricted = kube
        .kubeconfig
        .parent()
        .map(|dir| dir.join("restricted-user.kubeconfig"))
        .unwrap_or_default();
    let web = kube.pods("app=web")?;
    let target = format!("pod/{}", web.first().cloned().unwrap_or_default());
    let restricted = restricted.to_string_lossy().into_owned();
    fails_with(
        kube,
        &[
            "exec",
            "--kubeconfig",
            &restricted,
            "-n",
            NS,
            "-t",
            &target,
            "--",
            "true",
        ],
        &["create", "jobs", NS, "kubectl auth can-i create jobs"],
    )
}

fn an_image_that_cannot_be_pulled_fails_fast(kube: &Kube) -> Result<(), Failed> {
    let started = Instant::now();
    fails_with(
        kube,
        &[
            "exec",
            "-n",
            NS,
            "-t",
            "deployment/web",
            "--agent-image",
            "example.invalid/no-such-agent:1",
            "--",
            "true",
        ],
        &["ErrImageNeverPull"],
    )?;
    ensure!(
        started.elapsed() < Duration::from_secs(45),
        "the failure took {:?}, as long as a timeout",
        started.elapsed()
    );
    kube.agents_gone_within("image-test", Duration::from_secs(60))
}

fn the_agent_is_gone_after_exit_ctrl_c_and_sigterm(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "lifecycle-test";
    let session = ["exec", "-n", NS, "-t", "deployment/web", "--"];
    let out = finish(
        kube.mirrord_as(USER, &[&session[..], &["true"]].concat()),
        SESSION,
    )?;
    ensure!(
        out.code == Some(0),
        "mirrord exec -- true: {}",
        out.describe()
    );
    kube.agents_gone_within(USER, Duration::from_secs(5))?;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut cmd = kube.mirrord_as(USER, &[&session[..], &["sleep", "60"]].concat());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        wait_for_agent(kube, USER)?;
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, signal) };
        let out = wait(child, Duration::from_secs(60))?;
        ensure!(
            out.code.is_some(),
            "mirrord did not exit after signal {signal}: {}",
            out.describe()
        );
        kube.agents_gone_within(USER, Duration::from_secs(5))?;
    }
    Ok(())
}

/// `mirrord exec -n NS <flags…> -t deployment/web -- sh -c <script>` as `user` with `env` added,
/// started with stdout and stderr piped.
fn spawn_session(
    kube: &Kube,
    user: &str,
    flags: &[&str],
    env: &[(&str, &str)],
    script: &str,
) -> Result<Child, Failed> {
    let args = [
        &["exec", "-n", NS][..],
        flags,
        &["-t", "deployment/web", "--", "sh", "-c", script],
    ]
    .concat();
    let mut cmd = kube.mirrord_as(user, &args);
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd.spawn()?)
}

/// mirrord's lines saying it lost the agent.
fn lost_agent_lines(out: &Output) -> Vec<&str> {
    out.stderr
        .lines()
        .filter(|line| line.contains("lost the agent"))
        .collect()
}

/// Until `user`'s agent runs and its session has had time to start the command.
fn wait_for_agent(kube: &Kube, user: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + SESSION;
    while kube.agent_jobs(Some(user))?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "no agent of {user} within {SESSION:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    Ok(())
}

fn the_agent_is_gone_after_kill_9(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "kill-9-test";
    let mut cmd = kube.mirrord_as(
        USER,
        &[
            "exec",
            "-n",
            NS,
            "-t",
            "deployment/web",
            "--",
            "sleep",
            "600",
        ],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn()?;
    wait_for_agent(kube, USER)?;
    child.kill()?;
    child.wait()?;
    // The agent's link goes idle: keepalive (up to 20 s), then its communication timeout
    // (30 s), then the Job's TTL (10 s) and the garbage collector.
    kube.agents_gone_within(USER, Duration::from_secs(120))
}

fn two_sessions_at_once(kube: &Kube) -> Result<(), Failed> {
    let web = kube.pods("app=web")?;
    ensure!(web.len() == 2, "expected two web pods, got {web:?}");
    let children: Vec<(String, Child)> = [web[0].clone(), web[1].clone(), web[0].clone()]
        .into_iter()
        .map(|pod| {
            let mut cmd = kube.mirrord_as(
                "concurrent-test",
                &[
                    "exec",
                    "-n",
                    NS,
                    "-t",
                    &format!("pod/{pod}"),
                    "--",
                    "sh",
                    "-c",
                    "hostname; sleep 2",
                ],
            );
            cmd.stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            cmd.spawn().map(|child| (pod, child))
        })
        .collect::<Result<_, _>>()?;
    for (pod, child) in children {
        let out = wait(child, SESSION)?;
        ensure!(
            out.code == Some(0) && out.stdout.trim() == pod,
            "session on pod/{pod}: {}",
            out.describe()
        );
    }
    kube.agents_gone_within("concurrent-test", Duration::from_secs(5))
}

fn ls_lists_targets(kube: &Kube) -> Result<(), Failed> {
    let out = kube.mirrord(&["ls", "-n", NS, "-o", "json"])?;
    ensure!(out.code == Some(0), "mirrord ls: {}", out.describe());
    let paths: Vec<String> = serde_json::from_str(out.stdout.trim())
        .map_err(|error| format!("not a JSON array of strings ({error}): {}", out.stdout))?;
    for want in [
        "deployment/web",
        "statefulset/db",
        "job/batch",
        "cronjob/nightly",
        "service/web",
        "pod/duo/container/left",
        "pod/duo/container/right",
    ] {
        ensure!(
            paths.iter().any(|path| path == want),
            "{want} not in {paths:?}"
        );
    }
    let web = kube.pods("app=web")?;
    for pod in web {
        ensure!(
            paths.contains(&format!("pod/{pod}")),
            "pod/{pod} not in {paths:?}"
        );
    }
    Ok(())
}

/// A kubeconfig split over two files in `KUBECONFIG` (the cluster in one; the user and context
/// in the other), whose user is an exec credential plugin printing a service account's token,
/// as EKS's, GKE's and AKS's plugins print theirs.
fn exec_plugin_with_merged_kubeconfig_paths(kube: &Kube) -> Result<(), Failed> {
    let token = kube.kubectl(&[
        "-n",
        NS,
        "create",
        "token",
        "exec-plugin-user",
        "--duration=1h",
    ])?;
    let admin: serde_json::Value =
        serde_json::from_str(&kube.kubectl(&["config", "view", "--raw", "-o", "json"])?)?;
    let cluster = admin["clusters"][0]["cluster"].clone();
    ensure!(
        cluster.is_object(),
        "no cluster in the admin kubeconfig: {admin}"
    );
    let dir = std::env::temp_dir().join(format!("mirrord-kube-exec-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let calls = dir.join("plugin-calls");
        let plugin = dir.join("credential-plugin");
        let credential = serde_json::json!({
            "apiVersion": "client.authentication.k8s.io/v1",
            "kind": "ExecCredential",
            "status": {"token": token.trim()},
        });
        std::fs::write(
            &plugin,
            format!(
                "#!/bin/sh\necho called >> '{}'\ncat <<'END'\n{credential}\nEND\n",
                calls.display()
            ),
        )?;
        std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        let clusters = dir.join("clusters.yaml");
        std::fs::write(
            &clusters,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "plugin-cluster", "cluster": cluster}],
            })
            .to_string(),
        )?;
        let users = dir.join("users.yaml");
        std::fs::write(
            &users,
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "plugin",
                "contexts": [{"name": "plugin", "context": {
                    "cluster": "plugin-cluster", "user": "plugin-user", "namespace": NS}}],
                "users": [{"name": "plugin-user", "user": {"exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": plugin,
                    "interactiveMode": "Never",
                }}}],
            })
            .to_string(),
        )?;
        let mut cmd = kube.mirrord_as(
            "exec-plugin-test",
            &[
                "exec",
                "-t",
                "deployment/web",
                "--",
                "sh",
                "-c",
                "echo $PLAIN",
            ],
        );
        cmd.env(
            "KUBECONFIG",
            format!("{}:{}", clusters.display(), users.display()),
        );
        let out = finish(cmd, SESSION)?;
        ensure!(
            out.code == Some(0) && out.stdout.trim() == "plain-value",
            "mirrord with KUBECONFIG=clusters:users and an exec plugin: {}",
            out.describe()
        );
        let called = std::fs::read_to_string(&calls).unwrap_or_default();
        ensure!(!called.is_empty(), "the credential plugin was never called");
        kube.agents_gone_within("exec-plugin-test", Duration::from_secs(5))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The agent's pod deleted mid-session: its port-forward breaks, mirrord says so in one line,
/// and the command goes on without the target — reads of the pod's files and connections to the
/// cluster fail instead of hanging — then mirrord exits with it and removes the Job.
fn a_lost_agent_is_one_line_and_nothing_hangs(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "lost-agent-test";
    let script = "sleep 15; \
        cat \"$MIRRORD_REMOTE_ROOT/etc/hostname\" >/dev/null 2>&1 && echo fs-ok || echo fs-failed; \
        curl -s -m 10 http://web/ >/dev/null 2>&1 && echo net-ok || echo net-failed";
    let child = spawn_session(kube, USER, &[], &[], script)?;
    wait_for_agent(kube, USER)?;
    kube.kubectl(&[
        "delete",
        "pods",
        "-A",
        "-l",
        &agents_of(Some(USER)),
        "--grace-period=0",
        "--force",
        "--wait=false",
    ])?;
    let out = wait(child, Duration::from_secs(60))?;
    let lost = lost_agent_lines(&out);
    ensure!(
        out.code == Some(0)
            && lost.len() == 1
            && out.stdout.split_whitespace().collect::<Vec<_>>() == ["fs-failed", "net-failed"],
        "after the agent's pod was deleted: {}",
        out.describe()
    );
    kube.agents_gone_within(USER, Duration::from_secs(10))
}

/// The cluster's API server killed and started again mid-session (tests/cluster/restart-apiserver),
/// as a control-plane crash or upgrade does: the port-forward to the agent runs through it and
/// breaks. mirrord says once that it lost the agent; the command goes on without the target (a
/// read of the pod's files fails instead of hanging) and ends while the API server is still
/// away; mirrord then waits for it rather than leave the agent behind, and deletes the Job once
/// it answers. The agent's own idle timeout is set far beyond the test
/// (`agent.communication_timeout`), so nothing but mirrord's cleanup removes it in time.
fn a_restarted_api_server_loses_the_agent_and_leaves_none(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "apiserver-restart-test";
    let dir = std::env::temp_dir().join(format!("mirrord-kube-apiserver-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let config = dir.join("mirrord.json");
        std::fs::write(&config, r#"{"agent": {"communication_timeout": 600}}"#)?;
        let started = dir.join("started");
        let script = format!(
            "touch '{}'; sleep 10; \
             cat \"$MIRRORD_REMOTE_ROOT/etc/hostname\" >/dev/null 2>&1 && echo fs-ok || echo fs-failed",
            started.display()
        );
        let config = config.to_string_lossy().into_owned();
        let mut child = spawn_session(kube, USER, &["-f", &config], &[], &script)?;
        let deadline = Instant::now() + SESSION;
        while !started.exists() {
            if child.try_wait()?.is_some() || Instant::now() > deadline {
                return Err(format!(
                    "the command did not start: {}",
                    wait(child, Duration::from_secs(5))?.describe()
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Down for 20 s: the command's 10 s end while nothing answers on the API server's port.
        let mut restart =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster/restart-apiserver"));
        restart.arg("20");
        let restart = std::thread::spawn(move || finish(restart, Duration::from_secs(240)));
        let out = wait(child, Duration::from_secs(240));
        let restarted = restart
            .join()
            .map_err(|_| "the restart's thread panicked")??;
        ensure!(
            restarted.code == Some(0),
            "tests/cluster/restart-apiserver: {}",
            restarted.describe()
        );
        let out = out?;
        let lost = lost_agent_lines(&out);
        ensure!(
            out.code == Some(0)
                && lost.len() == 1
                && lost[0].starts_with("mirrord: lost the agent")
                && lost[0].contains("(port-forward) ended")
                && out.stdout.trim() == "fs-failed",
            "after the API server restarted: {}",
            out.describe()
        );
        // The command ended while the API server was away: the deletion had to wait for it.
        ensure!(
            out.stderr.contains("answers again; agent job")
                && !out.stderr.contains("left in the cluster"),
            "mirrord did not wait for the API server to delete its agent: {}",
            out.describe()
        );
        kube.agents_gone_within(USER, Duration::from_secs(10))
            .map_err(|error| format!("{error:?}\nmirrord: {}", out.describe()).into())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// `mirrord shell -t deployment/web` with bash on a real terminal: the progress spinner turns
/// on that terminal while the agent starts, then the shell has the pod's environment, hostname
/// and files.
fn shell_through_a_pty(kube: &Kube) -> Result<(), Failed> {
    let home = std::env::temp_dir().join(format!("mirrord-kube-shell-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let mut cmd = kube.mirrord_as("shell-test", &["shell", "-n", NS, "-t", "deployment/web"]);
    cmd.env("SHELL", "/bin/bash")
        .env("HOME", &home)
        .env("TERM", "dumb");
    let result = (|| {
        let mut pty = mirrord_tests::pty::Pty::spawn(cmd)?;
        pty.expect("(mirrord:deployment/web) ", SESSION)?;
        let progress = pty.transcript();
        // The typed line is echoed with `$…` unexpanded, so only the command's output matches.
        pty.send(b"echo \"pw=$DB_PASSWORD\"\n")?;
        pty.expect("pw=s3cret-from-a-secret", Duration::from_secs(10))?;
        pty.send(b"echo \"host=$(hostname)\"\n")?;
        pty.expect("host=web-", Duration::from_secs(10))?;
        pty.send(b"cat \"$MIRRORD_REMOTE_ROOT/etc/app/app.yaml\"\n")?;
        pty.expect("greeting: hello from a configmap", Duration::from_secs(10))?;
        pty.send(b"exit 7\n")?;
        let code = pty.wait(Duration::from_secs(30))?;
        ensure!(
            code == 7,
            "mirrord shell exited {code}, expected 7; terminal: {}",
            pty.transcript()
        );
        ensure!(
            ["resolving deployment/web…", "starting the agent on node"]
                .iter()
                .all(|step| progress.contains(&format!(" mirrord: {step}")))
                && progress.contains(|c| ('⠋'..='⠿').contains(&c)),
            "no spinner naming each step on the terminal: {progress}"
        );
        kube.agents_gone_within("shell-test", Duration::from_secs(5))
    })();
    let _ = std::fs::remove_dir_all(&home);
    result
}

/// mirrord inside a pod, with no kubeconfig anywhere: it uses the pod's service account (the
/// in-cluster config) and the namespace of that account.
fn in_cluster_config_inside_a_pod(kube: &Kube) -> Result<(), Failed> {
    let mirrord = binary("mirrord");
    let mirrord = mirrord.to_string_lossy();
    let out = kube.kubectl_as(
        &kube.kubeconfig,
        &[
            "-n",
            NS,
            "exec",
            "incluster",
            "--",
            "env",
            "-u",
            "KUBECONFIG",
            "HOME=/nonexistent",
            &mirrord,
            "ls",
            "-o",
            "json",
        ],
    )?;
    ensure!(
        out.code == Some(0) && out.stdout.contains("\"deployment/web\""),
        "mirrord ls inside pod incluster: {}",
        out.describe()
    );
    Ok(())
}

/// What the client pod gets from Service api, with `headers`.
fn call_api(kube: &Kube, headers: &[&str]) -> Result<String, Failed> {
    call_service(kube, "api", headers)
}

/// What the client pod gets from Service `service` with these extra header lines.
fn call_service(kube: &Kube, service: &str, headers: &[&str]) -> Result<String, Failed> {
    let mut args = vec!["-n", NS, "exec", "client", "--", "curl", "-s", "-m", "5"];
    for header in headers {
        args.extend(["-H", header]);
    }
    let url = format!("http://{service}/");
    args.push(&url);
    let out = kube.kubectl_as(&kube.kubeconfig, &args)?;
    Ok(out.stdout.trim().to_owned())
}

/// Starts `mirrord exec -t TARGET` stealing the requests with `X-User: USER` (all of them
/// without one), its local app answering `answer`; `dir` holds its config.
fn steal_session(
    kube: &Kube,
    (as_user, target): (&str, &str),
    dir: &Path,
    answer: &str,
    user: Option<&str>,
) -> Result<Child, Failed> {
    steal_session_with(
        kube,
        (as_user, target),
        dir,
        (answer, user),
        serde_json::json!({}),
    )
}

/// [`steal_session`] with `agent` as the config file's `agent` section.
fn steal_session_with(
    kube: &Kube,
    (as_user, target): (&str, &str),
    dir: &Path,
    (answer, user): (&str, Option<&str>),
    agent: serde_json::Value,
) -> Result<Child, Failed> {
    let config = dir.join(format!("{answer}.json"));
    let incoming = match user {
        Some(user) => serde_json::json!({
            "mode": "steal",
            "http_filter": {"header_filter": format!("^x-user: {user}$")},
        }),
        None => serde_json::json!("steal"),
    };
    std::fs::write(
        &config,
        serde_json::json!({"feature": {"network": {"incoming": incoming}}, "agent": agent})
            .to_string(),
    )?;
    let server = format!(
        r"
import http.server
class Answer(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        self.send_response(200)
        self.send_header('Content-Length', '{length}')
        self.end_headers()
        self.wfile.write(b'{answer}\n')
http.server.ThreadingHTTPServer(('', 8080), Answer).serve_forever()
",
        length = answer.len() + 1
    );
    let mut cmd = kube.mirrord_as(
        as_user,
        &[
            "exec",
            "-n",
            NS,
            "-t",
            target,
            "-f",
            &config.to_string_lossy(),
            "--",
            "/usr/bin/python3",
            "-c",
            &server,
        ],
    );
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(cmd.spawn()?)
}

/// Until `X-User: USER` reaches that session's local app (the port is taken once it listens).
fn until_user_gets(kube: &Kube, user: &str, expected: &str) -> Result<(), Failed> {
    let header = format!("X-User: {user}");
    until_service_answers(kube, ("api", &[&header]), expected, SESSION)
}

/// Until the client pod gets `expected` from Service `service` with `headers`, for at most
/// `limit`; the failure says what it got last.
fn until_service_answers(
    kube: &Kube,
    (service, headers): (&str, &[&str]),
    expected: &str,
    limit: Duration,
) -> Result<(), Failed> {
    let deadline = Instant::now() + limit;
    loop {
        let answer = call_service(kube, service, headers)?;
        if answer == expected {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "Service {service} with {headers:?} never answered {expected:?}; last {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Ends a session with SIGTERM, as a service manager or an IDE's stop button sends it (a
/// terminal's Ctrl-C reaches the command itself, through the process group).
fn terminate(child: Child) -> Result<Output, Failed> {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    wait(child, Duration::from_secs(60))
}

/// A stealing session's agent pod deleted as `kubectl delete pod` does (SIGTERM, then a grace
/// period): the agent's guard removes its redirect, so the Service's clients reach the pod's
/// app again at once; the session says once that it lost the agent.
fn a_deleted_agent_pod_gives_the_port_back(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "deleted-agent-test";
    let dir = std::env::temp_dir().join(format!("mirrord-kube-deleted-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Service orders: api's tests must not see this steal.
    let mut session = steal_session(kube, (USER, "deployment/orders"), &dir, "stolen", None);
    // Followed while the session runs: it hears of the loss through the port-forward, which may
    // close a moment after the guard gave the port back.
    let stderr = Capture::start(session.as_mut().ok().and_then(|child| child.stderr.take()));
    let result = session
        .as_ref()
        .map_err(|e| format!("{e:?}").into())
        .and_then(|_| {
            until_service_answers(kube, ("orders", &[]), "stolen", SESSION)?;
            kube.kubectl(&[
                "delete",
                "pods",
                "-A",
                "-l",
                &agents_of(Some(USER)),
                "--wait=false",
            ])?;
            // Had the table stayed, the redirect would lead to a dead listener: no answer.
            until_service_answers(kube, ("orders", &[]), "remote", Duration::from_secs(30))?;
            let limit = Duration::from_secs(30);
            ensure!(
                stderr.contains_by("lost the agent", Instant::now() + limit),
                "never said \"lost the agent\" within {limit:?}; said: {}",
                stderr.text()
            );
            Ok(())
        });
    let ended = session.map(terminate);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let mut out = ended??;
    // The session has ended: its end of the pipe is closed.
    stderr.wait_until(Instant::now() + Duration::from_secs(10));
    out.stderr = stderr.text();
    let lost = out.stderr.matches("lost the agent").count();
    ensure!(
        lost == 1,
        "the session did not say once that it lost the agent: {}",
        out.describe()
    );
    kube.agents_gone_within(USER, Duration::from_secs(10))
}

/// In a namespace at privileged, an ephemeral agent (`agent.ephemeral` in the config file) gets
/// NET_ADMIN and steals by a header filter, beside the Job agents of other sessions on the same
/// pod: the filtered requests reach the local app, and once the session ends the pod answers
/// them again.
fn an_ephemeral_agent_steals_where_the_namespace_allows_it(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "ephemeral-steal-test";
    let dir = std::env::temp_dir().join(format!("mirrord-kube-ephemeral-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let session = steal_session_with(
        kube,
        (USER, "deployment/api"),
        &dir,
        ("ephemeral-local", Some("ephemeral")),
        serde_json::json!({"ephemeral": true}),
    );
    let result = session
        .as_ref()
        .map_err(|e| format!("{e:?}").into())
        .and_then(|_| until_user_gets(kube, "ephemeral", "ephemeral-local"));
    let ended = session.map(terminate);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    let out = ended??;
    ensure!(
        out.stderr
            .contains("keeps a terminated ephemeral container"),
        "the session did not say the pod keeps the container: {}",
        out.describe()
    );
    until_user_gets(kube, "ephemeral", "remote")?;
    ensure!(
        kube.agent_jobs(Some(USER))?.is_empty(),
        "an ephemeral session created a Job"
    );
    Ok(())
}

/// Two sessions, each with its own agent, steal deployment/api's requests by header filters: a
/// client pod calling Service api gets each session's local app for that session's `X-User`
/// and the pod for everyone else; when one session ends the other keeps its requests, and after
/// both the pod answers everything again.
fn a_filter_splits_a_services_requests(kube: &Kube) -> Result<(), Failed> {
    const USER: &str = "filter-test";
    let dir = std::env::temp_dir().join(format!("mirrord-kube-filter-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut sessions = Vec::new();
    let result = (|| {
        for user in ["me", "you"] {
            let session = steal_session(kube, (USER, "deployment/api"), &dir, user, Some(user))?;
            sessions.push(session);
            until_user_gets(kube, user, user)?;
        }
        for _ in 0..3 {
            let me = call_api(kube, &["X-User: me"])?;
            let you = call_api(kube, &["X-User: you"])?;
            let others = call_api(kube, &["X-User: someone-else"])?;
            let plain = call_api(kube, &[])?;
            ensure!(
                [&me, &you, &others, &plain] == ["me", "you", "remote", "remote"],
                "X-User: me got {me:?}, X-User: you {you:?}, X-User: someone-else {others:?}, \
                 no header {plain:?}"
            );
        }
        // The session that came first is last in line; it keeps its requests alone.
        terminate(sessions.pop().ok_or("no second session")?).map(drop)?;
        until_user_gets(kube, "you", "remote")?;
        let me = call_api(kube, &["X-User: me"])?;
        ensure!(
            me == "me",
            "after the second session ended, X-User: me got {me:?}"
        );
        Ok(())
    })();
    let ended: Vec<_> = sessions.into_iter().map(terminate).collect();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    ended.into_iter().collect::<Result<Vec<_>, Failed>>()?;
    ensure!(
        call_api(kube, &["X-User: me"])? == "remote",
        "the pod did not answer again after the sessions"
    );
    kube.agents_gone_within(USER, Duration::from_secs(10))
}

/// In a namespace that enforces Pod Security baseline, the agent Job's pod is refused; mirrord
/// says so at once, in one line naming the policy and what it forbids, and leaves no Job.
fn the_job_agent_is_refused_by_baseline_in_one_line(kube: &Kube) -> Result<(), Failed> {
    let started = Instant::now();
    let out = finish(
        kube.mirrord_as(
            "baseline-test",
            &[
                "exec",
                "-n",
                BASELINE_NS,
                "-t",
                "deployment/web",
                "--",
                "true",
            ],
        ),
        SESSION,
    )?;
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|line| line.starts_with("mirrord: ") && !line.ends_with('…'))
        .collect();
    ensure!(
        out.code == Some(125)
            && lines.len() == 1
            && [
                "Pod Security baseline",
                "hostPID=true",
                "SYS_ADMIN",
                "run with --ephemeral"
            ]
            .iter()
            .all(|needle| lines[0].contains(needle)),
        "expected one line naming Pod Security baseline and suggesting --ephemeral: {}",
        out.describe()
    );
    ensure!(
        started.elapsed() < Duration::from_secs(45),
        "the refusal took {:?}, as long as a timeout",
        started.elapsed()
    );
    kube.agents_gone_within("baseline-test", Duration::from_secs(60))
}

/// `mirrord doctor`, which must finish with `code`; its stdout.
fn doctor(kube: &Kube, args: &[&str], code: i32) -> Result<String, Failed> {
    let out = kube.mirrord(&[&["doctor"][..], args].concat())?;
    ensure!(
        out.code == Some(code),
        "mirrord doctor {args:?}: expected exit {code}: {}",
        out.describe()
    );
    Ok(out.stdout)
}

/// The admin may do everything, the namespace is unrestricted, the target resolves: every check
/// passes and doctor exits 0; `-o json` says the same.
fn doctor_as_admin_all_pass(kube: &Kube) -> Result<(), Failed> {
    let out = doctor(kube, &["-n", NS, "-t", "deployment/web"], 0)?;
    let web = kube.pods("app=web")?;
    for needle in [
        "✓ API server: https://127.0.0.1:6443",
        "answers, version v1.37.2",
        "✓ user namespaces:",
        "✓ /dev/net/tun:",
        "✓ /dev/fuse:",
        "✓ nftables:",
        &format!("✓ get deployments.apps in namespace {NS}: allowed"),
        &format!("✓ create jobs.batch in namespace {NS}: allowed"),
        &format!("✓ create pods/portforward in namespace {NS}: allowed"),
        "✓ list nodes at cluster scope: allowed",
        &format!("✓ Pod Security of namespace {NS}: privileged"),
        "on node mrdc-node, runtime mrdc",
        "a session would work",
    ] {
        ensure!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
    ensure!(
        !out.contains('✗') && !out.contains(" ! "),
        "a check did not pass:\n{out}"
    );
    ensure!(
        web.iter()
            .any(|pod| out.contains(&format!("✓ deployment/web: pod {pod} (container web)"))),
        "the target is not one of {web:?}:\n{out}"
    );
    let json = doctor(kube, &["-n", NS, "-t", "deployment/web", "-o", "json"], 0)?;
    let report: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
    let checks = report["checks"].as_array().cloned().unwrap_or_default();
    ensure!(
        report["ok"] == true
            && checks.len() > 10
            && checks.iter().all(|check| check["outcome"] == "pass"),
        "{json}"
    );
    Ok(())
}

/// The restricted user may read pods only: doctor names each verb a session needs and lacks,
/// with the kubectl line that checks it, and exits 1.
fn doctor_as_the_restricted_user_names_the_missing_verbs(kube: &Kube) -> Result<(), Failed> {
    let restricted = kube.restricted_kubeconfig();
    let web = kube.pods("app=web")?;
    let target = format!("pod/{}", web.first().cloned().unwrap_or_default());
    let out = doctor(
        kube,
        &["--kubeconfig", &restricted, "-n", NS, "-t", &target],
        1,
    )?;
    for needle in [
        format!("✓ get pods in namespace {NS}: allowed"),
        format!("✗ create jobs.batch in namespace {NS}: denied"),
        format!("kubectl auth can-i create jobs.batch -n {NS}"),
        format!("✗ get jobs.batch in namespace {NS}: denied"),
        format!("✗ delete jobs.batch in namespace {NS}: denied"),
        format!("✗ create pods/portforward in namespace {NS}: denied"),
        format!("kubectl auth can-i create pods --subresource=portforward -n {NS}"),
        format!("✓ get pods/log in namespace {NS}: allowed"),
        "! list nodes at cluster scope: denied".to_owned(),
        format!("! Pod Security of namespace {NS}: unknown"),
        format!("✓ {target}: pod "),
        "a session would not work: 4 checks failed".to_owned(),
    ] {
        ensure!(out.contains(&needle), "no {needle:?} in:\n{out}");
    }
    let json = doctor(
        kube,
        &[
            "--kubeconfig",
            &restricted,
            "-n",
            NS,
            "-t",
            &target,
            "-o",
            "json",
        ],
        1,
    )?;
    let report: serde_json::Value =
        serde_json::from_str(&json).map_err(|e| format!("{e}: {json}"))?;
    let failed: Vec<String> = report["checks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|check| check["outcome"] == "fail")
        .filter_map(|check| check["name"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        report["ok"] == false
            && failed
                == [
                    format!("create jobs.batch in namespace {NS}"),
                    format!("get jobs.batch in namespace {NS}"),
                    format!("delete jobs.batch in namespace {NS}"),
                    format!("create pods/portforward in namespace {NS}"),
                ],
        "{json}"
    );
    Ok(())
}

/// In the baseline namespace the admin holds every permission, but the agent Job would be
/// refused: doctor names the level and what it forbids, and exits 1.
fn doctor_in_the_baseline_namespace(kube: &Kube) -> Result<(), Failed> {
    let out = doctor(kube, &["-n", BASELINE_NS, "-t", "deployment/web"], 1)?;
    for needle in [
        format!("✓ create jobs.batch in namespace {BASELINE_NS}: allowed"),
        format!(
            "✗ Pod Security of namespace {BASELINE_NS}: baseline: the agent Job would be refused (baseline forbids the agent's hostPID and capabilities SYS_ADMIN, SYS_PTRACE, NET_ADMIN)"
        ),
        "fix: run with --ephemeral (agent.ephemeral), which this level admits; or run the agent in a namespace at privileged".to_owned(),
        "a session would not work: 1 check failed".to_owned(),
    ] {
        ensure!(out.contains(&needle), "no {needle:?} in:\n{out}");
    }
    // With --ephemeral the agent joins the target's pod: other permissions, and admitted.
    let out = doctor(
        kube,
        &["-n", BASELINE_NS, "-t", "deployment/web", "--ephemeral"],
        0,
    )?;
    for needle in [
        format!("✓ patch pods/ephemeralcontainers in namespace {BASELINE_NS}: allowed"),
        format!(
            "✓ Pod Security of namespace {BASELINE_NS}: baseline: the ephemeral agent is admitted, without NET_ADMIN (no incoming traffic)"
        ),
    ] {
        ensure!(out.contains(&needle), "no {needle:?} in:\n{out}");
    }
    ensure!(
        !out.contains("jobs.batch"),
        "an ephemeral agent needs no Job:\n{out}"
    );
    Ok(())
}

/// In the baseline namespace, where the agent Job is refused, `--ephemeral` adds the agent to
/// the target's pod: the session gets the pod's env, a ConfigMap file, a Service by name (another
/// app's: this cluster has no hairpin, so no pod reaches itself through its Service) and the
/// pod's hostname. The CLI says once that the pod keeps the container, which has exited, and no
/// Job was created.
fn the_ephemeral_agent_serves_a_baseline_namespace(kube: &Kube) -> Result<(), Failed> {
    let user = "ephemeral-test";
    let script = "printenv PLAIN; hostname; cat \"$MIRRORD_REMOTE_ROOT/etc/app/app.yaml\"; \
                  curl -sS -m 10 --retry 2 --retry-all-errors -o /dev/null -w '%{http_code}\\n' http://api/";
    let out = finish(
        kube.mirrord_as(
            user,
            &[
                "exec",
                "--ephemeral",
                "-n",
                BASELINE_NS,
                "-t",
                "deployment/web",
                "--",
                "sh",
                "-c",
                script,
            ],
        ),
        SESSION,
    )?;
    ensure!(
        out.code == Some(0),
        "mirrord exec --ephemeral: {}",
        out.describe()
    );
    let pods = kube.kubectl(&[
        "-n",
        BASELINE_NS,
        "get",
        "pods",
        "-l",
        "app=web",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    ensure!(
        lines.len() == 4
            && lines[0] == "plain-in-baseline"
            && pods.split_whitespace().any(|pod| pod == lines[1])
            && lines[2] == "greeting: hello from a baseline namespace"
            && lines[3] == "200",
        "expected the env, one of {pods:?} as hostname, the ConfigMap and the Service: {}",
        out.describe()
    );
    let pod = lines[1];
    let notes: Vec<&str> = out
        .stderr
        .lines()
        .filter(|line| {
            line.contains("keeps a terminated ephemeral container until it is restarted")
        })
        .collect();
    ensure!(
        notes.len() == 1,
        "expected the note once: {}",
        out.describe()
    );
    ensure!(
        kube.agent_jobs(Some(user))?.is_empty(),
        "an ephemeral session created a Job"
    );
    // The agent ended with its session.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let states = kube.kubectl(&[
            "-n",
            BASELINE_NS,
            "get",
            "pod",
            pod,
            "-o",
            "jsonpath={range .status.ephemeralContainerStatuses[*]}{.name}={.state}{\"\\n\"}{end}",
        ])?;
        let agents: Vec<&str> = states
            .lines()
            .filter(|line| line.starts_with("mirrord-agent-"))
            .collect();
        if !agents.is_empty() && agents.iter().all(|line| line.contains("terminated")) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the ephemeral agent is still running after its session: {states}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
