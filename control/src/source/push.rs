//! The simplest honest replication: push-pull of whole stores over TCP 7946.
//!
//! Every second, and at once after a local change, a node connects to each peer, sends
//! its [`Snapshot`] and reads the peer's back; both merge. Stores merge by version
//! (see [`crate::store`]), so the cluster converges however exchanges interleave.
//! Frames are a 4-byte big-endian length and a JSON body.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::timeout,
};

use super::{Replica, Snapshot};

/// The gossip port Docker uses; meshd's control traffic uses it too.
pub const PORT: u16 = 7946;

/// Largest frame accepted.
pub const MAX_FRAME: usize = 64 << 20;

/// How often a node pushes even without a change.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// How long one exchange may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The body is not a snapshot.
    #[error("frame body is not a snapshot: {0}")]
    Body(#[from] serde_json::Error),
    /// The connection broke.
    #[error("reading frame: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes a snapshot as one frame.
pub fn encode_frame(snapshot: &Snapshot) -> Vec<u8> {
    let body = serde_json::to_vec(snapshot).expect("snapshots always serialize");
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Decodes the frame at the start of `buf`: `Ok(None)` means more bytes are needed,
/// `Ok(Some((snapshot, used)))` gives the snapshot and how many bytes it took.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Snapshot, usize)>, FrameError> {
    let Some(header) = buf.first_chunk::<4>() else { return Ok(None) };
    let len = u32::from_be_bytes(*header) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let Some(body) = buf.get(4..4 + len) else { return Ok(None) };
    Ok(Some((serde_json::from_slice(body)?, 4 + len)))
}

async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> Result<Snapshot, FrameError> {
    let mut buf = Vec::new();
    loop {
        if let Some((snapshot, _)) = decode_frame(&buf)? {
            return Ok(snapshot);
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = reader.read(&mut chunk).await?;
        if n == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Answers peers' pushes on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, replica: Arc<dyn Replica>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else { continue };
        let replica = replica.clone();
        tokio::spawn(async move {
            match timeout(EXCHANGE_TIMEOUT, answer(stream, &*replica)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%peer, %error, "dropped a bad state exchange"),
                Err(_) => tracing::warn!(%peer, "state exchange timed out"),
            }
        });
    }
}

async fn answer(mut stream: TcpStream, replica: &dyn Replica) -> Result<(), FrameError> {
    let theirs = read_frame(&mut stream).await?;
    let sent_at = Instant::now();
    stream.write_all(&encode_frame(&replica.snapshot())).await?;
    replica.absorb(theirs, sent_at);
    Ok(())
}

/// Pushes to every peer each [`INTERVAL`] and after every local change, forever.
pub async fn push_loop(replica: Arc<dyn Replica>) {
    let mut changes = replica.changes();
    loop {
        let rounds = replica.peers().into_iter().map(|peer| {
            let replica = replica.clone();
            async move {
                if let Err(error) = timeout(EXCHANGE_TIMEOUT, exchange(peer, &*replica))
                    .await
                    .unwrap_or_else(|_| Err(FrameError::Io(std::io::ErrorKind::TimedOut.into())))
                {
                    tracing::debug!(%peer, %error, "push failed");
                }
            }
        });
        futures_join_all(rounds).await;
        let _ = timeout(INTERVAL, changes.changed()).await;
    }
}

async fn exchange(peer: SocketAddr, replica: &dyn Replica) -> Result<(), FrameError> {
    let sent_at = Instant::now();
    let frame = encode_frame(&replica.snapshot());
    let mut stream = TcpStream::connect(peer).await?;
    stream.write_all(&frame).await?;
    let theirs = read_frame(&mut stream).await?;
    replica.absorb(theirs, sent_at);
    Ok(())
}

/// Runs futures concurrently and waits for all (a tiny join_all, to avoid a crate).
async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    for handle in handles {
        let _ = handle.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn snapshot() -> Snapshot {
        Snapshot { node: "n1".into(), store: Store::default() }
    }

    #[test]
    fn frames_round_trip_and_partial_input_asks_for_more() {
        let frame = encode_frame(&snapshot());
        for cut in 0..frame.len() {
            assert!(decode_frame(&frame[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        let (decoded, used) = decode_frame(&frame).unwrap().unwrap();
        assert_eq!((decoded, used), (snapshot(), frame.len()));
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(decode_frame(&huge), Err(FrameError::TooLarge(_))));
        let mut garbage = 3u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"{x}");
        assert!(matches!(decode_frame(&garbage), Err(FrameError::Body(_))));
    }
}
