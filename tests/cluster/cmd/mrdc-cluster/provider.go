package main

// processProvider runs each pod as real processes: a sandbox process holding the pod's network,
// UTS and IPC namespaces (veth on the node bridge, address from the podCIDR), and per container a
// process in its own mount namespace (volumes bound at their paths) and its own cgroup named by
// the container ID. It must never touch the network namespace of anything but the node and its
// pods, and never leave a mount on the host: container mounts die with their mount namespaces.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	statsv1alpha1 "k8s.io/kubelet/pkg/apis/stats/v1alpha1"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
)

// systemPath is what an image would put in PATH; the node's own PATH (pyenv shims and so on) is
// deliberately not inherited by containers.
const systemPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

type imageEntry struct {
	Entrypoint []string `json:"entrypoint"`
	Cmd        []string `json:"cmd"`
}

type processProvider struct {
	ctx     context.Context
	cfg     nodeConfig
	client  kubernetes.Interface
	images  map[string]imageEntry
	self    string
	network *net.IPNet
	gateway net.IP

	mu     sync.Mutex
	pods   map[string]*podRun // key namespace/name
	usedIP map[string]bool
	notify func(*corev1.Pod)
}

type podRun struct {
	pod      *corev1.Pod // as handed to CreatePod; status is computed from the fields below
	key      string
	dir      string
	ip       string
	hostVeth string
	sandbox  *exec.Cmd
	started  metav1.Time
	init     []*ctrRun
	ctrs     []*ctrRun
	// ephemeral containers, in the order they were added; each runs once and is never removed
	ephemeral []*ctrRun
	// volume name -> host directory, once the pod's volumes are prepared
	volumes  map[string]string
	stopping bool
	failed   string // pod-level failure message (volumes, network)
	cancel   context.CancelFunc
}

type ctrRun struct {
	spec     corev1.Container
	isInit   bool
	id       string
	cgroup   string
	logPath  string
	env      []string
	argv     []string
	mounts   []mountSpec
	workDir  string
	proc     *exec.Cmd
	pid      int
	state    string // "waiting", "running", "terminated"
	waitWhy  string
	waitMsg  string
	started  metav1.Time
	finished metav1.Time
	exitCode int32
	lastTerm *corev1.ContainerStateTerminated
	restarts int32
	ready    bool
	exited   chan struct{} // closed when the current process is reaped
}

func newProcessProvider(ctx context.Context, c nodeConfig, client kubernetes.Interface) (*processProvider, error) {
	raw, err := os.ReadFile(c.imagesFile)
	if err != nil {
		return nil, fmt.Errorf("image table: %w", err)
	}
	var table map[string]json.RawMessage
	if err := json.Unmarshal(raw, &table); err != nil {
		return nil, fmt.Errorf("image table %s: %w", c.imagesFile, err)
	}
	images := map[string]imageEntry{}
	for name, v := range table {
		if strings.HasPrefix(name, "_") {
			continue
		}
		var e imageEntry
		if err := json.Unmarshal(v, &e); err != nil {
			return nil, fmt.Errorf("image table entry %s: %w", name, err)
		}
		images[name] = e
	}
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	gw, network, err := net.ParseCIDR(c.podCIDR)
	if err != nil {
		return nil, err
	}
	gw = gw.To4()
	gw[3] = 1
	if err := os.MkdirAll(filepath.Join(c.stateDir, "pods"), 0o755); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(c.cgroupRoot, "pods"), 0o755); err != nil {
		return nil, fmt.Errorf("cgroup root: %w", err)
	}
	return &processProvider{
		ctx: ctx, cfg: c, client: client, images: images, self: self,
		network: network, gateway: gw,
		pods: map[string]*podRun{}, usedIP: map[string]bool{},
	}, nil
}

func podKey(ns, name string) string { return ns + "/" + name }

func randomID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // crypto/rand never fails on Linux (getrandom)
	return hex.EncodeToString(b)
}

// NotifyPods implements node.PodNotifier: status changes are pushed, not polled.
func (p *processProvider) NotifyPods(_ context.Context, f func(*corev1.Pod)) {
	p.mu.Lock()
	p.notify = f
	p.mu.Unlock()
}

// changed pushes the current status of pr to virtual-kubelet. Called without p.mu held.
func (p *processProvider) changed(pr *podRun) {
	p.mu.Lock()
	pod := p.podLocked(pr)
	f := p.notify
	p.mu.Unlock()
	if f != nil {
		f(pod)
	}
}

