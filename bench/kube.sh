#!/usr/bin/env bash
# Time to first command on the test cluster: `mirrord exec -t deployment/web -- true`, start to
# exit, against `kubectl exec deploy/web -- true`, runs interleaved, medians of RUNS (default
# 10) in one run, with mirrord's own per-step breakdown (its -v timings: resolving the target,
# starting the agent, connecting) and what is left (reading the target's context, launching,
# deleting the agent). Run by hand as root after `cargo build --release --workspace`:
#   sudo bench/kube.sh [RUNS]
# The cluster is brought up (and down) in a private network and mount namespace with no route
# off the machine, as scripts/test does.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${1:-10}
( source tests/cluster/lib.sh && build_binary )
exec unshare --net --mount --propagation private -- bash -euo pipefail -c '
RUNS=$1
ip link set lo up
mount -t tmpfs mrdc-run /run && mkdir -p /run/lock
export MRDC_AGENT_BIN=$(dirname $MIRRORD)/mirrord-agent
trap tests/cluster/down EXIT
KC=$(tests/cluster/up 2>/dev/null)
W() { nsenter --net=/run/netns/mrdc-world "$@"; }
K() { W tests/cluster/bin/mrdc-cluster kubectl --kubeconfig="$KC" "$@"; }
K apply -f tests/cluster/manifests/mirrord-e2e.yaml >/dev/null
K -n mirrord-e2e rollout status deployment/web --timeout=120s >/dev/null
now() { date +%s%N; }
M=/tmp/bench-mirrord; C=/tmp/bench-kubectl; S=/tmp/bench-steps
: > $M; : > $C; : > $S
mirrord() { KUBECONFIG=$KC W $MIRRORD exec -v -n mirrord-e2e -t deployment/web -- true; }
mirrord 2>/dev/null; K -n mirrord-e2e exec deploy/web -- true  # warm caches
for _ in $(seq "$RUNS"); do
  t0=$(now); mirrord 2> /tmp/bench-v; t1=$(now)
  K -n mirrord-e2e exec deploy/web -- true; t2=$(now)
  echo $(( (t1 - t0) / 1000000 )) >> $M
  echo $(( (t2 - t1) / 1000000 )) >> $C
  # "mirrord:   STEP: N ms" lines, as "resolve start connect" in ms.
  awk "/^mirrord:   resolving/ { r = \$(NF-1) } /^mirrord:   starting/ { s = \$(NF-1) } /^mirrord:   connecting/ { c = \$(NF-1) } END { print r, s, c }" /tmp/bench-v >> $S
done
median() { sort -n | awk "{ v[NR] = \$1 } END { print v[int((NR + 1) / 2)] }"; }
m=$(median < $M); c=$(median < $C)
r=$(awk "{ print \$1 }" $S | median); s=$(awk "{ print \$2 }" $S | median); k=$(awk "{ print \$3 }" $S | median)
printf "median of %s runs (ms)                   %8s\n" "$RUNS" ""
printf "%-44s %8s\n" "kubectl exec deploy/web -- true" "$c"
printf "%-44s %8s   (%.1fx kubectl exec)\n" "mirrord exec -t deployment/web -- true" "$m" "$(echo "$m $c" | awk "{ print \$1 / \$2 }")"
printf "%-44s %8s\n" "  resolving the target" "$r"
printf "%-44s %8s\n" "  creating the agent Job until it listens" "$s"
printf "%-44s %8s\n" "  port-forward and handshake" "$k"
printf "%-44s %8s\n" "  the rest (context, launch, delete the Job)" "$(( m - r - s - k ))"
echo "mirrord runs (ms): $(tr "\n" " " < $M)"
echo "kubectl runs (ms): $(tr "\n" " " < $C)"
' bash "$RUNS"
