//! The agent's incoming traffic, end to end at the agent's level: a real agent against a fake
//! pod running a real HTTP server that answers `remote`, a hand-written protocol client as the
//! session, and curl from the cluster as the pod's client. Steal hands the connection to the
//! session, mirror copies it while the pod answers, and however the agent ends — its session
//! closed, or the agent SIGKILLed — the pod answers `remote` again and no mirrord table is left
//! in its network namespace. Everything runs inside the isolated world (see
//! `mirrord_tests::world`).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libtest_mimic::{Arguments, Failed, Trial};
use mirrord_link::endpoint::Endpoint;
use mirrord_link::frames::{FrameReader, write_loop};
use mirrord_link::greet::greet;
use mirrord_link::streams::{StreamRx, Streams};
use mirrord_protocol::greeting::Greeting;
use mirrord_protocol::handshake::{check_welcome, client_hello};
use mirrord_protocol::incoming::{HttpFilter, IncomingConnection, IncomingMode, Subscription};
use mirrord_protocol::mux::Side;
use mirrord_protocol::{
    AgentMessage, ClientMessage, RemoteError, Request, Response, StreamFrame, StreamTarget,
};
use mirrord_tests::command::{Run, SHORT};
use mirrord_tests::world::{self, Entered};
use mirrord_tests::{Cluster, HandStartedAgent, Pod, Scene, check_world};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const TOKEN: &str = "incoming-test-token";
const PORT: u16 = 8080;
/// How long a connection handed to the session may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(10);
const LOCAL_ANSWER: &[u8] =
    b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nlocal";

macro_rules! ensure {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Failed::from(format!($($msg)+)));
        }
    };
}

