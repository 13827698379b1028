#!/usr/bin/env bash
# Outgoing network through mirrord against the paths it competes with, in one run, same fixture:
#   bulk TCP throughput (iperf3, 5 s, upload; and download with -R): a plain network namespace
#     on a veth to the server (the baseline), mirrord exec (TUN + netstack + agent) to the same server, pasta attached to a
#     namespace (to a server on the outer namespace's loopback), and mirrord's local route to that
#     same loopback server (TUN + netstack, no agent);
#   1-byte request/response latency p50/p99 (veth vs mirrord);
#   new TCP connections per second (ab, no keep-alive, against nginx).
# Run by hand as root after `cargo build --release --workspace`:   bench/network.sh
# MIRRORD=PATH runs that mirrord binary instead of target/release/mirrord (bench/lib.sh).
# PROFILE=DIR also records the mirrord bulk and new-connection runs system-wide with
# `perf record -e cpu-clock -g` into DIR/bulk.data and DIR/connections.data, and prints the top
# symbols of mirrord and its agent in each.
# Everything runs in a private network namespace with no route off the machine (its only
# default route points at an address on a veth pair that leads nowhere).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
for tool in iperf3 pasta ab nginx; do
  command -v "$tool" >/dev/null || { apt-get install -y -q --no-install-recommends iperf3 passt apache2-utils nginx-light >/dev/null; break; }
done
profile_setup
unshare --net --mount --propagation private -- env PROFILE="${PROFILE:-}" MIRRORD="$MIRRORD" bash -euo pipefail -c '
ip link set lo up
mount -t tmpfs bench-tmp /tmp
# Named namespaces live in /run/netns: keep them in this private world.
mount -t tmpfs bench-run /run
# pasta needs an interface with a default route to copy; this veth pair leads nowhere (its
# peer stays here, and the gateway address answers no one).
ip link add bench-out type veth peer name bench-nowhere
ip addr add 10.99.0.1/24 dev bench-out && ip link set bench-out up && ip link set bench-nowhere up
ip route add default via 10.99.0.254 dev bench-out
ip netns add bench-cluster
ip -n bench-cluster link set lo up
unshare --net --mount --uts --propagation private -- sh -c "exec env -i POD=1 /bin/sleep 3600" &
POD=$!
cleanup() {
  kill $POD $(jobs -p) 2>/dev/null || true
  ip netns pids bench-cluster 2>/dev/null | xargs -r kill 2>/dev/null || true
  [ -f /tmp/nginx/pid ] && kill "$(cat /tmp/nginx/pid)" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 200); do tr "\0" "\n" < /proc/$POD/environ 2>/dev/null | grep -q ^POD= && break; sleep 0.01; done
ip link add bench-c type veth peer name bench-p
ip link set bench-c netns bench-cluster
ip link set bench-p netns /proc/$POD/ns/net
ip -n bench-cluster addr add 10.77.0.1/24 dev bench-c && ip -n bench-cluster link set bench-c up
nsenter -t $POD -n sh -c "ip link set lo up && ip addr add 10.77.0.2/24 dev bench-p && ip link set bench-p up"
S=10.77.0.1
# Servers stay children of this shell (no -D), so the cleanup finds every one of them.
ip netns exec bench-cluster iperf3 -s -B $S -p 5201 >/dev/null &
iperf3 -s -B 127.0.0.1 -p 5202 >/dev/null &
cat > /tmp/echo.py <<"PY"
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 7000)); srv.listen(64)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (b := c.recv(1)):
        c.sendall(b)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
PY
ip netns exec bench-cluster python3 /tmp/echo.py $S &
mkdir -p /tmp/nginx/html && echo ok > /tmp/nginx/html/index.html
cat > /tmp/nginx/nginx.conf <<CONF
worker_processes 1; daemon on; pid /tmp/nginx/pid; error_log /tmp/nginx/error.log;
events { worker_connections 4096; }
http { access_log off; server { listen $S:8080; root /tmp/nginx/html; } }
CONF
ip netns exec bench-cluster nginx -c /tmp/nginx/nginx.conf -p /tmp/nginx
sleep 0.5
M="$MIRRORD exec -t pid/$POD --cidr 10.77.0.0/24 --fs-mode local --"
gbits() { python3 -c "import json,sys; print(round(json.load(sys.stdin)[\"end\"][\"sum_received\"][\"bits_per_second\"] / 1e9, 2))"; }
veth=$(nsenter -t $POD -n iperf3 -c $S -p 5201 -t 5 -J | gbits)
mirrord=$(profiled bulk $M iperf3 -c $S -p 5201 -t 5 -J | gbits)
veth_down=$(nsenter -t $POD -n iperf3 -R -c $S -p 5201 -t 5 -J | gbits)
mirrord_down=$($M iperf3 -R -c $S -p 5201 -t 5 -J | gbits)
pasta=$(pasta --runas 0 --config-net -- iperf3 -c 10.99.0.254 -p 5202 -t 5 -J | gbits)
mirrord_local=$($M iperf3 -c 198.19.255.254 -p 5202 -t 5 -J | gbits)
read veth_p50 veth_p99 < <(nsenter -t $POD -n python3 $PWD/bench/rr.py $S:7000)
read m_p50 m_p99 < <($M python3 $PWD/bench/rr.py $S:7000)
conns() { grep "Requests per second" | awk "{ print int(\$4) }"; }
veth_cps=$(nsenter -t $POD -n ab -q -n 20000 -c 16 http://$S:8080/index.html | conns)
m_cps=$(profiled connections $M ab -q -n 20000 -c 16 http://$S:8080/index.html | conns)
# Every namespace takes the kernel default congestion control, and it decides the veth
# figure: bbr paces a veth at about half the rate cubic reaches (docs/architecture.md).
printf "%-52s %10s\n" "bulk TCP throughput, iperf3 5 s (Gbit/s), $(sysctl -n net.ipv4.tcp_congestion_control)" ""
printf "  %-50s %10s\n" "veth path (plain netns, baseline)" "$veth" "mirrord exec -> agent -> cluster" "$mirrord" \
  "pasta -> outer loopback" "$pasta" "mirrord exec -> host loopback (local route)" "$mirrord_local"
awk -v m=$mirrord -v v=$veth -v p=$pasta -v l=$mirrord_local "BEGIN { printf \"  %-50s %9.0f%%\n  %-50s %10.2fx\n  %-50s %10.2fx\n\", \"mirrord/veth (target >= 50%)\", 100*m/v, \"mirrord/pasta (target >= 1.5x)\", m/p, \"mirrord local route/pasta\", l/p }"
printf "  %-50s %10s\n" "veth path, download (iperf3 -R)" "$veth_down" "mirrord exec, download (iperf3 -R)" "$mirrord_down"
awk -v m=$mirrord_down -v v=$veth_down "BEGIN { printf \"  %-50s %9.0f%%\n\", \"mirrord/veth, download\", 100*m/v }"
printf "%-52s %10s %10s\n" "1-byte request/response (us)" "p50" "p99"
printf "  %-50s %10s %10s\n" "veth path" "$veth_p50" "$veth_p99" "mirrord exec" "$m_p50" "$m_p99"
awk -v a=$m_p50 -v b=$veth_p50 "BEGIN { printf \"  %-50s %10.0f\n\", \"added p50 (target <= 100)\", a - b }"
printf "%-52s %10s\n" "new TCP connections/s (ab -c 16, no keep-alive)" ""
printf "  %-50s %10s\n" "veth path" "$veth_cps" "mirrord exec (target >= 5000)" "$m_cps"
'
profile_report bulk connections
