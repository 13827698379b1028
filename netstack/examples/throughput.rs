//! Bulk TCP throughput through the stack, run by hand for a tuning baseline:
//! `cargo run --release -p mirrord-netstack --example throughput [MiB]`.
//! A second smoltcp interface plays the app and uploads to 10.1.2.3:5201; the caller side
//! reads and discards. Prints MB/s; asserts nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use mirrord_netstack::{Config, Event, NetStack};
use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(512);
    let config = Config::default();
    let (mtu, buffer) = (config.mtu, config.tcp_rx_buffer);
    let (sink, source, mut events, _) = NetStack::spawn(config)?;
    let app = common::App::spawn(sink, source, mtu);
    let conn = app.connect("10.1.2.3:5201".parse()?, buffer);
    let Some(Event::Tcp(new)) = events.next().await else {
        return Err("no connection arrived".into());
    };
    let mut stream = new.accept()?;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    });
    conn.established()
        .await
        .map_err(|s| format!("connect failed: {s}"))?;
    let chunk = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    for _ in 0..mib {
        conn.write_all(&chunk).await?;
    }
    conn.shutdown();
    let total = reader.await?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} MiB in {secs:.2} s: {:.0} MB/s (mtu {mtu}, buffer {} KiB)",
        total >> 20,
        total as f64 / secs / 1e6,
        buffer >> 10
    );
    Ok(())
}