func (p *processProvider) CreatePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	if _, ok := p.pods[key]; ok {
		p.mu.Unlock()
		return nil
	}
	pctx, cancel := context.WithCancel(p.ctx)
	pr := &podRun{
		pod:     pod.DeepCopy(),
		key:     key,
		dir:     filepath.Join(p.cfg.stateDir, "pods", string(pod.UID)),
		started: metav1.Now(),
		cancel:  cancel,
	}
	for _, c := range pod.Spec.InitContainers {
		pr.init = append(pr.init, &ctrRun{spec: c, isInit: true, state: "waiting", waitWhy: "PodInitializing"})
	}
	for _, c := range pod.Spec.Containers {
		pr.ctrs = append(pr.ctrs, &ctrRun{spec: c, state: "waiting", waitWhy: "ContainerCreating"})
	}
	p.pods[key] = pr
	p.mu.Unlock()
	go p.startPod(pctx, pr)
	return nil
}

func (p *processProvider) failPod(pr *podRun, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	fmt.Fprintf(os.Stderr, "node: pod %s: %s\n", pr.key, msg)
	p.mu.Lock()
	pr.failed = msg
	p.mu.Unlock()
	p.changed(pr)
}

func (p *processProvider) startPod(ctx context.Context, pr *podRun) {
	pod := pr.pod
	if err := os.MkdirAll(pr.dir, 0o755); err != nil {
		p.failPod(pr, "state dir: %v", err)
		return
	}
	if err := p.startSandbox(pr); err != nil {
		p.failPod(pr, "sandbox: %v", err)
		return
	}
	if ctx.Err() != nil {
		return // deleted while the sandbox started; stopPod cleans up
	}
	volumes, err := p.prepareVolumes(ctx, pr)
	if err != nil {
		p.failPod(pr, "volumes: %v", err)
		return
	}
	p.mu.Lock()
	pr.volumes = volumes
	p.mu.Unlock()
	if err := p.writeNetFiles(pr); err != nil {
		p.failPod(pr, "resolv.conf/hosts: %v", err)
		return
	}
	for _, cs := range [][]*ctrRun{pr.init, pr.ctrs} {
		for _, c := range cs {
			if !p.prepareOrReport(ctx, pr, c, volumes) {
				return
			}
		}
	}
	for _, c := range pr.init {
		for {
			code, err := p.runOnce(pr, c)
			if ctx.Err() != nil {
				return
			}
			if err == nil && code == 0 {
				break
			}
			if pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
				p.failPod(pr, "init container %s failed (exit %d, %v)", c.spec.Name, code, err)
				return
			}
			if !p.backoff(ctx, pr, c) {
				return
			}
		}
	}
	for _, c := range pr.ctrs {
		go p.superviseContainer(ctx, pr, c)
	}
}

// runOnce starts c and waits for it to exit, keeping its status current.
func (p *processProvider) runOnce(pr *podRun, c *ctrRun) (int32, error) {
	if err := p.startContainer(pr, c); err != nil {
		return -1, err
	}
	p.changed(pr)
	<-c.exited
	p.changed(pr)
	p.mu.Lock()
	defer p.mu.Unlock()
	return c.exitCode, nil
}

func (p *processProvider) backoff(ctx context.Context, pr *podRun, c *ctrRun) bool {
	p.mu.Lock()
	c.restarts++
	d := time.Second << min(c.restarts-1, 5) // 1 s doubling up to 32 s
	c.state, c.waitWhy, c.waitMsg = "waiting", "CrashLoopBackOff", fmt.Sprintf("back-off %v restarting failed container", d)
	p.mu.Unlock()
	p.changed(pr)
	select {
	case <-time.After(d):
		return true
	case <-ctx.Done():
		return false
	}
}

