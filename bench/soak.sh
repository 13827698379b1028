#!/usr/bin/env bash
# A mixed soak through one mirrord session: four loops at once for SOAK_SECONDS (default 600),
#   HTTP:   curl of a 256 KiB file from a cluster server, checksum compared;
#   DNS:    getent of a cluster name (dnsmasq in the cluster), address compared;
#   read:   sha256 of a 4 MiB pod file through the FUSE mount, compared;
#   write:  a 1 MiB file written into the pod through the mount (--fs-mode write), then its
#           checksum read in the pod's own filesystem, compared, and the file removed;
# while the resident memory (VmRSS) and open descriptors of the mirrord CLI and of its agent are
# sampled every 10 s into bench/soak.csv, and plotted to bench/soak.png (gnuplot).
# Run by hand as root after `cargo build --release --workspace --bins`:   bench/soak.sh
# Like bench/network.sh, everything runs in a private network namespace with no route out.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
for tool in dnsmasq curl gnuplot; do
  command -v "$tool" >/dev/null || { apt-get install -y -q --no-install-recommends dnsmasq-base curl gnuplot-nox >/dev/null; break; }
done
export SOAK_SECONDS=${SOAK_SECONDS:-600} OUT=$PWD/bench
exec unshare --net --mount --propagation private -- bash -euo pipefail -c '
ip link set lo up
mount -t tmpfs bench-tmp /tmp
mount -t tmpfs bench-run /run
ip netns add bench-cluster
ip -n bench-cluster link set lo up
echo -e "nameserver 10.77.0.1\nsearch soak.local" > /tmp/pod-resolv.conf
mkdir -p /tmp/soak/www && head -c 4194304 /dev/urandom > /tmp/soak/data.bin
head -c 262144 /dev/urandom > /tmp/soak/www/blob
unshare --net --mount --uts --propagation private -- sh -c \
  "mount --bind /tmp/pod-resolv.conf /etc/resolv.conf && exec env -i POD=1 /bin/sleep 100000" &
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
ip netns exec bench-cluster python3 -m http.server 8080 --bind 10.77.0.1 --directory /tmp/soak/www >/dev/null 2>&1 &
ip netns exec bench-cluster dnsmasq --keep-in-foreground --no-resolv --no-hosts --port 53 \
  --listen-address 10.77.0.1 --bind-interfaces --address=/web.soak.local/10.77.0.7 --pid-file= &
sleep 1

cat > /tmp/soak/load.sh <<"LOAD"
# Runs inside the session; each loop counts its rounds and its wrong answers.
set -u
end=$(( $(date +%s) + SOAK_SECONDS ))
R=$MIRRORD_REMOTE_ROOT
blob=$(sha256sum < /tmp/soak/www/blob)
data=$(sha256sum < /tmp/soak/data.bin)
count() { ok=0; bad=0; while [ $(date +%s) -lt $end ]; do if "$@"; then ok=$((ok+1)); else bad=$((bad+1)); fi; done; echo "$1 $ok $bad"; }
http()  { [ "$(curl -sf --max-time 10 http://10.77.0.1:8080/blob | sha256sum)" = "$blob" ]; }
dns()   { [ "$(getent hosts web | cut -d" " -f1)" = 10.77.0.7 ]; }
fread() { [ "$(sha256sum < $R/tmp/soak/data.bin)" = "$data" ]; }
fwrite() {
  local f=w-$$-$RANDOM
  head -c 1048576 /dev/urandom > /tmp/soak/local-$f && cp /tmp/soak/local-$f $R/tmp/soak/$f || return 1
  # /tmp/soak/$f here is the pod'"'"'s own file: this fake pod shares this tmpfs.
  local ok=1; [ "$(sha256sum < /tmp/soak/$f)" = "$(sha256sum < /tmp/soak/local-$f)" ] || ok=0
  rm -f $R/tmp/soak/$f /tmp/soak/local-$f; [ $ok = 1 ]
}
count http & count dns & count fread & count fwrite & wait
LOAD
$MIRRORD exec -t pid/$POD --cidr 10.77.0.0/24 --fs-mode write -- \
  env SOAK_SECONDS=$SOAK_SECONDS bash /tmp/soak/load.sh > /tmp/soak/counts &
SESSION=$!
echo "seconds,cli_rss_mb,cli_fds,agent_rss_mb,agent_fds" > $OUT/soak.csv
start=$(date +%s)
while kill -0 $SESSION 2>/dev/null; do
  sleep 10
  agent=$(pgrep -x mirrord-agent | head -1) || break
  kill -0 $SESSION 2>/dev/null || break
  echo "$(( $(date +%s) - start )),$(awk "/VmRSS/ { printf \"%.1f\", \$2 / 1024 }" /proc/$SESSION/status),$(ls /proc/$SESSION/fd | wc -l),$(awk "/VmRSS/ { printf \"%.1f\", \$2 / 1024 }" /proc/$agent/status),$(ls /proc/$agent/fd | wc -l)" >> $OUT/soak.csv
done
wait $SESSION
echo "loop, rounds, wrong (SOAK_SECONDS=$SOAK_SECONDS)"
cat /tmp/soak/counts
awk -F, "NR == 3 { c0 = \$2; f0 = \$3; a0 = \$4; g0 = \$5 } NR > 1 { n++; if (\$2 > cm) cm = \$2; if (\$4 > am) am = \$4; c = \$2; f = \$3; a = \$4; g = \$5 }
  END { printf \"samples %d; CLI RSS %.1f MB at 20 s, %.1f at the end, max %.1f; fds %d -> %d\n\", n, c0, c, cm, f0, f;
        printf \"agent RSS %.1f MB at 20 s, %.1f at the end, max %.1f; fds %d -> %d\n\", a0, a, am, g0, g }" $OUT/soak.csv
gnuplot -e "set terminal pngcairo size 900,600 noenhanced; set output \"$OUT/soak.png\"; set datafile separator \",\";
  set multiplot layout 2,1 title \"mirrord soak: HTTP + DNS + file reads + file writes, one session\";
  set ylabel \"RSS (MB)\"; set yrange [0:*]; set key bottom right;
  plot \"$OUT/soak.csv\" using 1:2 skip 1 with linespoints title \"CLI\", \"\" using 1:4 skip 1 with linespoints title \"agent\";
  set xlabel \"seconds\"; set ylabel \"open descriptors\";
  plot \"$OUT/soak.csv\" using 1:3 skip 1 with linespoints title \"CLI\", \"\" using 1:5 skip 1 with linespoints title \"agent\";
  unset multiplot" 2>/dev/null || gnuplot -e "set terminal png size 900,600; set output \"$OUT/soak.png\"; set datafile separator \",\"; set multiplot layout 2,1; set ylabel \"RSS (MB)\"; plot \"$OUT/soak.csv\" using 1:2 skip 1 with linespoints title \"CLI\", \"\" using 1:4 skip 1 with linespoints title \"agent\"; set xlabel \"seconds\"; set ylabel \"fds\"; plot \"$OUT/soak.csv\" using 1:3 skip 1 with linespoints title \"CLI\", \"\" using 1:5 skip 1 with linespoints title \"agent\"; unset multiplot"
echo "plot: bench/soak.png, samples: bench/soak.csv"
'
