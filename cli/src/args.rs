//! The command line. Every flag here is documented in README.md and docs/cli.md.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::remote_fs::FsMode;

/// Run a local process or shell in the context of a Kubernetes pod (or of a local process): its
/// environment, hostname, outgoing network, DNS, files and incoming traffic, without touching
/// any other process on this machine.
#[derive(Parser, Debug)]
#[command(
    name = "mirrord",
    after_help = "Examples:\n  mirrord exec -t deployment/web -n shop -- ./server --port 8080\n  mirrord shell -t pod/web-7d9c-x2b\n  mirrord ls -n shop"
)]
pub struct Cli {
    /// Print only errors: no progress, no warnings (the command's own output is untouched).
    #[arg(short = 'q', long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// `mirrord --version`: the version, the agent protocol it speaks and the commit it was built
/// from (`unknown` outside a git checkout).
pub fn version_line() -> String {
    format!(
        "{} (protocol {}, commit {})",
        env!("CARGO_PKG_VERSION"),
        mirrord_protocol::greeting::PROTOCOL_VERSION,
        env!("MIRRORD_GIT_COMMIT")
    )
}

/// The command line with its version and the completers that need code (target names).
pub fn command() -> clap::Command {
    Cli::command()
        .version(version_line())
        .mut_subcommand("exec", with_target_completer)
        .mut_subcommand("shell", with_target_completer)
        .mut_subcommand("env", with_target_completer)
}

fn with_target_completer(command: clap::Command) -> clap::Command {
    command.mut_arg("target", |arg| {
        arg.add(clap_complete::engine::ArgValueCompleter::new(
            crate::completion::complete_target,
        ))
    })
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in the target's context and exit with its status.
    #[command(
        after_help = "Examples:\n  mirrord exec -t deployment/web -n shop -- ./server --port 8080\n  mirrord exec -t pod/web-7d9c-x2b --steal -- npm start\n  mirrord exec -t targetless -- psql -h db.shop -U app"
    )]
    Exec {
        #[command(flatten)]
        session: SessionArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<OsString>,
    },
    /// Start an interactive shell ($SHELL, else /bin/sh) in the target's context.
    #[command(
        after_help = "Examples:\n  mirrord shell -t deployment/web -n shop\n  mirrord shell -t pid/4242 -- --norc"
    )]
    Shell {
        #[command(flatten)]
        session: SessionArgs,
        /// Arguments for the shell, after `--`.
        #[arg(last = true, value_name = "SHELL_ARGS")]
        shell_args: Vec<OsString>,
    },
    /// Print the target's environment as mirrord would apply it (for IDE run configurations
    /// and `docker --env-file`).
    #[command(
        after_help = "Examples:\n  eval \"$(mirrord env -t deployment/web -n shop)\"\n  mirrord env -t deployment/web --format dotenv > .mirrord/pod.env\n  mirrord env -t pod/web-7d9c-x2b --format json | jq .DATABASE_URL"
    )]
    Env {
        #[command(flatten)]
        session: SessionArgs,
        #[arg(long, value_enum, default_value_t = EnvFormat::Sh)]
        format: EnvFormat,
    },
    /// List the targets of a namespace of the cluster.
    #[command(
        after_help = "Examples:\n  mirrord ls -n shop\n  mirrord ls -n shop -o json\n  mirrord ls -A"
    )]
    Ls(ListArgs),
    /// Check what this machine and the cluster allow before a session, each check ✓ or ✗ with
    /// its fix: `mirrord doctor -t deployment/web -n shop`. Exits 0 only when a session would
    /// work.
    Doctor(DoctorArgs),
    /// Forward local ports to hosts reachable from the target (cluster names resolved as the
    /// target resolves them), until Ctrl-C; without a target, through a targetless agent.
    #[command(
        after_help = "Examples:\n  mirrord port-forward -n shop -L 5432:db:5432\n  mirrord port-forward -t deployment/web -n shop -L 15432:db:5432 -L 6379:redis:6379\n  mirrord port-forward -t pid/4242 -L 0:10.1.2.3:80"
    )]
    PortForward(PortForwardArgs),
    /// Check a config file (JSON, TOML or YAML) and print upstream mirrord's report:
    /// `{"type":"Success","config":…,"warnings":[…]}` or `{"type":"Fail","errors":[…]}`.
    #[command(
        after_help = "Examples:\n  mirrord verify-config .mirrord/mirrord.json\n  mirrord verify-config --resolved mirrord.toml | jq .config.feature"
    )]
    VerifyConfig {
        /// Show every key this version reads, with its defaults, instead of the file as read.
        #[arg(long)]
        resolved: bool,
        /// The config file.
        #[arg(value_name = "FILE")]
        path: PathBuf,
    },
    /// Print the shell completion script (target names complete from the cluster and from
    /// local processes in containers).
    #[command(
        after_help = "Examples:\n  source <(mirrord completions bash)\n  mirrord completions zsh > \"${fpath[1]}/_mirrord\"\n  mirrord completions fish > ~/.config/fish/completions/mirrord.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Write the man pages (mirrord.1, mirrord-exec.1, …) into a directory.
    #[command(
        after_help = "Examples:\n  mirrord man-pages /usr/local/share/man/man1\n  mirrord man-pages /tmp/man && man -l /tmp/man/mirrord-exec.1"
    )]
    ManPages {
        /// Where to write them; created when missing.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `mirrord doctor`: which target and cluster to check.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// The target to check as a session would resolve it (default: the config file's; without
    /// one, what any pod target needs).
    #[arg(short = 't', long, value_name = "TARGET")]
    pub target: Option<String>,
    /// The target's namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
    /// The kubeconfig file (default: KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Check for an agent added to the target's pod as an ephemeral container (as
    /// `exec --ephemeral` starts it) instead of an agent Job.
    #[arg(long)]
    pub ephemeral: bool,
    /// The config file (default: `.mirrord/mirrord.json` when it exists), for `target`,
    /// `kubeconfig`, `kube_context`, `agent.namespace` and `agent.ephemeral`.
    #[arg(short = 'f', long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value_t = DoctorFormat::Text)]
    pub output: DoctorFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DoctorFormat {
    /// A line per check, ✓ / ✗ / ! with the fix below, and a verdict.
    Text,
    /// `{"ok": BOOL, "checks": [{"section", "name", "outcome", "detail", "fix"}]}`.
    Json,
}

/// `mirrord port-forward`: the session options that matter without a launched process.
#[derive(Args, Debug)]
pub struct PortForwardArgs {
    /// The target (as for exec); default: the config file's, else `targetless`.
    #[arg(short = 't', long, value_name = "TARGET")]
    pub target: Option<String>,
    /// The target's namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub target_namespace: Option<String>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
    /// The kubeconfig file (default: KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The agent's image in a cluster.
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// Use an agent that is already running instead of starting one.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "target")]
    pub agent_addr: Option<String>,
    /// The token of the agent given by --agent-addr.
    #[arg(
        long,
        env = "MIRRORD_AGENT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub agent_token: Option<String>,
    /// The config file (for the target, the cluster and the agent).
    #[arg(short = 'f', long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Say more while starting.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Forward 127.0.0.1:LOCAL_PORT (default PORT; 0: any free port) to HOST:PORT as seen
    /// from the target (repeatable).
    #[arg(
        short = 'L',
        long = "forward",
        value_name = "[LOCAL_PORT:]HOST:PORT",
        required = true,
        value_parser = crate::forward::parse_forward
    )]
    pub forwards: Vec<crate::forward::Forward>,
}

