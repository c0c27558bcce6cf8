//! The local API between `meshctl` and `meshd`: one JSON request per line on a unix
//! socket, answered by one JSON response line. Types and codec only; the agent serves
//! it and meshctl calls it.

use std::{path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::{
    model::{EndpointMode, PublishMode},
    spec::PortSpec,
};

/// Default path of the API socket.
pub const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";

/// Largest request line meshd reads: the largest real request (an attach with long
/// names and paths) is well under 1 KiB.
pub const MAX_REQUEST: usize = 64 << 10;

/// Largest response line meshctl reads (listings of a large cluster are big).
pub const MAX_RESPONSE: usize = 16 << 20;

/// Most API connections meshd serves at once. When all are taken, a new connection
/// closes the oldest one that has not sent its request yet; if every one is being
/// handled, the new one gets a "busy" error line.
pub const MAX_API_CLIENTS: usize = 64;

/// How long meshd waits for a connection's request line (meshctl sends it at once).
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long meshd waits for a client to take its response.
pub const RESPONSE_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long meshctl waits for an answer by default: longer than the slowest legitimate
/// command (publish and key rotate wait for the whole cluster).
pub const DEFAULT_CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A request to the local meshd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// `network create NAME --subnet CIDR`.
    NetworkCreate {
        /// Network name.
        name: String,
        /// Subnet, e.g. `10.0.0.0/24`.
        subnet: String,
        /// Interface MTU (default: underlay MTU − 50).
        #[serde(default)]
        mtu: Option<u32>,
    },
    /// `network ls`.
    NetworkLs,
    /// `service create NAME --network NET [--endpoint-mode vip|dnsrr]`.
    ServiceCreate {
        /// Service name.
        name: String,
        /// Its network.
        network: String,
        /// How its name resolves.
        endpoint_mode: EndpointMode,
        /// The active check its tasks' nodes run on them.
        #[serde(default)]
        health_check: Option<crate::model::HealthCheck>,
    },
    /// `service update NAME (--health-… | --no-health-check)`.
    ServiceUpdate {
        /// Service name.
        name: String,
        /// The new check; `None` removes it.
        health_check: Option<crate::model::HealthCheck>,
    },
    /// `service ls`.
    ServiceLs,
    /// `service ps NAME`.
    ServicePs {
        /// Service name.
        name: String,
    },
    /// `service inspect NAME`.
    ServiceInspect {
        /// Service name.
        name: String,
    },
    /// `service rm NAME`.
    ServiceRm {
        /// Service name.
        name: String,
    },
    /// `attach SERVICE --netns PATH [--name TASK] [--ip ADDR]`.
    Attach {
        /// Service the namespace becomes a task of.
        service: String,
        /// Network namespace path.
        netns: String,
        /// Task name; generated when absent.
        name: Option<String>,
        /// The address to give the task; one is picked when absent.
        #[serde(default)]
        ip: Option<std::net::Ipv4Addr>,
    },
    /// `detach TASK`.
    Detach {
        /// Task name.
        name: String,
        /// Drain first: wait until every node stops sending it new connections, then
        /// until its connections finish or this many milliseconds pass. Absent or 0:
        /// remove it at once.
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// `publish PUBLISHED:TARGET[/proto] SERVICE [--detach]`.
    Publish {
        /// The port spec.
        spec: PortSpec,
        /// The service.
        service: String,
        /// Return at once instead of waiting until every node serves the port.
        #[serde(default)]
        detach: bool,
        /// snat (default) or dsr.
        #[serde(default)]
        mode: PublishMode,
        /// The proxy's load-balancing policy.
        #[serde(default)]
        lb: crate::model::LbPolicy,
        /// Write a PROXY protocol v2 header to the task.
        #[serde(default)]
        proxy_protocol: bool,
        /// Most connections at once per node (0: no limit of its own).
        #[serde(default)]
        max_connections: u32,
    },
    /// `unpublish PUBLISHED[/proto] [SERVICE]`.
    Unpublish {
        /// Published port.
        published: u16,
        /// Protocol.
        proto: meshd_dataplane::proxy::Proto,
        /// If given, the port must be published for this service.
        service: Option<String>,
        /// Close the port to new connections at once, and let open ones finish for
        /// this many milliseconds before they are cut. Absent or 0: cut them at once.
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// `node ls`.
    NodeLs,
    /// `node drain NODE` / `node activate NODE`.
    NodeAvailability {
        /// The node.
        name: String,
        /// What it becomes.
        availability: crate::model::Availability,
    },
    /// `key rotate`: a new cluster key, accepted everywhere before anyone seals with it.
    KeyRotate,
    /// `key ls`.
    KeyLs,
    /// `key install --file PATH`: replace this node's keyring with the operator's keys
    /// (out of band: for a compromised key; run it on every node).
    KeyInstall {
        /// The keys as 64 hex digits each; the first seals.
        keys: SecretKeys,
    },
    /// `status`.
    Status,
}

/// Key material inside a request: sent as is, never shown by `Debug` (so a request
/// that is logged or printed in a panic cannot leak the cluster key).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretKeys(pub Vec<String>);

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} keys, redacted]", self.0.len())
    }
}

