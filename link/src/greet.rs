//! Sends this side's greeting and reads the peer's (see [`mirrord_protocol::greeting`]): both
//! go out at once, so the exchange costs one trip, and exactly the greeting's bytes are read,
//! so the frames behind it stay in the connection for the frame reader.

use mirrord_protocol::greeting::{FIXED_LEN, Greeting, GreetingError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum GreetError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before greeting: not a mirrord peer of a release that
    /// greets, or one that refused us.
    #[error("the connection closed before the peer's greeting")]
    Closed,
    #[error(transparent)]
    NotMirrord(#[from] GreetingError),
}

/// Writes `ours` and returns the peer's greeting. Compatibility is the caller's to judge: a
/// mismatched peer still told us who it is, which is what the user needs to hear.
pub async fn greet<R, W>(
    read: &mut R,
    write: &mut W,
    ours: &Greeting,
) -> Result<Greeting, GreetError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    write.write_all(&ours.encode()).await?;
    write.flush().await?;
    let mut fixed = [0u8; FIXED_LEN];
    read.read_exact(&mut fixed).await.map_err(closed)?;
    let (_, name_len) = Greeting::parse_fixed(&fixed)?;
    let mut name = vec![0u8; name_len];
    read.read_exact(&mut name).await.map_err(closed)?;
    Ok(Greeting::parse(&fixed, &name)?)
}

fn closed(error: std::io::Error) -> GreetError {
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof => GreetError::Closed,
        _ => GreetError::Io(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrord_protocol::greeting::PROTOCOL_VERSION;

    #[tokio::test]
    async fn both_sides_learn_each_other_and_the_frames_behind_stay_unread() {
        let (mut client, mut agent) = tokio::io::duplex(1024);
        let agent_side = tokio::spawn(async move {
            let (mut read, mut write) = tokio::io::split(&mut agent);
            let theirs = greet(&mut read, &mut write, &Greeting::ours("mirrord-agent 1.0")).await;
            let mut rest = [0u8; 5];
            read.read_exact(&mut rest).await.unwrap();
            (theirs.unwrap(), rest)
        });
        let (mut read, mut write) = tokio::io::split(&mut client);
        let other = Greeting {
            version: PROTOCOL_VERSION + 1,
            software: "mirrord 9.0".into(),
        };
        let agent_greeting = greet(&mut read, &mut write, &other).await.unwrap();
        write.write_all(b"frame").await.unwrap();
        assert_eq!(agent_greeting, Greeting::ours("mirrord-agent 1.0"));
        let (client_greeting, rest) = agent_side.await.unwrap();
        assert_eq!((client_greeting, &rest), (other, b"frame"));
    }

    #[tokio::test]
    async fn a_peer_that_closes_or_speaks_otherwise_is_told_apart() {
        let (mut client, agent) = tokio::io::duplex(1024);
        drop(agent);
        let (mut read, mut write) = tokio::io::split(&mut client);
        let error = greet(&mut read, &mut write, &Greeting::ours("x")).await;
        assert!(matches!(error, Err(GreetError::Io(_) | GreetError::Closed)));

        let (mut client, mut server) = tokio::io::duplex(1024);
        server
            .write_all(b"HTTP/1.1 400 Bad Request\r\n")
            .await
            .unwrap();
        let (mut read, mut write) = tokio::io::split(&mut client);
        let error = greet(&mut read, &mut write, &Greeting::ours("x")).await;
        assert!(matches!(error, Err(GreetError::NotMirrord(_))), "{error:?}");
    }
}
