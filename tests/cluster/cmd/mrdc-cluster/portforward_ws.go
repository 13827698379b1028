package main

// Websocket port-forward on the node's kubelet API, as the kubelet serves it: the ports come
// from the request's `port` query values, and each port gets a data and an error channel whose first
// two bytes are the port number (little endian), in the v4.channel.k8s.io framing.
//
// virtual-kubelet v1.14.1 hands its websocket port-forward an empty port list
// (node/api/portforward.go passes &V4Options{}), so a client that reaches the node through the
// apiserver's websocket upgrade (v4/v5.channel.k8s.io, e.g. kube-rs) saw its connection closed
// at once. SPDY requests (kubectl, through the apiserver's translation) still go to
// virtual-kubelet unchanged.

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/util/httpstream/wsstream"
	"k8s.io/klog/v2"
)

const v4ChannelProtocol = "v4.channel.k8s.io"

// websocketPortForward serves websocket requests to /portForward/NAMESPACE/POD itself and
// passes everything else to next. provider returns the node's provider (nil before it exists).
func websocketPortForward(next http.Handler, provider func() *processProvider, idle time.Duration) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		parts := strings.Split(strings.Trim(req.URL.Path, "/"), "/")
		if len(parts) != 3 || parts[0] != "portForward" || !wsstream.IsWebSocketRequest(req) {
			next.ServeHTTP(w, req)
			return
		}
		p := provider()
		if p == nil {
			http.Error(w, "node provider not started", http.StatusServiceUnavailable)
			return
		}
		namespace, pod := parts[1], parts[2]
		var ports []uint16
		// The apiserver passes a client's `ports` on to the node as `port` values.
		query := req.URL.Query()
		for _, list := range append(query["port"], query["ports"]...) {
			for _, text := range strings.Split(list, ",") {
				n, err := strconv.ParseUint(strings.TrimSpace(text), 10, 16)
				if err != nil || n == 0 {
					http.Error(w, fmt.Sprintf("invalid port %q", text), http.StatusBadRequest)
					return
				}
				ports = append(ports, uint16(n))
			}
		}
		if len(ports) == 0 {
			http.Error(w, "no ports given", http.StatusBadRequest)
			return
		}
		channels := make([]wsstream.ChannelType, 0, 2*len(ports))
		for range ports {
			channels = append(channels, wsstream.ReadWriteChannel, wsstream.WriteChannel)
		}
		binary := wsstream.ChannelProtocolConfig{Binary: true, Channels: channels}
		conn := wsstream.NewConn(map[string]wsstream.ChannelProtocolConfig{
			"":                binary,
			v4ChannelProtocol: binary,
		})
		conn.SetIdleTimeout(idle)
		_, streams, err := conn.Open(w, req)
		if err != nil {
			klog.ErrorS(err, "websocket port-forward upgrade", "pod", namespace+"/"+pod)
			return
		}
		defer conn.Close()
		var wg sync.WaitGroup
		for i, port := range ports {
			data, errs := streams[2*i], streams[2*i+1]
			prefix := []byte{byte(port), byte(port >> 8)}
			_, _ = data.Write(prefix)
			_, _ = errs.Write(prefix)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer errs.Close()
				defer data.Close()
				if err := p.PortForward(req.Context(), namespace, pod, int32(port), data); err != nil {
					_, _ = fmt.Fprintf(errs, "error forwarding port %d to pod %s/%s: %v", port, namespace, pod, err)
				}
			}()
		}
		wg.Wait()
	})
}