func (p *processProvider) superviseContainer(ctx context.Context, pr *podRun, c *ctrRun) {
	for {
		if err := p.startContainer(pr, c); err != nil {
			p.mu.Lock()
			c.state, c.waitWhy, c.waitMsg = "waiting", "RunContainerError", err.Error()
			p.mu.Unlock()
			p.changed(pr)
		} else {
			p.changed(pr)
			if c.spec.ReadinessProbe != nil {
				go p.probeLoop(ctx, pr, c)
			}
			<-c.exited
			p.changed(pr)
		}
		if ctx.Err() != nil {
			return
		}
		p.mu.Lock()
		code := c.exitCode
		p.mu.Unlock()
		switch pr.pod.Spec.RestartPolicy {
		case corev1.RestartPolicyNever:
			return
		case corev1.RestartPolicyOnFailure:
			if code == 0 {
				return
			}
		}
		if !p.backoff(ctx, pr, c) {
			return
		}
	}
}

var errNoImage = errors.New("image not in the local image table")

// imageName strips registry defaults, tag and digest: "docker.io/library/busybox:1.36" -> "busybox".
func imageName(ref string) string {
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		ref = ref[:i]
	}
	ref = strings.TrimPrefix(ref, "docker.io/")
	return strings.TrimPrefix(ref, "library/")
}

func (p *processProvider) prepareContainer(ctx context.Context, pr *podRun, c *ctrRun, volumes map[string]string) error {
	img, ok := p.images[imageName(c.spec.Image)]
	if !ok {
		return fmt.Errorf("%w: %q (tests/cluster/images.json)", errNoImage, c.spec.Image)
	}
	envMap, err := p.resolveEnv(ctx, pr, c.spec)
	if err != nil {
		return err
	}
	env := []string{"PATH=" + systemPath, "HOME=/root", "HOSTNAME=" + podHostname(pr.pod)}
	names := make([]string, 0, len(envMap))
	for k := range envMap {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		env = append(env, k+"="+envMap[k])
	}
	var argv []string
	if len(c.spec.Command) > 0 {
		argv = append(append(argv, c.spec.Command...), c.spec.Args...)
	} else if len(c.spec.Args) > 0 {
		argv = append(append(argv, img.Entrypoint...), c.spec.Args...)
	} else {
		argv = append(append(argv, img.Entrypoint...), img.Cmd...)
	}
	mapping := expansion.MappingFuncFor(envMap)
	for i, a := range argv {
		argv[i] = expansion.Expand(a, mapping)
	}
	if len(argv) == 0 {
		return fmt.Errorf("image %q has no entrypoint and the container no command", c.spec.Image)
	}
	switch argv[0] {
	case "@self":
		argv[0] = p.self
	case "@agent":
		if p.cfg.agentBin == "" {
			return errors.New("image maps to the mirrord agent but MRDC_AGENT_BIN is unset")
		}
		argv[0] = p.cfg.agentBin
	}
	var mounts []mountSpec
	for _, m := range c.spec.VolumeMounts {
		src, ok := volumes[m.Name]
		if !ok {
			return fmt.Errorf("volume mount %q names no volume", m.Name)
		}
		if m.SubPath != "" {
			src = filepath.Join(src, m.SubPath)
			if err := os.MkdirAll(src, 0o755); err != nil {
				return err
			}
		}
		mounts = append(mounts, mountSpec{Src: src, Dst: m.MountPath, RO: m.ReadOnly})
	}
	mounts = append(mounts,
		mountSpec{Src: filepath.Join(pr.dir, "resolv.conf"), Dst: "/etc/resolv.conf", RO: true},
		mountSpec{Src: filepath.Join(pr.dir, "hosts"), Dst: "/etc/hosts", RO: true})
	c.id = randomID()
	c.cgroup = filepath.Join(p.cfg.cgroupRoot, "pods", "pod"+string(pr.pod.UID), c.id)
	c.logPath = filepath.Join(pr.dir, "logs", c.spec.Name+".log")
	c.env, c.argv, c.mounts, c.workDir = env, argv, mounts, c.spec.WorkingDir
	if err := os.MkdirAll(filepath.Dir(c.logPath), 0o755); err != nil {
		return err
	}
	return os.MkdirAll(c.cgroup, 0o755)
}

// prepareOrReport prepares c; on failure it leaves c waiting with the reason a kubelet gives
// (ErrImageNeverPull for an image not in the table, else CreateContainerError) and says false.
func (p *processProvider) prepareOrReport(ctx context.Context, pr *podRun, c *ctrRun, volumes map[string]string) bool {
	err := p.prepareContainer(ctx, pr, c, volumes)
	if err == nil {
		return true
	}
	p.mu.Lock()
	c.waitWhy, c.waitMsg = "CreateContainerError", err.Error()
	if errors.Is(err, errNoImage) {
		c.waitWhy = "ErrImageNeverPull"
	}
	p.mu.Unlock()
	p.changed(pr)
	return false
}