impl PortForwardArgs {
    /// The session these options describe; nothing is launched, so nothing else applies.
    pub fn session(&self) -> SessionArgs {
        SessionArgs {
            target: self.target.clone(),
            target_namespace: self.target_namespace.clone(),
            context: self.context.clone(),
            kubeconfig: self.kubeconfig.clone(),
            agent_image: self.agent_image.clone(),
            verbose: self.verbose,
            agent_addr: self.agent_addr.clone(),
            agent_token: self.agent_token.clone(),
            config_file: self.config_file.clone(),
            ..SessionArgs::default()
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// `mirrord ls`: which cluster and namespace.
#[derive(Args, Debug)]
pub struct ListArgs {
    /// The namespace to list (default: the kubeconfig context's).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// List every namespace.
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    pub all_namespaces: bool,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
    /// The kubeconfig file (default: KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The config file, for `kubeconfig` and `kube_context`.
    #[arg(short = 'f', long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value_t = ListFormat::Text)]
    pub output: ListFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListFormat {
    /// One target a line (with its namespace first under -A).
    Text,
    /// A JSON array of target paths, as upstream mirrord prints it (objects with `namespace`
    /// and `path` under -A).
    Json,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnvFormat {
    /// `export NAME='value'` lines, for `eval "$(mirrord env ...)"`.
    Sh,
    /// `NAME=value` lines, for `docker --env-file` and IDEs.
    Dotenv,
    /// One JSON object.
    Json,
}

/// How to reach the target, and what to take from it.
#[derive(Args, Debug, Default)]
pub struct SessionArgs {
    /// The target: `deployment/NAME`, `pod/NAME[/container/NAME]`, `statefulset/NAME`,
    /// `replicaset/NAME`, `job/NAME`, `cronjob/NAME`, `service/NAME` in a cluster; `pid/PID` (a
    /// local process or container); or `targetless`.
    #[arg(short = 't', long, value_name = "TARGET")]
    pub target: Option<String>,
    /// The target's namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub target_namespace: Option<String>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, value_name = "CONTEXT")]
    pub context: Option<String>,
    /// The kubeconfig file (default: KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The agent's image in a cluster.
    #[arg(long, value_name = "IMAGE")]
    pub agent_image: Option<String>,
    /// Add the agent to the target's pod as an ephemeral container instead of starting a Job
    /// beside it: for namespaces whose Pod Security level (baseline) refuses the Job's hostPID
    /// and capabilities. The pod keeps the exited container until it is restarted.
    #[arg(long)]
    pub ephemeral: bool,
    /// Say more while starting: each step's time, the pod and node, the cluster ranges routed.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Use an agent that is already running at HOST:PORT instead of starting one.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "target")]
    pub agent_addr: Option<String>,
    /// The token of the agent given by --agent-addr.
    #[arg(
        long,
        env = "MIRRORD_AGENT_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub agent_token: Option<String>,
    /// The config file (JSON, TOML or YAML by its extension). Default: `.mirrord/mirrord.json`
    /// (or `.toml`, `.yaml`) when it exists.
    #[arg(short = 'f', long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Take only the target's variables matching these `;`-separated wildcards.
    #[arg(short = 's', long, value_name = "PATTERNS")]
    pub override_env_vars_include: Option<String>,
    /// Do not take the target's variables matching these `;`-separated wildcards.
    #[arg(short = 'x', long, value_name = "PATTERNS")]
    pub override_env_vars_exclude: Option<String>,
    /// Set a variable in the launched process, over both local and target values (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub env: Vec<(String, String)>,
    /// Set the variables of this `.env` file (`NAME=value` lines) over the target's; `--env`
    /// and the config's `override` win over it (repeatable; later files win).
    #[arg(long, value_name = "FILE")]
    pub env_file: Vec<PathBuf>,
    /// How the target's files are shown: `local` (only under $MIRRORD_REMOTE_ROOT), `read`
    /// (also overlaid at their own path, read-only; the default) or `write` (writable).
    #[arg(long, value_enum, value_name = "MODE")]
    pub fs_mode: Option<FsMode>,
    /// Also overlay this remote path at its own path (repeatable).
    #[arg(long, value_name = "PATH")]
    pub fs_remote: Vec<PathBuf>,
    /// Show the pod's extended attributes (off by default: `ls -l` then costs no attribute
    /// probes, and `getfattr` says they are not supported, as on sshfs).
    #[arg(long)]
    pub fs_xattrs: bool,
    /// Keep all outgoing traffic on this machine's network (the command still gets its own
    /// network namespace and the tunnel).
    #[arg(long)]
    pub no_outgoing: bool,
    /// Keep outgoing UDP on this machine's network.
    #[arg(long)]
    pub no_udp: bool,
    /// Leave the command's /etc/resolv.conf alone: names resolve as on this machine, not as in
    /// the target.
    #[arg(long)]
    pub no_dns: bool,
    /// Also reach this range through the target (repeatable), e.g. the cluster's service CIDR.
    #[arg(long, value_name = "CIDR")]
    pub cidr: Vec<ipnet::IpNet>,
    /// Steal the target's incoming traffic on the ports the command listens on (the default
    /// is to mirror it: the target keeps answering, the command gets a copy).
    #[arg(long, conflicts_with = "no_incoming")]
    pub steal: bool,
    /// Take no incoming traffic from the target.
    #[arg(long)]
    pub no_incoming: bool,
    /// The command's LOCAL listening port takes the target's REMOTE port (repeatable).
    #[arg(
        short = 'p',
        long,
        value_name = "LOCAL:REMOTE",
        value_parser = crate::incoming::parse_port_mapping
    )]
    pub port_mapping: Vec<(u16, u16)>,
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got `{text}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_takes_everything_after_the_separator() {
        let cli = Cli::try_parse_from([
            "mirrord", "exec", "-t", "pid/5", "--env", "A=1=2", "-s", "DB_*", "--", "ls", "-la",
        ])
        .unwrap();
        let Command::Exec { session, command } = cli.command else {
            panic!("exec expected")
        };
        assert_eq!(session.target.as_deref(), Some("pid/5"));
        assert_eq!(session.env, vec![("A".to_owned(), "1=2".to_owned())]);
        assert_eq!(session.override_env_vars_include.as_deref(), Some("DB_*"));
        assert_eq!(command, vec![OsString::from("ls"), OsString::from("-la")]);
    }

    #[test]
    fn incoming_flags() {
        let cli = Cli::try_parse_from([
            "mirrord",
            "exec",
            "-t",
            "pid/5",
            "--steal",
            "-p",
            "8080:80",
            "--port-mapping",
            "9090:90",
            "--",
            "app",
        ])
        .unwrap();
        let Command::Exec { session, .. } = cli.command else {
            panic!("exec expected")
        };
        assert!(session.steal && !session.no_incoming);
        assert_eq!(session.port_mapping, vec![(8080, 80), (9090, 90)]);
        for bad in [
            &["--steal", "--no-incoming"][..],
            &["-p", "8080"][..],
            &["-p", "0:80"][..],
        ] {
            let args = [
                &["mirrord", "exec", "-t", "pid/5"][..],
                bad,
                &["--", "app"][..],
            ]
            .concat();
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_flags_are_refused() {
        assert!(Cli::try_parse_from(["mirrord", "exec", "-t", "pid/5"]).is_err());
        assert!(Cli::try_parse_from(["mirrord", "exec", "--env", "=x", "--", "ls"]).is_err());
        assert!(
            Cli::try_parse_from([
                "mirrord",
                "exec",
                "-t",
                "pid/1",
                "--agent-addr",
                "h:1",
                "--",
                "ls"
            ])
            .is_err()
        );
    }
}
