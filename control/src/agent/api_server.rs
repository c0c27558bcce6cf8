//! Serves the local API socket: one JSON request line in, one JSON response line out
//! per connection. The handlers themselves are in `handlers.rs`.

use std::sync::Arc;

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use super::Agent;
use crate::api::{Request, Response, MAX_LINE};

/// Accepts API connections until the task is dropped.
pub(super) async fn serve_api(listener: UnixListener, agent: Arc<Agent>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_one(stream, &agent).await {
                tracing::debug!(%error, "API connection failed");
            }
        });
    }
}

async fn serve_one(stream: UnixStream, agent: &Agent) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read).take(MAX_LINE as u64).read_line(&mut line).await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(request) => match agent.handle(request).await {
            Ok(ok) => Response::Ok { ok },
            Err(error) => Response::Err { error: error.to_string() },
        },
        Err(error) => {
            Response::Err { error: format!("malformed request ({error}); use a meshctl of the same version") }
        }
    };
    let mut out = serde_json::to_vec(&response).expect("responses always serialize");
    out.push(b'\n');
    write.write_all(&out).await
}
