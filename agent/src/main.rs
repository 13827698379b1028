//! `mirrord-agent`: parses arguments and runs the agent library.

use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use mirrord_agent::container::{self, ContainerId};
use mirrord_agent::incoming::Redirect;
use mirrord_agent::incoming::guard::{self, Forked};
use mirrord_agent::incoming::nft::{Nft, Owner};
use mirrord_agent::target::{Namespaces, Target};
use mirrord_agent::{netns, server};
use mirrord_link::endpoint::Endpoint;
use mirrord_link::report::one_line;

/// The remote half of mirrord: serves a target process's network, environment, hostname and
/// files to mirrord sessions that present the token.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Address to accept sessions on: HOST:PORT, unix:PATH, or unix:@NAME for an abstract Unix
    /// socket. Port 0 picks a free port; the address is printed as `listening on ADDR` on
    /// stdout once the agent accepts sessions.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: Endpoint,
    /// Serve this process's namespaces (network, UTS), root and environment instead of the
    /// agent's own.
    #[arg(long)]
    target_pid: Option<u32>,
    /// Serve the container with this ID (`containerd://HEX`, `cri-o://HEX`, `docker://HEX`,
    /// `mrdc://HEX`, as in the pod's status): its init process is found through /proc, so the
    /// agent must see the node's processes (hostPID).
    #[arg(long, conflicts_with = "target_pid")]
    container_id: Option<String>,
    /// The agent runs in the target's pod (as an ephemeral container): sessions get the network
    /// and UTS namespaces it is in, without entering any (which needs CAP_SYS_ADMIN), and the
    /// target's root and environment through /proc.
    #[arg(long)]
    in_target_pod: bool,
    /// Exit as soon as the first session that was let in ends.
    #[arg(long)]
    once: bool,
    /// File holding the session token (whitespace around it is ignored). Without it the token
    /// is read from MIRRORD_AGENT_TOKEN.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Exit after this many seconds without any connected session.
    #[arg(long, default_value_t = 60)]
    idle_ttl: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MIRRORD_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
    match run(Args::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("mirrord-agent: {}", one_line(&error));
            ExitCode::FAILURE
        }
    }
}

fn read_token(args: &Args) -> anyhow::Result<Vec<u8>> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?,
        None => std::env::var(mirrord_agent::target::TOKEN_VAR).unwrap_or_default(),
    };
    let token = token.trim();
    if token.is_empty() {
        bail!("no session token: set MIRRORD_AGENT_TOKEN or pass --token-file");
    }
    Ok(token.as_bytes().to_vec())
}

/// The agent's exit status: the serving process's, as its guard reports it.
fn run(args: Args) -> anyhow::Result<ExitCode> {
    let token = read_token(&args)?;
    let open_files = server::raise_open_files_limit();
    tracing::debug!(?open_files, "limit of open descriptors");
    let pid = match &args.container_id {
        Some(id) => {
            let id = ContainerId::parse(id)?;
            let pid = container::find_pid(Path::new("/proc"), &id)?;
            tracing::info!("container {id} is process {pid}");
            Some(pid)
        }
        None => args.target_pid,
    };
    let namespaces = if args.in_target_pod {
        Namespaces::Own
    } else {
        Namespaces::Target
    };
    let target = Target::open(pid, namespaces)?;
    // Forked first, while the agent has one thread, and before the listener exists, so that
    // the guard (this process from here on) holds nothing of the serving agent's but its pipe.
    let nft = Nft::from_env();
    let owner = Owner::current().context("cannot read the agent's own pid namespace")?;
    let netns = match target.entered_pid() {
        Some(pid) => {
            let path = format!("/proc/{pid}/ns/net");
            Some(File::open(&path).with_context(|| format!("cannot open {path}"))?)
        }
        None => None,
    };
    let guard = match guard::fork_guard(owner.table(), netns, &nft)
        .context("cannot start the redirect's guard process")?
    {
        Forked::Guard(guard) => return guard.run().map(ExitCode::from).context("guard"),
        Forked::Agent(guard) => guard,
    };
    // Bound here, on the main thread, which stays in the agent's own network namespace: the
    // CLI reaches the agent there, while the runtime's threads live in the target's.
    let listener = args
        .listen
        .bind()
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let runtime = netns::runtime_in(&target)?;
    let config = server::Config {
        token,
        idle_ttl: Duration::from_secs(args.idle_ttl),
        once: args.once,
        redirect: Redirect { owner, nft, guard },
    };
    runtime.block_on(async move {
        let listener = listener.into_async()?;
        println!("listening on {}", listener.endpoint());
        // Run on a worker thread: the block_on thread itself never joined the namespace.
        tokio::spawn(server::run(listener, config, target)).await?
    })?;
    Ok(ExitCode::SUCCESS)
}
