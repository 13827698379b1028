# Shared settings of up, down, kubectl and smoke. Sourced, never run.
# Everything the cluster creates is named mrdc-* so that down (and a human) can find it.
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${MRDC_CLUSTER_STATE:-/var/lib/mrdc-cluster}
BIN=$HERE/bin/mrdc-cluster
WORLD=mrdc-world
NODE=mrdc-node
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
  CGROOT=/sys/fs/cgroup/mrdc-cluster
else
  CGROOT=/sys/fs/cgroup/unified/mrdc-cluster
fi

# Proxies from the environment must never carry cluster traffic off the machine.
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY

die() { echo "mrdc-cluster: error: $*" >&2; exit 1; }
log() { echo "mrdc-cluster: $*" >&2; }

# in_ns NETNS CMD...: runs CMD with only its network namespace switched (no mount changes,
# unlike `ip netns exec`, so /sys/fs/cgroup stays visible).
in_ns() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }

kubectl_admin() { in_ns "$WORLD" "$BIN" kubectl --kubeconfig="$STATE/pki/admin.kubeconfig" "$@"; }

# build_binary: one link of every component; the Go build cache (~/.cache/go-build) makes it a
# relink-only step after the first build. Niced: builds must not starve the machine.
build_binary() {
  local v=v1.37.2 ldflags="" pkg
  # Version stamps as upstream's release builds set them (a link-time change only).
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags="$ldflags -X $pkg.gitVersion=$v -X $pkg.gitMajor=1 -X $pkg.gitMinor=37 -X $pkg.gitTreeState=clean"
  done
  ( cd "$HERE" && nice -n 19 go build -trimpath -ldflags="$ldflags" -o bin/mrdc-cluster ./cmd/mrdc-cluster )
}
