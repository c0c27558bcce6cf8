//! `meshd-testsrv`: the tiny server that plays a task in tests, benchmarks and the
//! demo. HTTP/1.1 (keep-alive, so load generators measure the path, not the handshake)
//! answering every request with its task name, on `--listen ADDR` (default 0.0.0.0:80).
//! `GET /peer` answers `TASK PEER_IP:PEER_PORT`: the address the connection came from as
//! the task sees it, so tests can tell whether a path kept the client's address (or,
//! after a PROXY protocol v2 header, the client the header names). On UDP at the same
//! address it answers every datagram with `TASK PEER_IP:PEER_PORT`.

use std::{net::SocketAddr, sync::Arc};

use meshd_dataplane::proxy::proxy_protocol::{self, SIGNATURE};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
};

/// Index just past the end of the first request head in `buf`, if complete.
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether the request asks for `/peer` (the task name and the connection's peer).
fn wants_peer(head: &[u8]) -> bool {
    head.split(|&b| b == b'\r').next().is_some_and(|line| line.split(|&b| b == b' ').nth(1) == Some(b"/peer"))
}

fn wants_close(head: &[u8]) -> bool {
    let text = String::from_utf8_lossy(head).to_ascii_lowercase();
    let http10 = text.lines().next().is_some_and(|l| l.trim_end().ends_with("http/1.0"));
    text.contains("connection: close") || http10 && !text.contains("connection: keep-alive")
}

async fn serve(mut stream: TcpStream, name: Arc<String>) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let body = format!("{name}\n");
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    // A connection that starts with a PROXY protocol v2 header (a port published with
    // `--proxy-protocol v2`): its peer is the client the header names.
    let mut peer = stream.peer_addr().ok();
    while buf.len() < SIGNATURE.len() && SIGNATURE.starts_with(&buf) {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.starts_with(&SIGNATURE) {
        loop {
            if let Some((client, len)) = proxy_protocol::parse(&buf) {
                peer = Some(client);
                buf.drain(..len);
                break;
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 || buf.len() > 512 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    let peer = match peer {
        Some(addr) => format!("{name} {addr}\n"),
        None => format!("{name} unknown\n"),
    };
    loop {
        while let Some(end) = head_end(&buf) {
            let close = wants_close(&buf[..end]);
            let body = if wants_peer(&buf[..end]) { &peer } else { &body };
            buf.drain(..end);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n{}",
                body.len(),
                if close { "Connection: close\r\n" } else { "" },
                body
            );
            stream.write_all(response.as_bytes()).await?;
            if close {
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 64 * 1024 {
            return Ok(()); // not HTTP; drop it
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut name = String::from("task");
    let mut listen: SocketAddr = "0.0.0.0:80".parse()?;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--name" => name = args.next().ok_or_else(|| anyhow::anyhow!("--name needs a value"))?,
            "--listen" => {
                listen = args.next().ok_or_else(|| anyhow::anyhow!("--listen needs a value"))?.parse()?
            }
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: meshd-testsrv [--name TASK] [--listen ADDR]"
            ),
        }
    }
    let name = Arc::new(name);
    let listener = TcpListener::bind(listen).await?;
    let udp = UdpSocket::bind(listen).await?;
    let udp_name = name.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((_, peer)) = udp.recv_from(&mut buf).await {
            let _ = udp.send_to(format!("{udp_name} {peer}\n").as_bytes(), peer).await;
        }
    });
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(serve(stream, name.clone()));
    }
}