fn main() -> ExitCode {
    match world::enter() {
        Ok(Entered::Exited(code)) => return code,
        Ok(Entered::Inside) => {}
        Err(error) => {
            eprintln!("incoming: cannot enter the isolated world: {error}");
            return ExitCode::from(2);
        }
    }
    type Test = fn(&Scene, &Cluster) -> Result<(), Failed>;
    let tests: [(&str, Test); 8] = [
        (
            "steal_hands_the_connection_to_the_session_until_it_closes",
            steal_hands_the_connection_to_the_session_until_it_closes,
        ),
        (
            "a_killed_agent_leaves_no_redirect",
            a_killed_agent_leaves_no_redirect,
        ),
        (
            "mirror_copies_the_request_while_the_pod_answers",
            mirror_copies_the_request_while_the_pod_answers,
        ),
        (
            "a_mirror_that_never_reads_does_not_slow_the_connection",
            a_mirror_that_never_reads_does_not_slow_the_connection,
        ),
        (
            "a_second_steal_is_refused_unless_it_overrides",
            a_second_steal_is_refused_unless_it_overrides,
        ),
        (
            "without_nft_or_net_admin_subscribe_says_which_in_one_line",
            without_nft_or_net_admin_subscribe_says_which_in_one_line,
        ),
        (
            "a_bad_filter_pattern_is_refused_in_one_line",
            a_bad_filter_pattern_is_refused_in_one_line,
        ),
        (
            "a_dead_agents_table_is_swept_at_start",
            a_dead_agents_table_is_swept_at_start,
        ),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            Trial::test(name, move || {
                let scene = Scene::new(name)?;
                let result = Cluster::new(&scene)
                    .map_err(Failed::from)
                    .and_then(|cluster| test(&scene, &cluster));
                let left = scene.check_nothing_left();
                result?;
                left.map_err(Failed::from)
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&Arguments::from_args(), trials);
    if let Err(error) = check_world() {
        eprintln!("incoming: after all tests: {error}");
        return ExitCode::FAILURE;
    }
    conclusion.exit_code()
}

/// A pod whose app answers `remote` on [`PORT`]; the server dies with the returned guard.
struct Web<'c> {
    pod: Pod<'c>,
    server: std::process::Child,
}

impl Drop for Web<'_> {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

impl Web<'_> {
    fn start<'c>(scene: &Scene, cluster: &'c Cluster) -> Result<Web<'c>, Failed> {
        let pod = Pod::builder("web").start(cluster)?;
        let dir = scene.temp_dir().join("www");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("index.html"), "remote")?;
        let mut server = scene
            .command("nsenter")
            .args(["-t", &pod.pid().to_string(), "-n", "--", "/usr/bin/python3"])
            .args([
                "-u",
                "-m",
                "http.server",
                &PORT.to_string(),
                "--bind",
                "0.0.0.0",
            ])
            .arg("--directory")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdout = server.stdout.take();
        let web = Web { pod, server };
        let ready = stdout.and_then(|out| mirrord_tests::command::first_line(out, SHORT));
        ensure!(
            ready
                .as_deref()
                .is_some_and(|l| l.starts_with("Serving HTTP")),
            "the pod's HTTP server did not start: {ready:?}"
        );
        Ok(web)
    }

    fn url(&self) -> String {
        format!("http://{}:{PORT}/", self.pod.ip())
    }

    /// What curl from the cluster gets from the pod.
    fn curl(&self) -> Result<String, Failed> {
        let out = self
            .pod
            .cluster()
            .command("curl")
            .args(["-sS", "-m", "10", &self.url()])
            .run(Duration::from_secs(15))?;
        ensure!(out.code == 0, "curl {}: {}", self.url(), out.describe());
        Ok(out.stdout)
    }

    /// The mirrord tables in the pod's network namespace.
    fn mirrord_tables(&self) -> Result<Vec<String>, Failed> {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &self.pod.pid().to_string(),
                "-n",
                "--",
                "nft",
                "list",
                "tables",
            ])
            .run(SHORT)?;
        ensure!(out.code == 0, "nft list tables: {}", out.describe());
        Ok(out
            .stdout
            .lines()
            .filter(|l| l.contains("mirrord_"))
            .map(str::to_owned)
            .collect())
    }

    /// Waits until nothing of the agent is in the pod: `remote` answers and no table.
    fn wait_untouched(&self) -> Result<(), Failed> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let tables = self.mirrord_tables()?;
            if tables.is_empty() {
                let answer = self.curl()?;
                ensure!(
                    answer == "remote",
                    "the pod answered {answer:?} after the agent"
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "a mirrord table is left in the pod: {tables:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn start_agent(
    scene: &Scene,
    pod: &Pod,
    wrap: &[&str],
    env: &[(&str, &str)],
) -> Result<HandStartedAgent, Failed> {
    let agent = mirrord_tests::agent_binary()?;
    let mut cmd = match wrap.split_first() {
        Some((program, args)) => {
            let mut cmd = scene.command(program);
            cmd.args(args).arg(agent);
            cmd
        }
        None => scene.command(agent),
    };
    cmd.args(["--target-pid", &pod.pid().to_string()])
        .env("MIRRORD_AGENT_TOKEN", TOKEN)
        .env("MIRRORD_AGENT_LOG", "debug");
    for (key, value) in env {
        cmd.env(key, value);
    }
    Ok(HandStartedAgent::start(cmd, SHORT)?)
}

/// A hand-written session: greeting, hello, requests, and the incoming streams the agent opens.
struct Session {
    out_tx: mpsc::Sender<ClientMessage>,
    streams: Arc<Streams<ClientMessage>>,
    responses: mpsc::UnboundedReceiver<(u64, Result<Response, RemoteError>)>,
    incoming: mpsc::UnboundedReceiver<(StreamRx, IncomingConnection)>,
    next_id: u64,
    reader: tokio::task::JoinHandle<()>,
}

impl Session {
    async fn open(addr: &str) -> Result<Session, Failed> {
        let endpoint: Endpoint = addr.parse().map_err(|e| format!("{e}"))?;
        let (mut read, mut write) = endpoint.connect().await?;
        let theirs = greet(&mut read, &mut write, &Greeting::ours("incoming-test"))
            .await
            .map_err(|e| format!("greeting: {e}"))?;
        ensure!(theirs.compatible(), "agent greeting {theirs:?}");
        let (out_tx, out_rx) = mpsc::channel(256);
        tokio::spawn(write_loop(write, out_rx));
        out_tx
            .send(client_hello(TOKEN.as_bytes()))
            .await
            .map_err(|_| "writer gone")?;
        let mut reader = FrameReader::new(read);
        let welcome: AgentMessage = reader.next().await.map_err(|e| format!("{e}"))?;
        check_welcome(welcome).map_err(|e| format!("welcome: {e}"))?;
        let streams = Streams::new(Side::Client, out_tx.clone());
        let (responses_tx, responses) = mpsc::unbounded_channel();
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        let (streams2, out_tx2) = (streams.clone(), out_tx.clone());
        let reader = tokio::spawn(async move {
            while let Ok(message) = reader.next::<AgentMessage>().await {
                match message {
                    AgentMessage::Response { id, response } => {
                        let _ = responses_tx.send((id, response));
                    }
                    AgentMessage::Ping { nonce } => {
                        let _ = out_tx2.send(ClientMessage::Pong { nonce }).await;
                    }
                    AgentMessage::Stream(StreamFrame::Open { id, target }) => {
                        let rx = streams2.accept(id, &target).expect("a fresh stream id");
                        let StreamTarget::Incoming(connection) = target else {
                            panic!("the agent opened a stream to {target:?}");
                        };
                        streams2.send(StreamFrame::Opened { id }).await;
                        let _ = incoming_tx.send((rx, connection));
                    }
                    AgentMessage::Stream(frame) => streams2.on_frame(frame).expect("a valid frame"),
                    _ => {}
                }
            }
        });
        Ok(Session {
            out_tx,
            streams,
            responses,
            incoming,
            next_id: 1,
            reader,
        })
    }

    async fn request(&mut self, request: Request) -> Result<Result<Response, RemoteError>, Failed> {
        let id = self.next_id;
        self.next_id += 1;
        self.out_tx
            .send(ClientMessage::Request { id, request })
            .await
            .map_err(|_| "the session's writer is gone")?;
        let answer = tokio::time::timeout(SHORT, self.responses.recv())
            .await
            .map_err(|_| "no answer within 10 s")?
            .ok_or("the agent closed the session")?;
        ensure!(answer.0 == id, "answer to {} instead of {id}", answer.0);
        Ok(answer.1)
    }

    async fn subscribe(
        &mut self,
        mode: IncomingMode,
        override_steal: bool,
    ) -> Result<Result<Response, RemoteError>, Failed> {
        self.subscribe_port(PORT, mode, override_steal).await
    }

    async fn subscribe_port(
        &mut self,
        port: u16,
        mode: IncomingMode,
        override_steal: bool,
    ) -> Result<Result<Response, RemoteError>, Failed> {
        self.request(Request::Subscribe(Subscription {
            port,
            mode,
            filter: None,
            override_steal,
        }))
        .await
    }

    /// The next connection the agent hands over, piped to a local end the test drives.
    async fn next_connection(
        &mut self,
    ) -> Result<(IncomingConnection, tokio::io::DuplexStream), Failed> {
        let (rx, connection) = tokio::time::timeout(ARRIVAL, self.incoming.recv())
            .await
            .map_err(|_| "no incoming connection within 10 s")?
            .ok_or("the session ended")?;
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(self.streams.clone().pipe(theirs, rx));
        Ok((connection, ours))
    }

    /// Ends the session as a CLI does when it exits.
    fn close(self) {
        self.reader.abort();
        drop(self.out_tx);
    }
}

/// Reads one HTTP request's head.
async fn read_request(local: &mut tokio::io::DuplexStream) -> Result<String, Failed> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(ARRIVAL, local.read(&mut buf))
            .await
            .map_err(|_| "no request bytes within 10 s")??;
        ensure!(
            n > 0,
            "the stream ended before a whole request: {request:?}"
        );
        request.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&request).into_owned())
}

