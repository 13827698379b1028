//! The isolated "world": a network + mount namespace holding only `lo`, in which every e2e test
//! runs, so that a routing bug fails inside the test instead of reaching the machine's outside
//! network. It must never let a fixture run in the machine's own namespaces.

use std::ffi::OsString;
use std::process::{Command, ExitCode};
use std::sync::OnceLock;

use nix::mount::{MsFlags, mount};

use crate::{FixtureError, PREFIX, Result, command, leftovers, netns};

/// Set in the re-executed test binary (and inherited by everything it starts).
pub const MARKER: &str = "MIRRORD_E2E_WORLD";

/// A name only the world's (the "laptop's") `/etc/hosts` knows: pods and the cluster DNS do not.
pub const HOST_ONLY_NAME: &str = "laptop-only.mirrord.test";

/// What [`HOST_ONLY_NAME`] resolves to on the laptop (TEST-NET-1: resolved, never contacted).
pub const HOST_ONLY_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 77);

/// Set once the world checks passed in this process; fixtures refuse to run otherwise.
static READY: OnceLock<()> = OnceLock::new();

/// Where the current process stands after [`enter`].
pub enum Entered {
    /// We are inside the world and may run tests.
    Inside,
    /// We were outside: the world ran as a child and this is its exit code.
    Exited(ExitCode),
}

/// Re-executes the current binary (same args, inherited stdio) inside a fresh net + mount
/// namespace unless already inside one, then prepares the world: `lo` up, private `/tmp` and
/// `/run` (so nothing a test creates there reaches the machine), an `/etc/hosts` knowing
/// [`HOST_ONLY_NAME`], stale fixture netns removed.
pub fn enter() -> Result<Entered> {
    if std::env::var_os(MARKER).is_none() {
        return reexec().map(Entered::Exited);
    }
    check_isolated()?;
    command::run_checked(
        Command::new("ip").args(["link", "set", "lo", "up"]),
        command::SHORT,
    )?;
    private_tmpfs("/tmp", "mode=1777")?;
    private_tmpfs("/run", "mode=0755")?;
    std::fs::create_dir_all("/run/lock").map_err(FixtureError::io("/run/lock"))?;
    host_only_name()?;
    remove_stale_namespaces()?;
    leftovers::remember_world_baseline()?;
    let _ = READY.set(());
    Ok(Entered::Inside)
}

/// Fails unless [`enter`] has prepared the world in this process.
pub fn require() -> Result<()> {
    READY
        .get()
        .copied()
        .ok_or(FixtureError::OutsideWorld { marker: MARKER })
}

fn reexec() -> Result<ExitCode> {
    let exe = std::env::current_exe().map_err(FixtureError::io("current_exe"))?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let status = Command::new("unshare")
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .arg(&exe)
        .args(&args)
        .env(MARKER, "1")
        .status()
        .map_err(|source| FixtureError::Spawn {
            program: "unshare".into(),
            source,
        })?;
    let code = command::exit_code(status);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

/// The marker alone could be inherited by accident; a fresh netns holds nothing but `lo`.
/// (`/proc/self/net` follows our netns; `/sys/class/net` would show the mounter's.)
fn check_isolated() -> Result<()> {
    let dev = std::fs::read_to_string("/proc/self/net/dev")
        .map_err(FixtureError::io("/proc/self/net/dev"))?;
    let foreign = dev
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim())
        .any(|name| name != "lo");
    if foreign {
        return Err(FixtureError::OutsideWorld { marker: MARKER });
    }
    Ok(())
}

fn private_tmpfs(target: &str, options: &str) -> Result<()> {
    mount(
        Some("mrdt-world"),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options),
    )
    .map_err(FixtureError::sys("mount tmpfs"))
}

/// Binds a copy of the machine's `/etc/hosts` plus [`HOST_ONLY_NAME`] over `/etc/hosts` in the
/// world's private mount namespace; the machine's file is never written. The copy lives in the
/// world's private `/run`, so it vanishes with the world.
fn host_only_name() -> Result<()> {
    let mut hosts =
        std::fs::read_to_string("/etc/hosts").map_err(FixtureError::io("/etc/hosts"))?;
    if !hosts.is_empty() && !hosts.ends_with('\n') {
        hosts.push('\n');
    }
    hosts.push_str(&format!("{HOST_ONLY_ADDR}\t{HOST_ONLY_NAME}\n"));
    let copy = format!("/run/{PREFIX}world-hosts");
    std::fs::write(&copy, hosts).map_err(FixtureError::io(copy.clone()))?;
    mount(
        Some(copy.as_str()),
        "/etc/hosts",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(FixtureError::sys("mount --bind /etc/hosts"))
}

/// With `/run` private this only finds something if namespaces leak into the world itself,
/// e.g. an earlier crash of a fixture library user that entered the world differently.
fn remove_stale_namespaces() -> Result<()> {
    for name in netns::fixture_namespaces()? {
        netns::delete_namespace(&name);
    }
    Ok(())
}
