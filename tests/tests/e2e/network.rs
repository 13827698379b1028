//! The pod's outgoing network through `mirrord exec`: unmodified clients (curl, psql,
//! busybox-static wget, socat) reach servers that only the pod can reach, through the TUN,
//! the netstack and the agent; refused ports fail fast; the host's loopback stays reachable at
//! its fixed address; and without mirrord the same requests fail.

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use libtest_mimic::Failed;
use mirrord_tests::command::{Run, SHORT, first_line};
use mirrord_tests::usage::{Usage, usage};
use mirrord_tests::{Cluster, Scene};

use super::{RUN, exec, standard_pod};

/// The host-loopback address inside the launched process (docs/cli.md).
const HOST_LOOPBACK: &str = "198.19.255.254";

/// The fixture's cluster range, passed as a user passes their cluster's CIDRs: only the pod's
/// own subnet is remote by default.
const CLUSTER: &[&str] = &["--cidr", "10.213.0.0/16"];

/// A server process in the cluster, killed when dropped.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut cmd: Command, what: &str) -> Result<Server, Failed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(Server(
        cmd.spawn().map_err(|error| format!("{what}: {error}"))?,
    ))
}

pub fn net_curl_and_static_wget_reach_a_cluster_only_server(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let server = cluster.serve_http(&[("index.html", "hello from the cluster\n")])?;
    let url = server.url("index.html");
    let out = exec(
        scene,
        &pod,
        CLUSTER,
        &["curl", "-sS", "--max-time", "10", &url],
    )?;
    ensure!(
        out.code == 0 && out.stdout == "hello from the cluster\n",
        "curl: {}",
        out.describe()
    );
    let out = exec(
        scene,
        &pod,
        CLUSTER,
        &["busybox", "wget", "-q", "-O", "-", &url],
    )?;
    ensure!(
        out.code == 0 && out.stdout == "hello from the cluster\n",
        "busybox wget: {}",
        out.describe()
    );
    // The same request from a fresh network namespace without mirrord has no way there.
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "curl", "-sS", "--max-time", "3", &url]);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code != 0,
        "reached the cluster without mirrord: {}",
        out.describe()
    );
    Ok(())
}

