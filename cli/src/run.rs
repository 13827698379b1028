//! The `exec`, `shell` and `env` commands: reach the agent (starting one for local targets),
//! learn the target's context, and launch the user's command in it. Everything started here is
//! stopped before returning, whatever the outcome.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use mirrord_kube::TargetPath;
use mirrord_link::endpoint::Endpoint;
use mirrord_protocol::TargetInfo;
use mirrord_routing::rules::OutgoingFilter;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::args::{
    CompletionShell, DoctorArgs, DoctorFormat, EnvFormat, ListArgs, ListFormat, SessionArgs,
};
use crate::client::{AgentClient, lock};
use crate::cluster_agent::{self, ClusterAgent, KubeSettings, Starting};
use crate::config::{
    Config, DnsFeature, EnvFeature, FilterConfig, FsFeature, FsModeName, OutgoingFeature,
    PatternList, TargetConfig,
};
use crate::dns;
use crate::dns::{DnsSettings, NameFilter, NameRule};
use crate::doctor;
use crate::envfilter::{self, EnvFilter, Patterns};
use crate::exit::Failure;
use crate::generated::GeneratedFile;
use crate::incoming::{self, IncomingFlags, IncomingSettings};
use crate::launcher::{self, Launch};
use crate::listeners::DiagSocket;
use crate::local_agent::LocalAgent;
use crate::net::{self, NetSettings};
use crate::output;
use crate::remote_fs::{self, FsMode, FsSettings, MountPoint};
use crate::target::Target;

/// What the command has once the agent is lost, for the one line that says so (docs/faults.md).
const LOST_AGENT_LEFT: &str = "the command keeps running without the target: it keeps the pod's environment, while the pod's files, DNS and network now fail at once";

/// Default idle TTL of a locally started agent, in seconds: a backstop, the CLI stops it anyway.
const LOCAL_AGENT_TTL: u64 = 60;

/// How a session reaches its agent.
enum AgentSource {
    Local {
        target: Target,
        idle_ttl: u64,
    },
    Remote {
        addr: Endpoint,
        token: Vec<u8>,
    },
    Cluster {
        target: TargetPath,
        settings: KubeSettings,
    },
}

/// A connected session: the agent we may have started, and the client talking to it.
pub struct Session {
    local_agent: Option<LocalAgent>,
    cluster_agent: Option<ClusterAgent>,
    /// What the session serves, for the shell prompt: `pid/123`, `deployment/web`, …
    label: String,
    pub client: Arc<AgentClient>,
    pub info: TargetInfo,
    pub filter: EnvFilter,
    pub fs: FsSettings,
    pub net: NetSettings,
    pub dns: DnsSettings,
    pub incoming: IncomingSettings,
    /// Ctrl-C and SIGTERM, watched from before the agent starts until the launcher takes them
    /// over (taken by [`run_launch`]).
    stops: Option<Stops>,
}

/// Ctrl-C and SIGTERM while mirrord sets a session up.
struct Stops {
    interrupt: Signal,
    terminate: Signal,
}

impl Stops {
    fn watch() -> anyhow::Result<Stops> {
        Ok(Stops {
            interrupt: signal(SignalKind::interrupt()).context("cannot watch for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot watch for SIGTERM")?,
        })
    }

    /// Whether a Ctrl-C came and was not yet taken, without waiting.
    async fn interrupted_meanwhile(stops: Option<&mut Stops>) -> bool {
        let Some(stops) = stops else {
            return false;
        };
        tokio::select! {
            biased;
            _ = stops.interrupt.recv() => true,
            () = std::future::ready(()) => false,
        }
    }

    /// The failure the next of them means; never, without watchers.
    async fn next_of(stops: Option<&mut Stops>) -> Failure {
        let Some(stops) = stops else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = stops.interrupt.recv() => Failure::interrupted(),
            _ = stops.terminate.recv() => Failure::terminated(),
        }
    }
}

