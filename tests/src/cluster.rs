//! The fake Kubernetes side: a "cluster" network namespace holding real servers, and "pods" —
//! processes in their own net + mount + uts namespaces with their own env, hostname and files,
//! attached to the cluster by a veth pair. The world cannot route to either, so traffic that
//! reaches a cluster server went through a pod's network. Fixtures must remove everything they
//! create when dropped, in every outcome.

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::command::{SHORT, first_line, run, run_checked};
use crate::netns::delete_namespace;
use crate::process::Scene;
use crate::{FixtureError, PREFIX, Result, world};

/// Directory inside every pod backed by a tmpfs of its own mount namespace.
pub const POD_FILE_DIR: &str = "/srv";

/// File every pod has in [`POD_FILE_DIR`]; its content is [`Pod::pod_only_content`].
pub const POD_ONLY_FILE: &str = "pod-only.txt";

/// PATH every pod carries, deliberately unlike the local one.
pub const POD_PATH: &str = "/pod/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The pod's own `/etc/shadow` (bound over the machine's in the pod's mount namespace), so a
/// test can tell the pod's file from the host's.
pub const POD_SHADOW: &str = "pod-shadow: not the host's\n";

/// Port of [`Cluster::serve_http`] servers.
pub const HTTP_PORT: u16 = 8080;

/// Port of [`Cluster::serve_dns`] servers (UDP and TCP).
pub const DNS_PORT: u16 = 53;

/// Kubernetes-style search list of pods started with [`PodBuilder::cluster_dns`].
pub const CLUSTER_SEARCH: &str = "default.svc.cluster.local svc.cluster.local cluster.local";

/// `options` line of pods started with [`PodBuilder::cluster_dns`].
pub const CLUSTER_OPTIONS: &str = "ndots:5";

/// Fully qualified name of the `web` service: an A record (and its PTR) for the cluster's
/// [`Cluster::ip`], where [`Cluster::serve_http`] listens, an SRV to port [`HTTP_PORT`] and a
/// TXT record [`WEB_TXT`].
pub const WEB_NAME: &str = "web.default.svc.cluster.local";

/// An alias of [`WEB_NAME`] (a CNAME record), as an ExternalName service would be.
pub const ALIAS_NAME: &str = "api.default.svc.cluster.local";

/// A cluster name whose A record is the address that, inside a mirrord command, reaches the
/// laptop's loopback (`198.19.255.254`): a pod's DNS trying to send the command there.
pub const LAPTOP_NAME: &str = "laptop.default.svc.cluster.local";

/// A cluster name resolving to `127.0.0.1` and `::1`.
pub const LOOPBACK_NAME: &str = "loopback.default.svc.cluster.local";

/// SRV name of `web`'s HTTP port, Kubernetes style.
pub const WEB_SRV_NAME: &str = "_http._tcp.web.default.svc.cluster.local";

/// The one string of `web`'s TXT record.
pub const WEB_TXT: &str = "hello from the cluster dns";

/// A TXT record whose answer exceeds 512 bytes (see [`big_txt_strings`]), so plain UDP
/// answers are truncated and a client must retry over TCP.
pub const BIG_TXT_NAME: &str = "big.default.svc.cluster.local";

/// Every name under this suffix resolves to [`Cluster::ip`] (fresh names bypass caches).
pub const WILDCARD_DOMAIN: &str = "any.cluster.local";

/// Names under this suffix are forwarded to an upstream that answers every query SERVFAIL, so
/// the cluster DNS answers SERVFAIL for them.
pub const BROKEN_DOMAIN: &str = "broken.cluster.local";

/// The upstream behind [`BROKEN_DOMAIN`]: echoes each question back with rcode SERVFAIL.
const SERVFAIL_SERVER: &str = "import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('ready', flush=True)
while True:
    q, peer = s.recvfrom(4096)
    if len(q) < 12:
        continue
    end = 12
    while end < len(q) and q[end]:
        end += q[end] + 1
    s.sendto(q[:2] + bytes([0x80 | (q[2] & 1), 0x82]) + bytes([0, 1, 0, 0, 0, 0, 0, 0]) + q[12:end + 5], peer)
