//! Faults a user meets on a long session, each with what the user sees: the agent killed in
//! the middle of a download and an upload, a write through the FUSE mount when the agent dies,
//! the link to the agent cut without a word (packets dropped), one connection whose reader
//! stalls while others run, and Ctrl-C pressed again and again during start-up and during
//! heavy traffic. After each, the scenario's leftover check proves nothing stayed behind
//! (processes, agents, FUSE mounts, namespaces), and the tests check the pod's redirect rules
//! and the world's links themselves. docs/faults.md states each behaviour.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use mirrord_tests::cluster::{POD_FILE_DIR, POD_ONLY_FILE, WEB_NAME};
use mirrord_tests::command::{Background, Run, SHORT};
use mirrord_tests::{Cluster, Pod, Scene};

use super::filters::{descendants_named, pod_ruleset};
use super::{RUN, standard_pod, start_agent};

/// The fixture's cluster range, routed through the agent (see network.rs).
const CLUSTER: &[&str] = &["--cidr", "10.213.0.0/16"];
/// The feeder's port that sends without end to whoever connects.
const ENDLESS_PORT: u16 = 9001;
/// The feeder's port that reads without end from whoever connects.
const SINK_PORT: u16 = 9002;
/// The pod's port the local app of the steal tests listens on.
const APP_PORT: u16 = 8080;
/// The longest the keepalive takes to give up on a silent agent (docs/faults.md): a ping after
/// `PING_INTERVAL` (5 s) of silence, then `PEER_TIMEOUT` (15 s) without any frame.
const KEEPALIVE_BOUND: Duration = Duration::from_secs(20);

/// A server in the cluster: on [`ENDLESS_PORT`] it sends 256 distinct bytes in a loop until
/// the peer goes, on [`SINK_PORT`] it reads until the peer goes. Killed when dropped.
struct Feeder {
    _server: Background,
}

impl Feeder {
    fn start(cluster: &Cluster) -> Result<Feeder, Failed> {
        let script = format!(
            "import socket, threading\n\
             def serve(port, handle):\n    \
                 s = socket.socket()\n    \
                 s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n    \
                 s.bind(('{ip}', port))\n    \
                 s.listen(64)\n    \
                 def accept():\n        \
                     while True:\n            \
                         c, _ = s.accept()\n            \
                         threading.Thread(target=handle, args=(c,), daemon=True).start()\n    \
                 threading.Thread(target=accept, daemon=True).start()\n\
             def endless(c):\n    \
                 chunk = bytes(range(256)) * 256\n    \
                 try:\n        \
                     while True:\n            \
                         c.sendall(chunk)\n    \
                 except OSError:\n        \
                     pass\n\
             def sink(c):\n    \
                 try:\n        \
                     while c.recv(1 << 16):\n            \
                         pass\n    \
                 except OSError:\n        \
                     pass\n\
             serve({ENDLESS_PORT}, endless)\n\
             serve({SINK_PORT}, sink)\n\
             print('ready', flush=True)\n\
             threading.Event().wait()\n",
            ip = cluster.ip()
        );
        let mut cmd = cluster.command("python3");
        cmd.args(["-u", "-c", &script]).stderr(Stdio::null());
        let (server, ready) = Background::start(cmd, SHORT)?;
        let feeder = Feeder { _server: server };
        ensure!(
            ready.as_deref() == Some("ready\n"),
            "the feeder did not start: {ready:?}"
        );
        Ok(feeder)
    }
}

/// A `mirrord exec` the test talks to while it runs: stdin piped, stdout read line by line,
/// stderr kept in a file, in its own process group (as a terminal's foreground job). Killed
/// with its group when dropped.
struct Live {
    child: Child,
    stdin: Option<ChildStdin>,
    /// stdout lines, as they come.
    lines_rx: mpsc::Receiver<String>,
    stderr: PathBuf,
}

