package main

// Container environment as the kubelet builds it: service links, then envFrom, then env (later
// wins), with $(VAR) references expanded against what is defined so far. Done here rather than
// by virtual-kubelet because its resolver runs before the pod has an IP and rejects
// status.podIP references.

import (
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/kubernetes/pkg/kubelet/envvars"
	"k8s.io/kubernetes/third_party/forked/golang/expansion"
)

func (p *processProvider) resolveEnv(ctx context.Context, pr *podRun, c corev1.Container) (map[string]string, error) {
	pod := pr.pod
	env := map[string]string{}
	svcs, err := p.serviceEnv(ctx, pod)
	if err != nil {
		return nil, err
	}
	for _, e := range svcs {
		env[e.Name] = e.Value
	}
	for _, from := range c.EnvFrom {
		var data map[string][]byte
		switch {
		case from.ConfigMapRef != nil:
			data, err = p.configMapData(ctx, pod.Namespace, from.ConfigMapRef.Name, from.ConfigMapRef.Optional)
		case from.SecretRef != nil:
			data, err = p.secretData(ctx, pod.Namespace, from.SecretRef.Name, from.SecretRef.Optional)
		}
		if err != nil {
			return nil, fmt.Errorf("envFrom: %w", err)
		}
		for k, v := range data {
			env[from.Prefix+k] = string(v)
		}
	}
	mapping := expansion.MappingFuncFor(env)
	for _, e := range c.Env {
		v := expansion.Expand(e.Value, mapping)
		if src := e.ValueFrom; src != nil {
			v, err = p.envValueFrom(ctx, pr, c, src)
			if err != nil {
				return nil, fmt.Errorf("env %s: %w", e.Name, err)
			}
		}
		env[e.Name] = v
	}
	return env, nil
}

func (p *processProvider) envValueFrom(ctx context.Context, pr *podRun, c corev1.Container, src *corev1.EnvVarSource) (string, error) {
	ns := pr.pod.Namespace
	pick := func(data map[string][]byte, key string, optional *bool) (string, error) {
		v, ok := data[key]
		if !ok && !(optional != nil && *optional) {
			return "", fmt.Errorf("key %q not found", key)
		}
		return string(v), nil
	}
	switch {
	case src.FieldRef != nil:
		path := src.FieldRef.FieldPath
		for _, prefix := range []string{"metadata.labels", "metadata.annotations"} {
			if strings.HasPrefix(path, prefix+"['") && strings.HasSuffix(path, "']") {
				key := path[len(prefix)+2 : len(path)-2]
				if prefix == "metadata.labels" {
					return pr.pod.Labels[key], nil
				}
				return pr.pod.Annotations[key], nil
			}
		}
		switch path {
		case "status.podIPs":
			path = "status.podIP"
		case "status.hostIPs":
			path = "status.hostIP"
		}
		return p.fieldValue(pr, path)
	case src.ConfigMapKeyRef != nil:
		r := src.ConfigMapKeyRef
		data, err := p.configMapData(ctx, ns, r.Name, r.Optional)
		if err != nil {
			return "", err
		}
		return pick(data, r.Key, r.Optional)
	case src.SecretKeyRef != nil:
		r := src.SecretKeyRef
		data, err := p.secretData(ctx, ns, r.Name, r.Optional)
		if err != nil {
			return "", err
		}
		return pick(data, r.Key, r.Optional)
	case src.ResourceFieldRef != nil:
		// No resource enforcement here: report the container's limit, else the node's capacity.
		name := corev1.ResourceName(strings.TrimPrefix(src.ResourceFieldRef.Resource, "limits."))
		if q, ok := c.Resources.Limits[name]; ok {
			return q.String(), nil
		}
		if name == corev1.ResourceCPU {
			return "8", nil
		}
		return "17179869184", nil
	}
	return "", fmt.Errorf("unsupported valueFrom")
}

// serviceEnv returns the docker-link style variables: always those of default/kubernetes, and
// those of the pod's namespace when enableServiceLinks is on (the default).
func (p *processProvider) serviceEnv(ctx context.Context, pod *corev1.Pod) ([]corev1.EnvVar, error) {
	var svcs []*corev1.Service
	master, err := p.client.CoreV1().Services(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("service default/kubernetes: %w", err)
	}
	byName := map[string]*corev1.Service{}
	if pod.Spec.EnableServiceLinks == nil || *pod.Spec.EnableServiceLinks {
		list, err := p.client.CoreV1().Services(pod.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, err
		}
		for i := range list.Items {
			s := &list.Items[i]
			if s.Spec.ClusterIP != "" && s.Spec.ClusterIP != corev1.ClusterIPNone {
				byName[s.Name] = s
			}
		}
	}
	byName["kubernetes"] = master
	for _, s := range byName {
		svcs = append(svcs, s)
	}
	return envvars.FromServices(svcs), nil
}