";

/// Port of the SERVFAIL upstream, on the DNS server's address.
const SERVFAIL_PORT: u16 = 5353;

/// TTL of every record the cluster DNS serves; odd on purpose so a test can recognise it.
pub const DNS_TTL: u32 = 437;

/// The strings of [`BIG_TXT_NAME`]'s TXT record, in order.
pub fn big_txt_strings() -> Vec<String> {
    (0..5).map(|i| format!("chunk{i}-").repeat(20)).collect()
}

/// /30 blocks out of 10.213.0.0/16, one per cluster service address and one per pod link.
static NEXT_BLOCK: AtomicU32 = AtomicU32::new(1);
static NEXT_NAME: AtomicU32 = AtomicU32::new(1);

fn next_block() -> Ipv4Addr {
    let block = NEXT_BLOCK.fetch_add(1, Ordering::Relaxed) % (1 << 14);
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 213, 0, 0)) + block * 4)
}

fn offset(base: Ipv4Addr, by: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + by)
}

/// Unique across concurrent runs (pid) and fixtures of this run (counter).
fn unique_suffix() -> (String, u32) {
    let n = NEXT_NAME.fetch_add(1, Ordering::Relaxed);
    (format!("{}-{n}", std::process::id()), n)
}

fn ip(args: &[&str]) -> Result<()> {
    run_checked(Command::new("ip").args(args), SHORT).map(drop)
}

/// A named netns `mrdt-<unique>-cluster` standing for the cluster network. Servers listen on
/// [`Cluster::ip`], an address on the cluster's `lo` that every attached pod routes to.
pub struct Cluster {
    name: String,
    ip: Ipv4Addr,
}

