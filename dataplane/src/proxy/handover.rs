//! Listening sockets that outlive a meshd process, so a restart refuses no connection.
//!
//! A small *keeper* process, started by the first meshd (`meshd --listener-keeper`, in
//! its own process group so a signal to meshd's group does not reach it), holds a
//! duplicate of every published port's listening socket, received over a unix
//! `SOCK_SEQPACKET` socket with `SCM_RIGHTS`. While no meshd runs — between a `kill -9`
//! or a SIGTERM and the next start — the sockets stay open: the kernel keeps completing
//! handshakes into their backlogs, and the next meshd takes the sockets back and
//! accepts those connections. A client sees a delay, never a refusal.
//!
//! The keeper gives up its sockets (and exits) when no meshd has been connected for its
//! hold time (`--listener-hold-secs`), so a node whose meshd is stopped for good refuses
//! connections again after that, as clients expect; `meshd --cleanup` ends it at once.
//!
//! Messages, one per packet: `PUT key` with one descriptor (replaces the key's), `DEL
//! prefix` (closes every key starting with it), `GET` (answered by one `FD key` packet
//! with its descriptor per key, then `END`), `QUIT`. Written here: a dozen lines of
//! protocol over `nix`'s sendmsg/recvmsg, for which no maintained crate exists.

use std::{
    collections::BTreeMap,
    io::{IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    cmsg_space,
    poll::{poll, PollFd, PollFlags, PollTimeout},
    sys::socket::{
        accept, bind, connect, listen, recvmsg, sendmsg, setsockopt, socket, sockopt, AddressFamily, Backlog,
        ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    },
    sys::time::TimeVal,
};

/// The longest message (a key is a port's protocol, number and worker index).
const MAX_MESSAGE: usize = 256;

fn io_error(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(io_error)
}

fn send(fd: &impl AsRawFd, text: &str, passed: Option<RawFd>) -> std::io::Result<()> {
    let fds = passed.map(|f| [f]);
    let cmsgs: Vec<ControlMessage> = fds.iter().map(|f| ControlMessage::ScmRights(f)).collect();
    sendmsg::<()>(fd.as_raw_fd(), &[IoSlice::new(text.as_bytes())], &cmsgs, MsgFlags::empty(), None)
        .map_err(io_error)?;
    Ok(())
}

/// One message and the descriptor it carried; `None` at the end of the stream.
fn receive(fd: &impl AsRawFd) -> std::io::Result<Option<(String, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let mut space = cmsg_space!([RawFd; 1]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io_error)?;
    let mut passed = None;
    for cmsg in msg.cmsgs().map_err(io_error)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us; nothing
                // else owns it. Extra ones (never sent by meshd) are closed here.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                passed.get_or_insert(owned);
            }
        }
    }
    let len = msg.bytes;
    if len == 0 {
        return Ok(None);
    }
    Ok(Some((String::from_utf8_lossy(&buf[..len]).into_owned(), passed)))
}

/// meshd's connection to its keeper.
#[derive(Debug)]
pub struct Keeper {
    conn: OwnedFd,
}