/// PostgreSQL on the cluster's address, port 5432, trusting clients from the cluster's range
/// (the pods); stopped when the returned server is dropped.
pub fn start_postgres(scene: &Scene, cluster: &Cluster) -> Result<Server, Failed> {
    let data = scene.temp_dir().join("pgdata");
    let bin = postgres_bin()?;
    let bin = bin.as_str();
    std::fs::create_dir_all(&data)?;
    let mut chown = Command::new("chown");
    chown
        .args(["-R", "postgres:postgres"])
        .arg(scene.temp_dir());
    ensure!(
        chown.run(RUN)?.code == 0,
        "chown of the database directory failed"
    );
    let mut initdb = Command::new("runuser");
    initdb
        .args([
            "-u",
            "postgres",
            "--",
            &format!("{bin}/initdb"),
            "-A",
            "trust",
            "-U",
            "postgres",
            "-D",
        ])
        .arg(&data);
    let out = initdb.run(Duration::from_secs(60))?;
    ensure!(out.code == 0, "initdb: {}", out.describe());
    // Clients come from the pod's address: let the cluster's range in without a password.
    let mut hba = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("pg_hba.conf"))?;
    hba.write_all(b"host all all 10.213.0.0/16 trust\n")?;
    let mut postgres = cluster.command("runuser");
    postgres
        .args(["-u", "postgres", "--", &format!("{bin}/postgres"), "-D"])
        .arg(&data)
        .args(["-h", &cluster.ip().to_string(), "-k", ""]);
    let postgres = spawn(postgres, "postgres")?;
    let host = cluster.ip().to_string();
    let mut ready = false;
    for _ in 0..100 {
        let mut probe = cluster.command(&format!("{bin}/pg_isready"));
        probe.args(["-h", &host, "-t", "1"]);
        if probe.run(RUN)?.code == 0 {
            ready = true;
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(ready, "PostgreSQL did not start in the cluster");
    Ok(postgres)
}

pub fn net_psql_queries_a_cluster_database(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let _postgres = start_postgres(scene, cluster)?;
    let host = cluster.ip().to_string();
    let out = exec(
        scene,
        &pod,
        CLUSTER,
        &[
            "psql",
            "-h",
            &host,
            "-U",
            "postgres",
            "-tAc",
            "select 40 + 2",
        ],
    )?;
    ensure!(
        out.code == 0 && out.stdout == "42\n",
        "psql: {}",
        out.describe()
    );
    Ok(())
}

pub fn net_udp_echo_through_the_pod(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let ip = cluster.ip().to_string();
    let mut echo = cluster.command("socat");
    echo.args([&format!("UDP4-RECVFROM:9999,bind={ip},fork"), "EXEC:cat"]);
    let _echo = spawn(echo, "socat UDP echo")?;
    thread::sleep(Duration::from_millis(200));
    let out = exec(
        scene,
        &pod,
        CLUSTER,
        &[
            "sh",
            "-c",
            &format!("echo ping-over-udp | socat -t 3 - UDP4:{ip}:9999"),
        ],
    )?;
    ensure!(
        out.code == 0 && out.stdout == "ping-over-udp\n",
        "UDP echo: {}",
        out.describe()
    );
    Ok(())
}

/// An app that sends each datagram from a new socket (a new source port), as some metrics and
/// log clients do, opens a UDP flow per datagram, each held until it has been idle a minute.
/// 6,000 of them, every one answered, and then a connection still opens: the oldest idle flows
/// make way, where before the session ran out of streams at 4,096 and every new connection
/// failed with "no route to host".
pub fn net_udp_from_6000_source_ports_leaves_room_for_connections(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let ip = cluster.ip().to_string();
    let mut echo = cluster.command("python3");
    echo.args([
        "-c",
        &format!(
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('{ip}', 9998))\n\
             while True:\n    data, peer = s.recvfrom(64)\n    s.sendto(data, peer)\n"
        ),
    ]);
    let _echo = spawn(echo, "python UDP echo")?;
    let server = cluster.serve_http(&[("index.html", "still connecting\n")])?;
    thread::sleep(Duration::from_millis(300));
    let script = format!(
        "import socket, urllib.request\n\
         answered = 0\n\
         for i in range(6000):\n\
         \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         \x20   s.settimeout(2)\n\
         \x20   s.sendto(str(i).encode(), ('{ip}', 9998))\n\
         \x20   try:\n\
         \x20       answered += s.recv(64) == str(i).encode()\n\
         \x20   except socket.timeout:\n\
         \x20       print('no answer to datagram', i)\n\
         \x20       break\n\
         \x20   s.close()\n\
         print('answered', answered)\n\
         print(urllib.request.urlopen('{}', timeout=10).read().decode(), end='')\n",
        server.url("index.html")
    );
    let out = exec(scene, &pod, CLUSTER, &["python3", "-c", &script])?;
    ensure!(
        out.code == 0 && out.stdout == "answered 6000\nstill connecting\n",
        "6,000 UDP flows, then a connection: {}",
        out.describe()
    );
    Ok(())
}

/// 200 concurrent connections, each fetching 1 MiB, every body checked.
pub fn net_200_concurrent_connections_of_1_mib(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let server = cluster.serve_http(&[])?;
    let body: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(server.dir().join("one-mib.bin"), &body)?;
    let script = format!(
        "import concurrent.futures, hashlib, urllib.request\n\
         url = '{}'\n\
         def get(_):\n    return hashlib.sha256(urllib.request.urlopen(url, timeout=60).read()).hexdigest()\n\
         with concurrent.futures.ThreadPoolExecutor(200) as pool:\n    sums = list(pool.map(get, range(200)))\n\
         print(len(sums), len(set(sums)), sums[0])\n",
        server.url("one-mib.bin")
    );
    let out = exec(scene, &pod, CLUSTER, &["python3", "-c", &script])?;
    let expected = sha256_hex(&body)?;
    ensure!(
        out.code == 0 && out.stdout == format!("200 1 {expected}\n"),
        "200 × 1 MiB: {}",
        out.describe()
    );
    Ok(())
}