func podHostname(pod *corev1.Pod) string {
	if pod.Spec.Hostname != "" {
		return pod.Spec.Hostname
	}
	if len(pod.Name) > 63 {
		return pod.Name[:63]
	}
	return pod.Name
}

// startContainer launches c in the sandbox's namespaces, a fresh mount namespace and its cgroup.
func (p *processProvider) startContainer(pr *podRun, c *ctrRun) error {
	p.mu.Lock()
	stopping := pr.stopping
	p.mu.Unlock()
	if stopping {
		return errors.New("pod is being deleted")
	}
	spec := containerSpec{Argv: c.argv, Env: c.env, WorkDir: c.workDir, Mounts: c.mounts}
	spec.Privileged, spec.Capabilities = capabilities(c.spec.SecurityContext)
	specPath := filepath.Join(pr.dir, c.spec.Name+".json")
	raw, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	if err := os.WriteFile(specPath, raw, 0o600); err != nil {
		return err
	}
	logf, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cg, err := os.Open(c.cgroup)
	if err != nil {
		return fmt.Errorf("cgroup: %w", err)
	}
	defer cg.Close()
	args := append(p.nsenterArgs(pr), "--", p.self, "container-init", "run", specPath)
	cmd := exec.Command("nsenter", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWNS,
		Setpgid:     true,
		UseCgroupFD: true,
		CgroupFD:    int(cg.Fd()),
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	p.mu.Lock()
	c.proc, c.pid = cmd, cmd.Process.Pid
	c.state, c.waitWhy, c.waitMsg = "running", "", ""
	c.started = metav1.Now()
	c.ready = c.spec.ReadinessProbe == nil
	c.exited = make(chan struct{})
	exited := c.exited
	p.mu.Unlock()
	go func() {
		err := cmd.Wait()
		code := int32(0)
		reason := "Completed"
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = int32(ee.ExitCode())
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				code = 128 + int32(ws.Signal())
			}
			reason = "Error"
		} else if err != nil {
			code, reason = -1, "Error"
		}
		p.mu.Lock()
		c.state, c.exitCode, c.ready = "terminated", code, false
		c.finished = metav1.Now()
		c.lastTerm = &corev1.ContainerStateTerminated{
			ExitCode: code, Reason: reason, StartedAt: c.started, FinishedAt: c.finished,
			ContainerID: "mrdc://" + c.id,
		}
		p.mu.Unlock()
		close(exited)
	}()
	return nil
}

