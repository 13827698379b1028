//! The agent's TCP streams, driven through the CLI's session client against a hand-started
//! agent: connections are made from the pod's network namespace (the cluster is unreachable
//! from anywhere else), large transfers arrive intact, a stream whose reader stalls does not
//! hold up another one, and a refused connection comes back as ECONNREFUSED.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use libtest_mimic::Failed;
use mirrord_cli::client::{AgentClient, ClientError};
use mirrord_tests::command::SHORT;
use mirrord_tests::{Cluster, HandStartedAgent, Scene};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::standard_pod;

const TOKEN: &str = "stream-test-token";
/// Large enough to need many credit round trips (a window is at most 512 KiB).
const BIG_LEN: usize = 8 * 1024 * 1024;

pub fn agent_streams_reach_the_cluster_through_the_pod(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let server = cluster.serve_http(&[("small.txt", "a small file\n")])?;
    let big: Vec<u8> = (0..BIG_LEN).map(|i| (i * 7 + i / 4093) as u8).collect();
    std::fs::write(server.dir().join("big.bin"), &big)?;

    let mut cmd = scene.agent()?;
    cmd.args(["--target-pid", &pod.pid().to_string()])
        .env("MIRRORD_AGENT_TOKEN", TOKEN);
    let agent = HandStartedAgent::start(cmd, SHORT)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        let client =
            Arc::new(AgentClient::connect(&agent.addr().parse()?, TOKEN.as_bytes()).await?);

        let body = http_get(&client, server.addr(), "/big.bin").await?;
        if body != big {
            return Err(Failed::from(format!(
                "big.bin arrived with {} bytes, different from the {BIG_LEN} served",
                body.len()
            )));
        }

        // A reader that never reads: the agent may only send this stream one window.
        let stalled = client.connect_tcp(server.addr()).await?;
        let (mut stalled_app, stalled_net) = tokio::io::duplex(16 * 1024);
        let stalled_pipe = {
            let client = client.clone();
            tokio::spawn(async move { client.pipe(stalled_net, stalled).await })
        };
        stalled_app
            .write_all(b"GET /big.bin HTTP/1.0\r\n\r\n")
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let small = tokio::time::timeout(
            Duration::from_secs(10),
            http_get(&client, server.addr(), "/small.txt"),
        )
        .await
        .map_err(|_| "a second stream stalled behind the first")??;
        if small != b"a small file\n" {
            return Err(Failed::from(format!(
                "small.txt: {:?}",
                String::from_utf8_lossy(&small)
            )));
        }
        drop(stalled_app);
        stalled_pipe.await?;

        let closed_port = SocketAddr::new(server.addr().ip(), 1);
        match client.connect_tcp(closed_port).await {
            Err(ClientError::Remote(error)) if error.errno == libc::ECONNREFUSED => Ok(()),
            Err(other) => Err(Failed::from(format!("connect to a closed port: {other}"))),
            Ok(_) => Err(Failed::from("connect to a closed port succeeded")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome.map_err(|error| {
        Failed::from(format!(
            "{}\nagent stderr: {}",
            error.message().unwrap_or_default(),
            agent.stderr()
        ))
    })
}

/// `GET path` over a stream from the pod; the body, once the server closes.
async fn http_get(
    client: &Arc<AgentClient>,
    addr: SocketAddr,
    path: &str,
) -> Result<Vec<u8>, Failed> {
    let stream = client.connect_tcp(addr).await?;
    let (mut app, net) = tokio::io::duplex(64 * 1024);
    let pipe = {
        let client = client.clone();
        tokio::spawn(async move { client.pipe(net, stream).await })
    };
    app.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    app.read_to_end(&mut response).await?;
    drop(app);
    pipe.await?;
    let header_end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {:?}", String::from_utf8_lossy(&response)))?;
    if !response.starts_with(b"HTTP/1.0 200") {
        return Err(Failed::from(format!(
            "{:?}",
            String::from_utf8_lossy(&response[..header_end])
        )));
    }
    Ok(response[header_end + 4..].to_vec())
}