impl Cluster {
    pub fn new(scene: &Scene) -> Result<Cluster> {
        world::require()?;
        let name = format!("{}{}-cluster", PREFIX, unique_suffix().0);
        ip(&["netns", "add", &name])?;
        scene.register_namespace(&name);
        // Constructed before configuring so that Drop removes a half-built cluster too.
        let cluster = Cluster {
            name,
            ip: offset(next_block(), 1),
        };
        ip(&["-n", &cluster.name, "link", "set", "lo", "up"])?;
        let service = format!("{}/32", cluster.ip);
        ip(&["-n", &cluster.name, "addr", "add", &service, "dev", "lo"])?;
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where cluster servers listen; reachable from pods, not from the world.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `program` run inside the cluster netns.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// An HTTP server on `cluster.ip():8080` serving `files` (name, content) from a temp dir.
    pub fn serve_http(&self, files: &[(&str, &str)]) -> Result<HttpServer<'_>> {
        let dir = std::env::temp_dir().join(format!("{}http-{}", PREFIX, unique_suffix().0));
        std::fs::create_dir_all(&dir).map_err(FixtureError::io(dir.display().to_string()))?;
        let mut server = HttpServer {
            cluster: self,
            child: None,
            dir,
        };
        for (name, content) in files {
            let path = server.dir.join(name);
            std::fs::write(&path, content).map_err(FixtureError::io(path.display().to_string()))?;
        }
        let mut cmd = self.command("/usr/bin/python3");
        cmd.args(["-u", "-m", "http.server", &HTTP_PORT.to_string()])
            .arg("--bind")
            .arg(self.ip.to_string())
            .arg("--directory")
            .arg(&server.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        let child = server
            .child
            .insert(cmd.spawn().map_err(|source| FixtureError::Spawn {
                program: "python3 -m http.server".into(),
                source,
            })?);
        let ready = child.stdout.take().and_then(|out| first_line(out, SHORT));
        match ready {
            Some(line) if line.starts_with("Serving HTTP") => Ok(server),
            other => Err(FixtureError::NotReady {
                what: "cluster HTTP server".into(),
                timeout: SHORT,
                detail: format!("first line {other:?}"),
            }),
        }
    }

    /// A dnsmasq on an address of its own in the cluster (port [`DNS_PORT`], UDP and TCP),
    /// serving [`WEB_NAME`]'s records, [`BIG_TXT_NAME`] and the [`WILDCARD_DOMAIN`], all with
    /// TTL [`DNS_TTL`]; names under [`BROKEN_DOMAIN`] are SERVFAIL and every other name (the
    /// world's [`world::HOST_ONLY_NAME`] too) is NXDOMAIN.
    pub fn serve_dns(&self) -> Result<DnsServer<'_>> {
        let addr = offset(next_block(), 1);
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "lo",
        ])?;
        let web = self.ip;
        let mut upstream = self.command("/usr/bin/python3");
        upstream
            .args(["-u", "-c", SERVFAIL_SERVER, &addr.to_string()])
            .arg(SERVFAIL_PORT.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        let mut upstream = upstream.spawn().map_err(|source| FixtureError::Spawn {
            program: "python3 (SERVFAIL upstream)".into(),
            source,
        })?;
        let ready = upstream
            .stdout
            .take()
            .and_then(|out| first_line(out, SHORT));
        if ready.as_deref() != Some("ready\n") {
            kill_process_group(&mut upstream);
            return Err(FixtureError::NotReady {
                what: "SERVFAIL upstream of the cluster DNS".into(),
                timeout: SHORT,
                detail: format!("first line {ready:?}"),
            });
        }
        let mut cmd = self.command("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--user=root",
            "--group=root",
            "--pid-file=",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={addr}"))
        .arg(format!("--port={DNS_PORT}"))
        // Authoritative for every name: unknown ones get a real NXDOMAIN, never a REFUSED for
        // want of an upstream (a cluster DNS forwards those; this one has nowhere to forward).
        .arg("--local=/#/")
        .arg(format!("--local-ttl={DNS_TTL}"))
        .arg(format!("--host-record={WEB_NAME},{web}"))
        .arg(format!("--srv-host={WEB_SRV_NAME},{WEB_NAME},{HTTP_PORT}"))
        .arg(format!("--srv-host={WEB_NAME},{WEB_NAME},{HTTP_PORT}"))
        .arg(format!("--txt-record={WEB_NAME},{WEB_TXT}"))
        .arg(format!("--cname={ALIAS_NAME},{WEB_NAME}"))
        .arg(format!("--host-record={LAPTOP_NAME},198.19.255.254"))
        .arg(format!("--host-record={LOOPBACK_NAME},127.0.0.1,::1"))
        .arg(format!(
            "--txt-record={BIG_TXT_NAME},{}",
            big_txt_strings().join(",")
        ))
        .arg(format!("--address=/{WILDCARD_DOMAIN}/{web}"))
        .arg(format!("--server=/{BROKEN_DOMAIN}/{addr}#{SERVFAIL_PORT}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(source) => {
                kill_process_group(&mut upstream);
                return Err(FixtureError::Spawn {
                    program: "dnsmasq".into(),
                    source,
                });
            }
        };
        // Drained for as long as dnsmasq lives: a closed pipe would kill it on its next log line.
        let (log_tx, log_rx) = mpsc::channel();
        if let Some(mut stderr) = child.stderr.take() {
            thread::spawn(move || {
                let mut log = String::new();
                let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
                let _ = log_tx.send(log);
            });
        }
        // Constructed before the readiness wait so that Drop kills a server that never answers.
        let server = DnsServer {
            cluster: self,
            child,
            upstream,
            ip: addr,
        };
        // dnsmasq reports nothing when its sockets are ready: ask it until it answers.
        let deadline = Instant::now() + SHORT;
        let expected = format!("{web}\n");
        let mut last = String::new();
        while Instant::now() < deadline {
            match server.dig(&["+short", "+time=1", "+tries=1", WEB_NAME]) {
                Ok(out) if out.stdout == expected => return Ok(server),
                Ok(out) => last = out.describe(),
                Err(error) => last = error.to_string(),
            }
            thread::sleep(Duration::from_millis(20));
        }
        drop(server);
        let log = log_rx
            .recv_timeout(Duration::from_secs(1))
            .unwrap_or_default();
        Err(FixtureError::NotReady {
            what: "cluster DNS server (dnsmasq)".into(),
            timeout: SHORT,
            detail: format!("last probe: {last}; dnsmasq: {log}"),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        delete_namespace(&self.name);
    }
}

/// A real HTTP server inside the cluster netns; killed and its files removed on drop.
pub struct HttpServer<'c> {
    cluster: &'c Cluster,
    child: Option<Child>,
    dir: PathBuf,
}

impl HttpServer<'_> {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.cluster.ip, HTTP_PORT))
    }

    /// `http://<cluster ip>:8080/<path>`
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr(), path.trim_start_matches('/'))
    }

    /// The directory served.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for HttpServer<'_> {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_process_group(child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster's DNS server (dnsmasq) and its SERVFAIL upstream; both killed on drop.