impl Session {
    /// Resolves flags and config, connects and fetches the target's context. Ctrl-C or SIGTERM
    /// meanwhile stops whatever was started and fails with [`Failure::interrupted`] or
    /// [`Failure::terminated`].
    pub async fn open(args: &SessionArgs) -> Result<Session, Failure> {
        let config = load_config(args.config_file.as_deref())?;
        let source = agent_source(args, &config)?;
        let mut filter = env_filter(args, &config);
        filter.overrides = with_env_files(args, &config, filter.overrides)?;
        let fs = fs_settings(args, &config);
        let net = net_settings(args, &config)?;
        let dns = dns_settings(args, &config)?;
        let incoming = incoming_settings(args, &config)?;
        let starting = Starting::default();
        let mut stops = Stops::watch()?;
        let stopped = tokio::select! {
            session = Self::connect(source, filter, fs, net, dns, incoming, &starting) => {
                let mut session = session?;
                session.stops = Some(stops);
                return Ok(session);
            }
            failure = Stops::next_of(Some(&mut stops)) => failure,
        };
        // Dropping the connecting future stopped a local agent it started (kill on drop); a
        // cluster agent being started is deleted here.
        let pending = lock(&starting).take();
        if let Some(agent) = pending {
            agent.delete().await;
        }
        Err(stopped)
    }

    async fn connect(
        source: AgentSource,
        filter: EnvFilter,
        fs: FsSettings,
        mut net: NetSettings,
        dns: DnsSettings,
        incoming: IncomingSettings,
        starting: &Starting,
    ) -> anyhow::Result<Session> {
        let (local_agent, cluster_agent, client, label) = match source {
            AgentSource::Local { target, idle_ttl } => {
                let agent = LocalAgent::start(&target, idle_ttl).await?;
                match AgentClient::connect(&agent.addr, &agent.token).await {
                    Ok(client) => (Some(agent), None, client, target.to_string()),
                    Err(error) => {
                        agent.stop().await;
                        return Err(error.into());
                    }
                }
            }
            AgentSource::Remote { addr, token } => {
                let client = AgentClient::connect(&addr, &token).await?;
                (None, None, client, String::new())
            }
            AgentSource::Cluster { target, settings } => {
                let started = cluster_agent::start(&target, &settings, starting).await?;
                net.cidrs.extend(started.cidrs);
                let label = match target {
                    TargetPath::Targetless => "targetless".to_owned(),
                    target => target.to_string(),
                };
                (None, Some(started.agent), started.client, label)
            }
        };
        let info = match client.target_info().await {
            Ok(info) => info,
            Err(error) => {
                if let Some(agent) = local_agent {
                    agent.stop().await;
                }
                if let Some(agent) = cluster_agent {
                    agent.delete().await;
                }
                return Err(anyhow::Error::new(error).context("cannot read the target's context"));
            }
        };
        // An agent started by hand says what it serves.
        let label = match (label.is_empty(), info.pid) {
            (false, _) => label,
            (true, Some(pid)) => Target::Pid(pid).to_string(),
            (true, None) => Target::Targetless.to_string(),
        };
        Ok(Session {
            local_agent,
            cluster_agent,
            label,
            client: Arc::new(client),
            info,
            filter,
            fs,
            net,
            dns,
            incoming,
            stops: None,
        })
    }

    /// What the session serves: `pid/123`, `deployment/web`, `targetless`.
    pub fn label(&self) -> String {
        self.label.clone()
    }

    /// The launched process's environment: local, overlaid with the target's filtered one.
    pub fn launch_env(&self) -> Vec<(OsString, OsString)> {
        let local: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
            .collect();
        let mut env: Vec<(OsString, OsString)> =
            envfilter::compose(&local, &self.info.env, &self.filter)
                .into_iter()
                .map(|(name, value)| (name.into(), value.into()))
                .collect();
        // Local variables that are not UTF-8 were skipped by compose; keep them unchanged.
        env.extend(
            std::env::vars_os()
                .filter(|(name, value)| name.to_str().is_none() || value.to_str().is_none()),
        );
        env.push(("MIRRORD_TARGET".into(), self.label().into()));
        env
    }

    pub async fn close(self) {
        drop(self.client);
        if let Some(agent) = self.local_agent {
            agent.stop().await;
        }
        if let Some(agent) = self.cluster_agent {
            agent.delete().await;
        }
    }
}