// defaultCapabilities is the set container runtimes (containerd, CRI-O) give a container that is
// not privileged, before its securityContext adds or drops any.
var defaultCapabilities = []string{
	"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
	"NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}

// capabilities is what a container keeps, as a runtime computes it: every capability when
// privileged, otherwise the default set plus securityContext.capabilities.add minus drop ("ALL"
// in either means every capability).
func capabilities(sc *corev1.SecurityContext) (privileged bool, kept []string) {
	if sc != nil && sc.Privileged != nil && *sc.Privileged {
		return true, nil
	}
	set := map[string]bool{}
	for _, c := range defaultCapabilities {
		set[c] = true
	}
	if sc != nil && sc.Capabilities != nil {
		for _, c := range sc.Capabilities.Add {
			name := strings.TrimPrefix(strings.ToUpper(string(c)), "CAP_")
			if name == "ALL" {
				for n := range capabilityNumbers {
					set[n] = true
				}
			}
			set[name] = true
		}
		for _, c := range sc.Capabilities.Drop {
			name := strings.TrimPrefix(strings.ToUpper(string(c)), "CAP_")
			if name == "ALL" {
				set = map[string]bool{}
			}
			delete(set, name)
		}
	}
	for n := range set {
		kept = append(kept, n)
	}
	sort.Strings(kept)
	return false, kept
}

// nsenterArgs joins the pod sandbox's namespaces (the node's network for hostNetwork pods).
func (p *processProvider) nsenterArgs(pr *podRun) []string {
	pid := pr.sandbox.Process.Pid
	ns := fmt.Sprintf("/proc/%d/ns/", pid)
	args := []string{"--uts=" + ns + "uts", "--ipc=" + ns + "ipc"}
	if !pr.pod.Spec.HostNetwork {
		args = append(args, "--net="+ns+"net")
	}
	return args
}

// startSandbox starts the process that owns the pod's namespaces and wires its network.
func (p *processProvider) startSandbox(pr *podRun) error {
	cgDir := filepath.Join(p.cfg.cgroupRoot, "pods", "pod"+string(pr.pod.UID), "sandbox")
	if err := os.MkdirAll(cgDir, 0o755); err != nil {
		return err
	}
	cg, err := os.Open(cgDir)
	if err != nil {
		return err
	}
	defer cg.Close()
	flags := uintptr(syscall.CLONE_NEWUTS | syscall.CLONE_NEWIPC)
	if !pr.pod.Spec.HostNetwork {
		flags |= syscall.CLONE_NEWNET
	}
	cmd := exec.Command(p.self, "container-init", "sandbox", podHostname(pr.pod))
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: flags, Setpgid: true, UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	p.mu.Lock()
	pr.sandbox = cmd
	stopping := pr.stopping
	p.mu.Unlock()
	go func() { _ = cmd.Wait() }() // reaped here; DeletePod kills it
	// DeletePod may have run before the sandbox was recorded, and so could not kill it.
	if stopping {
		_ = cmd.Process.Kill()
		return errors.New("pod is being deleted")
	}
	buf := make([]byte, 3)
	if _, err := io.ReadFull(out, buf); err != nil {
		return fmt.Errorf("sandbox did not start: %w", err)
	}
	if pr.pod.Spec.HostNetwork {
		p.mu.Lock()
		pr.ip = p.cfg.nodeIP
		p.mu.Unlock()
		return nil
	}
	ip, err := p.allocIP()
	if err != nil {
		return err
	}
	veth := "mrdc" + strings.ReplaceAll(string(pr.pod.UID), "-", "")[:8]
	p.mu.Lock()
	pr.ip, pr.hostVeth = ip, veth
	p.mu.Unlock()
	pid := fmt.Sprint(cmd.Process.Pid)
	ones, _ := p.network.Mask.Size()
	steps := [][]string{
		{"ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pid},
		{"ip", "link", "set", veth, "master", p.cfg.bridge, "up"},
		{"nsenter", "--net=/proc/" + pid + "/ns/net", "ip", "link", "set", "lo", "up"},
		{"nsenter", "--net=/proc/" + pid + "/ns/net", "ip", "addr", "add", fmt.Sprintf("%s/%d", ip, ones), "dev", "eth0"},
		{"nsenter", "--net=/proc/" + pid + "/ns/net", "ip", "link", "set", "eth0", "up"},
		{"nsenter", "--net=/proc/" + pid + "/ns/net", "ip", "route", "add", "default", "via", p.gateway.String()},
		// Whatever the node still believes about this address belonged to an earlier pod.
		{"ip", "neigh", "flush", "to", ip, "dev", p.cfg.bridge},
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, strings.TrimSpace(string(out)))
		}
	}
	return nil
}

func (p *processProvider) allocIP() (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	base := p.network.IP.To4()
	ones, bits := p.network.Mask.Size()
	size := 1 << (bits - ones)
	for i := 2; i < size-1; i++ {
		ip := net.IPv4(base[0], base[1], base[2], base[3]+byte(i)).String()
		if !p.usedIP[ip] {
			p.usedIP[ip] = true
			return ip, nil
		}
	}
	return "", errors.New("pod CIDR exhausted")
}

