package main

// container-init: the in-namespace half of the process runtime. `sandbox HOSTNAME` holds a pod's
// namespaces; `run SPEC.json` is started by the node in a fresh mount namespace (already inside
// the pod's network/UTS/IPC namespaces via nsenter), binds the volumes and execs the container
// command. It must never let a mount propagate to the host: the first thing it does is make its
// mount tree private.

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

type mountSpec struct {
	Src string `json:"src"`
	Dst string `json:"dst"`
	RO  bool   `json:"ro"`
}

type containerSpec struct {
	Argv    []string    `json:"argv"`
	Env     []string    `json:"env"`
	WorkDir string      `json:"workDir"`
	Mounts  []mountSpec `json:"mounts"`
	// Privileged keeps every capability; otherwise only Capabilities (names without CAP_) stay.
	Privileged   bool     `json:"privileged"`
	Capabilities []string `json:"capabilities"`
}

// capabilityNumbers names the capabilities a securityContext may add or drop.
var capabilityNumbers = map[string]int{
	"CHOWN": unix.CAP_CHOWN, "DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE, "DAC_READ_SEARCH": unix.CAP_DAC_READ_SEARCH,
	"FOWNER": unix.CAP_FOWNER, "FSETID": unix.CAP_FSETID, "KILL": unix.CAP_KILL, "SETGID": unix.CAP_SETGID,
	"SETUID": unix.CAP_SETUID, "SETPCAP": unix.CAP_SETPCAP, "LINUX_IMMUTABLE": unix.CAP_LINUX_IMMUTABLE,
	"NET_BIND_SERVICE": unix.CAP_NET_BIND_SERVICE, "NET_BROADCAST": unix.CAP_NET_BROADCAST,
	"NET_ADMIN": unix.CAP_NET_ADMIN, "NET_RAW": unix.CAP_NET_RAW, "IPC_LOCK": unix.CAP_IPC_LOCK,
	"IPC_OWNER": unix.CAP_IPC_OWNER, "SYS_MODULE": unix.CAP_SYS_MODULE, "SYS_RAWIO": unix.CAP_SYS_RAWIO,
	"SYS_CHROOT": unix.CAP_SYS_CHROOT, "SYS_PTRACE": unix.CAP_SYS_PTRACE, "SYS_PACCT": unix.CAP_SYS_PACCT,
	"SYS_ADMIN": unix.CAP_SYS_ADMIN, "SYS_BOOT": unix.CAP_SYS_BOOT, "SYS_NICE": unix.CAP_SYS_NICE,
	"SYS_RESOURCE": unix.CAP_SYS_RESOURCE, "SYS_TIME": unix.CAP_SYS_TIME, "SYS_TTY_CONFIG": unix.CAP_SYS_TTY_CONFIG,
	"MKNOD": unix.CAP_MKNOD, "LEASE": unix.CAP_LEASE, "AUDIT_WRITE": unix.CAP_AUDIT_WRITE,
	"AUDIT_CONTROL": unix.CAP_AUDIT_CONTROL, "SETFCAP": unix.CAP_SETFCAP, "MAC_OVERRIDE": unix.CAP_MAC_OVERRIDE,
	"MAC_ADMIN": unix.CAP_MAC_ADMIN, "SYSLOG": unix.CAP_SYSLOG, "WAKE_ALARM": unix.CAP_WAKE_ALARM,
	"BLOCK_SUSPEND": unix.CAP_BLOCK_SUSPEND, "AUDIT_READ": unix.CAP_AUDIT_READ, "PERFMON": unix.CAP_PERFMON,
	"BPF": unix.CAP_BPF, "CHECKPOINT_RESTORE": unix.CAP_CHECKPOINT_RESTORE,
}

// keepOnly drops every capability not in keep from the bounding set, so that the command, exec'd
// as root, holds only those (its permitted set after exec is the bounding set), and clears the
// ambient set.
func keepOnly(keep []string) error {
	kept := map[int]bool{}
	for _, name := range keep {
		n, ok := capabilityNumbers[name]
		if !ok {
			return fmt.Errorf("unknown capability %q", name)
		}
		kept[n] = true
	}
	for n := 0; n <= unix.CAP_LAST_CAP; n++ {
		if kept[n] {
			continue
		}
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(n), 0, 0, 0); err != nil && err != unix.EINVAL {
			return fmt.Errorf("drop capability %d: %w", n, err)
		}
	}
	return unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
}

