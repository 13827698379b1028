//! Incoming traffic through `mirrord exec`: a client in the cluster connects to the pod's
//! address, and the local app that listens under mirrord answers it (steal) or gets a copy
//! (mirror), on its own port or a mapped one, seeing the client's real address.

use std::net::Ipv6Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use mirrord_tests::command::Run;
use mirrord_tests::{Cluster, Output, Pod, Scene};

use super::{RUN, exec, standard_pod};

/// The pod's port the tests take (nothing else in the pod uses it).
pub(super) const PORT: u16 = 8080;

/// A `mirrord exec` left running while the test acts from the cluster; stopped (SIGTERM, as a
/// user's Ctrl-C in a terminal would reach it) when dropped.
pub(super) struct Running {
    child: Child,
    stderr: PathBuf,
}

impl Running {
    pub(super) fn start(
        scene: &Scene,
        pod: &Pod,
        flags: &[&str],
        command: &[&str],
    ) -> Result<Running, Failed> {
        Running::start_with(scene, &["-t", &pod.target()], flags, command)
    }

    /// As [`Running::start`], with `target` the flags that say which agent and target to use
    /// (e.g. `--agent-addr ADDR` with `MIRRORD_AGENT_TOKEN` set for mirrord).
    pub(super) fn start_with(
        scene: &Scene,
        target: &[&str],
        flags: &[&str],
        command: &[&str],
    ) -> Result<Running, Failed> {
        // One file per session: a test may run several at once.
        static SESSIONS: AtomicUsize = AtomicUsize::new(0);
        let n = SESSIONS.fetch_add(1, Ordering::Relaxed);
        let stderr = scene.temp_dir().join(format!("mirrord-{n}.stderr"));
        let mut cmd = scene.mirrord()?;
        cmd.arg("exec")
            .args(target)
            .args(flags)
            .arg("--")
            .args(command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            // Its own process group, as a terminal's foreground job: see [`Running::interrupt`].
            .process_group(0);
        Ok(Running {
            child: cmd.spawn()?,
            stderr,
        })
    }

    pub(super) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Stops the session and returns mirrord's exit status.
    pub(super) fn stop(mut self) -> Option<i32> {
        self.terminate()
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to mirrord and waits for it to end; its exit status, if it ended within
    /// [`RUN`] (`None` also for a death by signal).
    pub(super) fn signal_and_wait(&mut self, signal: libc::c_int) -> Option<i32> {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        self.wait()
    }

    /// Ctrl-C as a terminal sends it: SIGINT to the foreground process group (mirrord and its
    /// command); then waits for mirrord to end.
    pub(super) fn interrupt(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on the process group our own unreaped child leads.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGINT) };
        self.wait()
    }