// writeNetFiles writes the pod's resolv.conf and hosts, bound over /etc in each container.
func (p *processProvider) writeNetFiles(pr *podRun) error {
	pod := pr.pod
	var ns, search []string
	var opts []string
	policy := pod.Spec.DNSPolicy
	if policy == corev1.DNSClusterFirst && pod.Spec.HostNetwork {
		policy = corev1.DNSDefault
	}
	switch policy {
	case corev1.DNSNone:
	case corev1.DNSDefault:
		// The node's resolver would be the machine's, which the cluster world cannot reach.
	default:
		d := p.cfg.domain
		ns = []string{p.cfg.clusterDNS}
		search = []string{pod.Namespace + ".svc." + d, "svc." + d, d}
		opts = []string{"ndots:5"}
	}
	if dc := pod.Spec.DNSConfig; dc != nil {
		ns = append(ns, dc.Nameservers...)
		search = append(search, dc.Searches...)
		for _, o := range dc.Options {
			if o.Value != nil {
				opts = append(opts, o.Name+":"+*o.Value)
			} else {
				opts = append(opts, o.Name)
			}
		}
	}
	var b strings.Builder
	b.WriteString("# written by the mrdc test node\n")
	if len(search) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(search, " "))
	}
	for _, n := range ns {
		fmt.Fprintf(&b, "nameserver %s\n", n)
	}
	if len(opts) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(opts, " "))
	}
	if err := os.WriteFile(filepath.Join(pr.dir, "resolv.conf"), []byte(b.String()), 0o644); err != nil {
		return err
	}
	host := podHostname(pod)
	fqdn := host
	if pod.Spec.Subdomain != "" {
		fqdn = fmt.Sprintf("%s.%s.%s.svc.%s %s", host, pod.Spec.Subdomain, pod.Namespace, p.cfg.domain, host)
	}
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n", pr.ip, fqdn)
	for _, ha := range pod.Spec.HostAliases {
		hosts += fmt.Sprintf("%s\t%s\n", ha.IP, strings.Join(ha.Hostnames, " "))
	}
	return os.WriteFile(filepath.Join(pr.dir, "hosts"), []byte(hosts), 0o644)
}

// UpdatePod starts the ephemeral containers added to the pod (the only change to a pod's spec
// that the API allows and a process sees; metadata changes are not seen by any process).
func (p *processProvider) UpdatePod(_ context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	pr, ok := p.pods[podKey(pod.Namespace, pod.Name)]
	if !ok || pr.stopping {
		p.mu.Unlock()
		return nil
	}
	var added []*ctrRun
	for _, ec := range pod.Spec.EphemeralContainers {
		known := false
		for _, c := range pr.ephemeral {
			known = known || c.spec.Name == ec.Name
		}
		if !known {
			c := &ctrRun{spec: corev1.Container(ec.EphemeralContainerCommon), state: "waiting", waitWhy: "ContainerCreating"}
			pr.ephemeral = append(pr.ephemeral, c)
			added = append(added, c)
		}
	}
	pr.pod.Spec.EphemeralContainers = pod.DeepCopy().Spec.EphemeralContainers
	p.mu.Unlock()
	for _, c := range added {
		go p.runEphemeral(pr, c)
	}
	return nil
}

// runEphemeral runs an ephemeral container once, as the kubelet does: in the pod's network,
// UTS and IPC namespaces and its cgroup (this node gives pods no PID namespace of their own, so
// targetContainerName needs nothing more), never restarted.
func (p *processProvider) runEphemeral(pr *podRun, c *ctrRun) {
	var volumes map[string]string
	for {
		p.mu.Lock()
		volumes = pr.volumes
		stopping := pr.stopping
		p.mu.Unlock()
		if stopping {
			return
		}
		if volumes != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !p.prepareOrReport(p.ctx, pr, c, volumes) {
		return
	}
	if _, err := p.runOnce(pr, c); err != nil {
		p.mu.Lock()
		c.state, c.waitWhy, c.waitMsg = "waiting", "RunContainerError", err.Error()
		p.mu.Unlock()
		p.changed(pr)
	}
}

func (p *processProvider) DeletePod(ctx context.Context, pod *corev1.Pod) error {
	key := podKey(pod.Namespace, pod.Name)
	p.mu.Lock()
	pr, ok := p.pods[key]
	if !ok {
		p.mu.Unlock()
		return nil
	}
	pr.stopping = true
	p.mu.Unlock()
	grace := 10 * time.Second
	if pod.DeletionGracePeriodSeconds != nil && time.Duration(*pod.DeletionGracePeriodSeconds)*time.Second < grace {
		grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	}
	p.stopPod(pr, grace)
	p.mu.Lock()
	delete(p.pods, key)
	p.mu.Unlock()
	p.changed(pr)
	// As the kubelet does: once every process is gone, remove the object now instead of letting
	// virtual-kubelet wait out the whole grace period. The UID precondition spares a successor.
	zero := int64(0)
	uid := pod.UID
	err := p.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &uid},
	})
	if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
		fmt.Fprintf(os.Stderr, "node: pod %s: final delete: %v\n", key, err)
	}
	return nil
}

