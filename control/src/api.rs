//! The local API between `meshctl` and `meshd`: one JSON request per line on a unix
//! socket, answered by one JSON response line. Types and codec only; the agent serves
//! it and meshctl calls it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::{model::EndpointMode, spec::PortSpec};

/// Default path of the API socket.
pub const DEFAULT_SOCKET: &str = "/run/meshd/meshd.sock";

/// Largest request or response line accepted.
pub const MAX_LINE: usize = 16 << 20;

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
    /// `attach SERVICE --netns PATH [--name TASK]`.
    Attach {
        /// Service the namespace becomes a task of.
        service: String,
        /// Network namespace path.
        netns: String,
        /// Task name; generated when absent.
        name: Option<String>,
    },
    /// `detach TASK`.
    Detach {
        /// Task name.
        name: String,
    },
    /// `publish PUBLISHED:TARGET[/proto] SERVICE`.
    Publish {
        /// The port spec.
        spec: PortSpec,
        /// The service.
        service: String,
    },
    /// `unpublish PUBLISHED[/proto] [SERVICE]`.
    Unpublish {
        /// Published port.
        published: u16,
        /// Protocol.
        proto: meshd_dataplane::proxy::Proto,
        /// If given, the port must be published for this service.
        service: Option<String>,
    },
    /// `node ls`.
    NodeLs,
    /// `key rotate`: a new cluster key, accepted everywhere before anyone seals with it.
    KeyRotate,
    /// `key ls`.
    KeyLs,
    /// `key install --file PATH`: replace this node's keyring with the operator's keys
    /// (out of band: for a compromised key; run it on every node).
    KeyInstall {
        /// The keys as 64 hex digits each; the first seals.
        keys: Vec<String>,
    },
    /// `status`.
    Status,
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
    /// The exchange broke off.
    #[error("talking to meshd: {0}")]
    Io(#[from] std::io::Error),
    /// meshd answered something unreadable.
    #[error("meshd sent an unreadable answer: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request to the meshd listening on `socket` and returns its answer.
pub async fn call(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect { path: socket.display().to_string(), source })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.shutdown().await?;
    let mut answer = String::new();
    BufReader::new(read).take(MAX_LINE as u64).read_line(&mut answer).await?;
    Ok(serde_json::from_str(&answer)?)
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let req = Request::Attach { service: "web".into(), netns: "/run/netns/c1".into(), name: None };
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains(r#""cmd":"attach""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
    }

    #[test]
    fn responses_distinguish_ok_from_error() {
        let ok: Response = serde_json::from_str(r#"{"ok":[1,2]}"#).unwrap();
        assert!(matches!(ok, Response::Ok { .. }));
        let err: Response = serde_json::from_str(r#"{"error":"no"}"#).unwrap();
        assert_eq!(err, Response::Err { error: "no".into() });
    }
}
