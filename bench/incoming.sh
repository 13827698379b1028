#!/usr/bin/env bash
# Incoming traffic through mirrord against the pod's app reached directly, in one run, same
# fixture: wrk (keep-alive, 2 threads, 32 connections, 10 s) from the cluster namespace to
#   1. the pod's nginx directly (the baseline; it answers "remote"), before, between and after
#      the two sessions below, each compared with the baseline runs either side of it;
#   2. the same port stolen whole by `mirrord exec --steal -- nginx` (a local nginx answering
#      "local"): every request crosses the agent, the link and the netstack;
#   3. the same port under a steal with an HTTP header filter that no request matches: every
#      request is parsed by the agent and passed to the pod's nginx;
#   and, as references for what any proxy can reach on this machine, two plain HTTP/1.1 reverse
#   proxies in the pod's namespace in front of the pod's nginx, each with one worker thread and
#   keep-alive upstream connections: nginx on port 8080 and HAProxy on port 8081. They do the
#   filter's work without mirrord's, and without a redirect (so without conntrack). Then HAProxy
#   where the agent is: port 80 redirected to it by an nftables NAT table like a session's, once
#   as that HTTP proxy and once in TCP mode (port 8082, no HTTP at all: each client connection
#   piped to one of its own to the pod's nginx), the least work a proxy there can do.
# Prints requests/s and p99 latency of each, and each against the baseline.
# DURATION=S (default 10) and CONNECTIONS=N (default 32) change every wrk run; the issue's figures
# use the defaults (with CONNECTIONS=128 the direct rate grows and the steal's does not).
# PROFILE=DIR also records the steal, filter and reference proxy runs system-wide with `perf
# record -e cpu-clock -g` into DIR/steal.data, DIR/filter.data, DIR/proxy.data (nginx) and
# DIR/haproxy.data, and prints the top symbols of mirrord and its agent in the first two
# (`perf report -i DIR/proxy.data --sort pid` compares the proxy's share with the agent's).
# CPU=1 prints, after each run, each process's CPU time per request (user time apart), e.g.
#   "  filter:   agent-net   23.6 us of CPU per request (user 6.2)", wrk's included.
# Run by hand as root after `cargo build --release --workspace`:   bench/incoming.sh
# Everything runs in a private network namespace with no route off the machine. Each mirrord
# session runs in a process session of its own (setsid), like the daemonised nginx and HAProxy.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
for tool in wrk nginx haproxy; do
  command -v "$tool" >/dev/null || { apt-get install -y -q --no-install-recommends wrk nginx-light haproxy >/dev/null; break; }
done
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-32}
profile_setup
unshare --net --mount --propagation private -- env DURATION="$DURATION" CONNECTIONS="$CONNECTIONS" PROFILE="${PROFILE:-}" CPU="${CPU:-}" bash -euo pipefail -c '
ip link set lo up
mount -t tmpfs bench-tmp /tmp
mount -t tmpfs bench-run /run
ip netns add bench-cluster
ip -n bench-cluster link set lo up
unshare --net --mount --uts --propagation private -- sh -c "exec env -i POD=1 /bin/sleep 3600" &
POD=$!
cleanup() {
  kill $POD $(jobs -p) 2>/dev/null || true
  for pid in /tmp/remote/pid /tmp/local/pid /tmp/proxy/pid /tmp/haproxy/pid; do [ -f $pid ] && kill "$(cat $pid)" 2>/dev/null || true; done
  ip netns pids bench-cluster 2>/dev/null | xargs -r kill 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 200); do tr "\0" "\n" < /proc/$POD/environ 2>/dev/null | grep -q ^POD= && break; sleep 0.01; done
