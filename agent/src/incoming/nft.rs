//! The agent's nftables redirect in the target's network namespace: one table per agent whose
//! name says which agent owns it, rendered as text from the set of subscribed ports and applied
//! with `nft -f -` as one atomic transaction. It must never touch a table it does not own, and
//! never report a failure to install as anything but one line naming the cause.
//!
//! Why the `nft` binary rather than netlink: the whole table is replaced in one transaction
//! from text a unit test can read, nft's own parser checks it, and the kernel's answers come
//! back as nft's messages, which [`Cause::classify`] maps to the user's next step. Netlink would
//! need an nftables expression encoder of our own for no gain at a handful of rules. The cost:
//! the agent's image must ship `nft` (Debian's `nftables` package).
//!
//! Only new connections are redirected: NAT is decided on a connection's first packet and kept
//! in conntrack, so replacing or deleting the table leaves connections already redirected (and
//! those that were never) as they are.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;

/// The socket marks of agents' own connections to the original app: `PASS_THROUGH_MARK` plus
/// the agent's [`Place`] in line. The redirect of an agent at place `p` skips the marks of
/// places up to `p`: its own connections, and those of agents whose tables come after it,
/// reach the app (or the next agent in line) instead of coming back. Arbitrary, but not a bit
/// pattern used by kube-proxy (0x4000/0x8000) or Istio (0x539).
pub const PASS_THROUGH_MARK: u32 = 0x6d72_6400;

/// Where an agent's table comes among the agents that redirect in one target: tables run in
/// falling order of place (a higher place, a lower hook priority, runs first), so a
/// connection reaches the agent with the highest place among those redirecting its port first,
/// and what that agent passes through goes on to the next one. An agent takes the place above
/// every other live agent's when it subscribes, so the newest subscription is first in line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place(u8);

impl Place {
    pub const FIRST: Place = Place(1);
    /// Places 1 to 89: priorities -11 to -99 in prerouting, -111 to -199 in output (NAT chains
    /// must run after conntrack, at -200).
    const LAST: u8 = 89;

    /// The place just above `self`; `None` past the last one.
    pub fn above(self) -> Option<Place> {
        (self.0 < Place::LAST).then_some(Place(self.0 + 1))
    }

    /// The mark of this agent's connections to the original app.
    pub fn mark(self) -> u32 {
        PASS_THROUGH_MARK + u32::from(self.0)
    }

    /// Prerouting: after dstnat (-100). A connection that other NAT at the hook already
    /// took (a mesh sidecar's capture of the port) is bound by then, and our chain leaves it
    /// alone: the sidecar gets it first, ends its mutual TLS, and its plain connection on to the
    /// app, to the pod's own address, is what the output chain takes.
    fn prerouting_priority(self) -> i32 {
        -10 - i32::from(self.0)
    }

    /// Output: just before dstnat, so the pod's own connections to itself (a sidecar's included)
    /// are taken before a mesh's own output NAT. Both numeric because nft 1.0.6 refuses the
    /// name `dstnat` on an inet output hook.
    fn output_priority(self) -> i32 {
        -110 - i32::from(self.0)
    }
}

/// What an agent's table redirects: `ports`, of which `stolen` are stolen whole (the other
/// agents read that from the listing, to refuse a second whole steal), at `place`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub ports: BTreeSet<u16>,
    pub stolen: BTreeSet<u16>,
    pub place: Place,
}

/// The rule comment that marks the ports an agent steals whole.
const STOLEN_COMMENT: &str = "stolen whole";

/// Prefix of every table an agent creates.
pub const TABLE_PREFIX: &str = "mirrord_";

/// Names the `nft` program to run; unset means `nft` from PATH. Tests point it at a path
/// without nft to take the real "no nft binary" path.
pub const NFT_VAR: &str = "MIRRORD_AGENT_NFT";

