//! The gossip driver: the I/O around [`crate::gossip::Gossip`]. It owns the UDP and TCP
//! sockets on port 7946, seals and opens every message with the cluster keyring, drops
//! (and counts) whatever fails authentication, decoding, size or replay checks, and
//! feeds the rest to the state machine with the current time.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use meshd_dataplane::backoff::AcceptBackoff;
use parking_lot::{Mutex, MutexGuard, RwLock};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::{watch, Semaphore},
    time::timeout,
};

use crate::gossip::{
    seal::{Keyring, ReplayGuard},
    wire::{decode, encode, Packet, PushPull},
    Gossip, Millis, Out,
};

/// The gossip port Docker uses; meshd uses it for UDP gossip and TCP push-pull.
pub const PORT: u16 = 7946;

/// Default largest TCP push-pull frame (`--max-frame-mib`): the sealed cluster state
/// must fit. A store of 10,000 task endpoints encodes to about 1.5 MiB.
pub const DEFAULT_MAX_FRAME: usize = 4 << 20;

/// At most one warning per reason in this period; the rest are counted.
pub const LOG_PERIOD: Duration = Duration::from_secs(10);

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
    /// A replay of a packet or push-pull frame already seen, or a frame older than
    /// half the tombstone TTL.
    pub dropped_replay: AtomicU64,
    /// TCP connections closed at once because the push-pull cap was reached.
    pub dropped_busy: AtomicU64,
    /// TCP push-pulls that did not finish within the exchange timeout.
    pub timed_out: AtomicU64,
    /// Failed TCP accepts or UDP receives (e.g. out of file descriptors).
    pub socket_errors: AtomicU64,
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
            ("dropped_busy", &self.dropped_busy),
            ("timed_out", &self.timed_out),
            ("socket_errors", &self.socket_errors),
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
    /// Largest TCP push-pull frame accepted, and concurrent push-pulls served.
    max_frame: usize,
    push_pull_slots: Arc<Semaphore>,
    /// Drop warnings, at most one per reason per [`LOG_PERIOD`].
    log: LogLimiter,
    /// Replay protection of push-pull frames (per sender epoch and sequence).
    frame_replay: Mutex<ReplayGuard>,
    frame_seq: AtomicU64,
    /// Push-pull frames older than this (sender's wall clock) are refused.
    max_frame_age_ms: u64,
    epoch: u64,
}

impl Shared {
    /// The driver's shared state around `gossip`, sealing with `keyring`.
    pub fn new(gossip: Gossip, keyring: Keyring, started: Instant, udp_limit: usize) -> Shared {
        let cfg = gossip.config().clone();
        let epoch = gossip.epoch();
        Shared {
            gossip: Mutex::new(gossip),
            keyring: RwLock::new(keyring),
            counters: Counters::default(),
            changes: watch::channel(0).0,
            started,
            udp_limit,
            max_frame: cfg.max_frame,
            push_pull_slots: Arc::new(Semaphore::new(cfg.max_push_pulls.max(1))),
            log: LogLimiter::default(),
            frame_replay: Mutex::default(),
            frame_seq: AtomicU64::new(0),
            max_frame_age_ms: cfg.tombstone_ttl / 2,
            epoch,
        }
    }

    /// Warnings suppressed by the rate limit so far, per reason.
    pub fn suppressed_warnings(&self) -> BTreeMap<&'static str, u64> {
        self.log.suppressed_total()
    }

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
    // Accept/receive errors (e.g. EMFILE) pause the loop, doubling up to 1 s, so a
    // lack of descriptors never spins a core.
    let mut backoff = AcceptBackoff::default();
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
                let (len, from) = match received {
                    Ok(received) => {
                        backoff.succeeded();
                        received
                    }
                    Err(error) => {
                        Counters::bump(&shared.counters.socket_errors);
                        shared.log.warn("udp_receive", |s| tracing::warn!(%error, suppressed = s, "gossip UDP receive failed; backing off"));
                        tokio::time::sleep(backoff.failed()).await;
                        continue;
                    }
                };
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
            shared.log.warn("udp_auth", |s| {
                tracing::warn!(%from, %error, suppressed = s, "dropped gossip datagram; if this is a cluster member, give it the cluster keyring")
            });
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
    /// The frame exceeds the configured limit.
    #[error("frame of {0} bytes exceeds the limit (--max-frame-mib)")]
    TooLarge(usize),
    /// The frame failed authentication.
    #[error("frame failed authentication (peer lacks the cluster keyring?)")]
    Auth,
    /// The frame did not decode.
    #[error("malformed frame")]
    Malformed,
    /// The frame was seen before, or is too old to be trusted.
    #[error("replayed or stale frame")]
    Replay,
}