fn agent_source(args: &SessionArgs, config: &Config) -> anyhow::Result<AgentSource> {
    if let Some(addr) = &args.agent_addr {
        let Some(token) = args
            .agent_token
            .as_deref()
            .filter(|token| !token.is_empty())
        else {
            bail!(
                "--agent-addr needs the agent's token: pass --agent-token or set MIRRORD_AGENT_TOKEN"
            );
        };
        let addr = addr
            .parse()
            .map_err(|error| anyhow::anyhow!("--agent-addr: {error}"))?;
        return Ok(AgentSource::Remote {
            addr,
            token: token.trim().as_bytes().to_vec(),
        });
    }
    let target = match (
        &args.target,
        config.target.as_ref().and_then(|target| target.path()),
    ) {
        (Some(target), _) => target.as_str(),
        (None, Some(target)) => target,
        (None, None) => bail!(
            "no target: pass -t deployment/NAME (or pod/NAME, pid/PID, targetless…), set \"target\" in the config file, or use --agent-addr"
        ),
    };
    let target: Target = target.parse()?;
    let settings = kube_settings(args, config);
    Ok(match target {
        Target::Kubernetes(target) => AgentSource::Cluster { target, settings },
        Target::Targetless if cluster_agent::cluster_configured(&settings) => {
            AgentSource::Cluster {
                target: TargetPath::Targetless,
                settings,
            }
        }
        target => AgentSource::Local {
            target,
            idle_ttl: config.agent.ttl.unwrap_or(LOCAL_AGENT_TTL),
        },
    })
}

/// The config file (the given one, else the default if it exists), its warnings printed.
fn load_config(explicit: Option<&Path>) -> Result<Config, crate::config::ConfigError> {
    let (config, warnings) = Config::load(explicit)?;
    for warning in warnings {
        output::warn(format!("config: {warning}"));
    }
    Ok(config)
}

/// Which cluster, context and namespace, flags over the config file: the namespace is the
/// flag's, else the config target's; the agent's namespace the config's.
fn cluster_settings(
    kubeconfig: Option<&PathBuf>,
    context: Option<&String>,
    namespace: Option<&String>,
    config: &Config,
) -> KubeSettings {
    KubeSettings {
        kubeconfig: kubeconfig.or(config.kubeconfig.as_ref()).cloned(),
        context: context.or(config.kube_context.as_ref()).cloned(),
        namespace: namespace.cloned().or_else(|| {
            config
                .target
                .as_ref()
                .and_then(|target| target.namespace().map(str::to_owned))
        }),
        agent_namespace: config.agent.namespace.clone(),
        ..KubeSettings::default()
    }
}

/// Flags over the config file.
pub fn kube_settings(args: &SessionArgs, config: &Config) -> KubeSettings {
    let agent = &config.agent;
    KubeSettings {
        image: args.agent_image.clone().or_else(|| agent.image.clone()),
        startup_timeout: agent.startup_timeout.map(Duration::from_secs),
        communication_timeout: agent.communication_timeout,
        job_ttl: agent.ttl,
        privileged: agent.privileged.unwrap_or(false),
        ephemeral: args.ephemeral || agent.ephemeral.unwrap_or(false),
        verbose: args.verbose,
        ..cluster_settings(
            args.kubeconfig.as_ref(),
            args.context.as_ref(),
            args.target_namespace.as_ref(),
            config,
        )
    }
}

/// The variables of the `.env` files (`--env-file`, else the config's `feature.env.env_file`)
/// go under `overrides` (the config's `override` and `--env`, which win); a later file wins
/// over an earlier one.
fn with_env_files(
    args: &SessionArgs,
    config: &Config,
    overrides: Vec<(String, String)>,
) -> anyhow::Result<Vec<(String, String)>> {
    let files: Vec<PathBuf> = if args.env_file.is_empty() {
        match &config.feature.env {
            EnvFeature::Detailed(env) => env.env_file.iter().cloned().collect(),
            EnvFeature::Enabled(_) => Vec::new(),
        }
    } else {
        args.env_file.clone()
    };
    let mut merged: Vec<(String, String)> = Vec::new();
    for file in &files {
        let entries = dotenvy::from_path_iter(file).with_context(|| {
            format!(
                "cannot read the env file {}; check the path given to --env-file",
                file.display()
            )
        })?;
        for entry in entries {
            let (name, value) = entry.map_err(|error| {
                anyhow!(
                    "the env file {} is not valid: {error}; write one NAME=value a line",
                    file.display()
                )
            })?;
            merged.retain(|(known, _)| *known != name);
            merged.push((name, value));
        }
    }
    merged.retain(|(name, _)| !overrides.iter().any(|(winner, _)| winner == name));
    merged.extend(overrides);
    Ok(merged)
}

/// What a session would refuse in the config file before starting anything: the target's
/// form, the filters, the incoming settings. `verify-config` reports it.
pub fn check_config(config: &Config) -> anyhow::Result<()> {
    let args = SessionArgs::default();
    if let Some(target) = config.target.as_ref().and_then(|target| target.path()) {
        target.parse::<Target>()?;
    }
    net_settings(&args, config)?;
    dns_settings(&args, config)?;
    incoming_settings(&args, config)?;
    Ok(())
}

