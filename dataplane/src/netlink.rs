//! A thin rtnetlink client: one socket per network namespace, every request bounded by
//! [`TIMEOUT`], many requests pipelined on one socket. It sends what it is given and
//! reports what the kernel answered; which objects should exist is decided elsewhere.

use std::{future::Future, path::Path, time::Duration};

use futures::{future::join_all, StreamExt};
use rtnetlink::{
    packet_core::{
        NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
        NLM_F_REQUEST,
    },
    packet_route::RouteNetlinkMessage,
    Handle,
};

use crate::{Error, Result};

/// The longest any one netlink request (or dump) may take: the kernel answers in
/// microseconds, so a request still open after this is wedged, and the caller gets an
/// error instead of an agent that hangs.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// How a change treats an object that exists already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Create; fail if it exists (`ip ... add`).
    Create,
    /// Create or overwrite (`ip ... replace`).
    Replace,
    /// Change an existing object (`ip link set`, `... del`).
    Change,
}

impl Mode {
    fn flags(self) -> u16 {
        NLM_F_REQUEST
            | NLM_F_ACK
            | match self {
                Mode::Create => NLM_F_CREATE | NLM_F_EXCL,
                Mode::Replace => NLM_F_CREATE | NLM_F_REPLACE,
                Mode::Change => 0,
            }
    }
}

/// A route-netlink socket bound to one network namespace.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: Handle,
}

/// One change request and the `ip`/`bridge` command that says the same, for logs and
/// error messages.
pub struct Change {
    /// The message.
    pub message: RouteNetlinkMessage,
    /// How it treats an existing object.
    pub mode: Mode,
    /// The equivalent iproute2 command line.
    pub command: String,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace; its connection runs on
    /// the current tokio runtime.
    pub fn connect() -> Result<Netlink> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| Error::io("opening a netlink socket", e))?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Opens a socket inside the network namespace at `netns`: a short-lived thread enters
    /// it with setns and creates the socket there (a socket stays in the namespace it was
    /// created in); the connection then runs on the current runtime. The calling thread
    /// never changes namespace.
    pub fn connect_in(netns: &Path) -> Result<Netlink> {
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle) = crate::netns::run_in(netns, || {
            let _guard = runtime.enter();
            let (connection, handle, _) = rtnetlink::new_connection()
                .map_err(|e| Error::io(format!("opening a netlink socket in {}", netns.display()), e))?;
            Ok::<_, Error>((connection, handle))
        })??;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Sends one change and waits for the kernel's acknowledgement.
    pub async fn apply(&self, change: Change) -> Result<()> {
        self.apply_all(vec![change]).await.pop().unwrap_or(Ok(()))
    }

    /// Sends every change at once on this socket (the kernel handles them in order) and
    /// then collects the acknowledgements: one round trip's latency for the whole batch
    /// instead of one per change. Returns one result per change, in order.
    pub async fn apply_all(&self, changes: Vec<Change>) -> Vec<Result<()>> {
        let mut pending = Vec::with_capacity(changes.len());
        for change in changes {
            tracing::debug!("{}", change.command);
            let mut request = NetlinkMessage::from(change.message);
            request.header.flags = change.mode.flags();
            let command = change.command;
            match self.handle.clone().request(request) {
                Ok(responses) => pending.push(Ok((command, responses))),
                Err(_) => pending.push(Err(Error::Netlink {
                    command,
                    message: "the netlink connection is closed".into(),
                })),
            }
        }
        let acks = pending.into_iter().map(|p| async move {
            let (command, mut responses) = p?;
            bounded(&command, async {
                while let Some(message) = responses.next().await {
                    if let NetlinkPayload::Error(err) = message.payload {
                        if err.code.is_some() {
                            return Err(Error::Netlink {
                                command: command.clone(),
                                message: err.to_io().to_string(),
                            });
                        }
                    }
                }
                Ok(())
            })
            .await
        });
        join_all(acks).await
    }

    /// Dumps a table (links, addresses, routes, neighbours, rules) and returns its
    /// entries.
    pub async fn dump(&self, request: RouteNetlinkMessage, what: &str) -> Result<Vec<RouteNetlinkMessage>> {
        let mut request = NetlinkMessage::from(request);
        request.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut responses = self.handle.clone().request(request).map_err(|_| Error::Netlink {
            command: what.into(),
            message: "the netlink connection is closed".into(),
        })?;
        bounded(what, async {
            let mut out = Vec::new();
            while let Some(message) = responses.next().await {
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Error(err) if err.code.is_some() => {
                        return Err(Error::Netlink { command: what.into(), message: err.to_io().to_string() })
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
        .await
    }

    /// Sends one request that is answered with one message (e.g. `RTM_GETLINK` by name).
    /// `Ok(None)` when the kernel says the object does not exist.
    pub async fn get(&self, request: RouteNetlinkMessage, what: &str) -> Result<Option<RouteNetlinkMessage>> {
        let mut request = NetlinkMessage::from(request);
        request.header.flags = NLM_F_REQUEST;
        let mut responses = self.handle.clone().request(request).map_err(|_| Error::Netlink {
            command: what.into(),
            message: "the netlink connection is closed".into(),
        })?;
        bounded(what, async {
            let mut out = None;
            while let Some(message) = responses.next().await {
                match message.payload {
                    NetlinkPayload::InnerMessage(inner) => out = Some(inner),
                    NetlinkPayload::Error(err) if err.raw_code() == -libc_enodev() => return Ok(None),
                    NetlinkPayload::Error(err) if err.code.is_some() => {
                        return Err(Error::Netlink { command: what.into(), message: err.to_io().to_string() })
                    }
                    _ => {}
                }
            }
            Ok(out)
        })
        .await
    }
}

/// ENODEV: what the kernel answers for a link that does not exist.
fn libc_enodev() -> i32 {
    nix::errno::Errno::ENODEV as i32
}

/// Whether `error` says the object was not there (a deletion that found nothing to do).
pub fn is_absent(error: &Error) -> bool {
    match error {
        Error::Netlink { message, .. } => {
            message.contains("No such file")
                || message.contains("No such device")
                || message.contains("No such process")
                || message.contains("Cannot assign requested address")
        }
        _ => false,
    }
}

async fn bounded<T>(what: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(TIMEOUT, work).await.unwrap_or_else(|_| Err(Error::Timeout { command: what.into() }))
}
