//! A cluster that does not answer fails `connect` within its timeout, with one line naming the
//! server. Only loopback is used.

use std::time::{Duration, Instant};

use mirrord_kube::Cluster;

fn kubeconfig_for(server: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: k\n  cluster:\n    server: {server}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n    namespace: shop\n"
    );
    std::fs::write(&path, text).expect("write the kubeconfig");
    path
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mirrord-kube-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[tokio::test]
async fn a_silent_server_fails_within_the_timeout() {
    // Accepts connections and never says anything.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let dir = temp_dir("silent");
    let path = kubeconfig_for(&format!("https://{addr}"), &dir);
    let started = Instant::now();
    let err = Cluster::connect(Some(&path), None)
        .await
        .err()
        .expect("no answer, no cluster");
    let line = err.to_string();
    println!("after {:?}: {line}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        line.starts_with(&format!("cannot reach the cluster at https://{addr}/: ")),
        "{line}"
    );
    assert!(!line.contains('\n'));
    silent.abort();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_refused_connection_fails_at_once() {
    // Bound and dropped: nothing listens on that port any more.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let dir = temp_dir("refused");
    let path = kubeconfig_for(&format!("https://{addr}"), &dir);
    let started = Instant::now();
    let err = Cluster::connect(Some(&path), None)
        .await
        .err()
        .expect("refused");
    println!("after {:?}: {err}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains(&addr.to_string()));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_missing_kubeconfig_is_named() {
    let err = Cluster::connect(Some(std::path::Path::new("/nonexistent/kubeconfig")), None)
        .await
        .err()
        .expect("no file");
    let line = err.to_string();
    assert!(
        line.starts_with("cannot load the kubeconfig: /nonexistent/kubeconfig"),
        "{line}"
    );
}