impl Live {
    fn start(scene: &Scene, mut cmd: Command) -> Result<Live, Failed> {
        let stderr = scene.temp_dir().join(format!(
            "mirrord-{}.stderr",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .process_group(0);
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (lines_tx, lines_rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Live {
            stdin: child.stdin.take(),
            child,
            lines_rx,
            stderr,
        })
    }

    /// The next line of the command's stdout, within `timeout`.
    fn line(&self, timeout: Duration) -> Result<String, Failed> {
        self.lines_rx.recv_timeout(timeout).map_err(|_| {
            Failed::from(format!(
                "no line on stdout within {timeout:?}; stderr: {}",
                self.stderr()
            ))
        })
    }

    /// Waits for a stdout line starting with `prefix`, skipping others.
    fn line_starting(&self, prefix: &str, timeout: Duration) -> Result<String, Failed> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.line(left)?;
            if line.starts_with(prefix) {
                return Ok(line);
            }
        }
    }

    fn send(&mut self, text: &str) -> Result<(), Failed> {
        let stdin = self.stdin.as_mut().ok_or("stdin already closed")?;
        stdin.write_all(text.as_bytes())?;
        stdin.flush()?;
        Ok(())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// mirrord's own lines on stderr.
    fn mirrord_lines(&self) -> Vec<String> {
        self.stderr()
            .lines()
            .filter(|line| line.starts_with("mirrord: "))
            .map(str::to_owned)
            .collect()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT to the whole process group, as a terminal sends Ctrl-C.
    fn ctrl_c(&self) {
        // SAFETY: kill(2) on the process group our own unreaped child leads.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGINT) };
    }

    /// Waits up to `timeout` for mirrord to end.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, Failed> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "mirrord did not end within {timeout:?}; stderr: {}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the process group our own unreaped child leads.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// Exit status as a shell shows it (128 + N for a death by signal N).
fn shell_code(status: ExitStatus) -> i32 {
    mirrord_tests::command::exit_code(status)
}

/// `CLOCK_MONOTONIC` in seconds: the clock Python's `time.monotonic()` reads, shared by every
/// process of the machine, so the test and the launched app can compare instants.
fn monotonic() -> f64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into memory we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

/// `kill -9` of the serving `mirrord-agent` under mirrord `root` (not its guard).
fn kill_agent(root: u32) -> Result<(), Failed> {
    let agents = descendants_named(root, "mirrord-agent");
    ensure!(!agents.is_empty(), "no mirrord-agent under mirrord {root}");
    for pid in agents {
        // SAFETY: kill(2) on a process found a moment ago under our own child; at worst the pid
        // is gone and kill fails with ESRCH.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    Ok(())
}

/// Resident memory of `pid` in bytes.
fn rss(pid: u32) -> Result<u64, Failed> {
    let usage = mirrord_tests::usage::usage(pid).ok_or_else(|| format!("pid {pid} is gone"))?;
    Ok(usage.rss_kib * 1024)
}

/// Waits until the pod's ruleset has (`present`) or has not a `mirrord_` table.
fn redirect_in_pod(pod: &Pod, present: bool) -> Result<(), Failed> {
    let deadline = Instant::now() + SHORT;
    loop {
        let ruleset = pod_ruleset(pod)?;
        if ruleset.contains("mirrord_") == present {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "after {SHORT:?} the pod's ruleset {} a mirrord table: {ruleset}",
            if present { "still lacks" } else { "still has" }
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The world (the "laptop") has no TUN device: each session's lives in its command's own
/// network namespace and goes with it.
fn no_tun_in_the_world() -> Result<(), Failed> {
    for entry in std::fs::read_dir("/sys/class/net")? {
        let entry = entry?;
        ensure!(
            !entry.path().join("tun_flags").exists(),
            "a TUN device was left in the world: {:?}",
            entry.file_name()
        );
    }
    Ok(())
}

/// A Python app that transfers without end in both directions through the pod (downloading
/// from the feeder's endless port and uploading to its sink), prints `transferring` once
/// both moved 16 MiB, and when both end prints `down|up <monotonic end> <how it ended>`, then
/// `after <POD_VAR> connect:<outcome> file:<outcome> dns:<outcome>`: what its environment, a new
/// connection through the pod, a read of a pod file and a lookup of a cluster name gave. It
/// listens on [`APP_PORT`] too, so a steal session redirects the pod's port meanwhile.
fn transfer_app(cluster: &Cluster) -> String {
    format!(
        "import errno, os, socket, threading, time\n\
         listener = socket.socket()\n\
         listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         listener.bind(('0.0.0.0', {APP_PORT}))\n\
         listener.listen()\n\
         down = socket.create_connection(('{ip}', {ENDLESS_PORT}), timeout=30)\n\
         up = socket.create_connection(('{ip}', {SINK_PORT}), timeout=30)\n\
         moved = {{'down': 0, 'up': 0}}\n\
         ends = {{}}\n\
         def recv():\n    \
             n = len(down.recv(1 << 16))\n    \
             moved['down'] += n\n    \
             return n > 0\n\
         chunk = b'u' * (1 << 16)\n\
         def send():\n    \
             up.sendall(chunk)\n    \
             moved['up'] += len(chunk)\n    \
             return True\n\
         def run(name, step):\n    \
             try:\n        \
                 while step():\n            \
                     pass\n        \
                 ends[name] = (time.monotonic(), 'EOF')\n    \
             except OSError as error:\n        \
                 ends[name] = (time.monotonic(), type(error).__name__)\n\
         threads = [threading.Thread(target=run, args=a) for a in (('down', recv), ('up', send))]\n\
         for t in threads:\n    \
             t.start()\n\
         while min(moved.values()) < 16 << 20 and not ends:\n    \
             time.sleep(0.01)\n\
         print('transferring', flush=True)\n\
         for t in threads:\n    \
             t.join()\n\
         for name in ('down', 'up'):\n    \
             print(name, '%.3f' % ends[name][0], ends[name][1], flush=True)\n\
         after = [os.environ.get('POD_VAR')]\n\
         try:\n    \
             socket.create_connection(('{ip}', {SINK_PORT}), timeout=5)\n    \
             after.append('connect:ok')\n\
         except OSError as error:\n    \
             after.append('connect:' + type(error).__name__)\n\
         try:\n    \
             open(os.environ['MIRRORD_REMOTE_ROOT'] + '{POD_FILE_DIR}/{POD_ONLY_FILE}').read()\n    \
             after.append('file:ok')\n\
         except OSError as error:\n    \
             after.append('file:' + errno.errorcode.get(error.errno, str(error.errno)))\n\
         try:\n    \
             socket.getaddrinfo('{WEB_NAME}', 80)\n    \
             after.append('dns:ok')\n\
         except OSError as error:\n    \
             after.append('dns:' + type(error).__name__)\n\
         print('after', *after, flush=True)\n",
        ip = cluster.ip()
    )
}

/// `kill -9` of the agent while the app downloads and uploads through the pod: both transfers
/// end (a reset or an end of stream) within 2 s, mirrord says so in one line that also says
/// what the command keeps, the command runs on to its own end (its status is mirrord's), and
/// the pod's redirect, the agent's guard, the TUN and the FUSE mount are all gone.
pub fn fault_agent_killed_mid_transfer(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _feeder = Feeder::start(cluster)?;
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target(), "--steal"])
        .args(CLUSTER)
        .args(["--", "python3", "-c", &transfer_app(cluster)]);
    let mut session = Live::start(scene, cmd)?;
    ensure!(
        session.line(RUN)? == "transferring",
        "the app did not start transferring; stderr: {}",
        session.stderr()
    );
    redirect_in_pod(&pod, true)?;

    let killed = monotonic();
    kill_agent(session.pid())?;
    let mut ends = Vec::new();
    for _ in 0..2 {
        let line = session.line(Duration::from_secs(10))?;
        let mut fields = line.split_whitespace();
        let (Some(name), Some(at), Some(how)) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(format!("unexpected line from the app: {line:?}").into());
        };
        let after = at.parse::<f64>()? - killed;
        eprintln!(
            "fault_agent_killed_mid_transfer: {name} ended by {how} {after:.3} s after the kill"
        );
        let within_bound = after < 2.0;
        ensure!(
            within_bound,
            "the {name} transfer ended {after:.3} s after the agent was killed ({how}); it must end within 2 s"
        );
        ends.push(format!("{name} {how}"));
    }
    let after = session.line(RUN)?;
    eprintln!("fault_agent_killed_mid_transfer: {after}");
    let mut after = after.split_whitespace();
    ensure!(
        after.next() == Some("after") && after.next() == Some(super::POD_VALUE),
        "the command lost the pod's environment"
    );
    let outcomes: Vec<&str> = after.collect();
    ensure!(
        outcomes.len() == 3 && outcomes.iter().all(|outcome| !outcome.ends_with(":ok")),
        "without the agent, a connection, a pod file and a cluster name must fail: {outcomes:?}"
    );
    ensure!(
        outcomes[1] == "file:EIO",
        "a pod file read without the agent: {}, expected EIO",
        outcomes[1]
    );
    let status = session.wait(RUN)?;
    ensure!(
        status.code() == Some(0),
        "mirrord did not end with the command's status 0: {status}; stderr: {}",
        session.stderr()
    );
    let lines = session.mirrord_lines();
    ensure!(
        lines.len() == 1
            && lines[0].starts_with("mirrord: lost the agent")
            && lines[0].contains("the command keeps running")
            && lines[0].contains("environment"),
        "expected one line saying the agent was lost and what the command keeps: {:?}",
        session.stderr()
    );
    eprintln!("fault_agent_killed_mid_transfer: {ends:?}; {}", lines[0]);
    redirect_in_pod(&pod, false)?;
    no_tun_in_the_world()
}

/// A writer through the FUSE mount (`--fs-mode write`) whose agent dies: what it wrote and
/// fsync'ed before is in the pod, byte for byte, and its next write, fsync or close fails with
/// an error instead of reporting success for bytes the pod never got.
pub fn fault_fuse_write_when_the_agent_dies(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let name = "written-while-dying.bin";
    let script = format!(
        "import errno, os, sys\n\
         path = os.environ['MIRRORD_REMOTE_ROOT'] + '{POD_FILE_DIR}/{name}'\n\
         block = bytes(range(256)) * 4096\n\
         def write_all(fd, data):\n    \
             while data:\n        \
                 data = data[os.write(fd, data):]\n\
         fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)\n\
         write_all(fd, block)\n\
         os.fsync(fd)\n\
         print('acknowledged', len(block), flush=True)\n\
         sys.stdin.readline()\n\
         step = 'write'\n\
         try:\n    \
             for _ in range(16):\n        \
                 write_all(fd, block)\n    \
             step = 'fsync'\n    \
             os.fsync(fd)\n    \
             step = 'close'\n    \
             os.close(fd)\n    \
             print('succeeded', flush=True)\n\
         except OSError as error:\n    \
             print('failed', step, errno.errorcode.get(error.errno, error.errno), flush=True)\n"
    );
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target(), "--fs-mode", "write", "--"])
        .args(["python3", "-c", &script]);
    let mut session = Live::start(scene, cmd)?;
    let block: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    ensure!(
        session.line(RUN)? == format!("acknowledged {}", block.len()),
        "the first write was not acknowledged; stderr: {}",
        session.stderr()
    );
    kill_agent(session.pid())?;
    session.send("go on\n")?;
    let outcome = session.line(RUN)?;
    eprintln!("fault_fuse_write_when_the_agent_dies: the writer says {outcome:?}");
    ensure!(
        outcome.starts_with("failed "),
        "the writer was told its writes succeeded after the agent died: {outcome:?}; stderr: {}",
        session.stderr()
    );
    let status = session.wait(RUN)?;
    ensure!(
        status.code() == Some(0),
        "mirrord did not end with the command's status: {status}; stderr: {}",
        session.stderr()
    );
    let in_pod = std::fs::read(format!("/proc/{}/root{POD_FILE_DIR}/{name}", pod.pid()))?;
    ensure!(
        in_pod.len() >= block.len() && in_pod[..block.len()] == block[..],
        "the acknowledged megabyte is not intact in the pod: {} bytes there",
        in_pod.len()
    );
    let pattern_kept = in_pod
        .chunks(block.len())
        .all(|chunk| chunk == &block[..chunk.len()]);
    ensure!(
        pattern_kept,
        "the pod's file holds bytes the writer never wrote"
    );
    Ok(())
}

/// The link to the agent dropped without a word (an nftables rule in the world drops every
/// packet to and from the agent's port, as a dead route or a silent firewall would):
/// keepalive notices within its documented bound and mirrord says so in one line; the command
/// runs on to its own end.
pub fn fault_link_cut_silently_is_noticed(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    const TOKEN: &str = "faults-token";
    let pod = standard_pod(cluster)?;
    let agent = start_agent(scene, &pod, TOKEN)?;
    let port = agent
        .addr()
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse::<u16>().ok())
        .ok_or_else(|| format!("the agent's address has no port: {}", agent.addr()))?;
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "--agent-addr", agent.addr(), "--"])
        .args([
            "sh",
            "-c",
            "echo started; read line; echo \"done $POD_VAR\"",
        ])
        .env("MIRRORD_AGENT_TOKEN", TOKEN);
    let mut session = Live::start(scene, cmd)?;
    ensure!(
        session.line(RUN)? == "started",
        "the command did not start; stderr: {}",
        session.stderr()
    );
    let cut = DropRule::insert(port)?;
    let since = Instant::now();
    let deadline = since + KEEPALIVE_BOUND + Duration::from_secs(3);
    let noticed = loop {
        if !session.mirrord_lines().is_empty() {
            break since.elapsed();
        }
        ensure!(
            Instant::now() < deadline,
            "mirrord said nothing {:?} after its link was cut (keepalive bound {KEEPALIVE_BOUND:?})",
            since.elapsed()
        );
        thread::sleep(Duration::from_millis(50));
    };
    eprintln!("fault_link_cut_silently_is_noticed: noticed after {noticed:?}");
    drop(cut);
    let lines = session.mirrord_lines();
    ensure!(
        lines.len() == 1
            && lines[0].starts_with("mirrord: lost the agent")
            && lines[0].contains("stopped answering"),
        "expected one line saying the agent stopped answering: {:?}",
        session.stderr()
    );
    session.send("\n")?;
    ensure!(
        session.line(RUN)? == "done from-the-pod",
        "the command did not run on with its environment; stderr: {}",
        session.stderr()
    );
    let status = session.wait(RUN)?;
    ensure!(
        status.code() == Some(0),
        "mirrord did not end with the command's status: {status}; stderr: {}",
        session.stderr()
    );
    Ok(())
}

