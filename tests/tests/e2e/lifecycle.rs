//! How sessions end, and how the agent copes with more than one well-behaved client: Ctrl-C,
//! `kill -9` of mirrord, an agent that dies mid-session, several sessions at once, garbage on
//! the agent's port, the idle TTL, and the agent reading the pod's files from the pod's mount
//! namespace. After each, the scenario checks nothing was left behind.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::thread;
use std::time::Duration;

use libtest_mimic::Failed;
use mirrord_cli::client::{AgentClient, ClientError};
use mirrord_tests::cluster::{POD_FILE_DIR, POD_ONLY_FILE};
use mirrord_tests::command::{Run, SHORT};
use mirrord_tests::{Cluster, Pty, Scene};

use super::{POD_VALUE, RUN, standard_pod, start_agent, start_until_first_line};

const TOKEN: &str = "lifecycle-token";

/// Ctrl-C at the terminal ends the command; mirrord reports 130 and stops its agent.
pub fn exec_ctrl_c_ends_command_and_session(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let mut cmd = scene.mirrord()?;
    cmd.args([
        "exec",
        "-t",
        &pod.target(),
        "--",
        "sh",
        "-c",
        "echo started; sleep 30; echo finished",
    ]);
    let mut pty = Pty::spawn(cmd)?;
    pty.expect("started", RUN)?;
    pty.send(b"\x03")?;
    // This machine's pseudo-terminals sometimes drop a Ctrl-C typed right after output
    // (5 of 60 tries with a plain `sh -c "echo; sleep"`, no mirrord involved); a user would
    // press it again.
    let code = match pty.wait(Duration::from_secs(3)) {
        Ok(code) => code,
        Err(_) => {
            pty.send(b"\x03")?;
            pty.wait(SHORT)?
        }
    };
    ensure!(
        code == 130,
        "after Ctrl-C mirrord exited {code}; terminal: {}",
        pty.transcript()
    );
    ensure!(
        !pty.transcript().contains("finished"),
        "the command ran on: {}",
        pty.transcript()
    );
    Ok(())
}

/// `kill -9` of mirrord takes the command and the agent with it (the scenario's leftover check
/// finds any survivor).
pub fn killing_mirrord_leaves_nothing(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let mut cmd = scene.mirrord()?;
    cmd.args([
        "exec",
        "-t",
        &pod.target(),
        "--",
        "sh",
        "-c",
        "echo started; exec sleep 60",
    ])
    .stderr(Stdio::null());
    let (mut mirrord, _, line) = start_until_first_line(cmd)?;
    ensure!(line == "started\n", "the command did not start: {line:?}");
    mirrord.kill()?;
    mirrord.wait()?;
    Ok(())
}

/// The agent dying mid-session is reported in one line; the command itself finishes normally.
pub fn agent_death_mid_session_is_reported(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let agent = start_agent(scene, &pod, TOKEN)?;
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "--agent-addr", agent.addr(), "--"])
        .args(["sh", "-c", "echo started; sleep 2; echo \"done $POD_VAR\""])
        .env("MIRRORD_AGENT_TOKEN", TOKEN)
        .stderr(Stdio::piped());
    let (mut mirrord, mut stdout, line) = start_until_first_line(cmd)?;
    ensure!(line == "started\n", "the command did not start: {line:?}");
    drop(agent);
    let mut rest = String::new();
    stdout.read_to_string(&mut rest)?;
    let mut stderr = String::new();
    mirrord
        .stderr
        .take()
        .ok_or("no stderr")?
        .read_to_string(&mut stderr)?;
    let status = mirrord.wait()?;
    ensure!(
        status.code() == Some(0) && rest == format!("done {POD_VALUE}\n"),
        "status {status}, stdout {rest:?}, stderr {stderr:?}"
    );
    ensure!(
        stderr
            .lines()
            .any(|line| line.starts_with("mirrord: lost the agent")),
        "the lost agent was not reported: {stderr:?}"
    );
    Ok(())
}

