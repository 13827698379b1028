#!/usr/bin/env bash
# What one FUSE round trip costs on this machine, and which calls the kernel answers itself:
# each figure is microseconds per call, the median of RUNS loops of 20,000 calls by one Python
# process in a mirrord session, on a file and a symlink of the pod whose directory was listed.
#   stat        attributes the kernel holds (the TTL): no round trip, the floor of a syscall
#   getxattr    with --fs-xattrs: answered by mirrord from the listing (one FUSE round trip, no
#               agent); default: the kernel answers after the first ENOSYS (no round trip)
#   readlink    the kernel's symlink cache (FUSE_CACHE_SYMLINKS) against one round trip each
# Run by hand as root after `cargo build --release --workspace`:   bench/fuse.sh [RUNS]
# Everything runs in a private network and mount namespace with no route off the machine.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${1:-3}
exec unshare --net --mount --propagation private -- bash -euo pipefail -c '
RUNS=$1
ip link set lo up
mount -t tmpfs bench-tmp /tmp
unshare --net --mount --uts --propagation private -- sh -c "mount -t tmpfs pod /srv && mkdir /srv/d && echo x > /srv/d/file && ln -s file /srv/d/link && exec env -i POD=1 /bin/sleep 3600" &
POD=$!
trap "kill $POD 2>/dev/null || true" EXIT
for _ in $(seq 200); do tr "\0" "\n" < /proc/$POD/environ 2>/dev/null | grep -q ^POD= && break; sleep 0.01; done
cat > /tmp/loop.py <<"PY"
import os, sys, time
d = os.path.join(os.environ["MIRRORD_REMOTE_ROOT"], "srv/d")
f, l = os.path.join(d, "file"), os.path.join(d, "link")
def each(call):
    os.listdir(d)
    start = time.perf_counter()
    for _ in range(20000):
        call()
    return (time.perf_counter() - start) / 20000 * 1e6
def xattr():
    try:
        os.getxattr(f, "security.selinux")
    except OSError:
        pass
print("%.1f %.1f %.1f" % (each(lambda: os.stat(f)), each(xattr), each(lambda: os.readlink(l))))
PY
for _ in $(seq "$RUNS"); do
  $MIRRORD exec -t pid/$POD --fs-mode local -- /usr/bin/python3 /tmp/loop.py >> /tmp/default.txt
  $MIRRORD exec -t pid/$POD --fs-mode local --fs-xattrs -- /usr/bin/python3 /tmp/loop.py >> /tmp/xattrs.txt
done
median() { awk -v c=$2 "{ print \$c }" $1 | sort -n | awk "{ v[NR] = \$1 } END { print v[int((NR + 1) / 2)] }"; }
printf "%-44s %10s %14s\n" "µs per call, median of $RUNS" "default" "--fs-xattrs"
for row in "1 stat (kernel-cached attributes)" "2 getxattr" "3 readlink"; do
  col=${row%% *}; label=${row#* }
  printf "%-44s %10s %14s\n" "$label" "$(median /tmp/default.txt $col)" "$(median /tmp/xattrs.txt $col)"
done
' bench "$RUNS"
