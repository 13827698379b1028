//! `mirrord doctor`: checks, before a first session, what this machine and the cluster allow,
//! and says for each check whether it passed and how to fix it. It only looks: it creates
//! nothing in the cluster (access is asked through SelfSubjectAccessReviews) and leaves no
//! namespace or device behind on this machine. Its exit status is 0 only when a session would
//! work.
//!
//! The checks are values ([`Check`]); [`render_text`] and [`render_json`] are pure and tested;
//! the probes are thin.

use std::fmt::Write as _;
use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use mirrord_kube::access::{
    self, Need, Permission, PodSecurity, ephemeral_admission, job_admission, permissions,
    pod_security,
};
use mirrord_kube::{Cluster, Kind, TargetPath};
use serde::Serialize;

use crate::cluster_agent::{KubeSettings, cluster_configured};
use crate::target::Target;

/// Where a check looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    Local,
    Cluster,
    Target,
}

impl Section {
    fn title(self) -> &'static str {
        match self {
            Section::Local => "this machine",
            Section::Cluster => "the cluster",
            Section::Target => "the target",
        }
    }
}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// ✓
    Pass,
    /// ✗ and a session would not work.
    Fail,
    /// ! a session works, with less (the text says what).
    Warn,
}

impl Outcome {
    fn mark(self) -> char {
        match self {
            Outcome::Pass => '✓',
            Outcome::Fail => '✗',
            Outcome::Warn => '!',
        }
    }
}

/// One check and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub section: Section,
    /// What was checked, short (`/dev/net/tun`, `create jobs.batch in namespace shop`).
    pub name: String,
    pub outcome: Outcome,
    /// What was found.
    pub detail: String,
    /// The next step when it did not pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(section: Section, name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            section,
            name: name.into(),
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn not(
        outcome: Outcome,
        section: Section,
        name: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            section,
            name: name.into(),
            outcome,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Whether a session would work after these checks.
pub fn would_work(checks: &[Check]) -> bool {
    checks.iter().all(|check| check.outcome != Outcome::Fail)
}

/// The report as a person reads it: a heading per section, a line per check (the fix
/// indented below it), and a verdict.
pub fn render_text(checks: &[Check]) -> String {
    let mut out = String::new();
    let mut section = None;
    for check in checks {
        if section != Some(check.section) {
            section = Some(check.section);
            let _ = writeln!(out, "{}:", check.section.title());
        }
        let _ = writeln!(
            out,
            "  {} {}: {}",
            check.outcome.mark(),
            check.name,
            check.detail
        );
        if let Some(fix) = &check.fix {
            let _ = writeln!(out, "      fix: {fix}");
        }
    }
    let failed = checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
    if failed == 0 {
        out.push_str("a session would work\n");
    } else {
        let _ = writeln!(
            out,
            "a session would not work: {failed} check{} failed",
            if failed == 1 { "" } else { "s" }
        );
    }
    out
}

/// The report for programs: `{"ok": bool, "checks": [{section, name, outcome, detail, fix?}]}`.
pub fn render_json(checks: &[Check]) -> serde_json::Result<String> {
    let report = serde_json::json!({ "ok": would_work(checks), "checks": checks });
    Ok(format!("{}\n", serde_json::to_string_pretty(&report)?))
}

/// What doctor checks: the target (if any) and how to reach the cluster.
#[derive(Debug, Clone)]
pub struct Scope {
    pub target: Option<Target>,
    pub settings: KubeSettings,
}

/// Runs every check that applies to `scope`, in the order they are shown.
pub async fn run(scope: &Scope) -> Vec<Check> {
    let mut checks = local_checks();
    match &scope.target {
        Some(Target::Pid(pid)) => checks.push(local_target(*pid)),
        Some(Target::Kubernetes(path)) => {
            checks.extend(cluster_checks(&scope.settings, Some(path)).await)
        }
        Some(Target::Targetless) | None if cluster_configured(&scope.settings) => {
            let path = scope.target.as_ref().map(|_| TargetPath::Targetless);
            checks.extend(cluster_checks(&scope.settings, path.as_ref()).await)
        }
        Some(Target::Targetless) | None => checks.push(Check::not(
            Outcome::Warn,
            Section::Cluster,
            "kubeconfig",
            "no cluster is configured (no KUBECONFIG, ~/.kube/config or --kubeconfig)",
            "name a kubeconfig with --kubeconfig to check a cluster; pid/ targets work without one",
        )),
    }
    checks
}

/// The machine's side: namespaces, the TUN and FUSE devices, nft.
fn local_checks() -> Vec<Check> {
    vec![
        user_namespaces(),
        device(
            "/dev/net/tun",
            "the command runs without the target's network",
            "modprobe tun",
        ),
        device(
            "/dev/fuse",
            "the target's files are not shown",
            "modprobe fuse (Debian: apt install fuse3)",
        ),
        nftables(),
    ]
}

fn user_namespaces() -> Check {
    let name = "user namespaces";
    if nix::unistd::geteuid().is_root() {
        return Check::pass(Section::Local, name, "running as root, none needed");
    }
    match try_user_namespace() {
        Ok(()) => Check::pass(
            Section::Local,
            name,
            "an unprivileged user namespace can be created and mapped",
        ),
        Err(error) => Check::not(
            Outcome::Fail,
            Section::Local,
            name,
            format!("cannot create one: {error}"),
            "as root: sysctl -w kernel.unprivileged_userns_clone=1, user.max_user_namespaces=15000 or kernel.apparmor_restrict_unprivileged_userns=0 (whichever this system has), or run mirrord as root",
        ),
    }
}

/// Creates a user namespace in a child, as the launcher does, and maps this user in it (AppArmor's
/// restriction lets the unshare pass and refuses the map). The child then execs this binary's
/// `--version`, which prints to /dev/null.
fn try_user_namespace() -> io::Result<()> {
    let uid_map = format!("0 {} 1", nix::unistd::getuid());
    let mut command = Command::new("/proc/self/exe");
    command
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls are made: unshare(2),
    // open(2)/write(2)/close(2) through std's File (no allocation: the map text was formatted
    // before the fork and the path is a literal of static C string length).
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = libc::open(c"/proc/self/uid_map".as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, uid_map.as_ptr().cast(), uid_map.len());
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written < 0 {
                return Err(error);
            }
            Ok(())
        })
    };
    let status = command.status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the test child ended with {status}"
        )))
    }
}