/// meshd's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    /// Success, with a command-specific JSON result.
    Ok {
        /// The result.
        ok: serde_json::Value,
    },
    /// Failure, with a one-line message that names the problem and the fix.
    Err {
        /// The message.
        error: String,
    },
}

/// Errors talking to meshd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot reach meshd at {path}: {source}; is meshd running on this node? start it (see `meshd --help`) or pass --socket")]
    Connect {
        /// Socket path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// meshd did not answer in time.
    #[error("meshd at {path} did not answer within {within:?}; check that it runs and is not stuck (its log, `systemctl status meshd`), or wait longer with --timeout")]
    Timeout {
        /// Socket path.
        path: String,
        /// The timeout.
        within: Duration,
    },
    /// meshd closed the connection without an answer.
    #[error("meshd at {path} closed the connection without answering; see its log")]
    NoAnswer {
        /// Socket path.
        path: String,
    },
    /// The exchange broke off.
    #[error("talking to meshd: {0}")]
    Io(#[from] std::io::Error),
    /// meshd answered something unreadable.
    #[error("meshd sent an unreadable answer: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request to the meshd listening on `socket` and returns its answer, or
/// [`ClientError::Timeout`] if the whole exchange takes longer than `within`.
pub async fn call(socket: &Path, request: &Request, within: Duration) -> Result<Response, ClientError> {
    let path = || socket.display().to_string();
    match tokio::time::timeout(within, exchange(socket, request)).await {
        Ok(Ok(answer)) if answer.is_empty() => Err(ClientError::NoAnswer { path: path() }),
        Ok(Ok(answer)) => Ok(serde_json::from_str(&answer)?),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ClientError::Timeout { path: path(), within }),
    }
}

/// Writes the request line and reads the answer line.
async fn exchange(socket: &Path, request: &Request) -> Result<String, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.shutdown().await?;
    let mut answer = String::new();
    BufReader::new(read).take(MAX_RESPONSE as u64).read_line(&mut answer).await?;
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let req =
            Request::Attach { service: "web".into(), netns: "/run/netns/c1".into(), name: None, ip: None };
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains(r#""cmd":"attach""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
    }

    #[tokio::test]
    async fn a_daemon_that_never_answers_is_a_timeout_naming_its_socket() {
        let dir = std::env::temp_dir().join(format!("meshd-api-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("silent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Accepts and holds every connection, never answering.
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let started = std::time::Instant::now();
        let err = call(&path, &Request::Status, Duration::from_millis(300)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let text = err.to_string();
        assert!(matches!(err, ClientError::Timeout { .. }), "{text}");
        assert!(text.contains(&path.display().to_string()) && text.contains("did not answer"), "{text}");
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn responses_distinguish_ok_from_error() {
        let ok: Response = serde_json::from_str(r#"{"ok":[1,2]}"#).unwrap();
        assert!(matches!(ok, Response::Ok { .. }));
        let err: Response = serde_json::from_str(r#"{"error":"no"}"#).unwrap();
        assert_eq!(err, Response::Err { error: "no".into() });
    }

    #[test]
    fn key_install_requests_never_print_their_keys() {
        let key = "ab".repeat(32);
        let req = Request::KeyInstall { keys: SecretKeys(vec![key.clone()]) };
        assert!(!format!("{req:?}").contains(&key), "{req:?}");
        // ...but travel whole.
        assert!(serde_json::to_string(&req).unwrap().contains(&key));
    }
}
