//! The userspace proxy that serves published ports on a node: it accepts on
//! `0.0.0.0:PUBLISHED` and relays each TCP connection (or UDP flow) to one backend
//! chosen round-robin, trying the next backend when one refuses. Listeners are
//! long-lived; their backend lists are swapped in place as the cluster changes.

use std::{
    collections::HashMap,
    fmt,
    net::{Ipv4Addr, SocketAddr},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
    time::timeout,
};

use crate::{lb::RoundRobin, Error, Result};

/// How long a connect to one backend may take before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Relay buffer per direction: large enough that bulk transfers move in few syscalls
/// (tokio's default of 8 KiB caps a relayed stream at a fraction of the link).
pub const RELAY_BUFFER: usize = 64 * 1024;

/// How long a UDP flow may stay silent before its relay socket is closed.
pub const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(format!("unknown protocol {other:?}: use tcp or udp")),
        }
    }
}

/// The backends of one listener, swapped whole when they change.
type Backends = Arc<RwLock<Arc<[SocketAddr]>>>;

struct Listener {
    backends: Backends,
    task: JoinHandle<()>,
}

/// All published-port listeners of this node.
#[derive(Default)]
pub struct Proxy {
    listeners: HashMap<(Proto, u16), Listener>,
}

impl Proxy {
    /// Starts serving `port`, or updates its backends if it is served already.
    pub async fn publish(&mut self, proto: Proto, port: u16, backends: Vec<SocketAddr>) -> Result<()> {
        if let Some(listener) = self.listeners.get(&(proto, port)) {
            *listener.backends.write() = backends.into();
            return Ok(());
        }
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let backends: Backends = Arc::new(RwLock::new(backends.into()));
        let task = match proto {
            Proto::Tcp => {
                let listener =
                    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
                tokio::spawn(serve_tcp(listener, backends.clone()))
            }
            Proto::Udp => {
                let socket = UdpSocket::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
                tokio::spawn(serve_udp(Arc::new(socket), backends.clone()))
            }
        };
        tracing::info!(%proto, port, "serving published port");
        self.listeners.insert((proto, port), Listener { backends, task });
        Ok(())
    }

    /// Stops serving `port`: new connections are refused at once; connections already
    /// relayed run on until either side closes.
    pub fn unpublish(&mut self, proto: Proto, port: u16) -> bool {
        match self.listeners.remove(&(proto, port)) {
            Some(listener) => {
                listener.task.abort();
                tracing::info!(%proto, port, "stopped serving published port");
                true
            }
            None => false,
        }
    }

    /// The ports served now.
    pub fn ports(&self) -> impl Iterator<Item = (Proto, u16)> + '_ {
        self.listeners.keys().copied()
    }

    /// The ports served now with their backends: the proxy's side of what the reconciler
    /// observes.
    pub fn served(&self) -> impl Iterator<Item = ((Proto, u16), Vec<SocketAddr>)> + '_ {
        self.listeners.iter().map(|(key, listener)| (*key, listener.backends.read().to_vec()))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for listener in self.listeners.values() {
            listener.task.abort();
        }
    }
}

async fn serve_tcp(listener: TcpListener, backends: Backends) {
    let rr = Arc::new(RoundRobin::default());
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let snapshot = backends.read().clone();
        let rr = rr.clone();
        tokio::spawn(async move {
            if let Err(error) = relay_tcp(client, &snapshot, &rr).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

async fn relay_tcp(mut client: TcpStream, backends: &[SocketAddr], rr: &RoundRobin) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    for backend in rr.order(backends) {
        match timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
            Ok(Ok(mut upstream)) => {
                let _ = upstream.set_nodelay(true);
                tokio::io::copy_bidirectional_with_sizes(
                    &mut client,
                    &mut upstream,
                    RELAY_BUFFER,
                    RELAY_BUFFER,
                )
                .await?;
                return Ok(());
            }
            Ok(Err(error)) => tracing::debug!(%backend, %error, "backend refused; trying the next"),
            Err(_) => tracing::debug!(%backend, "backend connect timed out; trying the next"),
        }
    }
    // No backend answered: closing the client tells it so.
    Ok(())
}

async fn serve_udp(socket: Arc<UdpSocket>, backends: Backends) {
    let rr = RoundRobin::default();
    let flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((len, client)) = socket.recv_from(&mut buf).await else { continue };
        let existing = flows.lock().get(&client).cloned();
        let upstream = match existing {
            Some(upstream) => upstream,
            None => {
                let snapshot = backends.read().clone();
                let Some(backend) = rr.order(&snapshot).next().copied() else { continue };
                match open_udp_flow(backend).await {
                    Ok(upstream) => {
                        flows.lock().insert(client, upstream.clone());
                        tokio::spawn(relay_udp_replies(
                            socket.clone(),
                            upstream.clone(),
                            client,
                            flows.clone(),
                        ));
                        upstream
                    }
                    Err(error) => {
                        tracing::debug!(%backend, %error, "cannot open UDP flow");
                        continue;
                    }
                }
            }
        };
        let _ = upstream.send(&buf[..len]).await;
    }
}

async fn open_udp_flow(backend: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let upstream = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    upstream.connect(backend).await?;
    Ok(Arc::new(upstream))
}

async fn relay_udp_replies(
    socket: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    flows: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(len)) = timeout(UDP_IDLE_TIMEOUT, upstream.recv(&mut buf)).await {
        let _ = socket.send_to(&buf[..len], client).await;
    }
    flows.lock().remove(&client);
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn named_server(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(name.as_bytes()).await;
            }
        });
        addr
    }

    async fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port()
    }

    async fn fetch(port: u16) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn relays_round_robin_and_skips_a_dead_backend() {
        let a = named_server("a").await;
        let b = named_server("b").await;
        let dead = SocketAddr::from(([127, 0, 0, 1], free_port().await));
        let port = free_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Tcp, port, vec![a, dead, b]).await.unwrap();
        let mut seen = Vec::new();
        for _ in 0..6 {
            seen.push(fetch(port).await);
        }
        assert!(seen.iter().all(|s| s == "a" || s == "b"), "{seen:?}");
        assert!(seen.contains(&"a".into()) && seen.contains(&"b".into()), "{seen:?}");
    }

    #[tokio::test]
    async fn unpublish_refuses_new_connections() {
        let a = named_server("a").await;
        let port = free_port().await;
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Tcp, port, vec![a]).await.unwrap();
        assert_eq!(fetch(port).await, "a");
        assert!(proxy.unpublish(Proto::Tcp, port));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "port still accepts");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_taken_port_is_a_bind_error() {
        let held = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = held.local_addr().unwrap().port();
        let err = Proxy::default().publish(Proto::Tcp, port, vec![]).await.unwrap_err();
        assert!(matches!(err, Error::Bind { .. }), "{err}");
    }

    #[tokio::test]
    async fn relays_udp_both_ways() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                let _ = echo.send_to(&buf[..n], from).await;
            }
        });
        let port = UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let mut proxy = Proxy::default();
        proxy.publish(Proto::Udp, port, vec![echo_addr]).await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(("127.0.0.1", port)).await.unwrap();
        client.send(b"ping").await.unwrap();
        let mut buf = [0u8; 64];
        let n = timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"ping");
    }
}