// stopPod terminates the containers (SIGTERM, then SIGKILL after grace) and the sandbox, whose
// exit frees the pod netns and with it the veth pair.
func (p *processProvider) stopPod(pr *podRun, grace time.Duration) {
	pr.cancel()
	p.mu.Lock()
	var waits []chan struct{}
	for _, cs := range [][]*ctrRun{pr.init, pr.ctrs, pr.ephemeral} {
		for _, c := range cs {
			if c.state == "running" && c.proc != nil {
				_ = syscall.Kill(-c.pid, syscall.SIGTERM)
				waits = append(waits, c.exited)
			}
		}
	}
	p.mu.Unlock()
	deadline := time.After(grace)
	for _, w := range waits {
		select {
		case <-w:
		case <-deadline:
		}
	}
	p.mu.Lock()
	for _, cs := range [][]*ctrRun{pr.init, pr.ctrs, pr.ephemeral} {
		for _, c := range cs {
			if c.state == "running" && c.proc != nil {
				_ = syscall.Kill(-c.pid, syscall.SIGKILL)
			}
		}
	}
	sandbox := pr.sandbox
	p.mu.Unlock()
	for _, w := range waits {
		<-w
	}
	if sandbox != nil && sandbox.Process != nil {
		_ = sandbox.Process.Kill()
	}
	// Processes started by exec may linger in the pod's cgroups; kill them too.
	cgPod := filepath.Join(p.cfg.cgroupRoot, "pods", "pod"+string(pr.pod.UID))
	_ = os.WriteFile(filepath.Join(cgPod, "cgroup.kill"), []byte("1"), 0o644)
	for i := 0; i < 50; i++ {
		if removeCgroupTree(cgPod) == nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The pod's netns (and the veth in it) is torn down by the kernel some time after its last
	// process; a successor given the same address before then would share it with a dying pod,
	// and the node would keep the old MAC for it. So the veth goes now, and so does what the
	// node learnt about the address, before the address is handed out again.
	p.mu.Lock()
	ip, veth := pr.ip, pr.hostVeth
	p.mu.Unlock()
	if veth != "" {
		_ = exec.Command("ip", "link", "del", veth).Run()
	}
	if ip != "" && !pr.pod.Spec.HostNetwork {
		_ = exec.Command("ip", "neigh", "flush", "to", ip, "dev", p.cfg.bridge).Run()
		p.mu.Lock()
		delete(p.usedIP, ip)
		p.mu.Unlock()
	}
	_ = os.RemoveAll(pr.dir)
}

func removeCgroupTree(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	return syscall.Rmdir(dir)
}

func (p *processProvider) shutdown() {
	if p == nil {
		return
	}
	p.mu.Lock()
	prs := make([]*podRun, 0, len(p.pods))
	for _, pr := range p.pods {
		prs = append(prs, pr)
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, pr := range prs {
		wg.Add(1)
		go func() { defer wg.Done(); p.stopPod(pr, 2*time.Second) }()
	}
	wg.Wait()
}

func (p *processProvider) GetPod(_ context.Context, namespace, name string) (*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pr, ok := p.pods[podKey(namespace, name)]
	if !ok {
		return nil, notFound(namespace, name)
	}
	return p.podLocked(pr), nil
}

func (p *processProvider) GetPodStatus(ctx context.Context, namespace, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

func (p *processProvider) GetPods(context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]*corev1.Pod, 0, len(p.pods))
	for _, pr := range p.pods {
		out = append(out, p.podLocked(pr))
	}
	return out, nil
}

// podLocked returns a copy of the pod with a status that says what the processes are doing.
func (p *processProvider) podLocked(pr *podRun) *corev1.Pod {
	pod := pr.pod.DeepCopy()
	st := corev1.PodStatus{
		QOSClass:  pr.pod.Status.QOSClass,
		HostIP:    p.cfg.nodeIP,
		HostIPs:   []corev1.HostIP{{IP: p.cfg.nodeIP}},
		StartTime: &pr.started,
	}
	if pr.ip != "" {
		st.PodIP = pr.ip
		st.PodIPs = []corev1.PodIP{{IP: pr.ip}}
	}
	initDone := true
	for _, c := range pr.init {
		s := ctrStatus(c)
		st.InitContainerStatuses = append(st.InitContainerStatuses, s)
		if !(c.state == "terminated" && c.exitCode == 0) {
			initDone = false
		}
	}
	allReady, running, terminated, failed := true, 0, 0, 0
	for _, c := range pr.ctrs {
		st.ContainerStatuses = append(st.ContainerStatuses, ctrStatus(c))
		if !c.ready || c.state != "running" {
			allReady = false
		}
		switch c.state {
		case "running":
			running++
		case "terminated":
			terminated++
			if c.exitCode != 0 {
				failed++
			}
		}
	}
	for _, c := range pr.ephemeral {
		st.EphemeralContainerStatuses = append(st.EphemeralContainerStatuses, ctrStatus(c))
	}
	switch {
	case pr.failed != "":
		st.Phase, st.Reason, st.Message = corev1.PodFailed, "NodeError", pr.failed
	case pr.stopping:
		st.Phase = corev1.PodSucceeded
		if failed > 0 {
			st.Phase = corev1.PodFailed
		}
	case terminated == len(pr.ctrs) && pr.pod.Spec.RestartPolicy != corev1.RestartPolicyAlways:
		st.Phase = corev1.PodSucceeded
		if failed > 0 && pr.pod.Spec.RestartPolicy == corev1.RestartPolicyNever {
			st.Phase = corev1.PodFailed
		}
	case running > 0 || terminated > 0:
		st.Phase = corev1.PodRunning
	default:
		st.Phase = corev1.PodPending
	}
	cond := func(t corev1.PodConditionType, ok bool) corev1.PodCondition {
		s := corev1.ConditionFalse
		if ok {
			s = corev1.ConditionTrue
		}
		return corev1.PodCondition{Type: t, Status: s, LastTransitionTime: pr.started}
	}
	ready := allReady && initDone && pr.failed == "" && !pr.stopping
	st.Conditions = []corev1.PodCondition{
		cond(corev1.PodReadyToStartContainers, pr.sandbox != nil && pr.failed == ""),
		cond(corev1.PodInitialized, initDone),
		cond(corev1.ContainersReady, ready),
		cond(corev1.PodReady, ready),
		cond(corev1.PodScheduled, true),
	}
	pod.Status = st
	return pod
}

func ctrStatus(c *ctrRun) corev1.ContainerStatus {
	s := corev1.ContainerStatus{
		Name: c.spec.Name, Image: c.spec.Image, ImageID: "mrdc-image://" + imageName(c.spec.Image),
		Ready: c.ready && c.state == "running", RestartCount: c.restarts,
	}
	if c.id != "" {
		s.ContainerID = "mrdc://" + c.id
	}
	started := c.state == "running"
	s.Started = &started
	switch c.state {
	case "running":
		s.State.Running = &corev1.ContainerStateRunning{StartedAt: c.started}
		if c.lastTerm != nil && c.restarts > 0 {
			s.LastTerminationState.Terminated = c.lastTerm
		}
	case "terminated":
		s.State.Terminated = c.lastTerm
	default:
		s.State.Waiting = &corev1.ContainerStateWaiting{Reason: c.waitWhy, Message: c.waitMsg}
		if c.lastTerm != nil {
			s.LastTerminationState.Terminated = c.lastTerm
		}
	}
	return s
}

func (p *processProvider) findContainer(namespace, podName, container string) (*podRun, *ctrRun, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pr, ok := p.pods[podKey(namespace, podName)]
	if !ok {
		return nil, nil, notFound(namespace, podName)
	}
	for _, cs := range [][]*ctrRun{pr.ctrs, pr.init, pr.ephemeral} {
		for _, c := range cs {
			if c.spec.Name == container || (container == "" && !c.isInit) {
				return pr, c, nil
			}
		}
	}
	return nil, nil, fmt.Errorf("pod %s/%s has no container %q", namespace, podName, container)
}

func (p *processProvider) AttachToContainer(context.Context, string, string, string, api.AttachIO) error {
	return errors.New("attach is not supported by the mrdc process node; use exec")
}

func (p *processProvider) GetStatsSummary(context.Context) (*statsv1alpha1.Summary, error) {
	return &statsv1alpha1.Summary{Node: statsv1alpha1.NodeStats{NodeName: p.cfg.name, StartTime: metav1.Now()}}, nil
}

func (p *processProvider) GetMetricsResource(context.Context) ([]*dto.MetricFamily, error) {
	return nil, nil
}

func metaNow() metav1.Time { return metav1.Now() }