pub struct DnsServer<'c> {
    cluster: &'c Cluster,
    child: Child,
    upstream: Child,
    ip: Ipv4Addr,
}

impl DnsServer<'_> {
    /// Where it listens (port [`DNS_PORT`]): the `nameserver` of pods started with
    /// [`PodBuilder::cluster_dns`].
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// `dig` run inside the cluster netns against this server: the answer a pod's resolver
    /// gets, without mirrord.
    pub fn dig(&self, args: &[&str]) -> Result<crate::Output> {
        let mut cmd = self.cluster.command("dig");
        cmd.arg(format!("@{}", self.ip)).args(args);
        run(&mut cmd, SHORT)
    }
}

impl Drop for DnsServer<'_> {
    fn drop(&mut self) {
        kill_process_group(&mut self.child);
        kill_process_group(&mut self.upstream);
    }
}

fn kill_process_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.wait();
}

/// Describes a pod before it starts; see [`Pod::builder`].
pub struct PodBuilder {
    name: String,
    hostname: Option<String>,
    env: Vec<(String, String)>,
    files: Vec<(String, Vec<u8>)>,
    nameserver: Option<Ipv4Addr>,
}

impl PodBuilder {
    /// Gives the pod Kubernetes-style `/etc/resolv.conf` (`nameserver`, the search list
    /// [`CLUSTER_SEARCH`], `options` [`CLUSTER_OPTIONS`]) and `/etc/hosts` (localhost and the
    /// pod's address with its hostname), bound in its own mount namespace. Without it the pod
    /// sees the world's files.
    pub fn cluster_dns(mut self, nameserver: Ipv4Addr) -> Self {
        self.nameserver = Some(nameserver);
        self
    }

    /// Hostname inside the pod (default: the pod name).
    pub fn hostname(mut self, hostname: &str) -> Self {
        self.hostname = Some(hostname.to_owned());
        self
    }

    /// An environment variable of the pod's main process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// A file in the pod's private [`POD_FILE_DIR`].
    pub fn file(mut self, name: &str, content: impl Into<Vec<u8>>) -> Self {
        self.files.push((name.to_owned(), content.into()));
        self
    }

    /// Starts the pod and wires it to `cluster`.
    pub fn start(self, cluster: &Cluster) -> Result<Pod<'_>> {
        world::require()?;
        let hostname = self.hostname.clone().unwrap_or_else(|| self.name.clone());
        let (suffix, n) = unique_suffix();
        let mut env = vec![
            ("POD_NAME".to_owned(), self.name.clone()),
            ("PATH".to_owned(), POD_PATH.to_owned()),
        ];
        env.extend(self.env.iter().cloned());
        let link = next_block();
        let pod_ip = offset(link, 2);
        // Empty: the pod keeps the world's files (the script binds only non-empty ones).
        let (resolv_conf, hosts) = match self.nameserver {
            Some(nameserver) => (
                format!(
                    "nameserver {nameserver}\nsearch {CLUSTER_SEARCH}\noptions {CLUSTER_OPTIONS}\n"
                ),
                format!("127.0.0.1\tlocalhost\n{pod_ip}\t{hostname}\n"),
            ),
            None => (String::new(), String::new()),
        };