/// An nftables table in the world dropping every TCP packet to or from one port; deleted on
/// drop.
struct DropRule {
    table: String,
}

impl DropRule {
    fn insert(port: u16) -> Result<DropRule, Failed> {
        // The world is this run's own network namespace; the agent's port is unique in it.
        let table = format!("mrdt_cut_{}_{port}", std::process::id());
        let rule = DropRule {
            table: table.clone(),
        };
        let script = format!(
            "table inet {table} {{\n  chain out {{\n    type filter hook output priority 0;\n    \
             tcp dport {port} drop\n    tcp sport {port} drop\n  }}\n}}\n"
        );
        let mut nft = Command::new("nft");
        nft.args(["-f", "-"]).stdin(Stdio::piped());
        let mut child = nft.spawn()?;
        child
            .stdin
            .take()
            .ok_or("no stdin for nft")?
            .write_all(script.as_bytes())?;
        let status = child.wait()?;
        ensure!(
            status.success(),
            "nft could not add the drop rule: {status}"
        );
        Ok(rule)
    }
}

impl Drop for DropRule {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .run(SHORT);
    }
}

/// One connection whose local reader stops reading while the server keeps sending: other
/// downloads through the same session still complete, byte for byte, the stalled connection
/// still delivers its bytes in order once read again, and neither mirrord's nor the agent's
/// resident memory grows by more than 200 MB meanwhile. The speeds are printed, not asserted.
pub fn fault_stalled_reader_leaves_other_streams_flowing(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    const FILE_MIB: usize = 64;
    const GROWTH_LIMIT: u64 = 200 << 20;
    let pod = standard_pod(cluster)?;
    let _feeder = Feeder::start(cluster)?;
    let server = cluster.serve_http(&[])?;
    let body: Vec<u8> = (0..FILE_MIB << 20)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
        .collect();
    std::fs::write(server.dir().join("big.bin"), &body)?;
    let script = format!(
        "import hashlib, socket, sys, time, urllib.request\n\
         def fetch():\n    \
             start = time.monotonic()\n    \
             data = urllib.request.urlopen('{url}', timeout=60).read()\n    \
             mbps = len(data) / (time.monotonic() - start) / 1e6\n    \
             return hashlib.sha256(data).hexdigest(), '%.0f' % mbps\n\
         print('alone', *fetch(), flush=True)\n\
         stalled = socket.create_connection(('{ip}', {ENDLESS_PORT}), timeout=30)\n\
         stalled.recv(1)\n\
         time.sleep(1)\n\
         print('stalled', flush=True)\n\
         for n in range(4):\n    \
             print('beside', *fetch(), flush=True)\n\
         sys.stdin.readline()\n\
         got = b''\n\
         while len(got) < 1 << 20:\n    \
             got += stalled.recv((1 << 20) - len(got))\n\
         expected = (bytes(range(1, 256)) + bytes(range(256)) * 4200)[:1 << 20]\n\
         print('resumed', got == expected, flush=True)\n",
        url = server.url("big.bin"),
        ip = cluster.ip()
    );
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target()])
        .args(CLUSTER)
        .args(["--", "python3", "-c", &script]);
    let mut session = Live::start(scene, cmd)?;
    let expected = super::network::sha256_hex(&body)?;
    let alone = session.line_starting("alone ", RUN)?;
    ensure!(
        alone.split_whitespace().nth(1) == Some(expected.as_str()),
        "the first download came back wrong: {alone}"
    );
    let agent = descendants_named(session.pid(), "mirrord-agent")
        .first()
        .copied()
        .ok_or("no mirrord-agent under mirrord")?;
    let before = (rss(session.pid())?, rss(agent)?);
    session.line_starting("stalled", RUN)?;
    let mut speeds = vec![format!(
        "alone {} MB/s",
        alone.split_whitespace().nth(2).unwrap_or("?")
    )];
    for n in 0..4 {
        let beside = session.line_starting("beside ", RUN)?;
        let mut fields = beside.split_whitespace().skip(1);
        ensure!(
            fields.next() == Some(expected.as_str()),
            "download {n} beside the stalled connection came back wrong: {beside}"
        );
        speeds.push(format!("beside {} MB/s", fields.next().unwrap_or("?")));
    }
    let after = (rss(session.pid())?, rss(agent)?);
    eprintln!(
        "fault_stalled_reader_leaves_other_streams_flowing: {FILE_MIB} MiB downloads: {}; \
         RSS mirrord {} -> {} MiB, agent {} -> {} MiB",
        speeds.join(", "),
        before.0 >> 20,
        after.0 >> 20,
        before.1 >> 20,
        after.1 >> 20
    );
    for (what, before, after) in [
        ("mirrord", before.0, after.0),
        ("the agent", before.1, after.1),
    ] {
        ensure!(
            after.saturating_sub(before) < GROWTH_LIMIT,
            "{what}'s resident memory grew from {} to {} MiB beside a stalled reader",
            before >> 20,
            after >> 20
        );
    }
    session.send("read again\n")?;
    ensure!(
        session.line_starting("resumed", RUN)? == "resumed True",
        "the stalled connection did not deliver its bytes in order once read; stderr: {}",
        session.stderr()
    );
    let status = session.wait(RUN)?;
    ensure!(
        status.code() == Some(0),
        "mirrord: {status}; stderr: {}",
        session.stderr()
    );
    Ok(())
}