/// `mirrord port-forward`: forwards until Ctrl-C or SIGTERM (0), or until the agent is lost.
/// Without a target anywhere, the session is targetless.
pub async fn port_forward(args: &crate::args::PortForwardArgs) -> Result<i32, Failure> {
    let mut session_args = args.session();
    if session_args.target.is_none() && session_args.agent_addr.is_none() {
        let (config, _) = Config::load(args.config_file.as_deref())?;
        if config
            .target
            .as_ref()
            .and_then(|target| target.path())
            .is_none()
        {
            session_args.target = Some(Target::Targetless.to_string());
        }
    }
    let session = Session::open(&session_args).await?;
    let served =
        crate::forward::serve(session.client.clone(), &args.forwards, &session.label()).await;
    session.close().await;
    served?;
    Ok(0)
}

/// `mirrord verify-config`: the report on stdout; 0 when valid, 1 when not.
pub fn verify_config(path: &Path, resolved: bool) -> Result<i32, Failure> {
    let (report, code) = crate::verify::verify(path, resolved);
    output::stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    Ok(code)
}

/// `mirrord completions SHELL`: the script on stdout.
pub fn completions(shell: CompletionShell) -> Result<i32, Failure> {
    let mut script = Vec::new();
    crate::completion::script(shell, &mut script)?;
    output::stdout(&String::from_utf8_lossy(&script))?;
    Ok(0)
}

/// `mirrord man-pages DIR`: one page per command, named on stdout.
pub fn man_pages(dir: &Path) -> Result<i32, Failure> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create {}; choose a directory you can write to",
            dir.display()
        )
    })?;
    clap_mangen::generate_to(crate::args::command(), dir).with_context(|| {
        format!(
            "cannot write the man pages into {}; choose a directory you can write to",
            dir.display()
        )
    })?;
    Ok(0)
}

/// Flags win over the config file, key by key; `--env` overrides win over the file's.
fn env_filter(args: &SessionArgs, config: &Config) -> EnvFilter {
    let (include, exclude, mut overrides) = match &config.feature.env {
        EnvFeature::Enabled(true) => (None, None, Vec::new()),
        // `"env": false`: take nothing from the target (an empty include matches nothing).
        EnvFeature::Enabled(false) => (Some(String::new()), None, Vec::new()),
        EnvFeature::Detailed(env) => (
            env.include.as_ref().map(|list| list.joined()),
            env.exclude.as_ref().map(|list| list.joined()),
            env.overrides
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        ),
    };
    let include = args.override_env_vars_include.clone().or(include);
    let exclude = args.override_env_vars_exclude.clone().or(exclude);
    overrides.retain(|(name, _)| !args.env.iter().any(|(flag_name, _)| flag_name == name));
    overrides.extend(args.env.iter().cloned());
    EnvFilter {
        include: include.map(|patterns| Patterns::parse(&patterns)),
        exclude: exclude.map(|patterns| Patterns::parse(&patterns)),
        overrides,
    }
}

/// Flags win over the config file: `--fs-mode` over `feature.fs.mode`; overlays add up.
fn fs_settings(args: &SessionArgs, config: &Config) -> FsSettings {
    let entries = |list: &Option<PatternList>| -> Vec<PathBuf> {
        list.as_ref()
            .map(|list| list.entries().into_iter().map(PathBuf::from).collect())
            .unwrap_or_default()
    };
    let (mode, read_only, read_write, local, xattrs) = match &config.feature.fs {
        FsFeature::Mode(mode) => (Some(*mode), Vec::new(), Vec::new(), Vec::new(), false),
        FsFeature::Detailed(fs) => (
            fs.mode,
            entries(&fs.read_only),
            entries(&fs.read_write),
            entries(&fs.local),
            fs.xattrs.unwrap_or(false),
        ),
    };
    let file_mode = match mode {
        Some(FsModeName::Local | FsModeName::LocalWithOverrides) => FsMode::Local,
        Some(FsModeName::Write) => FsMode::Write,
        Some(FsModeName::Read) | None => FsMode::Read,
    };
    // Writable overlays need a writable mount.
    let file_mode = if read_write.is_empty() {
        file_mode
    } else {
        FsMode::Write
    };
    let mut overlays = args.fs_remote.clone();
    overlays.extend(read_only);
    overlays.extend(read_write);
    FsSettings {
        mode: args.fs_mode.unwrap_or(file_mode),
        overlays,
        local,
        xattrs: args.fs_xattrs || xattrs,
    }
}

