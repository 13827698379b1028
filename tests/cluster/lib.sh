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

# start NAME NETNS CMD...: a daemon in the cluster cgroup, detached from the calling shell; its
# output is appended to logs/NAME.log (a restarted daemon keeps its earlier log above).
start() {
  local name=$1 ns=$2; shift 2
  setsid nsenter --net=/run/netns/"$ns" -- sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CGROOT/system" "$@" \
    >> "$STATE/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/run/$name.pid"
}

# start_apiserver: the API server, with the arguments of every start (up, restart-apiserver).
start_apiserver() {
  local P=$STATE/pki
  start kube-apiserver $WORLD "$BIN" kube-apiserver \
    --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --secure-port=6443 --advertise-address=10.250.0.1 \
    --service-cluster-ip-range=10.96.0.0/16 \
    --client-ca-file="$P/ca.crt" --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
    --kubelet-client-certificate="$P/apiserver-kubelet-client.crt" --kubelet-client-key="$P/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP --profiling=false --v=1
}

# wait_apiserver: until the API server is ready, up to 120 s; fails sooner if it exits (saying so).
wait_apiserver() {
  local i
  for i in $(seq 1 120); do
    kubectl_admin get --raw=/readyz >/dev/null 2>&1 && return 0
    kill -0 "$(cat "$STATE/run/kube-apiserver.pid")" 2>/dev/null || { log "the apiserver exited"; return 1; }
    sleep 1
  done
  return 1
}
