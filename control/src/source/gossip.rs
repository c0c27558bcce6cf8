//! The gossip driver: the I/O around [`crate::gossip::Gossip`]. It owns the UDP and TCP
//! sockets on port 7946, seals and opens every message with the cluster keyring, drops
//! (and counts) whatever fails authentication, decoding, size or replay checks, and
//! feeds the rest to the state machine with the current time.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use parking_lot::{Mutex, MutexGuard, RwLock};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::watch,
    time::timeout,
};

use crate::gossip::{
    seal::{Keyring, ReplayGuard},
    wire::{decode, encode, Packet, PushPull},
    Gossip, Millis, Out,
};

/// The gossip port Docker uses; meshd uses it for UDP gossip and TCP push-pull.
pub const PORT: u16 = 7946;

/// Largest TCP push-pull frame accepted.
pub const MAX_FRAME: usize = 64 << 20;

/// How often the state machine's timers are advanced.
pub const TICK: Duration = Duration::from_millis(20);

/// How long one TCP push-pull may take.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why incoming gossip was dropped, and how often.
#[derive(Debug, Default)]
pub struct Counters {
    /// UDP packets accepted.
    pub packets_in: AtomicU64,
    /// UDP packets sent.
    pub packets_out: AtomicU64,
    /// Failed authentication: forged, corrupted, or sealed with an unknown key.
    pub dropped_auth: AtomicU64,
    /// Authentic but undecodable, or not a sealed message at all.
    pub dropped_malformed: AtomicU64,
    /// Larger than the configured limit.
    pub dropped_oversized: AtomicU64,
    /// A replay of a packet already seen.
    pub dropped_replay: AtomicU64,
    /// TCP push-pulls completed.
    pub push_pulls: AtomicU64,
}

impl Counters {
    /// The counters by name, for `meshctl status`.
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        [
            ("packets_in", &self.packets_in),
            ("packets_out", &self.packets_out),
            ("dropped_auth", &self.dropped_auth),
            ("dropped_malformed", &self.dropped_malformed),
            ("dropped_oversized", &self.dropped_oversized),
            ("dropped_replay", &self.dropped_replay),
            ("push_pulls", &self.push_pulls),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.load(Ordering::Relaxed)))
        .collect()
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the driver shares with the agent.
pub struct Shared {
    /// The state machine.
    pub gossip: Mutex<Gossip>,
    /// Keys accepted, and the sealing one.
    pub keyring: RwLock<Keyring>,
    /// Drop and traffic counters.
    pub counters: Counters,
    /// Bumped whenever membership or the store changed.
    pub changes: watch::Sender<u64>,
    /// Zero of the gossip clock.
    pub started: Instant,
    /// Largest sealed UDP datagram accepted or sent.
    pub udp_limit: usize,
}

impl Shared {
    /// Milliseconds on the gossip clock.
    pub fn now(&self) -> Millis {
        self.started.elapsed().as_millis() as Millis
    }

    /// Locks the state machine.
    pub fn gossip(&self) -> MutexGuard<'_, Gossip> {
        self.gossip.lock()
    }

    /// Signals a change if the state machine saw one.
    pub fn notify_if_changed(&self, gossip: &mut Gossip) {
        if gossip.take_changed() {
            self.changes.send_modify(|g| *g += 1);
        }
    }
}

/// Runs the gossip I/O until the task is dropped.
pub async fn run(shared: Arc<Shared>, udp: Arc<UdpSocket>, tcp: TcpListener, seeds: Vec<SocketAddr>) {
    tokio::spawn(serve_push_pull(shared.clone(), tcp));
    let outs = shared.gossip().join(&seeds);
    send_all(&shared, &udp, outs).await;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut replay = ReplayGuard::default();
    let mut buf = vec![0u8; 65536];
    let mut next_join_retry = Instant::now() + Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let outs = {
                    let mut g = shared.gossip();
                    let mut outs = g.tick(shared.now());
                    // Until we know anyone, keep knocking on the seeds.
                    if g.members().next().is_none() && Instant::now() >= next_join_retry {
                        next_join_retry = Instant::now() + Duration::from_secs(1);
                        outs.extend(g.join(&seeds));
                    }
                    shared.notify_if_changed(&mut g);
                    outs
                };
                send_all(&shared, &udp, outs).await;
            }
            received = udp.recv_from(&mut buf) => {
                let Ok((len, from)) = received else { continue };
                if let Some(packet) = open_packet(&shared, &mut replay, &buf[..len], from) {
                    let outs = {
                        let mut g = shared.gossip();
                        let outs = g.handle_packet(packet, shared.now());
                        shared.notify_if_changed(&mut g);
                        outs
                    };
                    send_all(&shared, &udp, outs).await;
                }
            }
        }
    }
}