/// Flags win over the config file: `--no-outgoing` / `--no-udp` over `feature.network.outgoing`;
/// `--cidr` ranges add to the target's own subnets.
fn net_settings(args: &SessionArgs, config: &Config) -> anyhow::Result<NetSettings> {
    let mut settings = NetSettings {
        cidrs: args.cidr.clone(),
        ..NetSettings::default()
    };
    match &config.feature.network.outgoing {
        OutgoingFeature::Enabled(enabled) => settings.outgoing = *enabled,
        OutgoingFeature::Detailed(outgoing) => {
            settings.udp = outgoing.udp.unwrap_or(true);
            settings.filter = match filter_side(&outgoing.filter, "outgoing")? {
                None => None,
                Some((true, entries)) => Some(OutgoingFilter::Remote(entries)),
                Some((false, entries)) => Some(OutgoingFilter::Local(entries)),
            };
        }
    }
    settings.outgoing &= !args.no_outgoing;
    settings.udp &= !args.no_udp;
    Ok(settings)
}

/// `feature.network.FEATURE.filter`: `(true, entries)` for `remote`, `(false, entries)` for
/// `local`; both or neither is an error.
fn filter_side(
    filter: &Option<FilterConfig>,
    feature: &str,
) -> anyhow::Result<Option<(bool, Vec<String>)>> {
    match filter {
        None => Ok(None),
        Some(FilterConfig {
            remote: Some(remote),
            local: None,
        }) => Ok(Some((true, remote.clone()))),
        Some(FilterConfig {
            remote: None,
            local: Some(local),
        }) => Ok(Some((false, local.clone()))),
        Some(_) => {
            bail!("feature.network.{feature}.filter takes exactly one of \"remote\" or \"local\"")
        }
    }
}

/// `--no-incoming`, `--steal` and `-p` over `feature.network.incoming`; a bad filter fails
/// here, before anything starts.
fn incoming_settings(args: &SessionArgs, config: &Config) -> anyhow::Result<IncomingSettings> {
    let flags = IncomingFlags {
        steal: args.steal,
        off: args.no_incoming,
        port_mapping: args.port_mapping.clone(),
    };
    Ok(IncomingSettings::new(
        &config.feature.network.incoming,
        &flags,
    )?)
}

/// `--no-dns` wins over `feature.network.dns`; a filter entry that is not a name is an error
/// before anything starts.
fn dns_settings(args: &SessionArgs, config: &Config) -> anyhow::Result<DnsSettings> {
    let mut settings = DnsSettings::default();
    match &config.feature.network.dns {
        DnsFeature::Enabled(enabled) => settings.enabled = *enabled,
        DnsFeature::Detailed(dns) => {
            settings.enabled = dns.enabled.unwrap_or(true);
            settings.rule = match filter_side(&dns.filter, "dns")? {
                None => None,
                Some((true, entries)) => Some(NameRule::Remote(entries)),
                Some((false, entries)) => Some(NameRule::Local(entries)),
            };
            if let Some(rule) = &settings.rule {
                NameFilter::parse(rule)?;
            }
        }
    }
    settings.enabled &= !args.no_dns;
    Ok(settings)
}

/// `mirrord exec`: returns the command's exit status.
pub async fn exec(args: &SessionArgs, command: &[OsString]) -> Result<i32, Failure> {
    let Some((program, program_args)) = command.split_first() else {
        return Err(anyhow!("no command given after --").into());
    };
    let session = Session::open(args).await?;
    let launch = Launch {
        program: program.clone(),
        args: program_args.to_vec(),
        env: session.launch_env(),
        hostname: session.info.hostname.clone(),
        ..Launch::default()
    };
    run_launch(session, launch).await
}

/// `mirrord shell`: returns the shell's exit status.
pub async fn shell(args: &SessionArgs, shell_args: &[OsString]) -> Result<i32, Failure> {
    let session = Session::open(args).await?;
    let shell = std::env::var_os("SHELL")
        .filter(|shell| !shell.is_empty())
        .unwrap_or_else(|| "/bin/sh".into());
    let launch = launcher::shell_launch(
        &PathBuf::from(shell),
        &session.label(),
        shell_args.to_vec(),
        session.launch_env(),
        session.info.hostname.clone(),
    );
    let launch = match launch {
        Ok(launch) => launch,
        Err(error) => {
            session.close().await;
            return Err(Failure::launch(error));
        }
    };
    run_launch(session, launch).await
}