impl Keeper {
    /// Connects to the keeper at `path`, starting one with `start` if none answers
    /// (then waits up to 2 s for it).
    pub fn connect_or_start(
        path: &Path,
        start: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<Keeper> {
        if let Ok(keeper) = Keeper::connect(path) {
            return Ok(keeper);
        }
        start()?;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match Keeper::connect(path) {
                Ok(keeper) => return Ok(keeper),
                Err(error) if Instant::now() >= deadline => return Err(error),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// Connects to a running keeper.
    pub fn connect(path: &Path) -> std::io::Result<Keeper> {
        let conn = seqpacket()?;
        connect(conn.as_raw_fd(), &UnixAddr::new(path).map_err(io_error)?).map_err(io_error)?;
        // A keeper busy with another meshd (one that still runs) does not answer: give
        // up instead of waiting forever.
        let wait = TimeVal::new(2, 0);
        setsockopt(&conn, sockopt::ReceiveTimeout, &wait).map_err(io_error)?;
        setsockopt(&conn, sockopt::SendTimeout, &wait).map_err(io_error)?;
        Ok(Keeper { conn })
    }

    /// Every socket the keeper holds, by key (it keeps holding them too).
    pub fn take_all(&self) -> std::io::Result<BTreeMap<String, OwnedFd>> {
        send(&self.conn, "GET", None)?;
        let mut out = BTreeMap::new();
        loop {
            match receive(&self.conn)? {
                Some((text, fd)) if text == "END" => {
                    drop(fd);
                    return Ok(out);
                }
                Some((text, Some(fd))) => {
                    if let Some(key) = text.strip_prefix("FD ") {
                        out.insert(key.to_owned(), fd);
                    }
                }
                Some(_) => {}
                None => return Err(std::io::Error::other("the listener keeper hung up")),
            }
        }
    }

    /// Gives the keeper a duplicate of `socket` under `key`.
    pub fn put(&self, key: &str, socket: &impl AsFd) -> std::io::Result<()> {
        send(&self.conn, &format!("PUT {key}"), Some(socket.as_fd().as_raw_fd()))
    }

    /// Has the keeper close every socket whose key starts with `prefix`.
    pub fn delete(&self, prefix: &str) -> std::io::Result<()> {
        send(&self.conn, &format!("DEL {prefix}"), None)
    }

    /// Ends the keeper: its sockets close.
    pub fn quit(self) -> std::io::Result<()> {
        send(&self.conn, "QUIT", None)
    }
}

/// This process's side of the hand-over, shared by the proxy (published ports) and the
/// resolvers (`127.0.0.11:53` in each container): the sockets a previous meshd left
/// with the keeper, until each is served again, and the connection for new ones.
#[derive(Debug)]
pub struct Handover {
    keeper: parking_lot::Mutex<Keeper>,
    adopted: parking_lot::Mutex<std::collections::HashMap<String, OwnedFd>>,
}

impl Handover {
    /// Takes every socket `keeper` holds, to be claimed by key.
    pub fn new(keeper: Keeper) -> std::io::Result<std::sync::Arc<Handover>> {
        let adopted = keeper.take_all()?.into_iter().collect();
        Ok(std::sync::Arc::new(Handover {
            keeper: parking_lot::Mutex::new(keeper),
            adopted: parking_lot::Mutex::new(adopted),
        }))
    }

    /// How many sockets wait to be claimed.
    pub fn unclaimed(&self) -> usize {
        self.adopted.lock().len()
    }

    /// Claims the adopted sockets whose keys start with `prefix`.
    pub fn claim(&self, prefix: &str) -> std::collections::HashMap<String, OwnedFd> {
        let mut adopted = self.adopted.lock();
        let keys: Vec<String> = adopted.keys().filter(|k| k.starts_with(prefix)).cloned().collect();
        keys.into_iter().filter_map(|k| adopted.remove_entry(&k)).collect()
    }

    /// Gives the keeper a duplicate of `socket` under `key` (a failure is logged: the
    /// socket works, only a restart would refuse on it).
    pub fn put(&self, key: &str, socket: &impl AsFd) {
        if let Err(error) = self.keeper.lock().put(key, socket) {
            tracing::warn!(%error, key, "cannot hand a listening socket to the keeper; a restart would refuse on it");
        }
    }

    /// Has the keeper close the sockets whose keys start with `prefix`.
    pub fn delete(&self, prefix: &str) {
        if let Err(error) = self.keeper.lock().delete(prefix) {
            tracing::warn!(%error, prefix, "cannot tell the keeper to close sockets");
        }
    }

    /// Closes the adopted sockets nobody claimed (what they served is gone), here and
    /// in the keeper. Call after a whole reconcile pass.
    pub fn release_unclaimed(&self) {
        let keys: Vec<String> = std::mem::take(&mut *self.adopted.lock()).into_keys().collect();
        for key in keys {
            tracing::info!(key, "closing a socket left by a previous meshd: nothing here serves it any more");
            self.delete(&key);
        }
    }
}

/// The keeper's main loop (`meshd --listener-keeper PATH`): serves one meshd at a time
/// and exits `hold` after the last one left with none back, or on `QUIT`.
pub fn run_keeper(path: &Path, hold: Duration) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = seqpacket()?;
    bind(listener.as_raw_fd(), &UnixAddr::new(path).map_err(io_error)?).map_err(io_error)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    listen(&listener, Backlog::new(4).map_err(io_error)?).map_err(io_error)?;
    let _cleanup = RemoveOnDrop(path.to_owned());
    let mut held: BTreeMap<String, OwnedFd> = BTreeMap::new();
    loop {
        // Waiting for a meshd: at most `hold`, then the sockets are let go.
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let timeout =
            PollTimeout::try_from(hold.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => return Ok(()),
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(io_error(e)),
        }
        let Ok(raw) = accept(listener.as_raw_fd()) else { continue };
        // SAFETY: accept returned a new descriptor that nothing else owns.
        let conn = unsafe { OwnedFd::from_raw_fd(raw) };
        // Until this meshd hangs up (or dies: a failed send is the same), then the
        // next one is waited for; the sockets stay either way.
        loop {
            let Ok(Some((text, fd))) = receive(&conn) else { break };
            let (verb, arg) = text.split_once(' ').unwrap_or((text.as_str(), ""));
            match (verb, fd) {
                ("PUT", Some(fd)) => {
                    held.insert(arg.to_owned(), fd);
                }
                ("DEL", _) => held.retain(|key, _| !key.starts_with(arg)),
                ("GET", _) => {
                    let sent = held
                        .iter()
                        .try_for_each(|(key, fd)| send(&conn, &format!("FD {key}"), Some(fd.as_raw_fd())))
                        .and_then(|()| send(&conn, "END", None));
                    if sent.is_err() {
                        break;
                    }
                }
                ("QUIT", _) => return Ok(()),
                _ => {}
            }
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;

    #[test]
    fn a_keeper_holds_sockets_across_connections_until_deleted_or_quit() {
        let dir = std::env::temp_dir().join(format!("meshd-keeper-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keeper.sock");
        let server = {
            let path = path.clone();
            std::thread::spawn(move || run_keeper(&path, Duration::from_secs(5)))
        };
        let keeper = Keeper::connect_or_start(&path, || Ok(())).unwrap();
        let a = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        keeper.put("tcp/a/0", &a).unwrap();
        keeper.put("tcp/b/0", &b).unwrap();
        // The first meshd goes away: its copies close, the keeper's stay listening.
        drop((keeper, a));
        let keeper = Keeper::connect(&path).unwrap();
        let held = keeper.take_all().unwrap();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["tcp/a/0", "tcp/b/0"]);
        let adopted = TcpListener::from(held.into_iter().next().unwrap().1);
        assert_eq!(adopted.local_addr().unwrap().port(), port, "the same listening socket");
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("still listening");
        keeper.delete("tcp/b/").unwrap();
        assert_eq!(keeper.take_all().unwrap().keys().collect::<Vec<_>>(), ["tcp/a/0"]);
        keeper.quit().unwrap();
        server.join().unwrap().unwrap();
        assert!(!path.exists(), "the keeper removes its socket");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