        // The pod process prepares its namespaces, reports `ready`, waits until the veth is
        // wired from outside, then becomes a bare `sleep` with only the pod's environment.
        let script = format!(
            "set -e\n\
             hostname \"$MRDT_HOSTNAME\"\n\
             mount -t tmpfs -o size=1g,mode=0755 mrdt-pod {POD_FILE_DIR}\n\
             printf '%s' \"$MRDT_SHADOW\" > {POD_FILE_DIR}/.shadow\n\
             mount --bind {POD_FILE_DIR}/.shadow /etc/shadow\n\
             if [ -n \"$MRDT_RESOLV\" ]; then\n\
               printf '%s' \"$MRDT_RESOLV\" > {POD_FILE_DIR}/.resolv.conf\n\
               mount --bind {POD_FILE_DIR}/.resolv.conf /etc/resolv.conf\n\
               printf '%s' \"$MRDT_HOSTS\" > {POD_FILE_DIR}/.hosts\n\
               mount --bind {POD_FILE_DIR}/.hosts /etc/hosts\n\
             fi\n\
             ip link set lo up\n\
             echo ready\n\
             read go\n\
             exec env -i \"$@\" /bin/sleep infinity </dev/null >/dev/null 2>&1\n"
        );
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--net",
            "--mount",
            "--uts",
            "--propagation",
            "private",
            "--",
        ])
        .args(["/bin/sh", "-c", &script, "pod"])
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .env("MRDT_HOSTNAME", &hostname)
        .env("MRDT_SHADOW", POD_SHADOW)
        .env("MRDT_RESOLV", &resolv_conf)
        .env("MRDT_HOSTS", &hosts)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
        let mut child = cmd.spawn().map_err(|source| FixtureError::Spawn {
            program: "unshare (pod)".into(),
            source,
        })?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut pod = Pod {
            cluster,
            child,
            stdin,
            name: self.name,
            hostname,
            env,
            ip: pod_ip,
            gateway: offset(link, 1),
            // Interface names are capped at 15 bytes; the world is ours alone, so the counter suffices.
            cluster_link: format!("mrdt{n}"),
            pod_only_content: format!("only in pod {suffix}\n"),
        };
        let ready = stdout.and_then(|out| first_line(out, SHORT));
        if ready.as_deref() != Some("ready\n") {
            let detail = stderr.map(read_all_quickly).unwrap_or_default();
            return Err(FixtureError::NotReady {
                what: format!("pod {}", pod.name),
                timeout: SHORT,
                detail,
            });
        }
        pod.write_files(&self.files)?;
        pod.wire()?;
        pod.release()?;
        Ok(pod)
    }
}

/// Reads what a failed setup process wrote, without hanging if it is still alive.
fn read_all_quickly(mut pipe: impl std::io::Read + Send + 'static) -> String {
    let (text_tx, text_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        let _ = text_tx.send(text);
    });
    text_rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_or_default()
}

/// A fake pod: one process in its own net + mount + uts namespaces, attached to a [`Cluster`].
pub struct Pod<'c> {
    cluster: &'c Cluster,
    child: Child,
    stdin: Option<ChildStdin>,
    name: String,
    hostname: String,
    env: Vec<(String, String)>,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    cluster_link: String,
    pod_only_content: String,
}

