package main

import (
	"fmt"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
)

// runEtcd serves a single-member etcd on loopback only: `etcd DATA_DIR`.
func runEtcd() int {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: etcd DATA_DIR")
		return 2
	}
	client, _ := url.Parse("http://127.0.0.1:2379") // constant, cannot fail
	peer, _ := url.Parse("http://127.0.0.1:2380")   // constant, cannot fail
	cfg := embed.NewConfig()
	cfg.Name = "mrdc"
	cfg.Dir = os.Args[1]
	cfg.ListenClientUrls = []url.URL{*client}
	cfg.AdvertiseClientUrls = []url.URL{*client}
	cfg.ListenPeerUrls = []url.URL{*peer}
	cfg.AdvertisePeerUrls = []url.URL{*peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		fmt.Fprintf(os.Stderr, "etcd: start: %v\n", err)
		return 1
	}
	defer e.Close()
	<-e.Server.ReadyNotify()
	fmt.Fprintln(os.Stderr, "etcd: ready on 127.0.0.1:2379")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case err := <-e.Err():
		fmt.Fprintf(os.Stderr, "etcd: %v\n", err)
		return 1
	case <-sig:
		return 0
	}
}
