#!/usr/bin/env bash
# Cluster DNS through mirrord against asking the cluster's DNS server directly, same fixture,
# same client (raw DNS queries over UDP, one at a time, python3):
#   direct:  from inside the cluster netns, to dnsmasq (the target's baseline);
#   pod:     from inside the pod's netns, to dnsmasq over the veth (what the pod itself sees);
#   mirrord: from inside `mirrord exec`, to the stub in its resolv.conf (stub -> agent -> dnsmasq);
# for a cached name (the same A lookup over and over), unique names (a dnsmasq wildcard, a new
# name every query, so mirrord's cache never answers) and unique NXDOMAIN names.
# Prints p50/p99 latency (us), lookups/s and the ratios; target: mirrord p50 <= 2 x direct + 200 us.
# Then what an application waits for an unknown short name (glibc getaddrinfo: the whole search
# list, A and AAAA, all NXDOMAIN), in the pod and through mirrord; target: under 100 ms.
# Run by hand as root after `cargo build --release --workspace`:   bench/dns.sh [queries]
# Everything runs in a private network namespace with nothing but its own namespaces to talk to.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
command -v dnsmasq >/dev/null || apt-get install -y -q --no-install-recommends dnsmasq-base >/dev/null
export BENCH_QUERIES="${1:-2000}"
exec unshare --net --mount --propagation private -- bash -euo pipefail -c '
ip link set lo up
mount -t tmpfs bench-tmp /tmp
# Named namespaces live in /run/netns: keep them in this private world.
mount -t tmpfs bench-run /run
ip netns add bench-cluster
ip -n bench-cluster link set lo up
S=10.77.0.1
# The pod: its own resolv.conf (Kubernetes style, naming the cluster DNS), bound in its own
# mount namespace, as the agent reads it from there.
printf "nameserver $S\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n" > /tmp/pod-resolv.conf
unshare --net --mount --uts --propagation private -- sh -c \
  "mount --bind /tmp/pod-resolv.conf /etc/resolv.conf && exec env -i POD=1 /bin/sleep 3600" &
POD=$!
cleanup() {
  kill $POD $(jobs -p) 2>/dev/null || true
  ip netns pids bench-cluster 2>/dev/null | xargs -r kill 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 200); do tr "\0" "\n" < /proc/$POD/environ 2>/dev/null | grep -q ^POD= && break; sleep 0.01; done
ip link add bench-c type veth peer name bench-p
ip link set bench-c netns bench-cluster
ip link set bench-p netns /proc/$POD/ns/net
ip -n bench-cluster addr add $S/24 dev bench-c && ip -n bench-cluster link set bench-c up
nsenter -t $POD -n sh -c "ip link set lo up && ip addr add 10.77.0.2/24 dev bench-p && ip link set bench-p up"
# Stays a child of this shell (foreground mode), so the cleanup finds it. Authoritative for
# every name (--local=/#/): unknown names are a real NXDOMAIN, nothing is forwarded.
ip netns exec bench-cluster dnsmasq --keep-in-foreground --no-resolv --no-hosts --conf-file=/dev/null \
  --bind-interfaces --listen-address=$S --port=53 --user=root --group=root --pid-file= \
  --log-facility=/dev/null --local=/#/ --local-ttl=600 \
  --host-record=web.default.svc.cluster.local,$S --address=/bench.cluster.local/10.77.0.9 &