impl ExchangeError {
    fn reason(&self) -> &'static str {
        match self {
            ExchangeError::Io(_) => "tcp_io",
            ExchangeError::TooLarge(_) => "tcp_oversized",
            ExchangeError::Auth => "tcp_auth",
            ExchangeError::Malformed => "tcp_malformed",
            ExchangeError::Replay => "tcp_replay",
        }
    }
}

/// Whether a push-pull frame sent at `sent_at` (sender's wall clock) may be merged at
/// `now`: a frame older than `max_age` might carry an entry whose tombstone has been
/// reaped since (`max_age` is half the tombstone TTL, leaving the other half for
/// clock skew), and one from further in the future is forged or from a broken clock.
pub fn frame_is_fresh(sent_at: u64, now: u64, max_age: u64) -> bool {
    sent_at.abs_diff(now) <= max_age
}

async fn write_frame(
    stream: &mut TcpStream,
    shared: &Shared,
    mut state: PushPull,
) -> Result<(), ExchangeError> {
    state.seq = shared.frame_seq.fetch_add(1, Ordering::Relaxed) + 1;
    state.epoch = shared.epoch;
    state.sent_at_ms = crate::wall_clock_ms();
    let sealed = shared.keyring.read().seal(&encode(&state));
    stream.write_all(&(sealed.len() as u32).to_be_bytes()).await?;
    stream.write_all(&sealed).await?;
    Ok(())
}

async fn read_frame(stream: &mut TcpStream, shared: &Shared) -> Result<PushPull, ExchangeError> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes(header) as usize;
    if len > shared.max_frame {
        Counters::bump(&shared.counters.dropped_oversized);
        return Err(ExchangeError::TooLarge(len));
    }
    // Never trust the announced length with memory: the buffer grows only as bytes
    // actually arrive (doubling, never past the announced, already bounded length).
    let mut sealed: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    while sealed.len() < len {
        let want = chunk.len().min(len - sealed.len());
        let n = stream.read(&mut chunk[..want]).await?;
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        if sealed.capacity() - sealed.len() < n {
            let grown = (sealed.capacity() * 2).max(64 << 10).min(len);
            sealed.reserve_exact(grown - sealed.len());
        }
        sealed.extend_from_slice(&chunk[..n]);
    }
    let plain = shared.keyring.read().open(&sealed).map_err(|_| {
        Counters::bump(&shared.counters.dropped_auth);
        ExchangeError::Auth
    })?;
    let frame: PushPull = decode(&plain).map_err(|_| {
        Counters::bump(&shared.counters.dropped_malformed);
        ExchangeError::Malformed
    })?;
    if !frame_is_fresh(frame.sent_at_ms, crate::wall_clock_ms(), shared.max_frame_age_ms)
        || !shared.frame_replay.lock().accept(&frame.from, frame.epoch, frame.seq)
    {
        Counters::bump(&shared.counters.dropped_replay);
        return Err(ExchangeError::Replay);
    }
    Ok(frame)
}

async fn push_pull(shared: &Shared, to: SocketAddr, join: bool) -> Result<(), ExchangeError> {
    let mut stream = TcpStream::connect(to).await?;
    let mine = {
        let g = shared.gossip();
        let peer = g.name_at(to).map(str::to_owned);
        g.push_pull_for(peer.as_deref(), join)
    };
    let covers = mine.covers;
    write_frame(&mut stream, shared, mine).await?;
    let theirs = read_frame(&mut stream, shared).await?;
    tracing::debug!(%to, from = %theirs.from, join, "push-pull answered");
    let mut g = shared.gossip();
    g.note_pushed(covers);
    g.merge_push_pull(theirs, shared.now());
    shared.notify_if_changed(&mut g);
    Counters::bump(&shared.counters.push_pulls);
    Ok(())
}