fn runtime() -> Result<tokio::runtime::Runtime, Failed> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// curl from the cluster (or from inside the pod) to `url`, run while the test plays the
/// session.
fn curl_meanwhile(
    web: &Web,
    from_the_pod: bool,
    url: &str,
) -> tokio::task::JoinHandle<mirrord_tests::Result<mirrord_tests::Output>> {
    let mut cmd = if from_the_pod {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &web.pod.pid().to_string(), "-n", "--", "curl"]);
        cmd
    } else {
        web.pod.cluster().command("curl")
    };
    cmd.args(["-sS", "-m", "10", url]);
    tokio::task::spawn_blocking(move || cmd.run(Duration::from_secs(15)))
}

/// A stolen connection reaches the session with the client's address and the pod's, the
/// session's answer reaches the client, and when the session closes the pod is left as it was.
fn steal_hands_the_connection_to_the_session_until_it_closes(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let web = Web::start(scene, cluster)?;
    ensure!(
        web.curl()? == "remote",
        "the pod's app does not answer before the agent"
    );
    let agent = start_agent(scene, &web.pod, &[], &[])?;
    runtime()?.block_on(async {
        let mut session = Session::open(agent.addr()).await?;
        let subscribed = session.subscribe(IncomingMode::Steal, false).await?;
        ensure!(
            subscribed == Ok(Response::Subscribed),
            "subscribe: {subscribed:?}; agent: {}",
            agent.stderr()
        );
        ensure!(
            web.mirrord_tables()?.len() == 1,
            "no table while subscribed"
        );
        let curl = curl_meanwhile(&web, false, &web.url());
        let (connection, mut local) = session.next_connection().await?;
        ensure!(
            connection.port == PORT && connection.mode == IncomingMode::Steal,
            "{connection:?}"
        );
        ensure!(
            connection.destination == SocketAddr::from((web.pod.ip(), PORT)),
            "destination {} instead of the pod's {}:{PORT}",
            connection.destination,
            web.pod.ip()
        );
        ensure!(
            connection.peer.ip() == IpAddr::from(web.pod.gateway()),
            "peer {} instead of the cluster side {}",
            connection.peer,
            web.pod.gateway()
        );
        let request = read_request(&mut local).await?;
        ensure!(
            request.starts_with("GET / HTTP/1.1\r\n"),
            "request {request:?}"
        );
        local.write_all(LOCAL_ANSWER).await?;
        local.shutdown().await?;
        let out = curl.await.map_err(|e| format!("{e}"))??;
        ensure!(
            out.code == 0 && out.stdout == "local",
            "curl through the steal: {}",
            out.describe()
        );

        // The pod's own connection to its address is taken too; one over loopback is not.
        let inside = curl_meanwhile(&web, true, &web.url());
        let (connection, mut local) = session.next_connection().await?;
        ensure!(
            connection.peer.ip() == IpAddr::from(web.pod.ip()),
            "peer {} of the pod's own connection",
            connection.peer
        );
        read_request(&mut local).await?;
        local.write_all(LOCAL_ANSWER).await?;
        local.shutdown().await?;
        let out = inside.await.map_err(|e| format!("{e}"))??;
        ensure!(
            out.stdout == "local",
            "curl from the pod itself: {}",
            out.describe()
        );
        let loopback = format!("http://127.0.0.1:{PORT}/");
        let out = curl_meanwhile(&web, true, &loopback)
            .await
            .map_err(|e| format!("{e}"))??;
        ensure!(
            out.stdout == "remote",
            "curl over the pod's loopback: {}",
            out.describe()
        );
        session.close();
        Ok::<_, Failed>(())
    })?;
    web.wait_untouched()?;
    drop(agent);
    Ok(())
}