/// Checks a datagram all the way to a packet; counts and drops what fails.
fn open_packet(
    shared: &Shared,
    replay: &mut ReplayGuard,
    datagram: &[u8],
    from: SocketAddr,
) -> Option<Packet> {
    let c = &shared.counters;
    if datagram.len() > shared.udp_limit {
        Counters::bump(&c.dropped_oversized);
        tracing::debug!(%from, len = datagram.len(), "dropped oversized gossip datagram");
        return None;
    }
    let plain = match shared.keyring.read().open(datagram) {
        Ok(plain) => plain,
        Err(crate::gossip::seal::OpenError::Malformed) => {
            Counters::bump(&c.dropped_malformed);
            return None;
        }
        Err(error) => {
            Counters::bump(&c.dropped_auth);
            tracing::warn!(%from, %error, "dropped gossip datagram; if this is a cluster member, give it the cluster keyring");
            return None;
        }
    };
    let Ok(packet) = decode::<Packet>(&plain) else {
        Counters::bump(&c.dropped_malformed);
        return None;
    };
    if !replay.accept(&packet.from, packet.epoch, packet.seq) {
        Counters::bump(&c.dropped_replay);
        tracing::debug!(%from, sender = %packet.from, "dropped replayed gossip datagram");
        return None;
    }
    Counters::bump(&c.packets_in);
    Some(packet)
}

async fn send_all(shared: &Arc<Shared>, udp: &UdpSocket, outs: Vec<Out>) {
    for out in outs {
        match out {
            Out::Udp { to, bytes } => {
                let sealed = shared.keyring.read().seal(&bytes);
                if udp.send_to(&sealed, to).await.is_ok() {
                    Counters::bump(&shared.counters.packets_out);
                }
            }
            Out::PushPull { to, join } => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    match timeout(EXCHANGE_TIMEOUT, push_pull(&shared, to, join)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => tracing::debug!(%to, %error, "push-pull failed"),
                        Err(_) => tracing::debug!(%to, "push-pull timed out"),
                    }
                });
            }
        }
    }
}

/// Why a TCP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The connection broke.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The frame exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The frame failed authentication.
    #[error("frame failed authentication (peer lacks the cluster keyring?)")]
    Auth,
    /// The frame did not decode.
    #[error("malformed frame")]
    Malformed,
}

async fn write_frame(stream: &mut TcpStream, shared: &Shared, state: &PushPull) -> Result<(), ExchangeError> {
    let sealed = shared.keyring.read().seal(&encode(state));
    stream.write_all(&(sealed.len() as u32).to_be_bytes()).await?;
    stream.write_all(&sealed).await?;
    Ok(())
}

async fn read_frame(stream: &mut TcpStream, shared: &Shared) -> Result<PushPull, ExchangeError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        Counters::bump(&shared.counters.dropped_oversized);
        return Err(ExchangeError::TooLarge(len));
    }
    let mut sealed = vec![0u8; len];
    stream.read_exact(&mut sealed).await?;
    let plain = shared.keyring.read().open(&sealed).map_err(|_| {
        Counters::bump(&shared.counters.dropped_auth);
        ExchangeError::Auth
    })?;
    decode(&plain).map_err(|_| {
        Counters::bump(&shared.counters.dropped_malformed);
        ExchangeError::Malformed
    })
}

async fn push_pull(shared: &Shared, to: SocketAddr, join: bool) -> Result<(), ExchangeError> {
    let mut stream = TcpStream::connect(to).await?;
    let mine = {
        let g = shared.gossip();
        let peer = g.name_at(to).map(str::to_owned);
        g.push_pull_for(peer.as_deref(), join)
    };
    write_frame(&mut stream, shared, &mine).await?;
    let theirs = read_frame(&mut stream, shared).await?;
    let mut g = shared.gossip();
    g.merge_push_pull(theirs, shared.now());
    shared.notify_if_changed(&mut g);
    Counters::bump(&shared.counters.push_pulls);
    Ok(())
}

async fn serve_push_pull(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let exchange = async {
                let theirs = read_frame(&mut stream, &shared).await?;
                // Merge first: the peer's own store says which networks it takes part
                // in, and the answer is filtered by that.
                let mine = {
                    let mut g = shared.gossip();
                    let peer = theirs.from.clone();
                    g.merge_push_pull(theirs, shared.now());
                    shared.notify_if_changed(&mut g);
                    g.push_pull_for(Some(&peer), false)
                };
                write_frame(&mut stream, &shared, &mine).await?;
                Counters::bump(&shared.counters.push_pulls);
                Ok::<(), ExchangeError>(())
            };
            match timeout(EXCHANGE_TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%peer, %error, "dropped a bad push-pull"),
                Err(_) => tracing::warn!(%peer, "push-pull timed out"),
            }
        });
    }
}

/// Sends a final round of packets announcing that this node leaves.
pub async fn leave(shared: &Arc<Shared>, udp: &UdpSocket) {
    let outs = shared.gossip().leave(shared.now());
    send_all(shared, udp, outs).await;
}