/// Serves push-pulls: at most `max_push_pulls` at once (more are closed at once and
/// counted), each bounded in size and, as a whole exchange, in time.
async fn serve_push_pull(shared: Arc<Shared>, listener: TcpListener) {
    // Accept/receive errors (e.g. EMFILE) pause the loop, doubling up to 1 s, so a
    // lack of descriptors never spins a core.
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(error) => {
                // EMFILE and friends: retrying at once would spin; wait, then retry.
                Counters::bump(&shared.counters.socket_errors);
                shared.log.warn(
                    "tcp_accept",
                    |s| tracing::warn!(%error, suppressed = s, "accepting a push-pull failed; backing off"),
                );
                tokio::time::sleep(backoff.failed()).await;
                continue;
            }
        };
        let Ok(slot) = shared.push_pull_slots.clone().try_acquire_owned() else {
            Counters::bump(&shared.counters.dropped_busy);
            shared.log.warn(
                "tcp_busy",
                |s| tracing::warn!(%peer, suppressed = s, "too many push-pulls at once; closed a connection"),
            );
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut stream = stream;
            match timeout(EXCHANGE_TIMEOUT, serve_one(&shared, &mut stream)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => shared.log.warn(
                    error.reason(),
                    |s| tracing::warn!(%peer, %error, suppressed = s, "dropped a bad push-pull"),
                ),
                Err(_) => {
                    Counters::bump(&shared.counters.timed_out);
                    shared
                        .log
                        .warn("tcp_timeout", |s| tracing::warn!(%peer, suppressed = s, "push-pull timed out"))
                }
            }
        });
    }
}

async fn serve_one(shared: &Shared, stream: &mut TcpStream) -> Result<(), ExchangeError> {
    let theirs = read_frame(stream, shared).await?;
    // Merge first: the peer's own store says which networks it takes part in, and the
    // answer is filtered by that, unless the peer joins or resyncs: then it gets all.
    let mine = {
        let mut g = shared.gossip();
        let peer = theirs.from.clone();
        let everything = theirs.join;
        g.merge_push_pull(theirs, shared.now());
        shared.notify_if_changed(&mut g);
        g.push_pull_for((!everything).then_some(peer.as_str()), false)
    };
    let covers = mine.covers;
    write_frame(stream, shared, mine).await?;
    shared.gossip().note_pushed(covers);
    Counters::bump(&shared.counters.push_pulls);
    Ok(())
}

/// At most one warning per reason per [`LOG_PERIOD`]; the rest are counted and the
/// count rides on the next warning (the counters in `meshctl status` carry the detail).
#[derive(Default)]
struct LogLimiter {
    reasons: Mutex<HashMap<&'static str, LogState>>,
}

#[derive(Default)]
struct LogState {
    last: Option<Instant>,
    suppressed: u64,
    suppressed_total: u64,
}

impl LogLimiter {
    /// Calls `log` with the number of warnings suppressed since the last one, unless a
    /// warning for `reason` went out less than [`LOG_PERIOD`] ago.
    fn warn(&self, reason: &'static str, log: impl FnOnce(u64)) {
        let suppressed = {
            let mut reasons = self.reasons.lock();
            let state = reasons.entry(reason).or_default();
            let now = Instant::now();
            if state.last.is_some_and(|t| now.duration_since(t) < LOG_PERIOD) {
                state.suppressed += 1;
                state.suppressed_total += 1;
                return;
            }
            state.last = Some(now);
            std::mem::take(&mut state.suppressed)
        };
        log(suppressed);
    }

    fn suppressed_total(&self) -> BTreeMap<&'static str, u64> {
        self.reasons.lock().iter().map(|(k, v)| (*k, v.suppressed_total)).collect()
    }
}

