package main

// Kubelet-API backends for the process node: exec (nsenter into a container's namespaces and
// cgroup), port-forward (a TCP dial to the pod address from the node netns), logs and readiness
// probes. Nothing here opens a connection outside the node and pod network namespaces.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func (p *processProvider) containerPID(namespace, podName, container string) (*podRun, *ctrRun, int, error) {
	pr, c, err := p.findContainer(namespace, podName, container)
	if err != nil {
		return nil, nil, 0, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c.state != "running" {
		return nil, nil, 0, fmt.Errorf("container %s is not running", c.spec.Name)
	}
	return pr, c, c.pid, nil
}

// execCommand builds a command running argv inside the container's namespaces and cgroup.
func (p *processProvider) execCommand(c *ctrRun, pid int, argv []string) (*exec.Cmd, *os.File, error) {
	wd := c.workDir
	if wd == "" {
		wd = "/"
	}
	args := []string{"-t", strconv.Itoa(pid), "-n", "-u", "-i", "-m", "--wd=" + wd, "--"}
	cmd := exec.Command("nsenter", append(args, argv...)...)
	cmd.Env = c.env
	cg, err := os.Open(c.cgroup)
	if err != nil {
		return nil, nil, err
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(cg.Fd())}
	return cmd, cg, nil
}

func (p *processProvider) RunInContainer(ctx context.Context, namespace, podName, container string, argv []string, attach api.AttachIO) error {
	_, c, pid, err := p.containerPID(namespace, podName, container)
	if err != nil {
		return err
	}
	cmd, cg, err := p.execCommand(c, pid, argv)
	if err != nil {
		return err
	}
	defer cg.Close()
	if attach.TTY() {
		cmd.SysProcAttr.Setsid = true
		cmd.SysProcAttr.Setctty = true
		tty, err := pty.StartWithAttrs(cmd, nil, cmd.SysProcAttr)
		if err != nil {
			return err
		}
		defer tty.Close()
		go func() {
			for size := range attach.Resize() {
				_ = pty.Setsize(tty, &pty.Winsize{Rows: size.Height, Cols: size.Width})
			}
		}()
		if in := attach.Stdin(); in != nil {
			go func() { _, _ = io.Copy(tty, in) }()
		}
		drained := make(chan struct{})
		if out := attach.Stdout(); out != nil {
			// The copy ends when every holder of the terminal's other side has exited (EIO).
			go func() { _, _ = io.Copy(out, tty); close(drained) }()
		} else {
			close(drained)
		}
		err = waitExec(ctx, cmd)
		select { // the output written just before exit is still in the terminal: deliver it first
		case <-drained:
		case <-ctx.Done():
		}
		return err
	}
	var wg sync.WaitGroup
	if in := attach.Stdin(); in != nil {
		w, err := cmd.StdinPipe()
		if err != nil {
			return err
		}
		go func() { _, _ = io.Copy(w, in); _ = w.Close() }()
	}
	pipe := func(dst io.WriteCloser, get func() (io.ReadCloser, error)) error {
		if dst == nil {
			return nil
		}
		r, err := get()
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() { defer wg.Done(); _, _ = io.Copy(dst, r) }()
		return nil
	}
	if err := pipe(attach.Stdout(), cmd.StdoutPipe); err != nil {
		return err
	}
	if err := pipe(attach.Stderr(), cmd.StderrPipe); err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	wg.Wait() // all output drained before Wait closes the pipes
	return waitExec(ctx, cmd)
}

// waitExec waits for the exec'd process; a non-zero exit is returned as an exit-code error, which
// virtual-kubelet reports to kubectl as the command's exit status.
func waitExec(ctx context.Context, cmd *exec.Cmd) error {
	if cmd.Process == nil {
		if err := cmd.Start(); err != nil {
			return err
		}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return exitCodeError{code: ee.ExitCode()}
		}
		return err
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		<-done
		return ctx.Err()
	}
}

// exitCodeError satisfies k8s.io/client-go/util/exec.ExitError, which the streaming server turns
// into the exit status kubectl exec returns.
type exitCodeError struct{ code int }

func (e exitCodeError) Error() string {
	return fmt.Sprintf("command terminated with exit code %d", e.code)
}
func (e exitCodeError) String() string  { return e.Error() }
func (e exitCodeError) Exited() bool    { return true }
func (e exitCodeError) ExitStatus() int { return e.code }

func (p *processProvider) PortForward(ctx context.Context, namespace, podName string, port int32, stream io.ReadWriteCloser) error {
	p.mu.Lock()
	pr, ok := p.pods[podKey(namespace, podName)]
	ip := ""
	if ok {
		ip = pr.ip
	}
	p.mu.Unlock()
	if !ok || ip == "" {
		return notFound(namespace, podName)
	}
	defer stream.Close()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(int(port))))
	if err != nil {
		return err
	}
	defer conn.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(conn, stream); done <- struct{}{} }()
	go func() { _, _ = io.Copy(stream, conn); done <- struct{}{} }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	return nil
}