/// Ctrl-C pressed three times in quick succession at many moments of start-up (before the
/// command started, or just as it starts): mirrord ends at once with 130, says at most one
/// line, and leaves nothing (the scenario's check, plus no TUN in the world).
pub fn fault_ctrl_c_repeated_during_start_up(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    // A session against a local pod starts its command some 20–40 ms after mirrord starts on
    // this machine: the Ctrl-Cs are spread over that time, 2 ms apart.
    let delays: Vec<u64> = (0..=60).step_by(2).collect();
    let mut started_commands = 0;
    for &delay_ms in &delays {
        let mut cmd = scene.mirrord()?;
        cmd.args(["exec", "-t", &pod.target(), "--fs-mode", "write"])
            .args(CLUSTER)
            .args(["--", "sh", "-c", "echo started; exec sleep 30"]);
        let mut session = Live::start(scene, cmd)?;
        thread::sleep(Duration::from_millis(delay_ms));
        for _ in 0..3 {
            session.ctrl_c();
            thread::sleep(Duration::from_millis(3));
        }
        let status = session.wait(Duration::from_secs(10))?;
        let started = session.lines_rx.try_iter().any(|line| line == "started");
        started_commands += usize::from(started);
        let stderr = session.stderr();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        ensure!(
            shell_code(status) == 130,
            "Ctrl-C {delay_ms} ms into start-up: exit {} (signal {:?}), expected 130; stderr: {stderr}",
            shell_code(status),
            status.signal()
        );
        ensure!(
            lines.len() <= 1 && lines.iter().all(|l| l.starts_with("mirrord: ")),
            "Ctrl-C {delay_ms} ms into start-up: more than one line from mirrord: {stderr:?}"
        );
    }
    eprintln!(
        "fault_ctrl_c_repeated_during_start_up: the command had started in {started_commands} of {} tries",
        delays.len()
    );
    no_tun_in_the_world()
}

