//! Incoming traffic's HTTP filters through `mirrord exec`, and what a session leaves in the pod
//! when it ends: a client in the cluster talks to the pod's address; requests that match the
//! session's filter are answered by the local app (`local`), the rest by the pod's own app
//! (`remote`), request by request on one connection, per stream over h2c (gRPC), and across a
//! WebSocket upgrade. However mirrord ends, the pod's port is given back and no `mirrord_`
//! nftables table stays in its namespace.
//!
//! Several sessions filter one port only through one agent (`--agent-addr`): two
//! `mirrord exec -t POD` start an agent each, and the second agent refuses a port the first one
//! already redirects, in one line, rather than taking its connections silently.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use mirrord_tests::command::Run;
use mirrord_tests::{Cluster, Output, Pod, Scene};

use super::incoming::{PORT, PodServer, Running, curl_from_cluster, curl_until};
use super::{RUN, standard_pod, start_agent};

/// The token of the agent started by hand for shared sessions.
const TOKEN: &str = "filters-token";

/// The python with grpcio and websockets (Debian's); the PATH's one lacks them.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// How long a filtered session takes to start routing, and a guard to drop the redirect.
const SETTLE: Duration = Duration::from_secs(15);

/// An HTTP/1.1 server (keep-alive, unlike `http.server`'s default HTTP/1.0) answering every
/// GET and POST on `PORT` with `ANSWER\n`. A request for `/quit` is answered, then the server
/// ends, so a command under mirrord can finish on the client's word. Binds without looking its
/// own name up (see `incoming::SERVE_PY`).
const ANSWER_PY: &str = r#"
import http.server, socketserver, sys, threading
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (sys.argv[2] + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if self.path == "/quit":
            threading.Thread(target=self.server.shutdown).start()
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "test", self.server_address[1]
Server(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"#;

/// The command line of an [`ANSWER_PY`] server on [`PORT`] answering `answer`.
fn answer_server(scene: &Scene, answer: &str) -> Result<Vec<String>, Failed> {
    let script = scene.temp_dir().join("answer.py");
    std::fs::write(&script, ANSWER_PY)?;
    Ok(vec![
        "python3".to_owned(),
        "-u".to_owned(),
        script.display().to_string(),
        PORT.to_string(),
        answer.to_owned(),
    ])
}

/// Starts a session with `flags` whose local app is an [`ANSWER_PY`] server answering `answer`.
fn session_answering(
    scene: &Scene,
    pod: &Pod,
    flags: &[&str],
    answer: &str,
) -> Result<Running, Failed> {
    Running::start(
        scene,
        pod,
        flags,
        &super::incoming::strs(&answer_server(scene, answer)?),
    )
}

/// Starts a session that steals the pod's port whole for an [`ANSWER_PY`] server answering
/// `answer`, and waits until a client in the cluster gets that answer.
fn steal_answered_by(
    scene: &Scene,
    cluster: &Cluster,
    pod: &Pod,
    answer: &str,
) -> Result<Running, Failed> {
    let session = session_answering(scene, pod, &["--steal"], answer)?;
    curl_until(cluster, &url(pod, "/"), &format!("{answer}\n"))?;
    Ok(session)
}

/// A fixture script of the tests crate (`tests/fixtures/NAME`).
fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Starts `args` in the pod (its own app), stopped when dropped.
fn pod_app(pod: &Pod, args: &[String]) -> Result<PodServer, Failed> {
    let mut cmd: Command = pod.command(&args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(PodServer(cmd.spawn()?))
}

/// A `mirrord.json` for a stolen port with `http_filter` set to `filter` (JSON).
fn filter_config(scene: &Scene, name: &str, filter: &str) -> Result<String, Failed> {
    let path = scene.temp_dir().join(format!("{name}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{"feature": {{"network": {{"incoming": {{"mode": "steal", "http_filter": {filter}}}}}}}}}"#
        ),
    )?;
    Ok(path.display().to_string())
}

/// `program args…` in the cluster namespace.
fn from_cluster(cluster: &Cluster, program: &str, args: &[&str]) -> Result<Output, Failed> {
    let mut cmd = cluster.command(program);
    cmd.args(args);
    Ok(cmd.run(RUN)?)
}

/// Repeats a client in the cluster until it prints `expected` (a session starts routing a
/// moment after its app listens).
fn until(cluster: &Cluster, program: &str, args: &[&str], expected: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let out = from_cluster(cluster, program, args)?;
        if out.code == 0 && out.stdout == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{program} {args:?} never printed {expected:?}: {}",
                out.describe()
            )
            .into());
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// A client in the cluster prints exactly `expected`, once.
fn expect(cluster: &Cluster, program: &str, args: &[&str], expected: &str) -> Result<(), Failed> {
    let out = from_cluster(cluster, program, args)?;
    ensure!(
        out.code == 0 && out.stdout == expected,
        "{program} {args:?}: expected {expected:?}: {}",
        out.describe()
    );
    Ok(())
}

fn url(pod: &Pod, path: &str) -> String {
    format!("http://{}:{PORT}{path}", pod.ip())
}

pub fn filter_header_routes_each_request_of_one_keep_alive_connection(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    let page = url(&pod, "/");
    curl_until(cluster, &page, "remote\n")?;
    let config = filter_config(scene, "filter", r#"{"header_filter": "^x-user: me$"}"#)?;
    let session = session_answering(scene, &pod, &["-f", &config], "local")?;
    let me = ["-sS", "--max-time", "3", "-H", "X-User: me", page.as_str()];
    until(cluster, "curl", &me, "local\n")?;
    // Four requests on one connection: curl reuses it across --next; each transfer prints its
    // answer, then how many connections it opened.
    let out = from_cluster(
        cluster,
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-w",
            "[%{num_connects}]",
            &page,
            "--next",
            "-w",
            "[%{num_connects}]",
            "-H",
            "X-User: me",
            &page,
            "--next",
            "-w",
            "[%{num_connects}]",
            "-H",
            "X-User: someone-else",
            &page,
            "--next",
            "-w",
            "[%{num_connects}]",
            "-H",
            "X-User: me",
            &page,
        ],
    )?;
    ensure!(
        out.code == 0 && out.stdout == "remote\n[1]local\n[0]remote\n[0]local\n[0]",
        "one connection, answered per request: {}; mirrord: {}",
        out.describe(),
        session.stderr()
    );
    session.stop();
    curl_until(cluster, &page, "remote\n")?;
    expect(cluster, "curl", &me, "remote\n")?;
    Ok(())
}

/// gRPC is h2c: each call is a stream of an HTTP/2 connection, routed on its metadata — also
/// four calls on one channel (one connection), alternately with and without the header, each
/// answered by its own side.
pub fn filter_header_routes_grpc_calls_by_metadata(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let grpc = fixture("grpc_say.py");
    let serve = |answer: &str| {
        [SYSTEM_PYTHON, &grpc, "serve", &PORT.to_string(), answer].map(str::to_owned)
    };
    let _original = pod_app(&pod, &serve("remote"))?;
    let target = format!("{}:{PORT}", pod.ip());
    let plain = [grpc.as_str(), "call", &target];
    let me = [grpc.as_str(), "call", &target, "x-user=me"];
    until(cluster, SYSTEM_PYTHON, &plain, "remote\n")?;
    let config = filter_config(scene, "filter", r#"{"header_filter": "^x-user: me$"}"#)?;
    let local = serve("local");
    let session = Running::start(
        scene,
        &pod,
        &["-f", &config],
        &super::incoming::strs(&local),
    )?;
    until(cluster, SYSTEM_PYTHON, &me, "local\n")?;
    expect(cluster, SYSTEM_PYTHON, &plain, "remote\n")?;
    expect(cluster, SYSTEM_PYTHON, &me, "local\n")?;
    let one_channel = [
        grpc.as_str(),
        "calls",
        &target,
        "-",
        "x-user=me",
        "-",
        "x-user=me",
    ];
    expect(
        cluster,
        SYSTEM_PYTHON,
        &one_channel,
        "remote\nlocal\nremote\nlocal\n",
    )?;
    let stderr = session.stderr();
    ensure!(session.stop().is_some(), "mirrord did not stop: {stderr}");
    Ok(())
}

/// An nginx in the foreground answering every request on [`PORT`] with `ANSWER\n` over h2c
/// (HTTP/2 with prior knowledge, no TLS); its files under the scene's `name` directory.
fn h2c_nginx(scene: &Scene, name: &str, answer: &str) -> Result<Vec<String>, Failed> {
    let dir = scene.temp_dir().join(name);
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; pid {d}/pid; error_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; default_type text/plain;\n\
             server {{ listen {PORT} http2; location / {{ return 200 \"{answer}\\n\"; }} }} }}\n"
        ),
    )?;
    Ok(["/usr/sbin/nginx", "-e"]
        .map(str::to_owned)
        .into_iter()
        .chain([
            format!("{d}/error.log"),
            "-p".to_owned(),
            d.to_string(),
            "-c".to_owned(),
            conf.display().to_string(),
        ])
        .collect())
}

/// Whether this curl can send a second request on an h2c connection it opened with prior
/// knowledge: curl before 8.0 fails every reuse with "Error in the HTTP2 framing layer" (curl
/// issue 10634), whatever the server (Debian 12 ships 7.88.1).
fn curl_reuses_h2c() -> Result<bool, Failed> {
    let out = Command::new("curl").arg("--version").run(RUN)?;
    let major = out
        .stdout
        .split_whitespace()
        .nth(1)
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.parse::<u32>().ok());
    Ok(major.is_some_and(|major| major >= 8))
}

/// Plain h2c from curl (`--http2-prior-knowledge`) to nginx on both sides: each stream is
/// answered by the app its header chooses. Several requests share one HTTP/2 connection (curl
/// reuses the first transfer's across `--next`) where this curl can reuse one; an older curl
/// sends each on its own connection.
pub fn filter_header_routes_each_stream_of_one_h2c_connection_from_curl(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &h2c_nginx(scene, "remote", "remote")?)?;
    let page = url(&pod, "/");
    let h2 = ["-sS", "--max-time", "3", "--http2-prior-knowledge"];
    let plain = [&h2[..], &[page.as_str()]].concat();
    let me = [&h2[..], &["-H", "X-User: me", page.as_str()]].concat();
    until(cluster, "curl", &plain, "remote\n")?;
    let config = filter_config(scene, "filter", r#"{"header_filter": "^x-user: me$"}"#)?;
    let session = Running::start(
        scene,
        &pod,
        &["-f", &config],
        &super::incoming::strs(&h2c_nginx(scene, "local", "local")?),
    )?;
    until(cluster, "curl", &me, "local\n")?;
    // Each transfer prints its answer, its HTTP version and how many connections it opened.
    let transfer = |header: Option<&'static str>| {
        let mut args = vec![
            "--http2-prior-knowledge",
            "-w",
            "[%{http_version} %{num_connects}]",
        ];
        if let Some(header) = header {
            args.extend(["-H", header]);
        }
        args.push(page.as_str());
        args
    };
    let headers = [
        None,
        Some("X-User: me"),
        Some("X-User: someone-else"),
        Some("X-User: me"),
    ];
    let answers = ["remote", "local", "remote", "local"];
    let (stdout, expected) = if curl_reuses_h2c()? {
        let mut args = vec!["-sS", "--max-time", "5"];
        for (i, header) in headers.into_iter().enumerate() {
            if i > 0 {
                args.push("--next");
            }
            args.extend(transfer(header));
        }
        let out = from_cluster(cluster, "curl", &args)?;
        ensure!(
            out.code == 0,
            "{}; mirrord: {}",
            out.describe(),
            session.stderr()
        );
        let expected: String = answers
            .iter()
            .enumerate()
            .map(|(i, answer)| format!("{answer}\n[2 {}]", u8::from(i == 0)))
            .collect();
        (out.stdout, expected)
    } else {
        let mut stdout = String::new();
        for header in headers {
            let args = [vec!["-sS", "--max-time", "5"], transfer(header)].concat();
            let out = from_cluster(cluster, "curl", &args)?;
            ensure!(
                out.code == 0,
                "{}; mirrord: {}",
                out.describe(),
                session.stderr()
            );
            stdout += &out.stdout;
        }
        let expected = answers
            .iter()
            .map(|answer| format!("{answer}\n[2 1]"))
            .collect();
        (stdout, expected)
    };
    ensure!(
        stdout == expected,
        "h2c answered per stream: expected {expected:?}, got {stdout:?}; mirrord: {}",
        session.stderr()
    );
    session.stop();
    until(cluster, "curl", &plain, "remote\n")?;
    expect(cluster, "curl", &me, "remote\n")?;
    Ok(())
}

pub fn filter_header_routes_a_websocket_upgrade(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let ws = fixture("ws_echo.py");
    let serve =
        |answer: &str| [SYSTEM_PYTHON, &ws, "serve", &PORT.to_string(), answer].map(str::to_owned);
    let _original = pod_app(&pod, &serve("remote"))?;
    let address = format!("ws://{}:{PORT}/", pod.ip());
    let plain = [ws.as_str(), "call", &address];
    let me = [ws.as_str(), "call", &address, "X-User:me"];
    until(cluster, SYSTEM_PYTHON, &plain, "remote:ping\n")?;
    let config = filter_config(scene, "filter", r#"{"header_filter": "^x-user: me$"}"#)?;
    let local = serve("local");
    let session = Running::start(
        scene,
        &pod,
        &["-f", &config],
        &super::incoming::strs(&local),
    )?;
    until(cluster, SYSTEM_PYTHON, &me, "local:ping\n")?;
    expect(cluster, SYSTEM_PYTHON, &plain, "remote:ping\n")?;
    session.stop();
    Ok(())
}

pub fn filter_all_of_path_and_method(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    curl_until(cluster, &url(&pod, "/"), "remote\n")?;
    let config = filter_config(
        scene,
        "filter",
        r#"{"all_of": [{"path": "^/api"}, {"method": "^post$"}]}"#,
    )?;
    let session = session_answering(scene, &pod, &["-f", &config], "local")?;
    let api = url(&pod, "/api/orders");
    let other = url(&pod, "/other");
    let post = |url: &str| ["-sS", "--max-time", "3", "-d", "x=1", url].map(str::to_owned);
    let get = |url: &str| ["-sS", "--max-time", "3", url].map(str::to_owned);
    until(
        cluster,
        "curl",
        &super::incoming::strs(&post(&api)),
        "local\n",
    )?;
    expect(
        cluster,
        "curl",
        &super::incoming::strs(&get(&api)),
        "remote\n",
    )?;
    expect(
        cluster,
        "curl",
        &super::incoming::strs(&post(&other)),
        "remote\n",
    )?;
    expect(
        cluster,
        "curl",
        &super::incoming::strs(&get(&other)),
        "remote\n",
    )?;
    session.stop();
    Ok(())
}

/// Two sessions of one agent (as sessions sharing an agent started with `mirrord-agent`, reached
/// by `--agent-addr`) filter the same port at once, each getting its own user's requests.
pub fn filter_two_sessions_share_a_port(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    let page = url(&pod, "/");
    curl_until(cluster, &page, "remote\n")?;
    let agent = start_agent(scene, &pod, TOKEN)?;
    let through_the_agent = ["--agent-addr", agent.addr(), "--agent-token", TOKEN];
    let mut sessions = Vec::new();
    for user in ["alice", "bob"] {
        sessions.push(session_of_user(scene, &through_the_agent, user)?);
    }
    for user in ["alice", "bob"] {
        let args = as_user(&page, user);
        until(
            cluster,
            "curl",
            &super::incoming::strs(&args),
            &format!("{user}\n"),
        )?;
    }
    users_get(
        cluster,
        &page,
        &["alice", "bob", "carol", "alice", "bob"],
        |user| match user {
            "carol" => "remote\n".to_owned(),
            _ => format!("{user}\n"),
        },
    )?;
    expect(
        cluster,
        "curl",
        &["-sS", "--max-time", "3", &page],
        "remote\n",
    )?;
    for session in sessions {
        session.stop();
    }
    Ok(())
}

/// A session through `target` (its target or agent flags) stealing the requests with
/// `X-User: USER`, its local app answering `USER`.
fn session_of_user(scene: &Scene, target: &[&str], user: &str) -> Result<Running, Failed> {
    let filter = format!(r#"{{"header_filter": "^x-user: {user}$"}}"#);
    let config = filter_config(scene, user, &filter)?;
    Running::start_with(
        scene,
        target,
        &["-f", &config],
        &super::incoming::strs(&answer_server(scene, user)?),
    )
}

/// `curl` arguments for the pod's page as `user` (an `X-User` header).
fn as_user(page: &str, user: &str) -> Vec<String> {
    [
        "-sS",
        "--max-time",
        "3",
        "-H",
        &format!("X-User: {user}"),
        page,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Each of `users` gets `expected(user)` from the pod's page, in turn.
fn users_get(
    cluster: &Cluster,
    page: &str,
    users: &[&str],
    expected: impl Fn(&str) -> String,
) -> Result<(), Failed> {
    for user in users {
        let args = as_user(page, user);
        expect(
            cluster,
            "curl",
            &super::incoming::strs(&args),
            &expected(user),
        )?;
    }
    Ok(())
}

/// Two sessions started on their own — an agent each, as every Kubernetes session has — filter
/// the same port: each gets its own user's requests, everyone else's reach the pod, and when
/// either ends the other keeps its requests.
pub fn two_agents_with_their_own_filters_share_a_port(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    let page = url(&pod, "/");
    curl_until(cluster, &page, "remote\n")?;
    let mut sessions = Vec::new();
    for user in ["alice", "bob"] {
        sessions.push(session_of_user(scene, &["-t", &pod.target()], user)?);
        let args = as_user(&page, user);
        until(
            cluster,
            "curl",
            &super::incoming::strs(&args),
            &format!("{user}\n"),
        )?;
    }
    let ruleset = pod_ruleset(&pod)?;
    ensure!(
        ruleset.matches("table inet mirrord_").count() == 2,
        "not one table per agent: {ruleset}"
    );
    users_get(
        cluster,
        &page,
        &["alice", "bob", "carol", "bob", "alice"],
        |user| match user {
            "carol" => "remote\n".to_owned(),
            _ => format!("{user}\n"),
        },
    )?;
    // The first agent is last in line: the second passes everyone else's requests to it.
    let bob = sessions.pop().ok_or("no second session")?;
    bob.stop();
    let args = as_user(&page, "bob");
    until(cluster, "curl", &super::incoming::strs(&args), "remote\n")?;
    users_get(cluster, &page, &["alice", "carol"], |user| match user {
        "alice" => "alice\n".to_owned(),
        _ => "remote\n".to_owned(),
    })?;
    let alice = sessions.pop().ok_or("no first session")?;
    alice.stop();
    pod_is_given_back(cluster, &pod)?;
    Ok(())
}

/// A second session of its own (another agent) that steals a port another session steals
/// whole is refused in one line, while the first keeps the port; with `on_concurrent_steal =
/// "override"` it takes the port until it ends.
pub fn a_second_agents_steal_of_a_stolen_port_needs_override(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    let page = url(&pod, "/");
    curl_until(cluster, &page, "remote\n")?;
    let first = steal_answered_by(scene, cluster, &pod, "first")?;
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target(), "--steal", "--"])
        .args(answer_server(scene, "second")?);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 125
            && out.stderr.lines().count() == 1
            && out.stderr.starts_with(&format!(
                "mirrord: the agent refused to steal port {PORT}: port {PORT} is already stolen \
                 by another session (its agent is pid "
            ))
            && out.stderr.contains("on_concurrent_steal = \"override\""),
        "{}",
        out.describe()
    );
    expect(
        cluster,
        "curl",
        &["-sS", "--max-time", "3", &page],
        "first\n",
    )?;
    let config = scene.temp_dir().join("override.json");
    std::fs::write(
        &config,
        r#"{"feature": {"network": {"incoming": {"mode": "steal", "on_concurrent_steal": "override"}}}}"#,
    )?;
    let second = session_answering(
        scene,
        &pod,
        &["-f", &config.display().to_string()],
        "second",
    )?;
    curl_until(cluster, &page, "second\n")?;
    second.stop();
    curl_until(cluster, &page, "first\n")?;
    first.stop();
    pod_is_given_back(cluster, &pod)?;
    Ok(())
}

/// A keep-alive client that asks the pod once, waits for `GO` to exist, then asks again on the
/// same connection, writing each answer and the connection's local port to `OUT`.
const KEPT_CONNECTION_PY: &str = r#"
import http.client, os, sys, time
host, port, go, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
conn = http.client.HTTPConnection(host, port, timeout=10)
def ask():
    conn.request("GET", "/")
    answer = conn.getresponse().read().decode().strip()
    with open(out, "a") as f:
        f.write(f"{answer} {conn.sock.getsockname()[1]}\n")
ask()
while not os.path.exists(go):
    time.sleep(0.05)
ask()
"#;

/// A connection already open when a steal starts stays with the pod's app (the redirect takes
/// only new connections), while new ones reach the local app.
pub fn connections_open_before_a_steal_stay_with_the_pod(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    let page = url(&pod, "/");
    curl_until(cluster, &page, "remote\n")?;
    let script = scene.temp_dir().join("kept.py");
    std::fs::write(&script, KEPT_CONNECTION_PY)?;
    let (go, out) = (
        scene.temp_dir().join("go"),
        scene.temp_dir().join("kept.out"),
    );
    let mut client = cluster.command(SYSTEM_PYTHON);
    client
        .arg(&script)
        .args([pod.ip().to_string(), PORT.to_string()])
        .args([&go, &out])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scene.temp_dir().join("kept.err"))?);
    let mut client = client.spawn()?;
    let answers = |count: usize| -> Result<Vec<String>, Failed> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let lines: Vec<String> = std::fs::read_to_string(&out)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            if lines.len() >= count {
                return Ok(lines);
            }
            ensure!(
                Instant::now() < deadline,
                "the kept connection got {lines:?}: {}",
                std::fs::read_to_string(scene.temp_dir().join("kept.err")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    let result = (|| {
        let before = answers(1)?;
        let session = steal_answered_by(scene, cluster, &pod, "local")?;
        std::fs::write(&go, "")?;
        let after = answers(2)?;
        session.stop();
        let port = |line: &str| line.split_once(' ').map(|(_, port)| port.to_owned());
        ensure!(
            before[0].starts_with("remote ")
                && after[1].starts_with("remote ")
                && port(&after[0]) == port(&after[1]),
            "the connection opened before the steal, asked before and after it: {after:?}"
        );
        Ok(())
    })();
    let _ = client.kill();
    let _ = client.wait();
    result
}

/// The port a mesh sidecar takes the pod's inbound connections on (Istio's inbound capture port).
const SIDECAR_PORT: u16 = 15006;

/// A mesh sidecar's inbound capture, as Istio's iptables (nft backend) installs it in the pod:
/// new connections to the app's port redirected to the sidecar in a nat chain at dstnat.
const SIDECAR_RULESET: &str = "table ip mesh_sidecar {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\ttcp dport 8080 redirect to :15006
\t}
}
";

/// A mesh sidecar in the pod, as Istio's works: it takes the app port's connections (through
/// [`SIDECAR_RULESET`]), ends their TLS (the mesh's mutual TLS, here a self-signed certificate)
/// and opens a plain connection on to the app at the pod's own address, from 127.0.0.6.
fn tls_sidecar(scene: &Scene, pod: &Pod) -> Result<PodServer, Failed> {
    let (cert, key) = (
        scene.temp_dir().join("sidecar.crt"),
        scene.temp_dir().join("sidecar.key"),
    );
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=web"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .run(RUN)?;
    ensure!(
        out.code == 0,
        "making the sidecar's certificate: {}",
        out.describe()
    );
    let sidecar = pod_app(
        pod,
        &[
            "socat".to_owned(),
            format!(
                "OPENSSL-LISTEN:{SIDECAR_PORT},reuseaddr,fork,verify=0,cert={},key={}",
                cert.display(),
                key.display()
            ),
            format!("TCP:{}:{PORT},bind=127.0.0.6", pod.ip()),
        ],
    )?;
    let rules = scene.temp_dir().join("sidecar.nft");
    std::fs::write(&rules, SIDECAR_RULESET)?;
    let mut nft = pod.command("nft");
    nft.arg("-f").arg(&rules);
    let out = nft.run(RUN)?;
    ensure!(
        out.code == 0,
        "installing the sidecar's rules: {}",
        out.describe()
    );
    Ok(sidecar)
}

/// In a pod whose inbound connections a mesh sidecar captures and decrypts, sessions get them
/// from the sidecar, in plain HTTP, and answer through the sidecar's TLS: a header filter sends
/// the developer's requests to the local app and the others on to the pod's app, a whole steal
/// sends all to the local app, and a mirror leaves the pod answering while the local app gets
/// copies. Once the sessions end the sidecar still has the connections, its rules untouched and
/// no table of ours left.
pub fn a_session_takes_a_mesh_sidecars_plain_connections_to_the_app(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    let _sidecar = tls_sidecar(scene, &pod)?;
    let page = format!("https://{}:{PORT}/", pod.ip());
    let plain = ["-sSk", "--max-time", "3", page.as_str()];
    let mine = ["-sSk", "--max-time", "3", "-H", "X-User: me", page.as_str()];
    until(cluster, "curl", &plain, "remote\n")?;
    let config = filter_config(scene, "mesh", r#"{"header_filter": "^x-user: me$"}"#)?;
    let session = session_answering(scene, &pod, &["-f", &config], "local")?;
    until(cluster, "curl", &mine, "local\n")?;
    expect(cluster, "curl", &plain, "remote\n")?;
    session.stop();
    until(cluster, "curl", &mine, "remote\n")?;
    let steal = session_answering(scene, &pod, &["--steal"], "local")?;
    until(cluster, "curl", &plain, "local\n")?;
    steal.stop();
    until(cluster, "curl", &plain, "remote\n")?;
    let (mirror, log) = super::incoming::mirror_session(scene, &pod)?;
    let copied = format!("{page}index.html?through-the-sidecar");
    let curl = ["-sSk", "--max-time", "3", copied.as_str()];
    super::incoming::until_copied(
        cluster,
        &mirror,
        &curl,
        &log,
        "GET /index.html?through-the-sidecar",
    )?;
    mirror.stop();
    let ruleset = no_table_left(&pod)?;
    ensure!(
        ruleset.contains("table ip mesh_sidecar") && ruleset.contains("redirect to :15006"),
        "the sidecar's rules did not survive the sessions: {ruleset}"
    );
    Ok(())
}

/// `nft list ruleset` in the pod's network namespace.
pub(super) fn pod_ruleset(pod: &Pod) -> Result<String, Failed> {
    let mut cmd = pod.command("nft");
    cmd.args(["list", "ruleset"]);
    let out = cmd.run(RUN)?;
    ensure!(out.code == 0, "nft list ruleset: {}", out.describe());
    Ok(out.stdout)
}

/// Waits for the pod to answer `remote` again and for its `mirrord_` table to go.
fn pod_is_given_back(cluster: &Cluster, pod: &Pod) -> Result<(), Failed> {
    curl_until(cluster, &url(pod, "/"), "remote\n")?;
    no_table_left(pod).map(drop)
}

/// Waits for the pod's `mirrord_` tables to go (the guard removes one a moment after its
/// session's end); returns the pod's ruleset then.
fn no_table_left(pod: &Pod) -> Result<String, Failed> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let ruleset = pod_ruleset(pod)?;
        if !ruleset.contains("mirrord_") {
            return Ok(ruleset);
        }
        ensure!(
            Instant::now() < deadline,
            "a mirrord table stayed in the pod: {ruleset}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// Steals the pod's port (the local app answers `local`; `/quit` ends it), checks the redirect
/// is in the pod, lets `end` finish the session, and checks the pod is given back.
fn cleanup_after(
    scene: &Scene,
    cluster: &Cluster,
    end: fn(&mut Running, &Cluster, &Pod) -> Result<(), Failed>,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _original = pod_app(&pod, &answer_server(scene, "remote")?)?;
    let page = url(&pod, "/");
    curl_until(cluster, &page, "remote\n")?;
    let mut session = steal_answered_by(scene, cluster, &pod, "local")?;
    let ruleset = pod_ruleset(&pod)?;
    ensure!(
        ruleset.contains("table ip mirrord_") || ruleset.contains("table inet mirrord_"),
        "no mirrord table while stealing: {ruleset}"
    );
    end(&mut session, cluster, &pod)?;
    pod_is_given_back(cluster, &pod)?;
    Ok(())
}

pub fn cleanup_when_the_command_exits(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    cleanup_after(scene, cluster, |session, cluster, pod| {
        let out = curl_from_cluster(cluster, &url(pod, "/quit"))?;
        ensure!(
            out.code == 0 && out.stdout == "local\n",
            "the local app did not answer /quit: {}",
            out.describe()
        );
        let code = session.wait();
        ensure!(
            code == Some(0),
            "mirrord did not exit 0 with its command ({code:?}): {}",
            session.stderr()
        );
        Ok(())
    })
}

pub fn cleanup_after_ctrl_c(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    cleanup_after(scene, cluster, |session, _, _| {
        let code = session.interrupt();
        ensure!(
            code.is_some(),
            "mirrord did not end on Ctrl-C ({code:?}): {}",
            session.stderr()
        );
        Ok(())
    })
}

/// `kill -9` of mirrord: its agent and guard still end (the scene's leftover check), and the
/// pod is given back.
pub fn cleanup_after_kill_9_of_mirrord(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    cleanup_after(scene, cluster, |session, _, _| {
        session.signal_and_wait(libc::SIGKILL);
        Ok(())
    })
}

/// `kill -9` of the agent serving the session: its guard removes the redirect.
pub fn cleanup_after_kill_9_of_the_agent(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    cleanup_after(scene, cluster, |session, _, _| {
        let agents = descendants_named(session.pid(), "mirrord-agent");
        ensure!(
            !agents.is_empty(),
            "no mirrord-agent under mirrord {}",
            session.pid()
        );
        for pid in agents {
            // SAFETY: kill(2) on a process found a moment ago under our own child; at worst the
            // pid is gone and kill fails with ESRCH.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        Ok(())
    })
}

/// Processes under `root` (at any depth) whose name (`comm`) is `name`.
pub(super) fn descendants_named(root: u32, name: &str) -> Vec<u32> {
    let mut parents = std::collections::HashMap::<u32, Vec<(u32, String)>>::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or_default();
        let Some(ppid) = tail.split_whitespace().nth(1).and_then(|s| s.parse().ok()) else {
            continue;
        };
        parents
            .entry(ppid)
            .or_default()
            .push((pid, comm.to_owned()));
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(parent) = queue.pop() {
        for (pid, comm) in parents.get(&parent).into_iter().flatten() {
            if comm == name {
                found.push(*pid);
            }
            queue.push(*pid);
        }
    }
    found
}

/// A kernel without nftables, as nft reports it: `--steal` is refused in one line naming
/// nftables, and mirrord exits 125. The agent runs `$MIRRORD_AGENT_NFT`, which the local agent
/// inherits from mirrord's environment.
pub fn steal_without_nftables_is_one_line(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let nft = fake_nft(scene)?;
    let mut cmd = scene.mirrord()?;
    cmd.env("MIRRORD_AGENT_NFT", &nft)
        .args(["exec", "-t", &pod.target(), "--steal", "--"])
        .args(answer_server(scene, "local")?);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 125
            && out.stderr
                == format!(
                    "mirrord: the agent refused to steal port {PORT}: cannot redirect port {PORT} \
                     in the target: nftables is not available in its kernel (nf_tables module \
                     missing); the command was stopped\n"
                ),
        "{}",
        out.describe()
    );
    Ok(())
}

/// An `nft` that answers as nft 1.0.6 does on a kernel without nf_tables.
fn fake_nft(scene: &Scene) -> Result<PathBuf, Failed> {
    use std::os::unix::fs::PermissionsExt;
    let path = scene.temp_dir().join("nft");
    std::fs::write(
        &path,
        "#!/bin/sh\necho 'netlink: Error: cache initialization failed: Invalid argument' >&2\nexit 1\n",
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}
