package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Addresses of the cluster world; the `up` script builds the same topology.
const (
	worldAPIServerIP = "10.250.0.1" // apiserver address seen from the node and pods
	nodeIP           = "10.250.0.2"
	serviceAPIIP     = "10.96.0.1" // first address of the service range
)

// identity is one client certificate and the kubeconfig that carries it.
type identity struct {
	file   string // base name of cert, key and kubeconfig
	cn     string
	org    []string
	server string
}

var identities = []identity{
	{"admin", "kubernetes-admin", []string{"system:masters"}, "https://127.0.0.1:6443"},
	{"restricted", "restricted-user", nil, "https://127.0.0.1:6443"},
	{"controller-manager", "system:kube-controller-manager", nil, "https://127.0.0.1:6443"},
	{"scheduler", "system:kube-scheduler", nil, "https://127.0.0.1:6443"},
	{"kube-proxy", "system:kube-proxy", nil, "https://" + worldAPIServerIP + ":6443"},
	{"node", "system:node:mrdc-node", []string{"system:nodes"}, "https://" + worldAPIServerIP + ":6443"},
	{"apiserver-kubelet-client", "kube-apiserver-kubelet-client", []string{"system:masters"}, ""},
}

// runPKI writes the CA, serving certs, the service-account key pair and one kubeconfig per
// identity into DIR: `pki DIR`. Existing files are kept, so a second `up` reuses them.
func runPKI() int {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: pki DIR")
		return 2
	}
	if err := writePKI(os.Args[1]); err != nil {
		fmt.Fprintf(os.Stderr, "pki: %v\n", err)
		return 1
	}
	return 0
}

func writePKI(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, "admin.kubeconfig")); err == nil {
		return nil
	}
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "mrdc-cluster-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return err
	}
	if err := writePEM(dir, "ca.crt", "CERTIFICATE", caDER); err != nil {
		return err
	}
	if err := writePEM(dir, "ca.key", "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(caKey)); err != nil {
		return err
	}
	serial := int64(2)
	issue := func(name, cn string, org []string, server bool, dns []string, ips []string) error {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: cn, Organization: org},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(365 * 24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			DNSNames:     dns,
		}
		serial++
		if server {
			tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
		}
		for _, ip := range ips {
			tmpl.IPAddresses = append(tmpl.IPAddresses, net.ParseIP(ip))
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return err
		}
		if err := writePEM(dir, name+".crt", "CERTIFICATE", der); err != nil {
			return err
		}
		return writePEM(dir, name+".key", "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(key))
	}
	if err := issue("apiserver", "kube-apiserver", nil, true,
		[]string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"},
		[]string{"127.0.0.1", worldAPIServerIP, serviceAPIIP}); err != nil {
		return err
	}
	if err := issue("node-serving", "mrdc-node", nil, true, []string{"mrdc-node"}, []string{nodeIP}); err != nil {
		return err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	if err := writePEM(dir, "sa.key", "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(saKey)); err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	if err := writePEM(dir, "sa.pub", "PUBLIC KEY", pub); err != nil {
		return err
	}
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	// The admin kubeconfig is written last: its presence marks a complete PKI directory.
	for i := len(identities) - 1; i >= 0; i-- {
		id := identities[i]
		if err := issue(id.file, id.cn, id.org, false, nil, nil); err != nil {
			return err
		}
		if id.server == "" {
			continue
		}
		if err := writeKubeconfig(dir, id, caPEM); err != nil {
			return err
		}
	}
	return nil
}

func writeKubeconfig(dir string, id identity, caPEM []byte) error {
	crt, err := os.ReadFile(filepath.Join(dir, id.file+".crt"))
	if err != nil {
		return err
	}
	key, err := os.ReadFile(filepath.Join(dir, id.file+".key"))
	if err != nil {
		return err
	}
	b64 := base64.StdEncoding.EncodeToString
	cfg := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: mrdc
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: mrdc
  context:
    cluster: mrdc
    user: %s
    namespace: default
current-context: mrdc
`, id.server, b64(caPEM), id.cn, b64(crt), b64(key), id.cn)
	return os.WriteFile(filepath.Join(dir, id.file+".kubeconfig"), []byte(cfg), 0o600)
}

func writePEM(dir, name, typ string, der []byte) error {
	if der == nil {
		return errors.New("empty DER for " + name)
	}
	return os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600)
}