    /// Waits up to [`RUN`] for mirrord to end on its own.
    pub(super) fn wait(&mut self) -> Option<i32> {
        let deadline = Instant::now() + RUN;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn terminate(&mut self) -> Option<i32> {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + RUN;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// A directory served by the local app, with `index.html` holding `body`.
pub(super) fn site(scene: &Scene, name: &str, body: &str) -> Result<PathBuf, Failed> {
    let dir = scene.temp_dir().join(name);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("index.html"), body)?;
    Ok(dir)
}

/// `curl` from a client in the cluster namespace (not the pod, not the laptop).
pub(super) fn curl_from_cluster(cluster: &Cluster, url: &str) -> Result<Output, Failed> {
    let mut cmd = cluster.command("curl");
    cmd.args(["-sS", "--max-time", "3", url]);
    Ok(cmd.run(RUN)?)
}

/// Repeats `curl` until it returns `expected` (the subscription follows the app's `listen`
/// within a poll interval, and the session needs a moment to start).
pub(super) fn curl_until(cluster: &Cluster, url: &str, expected: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = curl_from_cluster(cluster, url)?;
        if out.code == 0 && out.stdout == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(
                format!("curl {url} never returned {expected:?}: {}", out.describe()).into(),
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A static HTTP server for `dir` on `port` (all IPv4 addresses, or those of the family of an
/// optional third argument, e.g. `::`), logging each request with the client's address to
/// stderr. Not `python3 -m http.server`: its bind looks its own host name up
/// in DNS, which takes seconds where no nameserver answers (the test pod has none).
const SERVE_PY: &str = r#"
import functools, http.server, socket, socketserver, sys
bind = sys.argv[3] if len(sys.argv) > 3 else "0.0.0.0"
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    address_family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "test", self.server_address[1]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[2])
Server((bind, int(sys.argv[1])), handler).serve_forever()
"#;

fn python_server(scene: &Scene, dir: &Path, port: u16) -> Result<Vec<String>, Failed> {
    let script = scene.temp_dir().join("serve.py");
    std::fs::write(&script, SERVE_PY)?;
    Ok([
        "python3".to_owned(),
        "-u".to_owned(),
        script.display().to_string(),
        port.to_string(),
        dir.display().to_string(),
    ]
    .to_vec())
}

pub(super) fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The pod's own app on [`PORT`], answering `remote`, killed when dropped.
pub(super) struct PodServer(pub(super) Child);

impl PodServer {
    fn start(scene: &Scene, pod: &Pod, dir: &Path) -> Result<PodServer, Failed> {
        let args = python_server(scene, dir, PORT)?;
        let mut cmd: Command = pod.command(&args[0]);
        cmd.args(&args[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Ok(PodServer(cmd.spawn()?))
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn incoming_steal_answers_a_cluster_client_from_the_local_app(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let local = site(scene, "local", "local\n")?;
    let url = format!("http://{}:{PORT}/index.html", pod.ip());
    let session = Running::start(
        scene,
        &pod,
        &["--steal"],
        &strs(&python_server(scene, &local, PORT)?),
    )?;
    curl_until(cluster, &url, "local\n")?;
    let stderr = session.stderr();
    ensure!(session.stop().is_some(), "mirrord did not stop: {stderr}");
    // The port is given back: nothing answers it in the pod any more.
    let out = curl_from_cluster(cluster, &url)?;
    ensure!(out.code != 0, "the port is still taken: {}", out.describe());
    Ok(())
}

pub fn incoming_mirror_copies_while_the_pod_answers(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let remote = site(scene, "remote", "remote\n")?;
    let _original = PodServer::start(scene, &pod, &remote)?;
    let url = format!("http://{}:{PORT}/index.html", pod.ip());
    curl_until(cluster, &url, "remote\n")?;
    let (session, log) = mirror_session(scene, &pod)?;
    let mirrored = format!("{url}?mirrored");
    let curl = ["-sS", "--max-time", "3", mirrored.as_str()];
    until_copied(cluster, &session, &curl, &log, "GET /index.html?mirrored")?;
    session.stop();
    Ok(())
}

/// Starts a session in the default mode (mirror) whose local app serves `local` on [`PORT`]
/// and logs each request it gets into the returned file.
pub(super) fn mirror_session(scene: &Scene, pod: &Pod) -> Result<(Running, PathBuf), Failed> {
    let local = site(scene, "local", "local\n")?;
    let log = scene.temp_dir().join("local-app.log");
    let server = strs(&python_server(scene, &local, PORT)?).join(" ");
    let command = format!("exec {server} 2>{}", log.display());
    let session = Running::start(scene, pod, &[], &["sh", "-c", &command])?;
    Ok((session, log))
}

/// Repeats `curl ARGS` from the cluster, each time checking that the client got the pod's
/// answer (`remote`), until the local app of a [`mirror_session`] has logged `seen`.
pub(super) fn until_copied(
    cluster: &Cluster,
    session: &Running,
    curl: &[&str],
    log: &Path,
    seen: &str,
) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut cmd = cluster.command("curl");
        cmd.args(curl);
        let out = cmd.run(RUN)?;
        ensure!(
            out.code == 0 && out.stdout == "remote\n",
            "the client did not get the pod's answer: {}",
            out.describe()
        );
        let logged = std::fs::read_to_string(log).unwrap_or_default();
        if logged.contains(seen) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the local app never saw a copy: {logged}; mirrord: {}",
            session.stderr()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

pub fn incoming_port_mapping_takes_the_remote_port_for_a_local_one(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let local = site(scene, "local", "local on 9090\n")?;
    let url = format!("http://{}:{PORT}/index.html", pod.ip());
    let mapping = format!("9090:{PORT}");
    let session = Running::start(
        scene,
        &pod,
        &["--steal", "-p", &mapping],
        &strs(&python_server(scene, &local, 9090)?),
    )?;
    curl_until(cluster, &url, "local on 9090\n")?;
    session.stop();
    Ok(())
}

/// The local app sees each client's own address (getpeername), or a stand-in for the pod's.
pub fn incoming_local_app_sees_the_clients_real_address(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let local = site(scene, "local", "local\n")?;
    let log = scene.temp_dir().join("local-app.log");
    let server = strs(&python_server(scene, &local, PORT)?).join(" ");
    let command = format!("exec {server} 2>{}", log.display());
    let url = format!("http://{}:{PORT}/index.html", pod.ip());
    let session = Running::start(scene, &pod, &["--steal"], &["sh", "-c", &command])?;
    curl_until(cluster, &url, "local\n")?;
    // From an address the client picks (the cluster's server address, not the pod link's end).
    let mut cmd = cluster.command("curl");
    let source = cluster.ip().to_string();
    cmd.args(["-sS", "--max-time", "3", "--interface", &source, &url]);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 0 && out.stdout == "local\n",
        "curl --interface: {}",
        out.describe()
    );
    // A client in the pod itself, by the pod's address: that address is the local app's own
    // too, so the connection comes from the IPv4 dummy address instead.
    let mut cmd = pod.command("curl");
    cmd.args(["-sS", "--max-time", "3", &url]);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 0 && out.stdout == "local\n",
        "curl in the pod: {}",
        out.describe()
    );
    session.stop();
    // The server logs the peer address (getpeername) first on each request line.
    let seen = std::fs::read_to_string(&log)?;
    for client in [cluster.ip().to_string(), "192.0.0.8".to_owned()] {
        ensure!(
            seen.lines()
                .any(|line| line.starts_with(&format!("{client} - - ["))),
            "the local app did not see the client {client}: {seen}"
        );
    }
    Ok(())
}

/// A client in the cluster that connects over IPv6 to the pod's IPv6 address gets the local
/// app's answer, and the local app sees the client's own IPv6 address.
pub fn incoming_steal_over_ipv6_shows_the_clients_real_address(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let pod_v6 = pod.add_ipv6()?;
    let local = site(scene, "local", "local\n")?;
    let log = scene.temp_dir().join("local-app.log");
    let mut server = python_server(scene, &local, PORT)?;
    server.push("::".to_owned());
    let command = format!("exec {} 2>{}", strs(&server).join(" "), log.display());
    let url = format!("http://[{pod_v6}]:{PORT}/index.html");
    let session = Running::start(scene, &pod, &["--steal"], &["sh", "-c", &command])?;
    curl_until(cluster, &url, "local\n")?;
    let stderr = session.stderr();
    ensure!(session.stop().is_some(), "mirrord did not stop: {stderr}");
    // The cluster's end of the pod's link: the address the client's kernel chose.
    let client = Ipv6Addr::from(u128::from(pod_v6) - 1).to_string();
    let seen = std::fs::read_to_string(&log)?;
    ensure!(
        seen.lines()
            .any(|line| line.starts_with(&format!("{client} - - ["))),
        "the local app did not see the client {client}: {seen}"
    );
    Ok(())
}

/// A command that starts a server on [`PORT`], fetches its page from inside its own namespace
/// and stops it.
fn listen_and_fetch(scene: &Scene, body: &str) -> Result<String, Failed> {
    let local = site(scene, "local", body)?;
    let server = strs(&python_server(scene, &local, PORT)?).join(" ");
    Ok(format!(
        "{server} >/dev/null 2>&1 & pid=$!; \
         for i in $(seq 50); do curl -sS --max-time 1 http://127.0.0.1:{PORT}/index.html 2>/dev/null && break; sleep 0.1; done; \
         sleep 0.5; kill $pid"
    ))
}

/// Runs with any agent: with incoming traffic off, a listening command never asks the agent
/// for anything (no warning, no refusal), and its listener works inside its namespace.
pub fn incoming_off_never_subscribes(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let script = listen_and_fetch(scene, "inside\n")?;
    let out = exec(scene, &pod, &["--no-incoming"], &["sh", "-c", &script])?;
    ensure!(
        out.code == 0 && out.stdout == "inside\n" && out.stderr.is_empty(),
        "{}",
        out.describe()
    );
    Ok(())
}

/// Runs with any agent: under the default (mirror), a command that listens runs as without
/// mirrord. An agent that cannot take incoming traffic yet (EOPNOTSUPP) costs one warning line,
/// not the session.
pub fn incoming_default_mirror_does_not_disturb_a_listening_command(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let script = listen_and_fetch(scene, "inside\n")?;
    let out = exec(scene, &pod, &[], &["sh", "-c", &script])?;
    let only_the_warning = out.stderr.lines().all(|line| {
        line.starts_with("mirrord: incoming traffic is off: ")
            && line.ends_with("; the command's ports get no traffic from the target")
    }) && out.stderr.lines().count() <= 1;
    ensure!(
        out.code == 0 && out.stdout == "inside\n" && only_the_warning,
        "{}",
        out.describe()
    );
    Ok(())
}

/// Runs with any agent: a filter that is not a regular expression is refused before anything
/// starts, in one line that names the key.
pub fn incoming_bad_filter_is_one_line_naming_the_key(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let config = scene.temp_dir().join("mirrord.json");
    std::fs::write(
        &config,
        r#"{"feature": {"network": {"incoming": {"mode": "steal", "http_filter": {"header_filter": "^x-user: (me"}}}}}"#,
    )?;
    let out = exec(
        scene,
        &pod,
        &["-f", &config.display().to_string()],
        &["true"],
    )?;
    ensure!(
        out.code == 125
            && out.stderr.trim_end()
                == "mirrord: feature.network.incoming.http_filter.header_filter is not a valid regular expression: unclosed group",
        "{}",
        out.describe()
    );
    Ok(())
}