/// Who owns a table: an agent process, named by its pid namespace, pid and start time (in
/// clock ticks since boot), so a reused pid or another pid namespace's process is never taken
/// for the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid_ns: u64,
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    /// The calling process.
    pub fn current() -> std::io::Result<Owner> {
        let pid = std::process::id();
        let start = start_time(pid)?;
        Ok(Owner {
            pid_ns: pid_ns()?,
            pid,
            start,
        })
    }

    /// `mirrord_<pidns>_<pid>_<start>`.
    pub fn table(&self) -> String {
        format!("{TABLE_PREFIX}{}_{}_{}", self.pid_ns, self.pid, self.start)
    }

    /// The owner a table name encodes; `None` for any other name.
    pub fn parse(table: &str) -> Option<Owner> {
        let mut parts = table.strip_prefix(TABLE_PREFIX)?.split('_');
        let owner = Owner {
            pid_ns: parts.next()?.parse().ok()?,
            pid: parts.next()?.parse().ok()?,
            start: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(owner)
    }

    /// Whether this owner process is gone: judged only for owners in our pid namespace (a pid
    /// from another one means nothing here), by its start time, so a reused pid is not alive.
    pub fn is_dead(&self, our_pid_ns: u64) -> bool {
        self.pid_ns == our_pid_ns && start_time(self.pid).map_or(true, |start| start != self.start)
    }
}

fn pid_ns() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self/ns/pid")?.ino())
}

/// Field 22 of /proc/PID/stat; the command name before it may hold spaces and parentheses,
/// so fields are counted after its last `)`.
fn start_time(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| std::io::Error::other("unexpected /proc/PID/stat"))
}

fn parse_start_time(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // After the comm: state is field 3, starttime field 22.
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// The batch that makes table `table` redirect new TCP connections to `plan`'s ports on the
/// target's own addresses to `listen_port`, replacing whatever the table held; with no ports it
/// only removes the table. Existing-or-not does not matter: the empty `table` line creates it
/// first, so the delete never fails.
pub fn ruleset(table: &str, plan: &Plan, listen_port: u16) -> String {
    let mut text = format!("table inet {table} {{}}\ndelete table inet {table}\n");
    if plan.ports.is_empty() {
        return text;
    }
    // Only a connection's first SYN: a connection open before conntrack ran in this namespace
    // (no NAT table here until ours) is picked up mid-stream as `new`, and redirecting its next
    // segment to our listener would reset it.
    let rule = |ports: Vec<&u16>, comment: &str| {
        let ports = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        format!(
            "\t\tfib daddr type local tcp dport {{ {} }} tcp flags & (syn | ack) == syn ct state new redirect to :{listen_port}{comment}\n",
            ports.join(", ")
        )
    };
    let (stolen, shared): (Vec<&u16>, Vec<&u16>) =
        plan.ports.iter().partition(|p| plan.stolen.contains(p));
    let mut matched = String::new();
    if !stolen.is_empty() {
        matched += &rule(stolen, &format!(" comment \"{STOLEN_COMMENT}\""));
    }
    if !shared.is_empty() {
        matched += &rule(shared, "");
    }
    let (prerouting, output) = (
        plan.place.prerouting_priority(),
        plan.place.output_priority(),
    );
    let skipped = format!("{PASS_THROUGH_MARK:#x}-{:#x}", plan.place.mark());
    // `output` takes the pod's own connections to its own addresses, but not over loopback:
    // a sidecar or probe that talks to the app on localhost keeps reaching the app.
    let _ = write!(
        text,
        "table inet {table} {{\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority {prerouting}; policy accept;\n\
         {matched}\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority {output}; policy accept;\n\
         \t\tmeta mark {skipped} return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         \t\tip6 daddr ::1 return\n\
         {matched}\
         \t}}\n\
         }}\n"
    );
    text
}

/// What another agent's table (as `nft list table` prints it) redirects: the `dport`s of its
/// `redirect` rules (one port or a `{ … }` set), those under the stolen-whole comment, and its
/// place from the end of its skipped mark range (a table without one is first in line, of
/// place 0).
pub fn read_plan(listing: &str) -> Plan {
    let mut plan = Plan {
        ports: BTreeSet::new(),
        stolen: BTreeSet::new(),
        place: Place(0),
    };
    for line in listing.lines() {
        if let Some(range) = line.trim().strip_prefix("meta mark ") {
            let last = range.split_whitespace().next().unwrap_or_default();
            let last = last.rsplit('-').next().unwrap_or_default();
            let mark = u32::from_str_radix(last.trim_start_matches("0x"), 16).unwrap_or(0);
            if let Some(place) = mark.checked_sub(PASS_THROUGH_MARK) {
                plan.place = Place(u8::try_from(place).unwrap_or(u8::MAX));
            }
        }
        if !line.contains("redirect") {
            continue;
        }
        let Some((_, rest)) = line.split_once("dport ") else {
            continue;
        };
        let rest = rest.trim_start();
        let ports = match rest.strip_prefix('{') {
            Some(set) => set.split('}').next().unwrap_or_default(),
            None => rest.split_whitespace().next().unwrap_or_default(),
        };
        let ports: Vec<u16> = ports
            .split(',')
            .filter_map(|port| port.trim().parse().ok())
            .collect();
        if line.contains(&format!("comment \"{STOLEN_COMMENT}\"")) {
            plan.stolen.extend(&ports);
        }
        plan.ports.extend(ports);
    }
    plan
}

/// Removes `table` whether or not it exists.
pub fn delete(table: &str) -> String {
    let nothing = Plan {
        ports: BTreeSet::new(),
        stolen: BTreeSet::new(),
        place: Place::FIRST,
    };
    ruleset(table, &nothing, 0)
}

/// The `mirrord_` tables in `nft list tables` output (`table inet NAME` lines).
pub fn our_tables(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("table"), Some("inet"), Some(name), None)
                    if name.starts_with(TABLE_PREFIX) =>
                {
                    Some(name.to_owned())
                }
                _ => None,
            }
        })
        .collect()
}