cat > /tmp/dnsq.py <<"PY"
# usage: dnsq.py SERVER|stub cached|unique|nxdomain COUNT  ->  "p50_us p99_us lookups_per_s errors"
import os, socket, struct, sys, time
server, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
if server == "stub":
    server = next(l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver"))
tag = os.urandom(4).hex()
def name(i):
    if mode == "cached":
        return "web.default.svc.cluster.local"
    if mode == "unique":
        return f"n{i}-{tag}.bench.cluster.local"
    return f"x{i}-{tag}.nx.cluster.local"
want_rcode = 3 if mode == "nxdomain" else 0
def packet(qid, qname):
    question = b"".join(bytes([len(l)]) + l.encode() for l in qname.split(".")) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
s.settimeout(2)
def ask(i):
    qid = i & 0xFFFF
    s.send(packet(qid, name(i)))
    while True:
        reply = s.recv(4096)
        if struct.unpack(">H", reply[:2])[0] == qid:
            rcode = reply[3] & 0xF
            answers = struct.unpack(">H", reply[6:8])[0]
            return rcode == want_rcode and (mode == "nxdomain" or answers > 0)
warm = 100
errors = 0
for i in range(warm):
    try:
        ask(count + i)
    except socket.timeout:
        pass
times = []
timeouts = 0
start = time.perf_counter()
for i in range(count):
    t = time.perf_counter_ns()
    try:
        ok = ask(i)
    except socket.timeout:
        ok = False
        timeouts += 1
    times.append(time.perf_counter_ns() - t)
    errors += not ok
    if timeouts > 10:
        # A stub that drops queries would make this run for hours: report and stop.
        print(f"- - 0 timeouts")
        sys.exit(0)
total = time.perf_counter() - start
times.sort()
print(f"{times[len(times) // 2] / 1000:.0f} {times[len(times) * 99 // 100] / 1000:.0f} {count / total:.0f} {errors}")
PY
cat > /tmp/gai.py <<"PY"
# usage: gai.py COUNT  ->  "p50_ms p99_ms wrong" for getaddrinfo of unknown short names
import os, socket, sys, time
count, tag = int(sys.argv[1]), os.urandom(3).hex()
times, wrong = [], 0
for i in range(count):
    start = time.perf_counter()
    try:
        socket.getaddrinfo(f"nosuch-{tag}-{i}", 80)
        wrong += 1
    except socket.gaierror as error:
        wrong += error.errno != socket.EAI_NONAME
    times.append(time.perf_counter() - start)
times.sort()
print(f"{times[count // 2] * 1000:.2f} {times[count * 99 // 100] * 1000:.2f} {wrong}")
PY
sleep 0.3
N=$BENCH_QUERIES
M="$MIRRORD exec -t pid/$POD --fs-mode local --"
declare -A d p m
for mode in cached unique nxdomain; do
  d[$mode]=$(ip netns exec bench-cluster python3 /tmp/dnsq.py $S $mode $N)
  p[$mode]=$(nsenter -t $POD -n python3 /tmp/dnsq.py $S $mode $N)
  m[$mode]=$($M python3 /tmp/dnsq.py stub $mode $N)
done
printf "%-22s %-8s %9s %9s %11s %7s\n" "A lookups ($N each)" "path" "p50 us" "p99 us" "lookups/s" "errors"
for mode in cached unique nxdomain; do
  read dp50 dp99 dqps derr <<< "${d[$mode]}"
  read pp50 pp99 pqps perr <<< "${p[$mode]}"
  read mp50 mp99 mqps merr <<< "${m[$mode]}"
  printf "%-22s %-8s %9s %9s %11s %7s\n" "$mode" direct "$dp50" "$dp99" "$dqps" "$derr" "" pod "$pp50" "$pp99" "$pqps" "$perr" \
    "" mirrord "$mp50" "$mp99" "$mqps" "$merr"
  awk -v mp=$mp50 -v dp=$dp50 -v mq=$mqps -v dq=$dqps "BEGIN {
    target = 2 * dp + 200
    printf \"%-22s %-8s %8.2fx %9s %10.2fx   target p50 <= %.0f us: %s\n\", \"\", \"m/direct\", mp / dp, \"\", mq / dq, target, (mp <= target ? \"met\" : \"MISSED\")
  }"
done
G=$(( N / 10 ))
read gp50 gp99 gbad < <(nsenter -t $POD -n -m python3 /tmp/gai.py $G)
read gm50 gm99 gmbad < <($M python3 /tmp/gai.py $G)
printf "%-31s %9s %9s %7s\n" "unknown name, getaddrinfo ($G)" "p50 ms" "p99 ms" "wrong"
printf "%-22s %-8s %9s %9s %7s\n" "" pod "$gp50" "$gp99" "$gbad" "" mirrord "$gm50" "$gm99" "$gmbad"
awk -v m=$gm99 "BEGIN { printf \"%-22s %-8s target p99 < 100 ms: %s\n\", \"\", \"\", (m < 100 ? \"met\" : \"MISSED\") }"
'