func (p *processProvider) GetContainerLogs(ctx context.Context, namespace, podName, container string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	_, c, err := p.findContainer(namespace, podName, container)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	path := c.logPath
	p.mu.Unlock()
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	if opts.Tail > 0 {
		if err := seekTail(f, opts.Tail); err != nil {
			f.Close()
			return nil, err
		}
	}
	if !opts.Follow {
		return f, nil
	}
	r, w := io.Pipe()
	go func() {
		defer f.Close()
		buf := make([]byte, 32*1024)
		for {
			n, err := f.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err == io.EOF {
				select {
				case <-ctx.Done():
					_ = w.Close()
					return
				case <-time.After(200 * time.Millisecond):
				}
				continue
			}
			if err != nil {
				_ = w.CloseWithError(err)
				return
			}
		}
	}()
	return r, nil
}

// seekTail positions f at the start of its last n lines.
func seekTail(f *os.File, n int) error {
	var offsets []int64
	var off int64
	sc := bufio.NewReader(f)
	for {
		line, err := sc.ReadBytes('\n')
		if len(line) > 0 {
			offsets = append(offsets, off)
			off += int64(len(line))
		}
		if err != nil {
			break
		}
	}
	start := int64(0)
	if len(offsets) > n {
		start = offsets[len(offsets)-n]
	}
	_, err := f.Seek(start, io.SeekStart)
	return err
}

// probeClient never uses a proxy from the environment: probes stay inside the cluster world.
var probeClient = &http.Client{Transport: &http.Transport{Proxy: nil, DisableKeepAlives: true}}

// probeLoop runs c's readiness probe (httpGet, tcpSocket or exec) from the node netns and marks
// the container ready after successThreshold successes, unready after failureThreshold failures.
func (p *processProvider) probeLoop(ctx context.Context, pr *podRun, c *ctrRun) {
	pb := c.spec.ReadinessProbe
	period := time.Duration(max(pb.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(pb.TimeoutSeconds, 1)) * time.Second
	p.mu.Lock()
	exited := c.exited
	p.mu.Unlock()
	select {
	case <-time.After(time.Duration(pb.InitialDelaySeconds) * time.Second):
	case <-exited:
		return
	case <-ctx.Done():
		return
	}
	okRun, failRun := int32(0), int32(0)
	for {
		err := p.probeOnce(ctx, pr, c, pb, timeout)
		p.mu.Lock()
		before := c.ready
		if err == nil {
			okRun, failRun = okRun+1, 0
			if okRun >= max(pb.SuccessThreshold, 1) {
				c.ready = true
			}
		} else {
			okRun, failRun = 0, failRun+1
			if failRun >= max(pb.FailureThreshold, 1) {
				c.ready = false
			}
		}
		after := c.ready
		p.mu.Unlock()
		if before != after {
			p.changed(pr)
		}
		select {
		case <-time.After(period):
		case <-exited:
			return
		case <-ctx.Done():
			return
		}
	}
}

func (p *processProvider) resolvePort(c *ctrRun, port intstr.IntOrString) (int, error) {
	if port.Type == intstr.Int {
		return port.IntValue(), nil
	}
	for _, cp := range c.spec.Ports {
		if cp.Name == port.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("no container port named %q", port.StrVal)
}

func (p *processProvider) probeOnce(ctx context.Context, pr *podRun, c *ctrRun, pb *corev1.Probe, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	p.mu.Lock()
	ip, pid := pr.ip, c.pid
	p.mu.Unlock()
	switch {
	case pb.HTTPGet != nil:
		port, err := p.resolvePort(c, pb.HTTPGet.Port)
		if err != nil {
			return err
		}
		host := ip
		if pb.HTTPGet.Host != "" {
			host = pb.HTTPGet.Host
		}
		scheme := "http"
		if pb.HTTPGet.Scheme == corev1.URISchemeHTTPS {
			scheme = "https"
		}
		url := fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), pb.HTTPGet.Path)
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := probeClient.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return nil
	case pb.TCPSocket != nil:
		port, err := p.resolvePort(c, pb.TCPSocket.Port)
		if err != nil {
			return err
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case pb.Exec != nil:
		cmd, cg, err := p.execCommand(c, pid, pb.Exec.Command)
		if err != nil {
			return err
		}
		defer cg.Close()
		return waitExec(ctx, cmd)
	}
	return errors.New("probe has no handler")
}