/// Sends a final round of packets announcing that this node leaves.
pub async fn leave(shared: &Arc<Shared>, udp: &UdpSocket) {
    let outs = shared.gossip().leave(shared.now());
    send_all(shared, udp, outs).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        gossip::{seal::Key, sim::task_endpoint, Config},
        model::Key as StoreKey,
        store::Store,
    };

    fn shared(keyring: &Keyring) -> Arc<Shared> {
        let gossip = Gossip::new(
            Config::default(),
            "n1".into(),
            "127.0.0.1:7946".parse().unwrap(),
            1,
            Store::default(),
            1,
            0,
        );
        Arc::new(Shared::new(gossip, keyring.clone(), Instant::now(), 1400))
    }

    /// A push-pull frame from "n2" carrying one live task endpoint, sent at `sent_at`.
    fn frame(keyring: &Keyring, seq: u64, sent_at: u64) -> Vec<u8> {
        let mut store = Store::default();
        store.put("n2", task_endpoint("web.1"));
        let frame = PushPull {
            from: "n2".into(),
            join: false,
            complete: true,
            covers: 0,
            epoch: 7,
            seq,
            sent_at_ms: sent_at,
            members: vec![],
            store,
        };
        let sealed = keyring.seal(&encode(&frame));
        let mut bytes = (sealed.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&sealed);
        bytes
    }

    /// Sends `bytes` as one push-pull and reads whatever answer comes (none if dropped).
    async fn exchange(addr: SocketAddr, bytes: &[u8]) -> usize {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        let _ = timeout(Duration::from_secs(2), stream.read_to_end(&mut answer)).await;
        answer.len()
    }

    #[tokio::test]
    async fn replayed_or_stale_push_pull_frames_change_nothing() {
        let keyring = Keyring::single(Key::generate());
        let shared = shared(&keyring);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_push_pull(shared.clone(), listener));
        let has_entry = |s: &Shared| s.gossip().store().entry(&StoreKey::endpoint("web.1")).is_some();
        let replays = || shared.counters.dropped_replay.load(Ordering::Relaxed);

        // Recorded long ago (older than half the tombstone TTL): refused, not merged.
        let half_ttl = Config::default().tombstone_ttl / 2;
        assert_eq!(exchange(addr, &frame(&keyring, 1, crate::wall_clock_ms() - half_ttl - 60_000)).await, 0);
        assert!(!has_entry(&shared), "a stale frame was merged");
        assert_eq!(replays(), 1);

        // A fresh frame is merged and answered...
        let fresh = frame(&keyring, 2, crate::wall_clock_ms());
        assert!(exchange(addr, &fresh).await > 0);
        assert!(has_entry(&shared));
        // ...and the same bytes again are a replay: dropped, unanswered.
        shared.gossip.lock().delete(&StoreKey::endpoint("web.1"), 1);
        shared.gossip.lock().tick(Config::default().tombstone_ttl + 10);
        assert_eq!(exchange(addr, &fresh).await, 0);
        assert_eq!(replays(), 2);
        assert!(
            shared.gossip().store().get(&StoreKey::endpoint("web.1")).is_none(),
            "the replay resurrected it"
        );
    }

    #[tokio::test]
    async fn oversized_announcements_are_refused_before_reading_and_excess_connections_closed() {
        let keyring = Keyring::single(Key::generate());
        let shared = shared(&keyring);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_push_pull(shared.clone(), listener));
        // Announces 60 MiB: refused on the header alone.
        assert_eq!(exchange(addr, &(60u32 << 20).to_be_bytes()).await, 0);
        assert_eq!(shared.counters.dropped_oversized.load(Ordering::Relaxed), 1);
        // Hold every slot with a slow sender; the next connection is closed at once.
        let cap = Config::default().max_push_pulls;
        let mut held = Vec::new();
        for _ in 0..cap {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&1000u32.to_be_bytes()).await.unwrap();
            held.push(s);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while shared.push_pull_slots.available_permits() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(exchange(addr, &frame(&keyring, 1, crate::wall_clock_ms())).await, 0);
        assert_eq!(shared.counters.dropped_busy.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn drop_warnings_are_rate_limited_per_reason() {
        let limiter = LogLimiter::default();
        let mut logged = Vec::new();
        for _ in 0..100 {
            limiter.warn("a", |s| logged.push(("a", s)));
            limiter.warn("b", |s| logged.push(("b", s)));
        }
        assert_eq!(logged, vec![("a", 0), ("b", 0)]);
        assert_eq!(limiter.suppressed_total()["a"], 99);
    }

    #[test]
    fn freshness_allows_skew_both_ways_within_the_bound() {
        assert!(frame_is_fresh(1_000, 1_500, 600));
        assert!(frame_is_fresh(1_500, 1_000, 600));
        assert!(!frame_is_fresh(1_000, 2_000, 600));
        assert!(!frame_is_fresh(3_000, 2_000, 600));
    }
}
