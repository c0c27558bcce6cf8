//! Moves the bytes of one relayed TCP connection both ways, holding no buffer while the
//! connection is idle.
//!
//! Each direction reads into its thread's one shared buffer and writes straight on; only
//! bytes the destination cannot take at once are copied into a buffer of the connection's
//! own, freed once written. A direction that fills the whole shared buffer in one read is
//! a bulk flow: from then on it moves bytes with `splice(2)` through a pipe, socket to
//! pipe to socket, without copying them through userspace. Pipes come from a small pool
//! per thread and go back to it as soon as they are empty, so an idle connection holds
//! neither memory nor extra descriptors.
//!
//! Half-close is relayed like `tokio::io::copy_bidirectional`: the end of one side's
//! bytes shuts down the write side towards the other, and the relay finishes when both
//! directions have. This module knows sockets only; limits and timeouts are the proxy's.

use std::{
    cell::RefCell,
    future::Future,
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    pin::Pin,
    task::{ready, Context, Poll},
};

use nix::{
    fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags},
    unistd::pipe2,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::tcp::{ReadHalf, WriteHalf},
};

use super::RELAY_BUFFER;

/// Pipes a worker thread holds at most, in use or pooled (two descriptors each). A bulk
/// direction that finds none left relays by copying instead.
pub const PIPES_PER_THREAD: usize = 64;

/// Capacity asked of each pipe, and the most one splice moves: four times a relay buffer,
/// so a bulk flow makes a quarter of the syscalls. The kernel may give less (then a
/// splice moves what fits).
pub const PIPE_SIZE: usize = 256 * 1024;

/// Empty pipes kept for reuse per thread: enough for the bulk flows that are moving data
/// at the same instant, so a busy worker rarely creates one.
const POOLED_PIPES: usize = 16;

thread_local! {
    /// The buffer every copying direction on this thread reads into: a read is written on
    /// without an await in between, so connections share it instead of holding their own.
    static SHARED_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; RELAY_BUFFER].into_boxed_slice());

    /// This thread's pipes: the pooled ones and how many exist.
    static PIPES: RefCell<PipePool> = const { RefCell::new(PipePool { idle: Vec::new(), live: 0 }) };
}

/// How one relay moves bytes in bulk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BulkMode {
    /// Splice through a pipe once a direction fills a whole buffer in one read.
    Splice,
    /// Always copy through the shared buffer.
    Copy,
}

/// A pipe for splicing: bytes enter at `write`, leave at `read`.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

struct PipePool {
    idle: Vec<Pipe>,
    /// Pipes of this thread that exist, pooled or in use.
    live: usize,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one while under the cap.
    fn take() -> Option<Pipe> {
        PIPES.with_borrow_mut(|pool| {
            if let Some(pipe) = pool.idle.pop() {
                return Some(pipe);
            }
            if pool.live >= PIPES_PER_THREAD {
                return None;
            }
            let (read, write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).ok()?;
            // Best effort: a pipe of the default 64 KiB works too.
            let _ = fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
            pool.live += 1;
            Some(Pipe { read, write })
        })
    }

    /// Gives back an empty pipe: pooled, or closed if the pool is full.
    fn put(self) {
        let closed = PIPES.with_borrow_mut(|pool| {
            if pool.idle.len() < POOLED_PIPES {
                pool.idle.push(self);
                None
            } else {
                Some(self)
            }
        });
        drop(closed);
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        // Pipes never leave their thread (each worker's runtime is single-threaded); at
        // thread exit the pool may already be gone, and then there is nothing to count.
        let _ = PIPES.try_with(|pool| {
            if let Ok(mut pool) = pool.try_borrow_mut() {
                pool.live = pool.live.saturating_sub(1);
            }
        });
    }
}

/// Bytes read but not yet written: the destination was full.
struct Held {
    bytes: Vec<u8>,
    start: usize,
}

/// One direction of a relay.
#[derive(Default)]
struct Direction {
    held: Option<Held>,
    /// The pipe holding `in_pipe` spliced bytes, while it holds any.
    pipe: Option<Pipe>,
    in_pipe: usize,
    /// Splices instead of copying (it filled a whole buffer once).
    bulk: bool,
    read_eof: bool,
    done: bool,
}