/// Opens `path` read-write, as the launcher will. Without the device a session still runs, with
/// one warning line and without that part (`loss`), so its absence is a warning.
fn device(path: &str, loss: &str, missing_fix: &str) -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(_) => Check::pass(Section::Local, path, "can be opened read-write"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Check::not(
            Outcome::Warn,
            Section::Local,
            path,
            format!("does not exist; without it {loss}"),
            missing_fix.to_owned(),
        ),
        Err(error) => Check::not(
            Outcome::Warn,
            Section::Local,
            path,
            format!("cannot be opened read-write: {error}; without it {loss}"),
            format!(
                "sudo chmod 0666 {path} (most distributions ship it so), or run mirrord as root"
            ),
        ),
    }
}

/// `nft`, which a local agent (pid/ targets) runs to redirect incoming traffic.
fn nftables() -> Check {
    let program = std::env::var_os("MIRRORD_AGENT_NFT").unwrap_or_else(|| "nft".into());
    match Command::new(&program)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => Check::pass(
            Section::Local,
            "nftables",
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ),
        result => {
            let why = match result {
                Ok(out) => format!("`nft --version` ended with {}", out.status),
                Err(error) => format!("nft cannot be run: {error}"),
            };
            Check::not(
                Outcome::Warn,
                Section::Local,
                "nftables",
                format!("{why}; pid/ targets get no incoming traffic without it"),
                "install nft (Debian: apt install nftables)",
            )
        }
    }
}

/// A local target: the process must exist.
fn local_target(pid: u32) -> Check {
    let name = format!("pid/{pid}");
    match std::fs::read_to_string(format!("/proc/{pid}/comm")) {
        Ok(comm) => Check::pass(Section::Target, name, format!("process {}", comm.trim())),
        Err(error) => Check::not(
            Outcome::Fail,
            Section::Target,
            name,
            format!("no such process here: {error}"),
            "name a running process (pgrep NAME)",
        ),
    }
}

