//! Cluster DNS through `mirrord exec`: unmodified resolvers (glibc's getent, dig, nslookup,
//! curl, busybox-static wget, Python) inside the launched process resolve the cluster's names
//! through the stub in `/etc/resolv.conf` and the agent, with the pod's search list, real
//! NXDOMAINs, preserved TTLs and truncation + TCP retry for big answers; `--no-dns` and the
//! config's `dns` filters change what is resolved where.

use libtest_mimic::Failed;
use mirrord_tests::cluster::{
    ALIAS_NAME, BIG_TXT_NAME, BROKEN_DOMAIN, CLUSTER_OPTIONS, CLUSTER_SEARCH, DNS_TTL, DnsServer,
    HTTP_PORT, WEB_NAME, WEB_SRV_NAME, WEB_TXT, WILDCARD_DOMAIN, big_txt_strings,
};
use mirrord_tests::command::{Background, Run, SHORT};
use mirrord_tests::world::{HOST_ONLY_ADDR, HOST_ONLY_NAME};
use mirrord_tests::{Cluster, HttpServer, Output, Pod, Scene};

use super::{POD_HOSTNAME, RUN, exec};

/// The DNS stub's address inside the launched process (docs/cli.md).
const STUB: &str = "198.19.255.253";

/// The fixture's cluster range, as network.rs passes it.
const CLUSTER: &[&str] = &["--cidr", "10.213.0.0/16"];

/// What [`Cluster::serve_http`] serves in these tests.
const INDEX: &str = "hello from web by name\n";

/// A name the cluster DNS does not know, under the search domains so every query glibc makes
/// for it (search expansions, then as is) gets a real NXDOMAIN.
const UNKNOWN: &str = "nosuch-service";

/// A cluster with its DNS server, the `web` HTTP server its A record points at, and a pod whose
/// resolv.conf names that DNS server. Dropped in field order: servers, then the pod.
struct DnsWorld<'c> {
    dns: DnsServer<'c>,
    _http: HttpServer<'c>,
    pod: Pod<'c>,
}

fn dns_world(cluster: &Cluster) -> Result<DnsWorld<'_>, Failed> {
    let dns = cluster.serve_dns()?;
    let http = cluster.serve_http(&[("index.html", INDEX)])?;
    let pod = Pod::builder("web-7d9f8-x2k4q")
        .hostname(POD_HOSTNAME)
        .cluster_dns(dns.ip())
        .start(cluster)?;
    Ok(DnsWorld {
        dns,
        _http: http,
        pod,
    })
}

/// `mirrord exec -t <pod> -f <file with json> <flags…> -- <command…>`
fn exec_with_config(
    scene: &Scene,
    pod: &Pod,
    json: &serde_json::Value,
    flags: &[&str],
    command: &[&str],
) -> Result<Output, Failed> {
    let path = scene.temp_dir().join("mirrord-dns.json");
    std::fs::write(&path, json.to_string())?;
    let path = path.to_string_lossy().into_owned();
    let mut all = vec!["-f", path.as_str()];
    all.extend(flags);
    exec(scene, pod, &all, command)
}

/// `{"feature":{"network":{"dns":{"filter":{<kind>: names}}}}}`
fn dns_filter(kind: &str, names: &[&str]) -> serde_json::Value {
    serde_json::json!({"feature": {"network": {"dns": {"filter": {kind: names}}}}})
}

