//! The proxy's worker threads: one per core, each running its own current-thread tokio
//! runtime and its own `SO_REUSEPORT` listener for every published TCP port. The kernel
//! spreads new connections over the listeners; a connection is accepted, relayed and
//! closed on one thread, so nothing of it ever crosses threads (no work stealing, no
//! cross-core wake-ups, and the relay buffers can be per-thread).
//!
//! This module owns threads and listening sockets only; what a worker does with a
//! connection is the proxy's (`serve_tcp`).

use std::{
    io,
    net::{SocketAddr, TcpListener as StdTcpListener},
    num::NonZeroUsize,
    thread,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{runtime, sync::oneshot};

/// Pending connections each listener queues before the kernel drops SYNs (capped by
/// `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// Worker threads, stopped (with the connections they relay) when dropped.
pub(crate) struct Workers {
    handles: Vec<runtime::Handle>,
    /// Dropping a sender ends its worker's `block_on`; the runtime then drops its tasks.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `count` workers (0: one per core), each on its own current-thread runtime
    /// (`per_core`), or all on one multi-thread runtime whose threads steal each other's
    /// tasks (so a connection may move between threads).
    pub(crate) fn start(count: usize, per_core: bool) -> io::Result<Workers> {
        let count = match count {
            0 => thread::available_parallelism().map_or(1, NonZeroUsize::get),
            n => n,
        };
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        let runtimes = if per_core { count } else { 1 };
        for index in 0..runtimes {
            let rt = if per_core {
                runtime::Builder::new_current_thread().enable_all().build()?
            } else {
                runtime::Builder::new_multi_thread()
                    .worker_threads(count)
                    .thread_name("meshd-proxy")
                    .enable_all()
                    .build()?
            };
            let (stop, stopped) = oneshot::channel::<()>();
            let copies = if per_core { 1 } else { count };
            handles.extend(std::iter::repeat_n(rt.handle().clone(), copies));
            stops.push(stop);
            thread::Builder::new().name(format!("meshd-proxy-{index}")).spawn(move || {
                // Runs until the pool is dropped (the sender's drop resolves this).
                let _ = rt.block_on(stopped);
            })?;
        }
        Ok(Workers { handles, _stop: stops })
    }

    /// The runtimes of the workers, one per thread.
    pub(crate) fn handles(&self) -> &[runtime::Handle] {
        &self.handles
    }
}

/// A listening TCP socket on `addr` that other sockets of this process can share
/// (`SO_REUSEPORT`): one per worker. A port held by another program without
/// `SO_REUSEPORT` still fails with `AddrInUse`.
pub(crate) fn reuseport_listener(addr: SocketAddr) -> io::Result<StdTcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}