/// However the agent ends — its serving process SIGKILLed (no chance to clean up, as by the
/// OOM killer), SIGTERM to the agent as the CLI and a container runtime send it, SIGINT or
/// SIGTERM to its whole process group as a terminal or a supervisor send them — its guard
/// removes the redirect, the pod answers `remote` again, and the agent's exit status is the
/// serving process's.
fn a_killed_agent_leaves_no_redirect(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    enum Whom {
        Serving,
        Agent,
        Group,
    }
    let web = Web::start(scene, cluster)?;
    for (signal, whom) in [
        (Signal::SIGKILL, Whom::Serving),
        (Signal::SIGTERM, Whom::Agent),
        (Signal::SIGINT, Whom::Group),
        (Signal::SIGTERM, Whom::Group),
    ] {
        let mut agent = start_agent(scene, &web.pod, &[], &[])?;
        let what = match whom {
            Whom::Serving => format!("{signal} to the serving process"),
            Whom::Agent => format!("{signal} to the agent"),
            Whom::Group => format!("{signal} to the agent's process group"),
        };
        runtime()?.block_on(async {
            let mut session = Session::open(agent.addr()).await?;
            let subscribed = session.subscribe(IncomingMode::Steal, false).await?;
            ensure!(
                subscribed == Ok(Response::Subscribed),
                "subscribe: {subscribed:?}"
            );
            ensure!(
                web.mirrord_tables()?.len() == 1,
                "no table while subscribed"
            );
            let pid = Pid::from_raw(agent.pid() as i32);
            let sent = match whom {
                Whom::Serving => kill(serving_process(agent.pid())?, signal),
                Whom::Agent => kill(pid, signal),
                Whom::Group => killpg(pid, signal),
            };
            sent.map_err(|e| format!("{what}: {e}"))?;
            Ok::<_, Failed>(())
        })?;
        let status = agent.wait_exit(SHORT);
        let expected = 128 + signal as i32;
        ensure!(
            status.and_then(|s| s.code()) == Some(expected),
            "after {what} the agent's status is {status:?}, not exit {expected}; agent: {}",
            agent.stderr()
        );
        web.wait_untouched()
            .map_err(|e| format!("after {what}: {}", e.message().unwrap_or("")))?;
    }
    Ok(())
}