/// Why the redirect could not be installed, in words that tell the user what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Cause {
    #[error("the nft program ({0}) was not found in the agent; install nftables in its image")]
    NoBinary(String),
    #[error("the agent lacks NET_ADMIN")]
    NoNetAdmin,
    #[error("nftables is not available in its kernel (nf_tables module missing)")]
    NoKernelSupport,
    #[error(
        "its kernel lacks an nftables module the redirect needs (nft_chain_nat, nft_redirect, nft_fib)"
    )]
    MissingModule,
    #[error("nft failed: {0}")]
    Other(String),
}

impl Cause {
    /// Reads nft's complaint. Matched on the kernel's errno strings, which nft prints as
    /// `strerror` does: they do not change between nft releases. Without nfnetlink the socket
    /// itself is refused (EPROTONOSUPPORT); without nf_tables nfnetlink answers a batch with
    /// EOPNOTSUPP and a lookup (nft's cache) with EINVAL; a missing chain type or expression
    /// module makes the rule fail with ENOENT.
    pub fn classify(stderr: &str) -> Cause {
        let no_nf_tables_cache =
            stderr.contains("cache initialization failed") && stderr.contains("Invalid argument");
        if stderr.contains("Operation not permitted") {
            Cause::NoNetAdmin
        } else if no_nf_tables_cache
            || [
                "Protocol not supported",
                "Operation not supported",
                "Address family not supported",
            ]
            .iter()
            .any(|s| stderr.contains(s))
        {
            Cause::NoKernelSupport
        } else if stderr.contains("No such file or directory") {
            Cause::MissingModule
        } else {
            let line = stderr
                .lines()
                .map(str::trim)
                .find(|l| l.contains("Error:"))
                .or_else(|| stderr.lines().map(str::trim).find(|l| !l.is_empty()))
                .unwrap_or("no message");
            Cause::Other(line.to_owned())
        }
    }

    pub fn errno(&self) -> i32 {
        match self {
            Cause::NoBinary(_) => libc::ENOENT,
            Cause::NoNetAdmin => libc::EPERM,
            Cause::NoKernelSupport | Cause::MissingModule => libc::EOPNOTSUPP,
            Cause::Other(_) => libc::EIO,
        }
    }
}

/// The `nft` program, run from the calling thread's network namespace (on the agent's runtime,
/// the target's): a spawned process starts in its parent thread's namespace.
#[derive(Debug, Clone)]
pub struct Nft {
    program: PathBuf,
}