/// The cluster's side: reachable, every permission, Pod Security, and the target.
async fn cluster_checks(settings: &KubeSettings, target: Option<&TargetPath>) -> Vec<Check> {
    let mut checks = Vec::new();
    let cluster =
        match Cluster::connect(settings.kubeconfig.as_deref(), settings.context.as_deref()).await {
            Ok(cluster) => cluster,
            Err(error) => {
                checks.push(Check::not(
                    Outcome::Fail,
                    Section::Cluster,
                    "API server",
                    error.to_string(),
                    "check the kubeconfig and its context (kubectl cluster-info)",
                ));
                return checks;
            }
        };
    checks.push(Check::pass(
        Section::Cluster,
        "API server",
        format!(
            "{} answers, version {}",
            cluster.server(),
            cluster.version()
        ),
    ));
    let namespace = settings
        .namespace
        .clone()
        .unwrap_or_else(|| cluster.namespace().to_owned());
    let agent_namespace = settings
        .agent_namespace
        .clone()
        .unwrap_or_else(|| namespace.clone());
    // Without a target, what any pod target needs.
    let kind = match target {
        Some(TargetPath::Object { kind, .. }) => Some(*kind),
        Some(TargetPath::Targetless) => None,
        None => Some(Kind::Pod),
    };
    let targetless = kind.is_none();
    let ephemeral = settings.ephemeral && !targetless;
    let wanted = permissions(kind, &namespace, &agent_namespace, ephemeral);
    let answers =
        futures_util::future::join_all(wanted.iter().map(|permission| cluster.can_i(permission)))
            .await;
    for (permission, answer) in wanted.iter().zip(answers) {
        checks.push(permission_check(permission, answer));
    }
    checks.push(match ephemeral {
        true => admission_check(&cluster, &namespace, Agent::Ephemeral).await,
        false if targetless => admission_check(&cluster, &agent_namespace, Agent::Targetless).await,
        false => admission_check(&cluster, &agent_namespace, Agent::Job).await,
    });
    if let Some(path @ TargetPath::Object { .. }) = target {
        checks.push(match cluster.resolve(path, Some(&namespace)).await {
            Ok(resolved) => {
                let detail = match &resolved.pod {
                    Some(pod) => format!(
                        "pod {} (container {}) on node {}, runtime {}",
                        pod.pod,
                        pod.container.name,
                        pod.node,
                        runtime(&pod.container.id)
                    ),
                    None => "targetless".to_owned(),
                };
                Check::pass(Section::Target, path.to_string(), detail)
            }
            Err(error) => Check::not(
                Outcome::Fail,
                Section::Target,
                path.to_string(),
                error.to_string(),
                format!("list the namespace's targets with: mirrord ls -n {namespace}"),
            ),
        });
    }
    checks
}

/// `containerd` from `containerd://0123…`.
fn runtime(container_id: &str) -> &str {
    container_id
        .split_once("://")
        .map_or("unknown", |(runtime, _)| runtime)
}

fn permission_check(
    permission: &Permission,
    answer: Result<Result<(), Option<String>>, mirrord_kube::Error>,
) -> Check {
    let name = permission.to_string();
    let (outcome, consequence) = match permission.need {
        Need::Required => (
            Outcome::Fail,
            "a session cannot start without it".to_owned(),
        ),
        Need::Optional(loss) => (Outcome::Warn, format!("without it {loss}")),
    };
    match answer {
        Ok(Ok(())) => Check::pass(Section::Cluster, name, "allowed"),
        Ok(Err(reason)) => Check::not(
            outcome,
            Section::Cluster,
            name,
            match reason {
                Some(reason) => format!("denied ({reason}); {consequence}"),
                None => format!("denied; {consequence}"),
            },
            format!(
                "ask an admin for a Role granting {} on {}; check with: {}",
                permission.verb,
                permission.resource_name(),
                permission.can_i()
            ),
        ),
        Err(error) => Check::not(
            outcome,
            Section::Cluster,
            name,
            format!("cannot be asked: {error}"),
            format!("check with: {}", permission.can_i()),
        ),
    }
}

/// The agent a session would start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    /// A Job beside the target, on its node.
    Job,
    /// A Job of its own, for a targetless session.
    Targetless,
    /// An ephemeral container in the target's pod.
    Ephemeral,
}