ip link add bench-c type veth peer name bench-p
ip link set bench-c netns bench-cluster
ip link set bench-p netns /proc/$POD/ns/net
ip -n bench-cluster addr add 10.77.0.1/24 dev bench-c && ip -n bench-cluster link set bench-c up
nsenter -t $POD -n sh -c "ip link set lo up && ip addr add 10.77.0.2/24 dev bench-p && ip link set bench-p up"
URL=http://10.77.0.2:80/
nginx_conf() { # DIR ANSWER DAEMON
  mkdir -p $1
  cat > $1/nginx.conf <<CONF
worker_processes 1; daemon $3; pid $1/pid; error_log $1/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 80; location / { return 200 "$2\n"; } } }
CONF
}
nginx_conf /tmp/remote remote on
nginx_conf /tmp/local local off
nsenter -t $POD -n nginx -c /tmp/remote/nginx.conf -p /tmp/remote
# The reference proxy: one worker, as the pod app and the agent have one each.
mkdir -p /tmp/proxy
cat > /tmp/proxy/nginx.conf <<CONF
worker_processes 1; daemon on; pid /tmp/proxy/pid; error_log /tmp/proxy/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  upstream pod_app { server 127.0.0.1:80; keepalive 64; keepalive_requests 1000000; }
  server { listen 8080; location / {
    proxy_pass http://pod_app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
nsenter -t $POD -n nginx -c /tmp/proxy/nginx.conf -p /tmp/proxy
# The second reference: HAProxy, one thread, reusing its upstream connections.
mkdir -p /tmp/haproxy
cat > /tmp/haproxy/haproxy.cfg <<CONF
global
  nbthread 1
  maxconn 4096
  pidfile /tmp/haproxy/pid
defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend bench
  bind :8081
  default_backend pod_app
backend pod_app
  http-reuse always
  server app 127.0.0.1:80
listen bench_tcp
  mode tcp
  bind :8082
  server app 127.0.0.1:80
CONF
nsenter -t $POD -n haproxy -D -f /tmp/haproxy/haproxy.cfg
in_cluster() { ip netns exec bench-cluster "$@"; }
# Until the client gets ANSWER (with optional curl args): the session subscribes the port once
# the local nginx listens.
wait_for() {
  for _ in $(seq 300); do
    [ "$(in_cluster curl -s -m 1 "${@:2}" $URL)" = "$1" ] && return 0
    sleep 0.1
  done
  echo "bench/incoming.sh: never got $1 from $URL" >&2; exit 1
}
# One wrk run against URL (by default the pod app), profiled as NAME: "requests/s p99-in-ms".
load() { # [URL [NAME]]
  cpu_snapshot /tmp/cpu.before
  ( profiled "${2:-}" ip netns exec bench-cluster wrk -t2 -c${CONNECTIONS} -d${DURATION}s --latency ${1:-$URL}; times > /tmp/wrk.times ) | awk "
    /Requests\/sec/ { rps = \$2 }
    /^ *99%/ { v = \$2; ms = v + 0; if (v ~ /us\$/) ms /= 1000; else if (v ~ /[^m]s\$/) ms *= 1000; p99 = ms }
    END { printf \"%d %.2f\n\", rps, p99 }" > /tmp/load.result
  read rps p99 < /tmp/load.result
  cpu_report "${2:-direct}" /tmp/cpu.before $(( rps * DURATION )) wrk /tmp/wrk.times
  echo "$rps $p99"
}
wait_for remote
read d1_rps d1_p99 < <(load)
PROXY_URL=http://10.77.0.2:8080/
[ "$(in_cluster curl -s $PROXY_URL)" = remote ] || { echo "bench/incoming.sh: the reference proxy does not reach the pod app" >&2; exit 1; }
read proxy_rps proxy_p99 < <(load $PROXY_URL proxy)
HAPROXY_URL=http://10.77.0.2:8081/
[ "$(in_cluster curl -s $HAPROXY_URL)" = remote ] || { echo "bench/incoming.sh: HAProxy does not reach the pod app" >&2; exit 1; }
read haproxy_rps haproxy_p99 < <(load $HAPROXY_URL haproxy)
# HAProxy behind a redirect of port 80, as the agent is during a session: a NAT table with the
# hooks of a session table (so the pod namespace runs conntrack on every packet, as then).
behind_redirect() { # PORT NAME
  nsenter -t $POD -n nft -f - <<NFT
table ip bench_redirect {
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; tcp dport 80 counter redirect to :$1; }
  chain output { type nat hook output priority -100; policy accept; }
}
NFT
  [ "$(in_cluster curl -s $URL)" = remote ] || { echo "bench/incoming.sh: HAProxy behind the redirect does not reach the pod app" >&2; exit 1; }
  load $URL $2
  # Every connection of the run (and the check above) went through the redirect.
  redirected=$(nsenter -t $POD -n nft list table ip bench_redirect | sed -n "s/.*counter packets \([0-9]*\).*/\1/p")
  nsenter -t $POD -n nft delete table ip bench_redirect
  [ "$redirected" -gt "$CONNECTIONS" ] || { echo "bench/incoming.sh: only $redirected connections went through the redirect to port $1" >&2; exit 1; }
}
# In this shell, not in a process substitution that read could leave running: one table at a time.
behind_redirect 8081 haproxy-redirect > /tmp/haproxy-redirect.result
read haproxy_nat_rps haproxy_nat_p99 < /tmp/haproxy-redirect.result
behind_redirect 8082 haproxy-tcp-redirect > /tmp/haproxy-tcp-redirect.result
read haproxy_tcp_rps haproxy_tcp_p99 < /tmp/haproxy-tcp-redirect.result

# Each session in a session (setsid) of its own, as the daemonised pod app and reference proxies
# are: with autogroup scheduling in the kernel, the processes of one session share one CPU share,
# and mirrord started from this shell would share the one wrk runs in.
M="setsid $MIRRORD exec -t pid/$POD --fs-mode local"
$M --steal -- nginx -c /tmp/local/nginx.conf -p /tmp/local &
SESSION=$!
wait_for local
read steal_rps steal_p99 < <(load $URL steal)
kill -TERM $SESSION; wait $SESSION || true
wait_for remote
read d2_rps d2_p99 < <(load)

echo "{\"feature\":{\"network\":{\"incoming\":{\"mode\":\"steal\",\"http_filter\":{\"header_filter\":\"^x-bench: local$\"}}}}}" > /tmp/filter.json
$M -f /tmp/filter.json -- nginx -c /tmp/local/nginx.conf -p /tmp/local &
SESSION=$!
wait_for local -H "X-Bench: local"
[ "$(in_cluster curl -s $URL)" = remote ] || { echo "bench/incoming.sh: the filter passes nothing to the pod" >&2; exit 1; }
read filter_rps filter_p99 < <(load $URL filter)
kill -TERM $SESSION; wait $SESSION || true
wait_for remote
read d3_rps d3_p99 < <(load)

printf "%-58s %10s %10s\n" "HTTP/1.1 keep-alive, wrk -t2 -c${CONNECTIONS} -d${DURATION}s" "req/s" "p99 ms"
printf "  %-56s %10s %10s\n" "pod app directly, before the sessions (baseline 1)" $d1_rps $d1_p99 \
  "pod app directly, between them (baseline 2)" $d2_rps $d2_p99 \
  "pod app directly, after them (baseline 3)" $d3_rps $d3_p99 \
  "steal of every request (local nginx)" $steal_rps $steal_p99 \
  "header filter passing every request to the pod app" $filter_rps $filter_p99 \
  "reference: nginx reverse proxy (keep-alive) to the pod app" $proxy_rps $proxy_p99 \
  "reference: HAProxy (keep-alive) to the pod app" $haproxy_rps $haproxy_p99 \
  "reference: the same HAProxy behind a redirect of port 80" $haproxy_nat_rps $haproxy_nat_p99 \
  "reference: HAProxy in TCP mode behind that redirect" $haproxy_tcp_rps $haproxy_tcp_p99
# Each run against the mean of the baseline runs either side of it: the direct rate here
# drifts by 10-20% within minutes, more than one baseline run can stand for.
awk -v d1=$d1_rps -v d1p=$d1_p99 -v d2=$d2_rps -v d2p=$d2_p99 -v d3=$d3_rps -v d3p=$d3_p99 -v s=$steal_rps -v sp=$steal_p99 -v f=$filter_rps -v fp=$filter_p99 -v r=$proxy_rps -v rp=$proxy_p99 -v h=$haproxy_rps -v hp=$haproxy_p99 -v hn=$haproxy_nat_rps -v hnp=$haproxy_nat_p99 -v ht=$haproxy_tcp_rps -v htp=$haproxy_tcp_p99 "BEGIN {
  d = (d1 + d2) / 2; dp = (d1p + d2p) / 2; e = (d2 + d3) / 2; ep = (d2p + d3p) / 2
  printf \"  %-56s %9.0f%% %+9.2f\n\", \"steal vs baselines 1-2 (target >= 50%, p99 within 2 ms)\", 100*s/d, sp-dp
  printf \"  %-56s %9.0f%% %+9.2f\n\", \"filter vs baselines 2-3 (target >= 50%, p99 within 2 ms)\", 100*f/e, fp-ep
  printf \"  %-56s %9.0f%% %+9.2f\n\", \"reference nginx proxy vs baselines 1-2\", 100*r/d, rp-dp
  printf \"  %-56s %9.0f%% %+9.2f\n\", \"reference HAProxy vs baselines 1-2\", 100*h/d, hp-dp
  printf \"  %-56s %9.0f%% %+9.2f\n\", \"reference HAProxy behind the redirect vs baselines 1-2\", 100*hn/d, hnp-dp
  printf \"  %-56s %9.0f%% %+9.2f\n\", \"reference HAProxy TCP behind the redirect vs baselines 1-2\", 100*ht/d, htp-dp }"
'
profile_report steal filter
