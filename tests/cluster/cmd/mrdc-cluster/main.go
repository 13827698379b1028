// Command mrdc-cluster is a multi-call binary holding every component of the test cluster, so that
// one link serves etcd, the control plane, kube-proxy, CoreDNS, kubectl and the node. It never
// touches the network namespace it is started in: the `up` script starts it inside mrdc-world.
//
// Dispatch is on argv[0] (so a symlink named kubectl works) or, failing that, on the first
// argument: `mrdc-cluster kubectl get pods`.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	_ "time/tzdata" // CronJob time zones, as upstream's binaries do.

	"github.com/coredns/coredns/coremain"
	"k8s.io/component-base/cli"
	"k8s.io/component-base/logs"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	kubectlcmd "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	proxy "k8s.io/kubernetes/cmd/kube-proxy/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

// commands maps a component name to its entry point; each returns the process exit code.
var commands = map[string]func() int{
	"etcd":                    runEtcd,
	"kube-apiserver":          func() int { return cli.Run(apiserver.NewAPIServerCommand()) },
	"kube-controller-manager": func() int { return cli.Run(controllermanager.NewControllerManagerCommand()) },
	"kube-scheduler":          func() int { return cli.Run(scheduler.NewSchedulerCommand()) },
	"kube-proxy":              func() int { return cli.Run(proxy.NewProxyCommand()) },
	"kubectl":                 runKubectl,
	"coredns":                 runCoreDNS,
	"node":                    runNode,
	"pki":                     runPKI,
	"container-init":          runContainerInit,
}

func runKubectl() int {
	// Same order as upstream's kubectl main: verbosity must be known before the command is built.
	_, _ = logs.GlogSetter(kubectlcmd.GetLogVerbosity(os.Args))
	command := kubectlcmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		kubectlutil.CheckErr(err) // prints and exits non-zero
	}
	return 0
}

func runCoreDNS() int {
	coremain.Run() // exits the process itself on fatal errors
	return 0
}

func main() {
	name := filepath.Base(os.Args[0])
	args := os.Args[1:]
	if _, ok := commands[name]; !ok {
		if len(args) == 0 {
			usage()
			os.Exit(2)
		}
		name, args = args[0], args[1:]
	}
	run, ok := commands[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "mrdc-cluster: unknown component %q\n", name)
		usage()
		os.Exit(2)
	}
	// Every component parses os.Args itself (cobra, flag): present it as if it were argv[0].
	os.Args = append([]string{name}, args...)
	os.Exit(run())
}

func usage() {
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintf(os.Stderr, "usage: mrdc-cluster COMPONENT [ARGS...]\ncomponents: %v\n", names)
}