/// What a launch needs besides the command: the remote root's mount point (the mount itself
/// is made in the command's namespace), the generated `/etc/hosts` and `/etc/resolv.conf`, and
/// the network. Dropping any of it undoes it, so the future may be cancelled at any await.
async fn prepare_launch(
    session: &Session,
    launch: &mut Launch,
) -> Result<(Option<MountPoint>, Vec<GeneratedFile>, Option<net::Network>), Failure> {
    let extra_hosts = [(IpAddr::V4(net::HOST_LOOPBACK), net::HOST_LOOPBACK_NAME)];
    let remote_root = match remote_fs::prepare(&session.client, &session.fs).await {
        Some((fuse, mountpoint)) => {
            launch
                .env
                .push(("MIRRORD_REMOTE_ROOT".into(), mountpoint.path().into()));
            launch.fuse = Some(fuse);
            Some(mountpoint)
        }
        None => None,
    };
    let mut generated: Vec<GeneratedFile> = Vec::new();
    match remote_fs::hosts_text(&session.client, launch.fuse.as_mut(), &extra_hosts).await {
        Ok(text) => match GeneratedFile::write("hosts", Path::new("/etc/hosts"), &text) {
            Ok(file) => generated.push(file),
            Err(error) => tracing::debug!("no generated /etc/hosts: {error}"),
        },
        Err(error) => tracing::debug!("no generated /etc/hosts: {error}"),
    }
    let network = match net::prepare(&session.info, &session.net)? {
        Some((plan, mut network)) => {
            launch.tun = Some(plan);
            if session.dns.enabled {
                let conf = dns::target_resolv_conf(&session.client).await;
                let resolv_conf = Path::new("/etc/resolv.conf");
                match GeneratedFile::write("resolv.conf", resolv_conf, &conf.render()) {
                    Ok(file) => {
                        generated.push(file);
                        let filter = session.dns.rule.as_ref().map(NameFilter::parse);
                        network.serve_dns(session.client.clone(), filter.transpose()?, &conf);
                    }
                    Err(error) => crate::output::warn(format!(
                        "cannot give the command its own {}: {error}; names resolve as on this machine",
                        resolv_conf.display()
                    )),
                }
            }
            Some(network)
        }
        None => None,
    };
    Ok((remote_root, generated, network))
}

