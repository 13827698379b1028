//! Hostile clients against a real agent (the binary, serving its own namespaces on an abstract
//! Unix socket, with `nft` replaced by `false` so nothing on the machine changes). Each test
//! plays one kind of hostile peer — a wrong or absent token, another protocol version, frames
//! that are oversized, undecodable or cut short, a flood of stream opens, a handshake that
//! never ends, a flood of connections — and checks that it hears a clear refusal (or is
//! dropped within a bound) while a well-behaved session on the same agent is served
//! throughout.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mirrord_agent::server::HANDSHAKE_TIMEOUT;
use mirrord_link::endpoint::{Endpoint, ReadHalf, WriteHalf};
use mirrord_link::frames::{FrameReader, LinkError};
use mirrord_link::greet::greet;
use mirrord_protocol::frame::encode;
use mirrord_protocol::fs::FsRequest;
use mirrord_protocol::greeting::{Greeting, PROTOCOL_VERSION};
use mirrord_protocol::handshake::client_hello;
use mirrord_protocol::mux::MAX_STREAMS;
use mirrord_protocol::{
    AgentMessage, ClientMessage, RejectReason, Request, Response, StreamFrame, StreamId,
    StreamTarget,
};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;

const TOKEN: &str = "hostile-test-token";
/// Whatever a well-behaved step may take, however loaded the machine.
const STEP: Duration = Duration::from_secs(10);

