#!/usr/bin/env bash
# The pod's files through mirrord's FUSE mount against sshfs (SFTP to an sftp-server running in
# the pod's mount namespace, as Telepresence mounts remote volumes), same pod, same run:
# sequential read of a 256 MiB file (cold, then warm), `find` over 10,000 files, and
# `git status` in a repository of 2,000 files. Each figure is the median of RUNS rounds; MB/s
# are decimal (10^6 bytes), as in the 1 GB/s target.
# Run by hand as root after `cargo build --release --workspace`:   bench/fs.sh [RUNS]
# Everything runs in a private network and mount namespace with no route off the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
[ "$(id -u)" = 0 ] || { echo "bench/fs.sh: needs root (it makes a pod from namespaces)" >&2; exit 1; }
[ -x target/release/mirrord ] || { echo "bench/fs.sh: build first: cargo build --release --workspace" >&2; exit 1; }
for tool in sshfs socat /usr/lib/openssh/sftp-server; do
  command -v "$tool" >/dev/null || { apt-get install -y -q --no-install-recommends sshfs socat openssh-sftp-server >/dev/null; break; }
done
exec unshare --net --mount --propagation private -- bash -euo pipefail -c '
RUNS=$1
ip link set lo up
mount -t tmpfs bench-tmp /tmp
unshare --net --mount --uts --propagation private -- sh -c "hostname bench-pod && mount -t tmpfs -o size=2g pod /srv && exec env -i POD=1 /bin/sleep 3600" &
POD=$!
trap "kill $POD 2>/dev/null || true" EXIT
for _ in $(seq 200); do tr "\0" "\n" < /proc/$POD/environ 2>/dev/null | grep -q ^POD= && break; sleep 0.01; done
# The pod s data: a 256 MiB file, 10,000 files in 100 directories, a git repository of 2,000 files
# whose index is settled as in any repository used for a while (files written in the second the
# index was, are "racily clean" to git and read again until a later git command refreshes it).
nsenter -t $POD -m sh -c "cd /srv && head -c 268435456 /dev/urandom > big.bin &&
  mkdir tree && cd tree && for d in \$(seq 100); do mkdir d\$d; (cd d\$d && seq 100 | sed s/^/f/ | xargs touch); done &&
  cd /srv && git init -q repo && cd repo && for d in \$(seq 40); do mkdir d\$d; for f in \$(seq 50); do echo \$d-\$f > d\$d/f\$f; done; done &&
  git add . && git -c user.name=b -c user.email=b@b commit -qm init &&
  sleep 1 && git status --porcelain"
# One round: prints cold-read-ms warm-read-ms find-ms git-status-ms for the tree at $1.
cat > /tmp/round.sh <<"ROUND"
R=$1
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
t=$(date +%s%N); cat $R/srv/big.bin > /dev/null; cold=$(ms $t)
t=$(date +%s%N); cat $R/srv/big.bin > /dev/null; warm=$(ms $t)
t=$(date +%s%N); n=$(find $R/srv/tree | wc -l); find=$(ms $t)
[ "$n" = 10101 ] || { echo "find saw $n entries" >&2; exit 1; }
t=$(date +%s%N); git -c safe.directory="*" -C $R/srv/repo status --porcelain > /dev/null; git=$(ms $t)
echo $cold $warm $find $git
ROUND
# sshfs speaks SFTP over its stdin/stdout to an sftp-server in the pod mount namespace.
printf "#!/bin/sh\nexec nsenter -t %s -m /usr/lib/openssh/sftp-server\n" $POD > /tmp/sftp-server.sh
printf "#!/bin/sh\nexec sshfs -f -o passive -o ro :/ /tmp/sshfs\n" > /tmp/sshfs.sh
chmod +x /tmp/sftp-server.sh /tmp/sshfs.sh
: > /tmp/mirrord.txt; : > /tmp/sshfs.txt
for _ in $(seq "$RUNS"); do
  # A fresh session each round, so the first read is cold.
  target/release/mirrord exec -t pid/$POD --fs-mode local -- sh -c "sh /tmp/round.sh \$MIRRORD_REMOTE_ROOT" >> /tmp/mirrord.txt
  unshare --mount --propagation private -- sh -c "
    mkdir -p /tmp/sshfs && socat EXEC:/tmp/sftp-server.sh EXEC:/tmp/sshfs.sh &
    for _ in \$(seq 200); do mountpoint -q /tmp/sshfs && break; sleep 0.02; done
    sh /tmp/round.sh /tmp/sshfs >> /tmp/sshfs.txt
    umount /tmp/sshfs; wait"
done
median() { awk -v c=$2 "{ print \$c }" $1 | sort -n | awk "{ v[NR] = \$1 } END { print v[int((NR + 1) / 2)] }"; }
row() {
  m=$(median /tmp/mirrord.txt $2); s=$(median /tmp/sshfs.txt $2)
  if [ -n "${4:-}" ]; then
    awk -v m=$m -v s=$s -v label="$1" -v bytes=$4 "BEGIN { mm = bytes / 1000000 / (m / 1000); ss = bytes / 1000000 / (s / 1000); printf \"%-34s %12.0f %12.0f %8.1fx\n\", label \" (MB/s)\", mm, ss, mm / ss }"
  else
    awk -v m=$m -v s=$s -v label="$1" "BEGIN { printf \"%-34s %12d %12d %8.1fx\n\", label \" (ms)\", m, s, s / m }"
  fi
}
printf "%-34s %12s %12s %9s\n" "median of $RUNS rounds" "mirrord" "sshfs" "speed-up"
row "sequential read 256 MiB, cold" 1 "" 268435456
row "sequential read 256 MiB, warm" 2 "" 268435456
row "find over 10,000 files" 3
row "git status, 2,000 files" 4
' bench "$RUNS"