impl<'c> Pod<'c> {
    pub fn builder(name: &str) -> PodBuilder {
        PodBuilder {
            name: name.to_owned(),
            hostname: None,
            env: Vec::new(),
            files: Vec::new(),
            nameserver: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `pid/<PID>`, the mirrord target naming this pod.
    pub fn target(&self) -> String {
        format!("pid/{}", self.pid())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// The pod's whole environment (what `/proc/<pid>/environ` holds).
    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The cluster end of the pod's link (its default route).
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn cluster(&self) -> &'c Cluster {
        self.cluster
    }

    /// Content of [`POD_FILE_DIR`]/[`POD_ONLY_FILE`], unique to this pod.
    pub fn pod_only_content(&self) -> &str {
        &self.pod_only_content
    }

    /// `program` run inside all of the pod's namespaces, as `kubectl exec` would.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "-t",
            &self.pid().to_string(),
            "-u",
            "-m",
            "-n",
            "--",
            program,
        ]);
        cmd
    }

    fn write_files(&self, files: &[(String, Vec<u8>)]) -> Result<()> {
        // /proc/<pid>/root resolves through the pod's mount namespace, so this lands in its tmpfs.
        let dir = PathBuf::from(format!("/proc/{}/root{POD_FILE_DIR}", self.pid()));
        let only = [(
            POD_ONLY_FILE.to_owned(),
            self.pod_only_content.clone().into_bytes(),
        )];
        for (name, content) in only.iter().chain(files) {
            let path = dir.join(name);
            std::fs::write(&path, content).map_err(FixtureError::io(path.display().to_string()))?;
        }
        Ok(())
    }

    /// Gives the pod's link IPv6 addresses too, as a dual-stack cluster would: a unique-local
    /// /64 of the link's own (from its IPv4 block), `…::2` the pod's end (returned) and `…::1`
    /// the cluster's, so cluster clients reach the pod on-link. Before `mirrord exec` starts:
    /// mirrord reads the target's addresses once.
    pub fn add_ipv6(&self) -> Result<Ipv6Addr> {
        let [a, b, c, d] = self.gateway.octets();
        let net = |host| {
            Ipv6Addr::new(
                0xfd6d,
                0x7274,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
                0,
                0,
                0,
                host,
            )
        };
        let pod_ip = net(2);
        let ns = self.cluster.name.as_str();
        let gateway = format!("{}/64", net(1));
        // nodad: usable at once, not after duplicate address detection's second.
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &gateway,
            "dev",
            &self.cluster_link,
            "nodad",
        ])?;
        run_checked(
            Command::new("nsenter")
                .args([
                    "-t",
                    &self.pid().to_string(),
                    "-n",
                    "--",
                    "ip",
                    "addr",
                    "add",
                ])
                .args([&format!("{pod_ip}/64"), "dev", "eth0", "nodad"]),
            SHORT,
        )?;
        Ok(pod_ip)
    }

    fn wire(&self) -> Result<()> {
        let pid = self.pid().to_string();
        let ns = self.cluster.name.as_str();
        let link = self.cluster_link.as_str();
        ip(&[
            "link", "add", "eth0", "netns", &pid, "type", "veth", "peer", "name", link, "netns", ns,
        ])?;
        let gateway = format!("{}/30", self.gateway);
        ip(&["-n", ns, "addr", "add", &gateway, "dev", link])?;
        ip(&["-n", ns, "link", "set", link, "up"])?;
        let pod_ip = format!("{}/30", self.ip);
        let in_pod = |args: &[&str]| {
            run_checked(
                Command::new("nsenter")
                    .args(["-t", &pid, "-n", "--", "ip"])
                    .args(args),
                SHORT,
            )
            .map(drop)
        };
        in_pod(&["addr", "add", &pod_ip, "dev", "eth0"])?;
        in_pod(&["link", "set", "eth0", "up"])?;
        in_pod(&["route", "add", "default", "via", &self.gateway.to_string()])
    }

    /// Lets the pod exec its final `sleep` and waits until it has, so its environ is the pod's.
    /// The new name shows before the kernel has set the new program's environment (it reads
    /// empty until then), so both are waited for; the pod always has `POD_NAME` and `PATH`.
    fn release(&mut self) -> Result<()> {
        let mut stdin = self.stdin.take().ok_or_else(|| FixtureError::NotReady {
            what: format!("pod {}", self.name),
            timeout: SHORT,
            detail: "no stdin".into(),
        })?;
        stdin
            .write_all(b"go\n")
            .map_err(FixtureError::io("pod stdin"))?;
        drop(stdin);
        let comm = format!("/proc/{}/comm", self.pid());
        let environ = format!("/proc/{}/environ", self.pid());
        let deadline = Instant::now() + SHORT;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep")
                && std::fs::read(&environ).is_ok_and(|e| !e.is_empty())
            {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(5));
        }
        Err(FixtureError::NotReady {
            what: format!("pod {}", self.name),
            timeout: SHORT,
            detail: "did not exec its main process".into(),
        })
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        kill_process_group(&mut self.child);
        // Normally gone with the pod's netns; something still holding that netns would keep it.
        let _ = run(
            Command::new("ip").args(["-n", &self.cluster.name, "link", "del", &self.cluster_link]),
            SHORT,
        );
    }
}
