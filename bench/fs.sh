#!/usr/bin/env bash
# The pod's files through mirrord's FUSE mount against sshfs (SFTP to an sftp-server running in
# the pod's mount namespace, as Telepresence mounts remote volumes), same pod, same run:
# sequential read of a 256 MiB file (cold, then warm), `find` over 10,000 files, and
# `git status` in a repository of 2,000 files, in one session; then, each in a fresh session
# (cold, as a new user's first command is), what people browse with: `ls -lR` and `du -s` over
# the 10,000 files, `grep -r` and `rg` over 2,000 small source files, and an editor opening a
# project of 20,000 files (a walk that reads every file: `find -type f | xargs cat`, and `rg`).
# Each figure is the median of RUNS rounds; MB/s are decimal (10^6 bytes), as in the 1 GB/s
# target.
# Run by hand as root after `cargo build --release --workspace`:   bench/fs.sh [RUNS]
# Everything runs in a private network and mount namespace with no route off the machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
for tool in sshfs socat /usr/lib/openssh/sftp-server rg; do
  command -v "$tool" >/dev/null || { apt-get install -y -q --no-install-recommends sshfs socat openssh-sftp-server ripgrep >/dev/null; break; }
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
# Source trees: 2,000 files of 1-4 KB in 40 directories (src), 20,000 in 400 (project); one line
# in every hundredth file says "needle".
nsenter -t $POD -m /usr/bin/python3 - <<"PY"
import os, random
random.seed(7)
line = "let value = compute(input, options); // some ordinary source text\n"
for name, dirs in (("src", 40), ("project", 400)):
    n = 0
    for d in range(dirs):
        path = f"/srv/{name}/m{d}"
        os.makedirs(path)
        for f in range(50):
            with open(f"{path}/f{f}.rs", "w") as out:
                out.write(line * random.randint(16, 64))
                if n % 100 == 0:
                    out.write("needle\n")
            n += 1
PY
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
# One workload in its own session: prints its ms after checking what it saw, for the tree at $1.
cat > /tmp/browse.sh <<"BROWSE"
R=$1; W=$2
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
t=$(date +%s%N)
case $W in
  ls) n=$(ls -lR $R/srv/tree | grep -c "^-") ; want=10000 ;;
  du) n=$(du -s --inodes $R/srv/tree | cut -f1) ; want=10101 ;;
  grep) n=$(grep -rl needle $R/srv/src | wc -l) ; want=20 ;;
  rg) n=$(rg -l needle $R/srv/src | wc -l) ; want=20 ;;
  walk) n=$(find $R/srv/project -type f | xargs cat | grep -c needle) ; want=200 ;;
  rgwalk) n=$(rg -l needle $R/srv/project | wc -l) ; want=200 ;;
esac
took=$(ms $t)
[ "$n" = "$want" ] || { echo "$W saw $n, not $want" >&2; exit 1; }
echo $took
BROWSE
WORKLOADS="ls du grep rg walk rgwalk"
# sshfs speaks SFTP over its stdin/stdout to an sftp-server in the pod mount namespace.
printf "#!/bin/sh\nexec nsenter -t %s -m /usr/lib/openssh/sftp-server\n" $POD > /tmp/sftp-server.sh
printf "#!/bin/sh\nexec sshfs -f -o passive -o ro :/ /tmp/sshfs\n" > /tmp/sshfs.sh
chmod +x /tmp/sftp-server.sh /tmp/sshfs.sh
: > /tmp/mirrord.txt; : > /tmp/sshfs.txt
on_sshfs() { # SCRIPT ARGS… with a fresh sshfs mount at /tmp/sshfs
  unshare --mount --propagation private -- sh -c "
    mkdir -p /tmp/sshfs && socat EXEC:/tmp/sftp-server.sh EXEC:/tmp/sshfs.sh &
    for _ in \$(seq 200); do mountpoint -q /tmp/sshfs && break; sleep 0.02; done
    sh $1 /tmp/sshfs ${2:-}
    umount /tmp/sshfs; wait"
}
on_mirrord() { # SCRIPT ARGS… in a fresh session
  $MIRRORD exec -t pid/$POD --fs-mode local ${MIRRORD_ARGS:-} -- sh -c "sh $1 \$MIRRORD_REMOTE_ROOT ${2:-}"
}
for _ in $(seq "$RUNS"); do
  # A fresh session each round, so the first read is cold.
  on_mirrord /tmp/round.sh >> /tmp/mirrord.txt
  on_sshfs /tmp/round.sh >> /tmp/sshfs.txt
  for w in $WORKLOADS; do
    on_mirrord /tmp/browse.sh $w >> /tmp/mirrord-$w.txt
    on_sshfs /tmp/browse.sh $w >> /tmp/sshfs-$w.txt
  done
done
median() { awk -v c=$2 "{ print \$c }" $1 | sort -n | awk "{ v[NR] = \$1 } END { print v[int((NR + 1) / 2)] }"; }
row() { # LABEL COLUMN [BYTES [WORKLOAD]]
  m=$(median /tmp/mirrord${4:+-$4}.txt $2); s=$(median /tmp/sshfs${4:+-$4}.txt $2)
  if [ -n "${3:-}" ]; then
    awk -v m=$m -v s=$s -v label="$1" -v bytes=$3 "BEGIN { mm = bytes / 1000000 / (m / 1000); ss = bytes / 1000000 / (s / 1000); printf \"%-34s %12.0f %12.0f %8.1fx\n\", label \" (MB/s)\", mm, ss, mm / ss }"
  else
    awk -v m=$m -v s=$s -v label="$1" "BEGIN { printf \"%-34s %12d %12d %8.1fx\n\", label \" (ms)\", m, s, s / m }"
  fi
}
printf "%-34s %12s %12s %9s\n" "median of $RUNS rounds" "mirrord" "sshfs" "speed-up"
row "sequential read 256 MiB, cold" 1 268435456
row "sequential read 256 MiB, warm" 2 268435456
row "find over 10,000 files" 3
row "git status, 2,000 files" 4
row "ls -lR over 10,000 files" 1 "" ls
row "du -s over 10,000 files" 1 "" du
row "grep -r over 2,000 small files" 1 "" grep
row "rg over 2,000 small files" 1 "" rg
row "editor walk, 20,000 files (cat)" 1 "" walk
row "editor walk, 20,000 files (rg)" 1 "" rgwalk
' bench "$RUNS"