/// The flags of dig's `;; flags: qr rd ra;` header line.
fn dig_flags(out: &Output) -> Vec<String> {
    out.stdout
        .lines()
        .find_map(|line| line.strip_prefix(";; flags:"))
        .and_then(|rest| rest.split(';').next())
        .map(|flags| flags.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// `status: X` of dig's header line.
fn dig_status(out: &Output) -> Option<String> {
    let (_, rest) = out.stdout.split_once("status: ")?;
    rest.split(',').next().map(str::to_owned)
}

/// The TXT strings in dig's answer lines for `name`, in order, unquoted.
fn txt_strings(out: &Output, name: &str) -> Vec<String> {
    let owner = format!("{name}.");
    out.stdout
        .lines()
        .filter(|line| line.starts_with(&owner) && line.contains("\tTXT\t"))
        .flat_map(|line| {
            line.split('"')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The fixture itself (needs no mirrord binary).

/// The pod resolves the cluster's names by itself (so a failure below is mirrord's, not the
/// fixture's), the world does not know them, and only the world knows the host-only name.
pub fn fixture_cluster_dns_answers_the_pod(
    _scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let resolv = w.pod.command("cat").arg("/etc/resolv.conf").run(SHORT)?;
    ensure!(
        resolv.stdout
            == format!(
                "nameserver {}\nsearch {CLUSTER_SEARCH}\noptions {CLUSTER_OPTIONS}\n",
                w.dns.ip()
            ),
        "pod resolv.conf: {}",
        resolv.describe()
    );
    let getent = w.pod.command("getent").args(["hosts", "web"]).run(SHORT)?;
    ensure!(
        getent.code == 0
            && getent.stdout.split_whitespace().collect::<Vec<_>>()
                == [cluster.ip().to_string().as_str(), WEB_NAME],
        "getent in the pod: {}",
        getent.describe()
    );
    let wget = w
        .pod
        .command("busybox")
        .args(["wget", "-q", "-O", "-", "http://web:8080/index.html"])
        .run(SHORT)?;
    ensure!(
        wget.code == 0 && wget.stdout == INDEX,
        "busybox wget by name in the pod: {}",
        wget.describe()
    );
    let unknown = w
        .pod
        .command("getent")
        .args(["hosts", UNKNOWN])
        .run(SHORT)?;
    ensure!(
        unknown.code == 2,
        "unknown name in the pod: {}",
        unknown.describe()
    );
    let host_only = w
        .pod
        .command("getent")
        .args(["hosts", HOST_ONLY_NAME])
        .run(SHORT)?;
    ensure!(
        host_only.code == 2,
        "the pod knows the host-only name: {}",
        host_only.describe()
    );
    let world = std::process::Command::new("getent")
        .args(["hosts", HOST_ONLY_NAME])
        .run(SHORT)?;
    ensure!(
        world.code == 0 && world.stdout.starts_with(&format!("{HOST_ONLY_ADDR} ")),
        "the world does not know the host-only name: {}",
        world.describe()
    );
    let broken = w.dns.dig(&[&format!("x.{BROKEN_DOMAIN}")])?;
    ensure!(
        dig_status(&broken).as_deref() == Some("SERVFAIL"),
        "dnsmasq does not answer SERVFAIL under {BROKEN_DOMAIN}: {}",
        broken.describe()
    );
    let big = w.dns.dig(&["+noedns", "+ignore", BIG_TXT_NAME, "TXT"])?;
    ensure!(
        dig_flags(&big).iter().any(|f| f == "tc"),
        "dnsmasq does not truncate the big TXT over UDP: {}",
        big.describe()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// mirrord exec

/// The command's resolv.conf names only the stub and carries the pod's search and options;
/// `--no-dns` and `"dns": false` leave it the laptop's.
pub fn dns_resolv_conf_points_at_the_stub(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let out = exec(scene, &w.pod, &[], &["cat", "/etc/resolv.conf"])?;
    ensure!(out.code == 0, "cat: {}", out.describe());
    let nameservers: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("nameserver"))
        .collect();
    ensure!(
        nameservers == [format!("nameserver {STUB}")],
        "nameservers: {}",
        out.describe()
    );
    let has = |line: String| out.stdout.lines().any(|l| l.trim_end() == line);
    ensure!(
        has(format!("search {CLUSTER_SEARCH}")) && has(format!("options {CLUSTER_OPTIONS}")),
        "the pod's search/options lines are missing: {}",
        out.describe()
    );

    let local = std::fs::read_to_string("/etc/resolv.conf")?;
    let out = exec(scene, &w.pod, &["--no-dns"], &["cat", "/etc/resolv.conf"])?;
    ensure!(
        out.code == 0 && out.stdout == local,
        "--no-dns must leave the laptop's resolv.conf ({local:?}): {}",
        out.describe()
    );
    let off = serde_json::json!({"feature": {"network": {"dns": false}}});
    let out = exec_with_config(scene, &w.pod, &off, &[], &["cat", "/etc/resolv.conf"])?;
    ensure!(
        out.code == 0 && out.stdout == local,
        "\"dns\": false must leave the laptop's resolv.conf ({local:?}): {}",
        out.describe()
    );
    Ok(())
}

/// glibc (getent), nslookup and dig find the cluster's A, SRV, PTR and TXT records by the
/// names a pod uses.
pub fn dns_getent_nslookup_dig_see_cluster_records(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let web_ip = cluster.ip().to_string();

    let out = exec(scene, &w.pod, &[], &["getent", "hosts", "web"])?;
    ensure!(
        out.code == 0 && out.stdout.split_whitespace().collect::<Vec<_>>() == [&web_ip, WEB_NAME],
        "getent hosts web: {}",
        out.describe()
    );

    let out = exec(scene, &w.pod, &[], &["nslookup", "web"])?;
    ensure!(
        out.code == 0
            && out
                .stdout
                .contains(&format!("Name:\t{WEB_NAME}\nAddress: {web_ip}\n"))
            && out.stdout.contains(&format!("Server:\t\t{STUB}\n")),
        "nslookup web (through the stub): {}",
        out.describe()
    );

    let srv = format!("0 0 {HTTP_PORT} {WEB_NAME}.\n");
    for name in [WEB_NAME, WEB_SRV_NAME] {
        let out = exec(scene, &w.pod, &[], &["dig", "+short", name, "SRV"])?;
        ensure!(
            out.code == 0 && out.stdout == srv,
            "dig +short {name} SRV: {}",
            out.describe()
        );
    }

    let out = exec(scene, &w.pod, &[], &["dig", "-x", &web_ip, "+short"])?;
    ensure!(
        out.code == 0 && out.stdout == format!("{WEB_NAME}.\n"),
        "dig -x {web_ip}: {}",
        out.describe()
    );

    let out = exec(scene, &w.pod, &[], &["dig", "+short", WEB_NAME, "TXT"])?;
    ensure!(
        out.code == 0 && out.stdout == format!("\"{WEB_TXT}\"\n"),
        "dig TXT: {}",
        out.describe()
    );

    // dig's own resolver over TCP to the stub.
    let out = exec(scene, &w.pod, &[], &["dig", "+tcp", WEB_NAME])?;
    ensure!(
        out.code == 0
            && dig_status(&out).as_deref() == Some("NOERROR")
            && out.stdout.contains(&format!("\tA\t{web_ip}\n"))
            && out.stdout.contains(&format!("SERVER: {STUB}#53(")),
        "dig +tcp: {}",
        out.describe()
    );

    // Fresh names under a wildcard: nothing a cache could have seen before.
    let fresh = format!("n1.{WILDCARD_DOMAIN}");
    let out = exec(
        scene,
        &w.pod,
        &[],
        &[
            "python3",
            "-c",
            &format!("import socket; print(socket.gethostbyname('{fresh}'))"),
        ],
    )?;
    ensure!(
        out.code == 0 && out.stdout == format!("{web_ip}\n"),
        "python gethostbyname({fresh}): {}",
        out.describe()
    );
    Ok(())
}

/// HTTP clients reach a cluster service by its short name: curl (glibc) and busybox-static
/// wget (its own static resolver reading resolv.conf).
pub fn dns_curl_and_static_wget_by_service_name(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let url = format!("http://web:{HTTP_PORT}/index.html");
    let out = exec(
        scene,
        &w.pod,
        CLUSTER,
        &["curl", "-sS", "--max-time", "10", &url],
    )?;
    ensure!(
        out.code == 0 && out.stdout == INDEX,
        "curl {url}: {}",
        out.describe()
    );
    let out = exec(
        scene,
        &w.pod,
        CLUSTER,
        &["busybox", "wget", "-q", "-O", "-", &url],
    )?;
    ensure!(
        out.code == 0 && out.stdout == INDEX,
        "busybox wget {url}: {}",
        out.describe()
    );
    Ok(())
}

/// Without `--cidr`, an outgoing `remote` filter naming `web` sends web's address (learnt from
/// the DNS answer) through the agent; without the filter that address stays local and,
/// the laptop having no route there, fails.
pub fn dns_outgoing_filter_learns_addresses_from_dns(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let url = format!("http://web:{HTTP_PORT}/index.html");
    let curl = ["curl", "-sS", "--max-time", "5", url.as_str()];
    let filter =
        serde_json::json!({"feature": {"network": {"outgoing": {"filter": {"remote": ["web"]}}}}});
    let out = exec_with_config(scene, &w.pod, &filter, &[], &curl)?;
    ensure!(
        out.code == 0 && out.stdout == INDEX,
        "curl by name with the outgoing remote filter [\"web\"]: {}",
        out.describe()
    );
    let out = exec(scene, &w.pod, &[], &curl)?;
    ensure!(
        out.code != 0,
        "without --cidr or a filter the cluster address must stay local (and unreachable): {}",
        out.describe()
    );
    Ok(())
}

/// A TXT answer over 512 bytes comes back truncated over plain UDP, dig retries over TCP to the
/// stub and gets all of it; with a large EDNS buffer it fits in one UDP answer.
pub fn dns_big_answer_truncated_then_tcp(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let expected = big_txt_strings();

    let out = exec(
        scene,
        &w.pod,
        &[],
        &["dig", "+noedns", "+ignore", BIG_TXT_NAME, "TXT"],
    )?;
    ensure!(
        out.code == 0 && dig_flags(&out).iter().any(|f| f == "tc"),
        "the plain UDP answer must carry TC: {}",
        out.describe()
    );

    let out = exec(scene, &w.pod, &[], &["dig", "+noedns", BIG_TXT_NAME, "TXT"])?;
    ensure!(
        out.code == 0
            && out.stdout.contains(";; Truncated, retrying in TCP mode.")
            && txt_strings(&out, BIG_TXT_NAME) == expected,
        "UDP then TCP retry must give all {} strings: {}",
        expected.len(),
        out.describe()
    );

    let out = exec(scene, &w.pod, &[], &["dig", "+tcp", BIG_TXT_NAME, "TXT"])?;
    ensure!(
        out.code == 0 && txt_strings(&out, BIG_TXT_NAME) == expected,
        "dig +tcp: {}",
        out.describe()
    );

    let out = exec(
        scene,
        &w.pod,
        &[],
        &["dig", "+bufsize=4096", "+ignore", BIG_TXT_NAME, "TXT"],
    )?;
    ensure!(
        out.code == 0
            && !dig_flags(&out).iter().any(|f| f == "tc")
            && txt_strings(&out, BIG_TXT_NAME) == expected,
        "with EDNS 4096 the answer fits in UDP: {}",
        out.describe()
    );

    // The client's EDNS size is the limit, not 512: 600 is still too small for this answer.
    let out = exec(
        scene,
        &w.pod,
        &[],
        &["dig", "+bufsize=600", "+ignore", BIG_TXT_NAME, "TXT"],
    )?;
    ensure!(
        out.code == 0 && dig_flags(&out).iter().any(|f| f == "tc"),
        "with EDNS 600 the answer must carry TC: {}",
        out.describe()
    );
    Ok(())
}

/// The answer carries the record's TTL (counting down in a cache at most), not a made-up one.
pub fn dns_ttl_is_preserved(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    // Twice in one session: the second answer may come from mirrord's cache.
    let out = exec(
        scene,
        &w.pod,
        &[],
        &[
            "sh",
            "-c",
            &format!("dig +noall +answer {WEB_NAME} A && dig +noall +answer {WEB_NAME} A"),
        ],
    )?;
    let ttls: Vec<u32> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with(&format!("{WEB_NAME}.")))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    // Half the TTL is far more than this test can take: only a wrong TTL fails it.
    ensure!(
        out.code == 0 && ttls.len() == 2 && ttls.iter().all(|t| *t <= DNS_TTL && *t > DNS_TTL / 2),
        "TTLs {ttls:?}, expected in ({}, {DNS_TTL}]: {}",
        DNS_TTL / 2,
        out.describe()
    );
    Ok(())
}

/// An unknown name is NXDOMAIN for dig and "not found" (exit 2) for getent, answered at once
/// rather than after a resolver timeout and retry; the cluster's SERVFAIL comes through as is.
pub fn dns_unknown_name_is_nxdomain_at_once(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let fqdn = format!("{UNKNOWN}.default.svc.cluster.local");
    let out = exec(scene, &w.pod, &[], &["dig", &fqdn])?;
    ensure!(
        out.code == 0 && dig_status(&out).as_deref() == Some("NXDOMAIN"),
        "dig {fqdn}: {}",
        out.describe()
    );
    let broken = format!("x.{BROKEN_DOMAIN}");
    let out = exec(scene, &w.pod, &[], &["dig", &broken])?;
    ensure!(
        out.code == 0 && dig_status(&out).as_deref() == Some("SERVFAIL"),
        "dig {broken} (the cluster DNS answers SERVFAIL): {}",
        out.describe()
    );
    let out = exec(scene, &w.pod, &[], &["getent", "hosts", UNKNOWN])?;
    ensure!(
        out.code == 2 && out.stdout.is_empty(),
        "getent hosts {UNKNOWN}: {}",
        out.describe()
    );
    // glibc's default timeout is 5 s per try: a lost or unanswered query shows as seconds.
    let script = format!(
        "import socket, time\n\
         start = time.monotonic()\n\
         try:\n    socket.getaddrinfo('{UNKNOWN}', 80)\n    print('found')\n\
         except socket.gaierror as error:\n    \
         print('not found', error.errno == socket.EAI_NONAME, time.monotonic() - start < 1.0)\n"
    );
    let out = exec(scene, &w.pod, &[], &["python3", "-c", &script])?;
    ensure!(
        out.code == 0 && out.stdout == "not found True True\n",
        "getaddrinfo({UNKNOWN}) must fail with EAI_NONAME in well under a second: {}",
        out.describe()
    );
    Ok(())
}

/// Names under a `local` rule are resolved by the laptop (its /etc/hosts), others by the pod;
/// a `remote` rule is the reverse.
pub fn dns_filter_local_and_remote_names(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let web_ip = cluster.ip().to_string();
    let host_only = HOST_ONLY_ADDR.to_string();
    let getent = |json: Option<&serde_json::Value>, name: &str| -> Result<Output, Failed> {
        let command = ["getent", "ahostsv4", name];
        match json {
            Some(json) => exec_with_config(scene, &w.pod, json, &[], &command),
            None => exec(scene, &w.pod, &[], &command),
        }
    };
    let first_addr = |out: &Output| out.stdout.split_whitespace().next().map(str::to_owned);

    let out = getent(None, HOST_ONLY_NAME)?;
    ensure!(
        out.code == 2,
        "without a filter {HOST_ONLY_NAME} is the pod's to resolve (not found): {}",
        out.describe()
    );
    let out = exec(scene, &w.pod, &[], &["dig", HOST_ONLY_NAME])?;
    ensure!(
        dig_status(&out).as_deref() == Some("NXDOMAIN"),
        "without a filter dig {HOST_ONLY_NAME} is the cluster's NXDOMAIN: {}",
        out.describe()
    );

    for rule in [HOST_ONLY_NAME, "*.mirrord.test"] {
        let local = dns_filter("local", &[rule]);
        let out = getent(Some(&local), HOST_ONLY_NAME)?;
        ensure!(
            out.code == 0 && first_addr(&out).as_deref() == Some(host_only.as_str()),
            "local rule {rule:?}: {HOST_ONLY_NAME} must resolve on the laptop: {}",
            out.describe()
        );
        let out = exec_with_config(
            scene,
            &w.pod,
            &local,
            &[],
            &["dig", "+short", HOST_ONLY_NAME],
        )?;
        ensure!(
            out.code == 0 && out.stdout == format!("{host_only}\n"),
            "local rule {rule:?}: dig {HOST_ONLY_NAME}: {}",
            out.describe()
        );
        let out = getent(Some(&local), "web")?;
        ensure!(
            out.code == 0 && first_addr(&out).as_deref() == Some(web_ip.as_str()),
            "local rule {rule:?}: web must still resolve in the cluster: {}",
            out.describe()
        );
    }

    let remote = dns_filter("remote", &["web"]);
    let out = getent(Some(&remote), "web")?;
    ensure!(
        out.code == 0 && first_addr(&out).as_deref() == Some(web_ip.as_str()),
        "remote rule [\"web\"]: web resolves in the cluster: {}",
        out.describe()
    );
    let out = getent(Some(&remote), HOST_ONLY_NAME)?;
    ensure!(
        out.code == 0 && first_addr(&out).as_deref() == Some(host_only.as_str()),
        "remote rule [\"web\"]: everything else, {HOST_ONLY_NAME} too, is the laptop's: {}",
        out.describe()
    );
    Ok(())
}

/// `mirrord shell` gets the stub too (same launcher as exec).
pub fn dns_shell_command_resolves_cluster_names(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let mut cmd = scene.mirrord()?;
    cmd.args([
        "shell",
        "-t",
        &w.pod.target(),
        "--",
        "-c",
        "getent hosts web",
    ])
    .env("SHELL", "/bin/sh");
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 0
            && out.stdout.split_whitespace().collect::<Vec<_>>()
                == [cluster.ip().to_string().as_str(), WEB_NAME],
        "mirrord shell: getent hosts web: {}",
        out.describe()
    );
    Ok(())
}

/// 200 lookups at once (fresh wildcard names, so all go to the agent, and one cached name)
/// are all answered, each with the right address.
pub fn dns_200_concurrent_lookups(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let script = format!(
        "import collections, concurrent.futures, socket\n\
         def look(i):\n    \
         name = 'web' if i % 2 else f'c{{i}}.{WILDCARD_DOMAIN}'\n    \
         try:\n        return socket.gethostbyname(name)\n    \
         except OSError as error:\n        return repr(error)\n\
         with concurrent.futures.ThreadPoolExecutor(200) as pool:\n    \
         print(dict(collections.Counter(pool.map(look, range(200)))))\n"
    );
    let out = exec(scene, &w.pod, &[], &["python3", "-c", &script])?;
    ensure!(
        out.code == 0 && out.stdout == format!("{{'{}': 200}}\n", cluster.ip()),
        "200 concurrent lookups: {}",
        out.describe()
    );
    Ok(())
}

/// A CNAME comes back with its chain and TTLs, and a query type the resolver API does not
/// cover (ANY) is passed to the pod's nameserver as it is and answered by it.
pub fn dns_cname_chain_and_raw_query_types(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let web_ip = cluster.ip().to_string();
    let out = exec(
        scene,
        &w.pod,
        &[],
        &["dig", "+noall", "+answer", "+nottlunits", ALIAS_NAME, "A"],
    )?;
    let records: Vec<Vec<&str>> = out
        .stdout
        .lines()
        .map(|line| line.split_whitespace().collect())
        .collect();
    let shape: Vec<(&str, &str, &str)> = records
        .iter()
        .filter_map(|r| Some((*r.first()?, *r.get(3)?, *r.get(4)?)))
        .collect();
    ensure!(
        out.code == 0
            && shape
                == vec![
                    (
                        format!("{ALIAS_NAME}.").as_str(),
                        "CNAME",
                        format!("{WEB_NAME}.").as_str()
                    ),
                    (format!("{WEB_NAME}.").as_str(), "A", web_ip.as_str()),
                ]
            && records.iter().all(|r| r
                .get(1)
                .and_then(|ttl| ttl.parse::<u32>().ok())
                .is_some_and(|ttl| ttl > 0 && ttl <= DNS_TTL)),
        "dig {ALIAS_NAME}: {}",
        out.describe()
    );
    let out = exec(scene, &w.pod, &[], &["getent", "hosts", "api"])?;
    ensure!(
        out.code == 0 && out.stdout.starts_with(&format!("{web_ip} ")),
        "getent hosts api: {}",
        out.describe()
    );
    // ANY: forwarded as is; the pod's nameserver answers with what it has for the name.
    let direct = w.dns.dig(&["+noall", "+answer", WEB_NAME, "ANY"])?.stdout;
    let out = exec(
        scene,
        &w.pod,
        &[],
        &["dig", "+noall", "+answer", WEB_NAME, "ANY"],
    )?;
    let types = |text: &str| -> Vec<String> {
        let mut types: Vec<String> = text
            .lines()
            .filter_map(|line| line.split_whitespace().nth(3).map(str::to_owned))
            .collect();
        types.sort();
        types
    };
    ensure!(
        out.code == 0 && !types(&out.stdout).is_empty() && types(&out.stdout) == types(&direct),
        "dig ANY through mirrord: {} (directly: {direct})",
        out.describe()
    );
    Ok(())
}

/// Go's own resolver (CGO_ENABLED=0: it reads /etc/resolv.conf itself and speaks DNS on its
/// own, no libc) resolves the service's short name like the pod would.
pub fn dns_go_pure_resolver(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let w = dns_world(cluster)?;
    let dir = scene.temp_dir().join("go-resolver");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("main.go"),
        "package main\n\nimport (\n\t\"context\"\n\t\"fmt\"\n\t\"net\"\n\t\"os\"\n)\n\n\
         func main() {\n\tr := &net.Resolver{PreferGo: true}\n\
         \taddrs, err := r.LookupHost(context.Background(), os.Args[1])\n\
         \tif err != nil {\n\t\tfmt.Println(\"error:\", err)\n\t\tos.Exit(1)\n\t}\n\
         \tfmt.Println(addrs[0])\n}\n",
    )?;
    let binary = dir.join("resolve");
    let mut build = std::process::Command::new("go");
    build
        .args(["build", "-o"])
        .arg(&binary)
        .arg("main.go")
        .current_dir(&dir)
        .env("CGO_ENABLED", "0");
    let built = build
        .run(std::time::Duration::from_secs(300))
        .map_err(|error| {
            Failed::from(format!(
                "go build (Go is needed for this test, as for tests/cluster): {error}"
            ))
        })?;
    ensure!(built.code == 0, "go build: {}", built.describe());
    let binary = binary.to_string_lossy().into_owned();
    let out = exec(scene, &w.pod, CLUSTER, &[&binary, "web"])?;
    ensure!(
        out.code == 0 && out.stdout == format!("{}\n", cluster.ip()),
        "Go resolver, web: {}",
        out.describe()
    );
    let out = exec(scene, &w.pod, CLUSTER, &[&binary, UNKNOWN])?;
    ensure!(
        out.code == 1 && out.stdout.contains("no such host"),
        "Go resolver, unknown name: {}",
        out.describe()
    );
    Ok(())
}

/// A pod's DNS answering a cluster name with the address that leads to this machine's loopback
/// gets that record dropped (one warning line; the name has no address), and a name answered
/// with `127.0.0.1` reaches the command's own loopback: a service on this machine's loopback is
/// reached only through `host.mirrord.internal`.
pub fn dns_answers_never_lead_to_this_machine(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    use mirrord_tests::cluster::{LAPTOP_NAME, LOOPBACK_NAME};
    let world = dns_world(cluster)?;
    // A service of the developer's own, on this machine's loopback.
    let laptop = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = laptop.local_addr()?.port();
    laptop.set_nonblocking(true)?;
    let out = exec(
        scene,
        &world.pod,
        CLUSTER,
        &[
            "sh",
            "-c",
            &format!(
                "getent ahostsv4 {LAPTOP_NAME} || echo laptop-name-unresolved; \
                 getent ahostsv4 {LOOPBACK_NAME} | head -1 | cut -d' ' -f1; \
                 curl -s -o /dev/null --max-time 5 http://{LOOPBACK_NAME}:{port}/ || echo loopback-refused; \
                 curl -s -o /dev/null --max-time 5 http://host.mirrord.internal:{port}/; echo host $?"
            ),
        ],
    )?;
    // The last curl reaches the listener (which never answers HTTP): accepted, then timed out.
    let mut accepted = 0;
    while laptop.accept().is_ok() {
        accepted += 1;
    }
    ensure!(
        out.code == 0
            && out
                .stdout
                .starts_with("laptop-name-unresolved\n127.0.0.1\nloopback-refused\nhost ")
            && out
                .stderr
                .contains("which would reach this machine's loopback; dropped"),
        "{}",
        out.describe()
    );
    ensure!(
        accepted == 1,
        "this machine's loopback service got {accepted} connections; only the one through \
         host.mirrord.internal was expected: {}",
        out.describe()
    );
    Ok(())
}

/// A pod's own DNS server that answers by the first label of the name: `garbage` with bytes
/// that are no DNS message, `loop` with an answer whose name is a compression pointer to
/// itself, `count` with a header claiming 65,535 answers and none following, `huge` with 4,000
/// A records (a 64 KB datagram, and the same over TCP), `good` with 10.213.0.99, anything else
/// NXDOMAIN. It prints `ready` once both sockets listen.
const HOSTILE_DNS: &str = r#"
import socket, struct, sys, threading
def answer(q):
    end = 12
    first = None
    while end < len(q) and q[end]:
        if first is None:
            first = q[end + 1:end + 1 + q[end]]
        end += q[end] + 1
    qid, question = q[:2], q[12:end + 5]
    head = lambda rcode, answers: qid + bytes([0x84 | (q[2] & 1), rcode]) + struct.pack('>HHHH', 1, answers, 0, 0) + question
    record = lambda last: struct.pack('>HHHIH', 0xC00C, 1, 1, 60, 4) + bytes([10, 213, last >> 8, last & 255])
    if first == b'garbage':
        return qid + bytes(range(7, 250, 3))
    if first == b'loop':
        at = 12 + len(question)
        return head(0, 1) + struct.pack('>HHHIH', 0xC000 | at, 1, 1, 60, 4) + bytes([10, 213, 0, 99])
    if first == b'count':
        return head(0, 65535)
    if first == b'huge':
        return head(0, 4000) + b''.join(record(i) for i in range(4000))
    if first == b'good':
        return head(0, 1) + record(99)
    return head(3, 0)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind(('127.0.0.1', 53))
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind(('127.0.0.1', 53))
tcp.listen(16)
def serve_tcp():
    while True:
        conn, _ = tcp.accept()
        with conn:
            data = b''
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                while len(data) >= 2 and len(data) >= 2 + struct.unpack('>H', data[:2])[0]:
                    n = struct.unpack('>H', data[:2])[0]
                    reply = answer(data[2:2 + n])
                    data = data[2 + n:]
                    conn.sendall(struct.pack('>H', len(reply)) + reply)
threading.Thread(target=serve_tcp, daemon=True).start()
print('ready', flush=True)
while True:
    q, peer = udp.recvfrom(4096)
    if len(q) > 12:
        udp.sendto(answer(q), peer)
"#;

/// The pod's DNS server is hostile (see [`HOSTILE_DNS`]): malformed, self-referencing,
/// lying and oversized answers each give the command a clean DNS answer — SERVFAIL, or for the
/// oversized one a truncated reply and at most what fits a DNS message over TCP, with only the
/// server's addresses — and the session keeps resolving good names afterwards.
pub fn dns_hostile_pod_server_gets_clean_answers(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = Pod::builder("web-7d9f8-x2k4q")
        .cluster_dns(std::net::Ipv4Addr::LOCALHOST)
        .start(cluster)?;
    let mut server = pod.command("/usr/bin/python3");
    server
        .args(["-u", "-c", HOSTILE_DNS])
        .stderr(std::process::Stdio::null());
    let (_server, ready) = Background::start(server, SHORT)?;
    ensure!(
        ready.as_deref() == Some("ready\n"),
        "hostile DNS: {ready:?}"
    );
    let dig = |name: &str| format!("dig +tries=1 +time=5 {name}.example. A");
    let script = [
        dig("garbage"),
        dig("loop"),
        dig("count"),
        dig("huge"),
        format!("{} +tcp", dig("huge")),
        dig("good"),
    ]
    .join("; echo ====; ");
    let out = exec(scene, &pod, &[], &["sh", "-c", &script])?;
    ensure!(out.code == 0, "the session: {}", out.describe());
    let replies: Vec<Output> = out
        .stdout
        .split("====\n")
        .map(|stdout| Output {
            stdout: stdout.to_owned(),
            ..out.clone()
        })
        .collect();
    ensure!(replies.len() == 6, "six replies: {}", out.describe());
    for (name, reply) in ["garbage", "loop", "count"].iter().zip(&replies) {
        ensure!(
            dig_status(reply).as_deref() == Some("SERVFAIL"),
            "{name}: {}",
            reply.stdout
        );
    }
    for (how, reply) in [("UDP", &replies[3]), ("TCP", &replies[4])] {
        let addresses: Vec<&str> = reply
            .stdout
            .lines()
            .filter(|line| line.starts_with("huge.example.") && line.contains("\tA\t"))
            .filter_map(|line| line.rsplit('\t').next())
            .collect();
        ensure!(
            matches!(dig_status(reply).as_deref(), Some("SERVFAIL" | "NOERROR"))
                && addresses.iter().all(|a| a.starts_with("10.213."))
                && reply.stdout.len() < 200_000,
            "huge over {how}: {}",
            reply.stdout.lines().take(20).collect::<Vec<_>>().join("\n")
        );
    }
    ensure!(
        replies[5].stdout.contains("good.example.\t") && replies[5].stdout.contains("10.213.0.99"),
        "a good name afterwards: {}",
        replies[5].stdout
    );
    Ok(())
}