/// The agent's serving process: the one child of the agent (its guard).
fn serving_process(agent: u32) -> Result<nix::unistd::Pid, Failed> {
    let children = std::fs::read_to_string(format!("/proc/{agent}/task/{agent}/children"))?;
    let pids: Vec<&str> = children.split_whitespace().collect();
    match pids.as_slice() {
        [pid] => Ok(nix::unistd::Pid::from_raw(
            pid.parse().map_err(|e| format!("{e}"))?,
        )),
        other => Err(format!("the agent has children {other:?}, not one serving process").into()),
    }
}

/// In mirror mode the pod's app answers as if nothing happened, and the session gets a copy of
/// the request; what it writes back goes nowhere.
fn mirror_copies_the_request_while_the_pod_answers(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let web = Web::start(scene, cluster)?;
    let agent = start_agent(scene, &web.pod, &[], &[])?;
    runtime()?.block_on(async {
        let mut session = Session::open(agent.addr()).await?;
        let subscribed = session.subscribe(IncomingMode::Mirror, false).await?;
        ensure!(
            subscribed == Ok(Response::Subscribed),
            "subscribe: {subscribed:?}"
        );
        let curl = curl_meanwhile(&web, false, &web.url());
        let (connection, mut local) = session.next_connection().await?;
        ensure!(connection.mode == IncomingMode::Mirror, "{connection:?}");
        ensure!(
            connection.destination == SocketAddr::from((web.pod.ip(), PORT)),
            "{connection:?}"
        );
        // Answered before reading: the answer must not reach the client.
        local.write_all(LOCAL_ANSWER).await?;
        let request = read_request(&mut local).await?;
        ensure!(
            request.starts_with("GET / HTTP/1.1\r\n"),
            "copied request {request:?}"
        );
        let out = curl.await.map_err(|e| format!("{e}"))??;
        ensure!(
            out.code == 0 && out.stdout == "remote",
            "curl through the mirror: {}",
            out.describe()
        );
        session.close();
        Ok::<_, Failed>(())
    })?;
    web.wait_untouched()?;
    drop(agent);
    Ok(())
}

