//! The agent image: its static agent runs from a root that holds nothing but the binary (and
//! what the OCI runtime spec has every runtime provide in every container, of which the agent
//! uses /proc and /dev/null), and answers a session's handshake; `scripts/agent-image` says
//! plainly when it cannot build the image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use libtest_mimic::Failed;
use mirrord_cli::client::AgentClient;
use mirrord_tests::command::{Run, SHORT};
use mirrord_tests::{Cluster, HandStartedAgent, Scene};

const TOKEN: &str = "empty-root-token";

/// The repository's root (this crate is `tests/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where `scripts/agent-image --binary` (run by scripts/test) puts the static agent.
fn static_agent() -> PathBuf {
    repo()
        .join("target")
        .join(format!("{}-unknown-linux-gnu", std::env::consts::ARCH))
        .join("release/mirrord-agent")
}

pub fn static_agent_answers_from_an_empty_root(
    _scene: &Scene,
    _cluster: &Cluster,
) -> Result<(), Failed> {
    let binary = static_agent();
    ensure!(
        binary.is_file(),
        "no static agent at {}: build it with scripts/agent-image --binary",
        binary.display()
    );
    let root = std::env::temp_dir().join(format!("mirrord-empty-root-{}", std::process::id()));
    std::fs::create_dir_all(root.join("proc"))?;
    std::fs::create_dir_all(root.join("dev"))?;
    std::fs::write(root.join("dev/null"), b"")?;
    let result = serve_from(&root, &binary);
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// Copies the agent into `root`, starts it chrooted there (with /proc and /dev/null mounted, as a
/// runtime does, in a mount namespace of its own, which goes when it ends) and opens a session
/// to it. No libc, no loader, no /etc: a dynamically linked agent would not even start.
fn serve_from(root: &Path, binary: &Path) -> Result<(), Failed> {
    std::fs::copy(binary, root.join("mirrord-agent"))?;
    let mut entries: Vec<String> = std::fs::read_dir(root)?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect();
    entries.sort();
    ensure!(
        entries == ["dev", "mirrord-agent", "proc"],
        "the root holds more than the agent: {entries:?}"
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "mount -t proc proc \"$0/proc\" && mount --bind /dev/null \"$0/dev/null\" && \
             exec chroot \"$0\" /mirrord-agent --listen 127.0.0.1:0 --idle-ttl 10",
        )
        .arg(root)
        .env_clear()
        .env("MIRRORD_AGENT_TOKEN", TOKEN)
        .env("FROM_AN_EMPTY_ROOT", "yes");
    let agent = HandStartedAgent::start(cmd, SHORT)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let info = runtime.block_on(async {
        let client = AgentClient::connect(&agent.addr().parse()?, TOKEN.as_bytes()).await?;
        Ok::<_, Failed>(client.target_info().await?)
    })?;
    ensure!(
        info.env
            .iter()
            .any(|(name, value)| name == "FROM_AN_EMPTY_ROOT" && value == "yes"),
        "the agent answered, but not with its own environment: {:?}",
        info.env
    );
    Ok(())
}

/// Without docker or podman on PATH, the script names both and the way out, and fails.
pub fn agent_image_says_when_it_cannot_build(
    _scene: &Scene,
    _cluster: &Cluster,
) -> Result<(), Failed> {
    // A PATH with just what the script needs before it looks for a container tool.
    let bin = std::env::temp_dir().join(format!("mirrord-no-docker-{}", std::process::id()));
    std::fs::create_dir_all(&bin)?;
    let linked = ["bash", "sed", "head", "dirname", "uname"]
        .iter()
        .try_for_each(|tool| -> Result<(), Failed> {
            let path = which(tool).ok_or_else(|| format!("no {tool} on PATH"))?;
            std::os::unix::fs::symlink(path, bin.join(tool))?;
            Ok(())
        });
    let out = linked.and_then(|()| {
        let mut cmd = Command::new(repo().join("scripts/agent-image"));
        cmd.env("PATH", &bin);
        Ok(cmd.run(Duration::from_secs(20))?)
    });
    let _ = std::fs::remove_dir_all(&bin);
    let out = out?;
    ensure!(
        out.code == 1
            && out.stdout.is_empty()
            && out.stderr.trim().lines().count() == 1
            && out
                .stderr
                .contains("neither docker nor podman is installed")
            && out.stderr.contains("scripts/agent-image --binary"),
        "expected one line naming docker and podman: exit {:?}, stdout {:?}, stderr {:?}",
        out.code,
        out.stdout,
        out.stderr
    );
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.is_file())
}