/// Ctrl-C pressed three times in quick succession while the app downloads and uploads through
/// the pod and steals a port: mirrord ends with the command's 130, adds no line of its own,
/// and the pod's redirect and everything else are gone.
pub fn fault_ctrl_c_repeated_during_heavy_traffic(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _feeder = Feeder::start(cluster)?;
    // The app dies of SIGINT as a C program does, not with a Python traceback.
    let app = format!(
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\n{}",
        transfer_app(cluster)
    );
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target(), "--steal", "--fs-mode", "write"])
        .args(CLUSTER)
        .args(["--", "python3", "-c", &app]);
    let mut session = Live::start(scene, cmd)?;
    ensure!(
        session.line(RUN)? == "transferring",
        "the app did not start transferring; stderr: {}",
        session.stderr()
    );
    redirect_in_pod(&pod, true)?;
    for _ in 0..3 {
        session.ctrl_c();
        thread::sleep(Duration::from_millis(10));
    }
    let status = session.wait(Duration::from_secs(10))?;
    ensure!(
        shell_code(status) == 130,
        "after Ctrl-C mirrord exited {} (signal {:?}); stderr: {}",
        shell_code(status),
        status.signal(),
        session.stderr()
    );
    ensure!(
        session.stderr().trim().is_empty(),
        "mirrord said more than nothing after Ctrl-C: {:?}",
        session.stderr()
    );
    redirect_in_pod(&pod, false)?;
    no_tun_in_the_world()
}