/// A mirroring session that never reads its copies (a dead or slow CLI) does not hold the real
/// connection back: 8 MiB through the pod's echo server come back whole, while the copy, once
/// its backlog is full, is dropped.
fn a_mirror_that_never_reads_does_not_slow_the_connection(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    const ECHO_PORT: u16 = 9090;
    let web = Web::start(scene, cluster)?;
    let mut echo = scene
        .command("nsenter")
        .args(["-t", &web.pod.pid().to_string(), "-n", "--", "socat"])
        .arg(format!("TCP-LISTEN:{ECHO_PORT},fork,reuseaddr"))
        .arg("EXEC:cat")
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()?;
    let result = (|| {
        let agent = start_agent(scene, &web.pod, &[], &[])?;
        runtime()?.block_on(async {
            let mut session = Session::open(agent.addr()).await?;
            let subscribed = session
                .subscribe_port(ECHO_PORT, IncomingMode::Mirror, false)
                .await?;
            ensure!(
                subscribed == Ok(Response::Subscribed),
                "subscribe: {subscribed:?}"
            );
            let script = "import socket, sys, threading\n\
                s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)\n\
                data = bytes(range(256)) * (8 * 4096)\n\
                def send():\n    s.sendall(data); s.shutdown(socket.SHUT_WR)\n\
                t = threading.Thread(target=send); t.start()\n\
                got = bytearray()\n\
                while True:\n    b = s.recv(1 << 16)\n    if not b: break\n    got += b\n\
                t.join()\n\
                print('intact' if got == data else f'corrupt: {len(got)} bytes')\n";
            let mut cmd = web.pod.cluster().command("/usr/bin/python3");
            cmd.args([
                "-c",
                script,
                &web.pod.ip().to_string(),
                &ECHO_PORT.to_string(),
            ]);
            let out = tokio::task::spawn_blocking(move || cmd.run(Duration::from_secs(30)))
                .await
                .map_err(|e| format!("{e}"))??;
            ensure!(
                out.code == 0 && out.stdout == "intact\n",
                "8 MiB through the echo server while mirrored: {}",
                out.describe()
            );
            ensure!(
                session.incoming.try_recv().is_ok(),
                "the session was not offered the mirrored connection"
            );
            // 8 MiB is far more than the stream's window and the copy's backlog hold.
            ensure!(
                agent.stderr().contains("fell behind; its copy is dropped"),
                "the unread copy was not dropped; agent: {}",
                agent.stderr()
            );
            session.close();
            Ok::<_, Failed>(())
        })?;
        web.wait_untouched()?;
        drop(agent);
        Ok(())
    })();
    if let Ok(pid) = i32::try_from(echo.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = echo.wait();
    result
}

/// Two sessions of one agent: the second whole steal of a port is refused in one line, unless
/// it overrides; then it gets the connections.
fn a_second_steal_is_refused_unless_it_overrides(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let web = Web::start(scene, cluster)?;
    let agent = start_agent(scene, &web.pod, &[], &[])?;
    runtime()?.block_on(async {
        let mut first = Session::open(agent.addr()).await?;
        let mut second = Session::open(agent.addr()).await?;
        ensure!(
            first.subscribe(IncomingMode::Steal, false).await? == Ok(Response::Subscribed),
            "first"
        );
        let refused = second.subscribe(IncomingMode::Steal, false).await?;
        let Err(error) = refused else {
            return Err(format!("a second steal was accepted: {refused:?}").into());
        };
        ensure!(
            error
                .message
                .starts_with("port 8080 is already stolen by another session")
                && !error.message.contains('\n'),
            "refusal: {:?}",
            error.message
        );
        ensure!(
            second.subscribe(IncomingMode::Steal, true).await? == Ok(Response::Subscribed),
            "override"
        );
        let curl = curl_meanwhile(&web, false, &web.url());
        let (_, mut local) = second.next_connection().await?;
        read_request(&mut local).await?;
        local.write_all(LOCAL_ANSWER).await?;
        local.shutdown().await?;
        let out = curl.await.map_err(|e| format!("{e}"))??;
        ensure!(
            out.stdout == "local",
            "curl after the override: {}",
            out.describe()
        );
        ensure!(
            first.incoming.try_recv().is_err(),
            "the overridden session got a connection"
        );
        // The first session's end gives nothing back: the second still steals.
        first.close();
        ensure!(
            second.request(Request::Unsubscribe { port: PORT }).await?
                == Ok(Response::Unsubscribed),
            "unsubscribe"
        );
        second.close();
        Ok::<_, Failed>(())
    })?;
    web.wait_untouched()?;
    drop(agent);
    Ok(())
}

/// No `nft` in the agent, or no NET_ADMIN: the subscription fails with one line naming which,
/// on the real paths (a missing program; capabilities really dropped), and the pod is untouched.
fn without_nft_or_net_admin_subscribe_says_which_in_one_line(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let web = Web::start(scene, cluster)?;
    let missing = "/nonexistent/nft";
    /// A command wrapping the agent, the agent's extra environment, the expected refusal.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], String);
    let cases: [Case; 2] = [
        (
            &[],
            &[("MIRRORD_AGENT_NFT", missing)],
            format!(
                "cannot redirect port {PORT} in the target: the nft program ({missing}) was not found in the agent; install nftables in its image"
            ),
        ),
        (
            &[
                "setpriv",
                "--inh-caps=-net_admin",
                "--bounding-set=-net_admin",
                "--",
            ],
            &[],
            format!("cannot redirect port {PORT} in the target: the agent lacks NET_ADMIN"),
        ),
    ];
    for (wrap, env, expected) in cases {
        let agent = start_agent(scene, &web.pod, wrap, env)?;
        runtime()?.block_on(async {
            let mut session = Session::open(agent.addr()).await?;
            let refused = session.subscribe(IncomingMode::Steal, false).await?;
            ensure!(
                matches!(&refused, Err(error) if error.message == expected),
                "expected {expected:?}, got {refused:?}"
            );
            session.close();
            Ok::<_, Failed>(())
        })?;
        drop(agent);
        web.wait_untouched()?;
    }
    Ok(())
}

fn a_bad_filter_pattern_is_refused_in_one_line(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let web = Web::start(scene, cluster)?;
    let agent = start_agent(scene, &web.pod, &[], &[])?;
    runtime()?.block_on(async {
        let mut session = Session::open(agent.addr()).await?;
        let refused = session
            .request(Request::Subscribe(Subscription {
                port: PORT,
                mode: IncomingMode::Steal,
                filter: Some(HttpFilter::Path("^/api/(".into())),
                override_steal: false,
            }))
            .await?;
        ensure!(
            matches!(&refused, Err(e) if e.message.starts_with("HTTP filter pattern \"^/api/(\" is not a valid regular expression") && !e.message.contains('\n')),
            "{refused:?}"
        );
        session.close();
        Ok::<_, Failed>(())
    })?;
    drop(agent);
    web.wait_untouched()
}

/// An agent killed together with its guard (SIGKILL to the guard and its whole process group, as
/// when its container is killed at once) leaves its table: nothing of it runs any more. The next agent
/// that starts removes it, as the name says its owner is dead; a table whose owner is in another
/// pid namespace (which this agent cannot judge) is kept.
fn a_dead_agents_table_is_swept_at_start(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let web = Web::start(scene, cluster)?;
    let mut first = start_agent(scene, &web.pod, &[], &[])?;
    runtime()?.block_on(async {
        let mut session = Session::open(first.addr()).await?;
        let subscribed = session.subscribe(IncomingMode::Steal, false).await?;
        ensure!(
            subscribed == Ok(Response::Subscribed),
            "subscribe: {subscribed:?}"
        );
        Ok::<_, Failed>(())
    })?;
    // The guard first, then the rest of the group: killed in one `killpg`, the serving process
    // may die first and its guard, woken by that before its own SIGKILL lands, remove the table.
    let guard = nix::unistd::Pid::from_raw(first.pid() as i32);
    nix::sys::signal::kill(guard, nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("kill: {e}"))?;
    match nix::sys::signal::killpg(guard, nix::sys::signal::Signal::SIGKILL) {
        // The serving process already died with its guard (its parent-death signal).
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(format!("killpg: {e}").into()),
    }
    ensure!(
        first.wait_exit(SHORT).is_some(),
        "the agent survived SIGKILL"
    );
    let dead = format!("_{}_", first.pid());
    let left = web.mirrord_tables()?;
    ensure!(
        left.iter().any(|t| t.contains(&dead)),
        "expected the killed agent's table, found {left:?}"
    );

    let pid_ns = std::fs::metadata("/proc/self/ns/pid")?.ino();
    let foreign = format!("mirrord_{}_1_1", pid_ns + 1);
    let nft = |batch: String| -> Result<(), Failed> {
        let out = Command::new("sh")
            .args([
                "-c",
                "printf '%s' \"$1\" | nsenter -t \"$2\" -n -- nft -f -",
                "sh",
                &batch,
                &web.pod.pid().to_string(),
            ])
            .run(SHORT)?;
        ensure!(out.code == 0, "nft: {}", out.describe());
        Ok(())
    };
    nft(format!("table inet {foreign} {{}}\n"))?;
    let second = start_agent(scene, &web.pod, &[], &[])?;
    let deadline = Instant::now() + SHORT;
    let tables = loop {
        let tables = web.mirrord_tables()?;
        if !tables.iter().any(|t| t.contains(&dead)) || Instant::now() > deadline {
            break tables;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(second);
    let kept = tables.iter().any(|t| t.contains(&foreign));
    nft(format!(
        "table inet {foreign} {{}}\ndelete table inet {foreign}\n"
    ))?;
    ensure!(
        !tables.iter().any(|t| t.contains(&dead)),
        "the dead agent's table is still there: {tables:?}"
    );
    ensure!(
        kept,
        "another pid namespace's table was removed: {tables:?}"
    );
    web.wait_untouched()
}