func runContainerInit() int {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: container-init sandbox HOSTNAME | container-init run SPEC.json")
		return 2
	}
	var err error
	switch os.Args[1] {
	case "sandbox":
		err = sandbox(os.Args[2])
	case "run":
		err = runContainer(os.Args[2])
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "container-init: %v\n", err)
		return 1
	}
	return 0
}

func sandbox(hostname string) error {
	if err := unix.Sethostname([]byte(hostname)); err != nil {
		return fmt.Errorf("sethostname: %w", err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	if _, err := os.Stdout.Write([]byte("ok\n")); err != nil {
		return err
	}
	<-sig
	return nil
}

// realPath resolves symlinks in the existing prefix of p (/var/run -> /run) and keeps the rest.
func realPath(p string) string {
	p = filepath.Clean(p)
	rest := ""
	for cur := p; ; cur = filepath.Dir(cur) {
		if r, err := filepath.EvalSymlinks(cur); err == nil {
			return filepath.Join(r, rest)
		}
		if cur == "/" {
			return p
		}
		rest = filepath.Join(filepath.Base(cur), rest)
	}
}

func runContainer(specPath string) error {
	raw, err := os.ReadFile(specPath)
	if err != nil {
		return err
	}
	var spec containerSpec
	if err := json.Unmarshal(raw, &spec); err != nil {
		return err
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make / private: %w", err)
	}
	// Open every source first: a tmpfs over /run below must not hide one.
	type bind struct {
		fd  int
		dst string
		ro  bool
		dir bool
	}
	var binds []bind
	needRun := false
	for _, m := range spec.Mounts {
		fd, err := unix.Open(m.Src, unix.O_PATH|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("mount source %s: %w", m.Src, err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return err
		}
		dst := realPath(m.Dst)
		if dst == "/run" || strings.HasPrefix(dst, "/run/") {
			needRun = true
		}
		binds = append(binds, bind{fd, dst, m.RO, st.Mode&unix.S_IFMT == unix.S_IFDIR})
	}
	if needRun {
		// Images bring their own /run; here a private tmpfs keeps mount points such as
		// /run/secrets/kubernetes.io/serviceaccount off the host's file system.
		if err := unix.Mount("tmpfs", "/run", "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=755"); err != nil {
			return fmt.Errorf("tmpfs /run: %w", err)
		}
	}
	sort.SliceStable(binds, func(i, j int) bool { return len(binds[i].dst) < len(binds[j].dst) })
	for _, b := range binds {
		if err := mountPoint(b.dst, b.dir); err != nil {
			return err
		}
		src := fmt.Sprintf("/proc/self/fd/%d", b.fd)
		if err := unix.Mount(src, b.dst, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s: %w", b.dst, err)
		}
		if b.ro {
			if err := unix.Mount("", b.dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
				return fmt.Errorf("read-only %s: %w", b.dst, err)
			}
		}
		_ = unix.Close(b.fd)
	}
	wd := spec.WorkDir
	if wd == "" {
		wd = "/"
	}
	if err := os.Chdir(wd); err != nil {
		return fmt.Errorf("workingDir: %w", err)
	}
	for _, e := range spec.Env {
		if k, v, ok := strings.Cut(e, "="); ok && k == "PATH" {
			if err := os.Setenv("PATH", v); err != nil {
				return err
			}
		}
	}
	if len(spec.Argv) == 0 {
		return errors.New("empty command")
	}
	bin, err := exec.LookPath(spec.Argv[0])
	if err != nil {
		return err
	}
	if !spec.Privileged {
		if err := keepOnly(spec.Capabilities); err != nil {
			return err
		}
	}
	return syscall.Exec(bin, spec.Argv, spec.Env)
}

// mountPoint makes sure dst exists with the right type. Directories missing on the host are
// created and logged to MRDC_CREATED_PATHS (tests/cluster/down removes them when empty).
func mountPoint(dst string, dir bool) error {
	if _, err := os.Stat(dst); err == nil {
		return nil
	}
	parent := dst
	if !dir {
		parent = filepath.Dir(dst)
	}
	var missing []string
	for cur := parent; ; cur = filepath.Dir(cur) {
		if _, err := os.Stat(cur); err == nil || cur == "/" {
			break
		}
		missing = append(missing, cur)
	}
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return err
	}
	if log := os.Getenv("MRDC_CREATED_PATHS"); log != "" && len(missing) > 0 && !strings.HasPrefix(parent, "/run/") {
		if f, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644); err == nil {
			for _, m := range missing { // deepest first, the order down removes them in
				fmt.Fprintln(f, m)
			}
			_ = f.Close()
		}
	}
	if !dir {
		f, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		return f.Close()
	}
	return nil
}