/// 64 MiB up and 64 MiB down on one connection, each checked by SHA-256 at the other end,
/// through a TUN device with offload (the default: the kernel hands over 64 KiB segments with
/// partial checksums) and without it (`MIRRORD_TUN_OFFLOAD=0`).
pub fn net_bulk_both_ways_with_and_without_tun_offload(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let ip = cluster.ip().to_string();
    let server = "import hashlib, random, socket, sys, threading\n\
         srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         srv.bind((sys.argv[1], 9100)); srv.listen(8)\n\
         def serve(c):\n    f = c.makefile('rwb')\n    way, n = f.readline().split(); n = int(n)\n    \
         if way == b'up':\n        h = hashlib.sha256(); left = n\n        \
         while left:\n            b = f.read(min(left, 1 << 20)); h.update(b); left -= len(b)\n        \
         f.write(h.hexdigest().encode() + b'\\n')\n    \
         else:\n        f.write(random.Random(7).randbytes(n))\n    f.close(); c.close()\n\
         while True:\n    threading.Thread(target=serve, args=(srv.accept()[0],)).start()\n";
    let mut cmd = cluster.command("python3");
    cmd.args(["-c", server, &ip]);
    let _server = spawn(cmd, "python3 bulk server")?;
    thread::sleep(Duration::from_millis(300));
    let client = format!(
        "import hashlib, random, socket\n\
         n = 64 << 20\n\
         up = random.Random(1).randbytes(n)\n\
         s = socket.create_connection(('{ip}', 9100), timeout=60); f = s.makefile('rwb')\n\
         f.write(b'up %d\\n' % n); f.write(up); f.flush()\n\
         print('up', f.readline().decode().strip() == hashlib.sha256(up).hexdigest())\n\
         s = socket.create_connection(('{ip}', 9100), timeout=60); f = s.makefile('rwb')\n\
         f.write(b'down %d\\n' % n); f.flush()\n\
         h = hashlib.sha256(); got = 0\n\
         while (b := f.read(1 << 20)):\n    h.update(b); got += len(b)\n\
         print('down', got == n and h.hexdigest() == hashlib.sha256(random.Random(7).randbytes(n)).hexdigest())\n"
    );
    for offload in ["1", "0"] {
        let mut cmd = scene.mirrord()?;
        cmd.args(["exec", "-t", &pod.target()])
            .args(CLUSTER)
            .args(["--", "python3", "-c", &client])
            .env("MIRRORD_TUN_OFFLOAD", offload);
        let out = cmd.run(super::RUN)?;
        ensure!(
            out.code == 0 && out.stdout == "up True\ndown True\n",
            "64 MiB each way with MIRRORD_TUN_OFFLOAD={offload}: {}",
            out.describe()
        );
    }
    Ok(())
}

/// `/usr/lib/postgresql/<newest>/bin`, wherever Debian put this machine's server.
fn postgres_bin() -> Result<String, Failed> {
    let newest = std::fs::read_dir("/usr/lib/postgresql")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .ok_or("no PostgreSQL server under /usr/lib/postgresql (package postgresql)")?;
    Ok(format!("/usr/lib/postgresql/{newest}/bin"))
}

