package main

// Pod volumes materialised as plain directories under the pod's state dir; containers see them
// through bind mounts made inside their own mount namespaces (see containerinit.go).

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

func notFound(namespace, name string) error {
	return apierrors.NewNotFound(schema.GroupResource{Resource: "pods"}, namespace+"/"+name)
}

// prepareVolumes returns volume name -> host directory (or file, for hostPath files).
func (p *processProvider) prepareVolumes(ctx context.Context, pr *podRun) (map[string]string, error) {
	pod := pr.pod
	out := map[string]string{}
	for _, v := range pod.Spec.Volumes {
		dir := filepath.Join(pr.dir, "volumes", v.Name)
		var err error
		switch {
		case v.HostPath != nil:
			out[v.Name] = v.HostPath.Path
			if v.HostPath.Type != nil && *v.HostPath.Type == corev1.HostPathDirectoryOrCreate {
				err = os.MkdirAll(v.HostPath.Path, 0o755)
			}
			if err != nil {
				return nil, err
			}
			continue
		case v.EmptyDir != nil:
			err = os.MkdirAll(dir, 0o777)
		case v.ConfigMap != nil:
			err = p.writeConfigMap(ctx, pod.Namespace, dir, v.ConfigMap.Name, v.ConfigMap.Items, v.ConfigMap.Optional, v.ConfigMap.DefaultMode)
		case v.Secret != nil:
			err = p.writeSecret(ctx, pod.Namespace, dir, v.Secret.SecretName, v.Secret.Items, v.Secret.Optional, v.Secret.DefaultMode)
		case v.DownwardAPI != nil:
			err = p.writeDownward(pr, dir, v.DownwardAPI.Items, v.DownwardAPI.DefaultMode)
		case v.Projected != nil:
			err = p.writeProjected(ctx, pr, dir, v.Projected)
		default:
			err = fmt.Errorf("volume %q: only emptyDir, hostPath, configMap, secret, downwardAPI and projected are supported", v.Name)
		}
		if err != nil {
			return nil, fmt.Errorf("volume %q: %w", v.Name, err)
		}
		out[v.Name] = dir
	}
	return out, nil
}

func fileMode(item *int32, def *int32) os.FileMode {
	switch {
	case item != nil:
		return os.FileMode(*item)
	case def != nil:
		return os.FileMode(*def)
	}
	return 0o644
}

func writeFile(dir, rel string, data []byte, mode os.FileMode) error {
	if strings.Contains(rel, "..") || filepath.IsAbs(rel) {
		return fmt.Errorf("bad item path %q", rel)
	}
	path := filepath.Join(dir, rel)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(path, data, mode); err != nil {
		return err
	}
	return os.Chmod(path, mode) // WriteFile's mode is filtered by the umask
}

func writeKeys(dir string, data map[string][]byte, items []corev1.KeyToPath, def *int32) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if len(items) == 0 {
		for k, v := range data {
			if err := writeFile(dir, k, v, fileMode(nil, def)); err != nil {
				return err
			}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			return fmt.Errorf("key %q not found", it.Key)
		}
		if err := writeFile(dir, it.Path, v, fileMode(it.Mode, def)); err != nil {
			return err
		}
	}
	return nil
}

func (p *processProvider) configMapData(ctx context.Context, ns, name string, optional *bool) (map[string][]byte, error) {
	cm, err := p.client.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && optional != nil && *optional {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, err
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return data, nil
}

func (p *processProvider) secretData(ctx context.Context, ns, name string, optional *bool) (map[string][]byte, error) {
	s, err := p.client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) && optional != nil && *optional {
		return map[string][]byte{}, nil
	}
	if err != nil {
		return nil, err
	}
	return s.Data, nil
}

func (p *processProvider) writeConfigMap(ctx context.Context, ns, dir, name string, items []corev1.KeyToPath, optional *bool, def *int32) error {
	data, err := p.configMapData(ctx, ns, name, optional)
	if err != nil {
		return err
	}
	return writeKeys(dir, data, items, def)
}

func (p *processProvider) writeSecret(ctx context.Context, ns, dir, name string, items []corev1.KeyToPath, optional *bool, def *int32) error {
	data, err := p.secretData(ctx, ns, name, optional)
	if err != nil {
		return err
	}
	return writeKeys(dir, data, items, def)
}

func (p *processProvider) fieldValue(pr *podRun, path string) (string, error) {
	pod := pr.pod
	kv := func(m map[string]string) string {
		var b strings.Builder
		for k, v := range m {
			fmt.Fprintf(&b, "%s=%q\n", k, v)
		}
		return b.String()
	}
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "metadata.labels":
		return kv(pod.Labels), nil
	case "metadata.annotations":
		return kv(pod.Annotations), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP":
		return pr.ip, nil
	case "status.hostIP":
		return p.cfg.nodeIP, nil
	}
	return "", fmt.Errorf("downward API field %q is not supported", path)
}

func (p *processProvider) writeDownward(pr *podRun, dir string, items []corev1.DownwardAPIVolumeFile, def *int32) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, it := range items {
		if it.FieldRef == nil {
			return errors.New("downward API resourceFieldRef is not supported")
		}
		v, err := p.fieldValue(pr, it.FieldRef.FieldPath)
		if err != nil {
			return err
		}
		if err := writeFile(dir, it.Path, []byte(v), fileMode(it.Mode, def)); err != nil {
			return err
		}
	}
	return nil
}

// writeProjected covers the kube-api-access-* volume every pod gets: a bound service-account
// token (TokenRequest API), the cluster CA config map and the namespace from the downward API.
func (p *processProvider) writeProjected(ctx context.Context, pr *podRun, dir string, v *corev1.ProjectedVolumeSource) error {
	pod := pr.pod
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, src := range v.Sources {
		var err error
		switch {
		case src.ServiceAccountToken != nil:
			t := src.ServiceAccountToken
			spec := authv1.TokenRequestSpec{
				ExpirationSeconds: t.ExpirationSeconds,
				BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
			}
			if t.Audience != "" {
				spec.Audiences = []string{t.Audience}
			}
			sa := pod.Spec.ServiceAccountName
			if sa == "" {
				sa = "default"
			}
			var tr *authv1.TokenRequest
			tr, err = p.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, &authv1.TokenRequest{Spec: spec}, metav1.CreateOptions{})
			if err == nil {
				err = writeFile(dir, t.Path, []byte(tr.Status.Token), fileMode(nil, v.DefaultMode))
			}
		case src.ConfigMap != nil:
			var data map[string][]byte
			data, err = p.configMapData(ctx, pod.Namespace, src.ConfigMap.Name, src.ConfigMap.Optional)
			if err == nil {
				err = writeKeys(dir, data, src.ConfigMap.Items, v.DefaultMode)
			}
		case src.Secret != nil:
			var data map[string][]byte
			data, err = p.secretData(ctx, pod.Namespace, src.Secret.Name, src.Secret.Optional)
			if err == nil {
				err = writeKeys(dir, data, src.Secret.Items, v.DefaultMode)
			}
		case src.DownwardAPI != nil:
			err = p.writeDownward(pr, dir, src.DownwardAPI.Items, v.DefaultMode)
		default:
			err = errors.New("unsupported projected source")
		}
		if err != nil {
			return err
		}
	}
	return nil
}
