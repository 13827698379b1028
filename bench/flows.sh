#!/usr/bin/env bash
# Many TCP flows through mirrord at once, every byte checked (tests/src/bin/flowload.rs), with
# the resident memory (VmRSS) and open descriptors of the mirrord CLI and of its agent:
#   idle:  1,000 connections open and idle (one 64-byte echo each, then nothing);
#   busy:  200 connections each echoing 8 MiB at once (peak during the transfer);
#   load:  1,000 connections each echoing 1 MiB at once (peak, time, all checksums);
#   churn: 1,000 workers connecting, echoing and closing for 30 s (first and last sample);
#   pool:  the 1-byte round trip of one connection (p50 and p99 of 5,000), alone in its
#          session and beside 1,000 idle connections the same command holds, as a service
#          holds a connection pool (three times each, alternating).
# Run by hand as root after `cargo build --release --workspace --bins`:   bench/flows.sh
# Like bench/network.sh, everything runs in a private network namespace with no route out.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
[ -x target/release/flowload ] || { echo "$BENCH: build first: cargo build --release --workspace --bins" >&2; exit 1; }
exec unshare --net --mount --propagation private -- bash -euo pipefail -c '
ip link set lo up
mount -t tmpfs bench-tmp /tmp
mount -t tmpfs bench-run /run
ip netns add bench-cluster
ip -n bench-cluster link set lo up
unshare --net --mount --uts --propagation private -- sh -c "exec env -i POD=1 /bin/sleep 3600" &
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
ip -n bench-cluster addr add 10.77.0.1/24 dev bench-c && ip -n bench-cluster link set bench-c up
nsenter -t $POD -n sh -c "ip link set lo up && ip addr add 10.77.0.2/24 dev bench-p && ip link set bench-p up"
ulimit -n "$(ulimit -Hn)"
ip netns exec bench-cluster target/release/flowload serve 10.77.0.1:7100 &
sleep 0.3
S=10.77.0.1:7100
F=$PWD/target/release/flowload
M="$MIRRORD exec -t pid/$POD --cidr 10.77.0.0/24 --fs-mode local --"

# kB of VmRSS and the descriptor count of the mirrord CLI ($1) and of its agent (the only one running).
sample() {
  local agent; agent=$(pgrep -x mirrord-agent | head -1)
  echo "$(awk "/VmRSS/ { print \$2 }" /proc/$1/status) $(ls /proc/$1/fd | wc -l) $(awk "/VmRSS/ { print \$2 }" /proc/$agent/status) $(ls /proc/$agent/fd | wc -l)"
}
row() { printf "  %-44s %9s %7s %9s %7s\n" "$@"; }
mb() { awk -v k=$1 "BEGIN { printf \"%.1f\", k / 1024 }"; }
# Runs mirrord with the flowload arguments, sampling every 0.2 s; prints the peak sample.
peak() {
  $M $F "$@" > /tmp/out &
  local pid=$!
  local best="0 0 0 0"
  sleep 0.5
  while kill -0 $pid 2>/dev/null; do
    s=$(sample $pid 2>/dev/null) || break
    best=$(echo "$best $s" | awk "{ printf \"%d %d %d %d\", (\$5>\$1?\$5:\$1), (\$6>\$2?\$6:\$2), (\$7>\$3?\$7:\$3), (\$8>\$4?\$8:\$4) }")
    sleep 0.2
  done
  wait $pid
  echo "$best"
}

printf "%-46s %9s %7s %9s %7s\n" "flows through mirrord" "CLI MB" "fds" "agent MB" "fds"
mkfifo /tmp/release
$M $F hold 1000 $S < /tmp/release > /tmp/hold &
HOLD=$!
exec 3> /tmp/release
for _ in $(seq 600); do grep -q "^held" /tmp/hold 2>/dev/null && break; sleep 0.1; done
grep -q "^held 1000" /tmp/hold || { echo "bench/flows.sh: 1,000 connections were not held" >&2; exit 1; }
sleep 2
read c cf a af < <(sample $HOLD)
row "1,000 idle connections (target < 100 / < 50)" "$(mb $c)" "$cf" "$(mb $a)" "$af"
echo >&3; exec 3>&-
wait $HOLD
grep -q "^released 1000" /tmp/hold || { echo "bench/flows.sh: the held connections failed: $(cat /tmp/hold)" >&2; exit 1; }

read c cf a af < <(peak bulk 200 8388608 $S)
row "200 busy connections, 8 MiB each (peak)" "$(mb $c)" "$cf" "$(mb $a)" "$af"
echo "    $(cat /tmp/out)"
read c cf a af < <(peak bulk 1000 1048576 $S)
row "1,000 connections of 1 MiB at once (peak)" "$(mb $c)" "$cf" "$(mb $a)" "$af"
echo "    $(cat /tmp/out)"

$M $F loop 1000 30 $S > /tmp/out &
LOOP=$!
sleep 5; read c1 cf1 a1 af1 < <(sample $LOOP)
sleep 23; read c2 cf2 a2 af2 < <(sample $LOOP)
wait $LOOP
row "1,000 workers churning, at 5 s" "$(mb $c1)" "$cf1" "$(mb $a1)" "$af1"
row "1,000 workers churning, at 28 s" "$(mb $c2)" "$cf2" "$(mb $a2)" "$af2"
echo "    $(cat /tmp/out)"

# Holds N connections, then measures the round trip on one more (bench/rr.py), all in one
# mirrord session.
cat > /tmp/pool.sh <<"SH"
mkfifo /tmp/pool.in
"$1" hold "$2" "$3" < /tmp/pool.in > /tmp/pool.out &
exec 3> /tmp/pool.in
for _ in $(seq 600); do grep -q "^held" /tmp/pool.out && break; sleep 0.1; done
grep -q "^held $2" /tmp/pool.out || { echo "bench/flows.sh: $2 connections were not held" >&2; exit 1; }
python3 "$4" "$3"
echo >&3; exec 3>&-; wait
rm /tmp/pool.in /tmp/pool.out
SH
printf "%-46s %9s %7s\n" "1-byte round trip on one connection (us)" "p50" "p99"
alone=""; beside=""
# A first session right after the churn above runs slow whatever it measures: not counted.
$M sh /tmp/pool.sh $F 0 $S $PWD/bench/rr.py > /dev/null
for n in 0 1000 0 1000 0 1000; do
  # Whole output first: read alone would go on while the session still ends.
  out=$($M sh /tmp/pool.sh $F $n $S $PWD/bench/rr.py)
  read p50 p99 <<< "$(printf "%.0f %.0f" $out)"
  if [ $n = 0 ]; then alone="$alone $p50"; label=alone; else beside="$beside $p50"; label="beside 1,000 idle connections"; fi
  printf "  %-44s %9s %7s\n" "$label" $p50 $p99
done
median() { echo $1 $2 $3 | tr " " "\n" | sort -n | sed -n 2p; }
printf "  %-44s %+9d\n" "added by the idle pool (p50, medians of three)" $(($(median $beside) - $(median $alone)))
'
