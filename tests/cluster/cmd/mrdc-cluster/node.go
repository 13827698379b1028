package main

// The node: virtual-kubelet's node and pod controllers plus its kubelet API (exec, port-forward,
// logs), backed by processProvider, which runs every pod as real processes on this machine. It
// must run inside the node network namespace: it never creates links or rules anywhere else.

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	vklog "github.com/virtual-kubelet/virtual-kubelet/log"
	"github.com/virtual-kubelet/virtual-kubelet/log/klogv2"
	"github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/nodeutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

type nodeConfig struct {
	name       string
	kubeconfig string
	stateDir   string
	tlsCert    string
	tlsKey     string
	nodeIP     string
	podCIDR    string // the bridge holds the first address, pods get the rest
	bridge     string
	clusterDNS string
	domain     string
	cgroupRoot string // cgroup v2 directory under which pod cgroups are created
	imagesFile string
	agentBin   string
}

func runNode() int {
	var c nodeConfig
	fs := flag.NewFlagSet("node", flag.ContinueOnError)
	fs.StringVar(&c.name, "name", "mrdc-node", "node name")
	fs.StringVar(&c.kubeconfig, "kubeconfig", "", "kubeconfig of the node identity")
	fs.StringVar(&c.stateDir, "state", "/var/lib/mrdc-cluster/node", "directory for pod volumes, specs and logs")
	fs.StringVar(&c.tlsCert, "tls-cert", "", "serving certificate of the kubelet API")
	fs.StringVar(&c.tlsKey, "tls-key", "", "serving key of the kubelet API")
	fs.StringVar(&c.nodeIP, "node-ip", nodeIP, "InternalIP of the node; the kubelet API listens there")
	fs.StringVar(&c.podCIDR, "pod-cidr", "10.244.0.0/24", "pod CIDR of this node")
	fs.StringVar(&c.bridge, "bridge", "cbr0", "bridge in the node netns that pod veths join")
	fs.StringVar(&c.clusterDNS, "cluster-dns", "10.96.0.10", "nameserver written into pods' resolv.conf")
	fs.StringVar(&c.domain, "cluster-domain", "cluster.local", "cluster domain")
	if err := fs.Parse(os.Args[1:]); err != nil {
		return 2
	}
	c.cgroupRoot = os.Getenv("MRDC_CGROOT")
	c.imagesFile = os.Getenv("MRDC_IMAGES")
	c.agentBin = os.Getenv("MRDC_AGENT_BIN")
	if c.kubeconfig == "" || c.tlsCert == "" || c.tlsKey == "" || c.cgroupRoot == "" || c.imagesFile == "" {
		fmt.Fprintln(os.Stderr, "node: --kubeconfig, --tls-cert, --tls-key, MRDC_CGROOT and MRDC_IMAGES are required")
		return 2
	}
	if err := serveNode(c); err != nil {
		fmt.Fprintf(os.Stderr, "node: %v\n", err)
		return 1
	}
	return 0
}

func serveNode(c nodeConfig) error {
	restCfg, err := clientcmd.BuildConfigFromFlags("", c.kubeconfig)
	if err != nil {
		return fmt.Errorf("kubeconfig: %w", err)
	}
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	vklog.L = klogv2.New(nil)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	var prov *processProvider
	mux := http.NewServeMux()
	newProvider := func(pc nodeutil.ProviderConfig) (nodeutil.Provider, node.NodeProvider, error) {
		p, err := newProcessProvider(ctx, c, client)
		prov = p
		// A nil NodeProvider makes virtual-kubelet mark the node Ready once its controllers run.
		return p, nil, err
	}
	shapeNode := func(nc *nodeutil.NodeConfig) error {
		nc.HTTPListenAddr = c.nodeIP + ":10250"
		nc.Handler = websocketPortForward(mux, func() *processProvider { return prov }, 4*time.Hour)
		nc.NumWorkers = 4
		nc.StreamIdleTimeout = 4 * time.Hour
		nc.StreamCreationTimeout = 30 * time.Second
		// Env is resolved by the provider once the pod has its IP (see env.go).
		nc.SkipDownwardAPIResolution = true
		n := &nc.NodeSpec
		n.Spec.PodCIDR = c.podCIDR
		n.Spec.PodCIDRs = []string{c.podCIDR}
		n.Labels["kubernetes.io/os"] = "linux"
		n.Labels["kubernetes.io/arch"] = "amd64"
		n.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: c.nodeIP},
			{Type: corev1.NodeHostName, Address: c.name},
		}
		n.Status.DaemonEndpoints.KubeletEndpoint.Port = 10250
		capacity := corev1.ResourceList{
			corev1.ResourceCPU:    resource.MustParse("8"),
			corev1.ResourceMemory: resource.MustParse("16Gi"),
			corev1.ResourcePods:   resource.MustParse("110"),
		}
		n.Status.Capacity = capacity
		n.Status.Allocatable = capacity
		n.Status.NodeInfo = corev1.NodeSystemInfo{
			OperatingSystem:         "linux",
			Architecture:            "amd64",
			KubeletVersion:          "v1.37.2-mrdc",
			ContainerRuntimeVersion: "mrdc-process://1",
		}
		now := metaNow()
		for i := range n.Status.Conditions {
			cond := &n.Status.Conditions[i]
			cond.Status = corev1.ConditionFalse
			cond.LastHeartbeatTime = now
			cond.LastTransitionTime = now
		}
		return nil
	}
	n, err := nodeutil.NewNode(c.name, newProvider,
		nodeutil.WithClient(client),
		nodeutil.AttachProviderRoutes(mux),
		shapeNode,
		nodeutil.WithTLSConfig(nodeutil.WithKeyPairFromPath(c.tlsCert, c.tlsKey)),
	)
	if err != nil {
		return err
	}
	defer prov.shutdown()
	go func() {
		if err := n.Run(ctx); err != nil && ctx.Err() == nil {
			fmt.Fprintf(os.Stderr, "node: controllers stopped: %v\n", err)
		}
	}()
	if err := n.WaitReady(ctx, 0); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "node: %s ready, kubelet API on %s:10250\n", c.name, c.nodeIP)
	select {
	case <-n.Done():
		return n.Err()
	case <-ctx.Done():
		return nil
	}
}