async fn run_launch(mut session: Session, mut launch: Launch) -> Result<i32, Failure> {
    // Until the launcher takes them over, Ctrl-C and SIGTERM stop the setup: tokio keeps its
    // handlers for the life of the process, so a signal nobody waits for would be swallowed
    // and the command started anyway.
    let mut stops = session.stops.take();
    let prepared = tokio::select! {
        prepared = prepare_launch(&session, &mut launch) => prepared,
        failure = Stops::next_of(stops.as_mut()) => Err(failure),
    };
    let (remote_root, generated, network) = match prepared {
        Ok(prepared) => prepared,
        Err(failure) => {
            session.close().await;
            return Err(failure);
        }
    };
    launch.files = generated.iter().map(GeneratedFile::bind).collect();
    let spawned = launcher::spawn(launch);
    // Bound (and removed) by the command's setup, or never to be: either way done with.
    drop(generated);
    let status = match spawned {
        Ok(child) => {
            if Stops::interrupted_meanwhile(stops.as_mut()).await {
                // Ctrl-C between the end of the setup and the fork reached mirrord alone; one
                // after the fork reached the command too, and a second is harmless.
                // SAFETY: kill(2) on our own child, not reaped yet.
                unsafe { libc::kill(child.pid() as libc::pid_t, libc::SIGINT) };
            }
            let mut incoming = None;
            if let Some(network) = network {
                match network.serve(session.client.clone()) {
                    Ok(served) if session.incoming.mode.is_some() => {
                        match DiagSocket::new(served.listener_socket) {
                            Ok(diag) => {
                                incoming = Some(incoming::start(
                                    session.client.clone(),
                                    session.incoming.clone(),
                                    diag,
                                    served.originator,
                                    served.app,
                                ))
                            }
                            Err(error) => crate::output::warn(format!(
                                "cannot follow the command's listening ports ({error}); it gets no incoming traffic"
                            )),
                        }
                    }
                    Ok(_) => {}
                    // A command that ended before handing its device over (Ctrl-C during its
                    // setup) needs no word about its network.
                    Err(_) if child.exits_within(Duration::from_millis(100)).await => {}
                    Err(error) => output::warn(format!(
                        "{error}; the command runs without the target's network"
                    )),
                }
            }
            if let Some(mountpoint) = &remote_root {
                remote_fs::raise_readahead(child.pid(), mountpoint.path());
            }
            let wait = child.wait();
            tokio::pin!(wait);
            let refused = async {
                match &incoming {
                    Some(incoming) => incoming.failed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                status = &mut wait => status.map_err(Failure::launch),
                reason = session.client.lost() => {
                    crate::output::error(format!("lost the agent ({reason}); {LOST_AGENT_LEFT}"));
                    wait.await.map_err(Failure::launch)
                }
                // Returning drops `wait`, which kills the command.
                reason = refused => Err(anyhow!("{reason}; the command was stopped").into()),
            }
        }
        Err(error) => Err(Failure::launch(error)),
    };
    session.close().await;
    drop::<Option<MountPoint>>(remote_root);
    status
}

/// `mirrord ls`: prints the targets of a namespace, or of all with `-A`.
pub async fn ls(args: &ListArgs) -> Result<i32, Failure> {
    let config = load_config(args.config_file.as_deref())?;
    let settings = KubeSettings {
        kubeconfig: args
            .kubeconfig
            .clone()
            .or_else(|| config.kubeconfig.clone()),
        context: args.context.clone().or_else(|| config.kube_context.clone()),
        namespace: args.namespace.clone(),
        ..KubeSettings::default()
    };
    let targets = cluster_agent::list(&settings, args.all_namespaces).await?;
    let out = match (args.output, args.all_namespaces) {
        (ListFormat::Text, false) => targets
            .iter()
            .map(|(_, path)| format!("{path}\n"))
            .collect(),
        (ListFormat::Text, true) => targets
            .iter()
            .map(|(namespace, path)| format!("{namespace}\t{path}\n"))
            .collect(),
        (ListFormat::Json, false) => {
            let paths: Vec<&str> = targets.iter().map(|(_, path)| path.as_str()).collect();
            format!("{}\n", serde_json::to_string(&paths)?)
        }
        (ListFormat::Json, true) => {
            let objects: Vec<serde_json::Value> = targets
                .iter()
                .map(|(namespace, path)| serde_json::json!({"namespace": namespace, "path": path}))
                .collect();
            format!("{}\n", serde_json::to_string(&objects)?)
        }
    };
    output::stdout(&out)?;
    Ok(0)
}

/// `mirrord doctor`: runs the checks, prints them, and exits 0 only when a session would work
/// (1 otherwise).
pub async fn doctor(args: &DoctorArgs) -> Result<i32, Failure> {
    let config = load_config(args.config_file.as_deref())?;
    let target = match args
        .target
        .as_deref()
        .or_else(|| config.target.as_ref().and_then(TargetConfig::path))
    {
        Some(text) => Some(text.parse::<Target>()?),
        None => None,
    };
    let settings = KubeSettings {
        ephemeral: args.ephemeral || config.agent.ephemeral.unwrap_or(false),
        ..cluster_settings(
            args.kubeconfig.as_ref(),
            args.context.as_ref(),
            args.namespace.as_ref(),
            &config,
        )
    };
    let checks = doctor::run(&doctor::Scope { target, settings }).await;
    let out = match args.output {
        DoctorFormat::Text => doctor::render_text(&checks),
        DoctorFormat::Json => doctor::render_json(&checks)?,
    };
    output::stdout(&out)?;
    Ok(if doctor::would_work(&checks) { 0 } else { 1 })
}

/// `mirrord env`: prints the target's filtered variables.
pub async fn env(args: &SessionArgs, format: EnvFormat) -> Result<i32, Failure> {
    let session = Session::open(args).await?;
    let vars = envfilter::remote_vars(&session.info.env, &session.filter);
    session.close().await;
    output::stdout(&format_env(&vars, format))?;
    Ok(0)
}

pub fn format_env(vars: &[(String, String)], format: EnvFormat) -> String {
    let mut out = String::new();
    match format {
        EnvFormat::Sh => {
            for (name, value) in vars {
                let _ = writeln!(out, "export {name}='{}'", value.replace('\'', r"'\''"));
            }
        }
        EnvFormat::Dotenv => {
            for (name, value) in vars {
                let plain = value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./:@,+%".contains(c));
                if plain {
                    let _ = writeln!(out, "{name}={value}");
                } else {
                    let escaped = value
                        .replace('\\', r"\\")
                        .replace('"', "\\\"")
                        .replace('$', r"\$")
                        .replace('`', r"\`")
                        .replace('\n', r"\n");
                    let _ = writeln!(out, "{name}=\"{escaped}\"");
                }
            }
        }
        EnvFormat::Json => {
            let object: serde_json::Map<String, serde_json::Value> = vars
                .iter()
                .map(|(name, value)| (name.clone(), value.clone().into()))
                .collect();
            out = serde_json::Value::Object(object).to_string();
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(String, String)> {
        vec![
            ("A".into(), "plain/value".into()),
            ("B".into(), "it's \"q\" $x\nz".into()),
        ]
    }

    #[test]
    fn sh_format_quotes_for_eval() {
        assert_eq!(
            format_env(&vars(), EnvFormat::Sh),
            "export A='plain/value'\nexport B='it'\\''s \"q\" $x\nz'\n"
        );
    }

    #[test]
    fn dotenv_quotes_only_when_needed() {
        assert_eq!(
            format_env(&vars(), EnvFormat::Dotenv),
            "A=plain/value\nB=\"it's \\\"q\\\" \\$x\\nz\"\n"
        );
    }

    #[test]
    fn json_is_one_object() {
        let parsed: serde_json::Value =
            serde_json::from_str(&format_env(&vars(), EnvFormat::Json)).unwrap();
        assert_eq!(parsed["B"], "it's \"q\" $x\nz");
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let config = Config::parse(
            r#"{"feature": {"env": {"include": "A*", "exclude": "B", "override": {"K": "file", "L": "file"}}}}"#,
        )
        .unwrap();
        let args = SessionArgs {
            override_env_vars_include: Some("X".into()),
            env: vec![("K".into(), "flag".into())],
            ..SessionArgs::default()
        };
        let filter = env_filter(&args, &config);
        assert_eq!(filter.include, Some(Patterns::parse("X")));
        assert_eq!(filter.exclude, Some(Patterns::parse("B")));
        assert_eq!(
            filter.overrides,
            vec![("L".into(), "file".into()), ("K".into(), "flag".into())]
        );
    }

    #[test]
    fn dns_settings_read_the_filter_and_refuse_what_is_not_a_name() {
        let config = Config::parse(
            r#"{"feature": {"network": {"dns": {"filter": {"local": ["laptop.test", "*.corp.example"]}}}}}"#,
        )
        .unwrap();
        let settings = dns_settings(&SessionArgs::default(), &config).unwrap();
        assert!(settings.enabled);
        assert_eq!(
            settings.rule,
            Some(NameRule::Local(vec![
                "laptop.test".into(),
                "*.corp.example".into()
            ]))
        );
        let no_dns = SessionArgs {
            no_dns: true,
            ..SessionArgs::default()
        };
        assert!(!dns_settings(&no_dns, &config).unwrap().enabled);
        for (json, error) in [
            (
                r#"{"feature": {"network": {"dns": {"filter": {"local": [], "remote": []}}}}}"#,
                "feature.network.dns.filter takes exactly one",
            ),
            (
                r#"{"feature": {"network": {"dns": {"filter": {"remote": ["db:5432"]}}}}}"#,
                "expected a host name",
            ),
        ] {
            let config = Config::parse(json).unwrap();
            let message = dns_settings(&SessionArgs::default(), &config)
                .unwrap_err()
                .to_string();
            assert!(message.contains(error), "{message}");
        }
        let off = Config::parse(r#"{"feature": {"network": {"dns": false}}}"#).unwrap();
        assert!(!dns_settings(&SessionArgs::default(), &off).unwrap().enabled);
    }

    #[test]
    fn a_session_needs_a_target_or_an_agent() {
        let error = agent_source(&SessionArgs::default(), &Config::default())
            .err()
            .unwrap();
        assert!(error.to_string().starts_with("no target"));
        let args = SessionArgs {
            agent_addr: Some("127.0.0.1:1".into()),
            ..SessionArgs::default()
        };
        let error = agent_source(&args, &Config::default()).err().unwrap();
        assert!(error.to_string().contains("--agent-token"));
        let args = SessionArgs {
            agent_addr: Some("agent.example".into()),
            agent_token: Some("t".into()),
            ..SessionArgs::default()
        };
        let error = agent_source(&args, &Config::default()).err().unwrap();
        assert_eq!(
            error.to_string(),
            "--agent-addr: `agent.example` is not an address: use HOST:PORT, unix:PATH or unix:@NAME"
        );
    }
}