impl Direction {
    /// Moves bytes from `src` to `dst` until `src` has none ready or `dst` takes no more
    /// (Pending), or `src` ended and `dst`'s write side is shut (Ready).
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut ReadHalf<'_>,
        dst: &mut WriteHalf<'_>,
        mode: BulkMode,
        on_data: &impl Fn(usize),
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(held) = &mut self.held {
                while held.start < held.bytes.len() {
                    let n = ready!(Pin::new(&mut *dst).poll_write(cx, &held.bytes[held.start..]))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    held.start += n;
                }
                self.held = None;
            }
            if self.in_pipe > 0 {
                let pipe = self.pipe.as_ref().expect("bytes in a pipe without a pipe");
                let out = dst.as_ref();
                ready!(out.poll_write_ready(cx))?;
                match out.try_io(Interest::WRITABLE, || splice_once(&pipe.read, out, self.in_pipe)) {
                    Ok(n) => self.in_pipe -= n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            if let Some(pipe) = self.pipe.take() {
                pipe.put();
            }
            if self.read_eof {
                ready!(Pin::new(&mut *dst).poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
            if self.bulk {
                let input = src.as_ref();
                ready!(input.poll_read_ready(cx))?;
                let Some(pipe) = Pipe::take() else {
                    // Out of pipes (or descriptors): copying still works.
                    self.bulk = false;
                    continue;
                };
                match input.try_io(Interest::READABLE, || splice_once(input, &pipe.write, PIPE_SIZE)) {
                    Ok(0) => {
                        pipe.put();
                        self.read_eof = true;
                    }
                    Ok(n) => {
                        on_data(n);
                        self.pipe = Some(pipe);
                        self.in_pipe = n;
                    }
                    Err(e) => {
                        pipe.put();
                        if e.kind() != io::ErrorKind::WouldBlock {
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                continue;
            }
            ready!(self.poll_copy_once(cx, src, dst, mode, on_data))?;
        }
    }

    /// One read into the thread's shared buffer and as much of its write as `dst` takes;
    /// the rest is held.
    fn poll_copy_once(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut ReadHalf<'_>,
        dst: &mut WriteHalf<'_>,
        mode: BulkMode,
        on_data: &impl Fn(usize),
    ) -> Poll<io::Result<()>> {
        SHARED_BUFFER.with_borrow_mut(|buf| {
            let mut read = ReadBuf::new(buf);
            ready!(Pin::new(&mut *src).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                self.read_eof = true;
                return Poll::Ready(Ok(()));
            }
            on_data(n);
            if n == buf.len() && mode == BulkMode::Splice {
                self.bulk = true;
            }
            let mut written = 0;
            while written < n {
                match Pin::new(&mut *dst).poll_write(cx, &buf[written..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(w)) => written += w,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The destination is full and will wake us: keep the rest.
                        self.held = Some(Held { bytes: buf[written..n].to_vec(), start: 0 });
                        break;
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
    }
}

/// One non-blocking splice of at most `len` bytes.
fn splice_once(from: &impl AsFd, to: &impl AsFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(splice(from, None, to, None, len, flags)?)
}

/// Relays between `client` and `upstream` until both directions have ended (or either
/// fails); calls `on_data(towards_client, bytes)` whenever bytes arrived from either
/// side.
pub struct Relay<'a, F> {
    client: (ReadHalf<'a>, WriteHalf<'a>),
    upstream: (ReadHalf<'a>, WriteHalf<'a>),
    to_upstream: Direction,
    to_client: Direction,
    mode: BulkMode,
    on_data: F,
}

impl<'a, F: Fn(bool, usize)> Relay<'a, F> {
    /// A relay between the halves of two connected streams.
    pub fn new(
        client: (ReadHalf<'a>, WriteHalf<'a>),
        upstream: (ReadHalf<'a>, WriteHalf<'a>),
        mode: BulkMode,
        on_data: F,
    ) -> Self {
        Relay {
            client,
            upstream,
            to_upstream: Direction::default(),
            to_client: Direction::default(),
            mode,
            on_data,
        }
    }
}

impl<F: Fn(bool, usize) + Unpin> Future for Relay<'_, F> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every field is Unpin (halves, plain state, a closure that must be Unpin too for
        // this to compile): no pinning projection needed.
        let this = self.get_mut();
        let mode = this.mode;
        let on_data = &this.on_data;
        let (up, down) = (|n| on_data(false, n), |n| on_data(true, n));
        if !this.to_upstream.done {
            if let Poll::Ready(result) =
                this.to_upstream.poll_move(cx, &mut this.client.0, &mut this.upstream.1, mode, &up)
            {
                result?;
                this.to_upstream.done = true;
            }
        }
        if !this.to_client.done {
            if let Poll::Ready(result) =
                this.to_client.poll_move(cx, &mut this.upstream.0, &mut this.client.1, mode, &down)
            {
                result?;
                this.to_client.done = true;
            }
        }
        if this.to_upstream.done && this.to_client.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }
}