impl Nft {
    /// `$MIRRORD_AGENT_NFT`, else `nft` from PATH.
    pub fn from_env() -> Nft {
        Nft {
            program: std::env::var_os(NFT_VAR)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("nft")),
        }
    }

    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Runs `nft -f -` with `batch` on stdin, as one transaction.
    pub async fn apply(&self, batch: &str) -> Result<(), Cause> {
        self.run(&["-f", "-"], Some(batch)).await.map(drop)
    }

    /// `nft list tables`.
    pub async fn list_tables(&self) -> Result<String, Cause> {
        self.run(&["list", "tables"], None).await
    }

    /// `nft list table inet TABLE`.
    pub async fn list_table(&self, table: &str) -> Result<String, Cause> {
        self.run(&["list", "table", "inet", table], None).await
    }

    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, Cause> {
        let mut child = tokio::process::Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::NotFound => Cause::NoBinary(self.program.display().to_string()),
                _ => Cause::Other(format!("cannot run {}: {error}", self.program.display())),
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // nft reads all of stdin before acting; a write error shows up as its exit status.
            let _ = pipe.write_all(text.as_bytes()).await;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|error| Cause::Other(format!("waiting for nft: {error}")))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(Cause::classify(&String::from_utf8_lossy(&output.stderr)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: Owner = Owner {
        pid_ns: 4026531836,
        pid: 4242,
        start: 987654,
    };

    #[test]
    fn another_agents_plan_is_read_from_its_listing() {
        // As nft 1.0.6 prints a table: a set of several ports, a set of one as a plain port,
        // the priority relative to dstnat.
        let listing = "table inet mirrord_1_2_3 {
\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat + 87; policy accept;
\t\tfib daddr type local tcp dport 80 tcp flags syn / syn,ack ct state new redirect to :39999 comment \"stolen whole\"
\t\tfib daddr type local tcp dport { 8080, 9090 } tcp flags syn / syn,ack ct state new redirect to :39999
\t}

\tchain output {
\t\ttype nat hook output priority dstnat - 13; policy accept;
\t\tmeta mark 0x6d726400-0x6d726403 return
\t\tip daddr 127.0.0.0/8 return
\t\tfib daddr type local tcp dport 80 tcp flags syn / syn,ack ct state new redirect to :39999 comment \"stolen whole\"
\t\tfib daddr type local tcp dport { 8080, 9090 } tcp flags syn / syn,ack ct state new redirect to :39999
\t}
}
";
        let plan = read_plan(listing);
        assert_eq!(plan.ports, BTreeSet::from([80, 8080, 9090]));
        assert_eq!(plan.stolen, BTreeSet::from([80]));
        assert_eq!(plan.place, Place(3));
        assert!(
            read_plan("table inet mirrord_1_2_3 {\n}\n")
                .ports
                .is_empty()
        );
        // An agent from before places: one mark, first in line.
        let old = "\t\tmeta mark 0x6d726400 return\n";
        assert_eq!(read_plan(old).place, Place(0));
    }

    #[test]
    fn places_run_from_the_highest_after_dstnat_in_prerouting_and_before_it_in_output() {
        assert_eq!(Place::FIRST.prerouting_priority(), -11);
        assert_eq!(Place::FIRST.output_priority(), -111);
        assert_eq!(Place::FIRST.mark(), 0x6d72_6401);
        let mut place = Place::FIRST;
        while let Some(next) = place.above() {
            assert!(next.prerouting_priority() < place.prerouting_priority());
            assert!(next.output_priority() < place.output_priority());
            place = next;
        }
        // Prerouting stays after dstnat (-100), output after conntrack (-200).
        assert_eq!(place.prerouting_priority(), -99);
        assert_eq!(place.output_priority(), -199);
    }

    #[test]
    fn a_table_name_says_which_agent_owns_it() {
        let name = OWNER.table();
        assert_eq!(name, "mirrord_4026531836_4242_987654");
        assert_eq!(Owner::parse(&name), Some(OWNER));
        for other in [
            "mirrord_",
            "mirrord_1_2",
            "mirrord_1_2_3_4",
            "mirrord_a_2_3",
            "kube-proxy",
            "nat",
        ] {
            assert_eq!(Owner::parse(other), None, "{other}");
        }
    }

    #[test]
    fn only_owners_gone_from_our_pid_namespace_are_dead() {
        let me = Owner::current().unwrap();
        assert!(!me.is_dead(me.pid_ns));
        let reused = Owner {
            start: me.start + 1,
            ..me
        };
        assert!(reused.is_dead(me.pid_ns), "a reused pid is not the owner");
        let elsewhere = Owner {
            pid_ns: me.pid_ns + 1,
            pid: u32::MAX,
            ..me
        };
        assert!(
            !elsewhere.is_dead(me.pid_ns),
            "another pid namespace's pids mean nothing here"
        );
        let gone = Owner {
            pid: u32::MAX,
            ..me
        };
        assert!(gone.is_dead(me.pid_ns));
    }

    #[test]
    fn start_time_is_counted_after_the_command_name() {
        let stat = "77 (a) b (c)) S 1 77 77 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(parse_start_time(stat), Some(123456));
        assert_eq!(parse_start_time("77 (cut"), None);
    }

    #[test]
    fn the_ruleset_redirects_new_local_tcp_to_the_listener_except_marked_and_loopback() {
        let plan = Plan {
            ports: BTreeSet::from([8080, 80, 443]),
            stolen: BTreeSet::from([443]),
            place: Place(2),
        };
        let text = ruleset("mirrord_1_2_3", &plan, 41234);
        let stolen = "\t\tfib daddr type local tcp dport { 443 } tcp flags & (syn | ack) == syn ct state new redirect to :41234 comment \"stolen whole\"\n";
        let shared = "\t\tfib daddr type local tcp dport { 80, 8080 } tcp flags & (syn | ack) == syn ct state new redirect to :41234\n";
        let expected = format!(
            "table inet mirrord_1_2_3 {{}}\n\
            delete table inet mirrord_1_2_3\n\
            table inet mirrord_1_2_3 {{\n\
            \tchain prerouting {{\n\
            \t\ttype nat hook prerouting priority -12; policy accept;\n\
            {stolen}{shared}\
            \t}}\n\
            \tchain output {{\n\
            \t\ttype nat hook output priority -112; policy accept;\n\
            \t\tmeta mark 0x6d726400-0x6d726402 return\n\
            \t\tip daddr 127.0.0.0/8 return\n\
            \t\tip6 daddr ::1 return\n\
            {stolen}{shared}\
            \t}}\n\
            }}\n"
        );
        assert_eq!(text, expected);
        assert_eq!(
            read_plan(&text),
            plan,
            "another agent reads back what we wrote"
        );
    }

    #[test]
    fn no_ports_only_removes_the_table() {
        assert_eq!(
            delete("mirrord_1_2_3"),
            "table inet mirrord_1_2_3 {}\ndelete table inet mirrord_1_2_3\n"
        );
    }

    #[test]
    fn listed_tables_of_ours_are_found() {
        let listing = "table ip nat\ntable inet mirrord_1_2_3\ntable inet filter\n\
                       table ip mirrord_9_9_9\ntable inet mirrord_4_5_6\n";
        assert_eq!(our_tables(listing), ["mirrord_1_2_3", "mirrord_4_5_6"]);
    }

    /// nft's messages as it prints them (nftables 1.0.6) for each cause.
    #[test]
    fn nft_complaints_name_their_cause() {
        let eperm = "netlink: Error: cache initialization failed: Operation not permitted\n";
        assert_eq!(Cause::classify(eperm), Cause::NoNetAdmin);
        let no_nfnetlink = "Error: cache initialization failed: Protocol not supported\n";
        assert_eq!(Cause::classify(no_nfnetlink), Cause::NoKernelSupport);
        let no_family = "Error: Could not process rule: Operation not supported\n";
        assert_eq!(Cause::classify(no_family), Cause::NoKernelSupport);
        let no_lookup = "netlink: Error: cache initialization failed: Invalid argument\n";
        assert_eq!(Cause::classify(no_lookup), Cause::NoKernelSupport);
        let no_module = "Error: Could not process rule: No such file or directory\n";
        assert_eq!(Cause::classify(no_module), Cause::MissingModule);
        let syntax = "/dev/stdin:1:1-4: Error: syntax error, unexpected junk\njunk\n^^^^\n";
        assert_eq!(
            Cause::classify(syntax),
            Cause::Other("/dev/stdin:1:1-4: Error: syntax error, unexpected junk".into())
        );
        assert_eq!(
            Cause::NoKernelSupport.to_string(),
            "nftables is not available in its kernel (nf_tables module missing)"
        );
    }
}