/// One agent serves several sessions at the same time.
pub fn agent_serves_concurrent_sessions(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let agent = start_agent(scene, &pod, TOKEN)?;
    let addr = agent.addr().to_string();
    let sessions: Vec<_> = (0..4)
        .map(|n| {
            let mut cmd = scene.mirrord()?;
            cmd.args(["exec", "--agent-addr", &addr, "--"])
                .args(["sh", "-c", &format!("sleep 0.5; echo \"{n} $POD_VAR\"")])
                .env("MIRRORD_AGENT_TOKEN", TOKEN);
            Ok(thread::spawn(move || cmd.run(RUN)))
        })
        .collect::<Result<_, Failed>>()?;
    for (n, session) in sessions.into_iter().enumerate() {
        let out = session.join().map_err(|_| "session thread panicked")??;
        ensure!(
            out.code == 0 && out.stdout == format!("{n} {POD_VALUE}\n"),
            "session {n}: {}",
            out.describe()
        );
    }
    Ok(())
}

/// Garbage on the agent's port ends only that connection; real sessions still work, and the
/// agent exits by itself once it has had no session for its idle TTL.
pub fn agent_survives_garbage_and_honours_idle_ttl(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let mut cmd = scene.agent()?;
    cmd.args(["--target-pid", &pod.pid().to_string(), "--idle-ttl", "2"])
        .env("MIRRORD_AGENT_TOKEN", TOKEN);
    let mut agent = mirrord_tests::HandStartedAgent::start(cmd, SHORT)?;

    let garbage: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], // a length far over the frame limit
        &[0, 0, 0, 3, 0xde, 0xad, 0xbe],    // a frame that is no message
        b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n", // a confused HTTP client
    ];
    for bytes in garbage {
        let mut socket = TcpStream::connect(agent.addr())?;
        socket.set_read_timeout(Some(SHORT))?;
        socket.write_all(bytes)?;
        let mut reply = Vec::new();
        // The agent greets every connection, then closes it on garbage; a reset is as good as
        // an end of stream here. Its greeting (magic, version, name length, name) is all it says.
        let _ = socket.read_to_end(&mut reply);
        ensure!(
            reply.starts_with(b"mirrord\0")
                && reply.len() > 12
                && reply.len() == 13 + usize::from(reply[12]),
            "the agent answered garbage {bytes:?} with more than its greeting: {reply:?}"
        );
    }

    let mut cmd = scene.mirrord()?;
    cmd.args([
        "exec",
        "--agent-addr",
        agent.addr(),
        "--",
        "printenv",
        "POD_VAR",
    ])
    .env("MIRRORD_AGENT_TOKEN", TOKEN);
    let out = cmd.run(RUN)?;
    ensure!(
        out.code == 0 && out.stdout == format!("{POD_VALUE}\n"),
        "after garbage: {}",
        out.describe()
    );

    let status = agent.wait_exit(Duration::from_secs(10));
    ensure!(
        status.is_some_and(|status| status.success()),
        "the agent did not exit cleanly after its idle TTL: {status:?}; stderr: {}",
        agent.stderr()
    );
    Ok(())
}

/// The agent reads files from the pod's own mount namespace, and `..` cannot climb out of the
/// pod's root.
pub fn agent_reads_pod_files(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let agent = start_agent(scene, &pod, TOKEN)?;
    let pod_only = format!("{POD_FILE_DIR}/{POD_ONLY_FILE}");
    ensure!(
        std::fs::metadata(&pod_only).is_err(),
        "{pod_only} is visible outside the pod, so this test proves nothing"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = AgentClient::connect(&agent.addr().parse()?, TOKEN.as_bytes()).await?;
        let read = |path: String| {
            let client = &client;
            async move { client.read_small_file(&path).await }
        };
        for path in [
            pod_only.clone(),
            format!("/../../..{pod_only}"),
            format!("{POD_FILE_DIR}/../../{pod_only}"),
        ] {
            match read(path.clone()).await? {
                data if data == pod.pod_only_content().as_bytes() => {}
                other => return Err(Failed::from(format!("{path}: {other:?}"))),
            }
        }
        match read(format!("{POD_FILE_DIR}/missing")).await {
            Err(ClientError::Remote(error)) if error.errno == libc::ENOENT => Ok(()),
            other => Err(Failed::from(format!("a missing file: {other:?}"))),
        }
    })
}