/// A running agent, killed with its guard when dropped.
struct Agent {
    child: Child,
    endpoint: Endpoint,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(|_| {})
    }

    /// With `setup` applied to the command (resource limits).
    fn start_with(setup: impl FnOnce(&mut Command)) -> Agent {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "unix:@mrdt-hostile-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut command = Command::new(env!("CARGO_BIN_EXE_mirrord-agent"));
        command
            .args(["--listen", &name, "--idle-ttl", "60"])
            .env("MIRRORD_AGENT_TOKEN", TOKEN)
            .env("MIRRORD_AGENT_NFT", "false")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0);
        setup(&mut command);
        let mut child = command.spawn().expect("the agent starts");
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the agent says where it listens");
        assert_eq!(line.trim(), format!("listening on {name}"));
        Agent {
            child,
            endpoint: name.parse().expect("an endpoint"),
        }
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn connect(&self) -> (ReadHalf, WriteHalf) {
        self.endpoint.connect().await.expect("the agent accepts")
    }

    /// A well-behaved session's handshake and one request, which must be answered.
    async fn serves_a_session(&self) {
        let served = async {
            let (mut reader, mut write) = self.handshake(TOKEN.as_bytes()).await;
            assert_eq!(
                reader.next::<AgentMessage>().await.unwrap(),
                AgentMessage::Welcome
            );
            send(
                &mut write,
                &ClientMessage::Request {
                    id: 1,
                    request: Request::TargetInfo,
                },
            )
            .await;
            match reader.next::<AgentMessage>().await.unwrap() {
                AgentMessage::Response {
                    id: 1,
                    response: Ok(Response::TargetInfo(_)),
                } => {}
                other => panic!("a good session got {other:?}"),
            }
        };
        timeout(STEP, served)
            .await
            .expect("a good session is served meanwhile");
    }

    /// Greets and says hello with `token`; the agent's reply is the reader's next message.
    async fn handshake(&self, token: &[u8]) -> (FrameReader<ReadHalf>, WriteHalf) {
        let (mut read, mut write) = self.connect().await;
        let agent = greet(&mut read, &mut write, &Greeting::ours("hostile test"))
            .await
            .unwrap();
        assert!(agent.compatible());
        send(&mut write, &client_hello(token)).await;
        (FrameReader::new(read), write)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The agent leads its own process group, with its guard.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

async fn send(write: &mut WriteHalf, message: &ClientMessage) {
    let mut bytes = Vec::new();
    encode(message, &mut bytes).unwrap();
    write.write_all(&bytes).await.unwrap();
}

/// The agent's next message is `reason`, then it closes the connection.
async fn refused_with(reader: &mut FrameReader<ReadHalf>, reason: RejectReason) {
    let reply = timeout(STEP, reader.next::<AgentMessage>()).await.unwrap();
    assert_eq!(reply.unwrap(), AgentMessage::Rejected(reason));
    closed(reader).await;
}

async fn closed(reader: &mut FrameReader<ReadHalf>) {
    let end = timeout(STEP, reader.next::<AgentMessage>()).await.unwrap();
    assert!(
        matches!(end, Err(LinkError::Closed | LinkError::Io(_))),
        "the agent kept the connection: {end:?}"
    );
}

/// The raw bytes side: the peer closes (end of stream or reset) within `within`.
async fn dropped_within(read: &mut ReadHalf, within: Duration) -> Duration {
    let start = Instant::now();
    let mut sink = [0u8; 256];
    let ended = timeout(within, async {
        loop {
            match read.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "still open after {within:?}");
    start.elapsed()
}

#[tokio::test]
async fn a_wrong_or_absent_token_is_refused_and_others_are_served() {
    let agent = Agent::start();
    for token in [
        &b"not-the-token"[..],
        b"",
        &[TOKEN.as_bytes(), b"x"].concat(),
    ] {
        let (mut reader, _write) = agent.handshake(token).await;
        refused_with(&mut reader, RejectReason::BadToken).await;
    }
    // No hello at all: a request first.
    let (mut read, mut write) = agent.connect().await;
    greet(&mut read, &mut write, &Greeting::ours("hostile test"))
        .await
        .unwrap();
    send(
        &mut write,
        &ClientMessage::Request {
            id: 1,
            request: Request::TargetInfo,
        },
    )
    .await;
    refused_with(&mut FrameReader::new(read), RejectReason::HelloExpected).await;
    agent.serves_a_session().await;
}

#[tokio::test]
async fn another_protocol_version_hears_the_agents_and_is_closed() {
    let agent = Agent::start();
    for version in [PROTOCOL_VERSION + 1, PROTOCOL_VERSION - 1, 0, u32::MAX] {
        let (mut read, mut write) = agent.connect().await;
        let theirs = Greeting {
            version,
            software: "mirrord 99.0".into(),
        };
        // The agent's greeting names its version: what the client's user is told.
        let ours = greet(&mut read, &mut write, &theirs).await.unwrap();
        assert_eq!(ours.version, PROTOCOL_VERSION);
        dropped_within(&mut read, STEP).await;
    }
    // Not mirrord at all (an HTTP client that found the port): greeted, then closed.
    let (mut read, mut write) = agent.connect().await;
    write.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut magic = [0u8; 8];
    read.read_exact(&mut magic).await.unwrap();
    assert_eq!(&magic, b"mirrord\0");
    dropped_within(&mut read, STEP).await;
    agent.serves_a_session().await;
}

#[tokio::test]
async fn oversized_undecodable_and_truncated_frames_are_refused() {
    let agent = Agent::start();
    let hello = {
        let mut bytes = Vec::new();
        encode(&client_hello(TOKEN.as_bytes()), &mut bytes).unwrap();
        bytes
    };
    let first_frames: [Vec<u8>; 4] = [
        // A header claiming 4 GiB, and one just past the limit, before anything follows.
        [u32::MAX.to_be_bytes(), 0u32.to_be_bytes()].concat(),
        [(2u32 << 20).to_be_bytes(), 1u32.to_be_bytes()].concat(),
        // Three bytes that are no message.
        [
            &3u32.to_be_bytes()[..],
            &0u32.to_be_bytes(),
            &[0xff, 0xff, 0xff],
        ]
        .concat(),
        // A hello whose frame claims a bulk it has no place for.
        [&hello[..4], &1u32.to_be_bytes(), &hello[8..], &[0]].concat(),
    ];
    for frame in first_frames {
        let (mut read, mut write) = agent.connect().await;
        greet(&mut read, &mut write, &Greeting::ours("hostile test"))
            .await
            .unwrap();
        write.write_all(&frame).await.unwrap();
        refused_with(&mut FrameReader::new(read), RejectReason::HelloExpected).await;
    }
    // Half a hello, then the client's side ends: the agent closes without waiting further.
    let (mut read, mut write) = agent.connect().await;
    greet(&mut read, &mut write, &Greeting::ours("hostile test"))
        .await
        .unwrap();
    write.write_all(&hello[..hello.len() / 2]).await.unwrap();
    write.shutdown().await.unwrap();
    let took = dropped_within(&mut read, STEP).await;
    assert!(took < HANDSHAKE_TIMEOUT, "took {took:?}");
    // After the handshake, an oversized frame ends that session only.
    let (mut reader, mut write) = agent.handshake(TOKEN.as_bytes()).await;
    assert_eq!(
        reader.next::<AgentMessage>().await.unwrap(),
        AgentMessage::Welcome
    );
    write
        .write_all(&[u32::MAX.to_be_bytes(), u32::MAX.to_be_bytes()].concat())
        .await
        .unwrap();
    closed(&mut reader).await;
    agent.serves_a_session().await;
}

#[tokio::test]
async fn a_flood_of_stream_opens_is_refused_beyond_the_limit() {
    let agent = Agent::start();
    let (mut reader, mut write) = agent.handshake(TOKEN.as_bytes()).await;
    assert_eq!(
        reader.next::<AgentMessage>().await.unwrap(),
        AgentMessage::Welcome
    );
    let extra = 50;
    let total = MAX_STREAMS + extra;
    // UDP streams open at once and stay open (the discard port: nothing is ever sent).
    let opens = tokio::spawn(async move {
        let mut bytes = Vec::new();
        for n in 0..total {
            let open = ClientMessage::Stream(StreamFrame::Open {
                id: StreamId(2 * n as u32 + 1),
                target: StreamTarget::Udp(([127, 0, 0, 1], 9).into()),
            });
            encode(&open, &mut bytes).unwrap();
        }
        write.write_all(&bytes).await.unwrap();
        write
    });
    let (mut opened, mut refused) = (0, 0);
    let answers = async {
        while opened + refused < total {
            match reader.next::<AgentMessage>().await.unwrap() {
                AgentMessage::Stream(StreamFrame::Opened { .. }) => opened += 1,
                AgentMessage::Stream(StreamFrame::OpenFailed { error, .. }) => {
                    assert_eq!(error.errno, libc::EMFILE);
                    assert!(error.message.contains("streams open"), "{}", error.message);
                    refused += 1;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    let serving = agent.serves_a_session();
    let ((), ()) = tokio::join!(
        async {
            timeout(STEP * 3, answers)
                .await
                .expect("every open is answered")
        },
        serving
    );
    assert_eq!((opened, refused), (MAX_STREAMS, extra));
    // The session itself goes on: a request is still answered.
    let mut write = opens.await.unwrap();
    send(
        &mut write,
        &ClientMessage::Request {
            id: 7,
            request: Request::TargetInfo,
        },
    )
    .await;
    let answered = timeout(STEP, async {
        loop {
            if let AgentMessage::Response { id: 7, .. } =
                reader.next::<AgentMessage>().await.unwrap()
            {
                break;
            }
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "the flooding session's own request went unanswered"
    );
}

#[tokio::test]
async fn a_slowloris_handshake_is_dropped_and_others_are_served() {
    let agent = Agent::start();
    let greeting = Greeting::ours("slow client").encode();
    let mut hostile = Vec::new();
    for n in 0..10 {
        let (mut read, mut write) = agent.connect().await;
        let greeting = greeting.clone();
        hostile.push(tokio::spawn(async move {
            // Half of them say nothing at all, the others one byte every 300 ms.
            let dribble = async {
                if n % 2 == 0 {
                    return std::future::pending().await;
                }
                for byte in greeting {
                    if write.write_all(&[byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                () = dribble => unreachable!(),
                took = dropped_within(&mut read, HANDSHAKE_TIMEOUT + STEP) => took,
            }
        }));
    }
    agent.serves_a_session().await;
    for connection in hostile {
        let took = connection.await.unwrap();
        assert!(
            took >= HANDSHAKE_TIMEOUT - Duration::from_millis(500),
            "dropped too early: {took:?}"
        );
    }
    agent.serves_a_session().await;
}

#[tokio::test]
async fn a_flood_of_connections_beyond_its_descriptors_does_not_end_the_agent() {
    // Few descriptors, soft and hard: the agent cannot raise them.
    let mut agent = Agent::start_with(|command| {
        // SAFETY: setrlimit is async-signal-safe and touches only the child's own limits.
        unsafe {
            command.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 128,
                    rlim_max: 128,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let mut flood = Vec::new();
    for _ in 0..160 {
        flood.push(agent.connect().await);
    }
    // The agent has run out of descriptors by now, and must still be there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        agent.alive(),
        "the agent exited under a flood of connections"
    );
    drop(flood);
    agent.serves_a_session().await;
    assert!(agent.alive());
}

#[tokio::test]
async fn a_client_that_floods_requests_and_never_reads_is_held_back() {
    let agent = Agent::start();
    let (mut reader, mut write) = agent.handshake(TOKEN.as_bytes()).await;
    assert_eq!(
        reader.next::<AgentMessage>().await.unwrap(),
        AgentMessage::Welcome
    );
    // Their answers (some 12 MB) must be more than the kernel's socket buffers can take on
    // both sides however far they autotune, or the agent could answer everything unread.
    let total: u64 = 100_000;
    let mut bytes = Vec::new();
    for id in 0..total {
        let stat = ClientMessage::Request {
            id,
            request: Request::Fs(FsRequest::Stat {
                path: "/".into(),
                follow: false,
            }),
        };
        encode(&stat, &mut bytes).unwrap();
    }
    // Far more than the agent holds answers for: it stops reading, so the write cannot end
    // while nobody reads the answers.
    let writing = tokio::spawn(async move {
        write.write_all(&bytes).await.unwrap();
        write
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !writing.is_finished(),
        "the agent took every request while no answer was read"
    );
    agent.serves_a_session().await;
    // Once the answers are read, every request is answered, none lost.
    let mut answered = 0;
    let reading = async {
        while answered < total {
            if let AgentMessage::Response { response, .. } =
                reader.next::<AgentMessage>().await.unwrap()
            {
                assert!(response.is_ok(), "{response:?}");
                answered += 1;
            }
        }
    };
    timeout(STEP * 3, reading)
        .await
        .expect("every request is answered");
    let _write = writing.await.unwrap();
}
