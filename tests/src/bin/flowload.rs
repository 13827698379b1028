//! Many TCP flows at once, every byte checked: the load half of the network tests and of
//! `bench/flows.sh`. Run it as the command under `mirrord exec`, against `flowload serve` in the
//! pod's cluster.
//!
//! ```text
//! flowload serve ADDR            print "serving ADDR" once listening, then echo every
//!                                connection's bytes back, forever
//! flowload hold N ADDR           open N connections, echo one message on each, print
//!                                "held N", wait for a line on stdin, echo again on each, close
//! flowload loop N SECS ADDR      N workers, each connecting, echoing a payload of its own
//!                                (1 B to 64 KiB) and closing, again and again for SECS seconds
//! flowload bulk N BYTES ADDR     N connections at once, each sending BYTES and reading them back
//! ```
//!
//! Every payload is derived from its connection's number, so a byte that comes back wrong,
//! late or from another connection is seen. Any mismatch or error ends the run with exit code 1
//! and one line naming the connection; success prints one summary line.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("flowload: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flowload: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &[String]) -> Result<String, Error> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["serve", addr] => serve(addr.parse()?).await,
        ["hold", n, addr] => hold(n.parse()?, addr.parse()?).await,
        ["loop", n, secs, addr] => {
            churn(
                n.parse()?,
                Duration::from_secs(secs.parse()?),
                addr.parse()?,
            )
            .await
        }
        ["bulk", n, bytes, addr] => bulk(n.parse()?, bytes.parse()?, addr.parse()?).await,
        _ => Err(
            "usage: flowload serve ADDR | hold N ADDR | loop N SECS ADDR | bulk N BYTES ADDR"
                .into(),
        ),
    }
}

async fn serve(addr: SocketAddr) -> Result<String, Error> {
    let listener = TcpListener::bind(addr).await?;
    println!("serving {addr}");
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let (mut read, mut write) = stream.into_split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

/// The `len` bytes connection `flow` sends, from offset `at` of its stream.
fn fill(flow: u64, at: u64, buf: &mut [u8]) {
    for (i, byte) in buf.iter_mut().enumerate() {
        let x = (at + i as u64)
            .wrapping_add(flow.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_mul(0xbf58_476d_1ce4_e5b9);
        *byte = (x >> 56) as u8;
    }
}

/// Sends `len` bytes of `flow`'s stream from `at` and checks that the same come back.
async fn echo(stream: &mut TcpStream, flow: u64, at: u64, len: usize) -> Result<(), Error> {
    let mut sent = vec![0u8; len];
    fill(flow, at, &mut sent);
    stream.write_all(&sent).await?;
    let mut got = vec![0u8; len];
    stream.read_exact(&mut got).await?;
    if got != sent {
        return Err(format!("connection {flow}: {len} bytes came back changed").into());
    }
    Ok(())
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, Error> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn hold(n: u64, addr: SocketAddr) -> Result<String, Error> {
    let mut streams = Vec::new();
    for flow in 0..n {
        let mut stream = connect(addr)
            .await
            .map_err(|e| format!("connection {flow}: {e}"))?;
        echo(&mut stream, flow, 0, 64).await?;
        streams.push(stream);
    }
    println!("held {n}");
    tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await??;
    for (flow, stream) in (0..).zip(streams.iter_mut()) {
        echo(stream, flow, 64, 64).await?;
    }
    Ok(format!("released {n}"))
}

async fn churn(workers: u64, time: Duration, addr: SocketAddr) -> Result<String, Error> {
    let end = Instant::now() + time;
    let mut tasks = JoinSet::new();
    for worker in 0..workers {
        tasks.spawn(async move {
            let (mut connections, mut bytes) = (0u64, 0u64);
            while Instant::now() < end {
                let flow = worker << 32 | connections;
                // 1 B to 64 KiB, varying with the connection.
                let len = 1 + (flow.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 48) as usize;
                let mut stream = connect(addr)
                    .await
                    .map_err(|e| format!("connection {flow:#x}: {e}"))?;
                echo(&mut stream, flow, 0, len).await?;
                stream.shutdown().await?;
                let mut rest = Vec::new();
                stream.read_to_end(&mut rest).await?;
                if !rest.is_empty() {
                    return Err(
                        format!("connection {flow:#x}: {} bytes too many", rest.len()).into(),
                    );
                }
                connections += 1;
                bytes += len as u64;
            }
            Ok::<_, Error>((connections, bytes))
        });
    }
    let (mut connections, mut bytes) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (c, b) = result??;
        connections += c;
        bytes += b;
    }
    Ok(format!(
        "{connections} connections by {workers} workers in {} s, {bytes} bytes each way, all checked",
        time.as_secs()
    ))
}

async fn bulk(n: u64, bytes: u64, addr: SocketAddr) -> Result<String, Error> {
    const CHUNK: usize = 64 * 1024;
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for flow in 0..n {
        tasks.spawn(async move {
            let stream = connect(addr)
                .await
                .map_err(|e| format!("connection {flow}: {e}"))?;
            let (mut read, mut write) = stream.into_split();
            let sender = tokio::spawn(async move {
                let mut buf = vec![0u8; CHUNK];
                let mut at = 0;
                while at < bytes {
                    let len = CHUNK.min((bytes - at) as usize);
                    fill(flow, at, &mut buf[..len]);
                    write.write_all(&buf[..len]).await?;
                    at += len as u64;
                }
                write.shutdown().await?;
                Ok::<_, std::io::Error>(())
            });
            let (mut buf, mut want) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
            let mut at = 0;
            loop {
                let len = read.read(&mut buf).await?;
                if len == 0 {
                    break;
                }
                fill(flow, at, &mut want[..len]);
                if buf[..len] != want[..len] {
                    return Err(format!("connection {flow}: wrong bytes at offset {at}").into());
                }
                at += len as u64;
            }
            sender.await??;
            if at != bytes {
                return Err(format!("connection {flow}: {at} of {bytes} bytes came back").into());
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "{n} connections × {bytes} bytes echoed and checked in {secs:.1} s ({:.0} MB/s each way)",
        (n * bytes) as f64 / secs / 1e6
    ))
}
