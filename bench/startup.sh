#!/usr/bin/env bash
# Start-to-exit wall time of `mirrord exec -t pid/P -- true` against `nsenter -t P -n -m -u true`
# on the same fake pod, runs interleaved, medians and p90 printed as one table. Run by hand as
# root after `cargo build --release --workspace`:   sudo bench/startup.sh [RUNS]
# Everything runs in a private network namespace with no route off the machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${1:-100}
exec unshare --net --mount --propagation private -- bash -euo pipefail -c '
RUNS=$1
ip link set lo up
unshare --net --mount --uts --propagation private -- sh -c "hostname bench-pod && exec env -i POD_VAR=1 /bin/sleep 600" &
POD=$!
trap "kill $POD 2>/dev/null || true" EXIT
for _ in $(seq 200); do tr "\0" "\n" < /proc/$POD/environ 2>/dev/null | grep -q ^POD_VAR= && break; sleep 0.01; done
now() { date +%s%N; }
: > /tmp/bench-mirrord.$$; : > /tmp/bench-nsenter.$$
for _ in 1 2 3; do $MIRRORD exec -t pid/$POD -- true; nsenter -t $POD -n -m -u true; done  # warm caches
for _ in $(seq "$RUNS"); do
  t0=$(now); $MIRRORD exec -t pid/$POD -- true; t1=$(now)
  nsenter -t $POD -n -m -u true; t2=$(now)
  echo $(( (t1 - t0) / 1000 )) >> /tmp/bench-mirrord.$$
  echo $(( (t2 - t1) / 1000 )) >> /tmp/bench-nsenter.$$
done
pct() { sort -n "$1" | awk -v p="$2" "{ v[NR] = \$1 } END { i = int(NR * p / 100); if (i < 1) i = 1; printf \"%.1f\", v[i] / 1000 }"; }
m50=$(pct /tmp/bench-mirrord.$$ 50); m90=$(pct /tmp/bench-mirrord.$$ 90)
n50=$(pct /tmp/bench-nsenter.$$ 50); n90=$(pct /tmp/bench-nsenter.$$ 90)
rm -f /tmp/bench-mirrord.$$ /tmp/bench-nsenter.$$
printf "%-44s %10s %10s\n" "start-to-exit, $RUNS runs each" "p50 (ms)" "p90 (ms)"
printf "%-44s %10s %10s\n" "nsenter -t P -n -m -u true" "$n50" "$n90"
printf "%-44s %10s %10s\n" "mirrord exec -t pid/P -- true" "$m50" "$m90"
awk -v m="$m50" -v n="$n50" "BEGIN { printf \"%-44s %10.1f %10s\n%-44s %10.1fx\n\", \"median overhead (target <= 100 ms)\", m - n, \"\", \"ratio mirrord/nsenter (p50)\", m / n }"
' bench "$RUNS"
