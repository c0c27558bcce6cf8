//! Serves the local API socket: one JSON request line in, one JSON response line out
//! per connection. The handlers themselves are in `handlers.rs`.
//!
//! Bounded like any other input: at most [`MAX_API_CLIENTS`] connections at once, a
//! request line of at most [`MAX_REQUEST`] bytes that must arrive within
//! [`REQUEST_READ_TIMEOUT`], and a backoff when `accept` fails. A client that connects
//! and sends nothing gives way to one that does: when every slot is taken, the oldest
//! connection still waiting for its request is closed for the newcomer, so a pile of
//! idle connections cannot lock meshctl out.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use meshd_dataplane::backoff::AcceptBackoff;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{unix::OwnedWriteHalf, UnixListener, UnixStream},
    sync::oneshot,
    time::timeout,
};

use super::Agent;
use crate::api::{
    Request, Response, MAX_API_CLIENTS, MAX_REQUEST, REQUEST_READ_TIMEOUT, RESPONSE_WRITE_TIMEOUT,
};

/// What the API server turned away, for `meshctl status`.
#[derive(Debug, Default)]
pub(super) struct ApiStats {
    /// Connections closed to make room while they had not sent a request.
    evicted_idle: AtomicU64,
    /// Connections answered "busy": every slot was handling a request.
    refused_busy: AtomicU64,
    /// Connections that sent no complete request line in time.
    read_timeouts: AtomicU64,
    /// Request lines over the size limit.
    oversized: AtomicU64,
    /// Failed accepts (e.g. out of file descriptors).
    accept_errors: AtomicU64,
}

impl ApiStats {
    /// The counters and limits as shown by `status`.
    pub(super) fn snapshot(&self) -> Value {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "max_clients": MAX_API_CLIENTS,
            "max_request_bytes": MAX_REQUEST,
            "request_read_timeout_secs": REQUEST_READ_TIMEOUT.as_secs(),
            "evicted_idle": get(&self.evicted_idle),
            "refused_busy": get(&self.refused_busy),
            "read_timeouts": get(&self.read_timeouts),
            "oversized": get(&self.oversized),
            "accept_errors": get(&self.accept_errors),
        })
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The connection slots: those still reading their request (oldest first, each with
/// the sender whose drop closes it) and the number being handled.
#[derive(Default)]
struct Slots {
    next_id: u64,
    reading: BTreeMap<u64, oneshot::Sender<()>>,
    handling: usize,
}

/// What admission decided for a new connection.
#[derive(Debug, PartialEq, Eq)]
enum Admit {
    /// A free slot.
    Free,
    /// The oldest connection still reading gives its slot up.
    EvictOldestReader,
    /// Every slot is handling a request.
    Busy,
}

/// Admission policy: pure over the slot counts.
fn admit(reading: usize, handling: usize, max: usize) -> Admit {
    if reading + handling < max {
        Admit::Free
    } else if reading > 0 {
        Admit::EvictOldestReader
    } else {
        Admit::Busy
    }
}

/// Accepts API connections until the task is dropped.
pub(super) async fn serve_api(listener: UnixListener, agent: Arc<Agent>) {
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut backoff = AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(error) => {
                bump(&agent.api_stats.accept_errors);
                let wait = backoff.failed();
                if backoff.warn_now(std::time::Instant::now()) {
                    tracing::warn!(%error, "accept failed on the API socket; backing off");
                }
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        let admitted = {
            let mut s = slots.lock();
            match admit(s.reading.len(), s.handling, MAX_API_CLIENTS) {
                Admit::Free => true,
                Admit::EvictOldestReader => {
                    // Dropping its sender wakes the reader, which closes.
                    s.reading.pop_first();
                    bump(&agent.api_stats.evicted_idle);
                    true
                }
                Admit::Busy => false,
            }
            .then(|| {
                let id = s.next_id;
                s.next_id += 1;
                let (evict, evicted) = oneshot::channel();
                s.reading.insert(id, evict);
                (id, evicted)
            })
        };
        let Some((id, evicted)) = admitted else {
            bump(&agent.api_stats.refused_busy);
            // A fresh socket's buffer takes one short line without blocking.
            let _ = stream.try_write(&line(&Response::Err {
                error: format!("meshd is handling {MAX_API_CLIENTS} API requests already; retry in a moment"),
            }));
            continue;
        };
        let agent = agent.clone();
        let slots = slots.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_one(stream, &agent, &slots, id, evicted).await {
                tracing::debug!(%error, "API connection failed");
            }
        });
    }
}

/// Gives a handling slot back when the request is done, however it ends.
struct Handling<'a>(&'a Mutex<Slots>);

impl Drop for Handling<'_> {
    fn drop(&mut self) {
        self.0.lock().handling -= 1;
    }
}

async fn serve_one(
    stream: UnixStream,
    agent: &Agent,
    slots: &Mutex<Slots>,
    id: u64,
    evicted: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    // One byte over the limit tells a full-sized line from an oversized one.
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let read = tokio::select! {
        read = timeout(REQUEST_READ_TIMEOUT, reader.read_until(b'\n', &mut line)) => read,
        _ = evicted => return Ok(()),
    };
    {
        let mut s = slots.lock();
        if s.reading.remove(&id).is_none() {
            return Ok(()); // evicted while its line arrived
        }
        s.handling += 1;
    }
    let _handling = Handling(slots);
    let response = match read {
        Err(_) => {
            bump(&agent.api_stats.read_timeouts);
            Response::Err {
                error: format!(
                    "no request line within {} s; meshctl sends it at once — is another program holding this socket open?",
                    REQUEST_READ_TIMEOUT.as_secs()
                ),
            }
        }
        Ok(Err(error)) => return Err(error),
        Ok(Ok(0)) => return Ok(()),
        Ok(Ok(_)) if line.len() > MAX_REQUEST => {
            bump(&agent.api_stats.oversized);
            Response::Err {
                error: format!(
                    "request larger than {} KiB; no meshctl request is that large — use a meshctl of the same version",
                    MAX_REQUEST >> 10
                ),
            }
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(request) => match agent.handle(request).await {
                Ok(ok) => Response::Ok { ok },
                Err(error) => Response::Err { error: error.to_string() },
            },
            Err(error) => Response::Err {
                error: format!("malformed request ({error}); use a meshctl of the same version"),
            },
        },
    };
    respond(&mut write, &response).await
}

async fn respond(write: &mut OwnedWriteHalf, response: &Response) -> std::io::Result<()> {
    timeout(RESPONSE_WRITE_TIMEOUT, write.write_all(&line(response))).await.map_err(std::io::Error::other)?
}

/// A response as the protocol sends it: one JSON line.
fn line(response: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(response).expect("responses always serialize");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_slot_is_taken_then_idle_readers_give_way_then_busy() {
        assert_eq!(admit(0, 0, 2), Admit::Free);
        assert_eq!(admit(1, 0, 2), Admit::Free);
        assert_eq!(admit(2, 0, 2), Admit::EvictOldestReader);
        assert_eq!(admit(1, 1, 2), Admit::EvictOldestReader);
        assert_eq!(admit(0, 2, 2), Admit::Busy);
    }
}