pub(super) fn sha256_hex(bytes: &[u8]) -> Result<String, Failed> {
    let mut cmd = Command::new("sha256sum");
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = cmd.spawn()?;
    child.stdin.take().ok_or("no stdin")?.write_all(bytes)?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// A closed port in the cluster is refused at once (ECONNREFUSED), never a hang.
pub fn net_closed_port_is_refused_fast(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let script = format!(
        "import socket, time\n\
         start = time.monotonic()\n\
         try:\n    socket.create_connection(('{}', 1), timeout=10)\n    print('connected')\n\
         except ConnectionRefusedError:\n    print('refused', time.monotonic() - start < 1.0)\n",
        cluster.ip()
    );
    let out = exec(scene, &pod, CLUSTER, &["python3", "-c", &script])?;
    ensure!(
        out.code == 0 && out.stdout == "refused True\n",
        "closed port: {}",
        out.describe()
    );
    Ok(())
}

/// A server on this machine's loopback is reached at the host-loopback address, by its name.
pub fn net_host_loopback_reaches_a_local_server(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let server = thread::spawn(move || -> std::io::Result<()> {
        let (mut socket, _) = listener.accept()?;
        socket.write_all(b"hello from the laptop\n")
    });
    let script = format!(
        "import socket\nassert socket.gethostbyname('host.mirrord.internal') == '{HOST_LOOPBACK}'\n\
         s = socket.create_connection(('host.mirrord.internal', {port}), timeout=10)\n\
         print(s.makefile().readline(), end='')\n"
    );
    let out = exec(scene, &pod, &[], &["python3", "-c", &script])?;
    let _ = server.join();
    ensure!(
        out.code == 0 && out.stdout == "hello from the laptop\n",
        "host loopback: {}",
        out.describe()
    );
    Ok(())
}

/// `mirrord port-forward`: a GUI client's view of a cluster database. psql on this machine
/// reaches PostgreSQL in the cluster through two forwarded ports at once, one by a cluster name
/// that only the pod's resolver knows (`web`, through its search domains), one by address; a
/// SIGTERM ends the session cleanly.
pub fn port_forward_psql_reaches_a_cluster_database(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    use std::io::BufRead;
    let dns = cluster.serve_dns()?;
    let pod = mirrord_tests::Pod::builder("db-client-6c8d")
        .cluster_dns(dns.ip())
        .start(cluster)?;
    let _postgres = start_postgres(scene, cluster)?;
    let by_address = format!("0:{}:5432", cluster.ip());
    let mut cmd = scene.mirrord()?;
    cmd.args([
        "port-forward",
        "-t",
        &pod.target(),
        "-L",
        "0:web:5432",
        "-L",
    ])
    .arg(&by_address)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut mirrord = Server(cmd.spawn()?);
    let stderr = mirrord.0.stderr.take().ok_or("no stderr")?;
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    // `mirrord: forwarding 127.0.0.1:PORT to HOST:5432 (IP) in pid/N`, one line per -L.
    let mut ports = Vec::new();
    let mut seen = Vec::new();
    while ports.len() < 2 {
        let line = line_rx
            .recv_timeout(RUN)
            .map_err(|_| format!("port-forward did not say where it listens: {seen:?}"))?;
        if let Some(rest) = line.strip_prefix("mirrord: forwarding 127.0.0.1:") {
            let (port, to) = rest.split_once(" to ").ok_or("no target in the line")?;
            ports.push((port.parse::<u16>()?, to.to_owned()));
        }
        seen.push(line);
    }
    ensure!(
        ports[0]
            .1
            .starts_with(&format!("web:5432 ({})", cluster.ip())),
        "`web` resolved as the pod resolves it: {seen:?}"
    );
    for (port, to) in &ports {
        let mut psql = Command::new("psql");
        psql.args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "postgres", "-tAc", "select 40 + 2"]);
        let out = psql.run(RUN)?;
        ensure!(
            out.code == 0 && out.stdout == "42\n",
            "psql through 127.0.0.1:{port} to {to}: {}",
            out.describe()
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(mirrord.0.id())?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = mirrord.0.wait()?;
    ensure!(
        status.code() == Some(0),
        "after SIGTERM port-forward exited with {status}: {seen:?}"
    );
    let closed = std::net::TcpStream::connect(("127.0.0.1", ports[0].0));
    ensure!(
        closed.is_err(),
        "127.0.0.1:{} still accepts after the session",
        ports[0].0
    );
    Ok(())
}

/// The load tool (tests/src/bin/flowload.rs).
const FLOWLOAD: &str = env!("CARGO_BIN_EXE_flowload");

/// 1,000 connections at a time, each connecting, echoing a payload of its own and closing, again
/// and again for 30 s, every byte checked; the session's descriptors and memory stay within
/// bounds and do not grow from the first samples to the last (docs/architecture.md, "Memory").
pub fn net_1000_connections_churn_for_30_s_without_growth(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    const SECONDS: u64 = 30;
    let pod = standard_pod(cluster)?;
    let addr = format!("{}:7100", cluster.ip());
    let mut serve = cluster.command(FLOWLOAD);
    serve
        .args(["serve", &addr])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut server = Server(serve.spawn()?);
    let ready = server
        .0
        .stdout
        .take()
        .and_then(|out| first_line(out, SHORT));
    ensure!(
        ready.is_some_and(|line| line.starts_with("serving")),
        "the echo server did not start"
    );

    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target()]).args(CLUSTER).args([
        "--",
        FLOWLOAD,
        "loop",
        "1000",
        &SECONDS.to_string(),
        &addr,
    ]);
    let session = thread::spawn(move || cmd.run(RUN + Duration::from_secs(SECONDS)));
    // Samples of (CLI, agent) from 5 s in, once every connection has opened at least once.
    let mut samples = Vec::new();
    let start = std::time::Instant::now();
    thread::sleep(Duration::from_secs(5));
    while start.elapsed() < Duration::from_secs(SECONDS - 2) {
        let cli = mirrord_tests::usage::descendant(std::process::id(), "mirrord");
        let agent = cli.and_then(|cli| mirrord_tests::usage::descendant(cli, "mirrord-agent"));
        if let (Some(cli), Some(agent)) = (cli.and_then(usage), agent.and_then(usage)) {
            samples.push((cli, agent));
        }
        thread::sleep(Duration::from_secs(1));
    }
    let out = session.join().map_err(|_| "session thread panicked")??;
    ensure!(
        out.code == 0 && out.stdout.contains("all checked"),
        "the churn: {}",
        out.describe()
    );
    let (Some(&(cli_first, agent_first)), Some(&(cli_last, agent_last))) =
        (samples.first(), samples.last())
    else {
        return Err("no sample of the CLI and its agent was taken".into());
    };
    let most = |pick: fn(&(Usage, Usage)) -> Usage| {
        samples
            .iter()
            .map(pick)
            .fold((0, 0), |(rss, fds), u| (rss.max(u.rss_kib), fds.max(u.fds)))
    };
    let (cli_rss, cli_fds) = most(|s| s.0);
    let (agent_rss, agent_fds) = most(|s| s.1);
    let report = format!(
        "CLI {cli_first} -> {cli_last}, agent {agent_first} -> {agent_last}; {}",
        out.stdout.trim()
    );
    // The CLI holds no descriptor per flow; the agent one socket per open connection.
    ensure!(cli_fds <= 64, "the CLI's descriptors: {report}");
    ensure!(agent_fds <= 1000 + 64, "the agent's descriptors: {report}");
    // The targets of the data-path issue, for 1,000 flows.
    ensure!(cli_rss < 100 * 1024, "the CLI's memory: {report}");
    ensure!(agent_rss < 50 * 1024, "the agent's memory: {report}");
    // No growth: the second half's peak is within noise of the first half's. (Peaks, not the
    // first sample: on a loaded machine the churn may still be ramping up at 5 s.)
    let half = samples.len() / 2;
    let peak = |range: &[(Usage, Usage)], pick: fn(&(Usage, Usage)) -> u64| {
        range.iter().map(pick).max().unwrap_or(0)
    };
    let (first, second) = samples.split_at(half.max(1));
    ensure!(
        peak(second, |s| s.0.rss_kib) <= peak(first, |s| s.0.rss_kib) + 16 * 1024
            && peak(second, |s| s.1.rss_kib) <= peak(first, |s| s.1.rss_kib) + 16 * 1024,
        "memory grew: {report}"
    );
    ensure!(
        cli_last.fds <= cli_first.fds + 8,
        "the CLI's descriptors grew: {report}"
    );
    Ok(())
}