/// Whether the namespace's Pod Security level admits the agent; where it refuses the Job but
/// would admit an ephemeral agent, the fix says so.
async fn admission_check(cluster: &Cluster, namespace: &str, agent: Agent) -> Check {
    let name = format!("Pod Security of namespace {namespace}");
    let labels = match cluster.namespace_labels(namespace).await {
        Ok(Some(labels)) => labels,
        Ok(None) => {
            return Check::not(
                Outcome::Fail,
                Section::Cluster,
                name,
                "the namespace does not exist",
                "name an existing namespace with -n (kubectl get namespaces)",
            );
        }
        Err(error) => {
            return Check::not(
                Outcome::Warn,
                Section::Cluster,
                name,
                format!("unknown: {error}"),
                format!(
                    "ask an admin for the namespace's {} label",
                    access::ENFORCE_LABEL
                ),
            );
        }
    };
    let PodSecurity { level, labelled } = pod_security(Some(&labels));
    let source = if labelled {
        format!("{level}")
    } else {
        format!(
            "{level} (no {} label; a cluster-wide default may differ)",
            access::ENFORCE_LABEL
        )
    };
    let to_privileged = format!(
        "run the agent in a namespace at privileged (agent.namespace in the config file), or ask an admin to label this one {}=privileged",
        access::ENFORCE_LABEL
    );
    match agent {
        Agent::Ephemeral => match ephemeral_admission(level) {
            Ok(()) if level == access::Level::Privileged => Check::pass(
                Section::Cluster,
                name,
                format!("{source}: the ephemeral agent is admitted"),
            ),
            Ok(()) => Check::pass(
                Section::Cluster,
                name,
                format!(
                    "{source}: the ephemeral agent is admitted, without NET_ADMIN (no incoming traffic)"
                ),
            ),
            Err(refusal) => Check::not(
                Outcome::Fail,
                Section::Cluster,
                name,
                format!("{source}: the ephemeral agent would be refused ({refusal})"),
                to_privileged,
            ),
        },
        Agent::Job | Agent::Targetless => match job_admission(level, agent == Agent::Job) {
            Ok(()) => Check::pass(
                Section::Cluster,
                name,
                format!("{source}: the agent Job is admitted"),
            ),
            Err(refusal) => Check::not(
                Outcome::Fail,
                Section::Cluster,
                name,
                format!("{source}: the agent Job would be refused ({refusal})"),
                match (agent, ephemeral_admission(level)) {
                    (Agent::Job, Ok(())) => format!(
                        "run with --ephemeral (agent.ephemeral), which this level admits; or {to_privileged}"
                    ),
                    _ => to_privileged,
                },
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Check> {
        vec![
            Check::pass(Section::Local, "/dev/net/tun", "can be opened read-write"),
            Check::not(
                Outcome::Warn,
                Section::Local,
                "nftables",
                "nft cannot be run: not found",
                "install nft",
            ),
            Check::not(
                Outcome::Fail,
                Section::Cluster,
                "create jobs.batch in namespace shop",
                "denied; a session cannot start without it",
                "check with: kubectl auth can-i create jobs.batch -n shop",
            ),
        ]
    }

    #[test]
    fn text_has_a_line_per_check_its_fix_and_a_verdict() {
        assert_eq!(
            render_text(&sample()),
            "this machine:\n\
             \x20 ✓ /dev/net/tun: can be opened read-write\n\
             \x20 ! nftables: nft cannot be run: not found\n\
             \x20     fix: install nft\n\
             the cluster:\n\
             \x20 ✗ create jobs.batch in namespace shop: denied; a session cannot start without it\n\
             \x20     fix: check with: kubectl auth can-i create jobs.batch -n shop\n\
             a session would not work: 1 check failed\n"
        );
        assert!(render_text(&sample()[..2]).ends_with("a session would work\n"));
    }

    #[test]
    fn json_carries_every_check_and_the_verdict() {
        let json: serde_json::Value =
            serde_json::from_str(&render_json(&sample()).unwrap()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["checks"][0]["section"], "local");
        assert_eq!(json["checks"][0]["outcome"], "pass");
        assert!(json["checks"][0].get("fix").is_none());
        assert_eq!(json["checks"][1]["outcome"], "warn");
        assert_eq!(json["checks"][2]["outcome"], "fail");
        assert_eq!(
            json["checks"][2]["name"],
            "create jobs.batch in namespace shop"
        );
        assert!(would_work(&sample()[..2]));
    }

    #[test]
    fn the_runtime_is_the_container_ids_scheme() {
        assert_eq!(runtime("containerd://0123abcd"), "containerd");
        assert_eq!(runtime("mrdc://ff"), "mrdc");
        assert_eq!(runtime(""), "unknown");
    }

    #[test]
    fn a_missing_device_and_a_refused_one_have_their_fixes() {
        let missing = device(
            "/nonexistent/mirrord-device",
            "something is lost",
            "modprobe x",
        );
        assert_eq!(missing.outcome, Outcome::Warn);
        assert_eq!(
            missing.detail,
            "does not exist; without it something is lost"
        );
        assert_eq!(missing.fix.as_deref(), Some("modprobe x"));
        assert_eq!(local_target(u32::MAX).outcome, Outcome::Fail);
        assert_eq!(local_target(std::process::id()).outcome, Outcome::Pass);
    }
}
